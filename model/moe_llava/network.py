"""MoE-LLaVA: CLIP/SigLIP vision tower -> mlp2x_gelu projector -> Phi-2 or StableLM-2 decoder whose MoE layers
route each token to 2 of 4 experts (no DeepSpeed: with one device its all-to-all is an identity).

What happens to one request (top to bottom): ``encode_images`` runs the tower up to the selected layer and drops
token 0, the projector maps the features to the decoder width, ``embed`` writes them where the ``<image>``
sentinel was expanded (``moevl.model.moe_llava.inputs``), ``forward`` runs the decoder with a static KV cache.
Module names follow the original's checkpoint where they can (``model.layers.{i}.self_attn.dense``, ...), so the
key mapping in ``moevl.model.moe_llava.checkpoint`` only renames the MoE, projector and tower keys.
Facts: shared/notes/moe-llava.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moevl.kernels import KernelRef
from moevl.kernels.moe import MoeExperts
from moevl.model.layers import CachedDecoder, KVCache, LayerNorm
from moevl.model.moe_llava.config import MoeLlavaConfig, VisionTowerConfig


def _act(name: str):
    if name == "quick_gelu":
        return lambda h: h * torch.sigmoid(1.702 * h)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_tanh"):
        return lambda h: F.gelu(h, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r}")


# ----------------------------------------------------------------------------------------------- vision
class VisionLayer(nn.Module):
    """One CLIP/SigLIP encoder layer (pre-norm; names as transformers' CLIPEncoderLayer)."""

    def __init__(self, v: VisionTowerConfig, ops: KernelRef):
        super().__init__()
        d = v.hidden_size
        self.num_heads = v.num_heads
        self.layer_norm1 = LayerNorm(d, v.layer_norm_eps, ops)
        self.layer_norm2 = LayerNorm(d, v.layer_norm_eps, ops)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d))
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, v.intermediate_size)
        self.mlp.fc2 = nn.Linear(v.intermediate_size, d)
        self.act = _act(v.hidden_act)
        self.ops = ops

    def forward(self, x, keep):
        b, n, d = x.shape  # x [images, tokens, dim]
        hd = d // self.num_heads
        h = self.layer_norm1(x)
        a = self.self_attn
        q, k, v = (p(h).view(b, n, self.num_heads, hd).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = self.ops.attention(q, k, v, keep, hd ** -0.5)  # full attention (keep is all True)
        x = x + a.out_proj(o.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class VisionTower(nn.Module):
    """CLIP ViT (class token, pre-LayerNorm, patch conv without bias) or SigLIP ViT (no class token, patch bias).

    Only the layers up to ``select_layer`` are built: the last layer and the post-LayerNorm never influence the
    selected features, so their checkpoint keys are skipped at load time.
    """

    def __init__(self, v: VisionTowerConfig, ops: KernelRef):
        super().__init__()
        self.cfg = v
        clip = v.kind == "clip"
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, v.hidden_size, v.patch_size, v.patch_size, bias=not clip)
        if clip:
            self.embeddings.class_embedding = nn.Parameter(torch.empty(v.hidden_size))
        self.embeddings.position_embedding = nn.Embedding(v.num_positions, v.hidden_size)
        self.pre_layrnorm = LayerNorm(v.hidden_size, v.layer_norm_eps, ops) if clip else None  # (sic: CLIP's name)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(v, ops) for _ in range(v.layers_used))

    def forward(self, pixels):
        """pixels [images, 3, S, S] -> selected features [images, tokens, dim]."""
        e = self.embeddings
        x = e.patch_embedding(pixels.to(e.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # [I, P, D]
        if self.pre_layrnorm is not None:
            x = torch.cat([e.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + e.position_embedding.weight
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        keep = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=x.device)
        for layer in self.encoder.layers:
            x = layer(x, keep)
        # The original drops token 0 for "patch" features, also for SigLIP, which has no class token.
        return x[:, 1:] if self.cfg.select_feature == "patch" else x


# ----------------------------------------------------------------------------------------------- decoder
class MoeFFN(nn.Module):
    """Top-k token-level MoE in place of a dense FFN: experts stacked [E, ...] for ``ops.moe_ffn``.

    Phi-2 experts: w_in/b_in = fc1, w_out/b_out = fc2 (gelu_new); StableLM: w_in = gate_proj, w_up = up_proj,
    w_out = down_proj (SwiGLU). router [E, hidden] is DeepSpeed's ``gate.wg`` (no bias, run in fp32).
    With ``--quantize`` the stacks named in ``stacked_expert_weights`` become kernels.quant.QuantizedExperts (one
    int8/int4 weight per expert); the router and the biases stay as they are.
    """

    stacked_expert_weights = ("w_in", "w_up", "w_out")

    def __init__(self, cfg: MoeLlavaConfig, ops: KernelRef):
        super().__init__()
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.router = nn.Parameter(torch.empty(e, h))
        self.w_in = nn.Parameter(torch.empty(e, f, h))
        self.w_out = nn.Parameter(torch.empty(e, h, f))
        self.swiglu = cfg.arch == "stablelm"
        if self.swiglu:
            self.w_up = nn.Parameter(torch.empty(e, f, h))
        else:
            self.b_in = nn.Parameter(torch.empty(e, f))
            self.b_out = nn.Parameter(torch.empty(e, h))
        self.top_k = cfg.top_k
        self.ops = ops

    def experts(self) -> MoeExperts:
        if self.swiglu:
            return MoeExperts.swiglu_mlp(self.w_in, self.w_up, self.w_out)
        return MoeExperts.gelu_mlp(self.w_in, self.b_in, self.w_out, self.b_out)

    def forward(self, x, routing: str, generator):
        """x [B, T, H] -> (y [B, T, H], expert_idx [B*T, k])."""
        b, t, h = x.shape
        y, info = self.ops.moe_ffn(x.reshape(b * t, h), self.router, self.experts(), top_k=self.top_k,
                                   routing=routing, generator=generator)
        if self.training:  # the router's probabilities, for training's load-balancing loss
            self.last_routing = info
        return y.view(b, t, h), info.expert_idx


class DecoderLayer(nn.Module):
    """Phi-2: h = x + Attn(LN(x)) + FFN(LN(x)) (parallel). StableLM-2: h = x + Attn(LN1(x)); h + FFN(LN2(h))."""

    # linears of one input, which a backend may pack as one weight (kernels: linear_group); a dense StableLM layer
    # has gate/up
    fused_linear_groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           ("mlp.gate_proj", "mlp.up_proj"))

    def __init__(self, cfg: MoeLlavaConfig, ops: KernelRef, moe: bool):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.phi = cfg.arch == "phi"
        self.num_heads, self.num_kv_heads, self.head_dim, self.rotary_dim = (
            cfg.num_heads, cfg.num_kv_heads, hd, cfg.rotary_dim)
        self.input_layernorm = LayerNorm(h, cfg.layer_norm_eps, ops)
        if not self.phi:
            self.post_attention_layernorm = LayerNorm(h, cfg.layer_norm_eps, ops)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(h, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.self_attn.k_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.self_attn.v_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        if self.phi:
            self.self_attn.dense = nn.Linear(cfg.num_heads * hd, h, bias=True)
        else:
            self.self_attn.o_proj = nn.Linear(cfg.num_heads * hd, h, bias=False)
        self.is_moe = moe
        if moe:
            self.mlp = MoeFFN(cfg, ops)
        elif self.phi:
            self.mlp = nn.Module()
            self.mlp.fc1 = nn.Linear(h, cfg.intermediate_size)
            self.mlp.fc2 = nn.Linear(cfg.intermediate_size, h)
        else:
            self.mlp = nn.Module()
            self.mlp.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
            self.mlp.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
            self.mlp.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.ops = ops

    def attention(self, h, cos, sin, cache: KVCache, cache_pos, keep):
        b, t, _ = h.shape
        a, r = self.self_attn, self.rotary_dim
        q, k, v = self.ops.linear_group(h, (a.q_proj, a.k_proj, a.v_proj))
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_rot, k_rot = self.ops.apply_rotary(q[..., :r], k[..., :r], cos, sin)  # partial rotary
        q = torch.cat([q_rot, q[..., r:]], dim=-1)
        k = torch.cat([k_rot, k[..., r:]], dim=-1)
        # cache None: the whole sequence at once, nothing kept (training: keep is then [B, 1, T, T])
        k_all, v_all = cache.update(cache_pos, k, v) if cache is not None else (k, v)
        o = self.ops.attention(q, k_all, v_all, keep, self.head_dim ** -0.5).transpose(1, 2).reshape(b, t, -1)
        return a.dense(o) if self.phi else a.o_proj(o)

    def ffn(self, h, routing, generator):
        if self.is_moe:
            return self.mlp(h, routing, generator)
        m = self.mlp
        if self.phi:
            return m.fc2(F.gelu(m.fc1(h), approximate="tanh")), None
        return m.down_proj(self.ops.swiglu(*self.ops.linear_group(h, (m.gate_proj, m.up_proj)))), None

    def forward(self, x, cos, sin, cache, cache_pos, keep, routing="deterministic", generator=None):
        """-> (x [B, T, H], expert_idx [B*T, k] or None for a dense layer)."""
        h = self.input_layernorm(x)
        attn = self.attention(h, cos, sin, cache, cache_pos, keep)
        if self.phi:
            ff, idx = self.ffn(h, routing, generator)
            return x + attn + ff, idx
        x = x + attn
        ff, idx = self.ffn(self.post_attention_layernorm(x), routing, generator)
        return x + ff, idx


class TextModel(nn.Module):
    def __init__(self, cfg: MoeLlavaConfig, ops: KernelRef):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        moe = set(cfg.moe_layers)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, i in moe) for i in range(cfg.num_layers))
        norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, ops)
        if cfg.arch == "phi":
            self.final_layernorm = norm
        else:
            self.norm = norm

    def final_norm(self, x):
        return self.final_layernorm(x) if hasattr(self, "final_layernorm") else self.norm(x)


class MoeLlavaModel(CachedDecoder):
    """The whole network. ``forward`` runs the decoder on prepared embeddings with a static KV cache."""

    hot_ops = ("layer_norm", "apply_rotary", "swiglu", "attention", "moe_ffn", "insert_image_features")  # kernel ops

    def __init__(self, cfg: MoeLlavaConfig, kernels=None):
        super().__init__()
        self.cfg = cfg
        self.ops = KernelRef(kernels)
        self.vision_tower = VisionTower(cfg.vision, self.ops)
        self.mm_projector = nn.Sequential(nn.Linear(cfg.mm_hidden_size, cfg.hidden_size), nn.GELU(),  # exact erf
                                          nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.model = TextModel(cfg, self.ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # no bias in MoE-LLaVA's Phi
        self.register_buffer("inv_freq", self.rope_inv_freq(), persistent=False)
        self.caches: nn.ModuleList | None = None

    # -- set-up
    def rope_inv_freq(self):
        r = self.cfg.rotary_dim
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float) / r))

    def init_buffers(self, device=None) -> None:
        """Recompute the non-persistent buffers (after building on the meta device)."""
        self.inv_freq = self.rope_inv_freq().to(device or self.lm_head.weight.device)

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if layer.is_moe]

    # -- pieces of one request
    def encode_images(self, pixels):
        """pixels [images, 3, S, S] -> projected image tokens [images, tokens, hidden]."""
        return self.mm_projector(self.vision_tower(pixels.to(self.lm_head.weight.dtype)))

    def embed(self, input_ids, image_features=None, image_mask=None):
        """Token embeddings; positions of the expanded ``<image>`` sentinel (negative ids) get the image tokens."""
        emb = self.model.embed_tokens(torch.where(input_ids < 0, 0, input_ids))
        if image_features is not None:
            emb = self.ops.insert_image_features(emb, image_features, image_mask)
        return emb

    def rotary(self, positions, dtype):
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, r/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, inputs_embeds, positions, cache_pos, keep, routing="deterministic", generator=None,
                caches=None):
        """inputs_embeds [B, T, H]; positions [B, T]; cache_pos [T]; keep [B, 1, T, S]
        -> (hidden [B, T, H], {moe layer index: expert_idx [B*T, k]}).
        cache_pos None: no KV cache (training's full-sequence forward; keep [B, 1, T, T]). caches: one per layer
        (default: the model's own; the batching engine, ``moevl.model.engine``, passes rows of its caches)."""
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        x = inputs_embeds
        chosen = {}
        n = len(self.model.layers)
        if caches is None:  # explicit caches win (export passes its ConcatCaches with cache_pos None)
            caches = self.caches if cache_pos is not None else [None] * n
        for i, (layer, cache) in enumerate(zip(self.model.layers, caches)):
            x, idx = layer(x, cos, sin, cache, cache_pos, keep, routing, generator)
            if idx is not None:
                chosen[i] = idx
        return self.model.final_norm(x), chosen

