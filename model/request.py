"""What both families' pre-processing shares: the request errors, reading images, and left padding."""
from __future__ import annotations

from pathlib import Path

import torch


class InputError(ValueError):
    """A request the model cannot take (unreadable image, prompt too long, malformed chat)."""


def load_image(path_or_image):
    """A PIL image or an image file -> an RGB PIL image; unreadable files raise InputError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB")
    path = Path(path_or_image)
    if not path.is_file():
        raise InputError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image {path} could not be read ({e}); give a PNG/JPEG/WebP/... file") from e


def check_image_lists(prompts: list, images: list[list] | None) -> list[list]:
    """One image list per prompt (an empty list each when ``images`` is None)."""
    images = images or [[] for _ in prompts]
    if len(images) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(images)} image lists")
    return images


def check_prompt_length(n: int, max_length: int | None, advice: str) -> None:
    if max_length is not None and n >= max_length:
        raise InputError(f"the prompt is {n} tokens long (image tokens included) but the context is {max_length}: "
                         f"{advice}")


def left_pad(seqs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids [B, L], attention_mask [B, L] with 1 on real tokens), padded on the left so that
    every request's next token is at the same column."""
    b, length = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, ids in enumerate(seqs):
        input_ids[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, length - len(ids):] = 1
    return input_ids, mask
