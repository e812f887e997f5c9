"""Awaker2.5-VL: Qwen2-VL (vision tower + merger + M-RoPE text decoder) with LoRA-MoE adapters.

Written for deployment: static KV cache, no data-dependent Python control flow inside ``forward``, hot ops
through ``kernels``. Everything data-dependent (M-RoPE positions, vision position ids and block-diagonal
mask, the routers' prompt span) is computed in ``moevl.model.awaker.inputs`` before the network runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moevl.kernels import KernelRef
from moevl.model.awaker.config import AwakerConfig
from moevl.model.awaker.lora_moe import AdaptedLinear, LayerRouting, Router, route_layer
from moevl.model.layers import CachedDecoder, KVCache, LayerNorm, RMSNorm


# ----------------------------------------------------------------------------------------------- vision
class VisionBlock(nn.Module):
    def __init__(self, cfg: AwakerConfig, ops: KernelRef):
        super().__init__()
        v = cfg.vision
        dim, hidden = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
        self.num_heads = v.num_heads
        self.norm1 = LayerNorm(dim, 1e-6, ops)
        self.norm2 = LayerNorm(dim, 1e-6, ops)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)
        self.act = v.hidden_act
        self.ops = ops

    def forward(self, x, cos, sin, keep):
        # x [N, dim]; cos/sin [N, head_dim]; keep [N, N] block-diagonal (one block per image frame)
        n, dim = x.shape
        hd = dim // self.num_heads
        qkv = self.attn.qkv(self.norm1(x)).view(n, 3, self.num_heads, hd).permute(1, 2, 0, 3)  # [3, H, N, hd]
        q, k, v = qkv[0].unsqueeze(0), qkv[1].unsqueeze(0), qkv[2].unsqueeze(0)
        # the vision rotary is applied in fp32, as in the original
        qf, kf = self.ops.apply_rotary(q.float(), k.float(), cos.unsqueeze(0), sin.unsqueeze(0))
        o = self.ops.attention(qf.to(x.dtype), kf.to(x.dtype), v, keep[None, None], hd ** -0.5)
        x = x + self.attn.proj(o[0].transpose(0, 1).reshape(n, dim))
        h = self.mlp.fc1(self.norm2(x))
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return x + self.mlp.fc2(h)


class VisionTower(nn.Module):
    def __init__(self, cfg: AwakerConfig, ops: KernelRef):
        super().__init__()
        v = cfg.vision
        self.cfg = v
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Module()
        # kept in Conv3d's shape so checkpoints load as-is; computed as a matmul by the fast kernels
        self.patch_embed.proj.weight = nn.Parameter(
            torch.empty(v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
        self.blocks = nn.ModuleList(VisionBlock(cfg, ops) for _ in range(v.depth))
        merged = v.embed_dim * v.spatial_merge_size ** 2
        self.merger = nn.Module()
        self.merger.ln_q = LayerNorm(v.embed_dim, 1e-6, ops)
        self.merger.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.hidden_size))
        self.register_buffer("inv_freq", self.rope_inv_freq(), persistent=False)
        self.ops = ops

    def rope_inv_freq(self):
        hd = self.cfg.embed_dim // self.cfg.num_heads
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float) / (hd // 2)))

    def forward(self, patches, pos_hw, keep):
        """patches [N, C*t*p*p]; pos_hw [N, 2] (row, col of each patch); keep [N, N] -> features [N/4, hidden]."""
        return self.merge(self.blocks_out(patches, pos_hw, keep))

    def blocks_out(self, patches, pos_hw, keep):
        """The tower before its merger: patch embedding and blocks -> [N, embed_dim]."""
        x = self.ops.patch_embed(patches, self.patch_embed.proj.weight)
        freqs = pos_hw[..., None].float() * self.inv_freq  # [N, 2, hd/4]
        freqs = freqs.flatten(1)                             # [N, hd/2]: h angles then w angles
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for blk in self.blocks:
            x = blk(x, cos, sin, keep)
        return x

    def merge(self, x):
        """The merger: every 2x2 patches of ``blocks_out`` -> one image token [N/4, hidden]."""
        merged = self.merger.ln_q(x).view(-1, self.merger.mlp[0].in_features)
        return self.merger.mlp(merged)


# ----------------------------------------------------------------------------------------------- text
class DecoderLayer(nn.Module):
    # linears of one input, which a backend may pack as one weight (kernels: linear_group / lora_moe_group)
    fused_linear_groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           ("mlp.gate_proj", "mlp.up_proj"))

    def __init__(self, cfg: AwakerConfig, ops: KernelRef):
        super().__init__()
        a = cfg.adapters
        h, hd = cfg.hidden_size, cfg.head_dim
        x = a.num_experts + 1 if a.num_experts else 0  # task experts + global expert
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, ops)
        self.self_attn = nn.Module()
        # q/k/v LoRA is merged into these weights when a checkpoint is loaded
        self.self_attn.q_proj = nn.Linear(h, cfg.num_heads * hd, bias=True)
        self.self_attn.k_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=True)
        self.self_attn.v_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=True)
        self.self_attn.o_proj = AdaptedLinear(cfg.num_heads * hd, h, False, x, a.rank, ops)
        self.mlp = nn.Module()
        self.mlp.gate_proj = AdaptedLinear(h, cfg.intermediate_size, False, x, a.rank, ops)
        self.mlp.up_proj = AdaptedLinear(h, cfg.intermediate_size, False, x, a.rank, ops)
        self.mlp.down_proj = AdaptedLinear(cfg.intermediate_size, h, False, x, a.rank, ops)
        if a.num_experts:
            self.self_attn.o_proj.router = Router(h, a.num_experts, a.router_eps, ops)
            self.mlp.gate_proj.router = Router(h, a.num_experts, a.router_eps, ops)
        self.scaling = a.scaling
        self.ops = ops

    def route(self, e: torch.Tensor) -> LayerRouting:
        """Instance-level routing from the pooled prompt embedding e [B, hidden]."""
        return route_layer(self.self_attn, self.mlp, self.scaling, e)

    def forward(self, x, cos, sin, cache: KVCache, cache_pos, keep, plans: dict | None):
        plans = plans or {}
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        at = self.self_attn
        q, k, v = self.ops.linear_group(h, (at.q_proj, at.k_proj, at.v_proj))
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.ops.apply_rotary(q, k, cos, sin)
        # cache None: the whole sequence at once, nothing kept (training: keep is then [B, 1, T, T])
        k_all, v_all = cache.update(cache_pos, k, v) if cache is not None else (k, v)
        o = self.ops.attention(q, k_all, v_all, keep, self.head_dim ** -0.5)  # [B, H, T, hd]
        x = x + at.o_proj(o.transpose(1, 2).reshape(b, t, -1), plans.get("o_proj"))
        h = self.post_attention_layernorm(x)
        m = self.mlp
        gate, up = self.ops.lora_moe_group(h, (m.gate_proj, m.up_proj), (plans.get("gate_proj"), plans.get("up_proj")))
        act = self.ops.swiglu(gate, up)
        return x + m.down_proj(act, plans.get("down_proj"))


class TextModel(nn.Module):
    def __init__(self, cfg: AwakerConfig, ops: KernelRef):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


class AwakerModel(CachedDecoder):
    """The whole network. ``forward`` runs the decoder on prepared embeddings with a static KV cache."""

    hot_ops = ("rms_norm", "layer_norm", "apply_rotary", "mrope_cos_sin", "swiglu", "attention", "patch_embed",
               "lora_moe_prepare", "lora_moe_linear", "round_to_fp16", "insert_image_features")  # kernel ops it calls

    def __init__(self, cfg: AwakerConfig, kernels=None):
        super().__init__()
        self.cfg = cfg
        self.ops = KernelRef(kernels)
        self.visual = VisionTower(cfg, self.ops)
        self.model = TextModel(cfg, self.ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", self.rope_inv_freq(), persistent=False)
        self.caches: nn.ModuleList | None = None

    # -- set-up
    def rope_inv_freq(self):
        hd = self.cfg.head_dim
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))

    def init_buffers(self, device=None) -> None:
        """After the weights are in place: recompute the non-persistent buffers (the model is built on the meta
        device) and put the adapters in their inference layout."""
        device = device or self.lm_head.weight.device
        self.inv_freq = self.rope_inv_freq().to(device)
        self.visual.inv_freq = self.visual.rope_inv_freq().to(device)
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, AdaptedLinear) and mod.num_lora:
                    # lora_B keeps its [X, out, r] shape (checkpoints, every kernel) but is stored rank-major,
                    # [X, r, out] in memory, so that selecting a request's experts at prefill is a contiguous
                    # copy into the [2r, out] layout the decode GEMM wants (a strided transposing gather cost
                    # ~10x more: ~0.4 s of TTFT at 7B width, 2 layers)
                    mod.lora_B.data = mod.lora_B.data.transpose(1, 2).contiguous().transpose(1, 2)

    @property
    def has_adapters(self) -> bool:
        return self.cfg.adapters.num_experts > 0

    # -- pieces of one request
    def encode_images(self, patches, pos_hw, keep):
        return self.visual(patches.to(self.lm_head.weight.dtype), pos_hw, keep)

    def embed(self, input_ids, image_features=None, image_mask=None):
        """Token embeddings with the image features written into the image-pad positions."""
        emb = self.model.embed_tokens(input_ids)
        if image_features is not None:
            emb = self.ops.insert_image_features(emb, image_features, image_mask)
        return emb

    def route(self, pooled: torch.Tensor) -> list[LayerRouting]:
        """Per-request routing of every layer from the pooled prompt embeddings [B, hidden]."""
        if not self.has_adapters:
            return [None] * len(self.model.layers)
        return [layer.route(pooled) for layer in self.model.layers]

    def forward(self, inputs_embeds, positions, cache_pos, keep, routing=None, caches=None):
        """inputs_embeds [B, T, H]; positions [3, B, T]; cache_pos [T]; keep [B, 1, T, S] -> hidden [B, T, H].
        cache_pos None: no KV cache (training's full-sequence forward; keep [B, 1, T, T]). caches: one per layer
        (default: the model's own; the batching engine, ``moevl.model.engine``, passes rows of its caches)."""
        cos, sin = self.ops.mrope_cos_sin(positions, self.inv_freq, self.cfg.mrope_section, inputs_embeds.dtype)
        x = inputs_embeds
        n = len(self.model.layers)
        routing = routing or [None] * n
        if caches is None:  # explicit caches win (export passes its ConcatCaches with cache_pos None)
            caches = self.caches if cache_pos is not None else [None] * n
        for layer, cache, r in zip(self.model.layers, caches, routing):
            x = layer(x, cos, sin, cache, cache_pos, keep, r.plans if r is not None else None)
        return self.model.norm(x)

