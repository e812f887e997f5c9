"""moevl: mixture-of-experts vision-language models (Awaker2.5-VL, MoE-LLaVA) on Ascend NPUs, CUDA GPUs and CPUs,
with ONNX / Ascend OM export. ``moevl.load`` is the Python API; the CLI (``moevl``) is a thin layer over it.

    import moevl
    vl = moevl.load("awaker-tiny", device="cpu")                 # a preset, a checkpoint folder, or
    vl = moevl.load("out/tiny-onnx", backend="ort")              # an exported folder (ONNX Runtime / Ascend OM)
    print(vl.ask("What is in the picture?", images=["cat.png"], max_new_tokens=32).texts[0])

Subpackages: ``moevl.ascend`` (devices), ``moevl.kernels`` (hot ops per backend), ``moevl.model`` (the families),
``moevl.export`` (ONNX / OM and their runtimes), ``moevl.benchmarks``.
"""
from __future__ import annotations

import os as _os
import sys as _sys

# Before torch loads its OpenMP runtime (it reads the variable then): OpenMP's threads sleep as soon as a parallel
# region ends instead of spinning for milliseconds. The kit's CPU decode hands work to other thread pools between
# torch ops (numpy's OpenBLAS for fp32 GEMVs, ONNX Runtime's MLAS for int8 / int4): spinning OpenMP threads took
# their cores. Measured at 7B width (2 layers, AMD EPYC, 2 threads): int8 decode through MLAS 43 -> 37 ms/token,
# fp32 112 -> 101-105, bf16 unchanged, transformers' own fp32 decode 3% slower. A value the user set is kept; with
# torch imported first it is too late to change (the kit then runs as before).
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Likewise numpy's OpenBLAS (read when numpy loads it): its worker threads spin for 2^28 cycles after a call by
# default; 2^4 lets them sleep at once. fp32 decode with the OpenBLAS layout on every shape, paired runs: 132 -> 102
# and 149 -> 134 ms/token (a noisy machine; ad-hoc script).
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# First, before anything imports torch: keeps ``import torch`` working where torch-npu is installed but CANN is
# not (see ascend/__init__.py).
import moevl.ascend  # noqa: E402,F401  isort: skip


def _import_pypi_kernels() -> None:
    """PyPI's ``kernels`` (Hugging Face's hub kernels, a dependency of transformers 5.x) and this repository's
    top-level ``kernels/`` folder (installed as ``moevl.kernels``) share a name. Where Python runs from the
    repository's root (``python -m pytest``, ``python -m moevl.benchmarks...``) the folder comes first on sys.path,
    and transformers' ``from kernels import ...`` then fails deep inside its imports. Importing the real package
    once, with the root off the path, puts it in sys.modules for everyone (the kit itself only imports
    ``moevl.kernels``)."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    if "kernels" in sys.modules:
        return
    spec, ours = importlib.util.find_spec("kernels"), importlib.util.find_spec("moevl.kernels")
    if spec is None or spec.origin is None or ours is None or ours.origin is None:
        return
    if Path(spec.origin).resolve() != Path(ours.origin).resolve():  # not shadowed: nothing to do
        return
    root = Path(ours.origin).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")  # PyPI's, when installed (by name: the kit itself never imports "kernels")
    except ImportError:  # not installed: transformers does not look for it either
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_import_pypi_kernels()

BACKENDS = ("torch", "ort", "om")


def load(spec, device="auto", backend: str = "torch", dtype=None, strict_npu=None, compile: bool = False,
         generation_config: bool = True, **options):
    """Load a model -> a session with ``ask(...)`` / ``prepare`` / ``prefill`` / ``decode`` / ``routing_decisions``.

    backend "torch" (default): ``spec`` is a preset or a checkpoint folder, run by PyTorch on ``device``
      (auto | cpu | cuda[:N] | npu[:N] | npu-emulated[:910B|:310P]) in ``dtype`` (default: the device's).
      NPU only: ``strict_npu`` makes an op falling back to the CPU an error (None = on for npu-emulated, off for
      npu); ``compile`` runs the decode step in the device's graph mode (TorchAir; not verified on hardware).
      Family options: Awaker ``routing``, ``base``; MoE-LLaVA ``moe_routing``, ``moe_seed``, ``vision_tower``;
      both ``max_context``. ``quantize`` "int8" | "int4": weight quantisation of the base linears,
      MoE-LLaVA's experts and lm_head (int8 per channel, int4 per group of 128; moevl.kernels.quant; on a CPU with
      VNNI int8 runs on FBGEMM with int8 activations per row, ``MOEVL_CPU_QUANT_KERNEL=aten`` keeps it weight-only);
      a folder written by ``moevl quantize`` is already quantised and loads without the fp32 weights.
    backend "ort" / "om": ``spec`` is a folder written by ``moevl export onnx`` / ``moevl export om``; options
      ``provider`` (cpu | cuda | cann), ``quantize`` ("int8"), ``threads``, ``max_context`` (ort), and the NPU
      index from ``device`` ("npu:N") for om.
    Every backend: ``generation_config`` (default True) takes the sampling defaults of the folder's
    ``generation_config.json`` (for an Awaker release, else its ``base``'s), as transformers and vLLM do; a
    request's own values win, and ``ask(...).settings`` says which values were used and from where. False: the
    kit's defaults (greedy).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    # read first: a broken generation_config.json fails before the model is loaded
    defaults, path = _generation_defaults([spec, options.get("base")], generation_config)
    if backend != "torch":
        from moevl.export.session import load_exported

        if backend == "ort" and options.get("quantize") not in (None, "int8"):
            raise ValueError(f"--quantize {options['quantize']} is not available with --backend ort (ONNX Runtime "
                             "quantises the decoder to int8 only): use --quantize int8, or int4 with --backend torch")

        session = load_exported(spec, backend, device=device, dtype=dtype, strict_npu=strict_npu, compile=compile,
                                **options)
        session.generation_defaults, session.generation_config_path = defaults, path
        return session
    from moevl.ascend.device import Device, resolve_device
    from moevl.kernels import quant
    from moevl.model.family import load_torch

    quantize = options.pop("quantize", None)
    if quantize is not None:
        quant.check_mode(quantize)  # before the slow part

    if isinstance(device, Device):
        dev = device
        model_dtype = dev.dtype if dtype is None else dev.check_dtype(dtype)
    else:
        if strict_npu and isinstance(device, str) and device.strip().lower().startswith("npu"):
            from moevl.ascend.npu_probe import strict_npu as set_strict

            set_strict(True)  # before torch_npu is imported by resolve_device
        dev = resolve_device(device, dtype)
        model_dtype = dev.dtype
    dev.set_strict(dev.emulated if strict_npu is None else strict_npu)
    session = load_torch(spec, dev, model_dtype, **options)
    if quantize is not None:
        quant.quantize_loaded(session.model, quantize)
    place(session.model, dev)
    if compile:
        session.compile()
    session.generation_defaults, session.generation_config_path = defaults, path
    return session


def _generation_defaults(folders, enabled: bool):
    """The sampling defaults of the first ``generation_config.json`` among ``folders`` -> (dict, its path)."""
    from pathlib import Path

    from moevl.model.generate import GENERATION_CONFIG, read_generation_config

    for folder in folders if enabled else ():
        if folder is None or not Path(folder).is_dir():
            continue  # a preset name
        path = Path(folder) / GENERATION_CONFIG
        if path.is_file():
            return read_generation_config(path), path
    return {}, None


def place(model, device):
    """What makes a model on ``device`` run the device's code path: its kernel set (for NPUs, the chip's) and the
    weight layout its kernels want (310P: FRACTAL_NZ; quantised weights bound to the backend's kernels). ``load`` does this; code that builds a model by hand (the
    benchmarks' random 7B-width models) calls it too. -> model"""
    from moevl.ascend.device import dtype_name
    from moevl.kernels import get_kernels

    kernels = get_kernels(device)
    dtype = model.lm_head.weight.dtype
    bad = [why for op, why in kernels.unsupported(dtype).items() if op in model.hot_ops]
    if bad:
        raise ValueError(f"{model.cfg.family} in {dtype_name(dtype)} cannot run on {device.chip}: {'; '.join(bad)}")
    model.set_kernels(kernels)
    device.prepare_model(model)
    kernels.prepare_weights(model)  # the backend's weight layout / quantised kernels, once
    return model


__all__ = ["load", "place", "BACKENDS"]
