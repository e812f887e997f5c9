"""Kernel benchmark at real model sizes (not a test): ``python -m moevl.benchmarks.kernels [--quick] [--out DIR]``.

Awaker2.5-VL-7B: one decoder layer's four LoRA-MoE linears together (o 3584->3584, gate/up 3584->18944,
down 18944->3584; r = 256, 4 task experts + 1 global), variants: base linears alone, reference (loop over
requests), fast (stacked rank-2r plan), merged (private merged W, batch 1).
MoE-LLaVA-Phi2: one MoE FFN (hidden 2560, FFN 10240, GELU-tanh MLP with bias, 4 experts, top-2), variants: dense
FFN alone (base), reference (loop over experts), fast (dropless, device default), dropless with torch._grouped_mm,
dense all-experts (export variant).
Tokens T in {1, 16, 512}, batch in {1, 4}; fp32 on CPU, bf16 on CUDA. Medians over repeats, all variants of a
configuration interleaved in each repeat. The machine's read bandwidth is measured in the same run (sum of a
512 MB tensor). Writes <out>/kernels-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moevl.benchmarks.common import cpu_line, progress
from moevl.kernels import cpu, moe, reference

HIDDEN, MLP, RANK, TASK_EXPERTS = 3584, 18944, 256, 4
AWAKER_LINEARS = {"o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP),
                  "down_proj": (MLP, HIDDEN)}  # name: (in, out)
PHI_HIDDEN, PHI_FFN, PHI_EXPERTS, TOP_K = 2560, 10240, 4, 2


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, repeats: int, device) -> dict:
    """Median seconds per callable; one warm-up each, then the callables interleaved in every repeat."""
    for f in fns.values():
        f()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def read_bandwidth(device, dtype) -> float:
    big = torch.ones(512 * 2**20 // torch.tensor([], dtype=dtype).element_size(), device=device, dtype=dtype)
    t = timed({"sum": lambda: big.sum()}, 10, device)["sum"]
    return big.numel() * big.element_size() / t


def bench_awaker(configs, repeats, device, dtype, esize):
    g = torch.Generator().manual_seed(0)
    layer = {}
    for name, (d_in, d_out) in AWAKER_LINEARS.items():
        W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device, dtype)
        A = (torch.randn(TASK_EXPERTS + 1, RANK, d_in, generator=g) / d_in**0.5).to(device, dtype)
        B = (torch.randn(TASK_EXPERTS + 1, d_out, RANK, generator=g) / RANK**0.5).to(device, dtype)
        B = B.transpose(1, 2).contiguous().transpose(1, 2)  # rank-major storage, as the Awaker model keeps it
        layer[name] = (W, A, B)
    w_elems = sum(d_in * d_out for d_in, d_out in AWAKER_LINEARS.values())
    lora_elems = sum(2 * RANK * (d_in + d_out) for d_in, d_out in AWAKER_LINEARS.values())  # per request
    rows, merge = [], None
    for t, batch in configs:
        expert = torch.tensor([1, 3, 0, 2][:batch], device=device)
        p = torch.linspace(0.6, 0.9, batch, device=device)
        scales = torch.stack([p * p * 2.0, (1 - p) * 2.0], 1)
        xs = {n: torch.randn(batch, t, d_in, device=device, dtype=dtype) for n, (d_in, _) in AWAKER_LINEARS.items()}
        ref_plans = {n: reference.lora_moe_prepare(A, B, expert, scales) for n, (_, A, B) in layer.items()}
        fast_plans = {n: cpu.lora_moe_prepare(A, B, expert, scales) for n, (_, A, B) in layer.items()}
        fns = {
            "base": lambda: [F.linear(xs[n], layer[n][0]) for n in layer],
            "reference": lambda: [reference.lora_moe_linear(xs[n], layer[n][0], None, ref_plans[n]) for n in layer],
            "fast": lambda: [cpu.lora_moe_linear(xs[n], layer[n][0], None, fast_plans[n]) for n in layer],
        }
        merged_plans = None
        if batch == 1:  # merging pays only for single requests (should_merge); batch 4 would need 4 private copies
            merged_plans = {n: cpu.lora_moe_prepare_merged(A, B, expert, scales) for n, (_, A, B) in layer.items()}
            _sync(device)
            t0 = time.perf_counter()
            for n in layer:
                merged_plans[n].merged.append(cpu.merge_lora_plan(layer[n][0], merged_plans[n]))
            _sync(device)
            merge_s = time.perf_counter() - t0
            fns["merged"] = lambda: [cpu.lora_moe_linear(xs[n], layer[n][0], None, merged_plans[n]) for n in layer]
        med = timed(fns, repeats(t, batch), device)
        row = {"model": "awaker-7b-layer", "T": t, "batch": batch, **{f"{k}_ms": v * 1e3 for k, v in med.items()}}
        row["fast_over_base"] = med["fast"] / med["base"]
        row["ideal_bytes"] = (w_elems + batch * lora_elems) / w_elems
        row["ideal_flops"] = (w_elems + lora_elems) / w_elems
        row["ideal"] = row["ideal_bytes"] if t == 1 else row["ideal_flops"]
        row["speedup_over_reference"] = med["reference"] / med["fast"]
        # the adapter part alone (time above the base linears): what the fast formulation actually changes
        row["adapter_speedup_over_reference"] = (med["reference"] - med["base"]) / max(med["fast"] - med["base"], 1e-9)
        if "merged" in med:
            row["merged_over_base"] = med["merged"] / med["base"]
        if t == 1:
            row["base_GBps"] = w_elems * esize / med["base"] / 1e9
            row["fast_GBps"] = (w_elems + batch * lora_elems) * esize / med["fast"] / 1e9
        if t == 1 and batch == 1:
            saving = med["fast"] - med["merged"]
            bw = w_elems * esize / med["base"]
            merge = {"merge_ms": merge_s * 1e3, "step_saving_ms": saving * 1e3,
                     "measured_break_even_tokens": merge_s / saving if saving > 0 else float("inf"),
                     "base_gemv_bytes_per_s": bw}
        rows.append(row)
        del fns, ref_plans, fast_plans, merged_plans, xs
        print(_fmt_row(row), flush=True)
    if merge is not None:
        # The cost model's prediction with this run's measured rates (FLOP/s from the largest base GEMM timed).
        big = max((r for r in rows), key=lambda r: r["T"] * r["batch"])
        flops = 2 * big["T"] * big["batch"] * w_elems / (big["base_ms"] / 1e3)
        merge["gemm_flops_per_s"] = flops
        merge["model_break_even_tokens"] = sum(
            cpu.merge_break_even_tokens(1, d_in, d_out, RANK, dtype_bytes=esize,
                                         read_bw=merge["base_gemv_bytes_per_s"], flops=flops)
            * (2 * RANK * (d_in + d_out))  # weight each linear's break-even by its per-step saving
            for d_in, d_out in AWAKER_LINEARS.values()) / lora_elems
    return rows, merge


def bench_moe(configs, repeats, device, dtype, esize):
    g = torch.Generator().manual_seed(1)
    E, H, Fd = PHI_EXPERTS, PHI_HIDDEN, PHI_FFN
    experts = moe.MoeExperts.gelu_mlp(
        (torch.randn(E, Fd, H, generator=g) / H**0.5).to(device, dtype), (torch.randn(E, Fd, generator=g) * 0.02).to(device, dtype),
        (torch.randn(E, H, Fd, generator=g) / Fd**0.5).to(device, dtype), (torch.randn(E, H, generator=g) * 0.02).to(device, dtype))
    router = torch.randn(E, H, generator=g).to(device) / H**0.5
    expert_elems = 2 * H * Fd
    rows = []
    for t, batch in configs:
        n = t * batch
        x = torch.randn(n, H, device=device, dtype=dtype)
        info = moe.route(x, router, TOP_K)
        used = int(torch.unique(info.expert_idx).numel())

        def dense_ffn():
            return F.linear(F.gelu(F.linear(x, experts.w_in[0], experts.b_in[0]), approximate="tanh"),
                            experts.w_out[0], experts.b_out[0])

        fns = {
            "base": dense_ffn,
            "reference": lambda: moe.moe_ffn(x, router, experts, TOP_K, impl="reference"),
            "fast": lambda: moe.moe_ffn(x, router, experts, TOP_K, impl="dropless"),
            "grouped_mm": lambda: moe.experts_dropless(x, experts, moe.route(x, router, TOP_K), use_grouped_mm=True),
        }
        if n <= 512:  # the export variant computes all 4 experts: E/k times the work, pointless to time at 2048 tokens
            fns["dense"] = lambda: moe.moe_ffn(x, router, experts, TOP_K, impl="dense")
        med = timed(fns, repeats(t, batch), device)
        row = {"model": "moe-llava-phi2-ffn", "T": t, "batch": batch, "experts_used": used,
               **{f"{k}_ms": v * 1e3 for k, v in med.items()}}
        row["fast_over_base"] = med["fast"] / med["base"]
        row["ideal_bytes"] = float(used)
        row["ideal_flops"] = float(TOP_K)
        row["ideal"] = row["ideal_bytes"] if t == 1 else row["ideal_flops"]
        row["fast_over_ideal"] = row["fast_over_base"] / row["ideal"]
        row["speedup_over_reference"] = med["reference"] / med["fast"]
        if t == 1:
            row["base_GBps"] = expert_elems * esize / med["base"] / 1e9
            row["fast_GBps"] = used * expert_elems * esize / med["fast"] / 1e9
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


def _fmt_row(r):
    keys = [k for k in r if k.endswith("_ms")]
    return (f"{r['model']:20s} T={r['T']:<4d} batch={r['batch']} " + " ".join(f"{k[:-3]}={r[k]:.2f}ms" for k in keys)
            + f" fast/base={r['fast_over_base']:.3f} ideal={r['ideal']:.3f} x_ref={r['speedup_over_reference']:.2f}")


def _ms(r, key):
    return f"{r[key]:.2f}" if key in r else "n/a"


def _markdown(res) -> str:
    L = [f"# Kernel benchmark — {res['device']}", "",
         f"Command: `{res['command']}`  ", f"torch {res['torch']}, {res['threads']} threads, {res['dtype']}, "
         f"read bandwidth (sum of 512 MB) {res['read_bandwidth_GBps']:.1f} GB/s. Medians of interleaved repeats.",
         res.get("cpu", ""), "", "No NPU figures exist: this run had no Ascend device (the NPU variants are a separate issue).", "",
         f"The machine was shared with other jobs (1-min load average {res['loadavg_start']:.1f} at the start, "
         f"{res['loadavg_end']:.1f} at the end, on {res['cpus']} CPUs): the T = 512 rows (3 repeats) can be off by "
         "10-30%; the interleaved ratios are more reliable than the absolute times.", "",
         "## Awaker-7B: one layer's four LoRA-MoE linears (o, gate, up, down; r 256, 4+1 experts)", "",
         "ideal = bytes ratio at T = 1 (W + per-request rank-2r LoRA over W), FLOP ratio at T > 1.", "",
         "x reference = reference / fast time; adapter x ref = (reference - base) / (fast - base), the adapter part "
         "alone.", "",
         "| T | batch | base ms | reference ms | fast ms | merged ms | fast/base | ideal | x reference | adapter x ref | "
         "GB/s base / fast (T=1) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["awaker"]:
        bw = f"{r['base_GBps']:.1f} / {r['fast_GBps']:.1f}" if "base_GBps" in r else ""
        merged = f"{r['merged_ms']:.1f}" if "merged_ms" in r else "n/a"
        L.append(f"| {r['T']} | {r['batch']} | {r['base_ms']:.1f} | {r['reference_ms']:.1f} | {r['fast_ms']:.1f} | "
                 f"{merged} | {r['fast_over_base']:.3f} | {r['ideal']:.3f} | {r['speedup_over_reference']:.2f} | "
                 f"{r['adapter_speedup_over_reference']:.2f} | {bw} |")
    m = res.get("merge")
    if m:
        L += ["", f"Merged strategy (batch 1): merging the layer's four linears takes {m['merge_ms']:.0f} ms and saves "
              f"{m['step_saving_ms']:.2f} ms per decode step: break-even after {m['measured_break_even_tokens']:.0f} "
              f"tokens measured, {m['model_break_even_tokens']:.0f} predicted by `moevl.kernels.cpu.should_merge`'s cost "
              f"model with this run's rates ({m['base_gemv_bytes_per_s']/1e9:.1f} GB/s, "
              f"{m['gemm_flops_per_s']/1e9:.0f} GFLOP/s). Merged weights cost one private W per request (batch 4 not run)."]
    L += ["", "## MoE-LLaVA-Phi2: one top-2 MoE FFN (hidden 2560, FFN 10240, 4 experts)", "",
          "base = one dense FFN on the same tokens; ideal = experts touched (bytes, T = 1) or 2 (FLOPs, T > 1). "
          "fast = dropless, the default of the device (CPU: loop over the per-expert slices); grouped_mm = dropless with "
          "torch._grouped_mm (the CUDA default); dense = export variant.",
          "", "| T | batch | experts used | base ms | reference ms | fast ms | grouped_mm ms | dense ms | fast/base | ideal bytes | "
          "ideal FLOPs | fast/ideal | x reference |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["moe"]:
        L.append(f"| {r['T']} | {r['batch']} | {r['experts_used']} | {r['base_ms']:.2f} | {r['reference_ms']:.2f} | "
                 f"{r['fast_ms']:.2f} | {r['grouped_mm_ms']:.2f} | {_ms(r, 'dense_ms')} | {r['fast_over_base']:.3f} | "
                 f"{r['ideal_bytes']:.0f} | {r['ideal_flops']:.0f} | {r['fast_over_ideal']:.3f} | {r['speedup_over_reference']:.2f} |")
    L += ["", "## Targets (CPU)", ""] + [f"- {t['what']}: {t['value']:.3f} (target {t['target']}) — "
                                         f"{'met' if t['met'] else 'NOT met'}" if t["target"] != "n/a" else f"- {t['what']}: {t['value']:.2f}"
                                         for t in res["targets"]]
    return "\n".join(L) + "\n"


def _targets(res):
    out = []
    aw = {(r["T"], r["batch"]): r for r in res["awaker"]}
    if (1, 1) in aw:
        r = aw[(1, 1)]
        out.append({"what": "LoRA-MoE decode T=1 batch 1, fast/base (bytes-ideal %.3f)" % r["ideal"],
                    "value": r["fast_over_base"], "target": "<= 1.22", "met": r["fast_over_base"] <= 1.22})
        out.append({"what": "LoRA-MoE decode T=1 batch 1, speed-up over reference", "value": r["speedup_over_reference"],
                    "target": ">= 3", "met": r["speedup_over_reference"] >= 3})
        out.append({"what": "(context) LoRA-MoE decode T=1 batch 1, adapter part speed-up over reference's",
                    "value": r["adapter_speedup_over_reference"], "target": "n/a", "met": True})
        out.append({"what": "(context) upper bound on the speed-up over reference at decode: reference/base "
                            "(fast cannot beat the base linears, whose bytes both variants read)",
                    "value": r["reference_ms"] / r["base_ms"], "target": "n/a", "met": True})
    for r in res["moe"]:
        if r["T"] == 512:
            out.append({"what": f"top-2 MoE prefill T=512 batch {r['batch']}, fast / FLOP-ideal",
                        "value": r["fast_over_ideal"], "target": "<= 1.3", "met": r["fast_over_ideal"] <= 1.3})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T in {1, 16}, batch 1, fewer repeats (about a minute)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for kernels-<device>.json/.md")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    esize = torch.tensor([], dtype=dtype).element_size()
    if args.quick:
        configs = [(1, 1), (16, 1)]
        repeats = lambda t, b: 7 if t == 1 else 3  # noqa: E731
    else:
        configs = [(t, b) for t in (1, 16, 512) for b in (1, 4)]
        repeats = lambda t, b: 15 if t == 1 else (7 if t == 16 else 3)  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    res = {"command": " ".join(["python -m moevl.benchmarks.kernels"] + list(argv if argv is not None else sys.argv[1:])),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": f"{device.type} ({name})",
           "dtype": str(dtype).replace("torch.", ""), "quick": args.quick}
    res["cpus"] = os.cpu_count()
    res["cpu"] = cpu_line()  # the host CPU and its flags, on a GPU run too
    res["loadavg_start"] = os.getloadavg()[0]
    res["read_bandwidth_GBps"] = read_bandwidth(device, dtype) / 1e9
    print(f"{res['device']}, {res['threads']} threads, {res['dtype']}; read bandwidth {res['read_bandwidth_GBps']:.1f} GB/s",
          flush=True)
    t0 = time.perf_counter()
    res["awaker"], res["merge"] = bench_awaker(progress(len(configs), "kernels: LoRA-MoE", configs), repeats, device,
                                               dtype, esize)
    res["moe"] = bench_moe(progress(len(configs), "kernels: MoE", configs), repeats, device, dtype, esize)
    res["read_bandwidth_end_GBps"] = read_bandwidth(device, dtype) / 1e9
    res["wall_s"] = time.perf_counter() - t0
    res["loadavg_end"] = os.getloadavg()[0]
    res["targets"] = _targets(res)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels-{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(_markdown(res))
    print(f"wrote {stem}.json and {stem}.md ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
