"""The synthetic multi-task shapes data set: images + one JSON file in the LLaVA conversation format.

The specification (issue 12, section 1), which ``sample_scene``, ``render``, ``question`` and the tests follow:
- Canvas: width and height each 112 to 224 px; background white or one light solid colour (each channel 200-255).
- 1 to 4 shapes; shape in {circle, square, triangle}; colour in ``COLORS`` (RGB), each channel jittered by up to
  +-25; size (bounding-box side) 18-35% of the shorter canvas side. The canvas is a 3x3 grid; each shape's centre
  (the centre of its bounding box) lies in a distinct cell, which names its position (``POSITIONS``). Shapes do not
  overlap (here: their bounding boxes do not touch). No two shapes share both colour and shape.
- Five tasks (``TASKS``), each in English and Chinese (``LANGS``): count, color (asked only when exactly one shape
  of that kind is in the image), shape (only when exactly one shape of that colour), position, caption (shapes in
  row-major order of their cells).

``make_shapes(out_dir, n, seed)`` writes ``out_dir/shapes.json`` (records ``{"id", "image", "conversations",
"task", "lang", "scene"}``, image paths relative to the JSON file) and ``out_dir/images/*.png``, deterministic from
the seed: record ``i`` (its task, language, scene and question) depends on ``(seed, i)`` only, so
``make_shapes(out, 100, seed)`` holds the first 100 records of ``make_shapes(out, 10000, seed)``. The validation
split of the built-in defaults is ``make_shapes(out, VALIDATION_N, VALIDATION_SEED)`` (1,000 questions per task and
language); training data must use other seeds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from moevl.model.checkpoint import OutputKind, check_output_folder, output_folder

TASKS = ("count", "color", "shape", "position", "caption")
LANGS = ("en", "zh")

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30),
          "purple": (140, 50, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
# the 3x3 grid's cells in row-major order (cell = 3 * row + column)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")

ZH_COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
ZH_POSITIONS = {"top left": "左上", "top": "上", "top right": "右上", "left": "左", "center": "中间", "right": "右",
                "bottom left": "左下", "bottom": "下", "bottom right": "右下"}

CANVAS = (112, 224)          # each side, inclusive
BACKGROUND = (200, 255)      # each channel of a light background, inclusive
MAX_SHAPES = 4
SIZE = (0.18, 0.35)          # bounding-box side / shorter canvas side
JITTER = 25                  # per channel, inclusive
WHITE_SHARE = 0.5            # share of white backgrounds

DATA_JSON = "shapes.json"
IMAGES = "images"
MARKER = "moevl_dataset.json"
FORMAT = "moevl-shapes-v1"
SHAPES_DATA = OutputKind("a moevl shapes data set", MARKER, FORMAT)

VALIDATION_SEED = 1_000_003
VALIDATION_N = 10_000


class DataError(ValueError):
    """A data file that is not in the expected format (one line naming the file and what is wrong)."""


# --------------------------------------------------------------------------- scenes
def cell_of(cx: float, cy: float, width: int, height: int) -> int:
    """The 3x3 grid cell (row-major) a point lies in."""
    col = min(int(3 * cx / width), 2)
    row = min(int(3 * cy / height), 2)
    return 3 * row + col


def _jittered(rgb, rng) -> list[int]:
    return [int(np.clip(c + rng.integers(-JITTER, JITTER + 1), 0, 255)) for c in rgb]


def _disjoint(a, b, gap: int = 1) -> bool:
    """Boxes [x0, y0, x1, y1) (x1/y1 exclusive) at least ``gap`` pixels apart on one axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(cell: int, size: int, width: int, height: int, boxes: list, rng, tries: int = 40):
    """A box of side ``size`` whose centre lies in ``cell``, inside the canvas, apart from ``boxes``; or None."""
    row, col = divmod(cell, 3)
    # the top-left corner x0 such that the centre x0 + size/2 lies in [col*W/3, (col+1)*W/3) and the box in [0, W]
    lo_x = max(0, math.ceil(col * width / 3 - size / 2))
    hi_x = min(width - size, math.ceil((col + 1) * width / 3 - size / 2) - 1)
    lo_y = max(0, math.ceil(row * height / 3 - size / 2))
    hi_y = min(height - size, math.ceil((row + 1) * height / 3 - size / 2) - 1)
    if lo_x > hi_x or lo_y > hi_y:
        return None
    for _ in range(tries):
        x0, y0 = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
        box = [x0, y0, x0 + size, y0 + size]
        if cell_of(x0 + size / 2, y0 + size / 2, width, height) == cell and all(_disjoint(box, b) for b in boxes):
            return box
    return None


def sample_scene(rng: np.random.Generator, num_shapes: int | None = None) -> dict:
    """A random scene following the specification. -> {"width", "height", "background": [r, g, b], "shapes":
    [{"shape", "color", "rgb", "box": [x0, y0, x1, y1) , "cell", "position"}, ...] in row-major cell order}."""
    while True:
        width, height = (int(rng.integers(CANVAS[0], CANVAS[1] + 1)) for _ in range(2))
        if rng.random() < WHITE_SHARE:
            background = [255, 255, 255]
        else:
            background = [int(c) for c in rng.integers(BACKGROUND[0], BACKGROUND[1] + 1, size=3)]
        n = int(rng.integers(1, MAX_SHAPES + 1)) if num_shapes is None else num_shapes
        kinds = [(c, s) for c in COLORS for s in SHAPES]
        chosen = rng.choice(len(kinds), size=n, replace=False)   # distinct (colour, shape) pairs
        cells = rng.choice(9, size=n, replace=False)               # distinct cells
        short = min(width, height)
        smin, smax = math.ceil(SIZE[0] * short), math.floor(SIZE[1] * short)
        shapes, boxes = [], []
        for k, cell in zip(chosen, cells):
            color, shape = kinds[int(k)]
            box = None
            for _ in range(10):
                box = _place(int(cell), int(rng.integers(smin, smax + 1)), width, height, boxes, rng)
                if box is not None:
                    break
            if box is None:
                break  # crowded: draw a new scene
            boxes.append(box)
            shapes.append({"shape": shape, "color": color, "rgb": _jittered(COLORS[color], rng), "box": box,
                           "cell": int(cell), "position": POSITIONS[int(cell)]})
        if len(shapes) == n:
            shapes.sort(key=lambda s: s["cell"])
            return {"width": width, "height": height, "background": background, "shapes": shapes}


def render(scene: dict):
    """The scene as a PIL RGB image (no anti-aliasing: every shape pixel has the shape's colour)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (scene["width"], scene["height"]), tuple(scene["background"]))
    draw = ImageDraw.Draw(im)
    for s in scene["shapes"]:
        x0, y0, x1, y1 = s["box"]
        fill = tuple(s["rgb"])
        if s["shape"] == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif s["shape"] == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:  # apex at the top middle, base along the bottom edge
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return im


# --------------------------------------------------------------------------- questions and answers
def _name(color: str, shape: str, lang: str) -> str:
    return f"{color} {shape}" if lang == "en" else ZH_COLORS[color] + ZH_SHAPES[shape]


def caption(scene: dict, lang: str) -> str:
    """The caption: the count, then every shape in row-major order of its cell."""
    shapes = scene["shapes"]
    n = len(shapes)
    if lang == "en":
        items = ", ".join(f"{_name(s['color'], s['shape'], 'en')} at {s['position']}" for s in shapes)
        return f"{n} shape{'s' if n != 1 else ''}: {items}."
    items = "，".join(ZH_POSITIONS[s["position"]] + _name(s["color"], s["shape"], "zh") for s in shapes)
    return f"{n}个图形：{items}。"


def askable(scene: dict, task: str) -> list[dict]:
    """The shapes a question of ``task`` may be about (count and caption: the scene, given as [None])."""
    shapes = scene["shapes"]
    if task == "color":  # the shape kind must name one shape
        return [s for s in shapes if sum(t["shape"] == s["shape"] for t in shapes) == 1]
    if task == "shape":  # the colour must name one shape
        return [s for s in shapes if sum(t["color"] == s["color"] for t in shapes) == 1]
    if task == "position":
        return list(shapes)
    if task in ("count", "caption"):
        return [None]
    raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")


def question(scene: dict, task: str, lang: str, target: dict | None = None) -> tuple[str, str]:
    """(question, answer) of ``task`` in ``lang`` about ``target`` (one of ``askable(scene, task)``)."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}: choose from {', '.join(LANGS)}")
    en = lang == "en"
    if task == "count":
        return ("How many shapes are there?" if en else "图中有几个图形？"), str(len(scene["shapes"]))
    if task == "caption":
        return ("Describe the image." if en else "描述这张图片。"), caption(scene, lang)
    if target is None:
        raise ValueError(f"a {task} question needs a target shape")
    color, shape = target["color"], target["shape"]
    if task == "color":
        return ((f"What color is the {shape}?", color) if en else
                (f"{ZH_SHAPES[shape]}是什么颜色？", ZH_COLORS[color]))
    if task == "shape":
        return ((f"What shape is the {color} object?", shape) if en else
                (f"{ZH_COLORS[color]}的物体是什么形状？", ZH_SHAPES[shape]))
    if task == "position":
        return ((f"Where is the {color} {shape}?", target["position"]) if en else
                (f"{_name(color, shape, 'zh')}在哪里？", ZH_POSITIONS[target["position"]]))
    raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")


def make_record(seed: int, i: int, task: str, lang: str, image: str) -> dict:
    """Record ``i`` of the data set ``seed``: a scene where ``task`` can be asked, the question and its answer."""
    rng = np.random.default_rng([seed, i])
    while True:
        scene = sample_scene(rng)
        targets = askable(scene, task)
        if targets:
            break
    target = targets[int(rng.integers(len(targets)))]
    q, a = question(scene, task, lang, target)
    return {"id": f"shapes-{seed}-{i:06d}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
            "task": task, "lang": lang, "scene": scene}


def plan(n: int, seed: int, tasks=TASKS, langs=LANGS, balanced: bool = True) -> list[tuple[str, str]]:
    """The (task, lang) of each of the ``n`` records. Balanced: every block of len(tasks) * len(langs) records
    holds each pair once, in a seeded random order (so each pair comes n // pairs times or once more); otherwise
    each record's pair is drawn alone. Either way record i's pair depends on (seed, i) only, so a smaller set is
    the first records of a larger one with the same seed."""
    pairs = [(t, l) for t in tasks for l in langs]
    if balanced:
        order = []
        for block in range(-(-n // len(pairs))):
            order += [pairs[k] for k in np.random.default_rng([seed, 2**31, block]).permutation(len(pairs))]
        return order[:n]
    return [pairs[int(np.random.default_rng([seed, 2**32, i]).integers(len(pairs)))] for i in range(n)]


def _check_choice(values, allowed, what: str) -> tuple[str, ...]:
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values or len(set(values)) != len(values):
        raise ValueError(f"{what} must be distinct values from {', '.join(allowed)}, "
                         f"not {', '.join(values) or '(none)'}")
    return values


def make_shapes(out_dir, n: int, seed: int, tasks=TASKS, langs=LANGS, balanced: bool = True,
                force: bool = False, log=None) -> Path:
    """Write ``n`` records (one image and one question each) to ``out_dir`` atomically. -> the JSON file's path.

    ``out_dir`` must not exist, be empty, or (with ``force``) be a data set this function wrote."""
    tasks, langs = _check_choice(tasks, TASKS, "--tasks (tasks)"), _check_choice(langs, LANGS, "--langs (langs)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--n (n) must be a positive number of records, not {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed (seed) must be a non-negative integer, not {seed!r}")
    out = Path(out_dir)
    check_output_folder(out, SHAPES_DATA, force, other="another --out")
    digits = max(6, len(str(n - 1)))
    with output_folder(out, SHAPES_DATA, force, log=log) as tmp:
        (tmp / IMAGES).mkdir()
        records = []
        for i, (task, lang) in enumerate(plan(n, seed, tasks, langs, balanced)):
            image = f"{IMAGES}/{i:0{digits}d}.png"
            rec = make_record(seed, i, task, lang, image)
            render(rec["scene"]).save(tmp / image)
            records.append(rec)
            if log is not None and (i + 1) % 1000 == 0:
                log(f"{i + 1}/{n} records")
        (tmp / DATA_JSON).write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "n": n, "seed": seed, "tasks": list(tasks),
                                              "langs": list(langs), "balanced": balanced, "data": DATA_JSON},
                                             indent=1) + "\n")
    return out / DATA_JSON


# --------------------------------------------------------------------------- reading
def load_records(json_path) -> list[dict]:
    """Read and check a LLaVA-format JSON file. -> its records, each with ``image_path`` added (the absolute path
    of its image, or None when it has none). Raises DataError naming the file and the first problem."""
    path = Path(json_path)
    if path.is_dir():
        if (path / DATA_JSON).is_file():
            path = path / DATA_JSON
        else:
            raise DataError(f"{path} is a folder without {DATA_JSON}: pass the data set's JSON file")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: pass a JSON file written by `moevl data shapes` "
                        "or in the LLaVA conversation format") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e}): pass a UTF-8 JSON file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} must hold a non-empty JSON list of records (LLaVA conversation format)")
    for k, rec in enumerate(records):
        _check_record(path, k, rec)
    return records


def _check_record(path: Path, k: int, rec) -> None:
    where = f"{path}: record {k}"
    if not isinstance(rec, dict):
        raise DataError(f"{where} is not a JSON object")
    if not isinstance(rec.get("id"), (str, int)):
        raise DataError(f"{where} has no \"id\"")
    where += f" (id {rec['id']})"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        raise DataError(f"{where}: \"conversations\" must be a list of human/gpt turns in pairs")
    for j, turn in enumerate(conv):
        want = "human" if j % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {j} must be {{\"from\": \"{want}\", \"value\": <text>}}")
    for key, allowed in (("task", TASKS), ("lang", LANGS)):
        if key in rec and rec[key] not in allowed:
            raise DataError(f"{where}: {key} {rec[key]!r} is not one of {', '.join(allowed)}")
    image = rec.get("image")
    if image is None:
        if "<image>" in conv[0]["value"]:
            raise DataError(f"{where}: the question has <image> but the record has no \"image\"")
        rec["image_path"] = None
        return
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: \"image\" must be a path relative to the JSON file")
    full = (path.parent / image).resolve()
    if not full.is_file():
        raise DataError(f"{where}: image {image} not found (looked for {full}); image paths are relative to "
                        "the JSON file")
    rec["image_path"] = str(full)


def question_text(rec: dict) -> str:
    """The first question without the ``<image>`` placeholder (the session's chat template places the image)."""
    return rec["conversations"][0]["value"].replace("<image>\n", "").replace("<image>", "").strip()


def answer_text(rec: dict) -> str:
    return rec["conversations"][1]["value"]
