"""A loaded Awaker model on a device, ready to answer (``moevl.load("awaker-tiny")`` or an Awaker/Qwen2-VL folder)."""
from __future__ import annotations

import dataclasses

import torch

from moevl.model.awaker.inputs import AwakerBatch, pooled_prompt
from moevl.model.awaker.lora_moe import LayerRouting
from moevl.model.session import TorchSession

ROUTING_MODES = ("prefill", "legacy")
ROUTERS = ("attn", "mlp")  # per layer: o_proj's router, and gate_proj's (which also decides for up/down)


@dataclasses.dataclass
class RoutingDecision:
    layer: int
    router: str        # "attn" (o_proj) or "mlp" (gate/up/down)
    expert: list[int]  # per request
    p: list[float]

    def to_dict(self):
        return dataclasses.asdict(self)


def routing_decisions(expert, p) -> list[RoutingDecision]:
    """expert, p [layers, 2 (attn, mlp), B] (tensors or arrays) -> one RoutingDecision per layer and router.
    The one summary of Awaker's routing, for the PyTorch and the exported sessions alike."""
    out = []
    for i in range(len(expert)):
        for j, name in enumerate(ROUTERS):
            out.append(RoutingDecision(i, name, [int(x) for x in expert[i][j]], [round(float(x), 6) for x in p[i][j]]))
    return out


class AwakerSession(TorchSession):
    """Model + processor + device, with Awaker's per-request routing.

    routing="prefill" (default): routed once from the prompt (image features inserted), kept for the whole
    request — the training semantics. routing="legacy": the original ``generate``'s behaviour, where every
    decode step re-routes from plain token embeddings (image positions hold the ``<|image_pad|>`` embedding,
    not the visual features), for parity with the original's outputs.
    """

    family = "awaker"

    def __init__(self, model, processor, device, routing: str = "prefill", max_context: int | None = None):
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, not {routing!r}")
        super().__init__(model, processor, device, max_context)
        self.routing_mode = routing
        self.last_routing: list[LayerRouting] | None = None
        self.decode_routing: list[LayerRouting] | None = None

    def _prefill(self, batch: AwakerBatch, max_len: int) -> torch.Tensor:
        m = self.model
        cache = self._setup(batch, max_len)
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
        self.decode_routing = decode_routing
        cache_pos, keep = cache.prompt()
        hidden = m(embeds, batch.positions, cache_pos, keep, routing)
        self._last_hidden = hidden
        return m.logits(hidden[:, -1])

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        cache_pos, keep, pos = self._cache.step()
        positions = pos.view(1, -1, 1).expand(3, -1, 1)  # text tokens: the same position on all three axes
        hidden = m(m.embed(tokens[:, None]), positions, cache_pos, keep, self.decode_routing)
        return m.logits(hidden[:, -1])

    def routing_decisions(self) -> list[RoutingDecision]:
        if not self.last_routing or self.last_routing[0] is None:
            return []
        expert = [[r.attn_expert.tolist(), r.mlp_expert.tolist()] for r in self.last_routing]
        p = [[r.attn_p.tolist(), r.mlp_p.tolist()] for r in self.last_routing]
        return routing_decisions(expert, p)
