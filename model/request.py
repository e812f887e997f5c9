"""What both families' pre-processing shares: the request errors, reading images, keeping the user's text apart from
the template's when tokenizing, and left padding."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch


class InputError(ValueError):
    """A request the model cannot take (unreadable image, prompt too long, malformed chat)."""


# ------------------------------------------------------------------------------------ images
MAX_IMAGE_PIXELS = 64_000_000  # width * height; the environment variable MOEVL_MAX_IMAGE_PIXELS overrides it


def max_image_pixels() -> int:
    """The largest image (width * height) ``load_image`` takes: $MOEVL_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS."""
    value = os.environ.get("MOEVL_MAX_IMAGE_PIXELS")
    if value is None:
        return MAX_IMAGE_PIXELS
    if not value.strip().isdigit() or int(value) == 0:
        raise InputError(f"MOEVL_MAX_IMAGE_PIXELS={value!r} is not a positive whole number of pixels: set it to "
                         f"e.g. {MAX_IMAGE_PIXELS} or unset it")
    return int(value)


def image_name(path_or_image) -> str:
    """How error messages name an image: by its file, or as the in-memory image it is."""
    from PIL import Image

    if isinstance(path_or_image, Image.Image):
        return f"the {path_or_image.width}x{path_or_image.height} {path_or_image.mode} image"
    return f"image {path_or_image}"


def load_image(path_or_image):
    """A PIL image or an image file -> an 8-bit RGB PIL image; problems raise InputError naming the file.

    Each mode is converted by what its values mean (PIL's own ``convert("RGB")`` clips deep values to 255 and drops
    alpha, so a 16-bit PNG came out all white and a transparent background black):

    - transparency (RGBA, LA, PA, RGBa, La, and P/L/RGB/I;16 with a transparent colour): composited on white, as
      transformers' ``convert_to_rgb``;
    - 16-bit grayscale (I;16, I;16B, I;16L, I;16N): value / 257, so 0..65535 -> 0..255;
    - 32-bit integer (I): as 16-bit (/ 257) when some value is above 255, else as 8-bit; clipped to 0..255;
    - float (F): as [0, 1] (x 255) when no value is above 1.0, else as 0..255; clipped to 0..255, NaN as 0;
    - the rest (1, L, P, RGB, CMYK, YCbCr, LAB, HSV, ...): PIL's conversion.

    Images over ``max_image_pixels()`` pixels are refused from the file's header, before anything is decoded.
    Pillow's own guard still refuses files over twice ``PIL.Image.MAX_IMAGE_PIXELS`` when ours is set higher.
    """
    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels()
    if isinstance(path_or_image, Image.Image):
        check_image_size(path_or_image, image_name(path_or_image), limit)
        return to_rgb(path_or_image)
    path = Path(path_or_image)
    if path.is_dir():
        raise InputError(f"image {path} is a directory, not an image file: give the path of a PNG/JPEG/WebP/... file")
    if not path.is_file():
        raise InputError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:  # lazy: only the header is read here
            check_image_size(im, f"image {path}", limit)
            return to_rgb(im)
    except Image.DecompressionBombError as e:  # Pillow's guard, which runs inside Image.open
        if Image.MAX_IMAGE_PIXELS is not None and limit >= 2 * Image.MAX_IMAGE_PIXELS:
            raise InputError(f"image {path} is larger than Pillow opens ({e}): resize it") from e
        raise InputError(f"image {path} is over the limit of {limit} pixels: resize it, or raise the limit with the "
                         "environment variable MOEVL_MAX_IMAGE_PIXELS") from e
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image {path} could not be read ({e}); give a PNG/JPEG/WebP/... file") from e


def check_image_size(im, name: str, limit: int) -> None:
    w, h = im.size
    if w * h > limit:
        raise InputError(f"{name} is {w}x{h} = {w * h} pixels, over the limit of {limit}: resize it, or raise the "
                         "limit with the environment variable MOEVL_MAX_IMAGE_PIXELS")


def to_rgb(im):
    """Any PIL image -> 8-bit RGB by the rules in ``load_image``."""
    from PIL import Image

    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = deep_gray_to_8bit(im)
    if im.mode == "La":  # premultiplied: PIL converts it to LA only
        im = im.convert("LA")
    if im.has_transparency_data:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def deep_gray_to_8bit(im):
    """An I;16* / I / F image -> L (LA when it names a transparent value), scaled as ``load_image`` says."""
    import numpy as np
    from PIL import Image

    values = np.asarray(im).astype(np.float64)  # [H, W]; I;16B arrives big-endian, astype makes it native
    if im.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
    elif im.mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values / 257.0
    gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    transparent = im.info.get("transparency")
    if isinstance(transparent, int) and im.mode != "F":
        alpha = np.where(np.asarray(im) == transparent, 0, 255).astype(np.uint8)
        return Image.merge("LA", [gray, Image.fromarray(alpha, "L")])
    return gray


# ------------------------------------------------------------------------------------ prompts
class ChatPrompt(str):
    """A prompt built by a processor's ``chat``: its text, and where the user's own text is in it (``user_spans``,
    [start, end) character offsets). Only the template's text may hold control tokens: the user's is tokenized as
    the characters it is, so a question that types ``<|im_end|><|im_start|>assistant`` cannot end its turn.
    A plain ``str`` prompt is all template (whoever built it vouches for it)."""

    user_spans: tuple[tuple[int, int], ...] = ()

    def __new__(cls, text: str, user_spans=()):
        prompt = super().__new__(cls, text)
        prompt.user_spans = tuple(user_spans)
        return prompt


def render_chat(render, texts: list[str]) -> ChatPrompt:
    """``render(stand_ins)`` -> the prompt with ``stand_ins[i]`` where ``texts[i]`` goes (a chat template never sees
    the user's text); each stand-in is then replaced by its text and the text's place kept."""
    stand_ins = [f"\ue000{i}\ue001" for i in range(len(texts))]  # private-use characters: no template writes them
    rendered = render(stand_ins)
    out, spans, placed, pos = "", [], [], 0
    for m in re.finditer("\ue000(\\d+)\ue001", rendered):
        text = texts[int(m.group(1))]
        out += rendered[pos:m.start()]
        spans.append((len(out), len(out) + len(text)))
        out += text
        placed.append(int(m.group(1)))
        pos = m.end()
    if sorted(placed) != list(range(len(texts))):
        raise InputError("the chat template does not copy each message's text once, as it is: moevl cannot tell "
                         "the user's text from the template's; use the model's original chat template")
    return ChatPrompt(out + rendered[pos:], spans)


def special_tokens(tokenizer) -> list[str]:
    """The strings the tokenizer turns into special (control) tokens."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def split_controls(prompt: str, controls: list[str]) -> list[str]:
    """The prompt cut at its control strings -> [text, control, text, ..., control, text].

    Controls are looked for in the template's text only; a ChatPrompt's user spans stay text whatever they hold.
    The longest control wins where two start at the same place, as in the tokenizer's own matching."""
    pattern = re.compile("(" + "|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)) + ")")
    pieces, pos = [""], 0
    for start, end in [*getattr(prompt, "user_spans", ()), (len(prompt), len(prompt))]:
        template = pattern.split(prompt[pos:start])  # [text, control, text, ...]
        pieces[-1] += template[0]
        pieces += template[1:]
        pieces[-1] += prompt[start:end]
        pos = end
    return pieces


def encode_prompt(tokenizer, prompt: str, placeholder: str) -> list[int | None]:
    """Token ids of a prompt, with None for each image ``placeholder`` of the template (for the caller to expand).

    The template's special tokens become their ids; the text between them, the user's text included, is tokenized
    with special tokens split (as plain characters). The text is cut only where the tokenizer would cut it itself,
    so a prompt whose user text holds no special-token string gets the ids of ``tokenizer(prompt)``."""
    pieces = split_controls(prompt, [placeholder, *special_tokens(tokenizer)])
    runs = tokenizer(pieces[0::2], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = list(runs[0])
    for control, run in zip(pieces[1::2], runs[1:]):
        ids.append(None if control == placeholder else tokenizer.convert_tokens_to_ids(control))
        ids += run
    return ids


def fill_placeholders(ids: list[int | None], fills: list[list[int]], placeholder: str) -> list[int]:
    """Replace the i-th None in ``ids`` by ``fills[i]`` (one fill per image given)."""
    n = ids.count(None)
    if n != len(fills):
        raise InputError(f"the prompt has {n} {placeholder} placeholders but {len(fills)} images were given")
    fills = iter(fills)
    return [t for x in ids for t in (next(fills) if x is None else [x])]


# ------------------------------------------------------------------------------------ batches
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "chat_template.json", "preprocessor_config.json")


def load_tokenizer(folder: Path):
    """transformers' tokenizer of a local folder, without the warnings it prints about configs of model types it
    does not know (MoE-LLaVA's config.json) or about defaults that change nothing here."""
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from moevl.model.checkpoint import read_json

    for name in TOKENIZER_JSON_FILES:  # transformers' own errors for a broken file do not name it
        if (Path(folder) / name).is_file():
            read_json(Path(folder) / name)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


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
