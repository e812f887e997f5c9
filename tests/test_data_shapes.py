"""The shapes data set follows its specification (issue 12, section 1). The rules are checked on the rendered images
by an analysis written here (regions of one colour found by flood fill, their colour, size, kind and cell), not by
reading the generator's scene description back."""
import collections
import functools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from moevl.train.data import (LANGS, TASKS, DataError, load_records, make_shapes, question, render, sample_scene)

# the specification's numbers, written out again (not imported from the generator)
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30),
           "purple": (140, 50, 180), "orange": (240, 130, 30)}
CELLS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
      "circle": "圆形", "square": "正方形", "triangle": "三角形", "top left": "左上", "top": "上", "top right": "右上",
      "left": "左", "center": "中间", "right": "右", "bottom left": "左下", "bottom": "下", "bottom right": "右下"}


@functools.lru_cache(maxsize=None)
def analyse(path):
    """An image -> (background RGB, [(colour name, kind, position, side), ...] in row-major order), found from the
    pixels alone. Fails the test if a region is not one clean shape."""
    im = Image.open(path).convert("RGB")
    a = np.asarray(im).astype(int)
    h, w, _ = a.shape
    colours, counts = np.unique(a.reshape(-1, 3), axis=0, return_counts=True)
    bg = colours[counts.argmax()]
    work = im.copy()
    todo = ~(a == bg).all(-1)
    found = []
    while todo.any():
        y, x = np.argwhere(todo)[0]
        rgb = a[y, x]
        ImageDraw.floodfill(work, (int(x), int(y)), (0, 0, 0), thresh=0)  # black: no palette colour comes near it
        region = (np.asarray(work) == 0).all(-1) & todo
        todo &= ~region
        ys, xs = np.nonzero(region)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        box = a[y0:y1, x0:x1]
        own = (box == rgb).all(-1)
        # the region's bounding box holds only its colour and background: shapes do not overlap or touch
        assert ((box == bg).all(-1) | own).all(), f"{path}: shapes overlap at {x0},{y0}"
        assert own.sum() == region.sum(), f"{path}: one colour in two pieces at {x0},{y0}"
        names = [n for n, c in PALETTE.items() if np.all(np.abs(rgb - c) <= 25)]
        assert len(names) == 1, f"{path}: colour {rgb} is not a palette colour within +-25"
        side_w, side_h = x1 - x0, y1 - y0
        assert abs(side_w - side_h) <= 1, f"{path}: bounding box {side_w}x{side_h} is not square"
        fill = region.sum() / (side_w * side_h)
        kind = "square" if fill > 0.95 else "circle" if 0.68 < fill < 0.86 else "triangle" if fill < 0.6 else None
        assert kind, f"{path}: fill ratio {fill:.2f} is no circle, square or triangle"
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        cell = 3 * min(int(3 * cy / h), 2) + min(int(3 * cx / w), 2)
        found.append((cell, names[0], kind, CELLS[cell], side_w))
    found.sort()
    return tuple(int(c) for c in bg), [f[1:] for f in found], (w, h), [f[0] for f in found]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = make_shapes(tmp_path_factory.mktemp("d") / "shapes", 150, seed=7)
    return path, json.loads(path.read_text(encoding="utf-8"))


def test_images_follow_the_specification(dataset):
    path, records = dataset
    sizes, numbers, kinds, colours, whites = set(), collections.Counter(), set(), set(), 0
    for rec in records:
        bg, shapes, (w, h), cells = analyse(path.parent / rec["image"])
        assert 112 <= w <= 224 and 112 <= h <= 224
        assert all(200 <= c <= 255 for c in bg), bg
        whites += bg == (255, 255, 255)
        assert 1 <= len(shapes) <= 4
        assert len(set(cells)) == len(cells), "two shape centres in one cell"
        assert len({(c, k) for c, k, _, _ in shapes}) == len(shapes), "two shapes share colour and kind"
        short = min(w, h)
        for _, _, _, side in shapes:
            assert 0.18 * short - 1 <= side <= 0.35 * short + 1, (side, short)
        sizes.add((w, h))
        numbers[len(shapes)] += 1
        kinds |= {k for _, k, _, _ in shapes}
        colours |= {c for c, _, _, _ in shapes}
    # the draws cover the specification's ranges
    assert len(sizes) > 100 and set(numbers) == {1, 2, 3, 4}
    assert kinds == {"circle", "square", "triangle"} and colours == set(PALETTE)
    assert 0 < whites < len(records)


def test_each_answer_is_what_the_image_shows(dataset):
    path, records = dataset
    for rec in records:
        _, shapes, _, _ = analyse(path.parent / rec["image"])
        q = rec["conversations"][0]["value"]
        a = rec["conversations"][1]["value"]
        assert q.startswith("<image>\n")
        q = q[len("<image>\n"):]
        en = rec["lang"] == "en"
        task = rec["task"]
        if task == "count":
            assert (q, a) == (("How many shapes are there?" if en else "图中有几个图形？"), str(len(shapes)))
        elif task == "color":
            kind = re.fullmatch(r"What color is the (\w+)\?", q)[1] if en else \
                {v: k for k, v in ZH.items()}[q[:-len("是什么颜色？")]]
            same = [s for s in shapes if s[1] == kind]
            assert len(same) == 1, "a color question about a kind that is not unique"
            assert a == (same[0][0] if en else ZH[same[0][0]])
        elif task == "shape":
            colour = re.fullmatch(r"What shape is the (\w+) object\?", q)[1] if en else \
                {v: k for k, v in ZH.items()}[q[:-len("的物体是什么形状？")]]
            same = [s for s in shapes if s[0] == colour]
            assert len(same) == 1, "a shape question about a colour that is not unique"
            assert a == (same[0][1] if en else ZH[same[0][1]])
        elif task == "position":
            matches = [s for s in shapes if (q == f"Where is the {s[0]} {s[1]}?" if en else
                                             q == f"{ZH[s[0]]}{ZH[s[1]]}在哪里？")]
            assert len(matches) == 1
            assert a == (matches[0][2] if en else ZH[matches[0][2]])
        else:
            n = len(shapes)
            if en:
                items = ", ".join(f"{c} {k} at {p}" for c, k, p, _ in shapes)
                want = f"{n} shape{'s' if n > 1 else ''}: {items}."
            else:
                want = f"{n}个图形：" + "，".join(ZH[p] + ZH[c] + ZH[k] for c, k, p, _ in shapes) + "。"
            assert (q, a) == (("Describe the image." if en else "描述这张图片。"), want)


SCENE = {"width": 180, "height": 150, "background": [255, 255, 255], "shapes": [
    {"shape": "circle", "color": "red", "rgb": [220, 40, 40], "box": [10, 10, 40, 40], "cell": 0,
     "position": "top left"},
    {"shape": "square", "color": "blue", "rgb": [40, 70, 220], "box": [75, 60, 105, 90], "cell": 4,
     "position": "center"},
    {"shape": "triangle", "color": "green", "rgb": [40, 170, 60], "box": [140, 110, 170, 140], "cell": 8,
     "position": "bottom right"}]}
WORDING = [
    ("count", "en", None, "How many shapes are there?", "3"),
    ("count", "zh", None, "图中有几个图形？", "3"),
    ("color", "en", 0, "What color is the circle?", "red"),
    ("color", "zh", 0, "圆形是什么颜色？", "红色"),
    ("shape", "en", 0, "What shape is the red object?", "circle"),
    ("shape", "zh", 0, "红色的物体是什么形状？", "圆形"),
    ("position", "en", 0, "Where is the red circle?", "top left"),
    ("position", "zh", 0, "红色圆形在哪里？", "左上"),
    ("caption", "en", None, "Describe the image.",
     "3 shapes: red circle at top left, blue square at center, green triangle at bottom right."),
    ("caption", "zh", None, "描述这张图片。", "3个图形：左上红色圆形，中间蓝色正方形，右下绿色三角形。"),
]


@pytest.mark.parametrize("task,lang,target,q,a", WORDING)
def test_the_wording_is_the_specifications(task, lang, target, q, a):
    t = None if target is None else SCENE["shapes"][target]
    assert question(SCENE, task, lang, t) == (q, a)


def test_one_shape_captions_are_singular():
    one = dict(SCENE, shapes=[dict(SCENE["shapes"][1], color="red", shape="circle")])
    assert question(one, "caption", "en") == ("Describe the image.", "1 shape: red circle at center.")
    assert question(one, "caption", "zh") == ("描述这张图片。", "1个图形：中间红色圆形。")


def test_the_renderer_draws_the_scene_where_it_says():
    im = np.asarray(render(SCENE)).astype(int)
    assert im.shape == (150, 180, 3)
    assert tuple(im[25, 25]) == (220, 40, 40) and tuple(im[75, 90]) == (40, 70, 220)
    assert tuple(im[130, 155]) == (40, 170, 60) and tuple(im[11, 11]) == (255, 255, 255)  # a circle's corner
    assert tuple(im[111, 141]) == (255, 255, 255)  # beside the triangle's apex


def test_scenes_are_deterministic_from_the_seed():
    a = [sample_scene(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    assert sample_scene(np.random.default_rng(4)) != a[0]


def test_data_sets_are_deterministic_from_the_seed(tmp_path):
    p1 = make_shapes(tmp_path / "a", 12, seed=5)
    p2 = make_shapes(tmp_path / "b", 12, seed=5)
    p3 = make_shapes(tmp_path / "c", 12, seed=6)
    assert p1.read_bytes() == p2.read_bytes()
    images = sorted((tmp_path / "b/images").iterdir())
    assert len(images) == 12
    assert all((tmp_path / "a/images" / f.name).read_bytes() == f.read_bytes() for f in images)
    assert p1.read_bytes() != p3.read_bytes()


def test_a_smaller_set_is_the_start_of_a_larger_one(tmp_path):
    for balanced in (True, False):
        small = json.loads(make_shapes(tmp_path / f"s{balanced}", 7, seed=4, balanced=balanced).read_text("utf-8"))
        large = json.loads(make_shapes(tmp_path / f"l{balanced}", 23, seed=4, balanced=balanced).read_text("utf-8"))
        assert small == large[:7]


def test_unbalanced_sets_draw_every_pair(tmp_path):
    records = load_records(make_shapes(tmp_path / "u", 60, seed=2, balanced=False))
    counts = collections.Counter((r["task"], r["lang"]) for r in records)
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) > 1


@pytest.mark.parametrize("n,tasks,langs", [(10, TASKS, LANGS), (23, TASKS, LANGS), (7, ("count", "caption"), ("zh",)),
                                           (9, ("position",), LANGS)])
def test_balanced_sets_have_equal_counts_per_task_and_language(tmp_path, n, tasks, langs):
    records = load_records(make_shapes(tmp_path / "d", n, seed=1, tasks=tasks, langs=langs))
    counts = collections.Counter((r["task"], r["lang"]) for r in records)
    assert len(records) == n and set(counts) == {(t, l) for t in tasks for l in langs}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_records_are_in_llava_format_with_relative_image_paths(tmp_path):
    path = make_shapes(tmp_path / "d", 5, seed=2)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len({r["id"] for r in raw}) == 5
    for r in raw:
        assert set(r) == {"id", "image", "conversations", "task", "lang", "scene"}
        assert not r["image"].startswith("/") and (path.parent / r["image"]).is_file()
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
        assert Image.open(path.parent / r["image"]).format == "PNG"
    assert [r["image_path"] for r in load_records(path)] == [str((path.parent / r["image"]).resolve()) for r in raw]


@pytest.mark.parametrize("content,expect", [
    (None, "does not exist"), ("{", "not valid JSON"), ("{}", "non-empty JSON list"), ("[]", "non-empty JSON list"),
    ('[{"id": "a"}]', "conversations"),
    ('[{"id": "a", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]', "turn 0"),
    ('[{"id": "a", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\\nq"}, '
     '{"from": "gpt", "value": "a"}]}]', "nope.png not found"),
    ('[{"id": "a", "task": "dance", "conversations": [{"from": "human", "value": "q"}, '
     '{"from": "gpt", "value": "a"}]}]', "task 'dance'"),
])
def test_bad_data_files_are_named_in_one_line(tmp_path, content, expect):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert str(path) in str(e.value) and expect in str(e.value) and "\n" not in str(e.value)


def _moevl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "moevl.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_the_command_writes_a_data_set(tmp_path):
    out = _moevl("data", "shapes", "--out", "d", "--n", "4", "--seed", "3", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "d/shapes.json" and len(load_records(tmp_path / "d/shapes.json")) == 4
    again = _moevl("data", "shapes", "--out", "d", "--n", "2", "--seed", "3", "--force", "--quiet", cwd=tmp_path)
    assert again.returncode == 0 and len(load_records(tmp_path / "d/shapes.json")) == 2


@pytest.mark.parametrize("args,expect", [
    (["--n", "0"], "--n"), (["--n", "-3"], "--n"), (["--seed", "-1"], "--seed"), (["--tasks", "dance"], "dance"),
    (["--langs", "fr"], "fr"), (["--out", "taken"], "not a moevl shapes data set"),
    (["--out", "taken", "--force"], "not a moevl shapes data set"), (["--out", "file.txt"], "is a file"),
])
def test_bad_data_commands_exit_2_with_one_line_and_write_nothing(tmp_path, args, expect):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    (tmp_path / "file.txt").write_text("keep")
    base = {"--out": "new", "--n": "3", "--seed": "0"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = [x for kv in base.items() for x in kv] + [a for a in args if a == "--force"]
    out = _moevl("data", "shapes", *argv, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and expect in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "taken"]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
