"""Decode at 7B width per precision, side by side: transformers fp32 vs ours fp32 / bf16 / int8 / int4.

    python -m moevl.benchmarks.quant [--layers 2] [--rounds 3] [--new-tokens 32] [--batch8-tokens 8] [--out DIR]
    moevl bench quant ...

The same model as benchmarks.e2e (Awaker at Qwen2-VL-7B width, 2 decoder layers, ViT depth 2, adapters r = 256 with
4 + 1 experts, one image of 64 tokens + ~40 text tokens, greedy). Variants, all built from the same random weights:
transformers Qwen2-VL fp32 (the baseline, sharing our base tensors), ours fp32, ours bf16, ours bf16 + int8 weights,
ours bf16 + int4 weights (group 128, with zero points), as ``moevl.load(..., dtype=, quantize=)`` gives them.
Variants are built one at a time beside the fp32 model (at 7B width all at once needs more than 24 GB); while one
is in memory, every round runs the baseline, ours fp32 and that variant once each, in turn (medians over rounds;
ratios are per round against the baseline of the same round, then the median).
Read bandwidth (``W.sum()`` on 1 GiB) is measured in the same run. Accuracy here is against ours fp32 on the same
random weights (logits of the first token, greedy-token agreement, routing decisions); task accuracy comes from
``moevl eval`` on trained weights (benchmarks/quality.py), which this file does not run.
ONNX Runtime figures are read from benchmarks/results/ort-cpu.json when it exists (a separate run: labelled so).
Writes quant-<device>.json / .md / .png. Not a test: the machine is shared, figures are noisy.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import moevl
from moevl.ascend.device import cpu_model_name, resolve_device
from moevl.benchmarks.common import (RESULTS, NoProcessor, cpu_flags, environment, median, progress,
                                    read_bandwidth_gbs, write_results)
from moevl.kernels import quant

# name, compute dtype, quantize, options ("ours fp32 (oneDNN)" is the fp32 model with packed weights swapped in;
# options: "kernel" the CPU quantised-kernel policy (kernels/quant.py bind_cpu: "aten" the default, "fastest" ATen or
# ONNX Runtime's MLAS per shape, whichever measured faster, "fbgemm" torch's FBGEMM dynamic-quantised linear),
# "zero_point" int4's form)
VARIANTS = (
    ("ours fp32", "fp32", None, {}),
    ("ours fp32 (oneDNN)", "fp32", None, {}),
    ("ours bf16", "bf16", None, {}),
    ("ours int8 (bf16)", "bf16", "int8", {"kernel": "aten"}),
    ("ours int8 (bf16, MLAS where faster)", "bf16", "int8", {"kernel": "fastest"}),
    ("ours int8 (FBGEMM, int8 activations)", "bf16", "int8", {"kernel": "fbgemm"}),
    ("ours int4 (bf16)", "bf16", "int4", {"kernel": "aten", "zero_point": True}),
    ("ours int4 symmetric (bf16, MLAS where faster)", "bf16", "int4", {"kernel": "fastest", "zero_point": False}),
)
BASELINE = "transformers fp32"


def weight_bytes(model, adapters: bool = True) -> int:
    """Bytes a decode step reads: decoder layers' base weights and lm_head in the form they are held (quantised:
    int8/int4 + scales; oneDNN-packed: the dense bytes), plus the selected rank-2r LoRA when ``adapters``."""
    total = 0
    for mod in (model.model.layers, model.lm_head):
        for name, p in mod.named_parameters():
            if ".lora_" not in name and ".router." not in name and not name.startswith(("lora_", "router.")):
                total += p.numel() * p.element_size()
        total += sum(m.nbytes() for m in mod.modules() if isinstance(m, quant.QuantizedWeight))
    if adapters:
        rank = model.cfg.adapters.rank
        for layer in model.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                total += 2 * rank * (lin.in_features + lin.out_features) * lin.lora_A.element_size()
    return total


def _gbs(timing: dict, layout: str) -> str:
    """GB/s of a layout's one-row product from a layout timing row ("-" where that layout was not timed)."""
    t = timing.get(f"{layout}_s")
    return "-" if t is None or t == float("inf") else f"{timing['bytes'] / t / 1e9:.1f}"


class LayoutSwitch:
    """The fp32 model's base linears in several layouts at once, swapped in and out between runs: "plain" (the
    Parameters, shared with the transformers baseline), "onednn" (packed copies: extra memory, built on first use)
    and "openblas" (the same plain storage, one-row products through numpy's sgemv; the batch-1 LoRA GEMVs follow)."""

    def __init__(self, model):
        self.model = model
        self.plain = {name: mod for name, mod in quant.base_linears(model)}
        self.weights = {name: mod.weight for name, mod in self.plain.items()}
        self.forms = {"plain": self.weights}

    def _form(self, layout: str) -> dict:
        if layout not in self.forms:
            cls = {"onednn": quant.OnednnWeight, "openblas": quant.OpenblasWeight}[layout]
            self.forms[layout] = {name: cls(w) for name, w in self.weights.items()}
        return self.forms[layout]

    def use(self, layout: str):
        form = self._form(layout)
        quant.ROWVEC_BLAS["lora"] = layout == "openblas"
        for name, mod in self.plain.items():
            if isinstance(mod, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                target = mod if layout == "plain" else quant.WeightLinear(form[name], mod.bias)
                setattr(self.model.get_submodule(parent) if parent else self.model, child, target)
            else:
                if "weight" in mod._parameters:
                    del mod._parameters["weight"]
                if "weight" in mod._modules:
                    del mod._modules["weight"]
                mod.weight = form[name]


class SwitchedSession:
    """A session that puts its model's weights in one layout before each use (see LayoutSwitch)."""

    def __init__(self, session, switch: LayoutSwitch, layout: str):
        self.session, self.switch, self.layout = session, switch, layout

    def __getattr__(self, name):
        if name == "prefill":
            self.switch.use(self.layout)
        return getattr(self.session, name)


_SHARED: dict = {}  # (name, dtype) -> tensor: what the same-dtype clones share (never quantised: the embedding)


def clone_in(model, dtype):
    """A copy of ``model`` in ``dtype`` that never holds a second fp32 copy (built on meta, weights assigned); the
    token embedding (2.2 GB in fp32 at 7B width, never quantised) is shared between clones of one dtype."""
    from moevl.model.awaker.checkpoint import build_model

    clone = build_model(model.cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "model.embed_tokens.weight":
            sd[k] = _SHARED.setdefault((k, dtype), v.to(dtype))
        else:
            sd[k] = v.to(dtype)
    clone.load_state_dict(sd, assign=True)
    clone.init_buffers()
    return clone


def current_rss() -> int:
    """This process's resident set now, bytes (Linux)."""
    with open("/proc/self/status") as f:
        return 1024 * int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def make_batch(cfg, copies: int):
    from moevl.benchmarks.e2e import make_request

    one = make_request(cfg)
    if copies == 1:
        return one
    from moevl.model.awaker.inputs import collate

    ids = one.input_ids[0].tolist()
    return collate([ids] * copies, [(1, 16, 16)] * copies, [one.patches] * copies, cfg)


def run(session, batch, n):
    from moevl.model.generate import GenerationConfig, generate

    res = generate(session, batch, GenerationConfig(max_new_tokens=n))
    assert all(len(t) == n for t in res.token_ids), "the benchmark needs exactly n tokens (EOS must not stop it)"
    return res


def first_logits(session, batch):
    from moevl.model.awaker.session import AwakerSession  # noqa: F401  (the session type this file builds)

    captured = []
    model, original = session.model, session.model.logits

    def spy(*a, **k):
        out = original(*a, **k)
        captured.append(out.detach().float().clone())
        return out
    model.logits = spy
    try:
        run(session, batch, 1)
    finally:
        del model.logits
    return captured[0]


def load_rss_check(model, out_dir: Path) -> dict:
    """Save the int4 model in the kit's format and load it in a fresh process: peak RSS growth during the load vs
    the size of the saved file (target <= 1.3x)."""
    from moevl.model.awaker.tiny import TINY_TOKENIZER
    from moevl.model.checkpoint import save

    folder = out_dir / "int4-7b-width"
    save(model, TINY_TOKENIZER, folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    # the weights' path of moevl.load (read, build on meta, assign, place); the benchmark's tokenizer stand-in does
    # not fit a 7B-width config, so the processor is left out
    code = ("import resource, torch, moevl\n"
            "from pathlib import Path\n"
            "from moevl.ascend.device import resolve_device\n"
            "from moevl.kernels import quant\n"
            "from moevl.model.awaker.checkpoint import build_model\n"
            "from moevl.model.awaker.config import AwakerConfig\n"
            "from moevl.model.checkpoint import assign_weights, read_our_format\n"
            "b = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
            f"folder = Path({str(folder)!r})\n"
            "config, sd = read_our_format(folder, 'awaker')\n"
            "model = build_model(AwakerConfig.from_dict(config))\n"
            "assign_weights(model, sd, torch.bfloat16, 'cpu', str(folder))\n"
            "del sd\n"
            "moevl.place(model, resolve_device('cpu', 'bf16'))\n"
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
            "p = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
            "print(b * 1024, p * 1024, len(quant.quantized_weights(model)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the load check failed: {out.stderr[-2000:]}")
    before, peak, n = (int(v) for v in out.stdout.split()[-3:])
    return {"file_bytes": size, "rss_before_load": before, "peak_rss_after_load": peak, "quantised_linears": n,
            "load_growth_over_file": (peak - before) / size}


def kernel_table(shapes, repeats: int = 10) -> list[dict]:
    """One-row product per weight shape (the decode GEMV) in each form, best of ``repeats`` after a warm-up:
    bf16 F.linear, bf16 oneDNN-packed, int8 and int4 (bf16 activations; MLAS and FBGEMM: int8 activations).
    Weights random, built one shape at a time. -> rows with ms and GB/s of the bytes each form reads."""
    from moevl.kernels.quant import time_gemv

    def best(fn, x):
        return time_gemv(fn, x, repeats)

    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
        x = torch.randn(1, in_f, dtype=torch.bfloat16)
        forms = {"bf16 F.linear": (lambda v: torch.nn.functional.linear(v, w), w.numel() * 2)}
        packed = quant.OnednnWeight(w)
        forms["bf16 oneDNN"] = (lambda v: packed.run(v, None), w.numel() * 2)
        mods = []  # ATen's kernels, then ONNX Runtime's MatMulNBits (MLAS) where usable
        for policy, label in (("aten", ""), ("mlas", " MLAS")):
            i8 = quant.Int8Weight.from_float(w)
            quant.bind_cpu(i8, policy=policy)
            if policy == "aten" or i8.mlas is not None:
                forms["int8" + label] = (lambda v, m=i8: m.run(v, None), i8.nbytes())
                mods.append(i8)
            if in_f % quant.GROUP_SIZE == 0:
                i4 = quant.Int4Weight.from_float(w, zero_point=policy == "aten")  # MLAS: the symmetric form
                quant.bind_cpu(i4, policy=policy)
                if policy == "aten" or i4.mlas is not None:
                    forms["int4" + (label + " symmetric" if label else "")] = (lambda v, m=i4: m.run(v, None),
                                                                               i4.nbytes())
                    mods.append(i4)
        i8 = quant.Int8Weight.from_float(w)  # torch's FBGEMM dynamic-quantised linear (int8 activations per row)
        quant.bind_cpu(i8, policy="fbgemm")
        if i8.fbgemm is not None:
            forms["int8 FBGEMM"] = (lambda v, m=i8: m.run(v, None), i8.nbytes())
            mods.append(i8)
        for name, (fn, nbytes) in forms.items():
            t = best(fn, x)
            rows.append({"shape": [out_f, in_f], "form": name, "ms": 1000 * t, "bytes": nbytes,
                         "gbs": nbytes / t / 1e9})
        del w, packed, mods, forms
        gc.collect()
    return rows


def prefill_table(shapes, rows=(1, 8, 16, 32, 64, 119), repeats: int = 5) -> list[dict]:
    """Many-row products (prefill) per weight shape: the int8 op row by row (``aten._weight_int8pack_mm``), the
    int8 weight dequantised into bf16 + one bf16 GEMM (what kernels.quant does from PREFILL_ROWS rows on), the
    int4 op, and bf16 F.linear; median ms of ``repeats`` after a warm-up. Weights larger than
    quant.PREFILL_MAX_ELEMENTS (lm_head) are skipped: they keep the op."""
    import statistics

    def med(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1000 * statistics.median(ts)

    out, saved = [], quant.PREFILL_ROWS
    try:
        for out_f, in_f in shapes:
            if out_f * in_f > quant.PREFILL_MAX_ELEMENTS:
                continue
            w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
            i8, i4 = quant.Int8Weight.from_float(w), quant.Int4Weight.from_float(w)
            quant.bind_cpu(i8)
            quant.bind_cpu(i4)
            for m in rows:
                x = torch.randn(m, in_f, dtype=torch.bfloat16)
                quant.PREFILL_ROWS = 1 << 30
                op = med(lambda: i8.run(x, None))
                quant.PREFILL_ROWS = 1
                deq = med(lambda: i8.run(x, None))
                out.append({"shape": [out_f, in_f], "rows": m, "int8_op_ms": op, "int8_dequant_bf16_ms": deq,
                            "int4_op_ms": med(lambda: i4.run(x, None)),
                            "bf16_ms": med(lambda: torch.nn.functional.linear(x, w))})
            del w, i8, i4
            gc.collect()
    finally:
        quant.PREFILL_ROWS = saved
    return out


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        acc = r.get("accuracy")
        y = acc if acc is not None else r.get("token_agreement")
        if y is None:
            continue
        ax.scatter(r["decode_ms_per_token"], y, s=40)
        ax.annotate(r["variant"], (r["decode_ms_per_token"], y), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("decode ms/token (batch 1, lower is better)")
    ax.set_ylabel("greedy-token agreement with ours fp32\n(task accuracy: moevl eval, not run here)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def only_kernel_table(args, argv) -> int:
    """The decode GEMV of every 7B-width weight shape in each form, and the fp32/bf16 layout measured per shape,
    with the read bandwidth measured before and after (the machine is shared)."""
    from moevl.model.awaker.config import awaker_7b_width

    cfg = awaker_7b_width(num_layers=1)
    h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = list(dict.fromkeys([(q_out, h), (kv_out, h), (h, q_out), (cfg.intermediate_size, h),
                                 (h, cfg.intermediate_size), (cfg.vocab_size, h)]))
    bw_before = read_bandwidth_gbs()
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            w = torch.randn(shape, dtype=dtype)
            quant.measure_layout(w)
            del w
            gc.collect()
    rows = kernel_table(shapes)
    prefill = prefill_table(shapes)
    bw_after = read_bandwidth_gbs()
    dev = resolve_device("cpu", "fp32")
    layouts = [{"out": k[0], "in": k[1], "dtype": str(k[2]).removeprefix("torch."), **v,
                "chosen": quant._LAYOUT_CHOICE[k]} for k, v in quant.LAYOUT_TIMES.items()]
    payload = {"benchmark": "quant-kernels", "cpu": cpu_model_name(), "cpu_flags": cpu_flags(),
               "environment": environment(dev), "read_bandwidth_gbs": {"before": bw_before, "after": bw_after},
               "layouts": layouts, "kernels_per_shape": rows, "prefill_per_shape": prefill,
               "prefill_rows_threshold": quant.PREFILL_ROWS}
    cmd = f"python -m moevl.benchmarks.quant {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    forms = list(dict.fromkeys(r["form"] for r in rows))
    md = [f"# Decode GEMV per 7B-width weight shape: {cpu_model_name()}", "", f"Command: `{cmd}`  ",
          f"CPU flags: {', '.join(cpu_flags())}; torch {torch.__version__}, {torch.get_num_threads()} threads. Read "
          f"bandwidth (sum of 1 GiB) {bw_before['sum']:.1f} GB/s before, {bw_after['sum']:.1f} after (shared "
          "machine: other jobs ran at the same time). Random weights; one row (decode); best of 10 after a "
          "warm-up. No NPU/GPU figures.", "",
          "Layout measured at load (what `moevl.place` keeps, > 5% margin), GB/s of weight bytes:", "",
          "| weight [out x in] | dtype | MKL F.linear | oneDNN packed | OpenBLAS sgemv | chosen |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['out']} x {r['in']} | {r['dtype']} | {_gbs(r, 'plain')} | {_gbs(r, 'onednn')} | "
           f"{_gbs(r, 'openblas')} | {r['chosen']} |" for r in layouts]
    md += ["", "Each form (bf16 activations; ms, and GB/s of the bytes that form reads); the last row is lm_head:",
           "", "| weight [out x in] | " + " | ".join(forms) + " |", "|---|" + "---|" * len(forms)]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        cells = {r["form"]: r for r in rows if tuple(r["shape"]) == shape}
        md.append(f"| {shape[0]} x {shape[1]} | " + " | ".join(
            f"{cells[f]['ms']:.2f} ms ({cells[f]['gbs']:.1f} GB/s)" if f in cells else "-" for f in forms) + " |")
    md += ["", f"Many-row products (prefill), median ms; from {quant.PREFILL_ROWS} rows on, kernels.quant dequantises "
           "int8 into bf16 and runs one bf16 GEMM instead of the row-by-row op (lm_head, over "
           "PREFILL_MAX_ELEMENTS, keeps the op):", "",
           "| weight [out x in] | rows | int8 op | int8 dequantised + bf16 GEMM | int4 op | bf16 F.linear |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['shape'][0]} x {r['shape'][1]} | {r['rows']} | {r['int8_op_ms']:.1f} | "
           f"{r['int8_dequant_bf16_ms']:.1f} | {r['int4_op_ms']:.1f} | {r['bf16_ms']:.1f} |" for r in prefill]
    j, m = write_results("quant-kernels", dev, payload, "\n".join(md) + "\n",
                         out=Path(args.out) if args.out else RESULTS)
    print("\n".join(md))
    print(f"wrote {j} and {m}")
    return 0


def only_load_check(args, argv) -> int:
    """The load check alone, from a bf16 model quantised to int4 (needs ~1/2 of the fp32 model's memory)."""
    from moevl.model.awaker.config import AdapterConfig, awaker_7b_width

    cfg = awaker_7b_width(num_layers=args.layers)
    cfg.adapters = AdapterConfig(num_experts=4, rank=args.rank, alpha=2.0 * args.rank)
    dev = resolve_device("cpu", "bf16")
    from moevl.model.awaker.checkpoint import build_model
    from moevl.model.awaker.tiny import init_random_weights

    model = build_model(cfg).to(torch.bfloat16).to_empty(device="cpu")  # bf16 from the start: no fp32 copy
    init_random_weights(model, seed=0)
    model.init_buffers()
    quant.quantize_model(model, "int4")
    with tempfile.TemporaryDirectory() as tmp:
        rss = load_rss_check(model, Path(tmp))
    cmd = f"python -m moevl.benchmarks.quant {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    payload = {"benchmark": "quant-load", "cpu": cpu_model_name(), "cpu_flags": cpu_flags(),
               "environment": environment(dev), "config": {"layers": args.layers, "rank": args.rank,
                                                           "dtype": "bf16", "quantize": "int4"},
               "load_rss_check": rss, "target": 1.3}
    md = [f"# Loading a saved int4 model (7B width, {args.layers} layers, bf16 rest): {cpu_model_name()}", "",
          f"Command: `{cmd}`  ",
          f"File {rss['file_bytes'] / 2**20:.0f} MiB (model.safetensors: int4 base linears and lm_head, the rest bf16); "
          f"peak RSS of the loading process grew by {(rss['peak_rss_after_load'] - rss['rss_before_load']) / 2**20:.0f}"
          f" MiB from before the load to after the model was placed (CPU int4 layout bound) = "
          f"**{rss['load_growth_over_file']:.2f}x the file** (target <= 1.3x). {rss['quantised_linears']} quantised "
          "linears; the fp32/bf16 base weights never exist in that process.", ""]
    j, m = write_results("quant-load", dev, payload, "\n".join(md), out=Path(args.out) if args.out else RESULTS)
    print("\n".join(md))
    print(f"wrote {j} and {m}")
    return 0


def main(argv=None) -> int:
    from moevl.benchmarks.e2e import build_baseline, build_ours, run_baseline
    from moevl.model.awaker.config import AdapterConfig, awaker_7b_width
    from moevl.model.awaker.session import AwakerSession

    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.quant", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch8-tokens", type=int, default=8, help="tokens per request at batch 8 (0 = skip)")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--no-rss-check", action="store_true")
    ap.add_argument("--no-kernel-table", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--both-fp32-layouts", action="store_true",
                    help="also time fp32 with every base linear oneDNN-packed (about 4 GB more at 7B width)")
    ap.add_argument("--only-load-check", action="store_true",
                    help="only the saved-int4 load check (bf16 model, little memory), written to quant-load-<device>")
    ap.add_argument("--only-kernel-table", action="store_true",
                    help="only the per-shape GEMV table and layout choices (little memory): quant-kernels-<device>")
    args = ap.parse_args(argv)
    if args.only_load_check:
        return only_load_check(args, argv)
    if args.only_kernel_table:
        return only_kernel_table(args, argv)

    cfg = awaker_7b_width(num_layers=args.layers)
    cfg.adapters = AdapterConfig(num_experts=4, rank=args.rank, alpha=2.0 * args.rank)
    dev32 = resolve_device("cpu", "fp32")
    print(f"building 7B-width model ({args.layers} layers, r={args.rank}) ...", flush=True)
    ours = build_ours(cfg, dev32, place=False)
    hf = build_baseline(ours)  # shares our plain base tensors
    for _, mod in quant.base_linears(ours):  # the per-shape layout timings, fp32 (bf16: when its variant loads)
        quant.measure_layout(mod.weight)
    variants = [v for v in VARIANTS if args.both_fp32_layouts or v[0] != "ours fp32 (oneDNN)"]
    if args.both_fp32_layouts:  # ours fp32 is measured in both layouts explicitly (LayoutSwitch)
        os.environ["MOEVL_CPU_LAYOUT"] = "plain"
    moevl.place(ours, dev32)  # otherwise: the layout moevl.load picks per shape (the layout table below)
    os.environ.pop("MOEVL_CPU_LAYOUT", None)
    sessions = {"ours fp32": AwakerSession(ours, NoProcessor(), dev32)}
    if args.both_fp32_layouts:
        switch = LayoutSwitch(ours)
        sessions["ours fp32 (oneDNN)"] = SwitchedSession(AwakerSession(ours, NoProcessor(), dev32), switch, "onednn")
        sessions["ours fp32"] = SwitchedSession(sessions["ours fp32"], switch, "plain")
    fixed = [BASELINE] + [n for n in sessions]
    batch1 = make_batch(cfg, 1)
    batch8 = make_batch(cfg, 8) if args.batch8_tokens else None
    bw = read_bandwidth_gbs()
    ref_logits = first_logits(sessions["ours fp32"], batch1)
    ref_tokens = run(sessions["ours fp32"], batch1, args.new_tokens).token_ids[0]
    ref_routing = [d.to_dict() for d in sessions["ours fp32"].routing_decisions()]

    def accuracy_of(s) -> dict:
        """Against ours fp32 on the same random weights."""
        lg = first_logits(s, batch1)
        toks = run(s, batch1, args.new_tokens).token_ids[0]
        routing = [d.to_dict() for d in s.routing_decisions()]
        same = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b), len(toks))
        changed = sum(1 for a, b in zip(routing, ref_routing) if a["expert"] != b["expert"])
        return {"first_logits_rel_err": ((lg - ref_logits).abs().max() / ref_logits.abs().max()).item(),
                "first_token_equal": bool(lg.argmax(-1).eq(ref_logits.argmax(-1)).all()),
                "greedy_tokens_equal_before_first_divergence": same,
                "token_agreement": sum(a == b for a, b in zip(toks, ref_tokens)) / len(toks),
                "routing_decisions_changed": changed, "routing_decisions": len(routing)}

    # One variant in memory at a time beside the fp32 model (which the transformers baseline shares): every
    # phase times the baseline, ours fp32 and that variant in turn, round by round, then frees the variant. At 7B
    # width holding every variant at once took more than 24 GB.
    phases = [None] + [v for v in variants if v[0] not in sessions]
    names = fixed + [v[0] for v in phases[1:]]
    rows = {n: [] for n in names}
    ratio = {n: {"decode": [], "ttft": []} for n in names}
    rows8 = {n: [] for n in names if n != BASELINE}
    accuracy, build_s, rss_after_build = {}, {}, {}
    rss = None
    rss_dir = tempfile.TemporaryDirectory()
    kernels_of, bytes_of = {}, {}
    per_round = len(fixed) + 1 + (1 if batch8 is not None else 0)
    bar = progress(args.rounds * (len(phases) * per_round + (len(fixed) - 1) * (batch8 is not None)),
                   "quant bench")
    for phase in phases:
        active = dict(sessions)
        if phase is not None:
            name, dtype, mode, options = phase
            bar.set_postfix_str(f"building {name}")
            t0 = time.perf_counter()
            dev = resolve_device("cpu", dtype)
            model = clone_in(ours, dev.dtype)
            if mode is not None:
                quant.quantize_model(model, mode, zero_point=options.get("zero_point", True))
            if mode == "int4" and rss is None and not args.no_rss_check:  # the stored form, before the CPU layout
                rss = load_rss_check(model, Path(rss_dir.name))
            os.environ["MOEVL_CPU_QUANT_KERNEL"] = options.get("kernel", "aten")
            moevl.place(model, dev)
            os.environ.pop("MOEVL_CPU_QUANT_KERNEL", None)
            gc.collect()
            active[name] = AwakerSession(model, NoProcessor(), dev)
            build_s[name] = time.perf_counter() - t0
            rss_after_build[name] = current_rss()
        else:
            rss_after_build["ours fp32"] = current_rss()
        for n, s in active.items():
            if n not in accuracy:
                accuracy[n] = accuracy_of(s)
                kernels_of[n] = (quant.describe(s.model) or {}).get("kernels")
                bytes_of[n] = weight_bytes(s.model)
        for n, s in active.items():  # warm-up
            run(s, batch1, 3)
        run_baseline(hf, batch1, 3)
        timed = [BASELINE] + list(active) if phase is None else [BASELINE, "ours fp32", phase[0]]
        for _ in range(args.rounds):
            here = {}
            for n in timed:
                bar.set_postfix_str(n)
                if n == BASELINE:
                    here[n] = run_baseline(hf, batch1, args.new_tokens)
                else:
                    res = run(active[n], batch1, args.new_tokens)
                    here[n] = (res.ttft_ms, res.decode_ms / (args.new_tokens - 1))
                rows[n].append(here[n])
                ratio[n]["ttft"].append(here[n][0] / here[BASELINE][0])
                ratio[n]["decode"].append(here[n][1] / here[BASELINE][1])
                bar.update()
            if batch8 is not None:
                for n in (list(active) if phase is None else [phase[0]]):
                    bar.set_postfix_str(n + " batch 8")
                    res = run(active[n], batch8, args.batch8_tokens)
                    rows8[n].append(8 * (args.batch8_tokens - 1) / (res.decode_ms / 1000))
                    bar.update()
        if phase is not None:
            del active[phase[0]], model
            gc.collect()
    bar.close()
    sessions_bytes = bytes_of
    table = []
    for n in names:
        nbytes = weight_bytes(ours, adapters=False) if n == BASELINE else sessions_bytes[n]
        dec = median([r[1] for r in rows[n]])
        row = {"variant": n, "ttft_ms": median([r[0] for r in rows[n]]), "decode_ms_per_token": dec,
               "tokens_per_s_batch1": 1000.0 / dec,
               "tokens_per_s_batch8": median(rows8[n]) if rows8.get(n) else None,
               "decode_vs_transformers_fp32": median(ratio[n]["decode"]),
               "ttft_vs_transformers_fp32": median(ratio[n]["ttft"]),
               "weight_bytes_per_step": nbytes,
               "decode_bandwidth_gbs": nbytes / (dec / 1000) / 1e9,
               "build_s": build_s.get(n), "rss_after_build_bytes": rss_after_build.get(n), "per_round": rows[n]}
        row["fraction_of_read_bandwidth"] = row["decode_bandwidth_gbs"] / bw["sum"]
        if n in accuracy:
            row["kernels"] = kernels_of[n]
            row.update(accuracy[n])
        table.append(row)

    rss_dir.cleanup()
    h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = list(dict.fromkeys([(q_out, h), (kv_out, h), (h, q_out), (cfg.intermediate_size, h),
                                 (h, cfg.intermediate_size), (cfg.vocab_size, h)]))
    kernels_rows = kernel_table(shapes) if not args.no_kernel_table else []
    ort = None
    ort_path = (Path(args.out) if args.out else RESULTS) / "ort-cpu.json"
    if ort_path.is_file():
        ort = json.loads(ort_path.read_text())

    cpu = cpu_model_name()
    flags = cpu_flags()
    payload = {"benchmark": "quant", "config": {"layers": args.layers, "rank": args.rank,
               "new_tokens": args.new_tokens, "rounds": args.rounds, "batch8_tokens": args.batch8_tokens,
               "prompt_tokens": int(batch1.input_ids.shape[1])},
               "cpu": cpu, "cpu_flags": flags, "environment": environment(dev32), "read_bandwidth_gbs": bw,
               "rows": table, "load_rss_check": rss, "kernels_per_shape": kernels_rows,
               "targets": {"int8_decode_vs_transformers_fp32": 0.25, "int4_decode_vs_transformers_fp32": 0.18,
                           "bf16_decode_vs_transformers_fp32": 0.5, "bf16_ttft_vs_transformers_fp32": 0.6,
                           "load_growth_over_file": 1.3},
               "ort_cpu_json": ort, "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "shared_machine_note": "2 cores shared with other jobs: figures are noisy; ratios are per round",
               "rss_note": "rss_after_build_bytes: the process (ours fp32 + the transformers baseline sharing its base "
                           "tensors + that one variant) right after the variant was built"}
    cmd = f"python -m moevl.benchmarks.quant {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    md = [f"# Decode per precision at 7B width ({args.layers} layers): {cpu}", "",
          f"Command: `{cmd}`  ", f"CPU flags: {', '.join(flags) or 'unknown'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')} (moevl "
          "sets PASSIVE at import; the baseline runs in the same process, under the same policy); read bandwidth "
          f"(sum of 1 GiB) {bw['sum']:.1f} GB/s, fp32 GEMV "
          f"{bw['gemv']:.1f} GB/s, measured in this run. Variants built one at a time beside ours fp32; with each, "
          f"{args.rounds} rounds of transformers fp32, ours fp32 and that variant in turn (baseline and ours fp32: "
          f"medians over every round); ratios are per round against that round's baseline, then the median. "
          f"{batch1.input_ids.shape[1]} prompt tokens (64 image), {args.new_tokens} greedy tokens at batch 1; "
          f"batch 8: {args.batch8_tokens} tokens per request. "
          "Shared 2-core machine: noisy. No NPU/GPU figures: nothing ran on one.", "",
          "| variant | TTFT ms | decode ms/token | vs transformers fp32 (decode / TTFT) | tok/s b1 | tok/s b8 | "
          "weight MB/step | % of read bw | first-logits err | tokens = fp32 | routing changed |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        b8 = f"{r['tokens_per_s_batch8']:.1f}" if r.get("tokens_per_s_batch8") else "-"
        acc = (f"{r['first_logits_rel_err']:.4f} | {100 * r['token_agreement']:.0f}% | "
               f"{r['routing_decisions_changed']}/{r['routing_decisions']}" if "token_agreement" in r else "- | - | -")
        md.append(f"| {r['variant']} | {r['ttft_ms']:.0f} | {r['decode_ms_per_token']:.1f} | "
                  f"{r['decode_vs_transformers_fp32']:.3f} / {r['ttft_vs_transformers_fp32']:.3f} | "
                  f"{r['tokens_per_s_batch1']:.2f} | {b8} | {r['weight_bytes_per_step'] / 1e6:.0f} | "
                  f"{100 * r['fraction_of_read_bandwidth']:.0f}% | {acc} |")
    md += ["", "Targets (issue 13): bf16 decode <= 0.5x and TTFT <= 0.6x transformers fp32; int8 decode <= 0.25x; "
           "int4 <= 0.18x. Kernels: " + "; ".join(f"{r['variant']}: {', '.join(r['kernels'])}"
                                                  for r in table if r.get("kernels")) + ".",
           "Accuracy columns are against ours fp32 on the same random weights (first-token logits: max abs error / "
           "max |logit|; greedy tokens equal position by position); task accuracy per variant comes from "
           "`moevl eval` on trained weights (not run here)."]
    layout_rows = [f"| {k[0]} x {k[1]} | {str(k[2]).removeprefix('torch.')} | {_gbs(v, 'plain')} | "
                   f"{_gbs(v, 'onednn')} | {_gbs(v, 'openblas')} | {quant._LAYOUT_CHOICE[k]} |"
                   for k, v in quant.LAYOUT_TIMES.items()]
    payload["layout_timings"] = [{"out": k[0], "in": k[1], "dtype": str(k[2]), **v, "chosen": quant._LAYOUT_CHOICE[k]}
                                 for k, v in quant.LAYOUT_TIMES.items()]
    md += ["", "CPU weight layout per shape, measured at load (one-row product, best of 10, GB/s of weight bytes; "
           "the fastest kept only when > 5% faster than MKL; OpenBLAS: fp32 only):", "",
           "| weight [out x in] | dtype | MKL F.linear | oneDNN packed | OpenBLAS sgemv | chosen |",
           "|---|---|---|---|---|---|"] + layout_rows
    payload["quant_kernel_timings"] = [
        {"mode": k[0], "out": k[1], "in": k[2], "group": k[3], **v, "chosen": quant._QUANT_KERNEL_CHOICE[k]}
        for k, v in quant.QUANT_KERNEL_TIMES.items()]
    if payload["quant_kernel_timings"]:
        md += ["", "CPU kernel per quantised shape, measured at load (`kernels.quant.bind_cpu`, policy fastest: one-row "
               "product, best of 5, interleaved): ATen's op (bf16 activations) or ONNX Runtime's MatMulNBits (MLAS, "
               "int8 activations per block):", "", "| form | weight [out x in] | ATen ms | MLAS ms | chosen |",
               "|---|---|---|---|---|"]
        md += [f"| {r['mode']}{' g' + str(r['group']) if r['group'] else ''} | {r['out']} x {r['in']} | "
               f"{1000 * r['aten_s']:.2f} | {1000 * r['mlas_s']:.2f} | {r['chosen']} |"
               for r in payload["quant_kernel_timings"]]
    if kernels_rows:
        forms = list(dict.fromkeys(r["form"] for r in kernels_rows))
        md += ["", "Decode GEMV per weight shape and form (random weights, best of 10, ms and GB/s of the bytes the "
               "form reads; the last shape is lm_head: quantising it pays when int8/int4 ms < bf16 ms):", "",
               "| weight [out x in] | " + " | ".join(forms) + " |", "|---|" + "---|" * len(forms)]
        for shape in dict.fromkeys(tuple(r["shape"]) for r in kernels_rows):
            cells = {r["form"]: r for r in kernels_rows if tuple(r["shape"]) == shape}
            md.append(f"| {shape[0]} x {shape[1]} | " + " | ".join(
                f"{cells[f]['ms']:.2f} ms ({cells[f]['gbs']:.1f} GB/s)" if f in cells else "-" for f in forms) + " |")
    if rss:
        md += ["", f"Load of the saved int4 model in a fresh process (moevl.load's weight path, bf16, placed): file "
               f"{rss['file_bytes'] / 2**20:.0f} MiB, peak RSS grew by "
               f"{(rss['peak_rss_after_load'] - rss['rss_before_load']) / 2**20:.0f} MiB = "
               f"{rss['load_growth_over_file']:.2f}x the file (target <= 1.3x); the fp32 weights never exist there."]
    if ort:
        # ort-cpu.json: {"meta", "results": [{"config": "7b-width", "torch" | "ort_fp32" | "ort_int8": {...}}]}
        rows_ort = [f"{label}: decode {r[key]['decode_ms_per_token']:.1f} ms/token"
                    for r in ort.get("results", []) if r.get("config") == "7b-width"
                    for key, label in (("ort_fp32", "ORT fp32"), ("ort_int8", "ORT int8 (dynamic)")) if key in r]
        if rows_ort:
            md += ["", "ONNX Runtime (benchmarks/results/ort-cpu.json, a separate run, maybe another day): "
                   + "; ".join(rows_ort) + "."]
    png = None
    j, m = write_results("quant", dev32, payload, "\n".join(md) + "\n", out=Path(args.out) if args.out else RESULTS)
    png = plot(table, m.with_suffix(".png"), f"7B width, {args.layers} layers, {cpu}")
    if png is not None:
        payload["plot"] = png.name
        j.write_text(json.dumps(payload, indent=2))
    print("\n".join(md))
    print(f"wrote {j}, {m}" + (f" and {png}" if png else " (no PNG: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
