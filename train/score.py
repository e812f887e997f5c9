"""Scoring answers of the shapes data set (issue 12, section 1): exact match after stripping whitespace and a final
period / 句号 and lower-casing; captions also as the set of (colour, shape, position) items plus the count."""
from __future__ import annotations

import re

from moevl.train.data import COLORS, POSITIONS, SHAPES, ZH_COLORS, ZH_POSITIONS, ZH_SHAPES


def normalise(text: str) -> str:
    """Strip surrounding whitespace and one final "." or "。", then lower-case."""
    text = text.strip()
    if text.endswith((".", "。")):
        text = text[:-1].rstrip()
    return text.lower()


_EN_HEAD = re.compile(r"(\d+) shapes?\s*[:：]\s*(.*)", re.S)
_EN_ITEM = re.compile(rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at ({'|'.join(POSITIONS)})")
_ZH_HEAD = re.compile(r"(\d+)\s*个图形\s*[：:]\s*(.*)", re.S)
_ZH_ITEM = re.compile("({})({})({})".format(
    "|".join(sorted(ZH_POSITIONS.values(), key=len, reverse=True)),  # 左上 before 左
    "|".join(ZH_COLORS.values()), "|".join(ZH_SHAPES.values())))
_FROM_ZH = {**{v: k for k, v in ZH_COLORS.items()}, **{v: k for k, v in ZH_SHAPES.items()},
            **{v: k for k, v in ZH_POSITIONS.items()}}


def parse_caption(text: str, lang: str) -> tuple[int | None, list]:
    """A caption -> (count or None, items). Items are (colour, shape, position) in English names, or None for a
    part that is not one (it still counts as a predicted item, a wrong one)."""
    text = normalise(text)
    head = (_EN_HEAD if lang == "en" else _ZH_HEAD).fullmatch(text)
    if head is None:
        return None, []
    count, body = int(head[1]), head[2].strip()
    if not body:
        return count, []
    items = []
    for part in re.split(r"\s*[,，]\s*", body):
        if lang == "en":
            m = _EN_ITEM.fullmatch(part.strip())
            items.append((m[1], m[2], m[3]) if m else None)
        else:
            m = _ZH_ITEM.fullmatch(part.strip())
            items.append(tuple(_FROM_ZH[g] for g in (m[2], m[3], m[1])) if m else None)
    return count, items


def score(task: str, prediction: str, reference: str, lang: str) -> dict:
    """-> {"exact": bool}; captions add "count_ok" and "items" {"precision", "recall", "f1", "equal"} over the
    sets of (colour, shape, position) items (an unparseable part counts as a wrong predicted item)."""
    out = {"exact": normalise(prediction) == normalise(reference)}
    if task != "caption":
        return out
    ref_count, ref_items = parse_caption(reference, lang)
    if ref_count is None or None in ref_items:
        raise ValueError(f"the reference {reference!r} is not a {lang} caption of the shapes data set")
    count, items = parse_caption(prediction, lang)
    ref = set(ref_items)
    good = {i for i in items if i is not None}
    hits = len(good & ref)
    n_pred = len(good) + items.count(None)
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / len(ref) if ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out["count_ok"] = count == ref_count
    out["items"] = {"precision": precision, "recall": recall, "f1": f1,
                    "equal": good == ref and items.count(None) == 0}
    return out
