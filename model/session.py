"""A loaded Awaker model on a device, ready to answer: the Python API the CLI is a thin layer over.

    vl = load("awaker-tiny", device="cpu")            # or a checkpoint folder
    res = vl.ask("What is in the picture?", images=["cat.png"], max_new_tokens=32)
"""
from __future__ import annotations

import dataclasses

import torch

from model.awaker import AwakerModel, LayerRouting
from model.generate import GenerationConfig, GenerationResult, generate
from model.inputs import AwakerBatch, AwakerProcessor, pooled_prompt

ROUTING_MODES = ("prefill", "legacy")


@dataclasses.dataclass
class RoutingDecision:
    layer: int
    router: str        # "attn" (o_proj) or "mlp" (gate/up/down)
    expert: list[int]  # per request
    p: list[float]

    def to_dict(self):
        return dataclasses.asdict(self)


class CacheState:
    """Static-KV-cache bookkeeping for one batch, shared by the families: which cache slots hold real tokens,
    where the next token is written, and each request's next text position."""

    def __init__(self, attention_mask: torch.Tensor, next_position: torch.Tensor, max_len: int):
        b, length = attention_mask.shape
        self.valid = torch.zeros(b, max_len, dtype=torch.bool, device=attention_mask.device)
        self.valid[:, :length] = attention_mask.bool()
        self.pos = next_position.clone()  # [B]
        self.cur = length

    def prompt(self):
        """(cache_pos [L], keep [B, 1, L, S]) for the prefill of the whole prompt."""
        cache_pos = torch.arange(self.cur, device=self.valid.device)
        return cache_pos, attention_keep(self.valid, cache_pos)

    def step(self):
        """(cache_pos [1], keep [B, 1, 1, S], positions [B]) for the next decode step; advances the cursor."""
        self.valid[:, self.cur] = True
        cache_pos = torch.tensor([self.cur], device=self.valid.device)
        out = cache_pos, attention_keep(self.valid, cache_pos), self.pos
        self.cur += 1
        self.pos = self.pos + 1
        return out


class SessionBase:
    """What every family's session shares: preparing requests, asking, scoring. A family provides
    ``processor`` (with ``chat`` and ``__call__``), ``prefill``, ``decode`` and ``_last_hidden``."""

    def prepare(self, questions: list[str], images: list[list] | None = None):
        images = images or [[] for _ in questions]
        prompts = [self.processor.chat(q, num_images=len(imgs)) for q, imgs in zip(questions, images)]
        return self.processor(prompts, images, max_length=self.max_context)

    def ask(self, question: str | list[str], images=None, on_text=None, **gen) -> GenerationResult:
        """One question (images: a flat list of its images) or a list of questions (images: one list each)."""
        questions = [question] if isinstance(question, str) else list(question)
        if images is not None and len(questions) == 1 and not (images and isinstance(images[0], (list, tuple))):
            images = [list(images)]
        batch = self.prepare(questions, images)
        return generate(self, batch, GenerationConfig(**gen), on_text)

    @property
    def dtype_name(self) -> str:
        from ascend.device import dtype_name

        return dtype_name(self.model.lm_head.weight.dtype)

    def describe(self) -> dict:
        return self.device.describe()

    @torch.inference_mode()
    def score(self, batch) -> torch.Tensor:
        """Logits at every prompt position [B, L, V] (for checks against other implementations)."""
        self.prefill(batch, batch.input_ids.shape[1])
        return self.model.logits(self._last_hidden)


class AwakerSession(SessionBase):
    """Model + processor + device, with Awaker's per-request routing.

    routing="prefill" (default): routed once from the prompt (image features inserted), kept for the whole
    request — the training semantics. routing="legacy": the original ``generate``'s behaviour, where every
    decode step re-routes from plain token embeddings (image positions hold the ``<|image_pad|>`` embedding,
    not the visual features), for parity with the original's outputs.
    """

    family = "awaker"

    def __init__(self, model: AwakerModel, processor: AwakerProcessor, device, routing: str = "prefill",
                 max_context: int | None = None):
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, not {routing!r}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.routing_mode = routing
        self.cfg = model.cfg
        self.max_context = max_context or model.cfg.max_position_embeddings
        self.eos_token_ids = set(model.cfg.eos_token_ids)
        self.pad_token_id = model.cfg.pad_token_id
        self.last_routing: list[LayerRouting] | None = None
        self.decode_routing: list[LayerRouting] | None = None
        self._cache: CacheState | None = None

    # ------------------------------------------------------------------ the two steps generation drives
    @torch.inference_mode()
    def prefill(self, batch: AwakerBatch, max_len: int) -> torch.Tensor:
        m, dev = self.model, self.device.torch_device
        batch = batch.to(dev)
        m.setup_caches(batch.input_ids.shape[0], max_len)
        feats = None
        if batch.patches is not None:
            feats = m.encode_images(batch.patches, batch.vision_pos, batch.vision_keep)
        embeds = m.embed(batch.input_ids, feats, batch.image_mask)
        routing = decode_routing = None
        if m.has_adapters:
            routing = m.route(pooled_prompt(embeds, batch.span))
            decode_routing = routing
            if self.routing_mode == "legacy":
                plain = m.embed(batch.input_ids)  # image positions keep the <|image_pad|> embedding
                decode_routing = m.route(pooled_prompt(plain, batch.span))
        self.last_routing = routing
        self._cache = CacheState(batch.attention_mask, batch.next_position, max_len)
        self.decode_routing = decode_routing
        cache_pos, keep = self._cache.prompt()
        hidden = m(embeds, batch.positions, cache_pos, keep, routing)
        self._last_hidden = hidden
        return m.logits(hidden[:, -1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        cache_pos, keep, pos = self._cache.step()
        positions = pos.view(1, -1, 1).expand(3, -1, 1)  # text tokens: the same position on all three axes
        hidden = m(m.embed(tokens[:, None]), positions, cache_pos, keep, self.decode_routing)
        return m.logits(hidden[:, -1])

    # ------------------------------------------------------------------ user-facing
    def routing_decisions(self) -> list[RoutingDecision]:
        out = []
        for i, r in enumerate(self.last_routing or []):
            out.append(RoutingDecision(i, "attn", r.attn_expert.tolist(), [round(x, 6) for x in r.attn_p.tolist()]))
            out.append(RoutingDecision(i, "mlp", r.mlp_expert.tolist(), [round(x, 6) for x in r.mlp_p.tolist()]))
        return out



def attention_keep(valid: torch.Tensor, cache_pos: torch.Tensor) -> torch.Tensor:
    """keep [B, 1, T, S]: causal over cache slots, padding slots masked; every query sees itself, so no row
    is fully masked (a padding query would otherwise produce NaN and poison its cache slot)."""
    s = torch.arange(valid.shape[1], device=valid.device)
    q = cache_pos[:, None]
    keep = (s[None, :] <= q)[None] & (valid[:, None, :] | (s[None, :] == q)[None])
    return keep[:, None]
