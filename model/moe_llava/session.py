"""A loaded MoE-LLaVA model on a device, ready to answer (``moevl.load("moellava-tiny")`` or a MoE-LLaVA folder
with ``vision_tower=<folder>``)."""
from __future__ import annotations

import dataclasses

import torch

from moevl.model.moe_llava.inputs import MoeLlavaBatch
from moevl.model.session import TorchSession

MOE_ROUTING_MODES = ("deterministic", "deepspeed")


@dataclasses.dataclass
class MoeRoutingDecision:
    """One MoE layer over the last request batch (prompt tokens + generated tokens).

    counts[b][e]: token-slots request b sent to expert e (top-2: two per token); expert / p: per request the
    busiest expert and its share of the slots (the fields the CLI's summary line prints).
    """

    layer: int
    router: str
    expert: list[int]
    p: list[float]
    counts: list[list[int]]

    def to_dict(self):
        return dataclasses.asdict(self)


def routing_decisions(expert_counts: dict) -> list[MoeRoutingDecision]:
    """{MoE layer: counts [B, E]} -> one MoeRoutingDecision per layer (PyTorch and exported sessions alike)."""
    out = []
    for layer, counts in sorted(expert_counts.items()):
        c = torch.as_tensor(counts).cpu()
        share = c.float() / c.sum(-1, keepdim=True).clamp(min=1)
        p, e = share.max(-1)
        out.append(MoeRoutingDecision(layer, "moe", e.tolist(), [round(x, 6) for x in p.tolist()], c.tolist()))
    return out


def count_experts(counts: torch.Tensor, idx: torch.Tensor, real: torch.Tensor, num_experts: int) -> None:
    """counts [B, E] += the token-slots each request's real tokens (real [B, T] bool) sent to each expert;
    idx [B*T, k] (or [B, T, k]) the experts each token chose."""
    b, t = real.shape
    onehot = torch.nn.functional.one_hot(idx.reshape(b * t, -1), num_experts).sum(1).view(b, t, -1)  # [B, T, E]
    counts += (onehot * real[..., None]).sum(1)


class MoeLlavaSession(TorchSession):
    """Model + processor + device.

    moe_routing="deterministic" (default): the second expert is the second-largest softmax probability.
    "deepspeed": the original's Gumbel-noised second expert; the noise is drawn from a generator seeded with
    ``moe_seed`` at every prefill, so one request gives the same answer on every run.
    """

    family = "moe-llava"

    def __init__(self, model, processor, device, moe_routing: str = "deterministic", moe_seed: int = 0,
                 max_context: int | None = None):
        if moe_routing not in MOE_ROUTING_MODES:
            raise ValueError(f"moe_routing must be one of {MOE_ROUTING_MODES}, not {moe_routing!r}")
        super().__init__(model, processor, device, max_context)
        self.moe_routing = moe_routing
        self.moe_seed = moe_seed
        self.expert_counts: dict[int, torch.Tensor] = {}  # MoE layer -> [B, E] token-slots per expert
        self._generator = None

    def _run(self, embeds, positions, cache_pos, keep, real):
        """The decoder over one step; counts each real token's experts. real [B, T] bool."""
        hidden, chosen = self.model(embeds, positions, cache_pos, keep, self.moe_routing, self._generator)
        for layer, idx in chosen.items():  # idx [B*T, k]
            count_experts(self.expert_counts[layer], idx, real, self.cfg.num_experts)
        return hidden

    # ------------------------------------------------------------------ the two steps generation drives
    def _prefill(self, batch: MoeLlavaBatch, max_len: int) -> torch.Tensor:
        m, dev = self.model, self.device.torch_device
        b = batch.input_ids.shape[0]
        cache = self._setup(batch, max_len)
        feats = m.encode_images(batch.pixels) if batch.pixels is not None else None
        embeds = m.embed(batch.input_ids, feats, batch.image_mask)
        self._generator = None
        if self.moe_routing == "deepspeed":
            self._generator = torch.Generator(device=dev).manual_seed(self.moe_seed)
        self.expert_counts = {i: torch.zeros(b, self.cfg.num_experts, dtype=torch.long, device=dev)
                              for i in m.moe_layer_indices}
        cache_pos, keep = cache.prompt()
        hidden = self._run(embeds, batch.positions, cache_pos, keep, batch.attention_mask.bool())
        self._last_hidden = hidden
        return m.logits(hidden[:, -1])

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        cache_pos, keep, pos = self._cache.step()
        real = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        hidden = self._run(m.embed(tokens[:, None]), pos[:, None], cache_pos, keep, real)
        return m.logits(hidden[:, -1])

    # ------------------------------------------------------------------ user-facing
    def routing_decisions(self) -> list[MoeRoutingDecision]:
        return routing_decisions(self.expert_counts)
