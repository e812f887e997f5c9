"""A loaded MoE-LLaVA model on a device, ready to answer; the same interface as ``model.session.AwakerSession``.

    vl = load("moellava-tiny", device="cpu")               # or a MoE-LLaVA folder (+ vision_tower=<folder>)
    res = vl.ask("What is in the picture?", images=["cat.png"], max_new_tokens=32)
"""
from __future__ import annotations

import dataclasses

import torch

from model.moe_llava import MoeLlavaModel
from model.moe_llava_inputs import MoeLlavaBatch, MoeLlavaProcessor
from model.session import CacheState, SessionBase

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


class MoeLlavaSession(SessionBase):
    """Model + processor + device.

    moe_routing="deterministic" (default): the second expert is the second-largest softmax probability.
    "deepspeed": the original's Gumbel-noised second expert; the noise is drawn from a generator seeded with
    ``moe_seed`` at every prefill, so one request gives the same answer on every run.
    """

    family = "moe-llava"

    def __init__(self, model: MoeLlavaModel, processor: MoeLlavaProcessor, device,
                 moe_routing: str = "deterministic", moe_seed: int = 0, max_context: int | None = None):
        if moe_routing not in MOE_ROUTING_MODES:
            raise ValueError(f"moe_routing must be one of {MOE_ROUTING_MODES}, not {moe_routing!r}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.cfg = model.cfg
        self.moe_routing = moe_routing
        self.moe_seed = moe_seed
        self.max_context = max_context or model.cfg.max_position_embeddings
        self.eos_token_ids = set(model.cfg.eos_token_ids)
        self.pad_token_id = model.cfg.pad_token_id
        self.expert_counts: dict[int, torch.Tensor] = {}  # MoE layer -> [B, E] token-slots per expert
        self._cache = None
        self._generator = None

    def _run(self, embeds, positions, cache_pos, keep, real):
        """The decoder over one step; counts each real token's experts. real [B, T] bool."""
        hidden, chosen = self.model(embeds, positions, cache_pos, keep, self.moe_routing, self._generator)
        b, t = real.shape
        for layer, idx in chosen.items():  # idx [B*T, k]
            onehot = torch.nn.functional.one_hot(idx, self.cfg.num_experts).sum(1).view(b, t, -1)  # [B, T, E]
            self.expert_counts[layer] += (onehot * real[..., None]).sum(1)
        return hidden

    # ------------------------------------------------------------------ the two steps generation drives
    @torch.inference_mode()
    def prefill(self, batch: MoeLlavaBatch, max_len: int) -> torch.Tensor:
        m, dev = self.model, self.device.torch_device
        batch = batch.to(dev)
        b = batch.input_ids.shape[0]
        m.setup_caches(b, max_len)
        feats = m.encode_images(batch.pixels) if batch.pixels is not None else None
        embeds = m.embed(batch.input_ids, feats, batch.image_mask)
        self._generator = None
        if self.moe_routing == "deepspeed":
            self._generator = torch.Generator(device=dev).manual_seed(self.moe_seed)
        self._cache = CacheState(batch.attention_mask, batch.next_position, max_len)
        self.expert_counts = {i: torch.zeros(b, self.cfg.num_experts, dtype=torch.long, device=dev)
                              for i in m.moe_layer_indices}
        cache_pos, keep = self._cache.prompt()
        hidden = self._run(embeds, batch.positions, cache_pos, keep, batch.attention_mask.bool())
        self._last_hidden = hidden
        return m.logits(hidden[:, -1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        cache_pos, keep, pos = self._cache.step()
        real = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        hidden = self._run(m.embed(tokens[:, None]), pos[:, None], cache_pos, keep, real)
        return m.logits(hidden[:, -1])

    # ------------------------------------------------------------------ user-facing
    def routing_decisions(self) -> list[MoeRoutingDecision]:
        out = []
        for layer, counts in sorted(self.expert_counts.items()):
            c = counts.cpu()
            share = c.float() / c.sum(-1, keepdim=True).clamp(min=1)
            p, e = share.max(-1)
            out.append(MoeRoutingDecision(layer, "moe", e.tolist(), [round(x, 6) for x in p.tolist()], c.tolist()))
        return out


def load_session(spec, device, dtype=None, moe_routing=None, vision_tower=None, max_context=None, moe_seed=0,
                 routing="prefill", base=None, **unused) -> MoeLlavaSession:
    """model.api's loader for the "moe-llava" family."""
    from model.api import _kernels_for, _reject_unknown_options
    from model.moe_llava_loader import load_moe_llava

    # routing/base are the Awaker options the CLI always passes; only their defaults make sense here
    _reject_unknown_options("moe-llava", dict(unused, routing=None if routing == "prefill" else routing, base=base))
    model, proc = load_moe_llava(spec, device, dtype, vision_tower=vision_tower)
    model.set_kernels(_kernels_for(device))
    return MoeLlavaSession(model, proc, device, moe_routing=moe_routing or "deterministic", moe_seed=moe_seed,
                           max_context=max_context)
