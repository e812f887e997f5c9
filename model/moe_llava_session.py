"""A loaded MoE-LLaVA model on a device, ready to answer; the same interface as ``model.session.AwakerSession``.

    vl = load("moellava-tiny", device="cpu")               # or a MoE-LLaVA folder (+ vision_tower=<folder>)
    res = vl.ask("What is in the picture?", images=["cat.png"], max_new_tokens=32)
"""
from __future__ import annotations

import dataclasses

import torch

from model.generate import GenerationConfig, GenerationResult, generate
from model.moe_llava import MoeLlavaModel
from model.moe_llava_inputs import MoeLlavaBatch, MoeLlavaProcessor
from model.session import attention_keep

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


class MoeLlavaSession:
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
        self._state = None

    def _run(self, embeds, positions, cache_pos, keep, real):
        """The decoder over one step; counts each real token's experts. real [B, T] bool."""
        st = self._state
        hidden, chosen = self.model(embeds, positions, cache_pos, keep, self.moe_routing, st["generator"])
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
        b, length = batch.input_ids.shape
        m.setup_caches(b, max_len)
        feats = m.encode_images(batch.pixels) if batch.pixels is not None else None
        embeds = m.embed(batch.input_ids, feats, batch.image_mask)
        valid = torch.zeros(b, max_len, dtype=torch.bool, device=dev)
        valid[:, :length] = batch.attention_mask.bool()
        generator = None
        if self.moe_routing == "deepspeed":
            generator = torch.Generator(device=dev).manual_seed(self.moe_seed)
        self._state = {"valid": valid, "pos": batch.next_position.clone(), "cur": length, "generator": generator}
        self.expert_counts = {i: torch.zeros(b, self.cfg.num_experts, dtype=torch.long, device=dev)
                              for i in m.moe_layer_indices}
        cache_pos = torch.arange(length, device=dev)
        hidden = self._run(embeds, batch.positions, cache_pos, attention_keep(valid, cache_pos),
                           batch.attention_mask.bool())
        self._last_hidden = hidden
        return m.logits(hidden[:, -1])

    @torch.inference_mode()
    def score(self, batch: MoeLlavaBatch) -> torch.Tensor:
        """Logits at every prompt position [B, L, V] (for checks against other implementations)."""
        self.prefill(batch, batch.input_ids.shape[1])
        return self.model.logits(self._last_hidden)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        m, st = self.model, self._state
        cur = st["cur"]
        st["valid"][:, cur] = True
        cache_pos = torch.tensor([cur], device=tokens.device)
        keep = attention_keep(st["valid"], cache_pos)
        real = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        hidden = self._run(m.embed(tokens[:, None]), st["pos"][:, None], cache_pos, keep, real)
        st["cur"] = cur + 1
        st["pos"] = st["pos"] + 1
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

    def prepare(self, questions: list[str], images: list[list] | None = None) -> MoeLlavaBatch:
        images = images or [[] for _ in questions]
        prompts = [self.processor.chat(q, num_images=len(imgs)) for q, imgs in zip(questions, images)]
        return self.processor(prompts, images, max_length=self.max_context)

    def ask(self, question: str | list[str], images=None, on_text=None, **gen) -> GenerationResult:
        questions = [question] if isinstance(question, str) else list(question)
        if images and len(questions) == 1 and not isinstance(images[0], (list, tuple)):
            images = [list(images)]
        if images is not None and len(images) == 0 and len(questions) == 1:
            images = [[]]
        batch = self.prepare(questions, images)
        return generate(self, batch, GenerationConfig(**gen), on_text)


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
