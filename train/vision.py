"""Stage ``vision``: dense supervised pretraining of the vision tower on the shapes data set's scene annotations.

The originals never train a vision tower from scratch: Awaker2.5-VL starts from Qwen2-VL's pretrained ViT, MoE-LLaVA
from CLIP. The built-in toy defaults have no such tower to start from, and learning to see through the language
model's loss alone (one caption token at a time) is slow on a CPU. This stage stands in for the pretrained tower:
every image token the tower + merger/projector give the language model is classified by small linear probes (thrown
away afterwards) into what the scene annotation (``record["scene"]``, written by ``moevl.train.data``) says lies
there:

  shape  none / circle / square / triangle    the shape covering at least ``COVER`` of the token's image region
  color  none / one of ``COLORS``             (the same shape's colour)
  row    top / middle / bottom                the 3x3 cell of that shape (its centre's cell), not scored on
  col    left / center / right                background tokens

A shape too small to cover ``COVER`` of any token is given the token its centre lies in. Pixels are attributed to a
shape by its exact colour (``render`` draws without anti-aliasing). Only the tower and the merger (Awaker) or the
projector (MoE-LLaVA) are trained; the language model is untouched.

The token geometry follows each family's processor: Awaker's merged tokens are ``merge x merge`` patches of the
image Qwen2-VL's ``smart_resize`` produced (row-major); MoE-LLaVA's are the patches of the padded square (the image
centred, as ``expand2square``) resized to the tower's input size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moevl.train.data import COLORS, SHAPES

PROBES = (("shape", 1 + len(SHAPES)), ("color", 1 + len(COLORS)), ("row", 3), ("col", 3))
COVER = 0.2
IGNORE = -100


# ----------------------------------------------------------------------------------------------- targets
def awaker_token_boxes(width: int, height: int, grid_hw: tuple[int, int], patch: int, merge: int) -> np.ndarray:
    """Each merged image token's region in the original image's pixels, row-major: [T, 4] (x0, y0, x1, y1)."""
    gh, gw = grid_hw
    mh, mw = gh // merge, gw // merge
    side = patch * merge
    sx, sy = width / (gw * patch), height / (gh * patch)
    r, c = np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij")
    r, c = r.ravel(), c.ravel()
    return np.stack([c * side * sx, r * side * sy, (c + 1) * side * sx, (r + 1) * side * sy], axis=1)


def square_token_boxes(width: int, height: int, image_size: int, patch: int) -> np.ndarray:
    """Each patch token's region in the original image's pixels for a tower fed the image padded to a centred
    square and resized to ``image_size`` (MoE-LLaVA's ``expand2square``): [T, 4], row-major; padding lies outside
    [0, width) x [0, height)."""
    side = max(width, height)
    ox = (side - width) // 2 if height > width else 0
    oy = (side - height) // 2 if width > height else 0
    g = image_size // patch
    step = side / g
    r, c = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    r, c = r.ravel(), c.ravel()
    return np.stack([c * step - ox, r * step - oy, (c + 1) * step - ox, (r + 1) * step - oy], axis=1)


def dense_targets(scene: dict, pixels: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    """-> [T, 4] long: (shape, colour, row, col) per token (``PROBES``), IGNORE for row/col off the shapes.

    pixels: the rendered scene [H, W, 3] (uint8); boxes: ``*_token_boxes``."""
    t = len(boxes)
    out = torch.full((t, len(PROBES)), IGNORE, dtype=torch.long)
    out[:, :2] = 0
    h, w = pixels.shape[:2]
    px = pixels.astype(np.int16)
    colors, shapes = list(COLORS), list(SHAPES)
    best = np.zeros(t)
    xa = np.clip(np.floor(boxes[:, 0]), 0, w).astype(int)
    xb = np.clip(np.ceil(boxes[:, 2]), 0, w).astype(int)
    ya = np.clip(np.floor(boxes[:, 1]), 0, h).astype(int)
    yb = np.clip(np.ceil(boxes[:, 3]), 0, h).astype(int)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    for s in scene["shapes"]:
        mask = (px == np.asarray(s["rgb"], dtype=np.int16)).all(-1)
        table = np.zeros((h + 1, w + 1))  # summed-area table: the shape's pixels in any box in four lookups
        table[1:, 1:] = mask.cumsum(0).cumsum(1)
        cover = (table[yb, xb] - table[ya, xb] - table[yb, xa] + table[ya, xa]) / area
        hit = np.flatnonzero((cover >= COVER) & (cover > best))
        if not hit.size:  # a shape smaller than a token: the token its centre lies in
            bx0, by0, bx1, by1 = s["box"]
            cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
            inside = np.flatnonzero((boxes[:, 0] <= cx) & (cx < boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy < boxes[:, 3]))
            hit = inside[:1]
            cover[hit] = max(COVER, best[hit].max() + 1e-6) if hit.size else 0
        label = torch.tensor([1 + shapes.index(s["shape"]), 1 + colors.index(s["color"]), s["cell"] // 3,
                              s["cell"] % 3])
        for k in hit:
            out[k] = label
            best[k] = cover[k]
    return out


# ----------------------------------------------------------------------------------------------- the stage
def probes(hidden: int) -> torch.nn.ModuleDict:
    g = torch.Generator().manual_seed(0)
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, n) for name, n in PROBES})
    with torch.no_grad():
        for head in heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) / hidden ** 0.5)
            head.bias.zero_()
    return heads


def vision_params(model) -> dict[str, torch.nn.Parameter]:
    """What the stage trains: the tower and what maps it to the language model's width."""
    prefixes = ("visual.",) if hasattr(model, "visual") else ("vision_tower.", "mm_projector.")
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


def features_and_targets(model, processor, records, device, with_counts: bool = False):
    """The image tokens the language model would receive for each record's image [N, hidden], and their targets
    [N, 4] (and, ``with_counts``, each image's token count)."""
    from PIL import Image

    feats, targets = [], []
    if hasattr(model, "visual"):  # Awaker: Qwen2-VL tower + merger, one image at a time (block-diagonal attention)
        from moevl.model.awaker.inputs import vision_inputs

        v = model.cfg.vision
        out = processor.process_images([r.image for r in records])
        start = 0
        for r, grid in zip(records, out["image_grid_thw"]):
            grid = grid[None]
            end = start + int(grid.prod())
            pos, keep = vision_inputs(grid, v.spatial_merge_size)
            feats.append(model.encode_images(out["pixel_values"][start:end].to(device), pos.to(device),
                                             keep.to(device)))
            start = end
            _, gh, gw = grid[0].tolist()
            pixels = np.asarray(Image.open(r.image).convert("RGB"))
            boxes = awaker_token_boxes(pixels.shape[1], pixels.shape[0], (gh, gw), v.patch_size,
                                       v.spatial_merge_size)
            targets.append(dense_targets(r.scene, pixels, boxes))
        out = torch.cat(feats), torch.cat(targets).to(device)
        return (*out, [len(t) for t in targets]) if with_counts else out
    v = model.cfg.vision
    if model.cfg.image_aspect_ratio != "pad" or v.select_feature != "patch":
        raise ValueError("--stage vision supports MoE-LLaVA towers fed a padded square (image_aspect_ratio 'pad') "
                         "with patch features")
    px = processor.pixels([r.image for r in records]).to(device)
    f = model.encode_images(px)
    for r in records:
        pixels = np.asarray(Image.open(r.image).convert("RGB"))
        boxes = square_token_boxes(pixels.shape[1], pixels.shape[0], v.image_size, v.patch_size)
        targets.append(dense_targets(r.scene, pixels, boxes))
    out = f.flatten(0, 1), torch.cat(targets).to(device)
    return (*out, [len(t) for t in targets]) if with_counts else out


def make_step_loss(model, processor, heads: torch.nn.ModuleDict, device):
    """records -> (loss, aux=0): the probes' summed cross-entropy over the image tokens."""
    def step_loss(records):
        for r in records:
            if not r.scene:
                raise ValueError(f"{r.image}: --stage vision needs records with a 'scene' annotation (the shapes "
                                 "data set of `moevl data shapes`)")
        f, tg = features_and_targets(model, processor, records, device)
        loss = f.new_zeros((), dtype=torch.float32)
        for k, (name, _) in enumerate(PROBES):
            loss = loss + torch.nn.functional.cross_entropy(heads[name](f).float(), tg[:, k], ignore_index=IGNORE)
        return loss, loss.new_zeros(())
    return step_loss


@torch.no_grad()
def probe_accuracy(model, processor, heads, records, device, batch: int = 16) -> dict:
    """Per-shape accuracy of the probes (all tokens of a shape vote with their summed log-probabilities)."""
    right = {name: 0 for name, _ in PROBES}
    n = 0
    for i in range(0, len(records), batch):
        part = records[i:i + batch]
        f, tg, counts = features_and_targets(model, processor, part, device, with_counts=True)
        starts = np.cumsum([0] + counts)
        logp = {name: heads[name](f).float().log_softmax(-1) for name, _ in PROBES}
        key = tg[:, 0] * 10_000 + tg[:, 1] * 100 + tg[:, 2] * 10 + tg[:, 3]  # a shape's tokens share one label
        for a, b in zip(starts[:-1], starts[1:]):
            for lab in key[a:b][tg[a:b, 0] > 0].unique():
                sel = torch.arange(a, b, device=key.device)[key[a:b] == lab]
                n += 1
                for k, (name, _) in enumerate(PROBES):
                    right[name] += int(logp[name][sel].sum(0).argmax().item() == tg[sel[0], k].item())
    return {name: right[name] / max(n, 1) for name in right} | {"shapes": n}


def check_records(records, data: str | Path) -> None:
    if not any(r.scene for r in records):
        raise ValueError(f"--data {data} has no 'scene' annotations: --stage vision trains on the shapes data set "
                         "(`moevl data shapes`), whose records describe what each image holds")
