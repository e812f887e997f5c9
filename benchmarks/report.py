"""One table across backends and precisions, collected from the latest benchmark results:

    python -m moevl.benchmarks.report [--results-dir benchmarks/results] [--out DIR] [--model awaker-tiny]
    moevl bench report ...

Reads whichever of quant-cpu.json, e2e-cpu.json, ort-cpu.json, quant-load-cpu.json, serve-cpu.json and
quality-cpu.json exist in the results folder and writes summary-cpu.json / .md / .png there (or in --out): one row
per backend/precision variant with decode ms/token, TTFT, tokens/s at batch 1 and 8, weight bytes read per decode
step, the fraction of the read bandwidth, RSS, and task accuracy (overall exact match from ``moevl eval``, through
benchmarks/quality.py). Every cell names the file it came from (and so the run: its command, date and CPU); a
missing cell is "-" with the reason. Nothing is measured or estimated here. Latency comes from the 7B-width runs and
accuracy from the small trained default: the same precision and kernels, different model sizes (the markdown says so).
The PNG plots decode ms/token against accuracy, one labelled point per variant that has both.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = {  # key -> markdown header
    "decode_ms_per_token": "decode ms/token",
    "ttft_ms": "TTFT ms",
    "tokens_per_s_batch1": "tok/s batch 1",
    "tokens_per_s_batch8": "tok/s batch 8",
    "weight_bytes": "weight MB/step",
    "fraction_of_read_bandwidth": "% of read bw",
    "rss_bytes": "RSS GiB",
    "accuracy": "accuracy % (overall exact)",
}
LATENCY = tuple(k for k in COLUMNS if k != "accuracy")
# the rows in the order the table shows them; a variant a file has beyond these gets its own row after them
ROWS = ("transformers fp32", "ours fp32", "ours fp32 (oneDNN)", "ours bf16", "ours int8 (bf16)",
        "ours int8 (bf16, MLAS where faster)", "ours int8 (FBGEMM, int8 activations)", "ours int4 (bf16)",
        "ours int4 symmetric (bf16, MLAS where faster)", "ORT fp32", "ORT int8 (dynamic)", "npu-emulated:910B bf16",
        "npu-emulated:310P fp16")
# quality.py's variant names -> rows (the others keep their names). The same kernels on both sides: the 7B-width
# "MLAS where faster" rows took MLAS on every shape on the AMD EPYC; the tiny defaults' weights take it only when
# forced, which the quality variants "... mlas" do.
QUALITY_ROWS = {"torch fp32": "ours fp32", "torch bf16": "ours bf16", "torch bf16 int8": "ours int8 (bf16)",
                "torch bf16 int8 mlas": "ours int8 (bf16, MLAS where faster)",
                "torch bf16 int8 fbgemm": "ours int8 (FBGEMM, int8 activations)", "torch bf16 int4": "ours int4 (bf16)",
                "torch bf16 int4 symmetric mlas": "ours int4 symmetric (bf16, MLAS where faster)",
                "ort fp32": "ORT fp32", "ort int8": "ORT int8 (dynamic)"}
# why a cell is empty when no file covers the variant for that column
NO_LATENCY = {
    "npu-emulated": "emulated NPU: its kernels ran on the CPU for accuracy only; no NPU latency exists (no NPU here)",
    "default": "no latency run in these files covers this variant",
}
NO_ACCURACY = {
    "transformers fp32": "transformers' Qwen2-VL has no LoRA-MoE adapters, so it cannot run the trained default: "
                         "a latency baseline only",
    "ours fp32 (oneDNN)": "benchmarks.quality evaluates fp32 in the layout moevl.load picks (row 'ours fp32'), not "
                          "with oneDNN forced",
}
DEFAULT_MODEL = "awaker-tiny"  # the trained default of the family the 7B-width latency runs measure
FILES = ("quant-cpu.json", "e2e-cpu.json", "ort-cpu.json", "quant-load-cpu.json", "serve-cpu.json", "quality-cpu.json")


class ReportError(Exception):
    """Bad input: one line for the user."""


@dataclass
class Cell:
    value: float | None
    note: str | None = None  # how the value was obtained (when not plain), or why it is missing
    upper_bound: bool = False  # a process that held more than this variant: the variant itself used at most this


@dataclass
class Source:
    tag: str
    file: str
    what: str
    command: str
    date: str
    cpu: str
    cpu_flags: list | None
    columns: tuple  # the columns this kind of run measures (its missing cells carry its reasons)
    cells: dict = field(default_factory=dict)  # row -> column -> Cell
    note: str | None = None


# ------------------------------------------------------------------------------------------------- reading files
def _date(payload_env: dict, path: Path) -> str:
    """When the run happened: its own record, else the commit that added the file, else the file's mtime."""
    if payload_env.get("date"):
        return payload_env["date"] + " (recorded by the run)"
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", path.name], cwd=path.parent,
                               capture_output=True, text=True, timeout=10)
        log = subprocess.run(["git", "log", "-1", "--format=%cI", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, timeout=10)
        if dirty.returncode == 0 and not dirty.stdout.strip() and log.returncode == 0 and log.stdout.strip():
            return log.stdout.strip() + " (committed; the run itself did not record a date)"
    except (OSError, subprocess.SubprocessError):
        pass
    mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return mtime.isoformat(timespec="seconds") + " (file written; the run itself did not record a date)"


def _env_cpu(env: dict) -> tuple[str, list | None]:
    return env.get("cpu") or (env.get("device") or {}).get("chip") or "not recorded", env.get("cpu_flags")


def _derived_b1(decode_ms: float) -> Cell:
    return Cell(1000.0 / decode_ms, "derived: 1000 / decode ms/token of the same run (batch 1)")


def read_quant(payload: dict, path: Path) -> Source:
    c, env = payload.get("config", {}), payload.get("environment", {})
    src = Source("Q", path.name, f"benchmarks.quant: Awaker at Qwen2-VL-7B width, {c.get('layers')} decoder layers, "
                 f"adapters r={c.get('rank')}, random weights, {c.get('prompt_tokens')} prompt tokens (64 image), "
                 f"{c.get('new_tokens')} greedy tokens, medians of {c.get('rounds')} rounds; in one process, each "
                 "variant timed in turn with the baseline and ours fp32 in the same rounds",
                 env.get("command", "not recorded"), _date(env, path),
                 payload.get("cpu") or _env_cpu(env)[0], payload.get("cpu_flags", env.get("cpu_flags")), LATENCY)
    peak = payload.get("process_peak_rss_bytes")
    load = payload.get("load_rss_check") or {}
    for r in payload.get("rows", []):
        b8 = r.get("tokens_per_s_batch8")
        no_b8 = ("not measured: that run had --batch8-tokens 0" if c.get("batch8_tokens") == 0 else
                 "benchmarks.quant runs batch 8 for the kit's variants only" if r["variant"] == "transformers fp32"
                 else "not recorded by that run")
        cells = {"decode_ms_per_token": Cell(r.get("decode_ms_per_token")), "ttft_ms": Cell(r.get("ttft_ms")),
                 "tokens_per_s_batch1": Cell(r.get("tokens_per_s_batch1")),
                 "tokens_per_s_batch8": Cell(b8) if b8 else Cell(None, no_b8),
                 "weight_bytes": Cell(r.get("weight_bytes_per_step")),
                 "fraction_of_read_bandwidth": Cell(r.get("fraction_of_read_bandwidth")),
                 "rss_bytes": Cell(peak, "peak RSS of the whole benchmarks.quant process, which held every variant "
                                         "at once: an upper bound for one", upper_bound=True) if peak else
                 Cell(None, "not recorded by that run")}
        if r.get("rss_after_build_bytes"):
            cells["rss_bytes"] = Cell(r["rss_after_build_bytes"], "RSS of the benchmarks.quant process holding ours "
                                      "fp32, the transformers baseline (sharing its base tensors) and this variant: "
                                      "an upper bound for this variant alone", upper_bound=True)
        if r["variant"].startswith("ours int4") and load.get("peak_rss_after_load"):
            cells["rss_bytes"] = Cell(load["peak_rss_after_load"], "peak RSS of a fresh process loading the saved "
                                      "int4 model (benchmarks.quant's load check)")
        src.cells[r["variant"]] = cells
    return src


def read_e2e(payload: dict, path: Path) -> Source:
    c, env = payload.get("config", {}), payload.get("environment", {})
    cpu, flags = _env_cpu(env)
    src = Source("E", path.name, f"benchmarks.e2e: Awaker at Qwen2-VL-7B width, {c.get('layers')} decoder layers, "
                 f"adapters r={c.get('rank')}, {c.get('dtype', 'fp32')}, random weights, {c.get('prompt_tokens')} "
                 f"prompt tokens (64 image), {c.get('new_tokens')} greedy tokens, medians of {c.get('rounds')} "
                 "alternating rounds; ours in the CPU layouts moevl.load picks", env.get("command", "not recorded"),
                 _date(env, path), cpu, flags, LATENCY)
    peak = payload.get("process_peak_rss_bytes")
    for key, row in (("baseline", "transformers fp32"), ("ours", "ours fp32")):
        m = (payload.get("median") or {}).get(key)
        if not m:
            continue
        src.cells[row] = {
            "decode_ms_per_token": Cell(m.get("decode_ms_per_token")), "ttft_ms": Cell(m.get("ttft_ms")),
            "tokens_per_s_batch1": _derived_b1(m["decode_ms_per_token"]),
            "tokens_per_s_batch8": Cell(None, "benchmarks.e2e measures batch 1 only"),
            "weight_bytes": Cell(m.get("weight_bytes_per_step")),
            "fraction_of_read_bandwidth": Cell(m.get("fraction_of_read_bandwidth")),
            "rss_bytes": Cell(peak, "peak RSS of the benchmarks.e2e process, which held ours and transformers' model "
                                    "(sharing base tensors): an upper bound for one", upper_bound=True) if peak else
            Cell(None, "not recorded by that run")}
    return src


def read_ort(payload: dict, path: Path) -> Source:
    meta = payload.get("meta", {})
    runs = [r for r in payload.get("results", []) if r.get("config") == "7b-width"]
    r = runs[0] if runs else {}
    src = Source("O", path.name, f"benchmarks.ort, config 7b-width: hidden {r.get('hidden')}, {r.get('layers')} "
                 f"decoder layers, random weights, text-only prompt of {r.get('prompt_tokens')} tokens, "
                 f"{r.get('new_tokens')} greedy tokens, medians of {r.get('repeats')} repeats; PyTorch fp32 and ORT "
                 "fp32 " + ("in turn, repeat by repeat" if r.get("fp32_side_by_side") else "ran one after the other")
                 + ("; ORT int8 in turn with ours int8, repeat by repeat" if "torch_int8"
                                                   in r else "") if runs else "benchmarks.ort: no 7b-width configuration in this file (tiny only: "
                 "not used)", meta.get("command", "not recorded"), _date(meta, path), meta.get("cpu", "not recorded"),
                 meta.get("cpu_flags"), LATENCY)
    why = "not recorded by benchmarks.ort"
    for key, row in (("torch", "ours fp32"), ("ort_fp32", "ORT fp32"), ("ort_int8", "ORT int8 (dynamic)")):
        m = r.get(key)
        if not m:
            continue
        src.cells[row] = {"decode_ms_per_token": Cell(m.get("decode_ms_per_token")), "ttft_ms": Cell(m.get("ttft_ms")),
                          "tokens_per_s_batch1": _derived_b1(m["decode_ms_per_token"]),
                          "tokens_per_s_batch8": Cell(None, "benchmarks.ort measures batch 1 only"),
                          "weight_bytes": Cell(None, why), "fraction_of_read_bandwidth": Cell(None, why),
                          "rss_bytes": Cell(None, why)}
    return src


def read_quant_load(payload: dict, path: Path) -> Source:
    env, c = payload.get("environment", {}), payload.get("config", {})
    src = Source("L", path.name, f"benchmarks.quant --only-load-check: the saved int4 model at 7B width "
                 f"({c.get('layers')} layers, {c.get('dtype')} rest) loaded in a fresh process",
                 env.get("command", "not recorded"), _date(env, path), payload.get("cpu") or _env_cpu(env)[0],
                 payload.get("cpu_flags", env.get("cpu_flags")), ("rss_bytes",))
    peak = (payload.get("load_rss_check") or {}).get("peak_rss_after_load")
    if peak:
        src.cells["ours int4 (bf16)"] = {"rss_bytes": Cell(peak, "peak RSS of a fresh process loading the saved int4 "
                                                                 "model")}
    return src


def read_serve(payload: dict, path: Path) -> Source | None:
    """The 7B-width server's RSS: a process that held only the fp32 model (in the layouts moevl.load picks)."""
    env = payload.get("environment", {})
    found = [(name, c) for name, c in (payload.get("configs") or {}).items()
             if "7B width" in name or "--config 7b" in c.get("command", "")]
    if not found:
        return None
    name, c = found[0]
    cpu, flags = _env_cpu(env)
    if payload.get("cpu"):  # serve writes "<model name>, <n> cores, flags a b c"
        cpu, _, listed = payload["cpu"].partition(", flags ")
        cpu = cpu.split(", ")[0]
        flags = env.get("cpu_flags") or (listed.split() if listed else None)
    src = Source("S", path.name, f"benchmarks.serve ({name}): the `moevl serve` process's RSS",
                 c.get("command") or env.get("command", "not recorded"), _date(env, path), cpu, flags,
                 ("rss_bytes",))
    rss = [x for x in (c.get("server_rss_mb_before"), c.get("server_rss_mb_after")) if x is not None]
    if rss:
        src.cells["ours fp32"] = {"rss_bytes": Cell(max(rss) * 2**20, "RSS of the server process holding the "
                                                    "7B-width fp32 model, the larger of before/after the load test")}
    return src


def pick_model(payload: dict, model: str | None) -> str:
    models = payload.get("models") or {}
    if model is not None:
        if model not in models:
            raise ReportError(f"--model {model!r} is not in quality-cpu.json (it has: {', '.join(models) or 'none'}); "
                              "pass one of those")
        return model
    # the latency runs measure Awaker at 7B width: prefer the Awaker trained default's accuracy
    return DEFAULT_MODEL if DEFAULT_MODEL in models else next(iter(models), None)


def read_quality(payload: dict, path: Path, model: str | None) -> Source:
    env = payload.get("environment", {})
    cpu, flags = _env_cpu(env)
    src = Source("A", path.name, f"benchmarks.quality: `moevl eval` of {model} on the {payload.get('data')} "
                 f"(n={payload.get('n')}, {payload.get('n_per_pair')}), greedy; accuracy = overall exact match",
                 payload.get("command") or env.get("command", "not recorded"), _date(env, path), cpu, flags,
                 ("accuracy",), note=payload.get("note"))
    m = (payload.get("models") or {}).get(model, {})
    for variant, r in (m.get("variants") or {}).items():
        src.cells[QUALITY_ROWS.get(variant, variant)] = {"accuracy": Cell(r.get("overall"))}
    for variant, why in (m.get("not_run") or {}).items():
        row = QUALITY_ROWS.get(variant, variant)
        if row in src.cells:
            continue
        if row in ROWS:  # a known variant that failed or could not run here
            src.cells[row] = {"accuracy": Cell(None, f"not run: {why}")}
    return src


def read_sources(results_dir: Path, model: str | None) -> tuple[list[Source], str | None]:
    if not results_dir.is_dir():
        raise ReportError(f"--results-dir {results_dir}: no such folder; pass the folder holding the benchmarks' "
                          "*-cpu.json files")
    payloads = {}
    for name in FILES:
        path = results_dir / name
        if path.is_file():
            try:
                payloads[name] = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ReportError(f"{path}: not readable JSON ({e}); re-run its benchmark or remove the file") from e
    if not payloads:
        raise ReportError(f"--results-dir {results_dir}: none of {', '.join(FILES)} is there; run a benchmark "
                          "first (moevl bench quant | e2e | ort | quality)")
    sources, chosen = [], None
    try:
        for name, reader in (("quant-cpu.json", read_quant), ("e2e-cpu.json", read_e2e), ("ort-cpu.json", read_ort),
                             ("quant-load-cpu.json", read_quant_load), ("serve-cpu.json", read_serve)):
            if name in payloads:
                src = reader(payloads[name], results_dir / name)
                if src is not None:
                    sources.append(src)
        if "quality-cpu.json" in payloads:
            chosen = pick_model(payloads["quality-cpu.json"], model)
            sources.append(read_quality(payloads["quality-cpu.json"], results_dir / "quality-cpu.json", chosen))
        elif model is not None:
            raise ReportError(f"--model {model!r}: there is no quality-cpu.json in {results_dir}; run "
                              "`moevl bench quality` first")
    except (KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
        raise ReportError(f"a results file in {results_dir} has an unexpected layout ({type(e).__name__}: {e}); "
                          "re-run its benchmark with this version of moevl") from e
    return sources, chosen


# ------------------------------------------------------------------------------------------------ the table
def build_table(sources: list[Source], model: str | None) -> list[dict]:
    """One row per variant: per column the value from the first source that has one (exact figures before upper
    bounds, then the order of FILES), else None with every reason a source gave."""
    names = list(ROWS) + [v for s in sources for v in s.cells if v not in ROWS]
    names = [n for n in dict.fromkeys(names) if any(n in s.cells for s in sources)]
    accuracy_source = next((s for s in sources if s.tag == "A"), None)
    rows = []
    for name in names:
        cells = {}
        for col in COLUMNS:
            found = [(s, s.cells[name][col]) for s in sources
                     if col in s.cells.get(name, {}) and s.cells[name][col].value is not None]
            if found:
                s, cell = min(found, key=lambda sc: sc[1].upper_bound)  # stable: FILES order among equals
                cells[col] = {"value": cell.value, "source": s.tag, "file": s.file, "note": cell.note,
                              "upper_bound": cell.upper_bound}
                continue
            why = [f"{s.file}: {s.cells[name][col].note}" for s in sources
                   if col in s.cells.get(name, {}) and s.cells[name][col].note]
            if not why and col == "accuracy":
                if accuracy_source is None:
                    why = ["no quality-cpu.json: run `moevl bench quality`"]
                elif name in NO_ACCURACY:
                    why = [NO_ACCURACY[name]]
                else:
                    why = [f"quality-cpu.json has no such variant for {model}"]
            elif not why:
                covering = [s.file for s in sources if name in s.cells and col in s.columns]
                if covering:
                    why = [f"{', '.join(covering)}: not recorded for this variant"]
                else:
                    why = [NO_LATENCY["npu-emulated" if name.startswith("npu-emulated") else "default"]]
            cells[col] = {"value": None, "why": why}
        rows.append({"variant": name, "cells": cells})
    return rows


def _fmt(col: str, v: float) -> str:
    return {"decode_ms_per_token": f"{v:.1f}", "ttft_ms": f"{v:.0f}", "tokens_per_s_batch1": f"{v:.2f}",
            "tokens_per_s_batch8": f"{v:.2f}", "weight_bytes": f"{v / 1e6:.0f}",
            "fraction_of_read_bandwidth": f"{100 * v:.0f}%", "rss_bytes": f"{v / 2**30:.2f}",
            "accuracy": f"{100 * v:.1f}"}[col]


def render(rows: list[dict], sources: list[Source], model: str | None, env: dict, command: str,
           plot_name: str | None) -> str:
    notes: list[str] = []

    def mark(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"({notes.index(text) + 1})"

    lines = ["# Latency and accuracy per backend and precision (CPU summary)", "",
             f"Command: `{command}`  ",
             f"Written {env['date']} on {env['cpu']} (flags: {', '.join(env['cpu_flags']) or 'none of interest'}); "
             f"torch {env['torch']}, {env['threads']} threads. This command measures nothing: it collects the "
             "results files listed under Sources; each cell says which one ([tag]).", ""]
    if model is not None:
        lines += [f"**Latency and accuracy come from different models.** Decode, TTFT, tokens/s, weight bytes, "
                  "bandwidth and RSS come from runs at Qwen2-VL-7B width (a few decoder layers, random weights); "
                  f"accuracy is the overall exact match of the small trained default `{model}` (`moevl eval` through "
                  "benchmarks.quality). A row runs the same precision and kernels in both, at different model sizes: "
                  "read its accuracy as what that precision/backend costs, not as a 7B model's accuracy.", ""]
    acc = next((s for s in sources if s.tag == "A"), None)
    if acc is not None and acc.note:
        lines += [f"**quality-cpu.json says: {acc.note}**", ""]
    cpus = {}
    for s in sources:
        cpus.setdefault(s.cpu, []).append(f"[{s.tag}]")
    if len(cpus) > 1:
        lines += ["**The sources ran on different CPUs** (" + "; ".join(f"{cpu}: {' '.join(tags)}" for cpu, tags
                                                                     in cpus.items()) +
                  "): compare latencies within one source; ratios across sources mix machines.", ""]
    header = "| variant | " + " | ".join(COLUMNS.values()) + " |"
    if model is not None:
        header = header.replace("(overall exact)", f"(overall exact, {model})")
    lines += [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = []
        for col in COLUMNS:
            c = r["cells"][col]
            if c["value"] is None:
                cells.append("- " + " ".join(mark(w) for w in c["why"]))
                continue
            text = ("<= " if c["upper_bound"] else "") + _fmt(col, c["value"]) + f" [{c['source']}]"
            cells.append(text + (" " + mark(c["note"]) if c["note"] else ""))
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    if not rows:
        lines += ["", "No variant: none of these files has a 7B-width latency or an accuracy row."]
    lines += ["", "Sources:", ""]
    for s in sources:
        flags = ", ".join(s.cpu_flags) if s.cpu_flags else "not recorded by that run"
        lines.append(f"- [{s.tag}] `{s.file}`: {s.what}. Command `{s.command}`; date {s.date}; CPU {s.cpu} "
                     f"(flags: {flags}).")
    if notes:
        lines += ["", "Notes:", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)]
    lines += ["", "Weight MB/step: the bytes of weights one decode step reads (base linears and lm_head in the form "
              "they are held, plus the selected LoRA for ours). % of read bw: those bytes per decode step over the "
              "read bandwidth (a sum over 1 GiB) measured in the same run. No NPU or GPU figure: npu-emulated rows ran "
              "the NPU kernel sets on the CPU (accuracy only); nothing here ran on an NPU or a GPU.",
              f"Plot: `{plot_name}` (decode ms/token vs accuracy, one point per variant that has both)." if plot_name
              else "No plot: no variant has both a decode latency and an accuracy (or matplotlib is not installed: "
                   "pip install 'moevl-ascend[bench]').", ""]
    return "\n".join(lines)


def plot_points(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(variant, decode ms/token, accuracy) of the variants that have both: the others are not plotted."""
    return [(r["variant"], r["cells"]["decode_ms_per_token"]["value"], r["cells"]["accuracy"]["value"])
            for r in rows if r["cells"]["decode_ms_per_token"]["value"] is not None
            and r["cells"]["accuracy"]["value"] is not None]


def plot_png(rows: list[dict], sources: list[Source], model: str | None) -> bytes | None:
    """decode ms/token vs accuracy, one labelled point per variant with both; None when none has both."""
    points = plot_points(rows)
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_tag = {s.tag: s for s in sources}
    tags = {r["variant"]: r["cells"]["decode_ms_per_token"].get("source") for r in rows}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, x, y in points:
        ax.scatter(x, 100 * y, s=40)
        ax.annotate(f"{name} [{tags[name]}]", (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    used = dict.fromkeys(tags[name] for name, _, _ in points)
    cpu = "; ".join(f"[{t}] {by_tag[t].file}: {by_tag[t].cpu}" for t in used)
    ax.set_xlabel("decode ms/token at 7B width, batch 1 (lower is better)")
    ax.set_ylabel(f"accuracy %, overall exact\n(trained default {model}: a different, small model)")
    ax.set_title(f"Latency vs accuracy per variant\ndecode from {cpu}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def report(results_dir: Path, out: Path, model: str | None, command: str) -> tuple[Path, Path, Path | None]:
    """Read the results in ``results_dir``, write summary-cpu.{json,md,png} to ``out``; -> the paths written."""
    from moevl.ascend.device import resolve_device
    from moevl.benchmarks.common import environment

    sources, model = read_sources(results_dir, model)
    rows = build_table(sources, model)
    env = environment(resolve_device("cpu", "fp32"))
    png = plot_png(rows, sources, model)
    plot_name = "summary-cpu.png" if png is not None else None
    payload = {"benchmark": "summary", "command": command, "environment": env, "accuracy_model": model,
               "models_note": "latency columns come from runs at Qwen2-VL-7B width (random weights); accuracy from "
                              f"the small trained default {model}: same precision/kernels, different model sizes",
               "columns": COLUMNS, "rows": rows,
               "sources": {s.tag: {"file": s.file, "what": s.what, "command": s.command, "date": s.date, "cpu": s.cpu,
                                   "cpu_flags": s.cpu_flags, "note": s.note} for s in sources},
               "plot": plot_name, "plotted": [name for name, _, _ in plot_points(rows)] if plot_name else []}
    markdown = render(rows, sources, model, env, command, plot_name)
    out.mkdir(parents=True, exist_ok=True)
    j, m, p = out / "summary-cpu.json", out / "summary-cpu.md", out / "summary-cpu.png"
    j.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    m.write_text(markdown)
    if png is not None:
        p.write_bytes(png)
    elif p.exists():
        p.unlink()  # a plot from older results would contradict the table
    return j, m, p if png is not None else None


def main(argv=None) -> int:
    from moevl.benchmarks.common import RESULTS

    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", default=str(RESULTS), help="folder with the benchmarks' *-cpu.json files")
    ap.add_argument("--out", default=None, help="folder for summary-cpu.{json,md,png} (default: --results-dir)")
    ap.add_argument("--model", default=None, help=f"which model's accuracy from quality-cpu.json (default: "
                                                  f"{DEFAULT_MODEL} when there, since the latency runs are Awaker's)")
    args = ap.parse_args(argv)
    command = " ".join(["python -m moevl.benchmarks.report"] + list(sys.argv[1:] if argv is None else argv))
    results_dir = Path(args.results_dir)
    try:
        j, m, p = report(results_dir, Path(args.out) if args.out else results_dir, args.model, command)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(m.read_text())
    print(f"wrote {j}, {m}" + (f" and {p}" if p else " (no PNG: see the last line above)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
