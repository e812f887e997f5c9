"""Building blocks shared by the model families: static KV cache, adapted linears, norms."""
from __future__ import annotations

import torch
from torch import nn

from kernels import KernelRef


class KVCache(nn.Module):
    """Static preallocated key/value buffers for one layer: [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # cache_pos [T]: the slots written by this step (the same for every request of the batch).
        self.k.index_copy_(2, cache_pos, k)
        self.v.index_copy_(2, cache_pos, v)
        return self.k, self.v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelRef):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelRef, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps
        self.ops = ops

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class AdaptedLinear(nn.Module):
    """A base linear with optional LoRA experts (``num_lora`` = task experts + global expert).

    What the experts contribute for a request is decided outside (the router) and arrives as a prepared
    plan; without a plan the layer is the plain base linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, num_lora: int, rank: int,
                 ops: KernelRef):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.num_lora = num_lora
        if num_lora:
            self.lora_A = nn.Parameter(torch.zeros(num_lora, rank, in_features))   # [X, r, in]
            self.lora_B = nn.Parameter(torch.zeros(num_lora, out_features, rank))  # [X, out, r]
        self.ops = ops

    def prepare(self, expert: torch.Tensor, scales: torch.Tensor):
        """Select each request's experts once (at prefill); the plan is reused by every decode step."""
        if not self.num_lora:
            return None
        return self.ops.lora_moe_prepare(self.lora_A, self.lora_B, expert, scales)

    def forward(self, x, plan=None):
        return self.ops.lora_moe_linear(x, self.weight, self.bias, plan)


class Router(nn.Module):
    """Awaker's instance-level router: RMSNorm (fp32, learnable gamma) -> Linear with bias -> softmax -> top-1."""

    def __init__(self, hidden: int, num_experts: int, eps: float):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.gate = nn.Linear(hidden, num_experts, bias=True)
        self.eps = eps

    def forward(self, e: torch.Tensor):
        """e [B, hidden] (fp32) -> expert [B] long, p [B] fp32 (an fp16 value), probs [B, E] fp32.

        The original rounds the logits to float16 and takes the softmax in float16, so p is a float16 value;
        we reproduce that because it changes layer outputs by up to ~1e-3 otherwise (see notes/awaker.md).
        """
        z = e.float()
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        logits = torch.nn.functional.linear(z, self.gate.weight.float(), self.gate.bias.float())
        probs = torch.softmax(logits.half().float(), dim=-1).half()
        p, expert = probs.max(dim=-1)
        return expert, p, probs.float()
