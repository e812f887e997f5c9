"""Family-agnostic generation: prefill, then one token at a time, with sampling, stopping and streaming.

A model family plugs in through two methods (see ``moevl.model.session``): ``prefill(batch, max_len)`` returns the
logits of the last prompt position [B, V], and ``decode(tokens [B])`` those of the next position.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch


@dataclasses.dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0  # transformers' rule: a seen token's logit is divided (>0) or multiplied (<0)

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
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, 1 disabling it "
                             f"(--repetition-penalty), not {self.repetition_penalty!r}")


SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
GENERATION_CONFIG = "generation_config.json"


def read_generation_config(path: Path) -> dict:
    """A Hugging Face ``generation_config.json`` -> the sampling defaults it sets, honoured as transformers'
    ``generate`` honours them (and vLLM's ``--generation-config auto``): temperature / top_p / top_k only when
    ``do_sample`` is true (else greedy), repetition_penalty and max_new_tokens always. A request's own values win.
    Invalid JSON or values -> ConfigError naming the file."""
    from moevl.model.checkpoint import ConfigError, read_json

    try:
        data = read_json(path)
    except ConfigError as e:
        raise ConfigError(f"{e}; fix or delete it, or pass --no-generation-config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}: fix or delete it, or pass "
                          "--no-generation-config")
    out = {k: data[k] for k in ("repetition_penalty", "max_new_tokens") if data.get(k) is not None}
    if data.get("do_sample"):
        out.update({k: data[k] for k in ("temperature", "top_p", "top_k") if data.get(k) is not None})
    else:
        out["temperature"] = 0.0  # transformers' default do_sample=False: greedy whatever temperature says
    try:
        GenerationConfig(**out).validate()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}; fix the file or pass --no-generation-config") from None
    return out


def resolve_generation(defaults: dict, given: dict) -> tuple[GenerationConfig, dict]:
    """(the model's defaults, the request's values; None = not given) -> (GenerationConfig, settings), where
    settings holds every sampling value used and, under "source", where each came from: "request",
    "generation_config.json" or "default" (the kit's own)."""
    fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}: the options are {sorted(fields)}")
    picked = {k: v for k, v in given.items() if v is not None}
    cfg = GenerationConfig(**{**defaults, **picked})
    cfg.validate()
    settings = {k: getattr(cfg, k) for k in SAMPLING_FIELDS + ("seed",)}
    settings["source"] = {k: "request" if k in picked else GENERATION_CONFIG if k in defaults else "default"
                          for k in SAMPLING_FIELDS}
    return cfg, settings


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
    settings: dict = dataclasses.field(default_factory=dict)  # the sampling values used (see resolve_generation)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 * self.decode_tokens / self.decode_ms if self.decode_ms > 0 else float("nan")


def penalise_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: logits [B, V] of tokens already seen (seen [B, V] bool:
    the request's real prompt tokens and what it generated) are divided by ``penalty`` when positive and
    multiplied when negative."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (fp32) -> next token ids [B]. ``seen`` [B, V]: tokens the repetition penalty applies to."""
    if seen is not None:
        logits = penalise_repetition(logits, seen.to(logits.device), cfg.repetition_penalty)
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
    seen = None
    if cfg.repetition_penalty != 1.0:  # the real (unpadded) prompt tokens of each request, then what it generates
        vocab = logits.shape[-1]
        ids = batch.input_ids.cpu().clamp(0, vocab - 1)
        seen = torch.zeros(b, vocab, dtype=torch.long).scatter_add_(1, ids, batch.attention_mask.cpu().long()) > 0
    decode_start = None
    steps = 0
    for step in range(cfg.max_new_tokens):
        host = gen is not None or seen is not None
        tok = sample(logits.float().cpu() if host else logits.float(), cfg, gen, seen).to(dev.torch_device)
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
            if seen is not None:
                seen[i, tok_list[i]] = True
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
