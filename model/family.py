"""The model families: one ``Family`` record per family, and the registry — the ONE place a family is looked up.

A family is a package under ``moevl/model/`` (``awaker/``, ``moe_llava/``) whose ``__init__`` defines ``FAMILY``.
Everything else finds a family through this module: ``family_of(spec)`` for a preset or a folder, ``get(name)`` for
a name read from a file (our checkpoint format, an export's contract).

Adding a family:
  1. a package ``model/<name>/`` with config.py (a dataclass with ``family``, ``to_dict``/``from_dict`` and
     presets), network.py (plain PyTorch over ``moevl.kernels`` ops and ``moevl.model.layers``), inputs.py (a
     processor with ``chat`` and ``__call__`` -> a batch with input_ids / attention_mask / next_position and
     ``to``), checkpoint.py (``detect(folder)`` and the loader) and session.py (a ``TorchSession`` with
     ``_prefill`` / ``_decode`` / ``routing_decisions``);
  2. ``FAMILY = Family(...)`` in its ``__init__.py``;
  3. its module path in ``REGISTRY`` below;
  4. for ONNX/OM export, ``export/builders/<name>.py`` with ``Builder`` and ``GraphIO`` (see export/graph.py),
     named in ``Family.export``.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Callable

from moevl.model.checkpoint import OUR_CONFIG, CheckpointError, read_json

# The families, in the order their ``detect`` is asked about a folder.
REGISTRY = ("moevl.model.awaker", "moevl.model.moe_llava")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    presets: tuple[str, ...]
    detect: Callable[[Path], str | None]  # a folder's format name when it is this family's, else None
    load: Callable                         # (spec, device, dtype, **options) -> TorchSession
    formats: str                           # what detect recognises, for error messages
    export: str | None = None              # module of its ONNX Builder + GraphIO (imported by moevl.export only)

    @property
    def demo(self) -> str:
        """The built-in demo preset (the first preset)."""
        return self.presets[0]

    @property
    def options(self) -> tuple[str, ...]:
        """The load options this family takes (beyond spec, device, dtype)."""
        params = list(inspect.signature(self.load).parameters)
        return tuple(params[3:])


def families() -> dict[str, Family]:
    out = {}
    for module in REGISTRY:
        fam = importlib.import_module(module).FAMILY
        out[fam.name] = fam
    return out


def get(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise CheckpointError(f"unknown model family {name!r}; this build has {', '.join(fams)}")
    return fams[name]


def presets() -> dict[str, Family]:
    return {p: fam for fam in families().values() for p in fam.presets}


def family_of(spec: str | Path) -> Family:
    """The family of a preset name or a local folder (our format, or a family's own formats)."""
    by_preset = presets()
    if str(spec) in by_preset:
        return by_preset[str(spec)]
    folder = Path(spec)
    if not folder.is_dir():
        raise CheckpointError(f"{spec} is neither a preset ({', '.join(sorted(by_preset))}) nor an existing folder")
    if (folder / OUR_CONFIG).is_file():
        name = read_json(folder / OUR_CONFIG).get("family")
        if name is None:
            raise CheckpointError(f"{folder / OUR_CONFIG} names no \"family\" ({', '.join(families())}): "
                                  "re-save the model with moevl")
        return get(name)
    for fam in families().values():
        if fam.detect(folder) is not None:
            return fam
    known = "; ".join(f"{fam.formats}" for fam in families().values())
    raise CheckpointError(f"{folder} is not a model folder this kit knows: expected {OUR_CONFIG} (our format); {known}")


def load_torch(spec, device, dtype=None, **options):
    """The family's PyTorch session for ``spec`` on a resolved Device. Options that do not apply to the family
    are refused by name (None / False count as not given)."""
    fam = family_of(spec)
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    unknown = sorted(set(given) - set(fam.options))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to the {fam.name} family (it takes "
                         f"{', '.join(fam.options)})")
    return fam.load(spec, device, dtype, **given)
