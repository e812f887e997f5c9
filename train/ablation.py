"""The ablation Awaker's claim rests on, from the stage outputs of one defaults build (same data, same budget up
to each stage): base + one LoRA (stage 1) vs LoRA-MoE after stage 2 and after stage 3, per task, with the routing
per task. Writes a markdown report (and its JSON) with the command, the machine and every figure.

    python -m moevl.train.ablation --build build/defaults --out benchmarks/results/ablation-cpu.md [--per-pair 200]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

STAGES = (("stage 1: base + one LoRA", "awaker/stage1"), ("stage 2: LoRA-MoE, routers trained", "awaker/stage2"),
          ("stage 3: LoRA-MoE, routers frozen", "awaker/stage3"))


def sample(validation: Path, per_pair: int, out: Path) -> Path:
    """The first ``per_pair`` records of each (task, language) of the validation split, as a JSON beside it."""
    from moevl.train.data import load_records

    seen, keep = {}, []
    raw = json.loads(validation.read_text(encoding="utf-8"))
    for rec in raw:
        key = (rec["task"], rec["lang"])
        if seen.get(key, 0) < per_pair:
            seen[key] = seen.get(key, 0) + 1
            keep.append(rec)
    path = validation.parent / f"ablation-{per_pair}.json"
    path.write_text(json.dumps(keep, ensure_ascii=False), encoding="utf-8")
    load_records(path)  # checks it
    return path


CONTROL = "control: one LoRA, as many steps as stages 1-3"


def run(build: Path, out: Path, per_pair: int, batch_size: int = 32, control: Path | None = None) -> dict:
    import moevl
    from moevl.ascend.device import cpu_model_name
    from moevl.train.evaluate import evaluate

    data = sample(build / "data" / "validation" / "shapes.json", per_pair, out)
    results = {}
    runs = [(name, build / folder) for name, folder in STAGES] + ([(CONTROL, control)] if control else [])
    for name, folder in runs:
        t = time.time()
        session = moevl.load(str(folder), device="cpu", dtype="fp32")
        report = evaluate(session, data, batch_size=batch_size, max_new_tokens=40)
        report.pop("predictions")
        results[name] = report
        print(f"{name}: {report['overall']['accuracy']:.3f} ({time.time() - t:.0f} s)", file=sys.stderr)
    build_info = build_record(build)
    summary = {"build": str(build), "control": str(control) if control else None, "per_pair": per_pair, "n": results[STAGES[0][0]]["n"],
               "cpu": cpu_model_name(), "python": platform.python_version(),
               "steps": stage_plan(build_info), "results": results}
    out.with_suffix(".json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    out.write_text(render(summary), encoding="utf-8")
    return summary


def build_record(build: Path) -> dict:
    """The record a defaults build wrote: build.json (both models) or build-awaker.json (awaker-tiny alone); {}."""
    for path in (build / "build.json", build / "build-awaker.json"):
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def stage_plan(build_info: dict) -> dict:
    """awaker-tiny's stages in the build's plan (build.json) -> {stage: "steps x batch"}."""
    plan = build_info.get("plan", {})
    return {k: f"{v} x {plan.get('batches', {}).get(k, plan.get('batch', '?'))}"
            for k, v in plan.get("steps", {}).items() if k.startswith("awaker")}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render(s: dict) -> str:
    from moevl.train.data import LANGS, TASKS

    names = list(s["results"])
    lines = ["# Ablation: one LoRA vs LoRA-MoE (awaker-tiny, CPU)", "",
             f"Command: `python -m moevl.train.ablation --build {s['build']} --per-pair {s['per_pair']}"
             + (f" --control {s['control']}" if s.get("control") else "") + f"` on {s['cpu']} "
             f"(Python {s['python']}). Data: the first {s['per_pair']} validation questions of each task and language "
             f"({s['n']} in all; validation split of the defaults build, a seed never trained on). Greedy decoding, "
             f"fp32, exact match. Training steps x batch per stage: {s['steps']}; stages 2 and 3 continue from "
             "the stage before, so stage 2 has seen more multi-task steps than stage 1 (same data); the control "
             "(when given) is a stage-1 LoRA trained for as many steps as stages 1 + 2 + 3 together, from the same "
             "base, data, rank and peak learning rate: the equal-budget single-LoRA baseline.", "",
             "## Exact-match accuracy (%) per task", "",
             "| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task in TASKS:
        for lang in LANGS + ("all",):
            cells = [_pct(r["accuracy"].get(task, {}).get(lang, {}).get("accuracy")) for r in s["results"].values()]
            label = f"{task} ({lang})" if lang != "all" else f"**{task}**"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **all** | " + " | ".join(_pct(r["overall"]["accuracy"]) for r in s["results"].values()) + " |")
    lines += ["", "Captions: item-set F1 (%) / count right (%):", "",
              "| lang | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for lang in LANGS + ("all",):
        cells = [f"{_pct(r['caption'][lang]['f1'])} / {_pct(r['caption'][lang]['count_ok'])}"
                 if lang in r.get("caption", {}) else "-" for r in s["results"].values()]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    for name, r in s["results"].items():
        routing = r.get("routing") or {}
        if not routing.get("routers"):
            continue
        tasks = [t for t in TASKS if t in r["accuracy"]]
        lines += ["", f"## Routing after {name}", "",
                  f"Requests per expert for each task (the expert each router picked; NMI = normalised mutual "
                  f"information between task and expert, 0 = independent, 1 = the task decides the expert; "
                  f"mean {routing['mean_nmi']:.3f}):", "",
                  "| router | " + " | ".join(tasks) + " | NMI |", "|---" * (len(tasks) + 2) + "|"]
        for router, v in routing["routers"].items():
            cells = [" ".join(str(c) for c in v["counts"][t]) for t in tasks]
            lines.append(f"| {router} | " + " | ".join(cells) + f" | {v['nmi']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moevl.train.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", required=True, help="the --out folder of python -m moevl.train.defaults")
    p.add_argument("--out", default="benchmarks/results/ablation-cpu.md")
    p.add_argument("--per-pair", type=int, default=200, help="validation questions per task and language")
    p.add_argument("--control", default=None, help="a stage-1 output trained for the steps of stages 1-3 together")
    args = p.parse_args(argv)
    build = Path(args.build)
    missing = [f for _, f in STAGES if not (build / f / "moevl_config.json").is_file()]
    if missing:
        print(f"--build {build}: no finished {', '.join(missing)}; run python -m moevl.train.defaults first",
              file=sys.stderr)
        return 2
    run(build, Path(args.out), args.per_pair, control=Path(args.control) if args.control else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
