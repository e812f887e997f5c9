# Import moevl before any test module: it puts PyPI's `kernels` (a transformers dependency) in sys.modules before
# this repository's top-level kernels/ folder, which is first on sys.path under `python -m pytest`, can shadow it
# (moevl/__init__.py, _import_pypi_kernels).
import moevl  # noqa: F401
