"""What every exported graph shares: tensor/graph specs, the contract file, validation bounds, the KV-cache stand-in
used while tracing, and the family lookup of a contract.

The contract (``contract.json``) is the explicit interface between the exported graphs and the runtime that drives
them (onnxruntime-genai's idea): graph files, every input/output name, dtype and shape (symbolic dims named), the
family's config, and what each input means. ``moevl.export.session.ExportedSession`` reads it and drives the graphs
of any family; the family's half of the contract (how its batch feeds the graphs, what its routing outputs mean) is
its ``GraphIO`` in ``export/builders/<family>.py``, next to the ``Builder`` that wrote those graphs.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import torch
from torch import nn

CONTRACT = "contract.json"
FORMAT = "moevl-onnx"
FORMAT_VERSION = 1
# validation bounds: max |ORT - PyTorch| relative to max(1, max |PyTorch|)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # fp16 observed ~1e-3 on awaker-tiny
TORCH_TO_ONNX = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                 torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}


class ExportError(RuntimeError):
    """An export that cannot be done or did not validate; nothing is left at the output folder."""


class ProviderError(RuntimeError):
    """The requested runtime / execution provider is not available or not actually used by the session."""


class ExportFolderError(ValueError):
    """An export folder whose files are missing or corrupt (bad input: the CLI exits 2)."""


class GearError(ValueError):
    """A call whose shapes fit no compiled gear."""


@dataclasses.dataclass
class TensorSpec:
    name: str
    dtype: str            # ONNX-style element type name: float32, float16, int64, bool
    shape: list           # ints and symbolic names

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GraphSpec:
    name: str
    module: nn.Module
    example: tuple
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def dynamic_axes(self) -> dict:
        axes = {}
        for t in self.inputs + self.outputs:
            sym = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if sym:
                axes[t.name] = sym
        return axes


class ConcatCache(nn.Module):
    """Stands in for moevl.model.layers.KVCache while tracing: present = Concat(past, new) along the sequence axis,
    so one decoder graph serves prefill (past_seq = 0) and decode with shape-polymorphic ops only (no ScatterND)."""

    def __init__(self, past_k, past_v):
        super().__init__()
        self.past_k, self.past_v = past_k, past_v
        self.present = None

    def update(self, cache_pos, k, v):
        self.present = (torch.cat([self.past_k, k], dim=2), torch.cat([self.past_v, v], dim=2))
        return self.present


class TracedDecoder(nn.Module):
    """Base of the families' decoder graphs: runs ``step(model, inputs_embeds, ...)`` with the model's KV caches
    replaced by ConcatCaches over the past inputs, and appends the present outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = len(model.model.layers)

    def with_past(self, past, step):
        m = self.model
        caches = nn.ModuleList(ConcatCache(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers))
        saved, m.caches = m.caches, caches
        try:
            outs = list(step())
        finally:
            m.caches = saved
        for c in caches:
            outs.extend(c.present)
        return tuple(outs)


def kv_cache_specs(layers: int, kv_heads: int, head_dim: int, batch: int, past: int, dtype, dname: str):
    """Example past KV tensors and the past/present specs of a decoder graph (shared by the families)."""
    tensors, past_specs, present_specs = [], [], []
    for i in range(layers):
        for kind in ("key", "value"):
            tensors.append(torch.randn(batch, kv_heads, past, head_dim, dtype=dtype))
            past_specs.append(TensorSpec(f"past_key_values.{i}.{kind}", dname, ["batch", kv_heads, "past_seq",
                                                                                head_dim]))
            present_specs.append(TensorSpec(f"present.{i}.{kind}", dname, ["batch", kv_heads, "total_seq", head_dim]))
    return tensors, past_specs, present_specs


def past_name(i: int) -> str:
    """The i-th past input (keys and values alternate by layer)."""
    return f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}"


def present_name(i: int) -> str:
    return f"present.{i // 2}.{'key' if i % 2 == 0 else 'value'}"


def keep_mask(valid_past: torch.Tensor, valid_new: torch.Tensor):
    """The decoder's attention_keep [B, 1, T, P+T] (numpy) for T new tokens after P cached slots: the PyTorch
    session's own mask (moevl.model.session.attention_keep) over the slots the graph sees."""
    from moevl.model.session import attention_keep

    p, t = valid_past.shape[1], valid_new.shape[1]
    return attention_keep(torch.cat([valid_past, valid_new], dim=1), torch.arange(p, p + t)).numpy()


def read_contract(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONTRACT
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONTRACT}: not a folder written by `moevl export onnx`")
    try:
        contract = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFolderError(f"{path} is not valid JSON ({e}): re-export the folder") from e
    if not isinstance(contract, dict) or contract.get("format") != FORMAT:
        raise ExportFolderError(f"{path} is not a {FORMAT} contract: not a folder written by `moevl export onnx`")
    if contract.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {contract['format_version']}; this build reads up to "
                         f"{FORMAT_VERSION}: upgrade moevl")
    return contract


def builders_of(family_name: str):
    """The module with a family's ``Builder`` and ``GraphIO`` (named by its registry entry)."""
    from moevl.model import family

    fam = family.get(family_name)
    if fam.export is None:
        raise ExportError(f"ONNX export of the {fam.name} family is not available yet")
    return importlib.import_module(fam.export)
