"""Training examples -> the batches the networks take, and the one forward pass training runs.

A record is one question about one image in the LLaVA conversation format (``moevl.train.data``). Its prompt is
built by the family's own processor exactly as at inference (``processor.chat`` then ``processor(...)``: the chat
template, the image-pad expansion, M-RoPE positions, the routers' prompt span); the answer's tokens and the turn's
end token are appended after it, and only they are scored. The forward pass is the model's own modules in the order
the inference session calls them (``AwakerSession._prefill`` / ``MoeLlavaSession._prefill``), without a KV cache.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moevl.model.session import attention_keep

IGNORE = -100  # label of the positions that are not scored


# What a network can do decides how it is trained; the family's name is not compared here (moevl.model.family is
# the one place that maps names to families).
def routes_per_request(model) -> bool:
    """Awaker's LoRA-MoE: routers fed once per request from the prompt (stages 1-3 of its recipe)."""
    return hasattr(model, "route")


def has_moe_layers(model) -> bool:
    """MoE-LLaVA's network: top-k FFN experts routed per token (MoE-tuning, the load-balancing loss)."""
    return hasattr(model, "moe_layer_indices")


@dataclasses.dataclass
class Record:
    """One question about one image."""

    question: str
    answer: str
    image: Path
    task: str = ""
    lang: str = ""
    scene: dict | None = None  # the shapes data set's annotation of the image (``--stage vision``)


def read_records(path: str | Path) -> list[Record]:
    """A LLaVA-format JSON file (``moevl.train.data.load_records`` checks it) -> the records with an image."""
    from moevl.train.data import answer_text, load_records, question_text

    out = [Record(question_text(r), answer_text(r), Path(r["image_path"]), r.get("task", ""), r.get("lang", ""),
                  r.get("scene"))
           for r in load_records(path) if r.get("image_path")]
    if not out:
        raise ValueError(f"--data {path} has no record with an image: training needs image questions")
    return out


# ----------------------------------------------------------------------------------------------- batches
def answer_ids(family: str, tokenizer, cfg, answer: str) -> list[int]:
    """The tokens the model must generate for ``answer``, with the token that ends its turn."""
    if hasattr(cfg, "im_end_token_id"):  # Qwen2-VL's chat template: the turn ends with <|im_end|>
        return tokenizer(answer, add_special_tokens=False)["input_ids"] + [cfg.im_end_token_id]
    # MoE-LLaVA's template: "... ASSISTANT: {answer}<|endoftext|>"
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [cfg.eos_token_ids[0]]


def make_batch(family: str, processor, records: list[Record]):
    """-> (the family's batch of prompt + answer, labels [B, L] with IGNORE outside the answers)."""
    cfg = processor.cfg
    pb = _prompts(processor, records)
    answers = [answer_ids(family, processor.tokenizer, cfg, r.answer) for r in records]
    prompts = [row[mask.bool()].tolist() for row, mask in zip(pb.input_ids, pb.attention_mask)]
    if hasattr(pb, "grid_thw"):  # Qwen2-VL's processor: patches + grids
        return _collate(processor, prompts, answers, [tuple(g) for g in pb.grid_thw.tolist()], [pb.patches])
    return _collate(processor, prompts, answers, None, pb.pixels)


def _prompts(processor, records: list[Record]):
    """The records' questions and images as the processor builds an inference request of them."""
    return processor([processor.chat(r.question, num_images=1) for r in records], [[r.image] for r in records])


def _collate(processor, prompts: list[list[int]], answers: list[list[int]], grids, images):
    """Prompt ids + answer ids -> (batch, labels). grids: Awaker's image grids (None for MoE-LLaVA); images: the
    patches (Awaker: a list of tensors) or pixels, or None (the tower's output comes from a ``TowerCache``)."""
    cfg = processor.cfg
    seqs = [p + a for p, a in zip(prompts, answers)]
    if grids is not None:
        from moevl.model.awaker.inputs import collate

        batch = collate(seqs, grids, images, cfg)
    else:
        from moevl.model.moe_llava.inputs import collate

        batch = collate(seqs, images, cfg.pad_token_id)
    labels = torch.full_like(batch.input_ids, IGNORE)
    for i, ans in enumerate(answers):  # left-padded: every answer ends its row
        labels[i, -len(ans):] = torch.tensor(ans)
    return batch, labels


def tower_prefixes(model) -> tuple[str, ...]:
    """The names of the vision tower's own parameters (not its merger / projector): what ``--freeze-vision`` keeps."""
    return ("visual.blocks.", "visual.patch_embed.") if hasattr(model, "visual") else ("vision_tower.",)


class TowerCache:
    """Per record: its prompt's token ids, its image's grid and the vision tower's output before the merger /
    projector, computed the first time training draws the record and reused by every later epoch: for the stages
    that train nothing in the tower (stage 0 with the tower frozen, 1, 2, 3, moe), where a step otherwise spends
    about half its time decoding, resizing and re-encoding images. The same batches and, up to fp32 rounding, the
    same features as ``make_batch`` + ``forward`` (tests/test_train_cache.py checks both).

    ``max_bytes``: once the cached features reach it, further records are computed each time they are drawn."""

    def __init__(self, family: str, model, processor, max_bytes: int):
        self.family, self.model, self.processor, self.max_bytes = family, model, processor, max_bytes
        self.entries: dict = {}      # record key -> (prompt ids, grid or None, tower output [tokens, dim] on CPU)
        self.answers: dict = {}      # answer text -> ids (answers repeat: colours, shapes, positions, counts)
        self.bytes = 0

    def batch(self, records: list[Record], keys: list) -> tuple:
        """records and a key per record (the same key for the same record) -> (batch, labels, tower output: Awaker
        [all image patches, dim], MoE-LLaVA [images, tokens, dim])."""
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        fresh = dict(zip((keys[i] for i in missing), self._encode([records[i] for i in missing]))) if missing else {}
        rows = [self.entries[k] if k in self.entries else fresh[k] for k in keys]
        for k, row in fresh.items():
            size = row[2].numel() * row[2].element_size()
            if self.bytes + size <= self.max_bytes:
                self.entries[k] = row
                self.bytes += size
        cfg = self.processor.cfg
        answers = []
        for r in records:
            if r.answer not in self.answers:
                self.answers[r.answer] = answer_ids(self.family, self.processor.tokenizer, cfg, r.answer)
            answers.append(self.answers[r.answer])
        prompts = [row[0] for row in rows]
        if rows[0][1] is not None:  # Awaker: per-image grids, patches concatenated
            batch, labels = _collate(self.processor, prompts, answers, [row[1] for row in rows], None)
            return batch, labels, torch.cat([row[2] for row in rows])
        batch, labels = _collate(self.processor, prompts, answers, None, None)
        return batch, labels, torch.stack([row[2] for row in rows])

    @torch.no_grad()
    def _encode(self, records: list[Record]) -> list[tuple]:
        """The processor's prompt ids and the tower's output, image by image (as ``encode_images_apart``)."""
        p, m = self.processor, self.model
        pb = _prompts(p, records)
        dev = next(m.parameters()).device
        rows, start = [], 0
        for i, (ids, mask) in enumerate(zip(pb.input_ids, pb.attention_mask)):
            prompt = ids[mask.bool()].tolist()
            if hasattr(pb, "grid_thw"):
                t, h, w = pb.grid_thw[i].tolist()
                end = start + t * h * w
                out = m.visual.blocks_out(pb.patches[start:end].to(dev, m.lm_head.weight.dtype),
                                          pb.vision_pos[start:end].to(dev),
                                          pb.vision_keep[start:end, start:end].to(dev))
                rows.append((prompt, (t, h, w), out.cpu()))
                start = end
            else:
                out = m.vision_tower(pb.pixels[i:i + 1].to(dev, m.lm_head.weight.dtype))[0]
                rows.append((prompt, None, out.cpu()))
        return rows


# ----------------------------------------------------------------------------------------------- forward
@dataclasses.dataclass
class ForwardOut:
    hidden: torch.Tensor      # [B, L, H] after the final norm
    aux_loss: torch.Tensor    # MoE-LLaVA's load-balancing loss (0 for Awaker)
    experts: dict             # router name -> chosen expert [B] (Awaker) or top-1 counts (MoE-LLaVA)


def forward(family: str, model, batch, tower_out=None) -> ForwardOut:
    """The network over whole sequences (no KV cache), as inference's prefill computes them. ``tower_out``: the
    images' vision-tower output before the merger / projector, from a ``TowerCache`` (the batch has no pixels)."""
    length = batch.input_ids.shape[1]
    keep = attention_keep(batch.attention_mask.bool(), torch.arange(length, device=batch.input_ids.device))
    if routes_per_request(model):
        from moevl.model.awaker.inputs import pooled_prompt

        feats = None
        if tower_out is not None:
            feats = model.visual.merge(tower_out)
        elif batch.patches is not None:
            feats = encode_images_apart(model, batch)
        embeds = model.embed(batch.input_ids, feats, batch.image_mask)
        routing = model.route(pooled_prompt(embeds, batch.span)) if model.has_adapters else None
        hidden = model(embeds, batch.positions, None, keep, routing)
        experts = {}
        for i, r in enumerate(routing or []):
            experts[f"layer{i}.attn"] = r.attn_expert.detach()
            experts[f"layer{i}.mlp"] = r.mlp_expert.detach()
        return ForwardOut(hidden, hidden.new_zeros(()), experts)
    feats = None
    if tower_out is not None:
        feats = model.mm_projector(tower_out)
    elif batch.pixels is not None:
        feats = model.encode_images(batch.pixels)
    embeds = model.embed(batch.input_ids, feats, batch.image_mask)
    hidden, chosen = model(embeds, batch.positions, None, keep)
    real = batch.attention_mask.bool().reshape(-1)
    aux = hidden.new_zeros((), dtype=torch.float32)
    for i in chosen:
        aux = aux + load_balancing_loss(model.model.layers[i].mlp.last_routing, real)
    return ForwardOut(hidden, aux, {f"layer{i}": idx.detach() for i, idx in chosen.items()})


def encode_images_apart(model, batch) -> torch.Tensor:
    """The vision tower image by image: the same features as one call over the batch (its attention mask is block-
    diagonal per image), without the [all patches]^2 attention a whole training batch would cost."""
    feats, start = [], 0
    for t, h, w in batch.grid_thw.tolist():
        end = start + t * h * w
        feats.append(model.encode_images(batch.patches[start:end], batch.vision_pos[start:end],
                                         batch.vision_keep[start:end, start:end]))
        start = end
    return torch.cat(feats)


def load_balancing_loss(info, real: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's top-2 gating auxiliary loss (what MoE-LLaVA trains with): E * sum_e mean_prob_e * frac_top1_e,
    over the real (non-padding) tokens. info: the MoE layer's RoutingInfo; real [N] bool."""
    probs = info.probs[real]                                     # [n, E]
    e = probs.shape[-1]
    top1 = torch.nn.functional.one_hot(info.expert_idx[real, 0], e).float()
    return (probs.mean(0) * top1.mean(0)).sum() * e


LOSS_AVERAGES = ("token", "record")


def loss_of(family: str, model, batch, labels, tower_out=None, average: str = "token"
            ) -> tuple[torch.Tensor, ForwardOut]:
    """Cross-entropy over the answer tokens (position t predicts token t + 1).

    average: "token", the mean over every answer token of the batch (LLaVA's, transformers' default); "record", the
    mean of each record's own token mean (every record weighs the same, whatever its answer's length: a one-token
    answer is not outweighed by a 30-token caption in a mixed batch)."""
    if average not in LOSS_AVERAGES:
        raise ValueError(f"loss average must be one of {', '.join(LOSS_AVERAGES)}, not {average!r}")
    out = forward(family, model, batch, tower_out)
    target = labels[:, 1:]
    sel = target != IGNORE
    logits = model.logits(out.hidden[:, :-1][sel])  # only the scored positions reach the vocabulary projection
    if average == "token":
        return torch.nn.functional.cross_entropy(logits, target[sel]), out
    per_token = torch.nn.functional.cross_entropy(logits.float(), target[sel], reduction="none")
    rows = sel.nonzero()[:, 0]                     # the record of each scored token (row-major, as the selection)
    counts = sel.sum(1)
    per_record = torch.zeros(sel.shape[0], dtype=per_token.dtype, device=per_token.device).index_add_(
        0, rows, per_token)
    scored = counts > 0
    return (per_record[scored] / counts[scored]).mean(), out
