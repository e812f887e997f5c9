"""Token-level top-k MoE FFN (MoE-LLaVA): router, top-k routing and three expert-dispatch variants.

What the original computes (DeepSpeed 0.9.5 top-2 gating at eval, capacity = tokens, so nothing is dropped):
    logits = x.float() @ Wg^T (no bias); probs = softmax(logits)
    e1 = argmax probs; e2 = 2nd largest prob ("deterministic") or argmax(logits + Gumbel) excluding e1 ("deepspeed")
    y = w1 * E_e1(x) + w2 * E_e2(x),  w_i = p_i / max(p1 + p2, eps)   (noise-free probs, also in deepspeed mode)

Variants of the expert part (all take the same routing):
- ``reference``: loop over experts with index masks (the oracle).
- ``dropless``: sort the N*k token-slots by expert and run each expert's GEMMs on its contiguous slice. No
  [tokens, experts, capacity] tensors. On CUDA one grouped GEMM (``torch._grouped_mm``) covers all slices, so
  there is no host sync; where it is unavailable (CUDA < sm90 / fp32, rows not 16-byte aligned) and on CPU the
  slices are a loop, which reads the per-expert counts back once per layer (``counts.tolist()``; free on CPU,
  where everything is synchronous). On CPU _grouped_mm's fallback kernel was never faster than the loop at
  Phi-2 size (equal to 1.6x slower; benchmarks/results/kernels-cpu.md), so CPU keeps the loop.
- ``dense``: every expert on every token as batched MatMul, combined with a [N, E] weight mask (zero for
  unselected experts): static shapes, exports to ONNX without Einsum (see shared/notes/onnx.md). E/k times the
  FLOPs, so only for export / tiny batches.

Quantised experts (``--quantize int8|int4``): a stacked weight may be a ``kernels.quant.QuantizedExperts`` (one
weight module per expert, ``w[e](x, bias)`` runs that expert's bound kernel: on CPU the ATen int8/int4 kernels).
The reference, the dropless loop and the ``dense`` variant apply each expert through its module; the grouped GEMM
is not chosen for them (asked for explicitly, the stacks are dequantised first). The router is never quantised.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MoeExperts(NamedTuple):
    """Stacked expert weights. E experts, hidden H, FFN width F.

    w_in [E, F, H]: Phi-2 fc1 / StableLM gate_proj; w_up [E, F, H] | None: StableLM up_proj (SwiGLU only);
    w_out [E, H, F]: fc2 / down_proj; b_in [E, F] | None, b_out [E, H] | None (Phi-2 only);
    activation: "gelu_tanh" (Phi-2's gelu_new) or "swiglu".
    """

    w_in: torch.Tensor
    w_out: torch.Tensor
    w_up: torch.Tensor | None = None
    b_in: torch.Tensor | None = None
    b_out: torch.Tensor | None = None
    activation: str = "gelu_tanh"

    @classmethod
    def gelu_mlp(cls, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> "MoeExperts":
        return cls(w_in=fc1_weight, w_out=fc2_weight, b_in=fc1_bias, b_out=fc2_bias, activation="gelu_tanh")

    @classmethod
    def swiglu_mlp(cls, gate_weight, up_weight, down_weight) -> "MoeExperts":
        return cls(w_in=gate_weight, w_out=down_weight, w_up=up_weight, activation="swiglu")

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def quantized(self) -> bool:
        """Whether any stacked weight is a weight module (kernels.quant.QuantizedExperts), not a tensor."""
        return any(w is not None and not isinstance(w, torch.Tensor) for w in (self.w_in, self.w_up, self.w_out))

    def dense(self, dtype) -> "MoeExperts":
        """The same experts with every stacked weight a tensor (quantised stacks dequantised to ``dtype``)."""
        if not self.quantized:
            return self
        return self._replace(**{k: _dense_stack(getattr(self, k), dtype) for k in ("w_in", "w_up", "w_out")})


class RoutingInfo(NamedTuple):
    expert_idx: torch.Tensor  # [N, k] long, column 0 = the top-1 expert
    weights: torch.Tensor  # [N, k] fp32, renormalised over the k chosen experts
    probs: torch.Tensor  # [N, E] fp32 softmax of the router logits (noise-free)


def gumbel_noise(shape, device, generator=None) -> torch.Tensor:
    """-log(-log(u)) exactly as torch.distributions.Gumbel(0, 1).rsample draws it (what DeepSpeed 0.9.5 uses):
    one torch.rand(shape) in fp32, mapped to [tiny, 1 - eps] first."""
    finfo = torch.finfo(torch.float32)
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u = finfo.tiny + u * ((1 - finfo.eps) - finfo.tiny)
    return -torch.log(-torch.log(u))


def route(x, router_weight, top_k=2, routing="deterministic", generator=None) -> RoutingInfo:
    """x [N, H] -> RoutingInfo. The router runs in fp32 as DeepSpeed's TopKGate does."""
    logits = F.linear(x.float(), router_weight.float())  # [N, E]
    probs = torch.softmax(logits, dim=-1)
    if routing == "deterministic":
        weights, idx = probs.topk(top_k, dim=-1)
    elif routing == "deepspeed":
        if top_k != 2:
            raise ValueError(f"routing='deepspeed' reproduces DeepSpeed's top-2 gating; got top_k={top_k}")
        first = probs.argmax(dim=-1, keepdim=True)  # [N, 1]
        noisy = logits + gumbel_noise(logits.shape, logits.device, generator)
        second = noisy.scatter(1, first, float("-inf")).argmax(dim=-1, keepdim=True)
        idx = torch.cat([first, second], dim=1)
        weights = probs.gather(1, idx)
    else:
        raise ValueError(f"routing must be 'deterministic' or 'deepspeed', got {routing!r}")
    denom = weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
    return RoutingInfo(idx, weights / denom, probs)


def _activate(h, experts: MoeExperts, up=None):
    if experts.activation == "swiglu":
        return F.silu(h) * up
    if experts.activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    raise ValueError(f"unknown expert activation {experts.activation!r}; use 'gelu_tanh' or 'swiglu'")


def _dense_stack(w, dtype):
    return w if w is None or isinstance(w, torch.Tensor) else w.dequantize(dtype)


def _linear(x, w, bias=None):
    """x w^T + b for one expert's weight: a tensor [out, in], or a quantised weight module that runs its kernel."""
    return F.linear(x, w, bias) if isinstance(w, torch.Tensor) else w(x, bias)


def _expert_forward(x, experts: MoeExperts, e: int):
    h = _linear(x, experts.w_in[e], None if experts.b_in is None else experts.b_in[e])
    up = _linear(x, experts.w_up[e]) if experts.w_up is not None else None
    return _linear(_activate(h, experts, up), experts.w_out[e], None if experts.b_out is None else experts.b_out[e])


# ---------------------------------------------------------------------------------------------------------------
# Expert dispatch variants: (x [N, H], experts, RoutingInfo) -> y [N, H]
# ---------------------------------------------------------------------------------------------------------------

def experts_reference(x, experts: MoeExperts, info: RoutingInfo):
    """Loop over experts; each processes the tokens routed to it, weighted, added into y."""
    y = torch.zeros_like(x)
    w = info.weights.to(x.dtype)
    for e in range(experts.num_experts):
        tok, slot = torch.where(info.expert_idx == e)
        if tok.numel() == 0:
            continue
        y.index_add_(0, tok, w[tok, slot, None] * _expert_forward(x[tok], experts, e))
    return y


def _grouped_linear(xs, w, offs, bias=None, expert_of_slot=None):
    # xs [S, in] sorted by expert, w [E, out, in], offs [E] int32 cumulative ends -> [S, out]
    y = torch._grouped_mm(xs, w.transpose(1, 2), offs=offs)
    if bias is not None:
        y = y + bias[expert_of_slot]
    return y


def _grouped_mm_works(x, w) -> bool:
    # _grouped_mm needs 16-byte aligned strides (so e.g. H=29 in fp32 takes the loop) and a kernel for the dtype.
    if any(d * x.element_size() % 16 for d in (x.shape[-1], w.shape[-1], w.shape[-2])):
        return False
    key = (x.device.type, x.dtype)
    ok = _GROUPED_MM_OK.get(key)
    if ok is None:
        try:
            a = torch.ones(4, 8, device=x.device, dtype=x.dtype)
            b = torch.ones(2, 8, 16, device=x.device, dtype=x.dtype)
            torch._grouped_mm(a, b, offs=torch.tensor([1, 4], device=x.device, dtype=torch.int32))
            ok = True
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _GROUPED_MM_OK[key] = ok
    return ok


_GROUPED_MM_OK: dict = {}


def experts_dropless(x, experts: MoeExperts, info: RoutingInfo, use_grouped_mm: bool | None = None):
    """Sort token-slots by expert; grouped GEMMs over the contiguous per-expert slices; weighted un-permute.

    use_grouped_mm: None = on CUDA when supported for these shapes/dtype and the experts are not quantised; False =
    loop over the slices (quantised experts: each through its own kernel); True with quantised experts dequantises
    the stacks first.
    """
    n, k = info.expert_idx.shape
    flat = info.expert_idx.reshape(-1)  # [N*k]
    order = flat.argsort(stable=True)  # slot positions grouped by expert
    token = order // k  # token of each sorted slot
    expert_sorted = flat[order]
    # (not torch.bincount: on CUDA it reads the max index back to the host)
    counts = torch.zeros(experts.num_experts, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    xs = x[token]  # [N*k, H]
    if use_grouped_mm is None:
        use_grouped_mm = x.device.type != "cpu" and not experts.quantized and _grouped_mm_works(x, experts.w_in)
    if use_grouped_mm:
        experts = experts.dense(x.dtype)
        offs = counts.cumsum(0).to(torch.int32)
        h = _grouped_linear(xs, experts.w_in, offs, experts.b_in, expert_sorted)
        up = _grouped_linear(xs, experts.w_up, offs) if experts.w_up is not None else None
        out = _grouped_linear(_activate(h, experts, up), experts.w_out, offs, experts.b_out, expert_sorted)
    else:
        out = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts.tolist()):  # the one host sync of this path
            if c:
                out[start:start + c] = _expert_forward(xs[start:start + c], experts, e)
            start += c
    # Un-permute back to [N, k, H] and combine: y = sum_j w_j * out_j, in slot order (deterministic, no atomics).
    slots = torch.empty_like(out)
    slots[order] = out
    w = info.weights.to(x.dtype)
    return (slots.view(n, k, -1) * w.unsqueeze(-1)).sum(dim=1)


def experts_dense(x, experts: MoeExperts, info: RoutingInfo):
    """All experts on all tokens (batched MatMul), combined with a [N, E] mask of routing weights. Static shapes.
    Quantised experts: each expert's own kernel on all tokens (the same static shapes and no host sync, so the NPU
    path uses it for them; no dense stack is built)."""
    num_e = experts.num_experts
    if experts.quantized:
        out = torch.stack([_expert_forward(x, experts, e) for e in range(num_e)])  # [E, N, H]
    else:
        xe = x.unsqueeze(0)  # [1, N, H] broadcast over experts
        h = torch.matmul(xe, experts.w_in.transpose(1, 2))  # [E, N, F]
        if experts.b_in is not None:
            h = h + experts.b_in.unsqueeze(1)
        up = torch.matmul(xe, experts.w_up.transpose(1, 2)) if experts.w_up is not None else None
        out = torch.matmul(_activate(h, experts, up), experts.w_out.transpose(1, 2))  # [E, N, H]
        if experts.b_out is not None:
            out = out + experts.b_out.unsqueeze(1)
    onehot = (info.expert_idx.unsqueeze(-1) == torch.arange(num_e, device=x.device)).to(x.dtype)  # [N, k, E]
    gate = (onehot * info.weights.to(x.dtype).unsqueeze(-1)).sum(dim=1)  # [N, E]
    return (out * gate.t().unsqueeze(-1)).sum(dim=0)


_IMPLS = {"reference": experts_reference, "dropless": experts_dropless, "dense": experts_dense}


def moe_ffn(x, router_weight, experts: MoeExperts, top_k=2, routing="deterministic", generator=None,
            impl="dropless"):
    """Top-k MoE FFN. x [N, H] (flatten batch*seq first), router_weight [E, H] -> (y [N, H], RoutingInfo).

    routing: "deterministic" (default, top-k of the softmax) or "deepspeed" (the original's Gumbel-noised second
    expert; draws one torch.rand of shape [N, E] from ``generator`` or the global RNG).
    impl: "reference" | "dropless" | "dense" (same result; see module docstring).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {sorted(_IMPLS)}, got {impl!r}")
    info = route(x, router_weight, top_k, routing, generator)
    return _IMPLS[impl](x, experts, info), info


def moe_ffn_reference(x, router_weight, experts, top_k=2, routing="deterministic", generator=None):
    return moe_ffn(x, router_weight, experts, top_k, routing, generator, impl="reference")


def moe_ffn_dropless(x, router_weight, experts, top_k=2, routing="deterministic", generator=None):
    return moe_ffn(x, router_weight, experts, top_k, routing, generator, impl="dropless")


def moe_ffn_dense(x, router_weight, experts, top_k=2, routing="deterministic", generator=None):
    return moe_ffn(x, router_weight, experts, top_k, routing, generator, impl="dense")
