"""PyTorch -> ONNX: one builder per model family, three graphs, a contract file, validation, atomic output.

    from export.onnx_export import export_onnx
    export_onnx("awaker-tiny", "out/awaker-tiny-onnx")           # or a checkpoint folder

Layout (onnxruntime-genai's VLM contract, adapted; the names are in ``contract.json``):
  vision.onnx     patches [num_patches, C*t*p*p], vision_pos [num_patches, 2] int64 (2-D rotary ids),
                  vision_keep [num_patches, num_patches] bool (block-diagonal) -> image_features [num_image_tokens, H]
  embedding.onnx  input_ids [batch, seq] int64, image_features [num_image_tokens, H], image_mask [batch, seq] bool,
                  router_span [batch, 2] int64 -> inputs_embeds [batch, seq, H], router_input [batch, H] fp32
  decoder.onnx    inputs_embeds, attention_keep [batch, 1, seq, total_seq] bool, position_ids [3, batch, seq] int64,
                  router_input [batch, H] fp32, past_key_values.{i}.key/value [batch, kv_heads, past_seq, head_dim]
                  -> logits [batch, vocab] fp32 (last position only), router_expert/router_p [layers, 2, batch],
                  present.{i}.key/value [batch, kv_heads, total_seq, head_dim]   (total_seq = past_seq + seq)
One decoder graph serves prefill (past_seq = 0) and decode (seq = 1): the KV cache is past/present Concat, so the
graph has only shape-polymorphic ops (no ScatterND from an in-place cache write). Awaker's routers run inside the
decoder on ``router_input`` (the pooled prompt embedding, computed once at prefill by the embedding graph and fed
unchanged at every step): per-request routing is a [batch, H] input, so there is no data-dependent shape anywhere.
Everything data-dependent (M-RoPE positions, the causal/padding mask, vision position ids and mask, the router span)
is computed by the runtime before the graphs run, as model.inputs does for PyTorch.

MoE-LLaVA's builder, runtime and validation (same three graphs, 1-D positions, MoE experts chosen inside the
decoder per token) are in export/moe_llava_onnx.py.

Exporter: the TorchScript exporter (``dynamo=False``) at opset 17, which ATC accepts (tests/test_export.py checks
that it still works on the installed torch), over the model with the "export" kernel backend (dense, static-shape
formulations: kernels/fast.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

CONTRACT = "contract.json"
FORMAT = "moevl-onnx"
FORMAT_VERSION = 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights: above it the graph keeps them in <graph>.onnx.data
# validation bounds: max |ORT - PyTorch| relative to max(1, max |PyTorch|)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # fp16 observed ~1e-3 on awaker-tiny


class ExportError(RuntimeError):
    """An export that cannot be done or did not validate; nothing is left at the output folder."""


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


# --------------------------------------------------------------------------------------------- Awaker graphs
class ConcatCache(nn.Module):
    """Stands in for model.layers.KVCache while tracing: present = Concat(past, new) along the sequence axis."""

    def __init__(self, past_k, past_v):
        super().__init__()
        self.past_k, self.past_v = past_k, past_v
        self.present = None

    def update(self, cache_pos, k, v):
        self.present = (torch.cat([self.past_k, k], dim=2), torch.cat([self.past_v, v], dim=2))
        return self.present


class AwakerVisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, patches, vision_pos, vision_keep):
        return self.model.encode_images(patches, vision_pos, vision_keep)


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


def embed_with_images(embed_tokens: nn.Embedding, input_ids, image_features, image_mask):
    """model.embed without masked_scatter (NonZero/ScatterND in ONNX): the k-th image-pad position (row-major over
    the batch) takes row k of image_features, found by a CumSum over the mask and a Gather from the features with a
    zero row prepended (so that a text-only call may pass 0 feature rows)."""
    emb = embed_tokens(input_ids)                                          # [B, T, H]
    flat = image_mask.reshape(-1).to(torch.int64)                          # [B*T]
    index = torch.cumsum(flat, 0) * flat                                   # 1..M on image positions, else 0
    rows = torch.cat([torch.zeros_like(emb[0, :1]), image_features.to(emb.dtype)], dim=0)  # [M+1, H]
    picked = rows[index].reshape(emb.shape)
    return torch.where(image_mask[..., None], picked, emb)


class AwakerEmbeddingGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_features, image_mask, router_span):
        from model.inputs import pooled_prompt

        emb = embed_with_images(self.model.model.embed_tokens, input_ids, image_features, image_mask)
        return emb, pooled_prompt(emb, router_span)


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest fp16 value, kept in fp32, by Veltkamp splitting (x * (2^13 + 1) keeps 24 - 13 = 11
    significant bits) instead of Cast(fp16) -> Cast(fp32): ONNX Runtime's CPU provider removes such a Cast pair as
    redundant (measured with ORT 1.32, also with graph optimisations off), which silently skips the rounding the
    released router does. Exact for the normal fp16 range (|x| >= 2^-14); router logits and probabilities there."""
    c = x * 8193.0
    return c - (c - x)


def route_for_export(layer, e: torch.Tensor):
    """DecoderLayer.route (model/awaker.py) for the graph: the same router math with ``round_to_fp16`` where the
    original rounds to float16 (logits, probabilities, 1 - p). Returns model.awaker.LayerRouting."""
    from model.awaker import LayerRouting

    def router(r):
        z = e.float()
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + r.eps) * r.norm_weight.float()
        logits = torch.nn.functional.linear(z, r.gate.weight.float(), r.gate.bias.float())
        probs = round_to_fp16(torch.softmax(round_to_fp16(logits), dim=-1))
        p, expert = probs.max(dim=-1)
        return expert, p

    ea, pa = router(layer.self_attn.o_proj.router)
    em, pm = router(layer.mlp.gate_proj.router)
    s = layer.scaling

    def scales(p):  # p is an fp16 value: (1 - p) rounded once to fp16, as (1 - p.half()) computes it
        return torch.stack([p ** 2 * s, round_to_fp16(1 - p) * s], dim=-1)

    sa, sm = scales(pa), scales(pm)
    plans = {"o_proj": layer.self_attn.o_proj.prepare(ea, sa), "gate_proj": layer.mlp.gate_proj.prepare(em, sm),
             "up_proj": layer.mlp.up_proj.prepare(em, sm), "down_proj": layer.mlp.down_proj.prepare(em, sm)}
    return LayerRouting(ea, pa, em, pm, plans)


class AwakerDecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = len(model.model.layers)

    def forward(self, inputs_embeds, attention_keep, position_ids, router_input, *past):
        m = self.model
        caches = nn.ModuleList(ConcatCache(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers))
        saved, m.caches = m.caches, caches
        try:
            routing = [route_for_export(layer, router_input) for layer in m.model.layers] if m.has_adapters else None
            hidden = m(inputs_embeds, position_ids, None, attention_keep, routing)
        finally:
            m.caches = saved
        logits = m.logits(hidden[:, -1])                                   # [B, V] fp32
        outs = [logits]
        if routing is not None:
            outs.append(torch.stack([torch.stack([r.attn_expert, r.mlp_expert]) for r in routing]))  # [L, 2, B]
            outs.append(torch.stack([torch.stack([r.attn_p, r.mlp_p]) for r in routing]).float())
        for c in caches:
            outs.extend(c.present)
        return tuple(outs)


_TORCH_TO_ONNX = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                  torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}


class AwakerOnnxBuilder:
    """What the Awaker family exports: graph wrappers, example inputs, names/shapes, and the contract section."""

    family = "awaker"

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg

    def graph_specs(self) -> list[GraphSpec]:
        cfg, m = self.cfg, self.model
        dt = m.lm_head.weight.dtype
        dname = _TORCH_TO_ONNX[dt]
        h, v = cfg.hidden_size, cfg.vision
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        specs = []
        # vision: one 4x4-patch image (the merge groups are consecutive rows)
        n = 16
        from model.inputs import vision_inputs

        pos, keep = vision_inputs(torch.tensor([[1, 4, 4]]), v.spatial_merge_size)
        specs.append(GraphSpec(
            "vision", AwakerVisionGraph(m), (torch.randn(n, patch_dim), pos, keep),
            [TensorSpec("patches", "float32", ["num_patches", patch_dim]),
             TensorSpec("vision_pos", "int64", ["num_patches", 2]),
             TensorSpec("vision_keep", "bool", ["num_patches", "num_patches"])],
            [TensorSpec("image_features", dname, ["num_image_tokens", h])]))
        # embedding: batch 2, 5 tokens, 2 image tokens in the first request
        ids = torch.randint(7, cfg.vocab_size, (2, 5))
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[0, 1:3] = True
        specs.append(GraphSpec(
            "embedding", AwakerEmbeddingGraph(m),
            (ids, torch.randn(2, h, dtype=dt), mask, torch.tensor([[0, 4], [1, 5]])),
            [TensorSpec("input_ids", "int64", ["batch", "seq"]),
             TensorSpec("image_features", dname, ["num_image_tokens", h]),
             TensorSpec("image_mask", "bool", ["batch", "seq"]),
             TensorSpec("router_span", "int64", ["batch", 2])],
            [TensorSpec("inputs_embeds", dname, ["batch", "seq", h]),
             TensorSpec("router_input", "float32", ["batch", h])]))
        # decoder: batch 2, seq 3 on a past of 4 (distinct sizes so the tracer cannot confuse the axes)
        b, t, p = 2, 3, 4
        past, past_specs, present_specs = kv_cache_specs(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, b, p, dt,
                                                         dname)
        keep = torch.ones(b, 1, t, p + t, dtype=torch.bool).tril(diagonal=p)
        routing_in = [TensorSpec("router_input", "float32", ["batch", h])] if m.has_adapters else []
        routing_out = ([TensorSpec("router_expert", "int64", [cfg.num_layers, 2, "batch"]),
                        TensorSpec("router_p", "float32", [cfg.num_layers, 2, "batch"])] if m.has_adapters else [])
        example = (torch.randn(b, t, h, dtype=dt), keep, torch.arange(t).expand(3, b, t) + p,
                   torch.randn(b, h)) + tuple(past)
        module = AwakerDecoderGraph(m)
        if not m.has_adapters:
            module = _DropRouterInput(module)
            example = example[:3] + example[4:]
        specs.append(GraphSpec(
            "decoder", module, example,
            [TensorSpec("inputs_embeds", dname, ["batch", "seq", h]),
             TensorSpec("attention_keep", "bool", ["batch", 1, "seq", "total_seq"]),
             TensorSpec("position_ids", "int64", [3, "batch", "seq"])] + routing_in + past_specs,
            [TensorSpec("logits", "float32", ["batch", cfg.vocab_size])] + routing_out + present_specs))
        return specs

    def accept(self, session) -> None:
        """Raise ExportError if this session cannot be exported (every Awaker session can)."""

    def contract_section(self) -> dict:
        cfg = self.cfg
        routing = None
        if self.model.has_adapters:
            routing = {
                "mode": "prefill",
                "input": "router_input",
                "semantics": "router_input [batch, hidden] fp32 is the mean of the prompt embeddings (image features "
                             "inserted) over each request's router span (embedding graph output of the prefill call); "
                             "feed the same value at every decode step. The decoder runs every layer's two routers "
                             "on it (RMSNorm -> Linear -> fp16 softmax -> top-1) and applies the chosen task expert "
                             "and the global expert of each LoRA-MoE linear with scales (p^2 s, (1-p) s).",
                "outputs": {"router_expert": "[layers, 2 (attn o_proj, mlp gate/up/down), batch] int64 expert index",
                            "router_p": "[layers, 2, batch] fp32 router probability of that expert"},
            }
        return {
            "decoder": {
                "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
                "present_key": "present.{i}.key", "present_value": "present.{i}.value",
                "kv_layout": "[batch, kv_heads, seq, head_dim]; present = Concat(past, new) on axis 2",
                "attention_keep": "bool [batch, 1, seq, past_seq + seq], True = the query may attend to the slot: "
                                  "causal over slots and padding masked, and every query sees its own slot "
                                  "(model.session.attention_keep)",
                "position_ids": "M-RoPE ids [3 (t, h, w), batch, seq] (model.inputs.mrope_positions); decode "
                                "steps continue from next_position with all three equal",
                "logits": "the last position only, [batch, vocab] fp32",
            },
            "vision": {"merge": cfg.vision.spatial_merge_size, "patch_order": "Qwen2-VL processor order",
                       "vision_pos": "model.inputs.vision_inputs (row, col per patch)",
                       "vision_keep": "block-diagonal, one block per image frame"},
            "embedding": {"image_mask": "True on <|image_pad|> positions; their rows are image_features in "
                                        "row-major order over the batch",
                          "router_span": "[start, end) per request in padded coordinates (model.inputs.prompt_span)"},
            "routing": routing,
            "special_tokens": {k: getattr(cfg, k) for k in (
                "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "im_start_token_id", "im_end_token_id", "pad_token_id")} | {"eos_token_ids": list(cfg.eos_token_ids)},
        }


class _DropRouterInput(nn.Module):
    """The base model (no adapters): the decoder has no router input."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, inputs_embeds, attention_keep, position_ids, *past):
        return self.inner(inputs_embeds, attention_keep, position_ids, None, *past)


# family -> builder class, or "module:Class" for a family whose builder lives in its own module (imported on use)
BUILDERS = {"awaker": AwakerOnnxBuilder, "moe-llava": "export.moe_llava_onnx:MoeLlavaOnnxBuilder"}


def builder_class(family: str):
    entry = BUILDERS.get(family)
    if entry is None:
        raise ExportError(f"ONNX export of the {family} family is not available yet (families: {sorted(BUILDERS)})")
    if isinstance(entry, str):
        import importlib

        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
    return entry


# --------------------------------------------------------------------------------------------- export
def _export_graph(spec: GraphSpec, folder: Path, opset: int) -> Path:
    """Trace one graph to folder/<name>.onnx (weights beside it in <name>.onnx.data when large)."""
    import onnx

    raw = folder / f".raw-{spec.name}"
    raw.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic, the TorchScript deprecation note
        torch.onnx.export(spec.module, spec.example, str(raw / spec.file), dynamo=False, opset_version=opset,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    proto = onnx.load(str(raw / spec.file), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    target = folder / spec.file
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=spec.file + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(target))
    del proto
    shutil.rmtree(raw)
    return target


def _graph_entry(spec: GraphSpec, folder: Path) -> dict:
    data = folder / (spec.file + ".data")
    return {"file": spec.file, "external_data": data.name if data.exists() else None,
            "inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs]}


def load_for_export(spec: str | Path, dtype: str, **options):
    """-> the PyTorch session (model on the CPU in dtype) that is traced and that validation compares against.
    ``options`` go to model.api.load (e.g. vision_tower= for a MoE-LLaVA folder)."""
    from model.api import family_of, load

    builder_class(family_of(spec))  # an unsupported family fails before loading
    return load(spec, device="cpu", dtype=dtype, **options)


def export_onnx(spec, out, dtype: str = "fp32", opset: int = 17, force: bool = False, validate: bool = True,
                log=print, session=None, processor_folder=None, validate_tokens: int = 8, **load_options) -> Path:
    """Export a model (preset, folder, or a loaded PyTorch session) to an ONNX folder; see the module docstring.

    The folder is written under a temporary name beside ``out``, validated, then renamed; any failure (or an
    interrupt) removes the temporary folder and leaves ``out`` as it was. ``load_options`` go to model.api.load
    when ``spec`` is loaded here.
    """
    from ascend.device import dtype_name, parse_dtype

    if dtype not in TOLERANCE:
        raise ValueError(f"--dtype must be one of {sorted(TOLERANCE)}, not {dtype!r}")
    if opset > 18:
        raise ValueError(f"opset {opset}: ATC accepts ONNX opsets up to 18; export with 17 (default)")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    if session is None:
        session = load_for_export(spec, dtype, **load_options)
    model = session.model
    if dtype_name(next(model.parameters()).dtype) != dtype:
        raise ExportError(f"the session's model is {next(model.parameters()).dtype}, not {parse_dtype(dtype)}")
    builder = builder_class(model.cfg.family)(model)
    builder.accept(session)
    if processor_folder is None and getattr(session, "processor", None) is not None:
        processor_folder = getattr(session.processor, "folder", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        saved_kernels = model.ops.kernels
        from kernels import get_kernels

        model.set_kernels(get_kernels("export"))
        try:
            specs = builder.graph_specs()
            with torch.no_grad():
                for s in specs:
                    _export_graph(s, tmp, opset)
                    log(f"exported {s.file} ({_size_mb(tmp, s.file):.1f} MB)")
        finally:
            model.set_kernels(saved_kernels)
        files = []
        if processor_folder is not None:
            from model.loader import PROCESSOR_FILES

            for name in PROCESSOR_FILES:
                if (Path(processor_folder) / name).is_file():
                    shutil.copy2(Path(processor_folder) / name, tmp / name)
                    files.append(name)
        import onnx

        contract = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "family": builder.family,
            "dtype": dtype, "opset": opset,
            "exporter": f"torch.onnx.export(dynamo=False) torch {torch.__version__}, onnx {onnx.__version__}",
            "kernel_backend": "export",
            "config": model.cfg.to_dict(),
            "graphs": {s.name: _graph_entry(s, tmp) for s in specs},
            "processor_files": files,
            "symbolic_dims": {"batch": "requests", "seq": "new tokens this call", "past_seq": "cached tokens",
                              "total_seq": "past_seq + seq", "num_patches": "vision patches (all images)",
                              "num_image_tokens": "num_patches / merge^2"},
        } | builder.contract_section()
        (tmp / CONTRACT).write_text(json.dumps(contract, indent=2))
        log(f"wrote {CONTRACT} ({time.perf_counter() - t0:.1f} s)")
        if validate:
            from export.validate import validate_export

            report = validate_export(tmp, session, tokens=validate_tokens, log=log)
            contract["validation"] = report
            (tmp / CONTRACT).write_text(json.dumps(contract, indent=2))
        if out.exists():  # --force: move the old folder aside first so that a failed rename keeps it
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"ONNX export written to {out}")
    return out


def _size_mb(folder: Path, file: str) -> float:
    total = (folder / file).stat().st_size
    data = folder / (file + ".data")
    if data.exists():
        total += data.stat().st_size
    return total / 2**20


def read_contract(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONTRACT
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONTRACT}: not a folder written by `moevl export onnx`")
    contract = json.loads(path.read_text())
    if contract.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} contract (format {contract.get('format')!r})")
    if contract.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {contract['format_version']}; this build reads up to "
                         f"{FORMAT_VERSION}: upgrade moevl")
    return contract


def _eprint(*a):
    print(*a, file=sys.stderr)
