"""A loaded MoE-LLaVA model on a device, ready to answer (``moevl.load("moellava-tiny")`` or a MoE-LLaVA folder
with ``vision_tower=<folder>``)."""
from __future__ import annotations

import dataclasses
import typing

import torch

from moevl.model.moe_llava.inputs import MoeLlavaBatch
from moevl.model.session import TorchSession

MOE_ROUTING_MODES = ("deterministic", "deepspeed")


@dataclasses.dataclass
class MoeRoutingDecision:
    """One MoE layer over the last request batch (prompt tokens + generated tokens).

    counts[b][e]: token-slots request b sent to expert e (top-2: two per token), prompt and generated tokens alike
    (routing is per token); busiest / share: per request the expert with the most slots and its share of them.
    Not a gate probability (that is Awaker's ``p``): a share of 0.5 means that expert took half the slots.
    """

    layer: int
    router: str
    busiest: list[int]
    share: list[float]
    counts: list[list[int]]
    steps: str = "all"
    title: typing.ClassVar[str] = "routing, busiest expert per MoE layer"  # the CLI's label for the summaries

    def to_dict(self):
        return dataclasses.asdict(self)

    def summary(self, i: int = 0) -> str:
        return f"L{self.layer}: e{self.busiest[i]} ({100 * self.share[i]:.0f}% of token slots)"


def routing_decisions(expert_counts: dict) -> list[MoeRoutingDecision]:
    """{MoE layer: counts [B, E]} -> one MoeRoutingDecision per layer (PyTorch and exported sessions alike)."""
    out = []
    for layer, counts in sorted(expert_counts.items()):
        c = torch.as_tensor(counts).cpu()
        share = c.float() / c.sum(-1, keepdim=True).clamp(min=1)
        p, e = share.max(-1)
        out.append(MoeRoutingDecision(layer, "moe", e.tolist(), [round(x, 6) for x in p.tolist()], c.tolist()))
    return out


def answer_tokens(tokens: torch.Tensor, eos_token_ids, pad_token_id: int) -> torch.Tensor:
    """tokens [B] fed to a decode step -> [B] bool: the ones that belong to a request's answer. generate feeds a
    finished request the pad token, and a request's end-of-sequence token ends it; neither is counted."""
    stop = torch.tensor(sorted(set(eos_token_ids) | {pad_token_id}), device=tokens.device)
    return ~torch.isin(tokens, stop)


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

    def batch_rows(self, max_batch: int) -> "MoeLlavaRows":
        return MoeLlavaRows(self, max_batch)

    def _prompt(self, batch: MoeLlavaBatch) -> torch.Tensor:
        """The prompt's embeddings [B, L, H], image tokens inserted."""
        m = self.model
        feats = m.encode_images(batch.pixels) if batch.pixels is not None else None
        return m.embed(batch.input_ids, feats, batch.image_mask)

    # ------------------------------------------------------------------ the two steps generation drives
    def _prefill(self, batch: MoeLlavaBatch, max_len: int) -> torch.Tensor:
        m, dev = self.model, self.device.torch_device
        b = batch.input_ids.shape[0]
        cache = self._setup(batch, max_len)
        embeds = self._prompt(batch)
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
        real = answer_tokens(tokens, self.eos_token_ids, self.pad_token_id)[:, None]
        hidden = self._run(m.embed(tokens[:, None]), pos[:, None], cache_pos, keep, real)
        return m.logits(hidden[:, -1])

    # ------------------------------------------------------------------ user-facing
    def routing_decisions(self) -> list[MoeRoutingDecision]:
        return routing_decisions(self.expert_counts)


class MoeLlavaRows:
    """Per-row state of the batching engine (``moevl.model.engine``): routing is per token, so a row needs no
    plan, only its expert counts (prompt and generated tokens)."""

    def __init__(self, session: MoeLlavaSession, max_batch: int):
        if session.moe_routing != "deterministic":
            raise NotImplementedError(
                "continuous batching needs moe_routing='deterministic': the deepspeed mode draws its routing noise "
                "for the whole batch at once, so a request's answer would depend on the requests beside it")
        self.session, self.model = session, session.model
        e = session.cfg.num_experts
        dev = session.device.torch_device
        self.counts = {i: torch.zeros(max_batch, e, dtype=torch.long, device=dev)
                       for i in self.model.moe_layer_indices}  # MoE layer -> [max_batch, E]

    def _run(self, embeds, positions, cache_pos, keep, caches, counts, real):
        hidden, chosen = self.model(embeds, positions, cache_pos, keep, "deterministic", None, caches=caches)
        for layer, idx in chosen.items():  # idx [B*T, k]
            count_experts(counts[layer], idx, real, self.session.cfg.num_experts)
        return self.model.logits(hidden[:, -1])

    def prefill(self, batch, row, cache_pos, keep, caches):
        for c in self.counts.values():
            c[row] = 0
        counts = {layer: c[row:row + 1] for layer, c in self.counts.items()}
        return self._run(self.session._prompt(batch), batch.positions, cache_pos, keep, caches, counts,
                         batch.attention_mask.bool())

    def decode(self, tokens, pos, cache_pos, keep, caches, n):
        counts = {layer: c[:n] for layer, c in self.counts.items()}
        real = answer_tokens(tokens, self.session.eos_token_ids, self.session.pad_token_id)[:, None]
        return self._run(self.model.embed(tokens[:, None]), pos[:, None], cache_pos, keep, caches, counts, real)

    def move(self, src: int, dst: int) -> None:
        for c in self.counts.values():
            c[dst] = c[src]

    def clear(self, row: int) -> None:
        for c in self.counts.values():
            c[row] = 0

    def decisions(self, row: int) -> list[MoeRoutingDecision]:
        return routing_decisions({layer: c[row:row + 1] for layer, c in self.counts.items()})
