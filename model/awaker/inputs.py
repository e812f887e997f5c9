"""Pre-processing for the Awaker/Qwen2-VL family: prompts and images -> the tensors the network needs.

Everything data-dependent lives here (it runs once per request, before the network): the expansion of
``<|image_pad|>``, left padding, Qwen2-VL's M-RoPE position ids, the vision tower's 2-D position ids and
block-diagonal attention mask, and the routers' prompt span.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from moevl.model.awaker.config import AwakerConfig
from moevl.model.request import (ChatPrompt, InputError, check_image_lists, check_prompt_length, encode_prompt,
                                 fill_placeholders, image_name, left_pad, load_image, load_tokenizer, render_chat)


@dataclasses.dataclass
class AwakerBatch:
    input_ids: torch.Tensor        # [B, L] left-padded
    attention_mask: torch.Tensor   # [B, L] 1 = real token
    positions: torch.Tensor        # [3, B, L] M-RoPE position ids (0 on padding)
    next_position: torch.Tensor    # [B] the text position of the first generated token
    span: torch.Tensor             # [B, 2] routers' prompt span [start, end) in padded coordinates
    image_mask: torch.Tensor       # [B, L] bool: image-pad positions
    patches: torch.Tensor | None   # [N, C*t*p*p]
    grid_thw: torch.Tensor | None  # [num_images, 3]
    vision_pos: torch.Tensor | None   # [N, 2]
    vision_keep: torch.Tensor | None  # [N, N] bool

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device):
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return AwakerBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


# ------------------------------------------------------------------------------------ positions
def mrope_positions(ids: list[int], grids: list[tuple[int, int, int]], cfg: AwakerConfig):
    """Qwen2-VL's 3-axis position ids for one unpadded sequence -> ([3, L] tensor, next text position).

    Text tokens count up on all three axes; an image's tokens get (t, row, col) offsets from the position
    where the image starts; the text after it continues from the largest position used + 1.
    """
    merge = cfg.vision.spatial_merge_size
    out = []
    pos, i, img = 0, 0, 0
    n = len(ids)
    while i < n:
        if ids[i] == cfg.image_token_id:
            t, h, w = grids[img]
            gh, gw = h // merge, w // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            out.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos)
            count = t * gh * gw
            if ids[i:i + count] != [cfg.image_token_id] * count:
                raise InputError(f"image {img} needs {count} image-pad tokens in a row")
            i += count
            pos += max(gh, gw)  # as transformers' get_rope_index (the temporal extent is not counted)
            img += 1
        else:
            j = i
            while j < n and ids[j] != cfg.image_token_id:
                j += 1
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
    if img != len(grids):
        raise InputError(f"{len(grids)} images given but the prompt has image-pad runs for {img}")
    positions = torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)
    return positions, int(positions.max()) + 1 if n else 0


def prompt_span(ids: list[int], cfg: AwakerConfig) -> tuple[int, int]:
    """The routers' span [start, end) of one unpadded sequence, by the original's rule (notes/awaker.md).

    start: the first <|vision_start|> if the sample has an image, else the 2nd <|im_start|> + 2 (skipping
    "<|im_start|>user"); end: the 2nd <|im_end|> (the end of the first user turn), exclusive.
    """
    starts = [i for i, t in enumerate(ids) if t == cfg.im_start_token_id]
    ends = [i for i, t in enumerate(ids) if t == cfg.im_end_token_id]
    if len(ends) < 2 or len(starts) < 2:
        raise InputError(
            "the prompt must be a chat with a system turn and a user turn (two <|im_start|> ... <|im_end|> "
            "pairs) so that the router can find the user's question; build it with the chat template")
    if cfg.vision_start_token_id in ids:
        start = ids.index(cfg.vision_start_token_id)
    else:
        start = starts[1] + 2
    end = ends[1]
    if not start < end:
        raise InputError(f"empty router span [{start}, {end}) in the prompt")
    return start, end


def vision_inputs(grid_thw: torch.Tensor, merge: int):
    """2-D position ids [N, 2] in the processor's patch order and the block-diagonal keep mask [N, N]."""
    pos, seg = [], []
    s = 0
    for t, h, w in grid_thw.tolist():
        hp, wp = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hp = hp.reshape(shape).transpose(1, 2).flatten()
        wp = wp.reshape(shape).transpose(1, 2).flatten()
        pos.append(torch.stack([hp, wp], dim=-1).repeat(t, 1))
        for _ in range(t):  # attention stays inside one frame of one image
            seg.append(torch.full((h * w,), s))
            s += 1
    seg = torch.cat(seg)
    return torch.cat(pos), seg[:, None] == seg[None, :]


# ------------------------------------------------------------------------------------ processor
_SPECIAL = {"im_start_token_id": "<|im_start|>", "im_end_token_id": "<|im_end|>",
            "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
            "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>", "pad_token_id": "<|endoftext|>"}


def bind_special_tokens(cfg: AwakerConfig, tokenizer, folder) -> None:
    """Take the chat/vision token ids from the tokenizer; the ones the config names too must agree."""
    ids = {}
    for field, token in _SPECIAL.items():
        tid = tokenizer.convert_tokens_to_ids(token)
        # an id equal to unk is a missing token, unless the token IS the unk token (a tokenizer_config.json without
        # unk_token defaults it to <|endoftext|>, which Qwen2-VL does have)
        if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise InputError(f"the tokenizer in {folder} has no {token} token: not a Qwen2-VL tokenizer")
        ids[field] = tid
    for field in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
        if getattr(cfg, field) != ids[field]:
            raise InputError(f"config {field} = {getattr(cfg, field)} but the tokenizer in {folder} maps "
                             f"{_SPECIAL[field]} to {ids[field]}: config and tokenizer are from different models")
    for field, tid in ids.items():
        setattr(cfg, field, tid)
    cfg.eos_token_ids = (ids["im_end_token_id"], ids["pad_token_id"])


class AwakerProcessor:
    """Tokenizer + chat template + Qwen2-VL image processor, loaded from a checkpoint folder.

    We use transformers' tokenizer and ``Qwen2VLImageProcessorPil`` directly rather than
    ``Qwen2VLProcessor``: the latter insists on a video processor, which needs torchvision, and PyPI's
    torchvision does not import beside the torch 2.13 CPU wheel. The image-pad expansion it would do is
    three lines here.
    """

    def __init__(self, tokenizer, image_processor, cfg: AwakerConfig,
                 system_prompt: str = "You are a helpful assistant."):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg
        self.system_prompt = system_prompt
        self.folder: Path | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, cfg: AwakerConfig) -> "AwakerProcessor":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
            raise InputError(f"{folder} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
        tok = load_tokenizer(folder)
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            conf = json.loads(pre.read_text())
            keep = {k: conf[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                         "image_std", "min_pixels", "max_pixels", "size") if k in conf}
            if "min_pixels" in keep and "size" in keep:
                keep.pop("size")
            imp = Qwen2VLImageProcessorPil(**keep)
        else:
            imp = Qwen2VLImageProcessorPil()
        bind_special_tokens(cfg, tok, folder)
        proc = cls(tok, imp, cfg)
        proc.folder = folder
        return proc

    def chat(self, question: str, num_images: int = 1, history: list[tuple[str, str]] | None = None) -> ChatPrompt:
        """The prompt for one question (with optional earlier turns), with the generation prompt. The question and
        the turns are the user's text: ``__call__`` tokenizes them as plain characters, special-token strings
        included, so they cannot open or close turns and move the routers' span."""
        history = list(history or [])

        def render(texts: list[str]) -> str:  # texts: the turns' questions and answers, then the question
            msgs = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}]
            for k in range(len(history)):
                msgs.append({"role": "user", "content": [{"type": "text", "text": texts[2 * k]}]})
                msgs.append({"role": "assistant", "content": [{"type": "text", "text": texts[2 * k + 1]}]})
            if history and num_images:
                # images belong to the first user turn, where the router looks
                msgs[1]["content"] = [{"type": "image"}] * num_images + msgs[1]["content"]
                msgs.append({"role": "user", "content": [{"type": "text", "text": texts[-1]}]})
            else:
                msgs.append({"role": "user", "content": [{"type": "image"}] * num_images
                             + [{"type": "text", "text": texts[-1]}]})
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

        return render_chat(render, [text for turn in history for text in turn] + [question])

    def __call__(self, prompts: list[str], images: list[list] | None = None,
                 max_length: int | None = None) -> AwakerBatch:
        """Prompts (from ``chat``; a plain string is taken as all template) and each prompt's images -> a batch."""
        cfg = self.cfg
        images = check_image_lists(prompts, images)
        merge = cfg.vision.spatial_merge_size
        all_patches, grids, seqs = [], [], []
        image_token = self.tokenizer.convert_ids_to_tokens(cfg.image_token_id)
        for prompt, sources in zip(prompts, images):
            sample_grids = []
            if sources:
                out = self.process_images(sources)
                all_patches.append(out["pixel_values"])
                sample_grids = [tuple(g) for g in out["image_grid_thw"].tolist()]
            fills = [[cfg.image_token_id] * (t * h * w // merge ** 2) for t, h, w in sample_grids]
            ids = fill_placeholders(encode_prompt(self.tokenizer, prompt, image_token), fills, image_token)
            check_prompt_length(len(ids), max_length,
                                "shorten the question, use a smaller image, or raise --max-context")
            seqs.append(ids)
            grids.extend(sample_grids)
        return collate(seqs, grids, all_patches, cfg)

    def process_images(self, sources: list) -> dict:
        """One prompt's images (paths or PIL images) -> the image processor's pixel_values and image_grid_thw."""
        imgs = [load_image(im) for im in sources]
        try:
            return self.image_processor(images=imgs, return_tensors="pt")
        except ValueError as e:
            if "aspect ratio" not in str(e):
                raise
            # Qwen2-VL's smart_resize refuses long thin images; name the thinnest one
            k = max(range(len(imgs)), key=lambda k: max(imgs[k].size) / min(imgs[k].size))
            w, h = imgs[k].size
            raise InputError(f"{image_name(sources[k])} is {w}x{h} pixels, too long and thin for Qwen2-VL's image "
                             f"processor ({e}): crop it, or pad it nearer to square") from e


def collate(seqs: list[list[int]], grids, all_patches, cfg: AwakerConfig) -> AwakerBatch:
    """Left-pad a batch and compute positions, spans and vision inputs (``all_patches`` None: the images' tower
    output is at hand elsewhere; the batch keeps their grids, without patches and the tower's inputs)."""
    input_ids, mask = left_pad(seqs, cfg.pad_token_id)
    b, length = input_ids.shape
    positions = torch.zeros(3, b, length, dtype=torch.long)
    next_pos = torch.zeros(b, dtype=torch.long)
    span = torch.zeros(b, 2, dtype=torch.long)
    g = 0
    for i, ids in enumerate(seqs):
        off = length - len(ids)
        n_img = sum(1 for j, t in enumerate(ids) if t == cfg.image_token_id
                    and (j == 0 or ids[j - 1] != cfg.image_token_id))
        pos, nxt = mrope_positions(ids, grids[g:g + n_img], cfg)
        g += n_img
        positions[:, i, off:] = pos
        next_pos[i] = nxt
        s, e = prompt_span(ids, cfg)
        span[i] = torch.tensor([s + off, e + off])
    grid_t = torch.tensor(grids, dtype=torch.long) if grids else None
    if grid_t is not None and all_patches is not None:
        vpos, vkeep = vision_inputs(grid_t, cfg.vision.spatial_merge_size)
        patches = torch.cat(all_patches)
    else:
        vpos = vkeep = patches = None
    return AwakerBatch(input_ids, mask, positions, next_pos, span, input_ids == cfg.image_token_id,
                       patches, grid_t, vpos, vkeep)


def pooled_prompt(embeds: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Mean of embeds [B, L, H] over each request's span [B, 2] -> [B, H] (fp32), without Python loops."""
    idx = torch.arange(embeds.shape[1], device=embeds.device)
    sel = (idx[None] >= span[:, :1]) & (idx[None] < span[:, 1:])  # [B, L]
    w = sel.float() / sel.sum(-1, keepdim=True).float()
    return (w[..., None] * embeds.float()).sum(1)
