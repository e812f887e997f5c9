"""A loaded Awaker model on a device, ready to answer (``moevl.load("awaker-tiny")`` or an Awaker/Qwen2-VL folder)."""
from __future__ import annotations

import dataclasses
import typing

import torch

from moevl.model.awaker.inputs import AwakerBatch, pooled_prompt
from moevl.model.awaker.lora_moe import LayerRouting
from moevl.model.session import TorchSession

ROUTING_MODES = ("prefill", "legacy")
ROUTERS = ("attn", "mlp")  # per layer: o_proj's router, and gate_proj's (which also decides for up/down)


@dataclasses.dataclass
class RoutingDecision:
    """One router's choice per request: the task expert and its gate probability p (the task expert is weighted
    p**2, the global expert 1 - p). ``steps``: the tokens this choice computed - "all" (routed once at prefill,
    the default), or with --routing legacy "first token" (prefill) and "decode" (the decode steps' re-routing)."""

    layer: int
    router: str        # "attn" (o_proj) or "mlp" (gate/up/down)
    expert: list[int]  # per request
    p: list[float]     # per request: the router's softmax probability of that expert
    steps: str = "all"
    title: typing.ClassVar[str] = "routing"  # the CLI's label for a line of summaries

    def to_dict(self):
        return dataclasses.asdict(self)

    def summary(self, i: int = 0) -> str:
        return f"L{self.layer}.{self.router}: e{self.expert[i]} p={self.p[i]:.3f}"


def routing_decisions(expert, p, steps: str = "all") -> list[RoutingDecision]:
    """expert, p [layers, 2 (attn, mlp), B] (tensors or arrays) -> one RoutingDecision per layer and router.
    The one summary of Awaker's routing, for the PyTorch and the exported sessions alike."""
    out = []
    for i in range(len(expert)):
        for j, name in enumerate(ROUTERS):
            out.append(RoutingDecision(i, name, [int(x) for x in expert[i][j]],
                                       [round(float(x), 6) for x in p[i][j]], steps))
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

    def _prompt(self, batch: AwakerBatch):
        """The prompt's embeddings [B, L, H] (image features inserted) and its routing: (embeds, routing for the
        prompt, routing for the decode steps); the routings are None without adapters."""
        m = self.model
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
        return embeds, routing, decode_routing

    def batch_rows(self, max_batch: int) -> "AwakerRows":
        return AwakerRows(self, max_batch)

    def _prefill(self, batch: AwakerBatch, max_len: int) -> torch.Tensor:
        m = self.model
        cache = self._setup(batch, max_len)
        embeds, routing, decode_routing = self._prompt(batch)
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
        """What the last request used: one decision per layer and router for all its tokens, or (--routing legacy)
        the prefill's decisions for the first token followed by the decode steps' decisions."""
        if not self.last_routing or self.last_routing[0] is None:
            return []

        def decisions(routing, steps):
            expert = [[r.attn_expert.tolist(), r.mlp_expert.tolist()] for r in routing]
            p = [[r.attn_p.tolist(), r.mlp_p.tolist()] for r in routing]
            return routing_decisions(expert, p, steps)

        if self.routing_mode == "legacy":
            return decisions(self.last_routing, "first token") + decisions(self.decode_routing, "decode")
        return decisions(self.last_routing, "all")


def layer_decisions(routing: list[LayerRouting], steps: str = "all") -> list[RoutingDecision]:
    expert = [[r.attn_expert.tolist(), r.mlp_expert.tolist()] for r in routing]
    p = [[r.attn_p.tolist(), r.mlp_p.tolist()] for r in routing]
    return routing_decisions(expert, p, steps)


class AwakerRows:
    """Per-row state of the batching engine (``moevl.model.engine``): each request's own routing, computed at its
    prefill as ``ask`` computes it, and the decode steps' plans for the running rows.

    The fast kernels' plan of a request is one rank-2r LoRA per linear (``StackedLoraPlan``); the rows keep those
    in preallocated buffers (A [max_batch, 2r, in]; B^T [max_batch, 2r, out], a transposed view of B
    [max_batch, out, 2r] in bf16 / fp16: ``kernels.cpu.expand_out_major``), so that a joining request copies only its
    own experts and a decode step's plan is a view of the first n rows.
    Other kernel sets' plans are re-prepared for the running rows whenever they change (``plan_layer``).
    """

    def __init__(self, session: AwakerSession, max_batch: int):
        self.session, self.model = session, session.model
        self.routing: list = [None] * max_batch         # per row: its prefill routing (batch of one)
        self.decode_routing: list = [None] * max_batch  # per row: the routing of its decode steps
        self.slots = None  # per layer: {linear: (A [max_batch, R, in], B^T [max_batch, R, out])}, or None
        self.stacked = True  # False: this kernel set's plans are not stacked ones, re-plan instead
        self._batch = None  # the decode routing of the running rows (None: rebuild)
        self._batch_n = 0
        if self.model.has_adapters:  # preallocated with the KV cache, not at the first request
            self.slots = [self._layer_slots(layer, max_batch) for layer in self.model.model.layers]

    def prefill(self, batch, row, cache_pos, keep, caches):
        m = self.model
        embeds, routing, decode_routing = self.session._prompt(batch)
        hidden = m(embeds, batch.positions, cache_pos, keep, routing, caches=caches)
        self.routing[row], self.decode_routing[row] = routing, decode_routing
        if decode_routing is not None:
            self._put(row, decode_routing)
        self._batch = None
        return m.logits(hidden[:, -1])

    def decode(self, tokens, pos, cache_pos, keep, caches, n):
        m = self.model
        positions = pos.view(1, -1, 1).expand(3, -1, 1)  # text tokens: the same position on all three axes
        hidden = m(m.embed(tokens[:, None]), positions, cache_pos, keep, self._decode_routing(n), caches=caches)
        return m.logits(hidden[:, -1])

    def move(self, src: int, dst: int) -> None:
        self.routing[dst], self.decode_routing[dst] = self.routing[src], self.decode_routing[src]
        if self.slots is not None:
            for layer in self.slots:
                for A, Bt in layer.values():
                    A[dst].copy_(A[src])
                    Bt[dst].copy_(Bt[src])
        self._batch = None

    def clear(self, row: int) -> None:
        self.routing[row] = self.decode_routing[row] = None
        self._batch = None

    def decisions(self, row: int) -> list[RoutingDecision]:
        if self.routing[row] is None or self.routing[row][0] is None:
            return []
        if self.session.routing_mode == "legacy":
            return layer_decisions(self.routing[row], "first token") + layer_decisions(self.decode_routing[row],
                                                                                      "decode")
        return layer_decisions(self.routing[row], "all")

    # -- the decode plans of the running rows
    def _put(self, row: int, routing: list[LayerRouting]) -> None:
        from moevl.kernels.cpu import StackedLoraPlan, ViewLoraPlan, stack_expand

        if not self.stacked:
            return
        rows = []
        for r in routing:
            one = {}
            for name, plan in r.plans.items():
                if isinstance(plan, ViewLoraPlan):  # B^T in the slots' layout (a plain copy below)
                    one[name] = (torch.cat(plan.lora_A), stack_expand(plan.lora_Bt, plan.scales))
                elif isinstance(plan, StackedLoraPlan):
                    one[name] = (plan.lora_A[0], plan.lora_Bt[0])
                else:
                    self.stacked, self.slots = False, None
                    return
            rows.append(one)
        for layer, one in zip(self.slots, rows):
            for name, (A, Bt) in one.items():
                bufA, bufB = layer[name]
                r = A.shape[0]  # r instead of 2r when the task expert is the global one
                bufA[row, :r].copy_(A)
                bufA[row, r:].zero_()
                bufB[row, :r].copy_(Bt)
                bufB[row, r:].zero_()

    @staticmethod
    def _layer_slots(layer, max_batch: int) -> dict:
        """{linear: (A [max_batch, R, in], B^T [max_batch, R, out])}, R = 2r (r for plain LoRA)."""
        from moevl.kernels.cpu import new_expand

        mods = {"o_proj": layer.self_attn.o_proj, "gate_proj": layer.mlp.gate_proj,
                "up_proj": layer.mlp.up_proj, "down_proj": layer.mlp.down_proj}
        out = {}
        for name, mod in mods.items():
            x, r, _ = mod.lora_A.shape
            rank = r if x == 1 else 2 * r
            out[name] = (mod.lora_A.new_zeros(max_batch, rank, mod.in_features),
                         new_expand(mod.lora_A, (max_batch,), rank, mod.out_features))
        return out

    def _decode_routing(self, n: int):
        if self.decode_routing[0] is None:
            return None
        if self._batch is not None and self._batch_n == n:
            return self._batch
        from moevl.kernels.cpu import StackedLoraPlan
        from moevl.model.awaker.lora_moe import plan_layer

        batch = []
        for i, layer in enumerate(self.model.model.layers):
            rs = [self.decode_routing[row][i] for row in range(n)]
            ea, pa, em, pm = (torch.cat([getattr(r, f) for r in rs])
                              for f in ("attn_expert", "attn_p", "mlp_expert", "mlp_p"))
            if self.stacked:
                plans = {name: StackedLoraPlan(A[:n], Bt[:n]) for name, (A, Bt) in self.slots[i].items()}
                batch.append(LayerRouting(ea, pa, em, pm, plans))
            else:
                batch.append(plan_layer(layer.self_attn, layer.mlp, layer.scaling, ea, pa, em, pm))
        self._batch, self._batch_n = batch, n
        return batch
