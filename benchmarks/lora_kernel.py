"""Triton LoRA-MoE kernel vs the composed PyTorch path vs the base linear alone, on CUDA (a benchmark, not a test).

``python -m moevl.benchmarks.lora_kernel [--quick] [--out DIR] [--repeats N]``

Awaker2.5-VL-7B's four LoRA-MoE linears of one decoder layer (o 3584->3584, gate/up 3584->18944, down 18944->3584;
r = 256, 4 task experts + 1 global), one decode step (T = 1) at batch 1, 2, 4, 8, 16 in bf16, each request routed
to task expert b % 4. Variants: ``base`` (F.linear alone, what every variant has to read), ``composed``
(kernels/cpu.py: gathered rank-2r plan, base GEMM + two batched GEMMs), ``triton`` (kernels/triton_lora.py: base
GEMM + shrink + expand reading the experts in place). Every variant is first checked against the reference loop.
Timing: CUDA events around ``--iters`` back-to-back calls, median over repeats, variants interleaved.
``floor`` is the memory-bound lower bound of a LoRA-MoE step over the base linear (W + the distinct selected experts
over W): at r = 256 it exceeds the issue's 1.10x target by itself from batch 1 on, which the report states.
Writes <out>/lora_kernel-cuda.json and .md. Needs a CUDA GPU and triton; elsewhere it says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moevl.benchmarks.common import cpu_line, progress

HIDDEN, MLP, RANK, TASK_EXPERTS = 3584, 18944, 256, 4
LINEARS = {"o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP),
           "down_proj": (MLP, HIDDEN)}  # name: (in, out)
TARGET = 1.10


def make_layer(linears: dict, rank: int, n_experts: int, device, dtype, seed: int = 0) -> dict:
    """name -> (W [out, in], A [X, r, in], B [X, out, r] stored rank-major, as the Awaker model keeps it)."""
    g = torch.Generator().manual_seed(seed)
    layer = {}
    for name, (d_in, d_out) in linears.items():
        W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device, dtype)
        A = (torch.randn(n_experts, rank, d_in, generator=g) / d_in**0.5).to(device, dtype)
        B = (torch.randn(n_experts, rank, d_out, generator=g) / rank**0.5).to(device, dtype).transpose(1, 2)
        layer[name] = (W, A, B)
    return layer


def routing(batch: int, task_experts: int, device):
    expert = torch.arange(batch, device=device) % task_experts
    p = torch.linspace(0.6, 0.9, batch, device=device)
    return expert, torch.stack([p * p * 2.0, (1 - p) * 2.0], dim=1)


def variants(layer: dict, xs: dict, expert, scales) -> dict:
    """variant -> callable running the layer's linears once (one decode step of the layer)."""
    from moevl.kernels import cpu, triton_lora

    composed = {n: cpu.lora_moe_prepare(A, B, expert, scales) for n, (_, A, B) in layer.items()}
    fused = {n: triton_lora.lora_moe_prepare(A, B, expert, scales) for n, (_, A, B) in layer.items()}
    return {
        "base": lambda: [F.linear(xs[n], layer[n][0]) for n in layer],
        "composed": lambda: [cpu.lora_moe_linear(xs[n], layer[n][0], None, composed[n]) for n in layer],
        "triton": lambda: [triton_lora.lora_moe_linear(xs[n], layer[n][0], None, fused[n]) for n in layer],
    }


def max_error(layer: dict, xs: dict, expert, scales, fns: dict) -> dict:
    """Max |variant - reference| over the layer's outputs, for the LoRA-MoE variants."""
    from moevl.kernels import reference

    ref = [reference.lora_moe_linear(xs[n], W, None, reference.lora_moe_prepare(A, B, expert, scales))
           for n, (W, A, B) in layer.items()]
    return {k: max((o.float() - r.float()).abs().max().item() for o, r in zip(fns[k](), ref))
            for k in fns if k != "base"}


def timed(fns: dict, repeats: int, iters: int, device) -> dict:
    """Median microseconds per call of each callable; variants interleaved within every repeat."""
    def once(f):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                f()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            f()
        return (time.perf_counter() - t0) * 1e6 / iters

    for f in fns.values():  # warm-up: Triton compiles here
        once(f)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(once(f))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(batches, linears, rank, task_experts, device, dtype, repeats, iters) -> list[dict]:
    from moevl.kernels.triton_lora import bytes_floor

    layer = make_layer(linears, rank, task_experts + 1, device, dtype)
    w_elems = sum(i * o for i, o in linears.values())
    rows = []
    bar = progress(len(batches), "lora_kernel batches")
    for batch in batches:
        expert, scales = routing(batch, task_experts, device)
        xs = {n: torch.randn(batch, 1, i, device=device, dtype=dtype) for n, (i, _) in linears.items()}
        fns = variants(layer, xs, expert, scales)
        err = max_error(layer, xs, expert, scales, fns)
        us = timed(fns, repeats, iters, device)
        distinct = len(set(expert.tolist())) + 1  # + the global expert
        floor = sum(bytes_floor(distinct, i, o, rank) * i * o for i, o in linears.values()) / w_elems
        row = {"batch": batch, "distinct_experts": distinct, **{f"{k}_us": v for k, v in us.items()},
               "composed_over_base": us["composed"] / us["base"], "triton_over_base": us["triton"] / us["base"],
               "triton_speedup_over_composed": us["composed"] / us["triton"], "floor": floor,
               **{f"{k}_max_abs_err": v for k, v in err.items()}}
        row["target_met"] = row["triton_over_base"] <= TARGET
        rows.append(row)
        bar.update()
        bar.write(f"batch {batch:2d}: base {us['base']:8.1f} us, composed {us['composed']:8.1f} us "
                  f"({row['composed_over_base']:.3f}x), triton {us['triton']:8.1f} us ({row['triton_over_base']:.3f}x); "
                  f"floor {floor:.3f}x; max err composed {err['composed']:.3g} triton {err['triton']:.3g}")
    bar.close()
    return rows


def markdown(res: dict) -> str:
    L = [f"# LoRA-MoE kernel benchmark — {res['device']}", "",
         f"Command: `{res['command']}`  ",
         f"torch {res['torch']}, triton {res['triton']}, {res['dtype']}; one decode step (T = 1) of Awaker-7B's four "
         f"LoRA-MoE linears (r {RANK}, {TASK_EXPERTS}+1 experts); median of "
         f"{res['repeats']} repeats of {res['iters']} calls (CUDA events). Host {res.get('cpu', 'CPU: not recorded')}", "",
         f"floor = (W + distinct selected experts) / W, the memory-bound lower bound of any LoRA-MoE step; target "
         f"triton/base <= {TARGET}. No NPU figures: nothing here ran on an Ascend NPU.", "",
         "| batch | experts read | base us | composed us | triton us | composed/base | triton/base | floor | "
         "triton x composed | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        L.append(f"| {r['batch']} | {r['distinct_experts']} | {r['base_us']:.1f} | {r['composed_us']:.1f} | "
                 f"{r['triton_us']:.1f} | {r['composed_over_base']:.3f} | {r['triton_over_base']:.3f} | "
                 f"{r['floor']:.3f} | {r['triton_speedup_over_composed']:.2f} | "
                 f"{'met' if r['target_met'] else 'NOT met'} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.lora_kernel", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8 only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per variant (default 15, --quick 5)")
    ap.add_argument("--iters", type=int, default=20, help="back-to-back calls per timing (default 20)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for lora_kernel-cuda.json/.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("lora_kernel: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was measured or "
              "written", file=sys.stderr)
        return 2
    from moevl.kernels.triton_lora import triton_available

    if not triton_available():
        print("lora_kernel: triton is not installed: pip install 'moevl-ascend[triton]'; nothing was measured",
              file=sys.stderr)
        return 2
    import triton

    device, dtype = torch.device("cuda"), torch.bfloat16
    repeats = args.repeats or (5 if args.quick else 15)
    batches = [1, 8] if args.quick else [1, 2, 4, 8, 16]
    args_given = list(argv if argv is not None else sys.argv[1:])
    res = {"command": " ".join(["python -m moevl.benchmarks.lora_kernel"] + args_given),
           "device": f"cuda ({torch.cuda.get_device_name(device)})", "torch": torch.__version__, "cpu": cpu_line(),
           "triton": triton.__version__, "dtype": "bfloat16", "repeats": repeats, "iters": args.iters}
    res["rows"] = measure(batches, LINEARS, RANK, TASK_EXPERTS, device, dtype, repeats, args.iters)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "lora_kernel-cuda"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
