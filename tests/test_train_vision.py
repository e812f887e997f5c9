"""Stage vision: the probes' targets against scenes worked out by hand, what the stage trains and leaves alone, and
that the probes learn (the loss falls on a fixed batch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moevl.train.loop import TrainSettings
from moevl.train.recipe import StageOptions, run_stage
from moevl.train.vision import (IGNORE, awaker_token_boxes, dense_targets, make_step_loss, probes,
                                square_token_boxes)
from tests.train_fixtures import _no_npu_accelerator_leak, awaker_base, moellava_dense, shapes  # noqa: F401

RED, BLUE = [220, 40, 40], [40, 70, 220]


def canvas(w, h, shapes_):
    """A white canvas with filled axis-aligned squares: shapes_ = [(box, rgb)]."""
    px = np.full((h, w, 3), 255, dtype=np.uint8)
    for (x0, y0, x1, y1), rgb in shapes_:
        px[y0:y1, x0:x1] = rgb
    return px


def shape(kind, color, rgb, box, cell):
    return {"shape": kind, "color": color, "rgb": rgb, "box": box, "cell": cell}


def test_awaker_targets_follow_the_merged_token_grid():
    # 112 x 112 px, 8 x 8 patches of 14 px, merged 2 x 2: a 4 x 4 grid of 28 px tokens
    boxes = awaker_token_boxes(112, 112, (8, 8), 14, 2)
    assert boxes.shape == (16, 4) and boxes[5].tolist() == [28, 28, 56, 56]
    big = shape("square", "red", RED, [0, 0, 56, 56], 0)           # covers tokens (0,0) (0,1) (1,0) (1,1)
    small = shape("square", "blue", BLUE, [90, 90, 100, 100], 8)  # 100 px of a 784 px token: its centre's token
    t = dense_targets({"shapes": [big, small]}, canvas(112, 112, [(big["box"], RED), (small["box"], BLUE)]), boxes)
    red = [0, 1, 4, 5]
    assert t[red].tolist() == [[2, 1, 0, 0]] * 4                    # square, red (colour 1), row 0, col 0
    assert t[15].tolist() == [2, 3, 2, 2]                           # square, blue (colour 3), bottom right
    rest = [k for k in range(16) if k not in red + [15]]
    assert t[rest, :2].eq(0).all() and t[rest, 2:].eq(IGNORE).all()


def test_awaker_targets_scale_to_the_resized_image():
    # a 140 x 70 px image resized by the processor to 8 x 4 patches (112 x 56 px): tokens are 35 px wide, 35 tall
    boxes = awaker_token_boxes(140, 70, (4, 8), 14, 2)
    assert boxes.shape == (8, 4) and np.allclose(boxes[5], [35, 35, 70, 70])


def test_moellava_targets_follow_the_padded_square():
    # 224 x 112 px padded to 224 x 224 (56 px above and below), 112 px tower in 16 px patches: 7 x 7 tokens of 32 px
    boxes = square_token_boxes(224, 112, 112, 16)
    assert boxes.shape == (49, 4) and boxes[0].tolist() == [0, -56, 32, -24]
    sq = shape("square", "red", RED, [64, 8, 96, 40], 1)  # padded: y 64..96, the tokens of row 2, column 2
    t = dense_targets({"shapes": [sq]}, canvas(224, 112, [(sq["box"], RED)]), boxes)
    hit = (t[:, 0] > 0).nonzero().flatten().tolist()
    assert hit == [2 * 7 + 2] and t[16].tolist() == [2, 1, 0, 1]
    assert t[:7, 0].eq(0).all()  # the padding rows hold no shape


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("vis") / "data", n=8)


@pytest.mark.parametrize("family", ["awaker", "moellava"])
def test_stage_vision_trains_the_tower_only_and_the_probes_learn(family, data, tmp_path):
    from moevl.ascend.device import resolve_device
    from moevl.model.family import load_torch
    from moevl.train.examples import read_records

    base = (awaker_base if family == "awaker" else moellava_dense)(tmp_path / "base")
    out = run_stage(base, data, "vision", tmp_path / "v", "cpu", TrainSettings(steps=3, batch_size=4, lr=3e-3),
                    StageOptions(), progress=False, log=lambda m: None)
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    tower = ("visual.",) if family == "awaker" else ("vision_tower.", "mm_projector.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(tower) for k in changed)
    assert any(k.startswith(tower[0] + ("blocks" if family == "awaker" else "encoder")) for k in changed)

    # the probes' loss falls when the tower and probes fit one batch
    session = load_torch(base, resolve_device("cpu"), torch.float32)
    model = session.model
    heads = probes(model.cfg.hidden_size)
    records = read_records(data)[:4]
    step_loss = make_step_loss(model, session.processor, heads, torch.device("cpu"))
    params = [p for n, p in model.named_parameters() if n.startswith(tower)] + list(heads.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _aux = step_loss(records)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_stage_vision_needs_scene_annotations(tmp_path, data):
    import json

    recs = json.loads(data.read_text())
    for r in recs:
        r.pop("scene", None)
    bare = data.parent / "bare.json"
    bare.write_text(json.dumps(recs))
    base = awaker_base(tmp_path / "base")
    with pytest.raises(ValueError, match="scene"):
        run_stage(base, bare, "vision", tmp_path / "v", "cpu", TrainSettings(steps=1, batch_size=2),
                  progress=False, log=lambda m: None)
    assert not (tmp_path / "v").exists()
