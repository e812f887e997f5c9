"""Pre-processing for MoE-LLaVA: prompts and images -> the tensors the network needs.

The original splices the image features into the embedding sequence where the ``<image>`` sentinel (-200) was.
We expand the sentinel here instead, to one -200 per image token, so the sequence has its final length before the
network runs (static shapes, plain left padding); ``MoeLlavaModel.embed`` writes the features there.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from moevl.model.request import (ChatPrompt, InputError, check_image_lists, check_prompt_length, encode_prompt,
                                 fill_placeholders, left_pad, load_image, load_tokenizer)
from moevl.model.moe_llava.config import IMAGE_TOKEN_INDEX, SYSTEM_PROMPT, MoeLlavaConfig

IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass
class MoeLlavaBatch:
    input_ids: torch.Tensor        # [B, L] left-padded; IMAGE_TOKEN_INDEX (-200) at image-token positions
    attention_mask: torch.Tensor   # [B, L] 1 = real token
    positions: torch.Tensor        # [B, L] 0.. over the real tokens (0 on padding)
    next_position: torch.Tensor    # [B] position of the first generated token
    pixels: torch.Tensor | None    # [images, 3, S, S], in request order

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def image_mask(self) -> torch.Tensor:
        return self.input_ids == IMAGE_TOKEN_INDEX

    def to(self, device):
        return MoeLlavaBatch(*(v.to(device) if isinstance(v, torch.Tensor) else v
                               for v in (self.input_ids, self.attention_mask, self.positions, self.next_position,
                                         self.pixels)))


def expand2square(image, background):
    """Pad to a square with ``background`` (the processor's mean colour), image centred, as the original."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def image_processor_from_dict(conf: dict, kind: str):
    """transformers' CLIP / SigLIP image processor (PIL backends: torchvision does not import beside torch 2.13)."""
    keep = {k: conf[k] for k in ("size", "crop_size", "do_center_crop", "do_resize", "do_rescale", "rescale_factor",
                                 "do_normalize", "image_mean", "image_std", "resample", "do_convert_rgb")
            if k in conf}
    if kind == "siglip":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil(**keep)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**keep)


class MoeLlavaProcessor:
    """Tokenizer + the original's prompt format + pad-to-square + CLIP/SigLIP image processor."""

    def __init__(self, tokenizer, image_processor, cfg: MoeLlavaConfig, system_prompt: str = SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg
        self.system_prompt = system_prompt
        self.folder: Path | None = None
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []

    @classmethod
    def from_folder(cls, folder: str | Path, cfg: MoeLlavaConfig, preprocessor: dict | None = None):
        """Tokenizer from ``folder``; image processor settings from ``preprocessor`` (a preprocessor_config.json
        dict, e.g. from the vision tower folder) or ``folder``'s own preprocessor_config.json."""

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
            raise InputError(f"{folder} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
        tok = load_tokenizer(folder)
        if preprocessor is None:
            pre = folder / "preprocessor_config.json"
            if not pre.is_file():
                raise InputError(f"{folder} has no preprocessor_config.json: pass the vision tower folder "
                                 "(--vision-tower) whose image processor settings to use")
            preprocessor = json.loads(pre.read_text())
        proc = cls(tok, image_processor_from_dict(preprocessor, cfg.vision.kind), cfg)
        proc.folder = folder
        return proc

    def chat(self, question: str, num_images: int = 1) -> ChatPrompt:
        """The original's conv template (phi / stablelm are the same): '{system} USER: <image>\\n{q} ASSISTANT:'.
        The question is the user's text: tokenized as plain characters (an ``<image>`` or ``<|endoftext|>`` typed
        in it stays text)."""
        head = f"{self.system_prompt} USER: {(IMAGE_PLACEHOLDER + chr(10)) * num_images}"
        return ChatPrompt(f"{head}{question} ASSISTANT:", [(len(head), len(head) + len(question))])

    def tokenize(self, prompt: str, num_images: int | None = None) -> list[int]:
        """As the original's tokenizer_image_token: the text between <image> placeholders tokenized apart, the
        sentinel between, expanded here to one sentinel per image token. ``num_images``: the images given (checked
        against the placeholders); None: as many as the prompt has placeholders."""
        ids = encode_prompt(self.tokenizer, prompt, IMAGE_PLACEHOLDER)
        n = ids.count(None) if num_images is None else num_images
        sentinels = [IMAGE_TOKEN_INDEX] * self.cfg.vision.num_image_tokens
        return list(self.bos) + fill_placeholders(ids, [sentinels] * n, IMAGE_PLACEHOLDER)

    def pixels(self, images) -> torch.Tensor:
        ims = [load_image(im) for im in images]
        if self.cfg.image_aspect_ratio == "pad":
            mean = tuple(int(x * 255) for x in self.image_processor.image_mean)
            ims = [expand2square(im, mean) for im in ims]
        px = self.image_processor(images=ims, return_tensors="pt")["pixel_values"]
        s = self.cfg.vision.image_size
        if tuple(px.shape[1:]) != (3, s, s):
            raise InputError(f"the image processor gives {tuple(px.shape[1:])} pixels but the tower expects "
                             f"(3, {s}, {s}): its preprocessor_config.json does not belong to this tower")
        return px

    def __call__(self, prompts: list[str], images: list[list] | None = None,
                 max_length: int | None = None) -> MoeLlavaBatch:
        images = check_image_lists(prompts, images)
        seqs, all_images = [], []
        for prompt, imgs in zip(prompts, images):
            ids = self.tokenize(prompt, num_images=len(imgs))
            check_prompt_length(len(ids), max_length, "shorten the question or raise --max-context")
            seqs.append(ids)
            all_images.extend(imgs)
        return collate(seqs, self.pixels(all_images) if all_images else None, self.cfg.pad_token_id)


def collate(seqs: list[list[int]], pixels, pad_token_id: int) -> MoeLlavaBatch:
    """Left-pad; positions count the real tokens of each request from 0."""
    input_ids, mask = left_pad(seqs, pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return MoeLlavaBatch(input_ids, mask, positions, mask.sum(-1), pixels)
