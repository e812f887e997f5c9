"""Awaker2.5-VL's adapters: the LoRA-MoE linear and the instance-level router (facts: shared/notes/awaker.md).

What one adapted linear computes for a request routed to task expert k with router probability p:
    y = W x + p^2 s B_k A_k x + (1 - p) s B_g A_g x          (g = the global expert; 1 - p rounded in fp16)
The router runs once per request on the pooled prompt embedding; ``route_layer`` turns its decision into the
prepared per-request plans the kernels consume at every step.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moevl.kernels import KernelRef


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

    def __init__(self, hidden: int, num_experts: int, eps: float, ops: KernelRef):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.gate = nn.Linear(hidden, num_experts, bias=True)
        self.eps = eps
        self.ops = ops

    def forward(self, e: torch.Tensor):
        """e [B, hidden] (fp32) -> expert [B] long, p [B] fp32 (an fp16 value), probs [B, E] fp32 (fp16 values).

        The original rounds the logits to float16 and takes the softmax in float16, so p is a float16 value;
        we reproduce that because it changes layer outputs by up to ~1e-3 otherwise (see notes/awaker.md).
        The rounding is a kernel op (``round_to_fp16``) because graphs need another formulation of it.
        """
        z = e.float()
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        logits = torch.nn.functional.linear(z, self.gate.weight.float(), self.gate.bias.float())
        probs = self.ops.round_to_fp16(torch.softmax(self.ops.round_to_fp16(logits), dim=-1))
        p, expert = probs.max(dim=-1)
        return expert, p, probs


@dataclasses.dataclass
class LayerRouting:
    """The routing decisions of one decoder layer for every request, and the prepared expert plans."""

    attn_expert: torch.Tensor  # [B] long
    attn_p: torch.Tensor       # [B] fp32
    mlp_expert: torch.Tensor
    mlp_p: torch.Tensor
    plans: dict                # linear name -> opaque plan from kernels


def route_layer(attn, mlp, scaling: float, e: torch.Tensor) -> LayerRouting:
    """Instance-level routing of one decoder layer from the pooled prompt embedding e [B, hidden]: o_proj's router
    decides for o_proj, gate_proj's for gate/up/down."""
    ea, pa, _ = attn.o_proj.router(e)
    em, pm, _ = mlp.gate_proj.router(e)
    return plan_layer(attn, mlp, scaling, ea, pa, em, pm)


def plan_layer(attn, mlp, scaling: float, ea, pa, em, pm) -> LayerRouting:
    """The prepared plans for routing decisions already made: experts ea / em [B] long and router probabilities
    pa / pm [B] of o_proj's and gate_proj's routers (also re-plans a batch assembled from single requests)."""
    o, g = attn.o_proj, mlp.gate_proj

    def scales(p):  # [p^2 s, (1 - p) s] with 1 - p rounded once to fp16, as the original's (1 - p.half())
        return torch.stack([p ** 2 * scaling, o.ops.round_to_fp16(1 - p) * scaling], dim=-1)

    sa, sm = scales(pa), scales(pm)
    plans = {"o_proj": o.prepare(ea, sa), "gate_proj": g.prepare(em, sm),
             "up_proj": mlp.up_proj.prepare(em, sm), "down_proj": mlp.down_proj.prepare(em, sm)}
    return LayerRouting(ea, pa, em, pm, plans)
