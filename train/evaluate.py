"""Quality of a session on a data set: per-task, per-language exact-match accuracy, caption item scores, and which
expert each router picks per task, with the normalised mutual information between task and expert.

    from moevl.train.evaluate import evaluate, write_report
    report = evaluate(moevl.load("awaker-tiny"), "val/shapes.json", batch_size=8)
    write_report(report, "out/eval")          # eval.json + eval.md

Works with any session (``moevl.load`` with backend torch, ort or om): questions go through ``session.ask`` in
batches with greedy decoding; routing comes from ``session.routing_decisions()`` after each batch (Awaker: one
expert per request and router; MoE-LLaVA: per request the token-slots each expert received, prompt and generated
tokens).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from moevl.model.checkpoint import OutputKind, output_folder
from moevl.train.data import LANGS, TASKS, DataError, answer_text, load_records, question_text
from moevl.train.score import score

REPORT_JSON = "eval.json"
REPORT_MD = "eval.md"
FORMAT = "moevl-eval-v1"
EVAL_REPORT = OutputKind("a moevl eval report", REPORT_JSON, FORMAT)


# --------------------------------------------------------------------------- mutual information
def normalised_mutual_information(joint) -> float:
    """NMI of a joint count table [labels, clusters]: I(X;Y) / ((H(X) + H(Y)) / 2), scikit-learn's default
    ("arithmetic") normalisation. Both entropies 0 (one label, one cluster): 1.0. Natural logs (NMI has no unit)."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return float("nan")
    pxy = joint / total
    px, py = pxy.sum(1), pxy.sum(0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    hx, hy = entropy(px), entropy(py)
    if hx == 0 and hy == 0:
        return 1.0
    nz = pxy > 0
    mi = float((pxy[nz] * np.log(pxy[nz] / np.outer(px, py)[nz])).sum())
    return max(0.0, mi) / ((hx + hy) / 2)


# --------------------------------------------------------------------------- evaluation
def _routing_rows(decisions, batch: int) -> dict[str, np.ndarray]:
    """routing_decisions() of one batch -> {router name: [batch, experts] counts} (a one-hot row per request for a
    per-request router; token-slot counts where the decision has ``counts``)."""
    rows = {}
    for d in decisions:
        d = d.to_dict() if hasattr(d, "to_dict") else d
        name = f"L{d['layer']}.{d['router']}"
        if d.get("counts") is not None:
            rows[name] = np.asarray(d["counts"], dtype=np.int64).reshape(batch, -1)
        else:
            experts = [int(e) for e in d["expert"]]
            onehot = np.zeros((batch, max(experts) + 1), dtype=np.int64)
            onehot[np.arange(batch), experts] = 1
            rows[name] = onehot
    return rows


def _as_records(records_or_json) -> tuple[list[dict], str | None]:
    if isinstance(records_or_json, (str, Path)):
        return load_records(records_or_json), str(records_or_json)
    return list(records_or_json), None


def answer_budget(session, records: list[dict], margin: int = 8, fallback: int = 64) -> int:
    """Enough new tokens for the longest reference answer in the session's tokenizer, plus ``margin``."""
    tok = getattr(session, "tokenizer", None)
    try:
        return max(len(tok.encode(answer_text(r), add_special_tokens=False)) for r in records) + margin
    except Exception:  # no tokenizer (or not a transformers one): a budget that fits the data set's captions
        return fallback


def evaluate(session, records_or_json, batch_size: int = 8, max_new_tokens: int | None = None,
             limit: int | None = None, log=None, meta: dict | None = None) -> dict:
    """Answer every record's first question greedily and score it. -> the report (a JSON-able dict; see
    ``render_markdown`` for what it holds; "predictions" has every answer, its scores and the expert each router
    picked for it, the busiest one for a token-level router). ``records_or_json``: a JSON path or records from
    ``load_records`` (each needs "task", "lang" and "image_path"); ``limit``: the first N records only;
    ``max_new_tokens``: default the longest reference answer in tokens + 8; ``meta``: extra fields
    for the report (model, backend, command...)."""
    records, source = _as_records(records_or_json)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be a positive number of records, not {limit}")
        records = records[:limit]
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {batch_size}")
    if max_new_tokens is None:
        max_new_tokens = answer_budget(session, records)
    for rec in records:
        if rec.get("task") not in TASKS or rec.get("lang") not in LANGS:
            raise DataError(f"{source or 'records'}: record {rec.get('id')} has no \"task\" ({', '.join(TASKS)}) "
                            f"and \"lang\" ({', '.join(LANGS)}): evaluate data written by `moevl data shapes`")
    predictions, routing = [], {}
    t0 = time.perf_counter()
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        questions = [question_text(r) for r in chunk]
        images = [[r["image_path"]] if r.get("image_path") else [] for r in chunk]
        res = session.ask(questions, images=images, max_new_tokens=max_new_tokens, temperature=0.0)
        rows = _routing_rows(session.routing_decisions(), len(chunk))
        for name, table in rows.items():
            routing.setdefault(name, []).append(table)
        for b, (r, text) in enumerate(zip(chunk, res.texts)):
            s = score(r["task"], text, answer_text(r), r["lang"])
            predictions.append({"id": r["id"], "task": r["task"], "lang": r["lang"], "prediction": text,
                                "reference": answer_text(r), **s,
                                "experts": {name: int(table[b].argmax()) for name, table in rows.items()}})
        if log is not None:
            log(f"{len(predictions)}/{len(records)} answered")
    seconds = time.perf_counter() - t0
    report = {"format": FORMAT, "data": source, "n": len(records), "batch_size": batch_size,
              "max_new_tokens": max_new_tokens, "decoding": "greedy", "family": getattr(session, "family", None),
              "dtype": getattr(session, "dtype_name", None), "device": _describe(session),
              "seconds": round(seconds, 3)} | dict(meta or {})
    report |= summarise(predictions)
    tasks = [p["task"] for p in predictions]
    report["routing"] = routing_summary({k: _stack(v) for k, v in routing.items()}, tasks,
                                        unit="token-slot" if _token_level(session) else "request")
    report["predictions"] = predictions
    return report


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    """Batches' [batch, experts] counts -> one table (a batch where the last experts were idle is narrower)."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows])


def _describe(session):
    try:
        return session.describe()
    except Exception:  # a report is still useful without the device line
        return None


def _token_level(session) -> bool:
    decisions = session.routing_decisions()
    return bool(decisions) and (decisions[0].to_dict() if hasattr(decisions[0], "to_dict") else decisions[0]).get(
        "counts") is not None


def _rate(hits: int, n: int) -> float | None:
    return round(hits / n, 6) if n else None


def summarise(predictions: list[dict]) -> dict:
    """Per-task, per-language exact-match accuracy and caption item scores from scored predictions."""
    accuracy = {}
    for task in TASKS:
        row = {}
        for lang in LANGS + ("all",):
            sel = [p for p in predictions if p["task"] == task and lang in (p["lang"], "all")]
            if sel:
                hits = sum(p["exact"] for p in sel)
                row[lang] = {"n": len(sel), "correct": hits, "accuracy": _rate(hits, len(sel))}
        if row:
            accuracy[task] = row
    hits = sum(p["exact"] for p in predictions)
    caption = {}
    for lang in LANGS + ("all",):
        sel = [p for p in predictions if p["task"] == "caption" and lang in (p["lang"], "all")]
        if sel:
            caption[lang] = {
                "n": len(sel),
                "exact": _rate(sum(p["exact"] for p in sel), len(sel)),
                "items_equal": _rate(sum(p["items"]["equal"] for p in sel), len(sel)),
                "count_ok": _rate(sum(p["count_ok"] for p in sel), len(sel)),
                "precision": round(float(np.mean([p["items"]["precision"] for p in sel])), 6),
                "recall": round(float(np.mean([p["items"]["recall"] for p in sel])), 6),
                "f1": round(float(np.mean([p["items"]["f1"] for p in sel])), 6),
            }
    return {"accuracy": accuracy, "overall": {"n": len(predictions), "correct": hits,
                                               "accuracy": _rate(hits, len(predictions))},
            "caption": caption}


def routing_summary(rows: dict[str, np.ndarray], tasks: list[str], unit: str = "request") -> dict:
    """{router: [requests, experts] counts} and each request's task -> per router: the counts per task, the expert
    picked most per task and its share, and the NMI between task and expert (over ``unit``s)."""
    present = [t for t in TASKS if t in tasks]
    task_idx = np.array([present.index(t) for t in tasks])
    routers = {}
    # every router's table as wide as the widest (the counts only reach the highest expert a router picked, so a
    # router that sent everything to expert 0 would otherwise have one column)
    width = max((c.shape[1] for c in rows.values()), default=0)
    for name, counts in rows.items():
        joint = np.zeros((len(present), width), dtype=np.int64)
        np.add.at(joint[:, :counts.shape[1]], task_idx, counts)
        top = {}
        for i, t in enumerate(present):
            total = joint[i].sum()
            e = int(joint[i].argmax())
            top[t] = {"expert": e, "share": _rate(int(joint[i, e]), int(total))}
        routers[name] = {"counts": {t: joint[i].tolist() for i, t in enumerate(present)}, "top": top,
                         "nmi": round(normalised_mutual_information(joint), 6)}
    nmis = [r["nmi"] for r in routers.values()]
    return {"unit": unit, "routers": routers, "mean_nmi": round(float(np.mean(nmis)), 6) if nmis else None}


# --------------------------------------------------------------------------- writing
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(report: dict, title: str = "Evaluation") -> str:
    lines = [f"# {title}", ""]
    facts = [f"{k}: {report[k]}" for k in ("model", "backend", "family", "dtype", "data", "n", "max_new_tokens")
             if report.get(k) is not None]
    if report.get("device"):
        facts.append(f"device: {report['device'].get('device')} ({report['device'].get('chip')})")
    lines += ["; ".join(facts), "", "Exact-match accuracy (%), greedy decoding:", "",
              "| task | " + " | ".join(LANGS) + " | all | n |", "|---" * (len(LANGS) + 3) + "|"]
    for task, row in report["accuracy"].items():
        cells = [_pct(row.get(l, {}).get("accuracy")) for l in LANGS + ("all",)]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {row['all']['n']} |")
    o = report["overall"]
    lines.append(f"| **all** | " + " | ".join(["" for _ in LANGS]) + f" | {_pct(o['accuracy'])} | {o['n']} |")
    if report.get("caption"):
        lines += ["", "Captions (%): exact, item set equal, count right, item precision / recall / F1:", "",
                  "| lang | exact | items equal | count | precision | recall | F1 |", "|---" * 7 + "|"]
        for lang, c in report["caption"].items():
            lines.append(f"| {lang} | {_pct(c['exact'])} | {_pct(c['items_equal'])} | {_pct(c['count_ok'])} | "
                         f"{_pct(c['precision'])} | {_pct(c['recall'])} | {_pct(c['f1'])} |")
    routing = report.get("routing") or {}
    if routing.get("routers"):
        tasks = list(report["accuracy"])
        lines += ["", f"Routing: the expert each router picked most per task (share of {routing['unit']}s), and the "
                  f"normalised mutual information between task and expert (mean {routing['mean_nmi']:.3f}):", "",
                  "| router | " + " | ".join(tasks) + " | NMI |", "|---" * (len(tasks) + 2) + "|"]
        for name, r in routing["routers"].items():
            cells = [f"e{r['top'][t]['expert']} ({_pct(r['top'][t]['share'])})" if t in r["top"] else "-"
                     for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['nmi']:.3f} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir, force: bool = False, title: str = "Evaluation") -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir`` atomically (``force`` replaces an earlier report)."""
    out = Path(out_dir)
    with output_folder(out, EVAL_REPORT, force) as tmp:
        (tmp / REPORT_JSON).write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (tmp / REPORT_MD).write_text(render_markdown(report, title), encoding="utf-8")
    return out / REPORT_JSON, out / REPORT_MD
