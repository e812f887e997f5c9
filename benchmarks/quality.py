"""Quality on every backend: ``python -m moevl.benchmarks.quality [--limit N] [--models awaker-tiny,moellava-tiny]``
(also ``moevl bench quality``).

For each model, ``moevl.train.evaluate`` on the shapes validation split (``make_shapes(VALIDATION_N,
VALIDATION_SEED)``: 1,000 questions per task and language; ``--limit N`` takes its first N records, which are
balanced per block of ten) in every deployment variant this machine can run:
torch fp32 (the reference), torch bf16, npu-emulated:910B bf16, npu-emulated:310P fp16 (the NPU kernel sets run on
the CPU: emulated, not measured on an NPU), ONNX Runtime fp32 and int8 (dynamic int8 decoder) from
``moevl export onnx``, and for MoE-LLaVA the original's Gumbel routing (``moe_routing="deepspeed"``). Variants that
cannot run here (OM needs ATC and an Ascend NPU) are listed with the reason. Per variant: accuracy per task and
language, the difference from torch fp32 in points, how many answers are the same text as torch fp32's, and the
routing's task/expert NMI. Writes <out>/quality-cpu.json and .md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import os
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("awaker-tiny", "moellava-tiny")
REFERENCE = "torch fp32"
# name -> (how moevl.load is called: backend, device, dtype, options), or the export it needs
VARIANTS = {
    "torch fp32": ("torch", "cpu", "fp32", {}),
    "torch bf16": ("torch", "cpu", "bf16", {}),
    # weight-only on ATen's kernel (bf16 activations), pinned: the default (auto) takes FBGEMM on VNNI CPUs
    "torch bf16 int8": ("torch", "cpu", "bf16", {"quantize": "int8", "kernel": "aten"}),
    "torch bf16 int4": ("torch", "cpu", "bf16", {"quantize": "int4"}),
    # the same weights through ONNX Runtime's MatMulNBits (kernels/mlas.py; int8 activations per block), forced:
    # MOEVL_CPU_QUANT_KERNEL=fastest takes it only for weights of >= 1M elements, and the tiny defaults' are smaller
    "torch bf16 int8 mlas": ("torch", "cpu", "bf16", {"quantize": "int8", "kernel": "mlas"}),
    "torch bf16 int4 symmetric mlas": ("torch", "cpu", "bf16", {"quantize": "int4", "symmetric": True,
                                                                  "kernel": "mlas"}),
    # torch's FBGEMM dynamic-quantised linear (kernels/fbgemm.py; int8 activations per row): MOEVL_CPU_QUANT_KERNEL
    # =fbgemm
    "torch bf16 int8 fbgemm": ("torch", "cpu", "bf16", {"quantize": "int8", "kernel": "fbgemm"}),
    "npu-emulated:910B bf16": ("torch", "npu-emulated:910B", "bf16", {}),
    "npu-emulated:310P fp16": ("torch", "npu-emulated:310P", "fp16", {}),
    "ort fp32": ("ort", "cpu", None, {}),
    "ort int8": ("ort", "cpu", None, {"quantize": "int8"}),
    "torch fp32 gumbel": ("torch", "cpu", "fp32", {"moe_routing": "deepspeed"}),
}
NOT_HERE = {
    "om (Ascend OM)": "needs ATC (CANN toolkit) to build and an Ascend NPU with ais_bench to run; neither is on "
                      "this machine (the OM loop is tested over ONNX Runtime in tests/test_export.py)",
    "npu (hardware)": "no Ascend NPU on this machine: the npu-emulated rows run the NPU kernel sets on the CPU",
}
INT8 = ("ort int8 is ONNX Runtime's dynamic quantisation of the decoder graph's MatMuls with constant weights "
        "(lm_head included) to int8 with per-tensor scales, activations quantised per call; the router MatMuls "
        "stay fp32, the vision and embedding graphs are untouched. Its logits move far more than the float "
        "variants' do, so near-tied greedy choices flip: its difference from fp32 is reported as measured and "
        "not held to the 1-point target.")
LABELS = [(t, l) for t in ("count", "color", "shape", "position", "caption") for l in ("en", "zh")]


def _family(model: str):
    from moevl.model.family import family_of

    return family_of(model)


def applies(variant: str, family) -> bool:
    """A variant applies to a family that takes its load options (the Gumbel mode: MoE-LLaVA's moe_routing)."""
    return all(k in family.options for k in VARIANTS[variant][3] if k not in LOAD_EXTRAS)


LOAD_EXTRAS = ("quantize", "kernel", "symmetric")  # handled here or by moevl.load itself for every family


def _load(model: str, variant: str, onnx_dir: Path | None):
    import moevl

    backend, device, dtype, options = VARIANTS[variant]
    if backend == "ort":
        return moevl.load(onnx_dir, backend="ort", **options)
    options = dict(options)
    kernel, symmetric = options.pop("kernel", None), options.pop("symmetric", False)
    if symmetric:  # int4 without a zero point: quantised here, then placed (bound) again
        from moevl.kernels import quant

        mode = options.pop("quantize")
        session = moevl.load(model, device=device, dtype=dtype, **options)
        quant.quantize_model(session.model, mode, zero_point=False)
    else:
        session = None
    previous = os.environ.get("MOEVL_CPU_QUANT_KERNEL")
    if kernel:
        os.environ["MOEVL_CPU_QUANT_KERNEL"] = kernel
    try:
        if session is None:
            return moevl.load(model, device=device, dtype=dtype, **options)
        moevl.place(session.model, session.device)
        return session
    finally:
        if previous is None:
            os.environ.pop("MOEVL_CPU_QUANT_KERNEL", None)
        else:
            os.environ["MOEVL_CPU_QUANT_KERNEL"] = previous


def _summary(report: dict) -> dict:
    acc = {f"{t}/{l}": report["accuracy"].get(t, {}).get(l, {}).get("accuracy") for t, l in LABELS}
    acc |= {f"{t}/all": row["all"]["accuracy"] for t, row in report["accuracy"].items()}
    return {"accuracy": acc, "overall": report["overall"]["accuracy"], "caption": report.get("caption", {}),
            "routing_mean_nmi": report["routing"]["mean_nmi"], "routing_unit": report["routing"]["unit"],
            "seconds": report["seconds"], "n": report["n"], "max_new_tokens": report["max_new_tokens"]}


def run_model(model: str, records, variants, work: Path, batch_size: int, max_new_tokens, log,
              tick=lambda: None) -> dict:
    from moevl.train.evaluate import evaluate

    family = _family(model)
    results, not_run, answers, experts = {}, {}, {}, {}
    onnx_dir = None
    for variant in variants:
        tick()  # the progress bar counts every variant, the ones that do not apply too
        if not applies(variant, family):
            continue
        try:
            if VARIANTS[variant][0] == "ort" and onnx_dir is None:
                from moevl.export.onnx import export_onnx

                onnx_dir = export_onnx(model, work / f"{model}-onnx", dtype="fp32", log=lambda m: None)
            log(f"{model}: {variant}")
            session = _load(model, variant, onnx_dir)
            report = evaluate(session, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
        except Exception as e:  # a variant that fails is reported, not hidden, and the others still run
            not_run[variant] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"{model}: {variant} {not_run[variant]}")
            continue
        results[variant] = _summary(report)
        answers[variant] = [p["prediction"] for p in report["predictions"]]
        experts[variant] = [p.get("experts") or {} for p in report["predictions"]]
    ref = answers.get(REFERENCE)
    for variant, r in results.items():
        if ref is not None:
            r["same_answer_as_fp32"] = round(sum(a == b for a, b in zip(answers[variant], ref)) / len(ref), 6)
            r["delta_points"] = {k: None if v is None or results[REFERENCE]["accuracy"][k] is None else
                                 round(100 * (v - results[REFERENCE]["accuracy"][k]), 2)
                                 for k, v in r["accuracy"].items()}
        if REFERENCE in experts:
            r["routing_changed_vs_fp32"] = routing_changes(experts[variant], experts[REFERENCE],
                                                           r["routing_unit"])
    return {"family": family.name, "variants": results, "not_run": not_run | NOT_HERE}


def routing_changes(picked: list[dict], reference: list[dict], unit: str) -> dict:
    """How many routing decisions differ from the reference's, question by question. ``picked``/``reference``: per
    question {router: expert} as ``evaluate`` records it (Awaker, unit "request": the expert the router chose for that
    request; MoE-LLaVA, unit "token-slot": the expert that took the most of that question's token slots)."""
    pairs = [(a.get(name), b[name]) for a, b in zip(picked, reference) for name in b]
    changed_q = sum(any(a.get(name) != b[name] for name in b) for a, b in zip(picked, reference) if b)
    asked = sum(1 for b in reference if b)
    return {"decisions": len(pairs), "changed": sum(a != b for a, b in pairs),
            "fraction": None if not pairs else round(sum(a != b for a, b in pairs) / len(pairs), 6),
            "questions_with_a_change": None if not asked else round(changed_q / asked, 6),
            "what": "the expert each router chose per request" if unit == "request" else
                    "the busiest expert per question and MoE layer (token-level routing: a proxy)"}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render(payload: dict) -> str:
    env = payload["environment"]
    lines = ["# Quality on every backend (CPU)", "",
             f"Command: `{payload['command']}`", "",
             f"CPU: {env['device'].get('chip')} (flags: {', '.join(env.get('cpu_flags') or []) or 'not recorded'}); "
             f"torch {env['torch']}, {env['threads']} threads; data: the shapes "
             f"validation split (seed {payload['data_seed']}), first {payload['n']} records "
             f"({payload['n_per_pair']}); greedy decoding. npu-emulated rows run the NPU kernel sets on the CPU "
             "(emulated: no NPU was used).", ""]
    if payload.get("note"):
        lines += [f"**{payload['note']}**", ""]
    for model, m in payload["models"].items():
        variants = list(m["variants"])
        lines += [f"## {model} ({m['family']})", "",
                  "Exact-match accuracy (%) per task and language; in brackets the difference from torch fp32 in "
                  "points.", "", "| task / lang | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        keys = [f"{t}/{l}" for t, l in LABELS] + [f"{t}/all" for t in ("count", "color", "shape", "position",
                                                                      "caption")]
        for key in keys:
            cells = []
            for v in variants:
                r = m["variants"][v]
                acc, d = r["accuracy"].get(key), (r.get("delta_points") or {}).get(key)
                cells.append(_pct(acc) + ("" if v == REFERENCE or d is None else f" ({d:+.1f})"))
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("| **all** | " + " | ".join(_pct(m["variants"][v]["overall"]) for v in variants) + " |")
        lines.append("| caption item F1 | " + " | ".join(
            _pct(m["variants"][v]["caption"].get("all", {}).get("f1")) for v in variants) + " |")
        lines.append("| same answer as torch fp32 | " + " | ".join(
            _pct(m["variants"][v].get("same_answer_as_fp32")) for v in variants) + " |")
        lines.append("| routing decisions changed vs torch fp32 (% of question x router) | " + " | ".join(
            _pct((m["variants"][v].get("routing_changed_vs_fp32") or {}).get("fraction")) for v in variants) + " |")
        lines.append("| routing NMI task/expert (mean over routers) | " + " | ".join(
            "-" if m["variants"][v]["routing_mean_nmi"] is None else f"{m['variants'][v]['routing_mean_nmi']:.3f}"
            for v in variants) + " |")
        lines.append("| seconds (wall, evaluate only; a shared machine: not a speed figure) | " + " | ".join(
            f"{m['variants'][v]['seconds']:.1f}" for v in variants) + " |")
        lines += ["", "Not run:", ""] + [f"- {k}: {why}" for k, why in m["not_run"].items()] + [""]
    lines += ["## Reading the table", "",
              f"- Target: every deployment variant within 1 point of torch fp32 per task, int8 excepted. {INT8}",
              "- torch fp32 gumbel (MoE-LLaVA only) is the original's routing, not a deployment variant: its second "
              "expert is drawn with Gumbel noise, so its answers are expected to differ from deterministic top-2.",
              "- Routing decisions changed: per question and router, whether the variant picked another expert than "
              "torch fp32 (Awaker: the expert each router chose for the request; MoE-LLaVA, whose routing is per "
              "token: the expert that took most of the question's token slots, a proxy). Quantisation leaves the "
              "routers in the compute dtype; what changes is their input, computed through quantised layers.",
              "- Routing NMI: the normalised mutual information between the question's task and the expert a "
              "router picks (Awaker: one expert per request and router; MoE-LLaVA: token-slots, prompt and "
              "generated tokens), averaged over routers; 0 = routing ignores the task, 1 = one expert per task.", ""]
    return "\n".join(lines)


def merge_into(payload: dict, old_json: Path) -> None:
    """``payload`` gains the variants of an earlier report that it did not run (same data, seed and record count:
    else ValueError); the variants it ran replace the earlier ones. Each model keeps the command lines that measured
    its rows: the earlier one only while some of its rows remain."""
    if not old_json.is_file():
        raise ValueError(f"{old_json} does not exist: run without --merge first")
    old = json.loads(old_json.read_text())
    for key in ("data", "data_seed", "n"):
        if old.get(key) != payload.get(key):
            raise ValueError(f"{old_json} was measured on other data ({key} {old.get(key)!r}, now "
                             f"{payload.get(key)!r}): run the same --limit / --data, or without --merge")
    for model, m in payload["models"].items():
        m["command"] = payload["command"]
        earlier = old.get("models", {}).get(model)
        if earlier is None:
            continue
        if any(k not in m["variants"] for k in earlier["variants"]):  # rows of the earlier run stay
            m["command"] = f"{earlier.get('command', old['command'])}; then {payload['command']}"
        m["variants"] = {**{k: m["variants"].get(k, v) for k, v in earlier["variants"].items()},  # in place
                         **m["variants"]}
        m["not_run"] = {k: v for k, v in {**earlier.get("not_run", {}), **m["not_run"]}.items()
                        if k not in m["variants"]}
    for model, m in old.get("models", {}).items():
        payload["models"].setdefault(model, {**m, "command": m.get("command", old["command"])})
    payload["command"] = commands_line(payload["models"])


def commands_line(models: dict) -> str:
    """The report's command line: one for all models, or each model's."""
    commands = {m["command"] for m in models.values() if "command" in m}
    if len(commands) == 1:
        return commands.pop()
    return "; ".join(f"{name}: {m['command']}" for name, m in models.items() if "command" in m)


def main(argv=None) -> int:
    from moevl.ascend.device import resolve_device
    from moevl.benchmarks.common import RESULTS, environment, progress
    from moevl.train.data import VALIDATION_N, VALIDATION_SEED, load_records, make_shapes

    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated presets or checkpoint folders")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; default all")
    ap.add_argument("--limit", type=int, default=VALIDATION_N, help="the first N records of the validation split")
    ap.add_argument("--data", default=None, help="a data set JSON instead of the validation split")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 8 tokens")
    ap.add_argument("--note", default=None, help="a line for the top of the markdown (e.g. 'random weights')")
    ap.add_argument("--out", default=str(RESULTS), help="folder for quality-cpu.json/.md")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other variants of the quality-cpu.json already in --out (same data and record "
                         "count) and add or replace the ones run now")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or REFERENCE not in variants:
        print(f"quality: error: --variants must include {REFERENCE!r} and name only {', '.join(VARIANTS)}; "
              f"unknown: {unknown}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print(f"quality: error: --limit {args.limit}: pass a positive number of records", file=sys.stderr)
        return 2

    models_arg = [m.strip() for m in args.models.split(",") if m.strip()]
    bar = progress(len(models_arg) * len(variants), "quality (model x variant)")

    def log(m):
        bar.write(m, file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="moevl-quality-"))
    try:
        if args.data:
            records = load_records(args.data)[:args.limit]
            seed = None
        else:
            seed = VALIDATION_SEED
            log(f"writing the first {args.limit} records of the validation split")
            records = load_records(make_shapes(work / "val", min(args.limit, VALIDATION_N), seed))
        pairs = {}
        for r in records:
            pairs[(r["task"], r["lang"])] = pairs.get((r["task"], r["lang"]), 0) + 1
        models = {}
        t0 = time.perf_counter()
        for model in models_arg:
            models[model] = run_model(model, records, variants, work, args.batch_size, args.max_new_tokens, log,
                                      tick=bar.update)
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    env = environment(resolve_device("cpu", "fp32"))
    command = " ".join(["python -m moevl.benchmarks.quality"] + list(sys.argv[1:] if argv is None else argv))
    payload = {"command": command, "environment": env, "data": args.data or "validation split",
               "data_seed": seed, "n": len(records),
               "n_per_pair": f"{min(pairs.values())}-{max(pairs.values())} per task and language",
               "batch_size": args.batch_size, "note": args.note, "seconds": round(time.perf_counter() - t0, 1),
               "models": {name: {**m, "command": command} for name, m in models.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        try:
            merge_into(payload, out / "quality-cpu.json")
        except ValueError as e:
            print(f"quality: error: --merge: {e}", file=sys.stderr)
            return 2
    (out / "quality-cpu.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    (out / "quality-cpu.md").write_text(render(payload))
    log(f"wrote {out / 'quality-cpu.json'} and {out / 'quality-cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
