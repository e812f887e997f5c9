"""PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 (dynamic) on the CPU, end to end through the exported
graphs: ``python -m moevl.benchmarks.ort [--configs tiny,7b-width] [--out DIR]`` (also ``moevl bench ort``).

Configurations: awaker-tiny, and Awaker at Qwen2-VL-7B width with 2 decoder layers (moevl.model.awaker.config.awaker_7b_width;
random weights, no tokenizer: token ids are fed directly as a text-only chat). Per configuration and runtime: time
to first token (embedding + decoder prefill of a prompt) and decode ms/token, medians over repeats, plus greedy-token
agreement of int8 against ORT fp32 and of ORT fp32 against PyTorch. Writes <out>/ort-<device>.json and .md.
Side by side (7B width): ours fp32 and ORT fp32 take turns repeat by repeat (where 2.5x our fp32 weight bytes
are free: ~7 GB each; else one after the other, ours freed first), then ours int8 and ORT int8 likewise.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

CONFIGS = ("tiny", "7b-width")
SIDE_BY_SIDE = ("7b-width",)  # configurations where ours int8 is timed in turn with ORT int8


def build_session(name: str):
    import moevl
    from moevl.ascend.device import resolve_device
    from moevl.model.awaker.config import awaker_7b_width, awaker_tiny
    from moevl.model.awaker.checkpoint import build_model
    from moevl.model.awaker.session import AwakerSession
    from moevl.model.awaker.tiny import init_random_weights

    cfg = awaker_tiny() if name == "tiny" else awaker_7b_width()
    model = build_model(cfg).to_empty(device="cpu")
    init_random_weights(model, 0)
    model.init_buffers()
    dev = resolve_device("cpu", "fp32")
    moevl.place(model, dev)  # the device's kernels, as moevl.load gives them
    return AwakerSession(model, types.SimpleNamespace(tokenizer=None), dev)


def prompt_batch(cfg, length: int):
    from moevl.model.awaker.inputs import collate

    g = torch.Generator().manual_seed(0)
    words = torch.randint(10, min(cfg.vocab_size, 150000), (length,), generator=g).tolist()
    ids = ([cfg.im_start_token_id, words[0], cfg.im_end_token_id, cfg.im_start_token_id] + words[1:length - 7]
           + [cfg.im_end_token_id, cfg.im_start_token_id, words[-1]])
    return collate([ids], [], [], cfg)


def measure(session, batch, tokens: int, repeats: int) -> dict:
    """Greedy generation timed per call: TTFT = prefill + the first argmax; decode = each decode call."""
    ttft, step, out = [], [], None
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        logits = session.prefill(batch, batch.input_ids.shape[1] + tokens)
        tok = logits.argmax(-1)
        first = (time.perf_counter() - t0) * 1000
        seq, times = [int(tok[0])], []
        for _ in range(tokens - 1):
            t0 = time.perf_counter()
            logits = session.decode(tok)
            tok = logits.argmax(-1)
            times.append((time.perf_counter() - t0) * 1000)
            seq.append(int(tok[0]))
        if out is None:
            out = seq
            continue
        ttft.append(first)
        step.extend(times)
    return {"ttft_ms": statistics.median(ttft), "decode_ms_per_token": statistics.median(step), "tokens": out}


def alternate(sessions: dict, batch, tokens: int, repeats: int) -> dict:
    """``measure`` for several sessions side by side: every repeat runs each session in turn (a warm-up run, then a
    timed one), so that contention from other jobs hits them alike. -> {name: measure's dict, plus "per_repeat"
    (TTFT, decode)}."""
    runs = {n: [] for n in sessions}
    for _ in range(repeats):
        for n, s in sessions.items():
            runs[n].append(measure(s, batch, tokens, 1))
    out = {}
    for n, timed in runs.items():
        out[n] = {"ttft_ms": statistics.median(x["ttft_ms"] for x in timed),
                  "decode_ms_per_token": statistics.median(x["decode_ms_per_token"] for x in timed),
                  "tokens": timed[0]["tokens"],
                  "per_repeat": [[round(x["ttft_ms"], 3), round(x["decode_ms_per_token"], 3)] for x in timed]}
    return out


# Ours fp32 and ORT fp32 are timed side by side when this many times our fp32 weight bytes are free (ORT's session
# holds its own copy of the weights, and may prepack some); else one after the other, ours freed first.
FP32_PAIR_MEMORY = 2.5


def memory_available() -> int:
    """Bytes the kernel reports available (MemAvailable), 0 where /proc/meminfo is not readable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def quantized_session(session, mode: str = "int8"):
    """Ours as ``moevl.load(..., dtype="bf16", quantize=mode)`` gives it (the default CPU kernel policy), built from
    ``session``'s weights without a second fp32 copy."""
    import moevl
    from moevl.ascend.device import resolve_device
    from moevl.benchmarks.quant import clone_in
    from moevl.kernels import quant
    from moevl.model.awaker.session import AwakerSession

    dev = resolve_device("cpu", "bf16")
    model = clone_in(session.model, dev.dtype)
    quant.quantize_model(model, mode)
    moevl.place(model, dev)
    return AwakerSession(model, session.processor, dev)


def agreement(ref: list[int], got: list[int]) -> dict:
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    same = sum(a == b for a, b in zip(ref, got))
    return {"identical": ref == got, "positions_equal": f"{same}/{len(ref)}",
            "first_divergence": first}


def run_config(name: str, prompt_len: int, tokens: int, repeats: int, threads: int | None, log) -> dict:
    from moevl.export.onnx import export_onnx
    from moevl.export.session import open_ort
    from moevl.kernels import quant

    torch.manual_seed(0)
    session = build_session(name)
    cfg = session.model.cfg
    batch = prompt_batch(cfg, prompt_len)
    log(f"[{name}] PyTorch eager ({torch.get_num_threads()} threads), prompt {prompt_len}, {tokens} tokens")
    res = {"config": name, "hidden": cfg.hidden_size, "layers": cfg.num_layers, "vocab": cfg.vocab_size,
           "experts": cfg.adapters.num_experts, "rank": cfg.adapters.rank, "prompt_tokens": prompt_len,
           "new_tokens": tokens, "repeats": repeats}
    res["load_average_before"] = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine skew timings
    # fp32 side by side too where memory allows both fp32 copies (ours and ORT's, which may hold a prepacked one)
    # (weights in a CPU layout are weight modules, not Parameters: counted by their own nbytes)
    fp32_bytes = (sum(p.numel() * p.element_size() for p in session.model.parameters())
                  + sum(m.nbytes() for m in session.model.modules() if isinstance(m, quant.QuantizedWeight)))
    res["fp32_side_by_side"] = name in SIDE_BY_SIDE and memory_available() > FP32_PAIR_MEMORY * fp32_bytes
    if not res["fp32_side_by_side"]:
        res["torch"] = measure(session, batch, tokens, repeats)
    with tempfile.TemporaryDirectory(prefix="moevl-bench-ort-") as tmp:
        t0 = time.perf_counter()
        folder = export_onnx(None, Path(tmp) / name, session=session, validate=False, log=lambda *a: None)
        res["export_s"] = round(time.perf_counter() - t0, 1)
        log(f"[{name}] exported in {res['export_s']} s; ONNX Runtime fp32"
            + (" and PyTorch fp32, side by side" if res["fp32_side_by_side"] else ""))
        if res["fp32_side_by_side"]:
            ort = open_ort(folder, threads=threads)
            res.update(alternate({"torch": session, "ort_fp32": ort}, batch, tokens, repeats))
            del ort
            gc.collect()
            res["ort_fp32_vs_torch_decode"] = round(statistics.median(
                a[1] / b[1] for a, b in zip(res["ort_fp32"]["per_repeat"], res["torch"]["per_repeat"])), 3)
        if name in SIDE_BY_SIDE:  # plain weights first: a state dict of oneDNN-packed ones would copy each in fp32
            quant.restore_dense(session.model)
        ours8 = quantized_session(session) if name in SIDE_BY_SIDE else None
        del session
        gc.collect()
        if not res["fp32_side_by_side"]:
            ort = open_ort(folder, threads=threads)
            res["ort_fp32"] = measure(ort, batch, tokens, repeats)
            del ort
            gc.collect()
        t0 = time.perf_counter()
        ort8 = open_ort(folder, quantize="int8", threads=threads)
        res["quantize_s"] = round(time.perf_counter() - t0, 1)
        log(f"[{name}] int8 decoder in {res['quantize_s']} s; ONNX Runtime int8")
        if ours8 is None:
            res["ort_int8"] = measure(ort8, batch, tokens, repeats)
        else:  # ours int8 (bf16 activations, the default kernel) and ORT int8 in turn, repeat by repeat
            log(f"[{name}] ours int8 and ONNX Runtime int8, side by side")
            both = alternate({"ort_int8": ort8, "torch_int8": ours8}, batch, tokens, repeats)
            res.update(both)
            res["torch_int8_kernels"] = (quant.describe(ours8.model) or {}).get("kernels")
            ratios = [a[1] / b[1] for a, b in zip(both["torch_int8"]["per_repeat"], both["ort_int8"]["per_repeat"])]
            res["torch_int8_vs_ort_int8_decode"] = round(statistics.median(ratios), 3)
        del ort8, ours8
        gc.collect()
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    res["ort_fp32_vs_torch"] = agreement(res["torch"]["tokens"], res["ort_fp32"]["tokens"])
    res["int8_vs_fp32"] = agreement(res["ort_fp32"]["tokens"], res["ort_int8"]["tokens"])
    t = res["torch"]["decode_ms_per_token"]
    res["decode_speedup_vs_torch"] = {k: round(t / res[k]["decode_ms_per_token"], 3)
                                      for k in ("ort_fp32", "ort_int8", "torch_int8") if k in res}
    if "torch_int8" in res:
        res["torch_int8_vs_fp32"] = agreement(res["torch"]["tokens"], res["torch_int8"]["tokens"])
    return res


def render(results: list[dict], meta: dict) -> str:
    lines = [f"# PyTorch eager vs ONNX Runtime (fp32, dynamic int8) on {meta['cpu']}", "",
             f"CPU flags: {', '.join(meta.get('cpu_flags') or []) or 'not recorded'}.  ",
             f"Command: `{meta['command']}`  ", f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, "
             f"{meta['threads']} threads, OMP_WAIT_POLICY {meta.get('omp_wait_policy', 'not recorded')}, "
             f"GOMP_SPINCOUNT {meta.get('gomp_spincount', 'not recorded')}, batch 1, greedy, medians over repeats ("
             + ", ".join(f"{r['config']}: {r['repeats']}" for r in results) + ").", "",
             "| config | runtime | TTFT ms | decode ms/token | decode speed-up vs PyTorch | tokens vs reference |",
             "|---|---|---|---|---|---|"]
    for r in results:
        name = f"{r['config']} (h {r['hidden']}, {r['layers']} layers, prompt {r['prompt_tokens']})"
        for key, label, agree in (("torch", "PyTorch eager fp32", "-"),
                                  ("ort_fp32", "ORT fp32", _agree(r["ort_fp32_vs_torch"], "PyTorch")),
                                  ("ort_int8", "ORT int8 (dynamic)", _agree(r["int8_vs_fp32"], "ORT fp32")),
                                  ("torch_int8", "ours int8 (bf16 activations, default kernel)",
                                   _agree(r["torch_int8_vs_fp32"], "PyTorch") if "torch_int8" in r else "")):
            if key not in r:
                continue
            sp = "1.00x" if key == "torch" else f"{r['decode_speedup_vs_torch'][key]:.2f}x"
            lines.append(f"| {name} | {label} | {r[key]['ttft_ms']:.2f} | {r[key]['decode_ms_per_token']:.2f} | "
                         f"{sp} | {agree} |")
    loads = ", ".join(f"{r['config']} {r['load_average_before'][0]} -> {r['load_average_after'][0]}" for r in results)
    lines += ["", f"1-minute load average before -> after each configuration: {loads} (the machine has "
              f"{os.cpu_count()} cores and is shared with other jobs: a load above that means contended timings).",
              "Side by side: the two runtimes take turns, repeat by repeat, so that contention from other jobs hits "
              "them alike; the ratio given is the median of the per-repeat ratios. "
              + "; ".join(f"{r['config']}: fp32 " + ("side by side" if r.get("fp32_side_by_side") else
                                                     "one after the other (PyTorch freed before ORT loads)")
                          + (", int8 side by side" if "torch_int8" in r else "") for r in results) + "."]
    for r in results:
        if "ort_fp32_vs_torch_decode" in r:
            lines.append(f"{r['config']}: ORT fp32 decode / ours fp32 decode, median of the per-repeat ratios: "
                         f"**{r['ort_fp32_vs_torch_decode']:.2f}** (above 1: ours faster).")
    for r in results:
        if "torch_int8_vs_ort_int8_decode" in r:
            lines.append(f"{r['config']}: ours int8 decode / ORT int8 decode, median of the per-repeat ratios: "
                         f"**{r['torch_int8_vs_ort_int8_decode']:.2f}** (kernels: "
                         f"{', '.join(r.get('torch_int8_kernels') or []) or 'not recorded'}).")
    lines += ["", "Targets: ORT fp32 decode >= PyTorch (speed-up >= 1.00x, issue 5); int8 decode >= 1.8x PyTorch "
              "fp32 (issue 5); ours int8 within 10% of ORT int8 or faster (ratio <= 1.10, issue 13)."]
    return "\n".join(lines) + "\n"


def _agree(a: dict, ref: str) -> str:
    return f"{a['positions_equal']} equal to {ref}" + ("" if a["identical"] else
                                                      f", first divergence at {a['first_divergence']}")


def merge_results(old: dict, results: list[dict], meta: dict) -> tuple[list[dict], dict]:
    """An earlier report's configurations that ``results`` does not measure, kept (in CONFIGS order), each with the
    command and date that measured it (an earlier report without them: its own command and date) -> (results, meta
    whose command names every command that measured a kept row, with the configurations and date of each)."""
    new = {r["config"] for r in results}
    kept = [dict(r, command=r.get("command", old["meta"]["command"]), date=r.get("date", old["meta"]["date"]))
            for r in old.get("results", []) if r["config"] not in new]
    rows = sorted(kept + results, key=lambda r: CONFIGS.index(r["config"]) if r["config"] in CONFIGS else len(CONFIGS))
    if kept:
        parts = {}
        for r in rows:
            parts.setdefault((r["command"], r["date"]), []).append(r["config"])
        meta = dict(meta, command="; ".join(f"{cmd} ({', '.join(cs)}: {date[:16]})"
                                            for (cmd, date), cs in parts.items()))
    return rows, meta


def main(argv=None) -> int:
    import onnxruntime

    from moevl.ascend.device import cpu_model_name
    from moevl.benchmarks.common import cpu_flags, progress

    p = argparse.ArgumentParser(prog="python -m moevl.benchmarks.ort", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {CONFIGS}")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 32 tiny, 128 7b-width)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--merge", action="store_true",
                   help="keep the configurations of an existing ort-cpu.json that this run does not measure")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    bad = set(configs) - set(CONFIGS)
    if bad:
        p.error(f"unknown config(s) {sorted(bad)}; choose from {CONFIGS}")

    bar = progress(len(configs), "ort configs")

    def log(m):
        bar.write(m, file=sys.stderr)

    results = []
    for c in configs:
        results.append(run_config(c, args.prompt_len or (32 if c == "tiny" else 128), args.tokens, args.repeats,
                                  args.threads, log))
        bar.update()
    bar.close()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model_name(), "cpu_flags": cpu_flags(), "machine": platform.machine(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "threads": args.threads or torch.get_num_threads(),
            "command": "python -m moevl.benchmarks.ort " + " ".join(argv if argv is not None else sys.argv[1:]),
            # the OpenMP wait settings PyTorch's threads ran under (libgomp reads them when torch is imported)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP's default)"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "(libgomp's default)")}
    for r in results:
        r["command"], r["date"] = meta["command"], meta["date"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / "ort-cpu.json").is_file():
        results, meta = merge_results(json.loads((out / "ort-cpu.json").read_text()), results, meta)
    (out / "ort-cpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = render(results, meta)
    (out / "ort-cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
