"""Family-agnostic generation: prefill, then one token at a time, with sampling, stopping and streaming.

A model family plugs in through two methods (see ``moevl.model.session``): ``prefill(batch, max_len)`` returns the
logits of the last prompt position [B, V], and ``decode(tokens [B])`` those of the next position.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch


@dataclasses.dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1 (--max-new-tokens), "
                             f"not {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, 0 meaning greedy (--temperature), "
                             f"not {self.temperature!r}")
        if not 0 < self.top_p <= 1:  # also false for NaN
            raise ValueError(f"top_p must be in (0, 1] (--top-p), not {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0, 0 disabling it (--top-k), not {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2 ** 64):
            raise ValueError(f"seed must be a whole number in [0, 2**64 - 1] (--seed), not {self.seed!r}")


class NonFiniteLogitsError(ValueError):
    """The network computed NaN/inf: generating from it would print garbage (or nothing) and exit 0."""


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[list[int]]
    texts: list[str]
    ttft_ms: float
    decode_ms: float
    decode_tokens: int
    prompt_tokens: list[int]
    finish_reasons: list[str]

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 * self.decode_tokens / self.decode_ms if self.decode_ms > 0 else float("nan")


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (fp32) -> next token ids [B]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TextStreamer:
    """Turns growing token lists into printable text deltas (whole characters only)."""

    def __init__(self, tokenizer, batch: int):
        self.tokenizer = tokenizer
        self.printed = [""] * batch

    def delta(self, i: int, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        new = text[len(self.printed[i]):]
        self.printed[i] = text
        return new


def generate(session, batch, cfg: GenerationConfig, on_text: Callable[[int, str], None] | None = None,
             ) -> GenerationResult:
    """Run one batch of requests to completion.

    ``session`` is a family's session object: prefill/decode, ``tokenizer``, ``eos_token_ids``,
    ``pad_token_id``, ``device`` (an ascend Device) and ``max_context``.
    """
    cfg.validate()
    dev = session.device
    b = batch.batch_size
    prompt_len = batch.input_ids.shape[1]
    if prompt_len + cfg.max_new_tokens > session.max_context:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the context of "
            f"{session.max_context} tokens: lower --max-new-tokens or shorten the prompt")
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    eos = torch.tensor(sorted(session.eos_token_ids), device=dev.torch_device)
    streamer = TextStreamer(session.tokenizer, b) if on_text else None

    out = [[] for _ in range(b)]
    reasons = ["length"] * b
    finished = torch.zeros(b, dtype=torch.bool, device=dev.torch_device)
    dev.synchronize()
    t0 = time.perf_counter()
    logits = session.prefill(batch, prompt_len + cfg.max_new_tokens)
    if not bool(torch.isfinite(logits).all()):  # one check, at the first step: later NaN would follow from these
        raise NonFiniteLogitsError(
            "the model produced non-finite logits (NaN/inf) for the first token: its weights hold NaN/inf or "
            "overflow in this dtype; check the checkpoint (a re-download or re-save) or run with --dtype fp32")
    decode_start = None
    steps = 0
    for step in range(cfg.max_new_tokens):
        tok = sample(logits.float().cpu() if gen is not None else logits.float(), cfg, gen).to(dev.torch_device)
        tok = torch.where(finished, torch.full_like(tok, session.pad_token_id), tok)
        is_eos = torch.isin(tok, eos)
        tok_list, eos_list, fin_list = tok.tolist(), is_eos.tolist(), finished.tolist()  # one sync per token
        if decode_start is None:
            ttft = (time.perf_counter() - t0) * 1000.0
            decode_start = time.perf_counter()
        for i in range(b):
            if fin_list[i]:
                continue
            if eos_list[i]:
                reasons[i] = "eos"
                continue
            out[i].append(tok_list[i])
            if streamer:
                d = streamer.delta(i, out[i])
                if d:
                    on_text(i, d)
        finished = finished | is_eos
        if bool(finished.all()) or step == cfg.max_new_tokens - 1:
            break
        logits = session.decode(tok)
        steps += 1
    dev.synchronize()
    decode_ms = (time.perf_counter() - decode_start) * 1000.0
    texts = [session.tokenizer.decode(ids, skip_special_tokens=True) for ids in out]
    if streamer:  # what was held back waiting for a complete character
        for i, text in enumerate(texts):
            if len(text) > len(streamer.printed[i]):
                on_text(i, text[len(streamer.printed[i]):])
    lens = batch.attention_mask.sum(-1).tolist()
    decoded = sum(max(len(ids) - 1, 0) for ids in out)  # tokens that came out of decode steps
    return GenerationResult(out, texts, ttft, decode_ms, decoded, [int(x) for x in lens], reasons)
