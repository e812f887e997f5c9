"""Fast CPU/CUDA variants of the hot ops; registers backends "cpu", "cuda", "cpu-merged", "cuda-merged".

The static-shape variants that export/ traces are in :mod:`moevl.kernels.export`.

Each op here has its oracle in :mod:`kernels.reference` (or :mod:`kernels.moe` for the MoE FFN) and a test in
tests/test_kernels.py / tests/test_moe_kernels.py that compares the two; benchmarks/kernels.py measures them.

LoRA-MoE linear (Awaker). Per request and linear the released model reduces to one rank-2r LoRA
([A_k; A_g], [s_k B_k, s_g B_g]) on top of the frozen W. ``lora_moe_prepare`` gathers it once per request
(prefill) with the gate scales folded into B and B stored transposed ([B, 2r, out], the layout that makes the
decode GEMV stream memory contiguously: measured 1.21x vs 1.34x of the base linear with B^T as a view), so every
step is the base linear plus two batched GEMMs, with no Python loop over requests/experts and no host sync.
Memory: the gathered copy costs 2r * (in + out) elements per request and linear (the same as the two experts it
selects); at 7B width that is ~77 MB per layer and request in bf16.

Merged strategy: ``merge_lora_plan`` folds a request's rank-2r LoRA into a private copy of W, after which a step
costs exactly the base linear. ``should_merge`` is the cost model that says when this pays; the "*-merged"
backends merge lazily at the first apply of a plan (once per request and linear) and reuse the merged weight.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from moevl.ascend.device import cpu_flag_set
from moevl.kernels import fbgemm, moe, quant, reference
from moevl.kernels.dispatch import Kernels, _BACKENDS, register_backend


# ---------------------------------------------------------------------------------------------------------------
# LoRA-MoE linear
# ---------------------------------------------------------------------------------------------------------------

class StackedLoraPlan(NamedTuple):
    """One request's selected experts for one linear, stacked into a single rank-R LoRA (R = 2r, or r for X = 1).

    lora_A [B, R, in]; lora_Bt [B, R, out] = ([s_k B_k, s_g B_g])^T with the gate scales folded in.
    ``merged`` is a one-slot cache for the merged strategy (list holding [B, out, in] once merged), None = never merge.
    """

    lora_A: torch.Tensor
    lora_Bt: torch.Tensor
    merged: list | None = None


class ViewLoraPlan(NamedTuple):
    """Batch 1 on the CPU: the selected experts as views of the weights (no copy at all at prefill).

    lora_A: (A_k, A_g) [r, in] each; lora_Bt: (B_k^T, B_g^T) [r, out] each (views of lora_B: contiguous when it
    is stored rank-major, see ``store_lora_b``); scales: (s_k, s_g) as [1]-tensors, applied to the rank-r activations.
    Prefill runs on the views; the first single-token step stacks them once (cached in ``stacked``): a
    PackedLoraPlan where ``pack_lora`` (bf16), else a StackedLoraPlan, whose one contiguous rank-2r GEMV pair is ~2%
    faster per decode step than two pairs on views.
    """

    lora_A: tuple
    lora_Bt: tuple
    scales: tuple
    stacked: list


class PackedLoraPlan(NamedTuple):
    """Batch-1 decode on the CPU in bf16: a ViewLoraPlan's experts stacked (A [R, in], B [out, R], unscaled) and
    reordered into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``; opaque), streamed by
    ``mkldnn._linear_pointwise``; the request's gate scales [R] multiply the rank-R activations."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scales: torch.Tensor


# Pack the batch-1 decode stack for oneDNN in bf16 on CPUs with native bf16 dot products (avx512_bf16 / AMX).
# Measured streaming distinct weights (AMD EPYC, 2 threads, R = 512, bf16): packed 32-35 GB/s vs 16-29 GB/s for
# mm / addmm on the plain stack, per shape; at 7B width (2 layers, rank 256, int8 base on FBGEMM) a decode step took
# 37.9 vs 44.0 ms. The last packed stack of each linear is kept (PACKED, weakly keyed by the adapter tensor; the key
# holds the slices' addresses and version counters, so weights changed in place are packed anew) and reused by the
# next request that picks the same experts: its first decode step then took 47 ms, 85 ms when packed anew, 95 ms
# with the plain stack's copies. It costs memory for one request's experts per linear between requests. fp16 is not
# packed (oneDNN needs avx512_fp16 / avx_ne_convert for it; not measured). MOEVL_CPU_PACK_LORA=0 turns it off.
PACK_LORA = os.environ.get("MOEVL_CPU_PACK_LORA", "1") != "0"  # checked, and set again, at placement


def _switch(name: str, on: str, off: str) -> bool:
    """An on/off environment setting: "1" (or unset) -> True, "0" -> False; anything else is an error naming the
    variable and what each value does."""
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: set it to 1 ({on}, the default) or 0 ({off})")
    return value == "1"


def pack_lora_setting() -> bool:
    """MOEVL_CPU_PACK_LORA: "1" (or unset) packs, "0" does not."""
    return _switch("MOEVL_CPU_PACK_LORA", "pack the bf16 LoRA decode stack for oneDNN", "plain stacks")


def fuse_groups_setting() -> bool:
    """MOEVL_CPU_FUSE_GROUPS: "1" (or unset) packs the int8 weights of linears on one input (q/k/v, gate/up) as one
    FBGEMM weight (``quant.fuse_int8_groups``), "0" keeps one per linear."""
    return _switch("MOEVL_CPU_FUSE_GROUPS", "one int8 product for the linears of one input", "one per linear")


PACKED = WeakIdKeyDictionary()  # lora_A parameter -> (key, packed A, packed B): the last stack packed for it


@functools.cache
def onednn_bf16_native() -> bool:
    """oneDNN has bf16 here and the CPU computes bf16 dot products natively (avx512_bf16 / amx_bf16)."""
    return (torch.backends.mkldnn.is_available() and bool(cpu_flag_set() & {"avx512_bf16", "amx_bf16"})
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def pack_lora(dtype, device) -> bool:
    return (PACK_LORA and dtype == torch.bfloat16 and torch.device(device).type == "cpu"
            and onednn_bf16_native())


def _packed_linear(x2, packed):
    return torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")


def pack_view_plan(plan: "ViewLoraPlan") -> PackedLoraPlan:
    """The packed decode stack of a batch-1 plan, reused from PACKED when the same expert slices of the same,
    unmodified adapter tensors were packed last (the key holds their addresses and version counters)."""
    r = plan.lora_A[0].shape[0]
    scales = torch.cat([s.expand(r) for s in plan.scales]).to(plan.lora_A[0].dtype)
    owner = plan.lora_A[0]._base
    key = (tuple(a.data_ptr() for a in plan.lora_A), tuple(b.data_ptr() for b in plan.lora_Bt),
           tuple(a._version for a in plan.lora_A), tuple(b._version for b in plan.lora_Bt),
           plan.lora_A[0].shape, plan.lora_Bt[0].shape)
    hit = PACKED.get(owner) if owner is not None else None
    if hit is not None and hit[0] == key:
        return PackedLoraPlan(hit[1], hit[2], scales)
    reorder = torch.ops.mkldnn._reorder_linear_weight
    A = torch.cat(plan.lora_A)  # [R, in]
    B = torch.cat([bt.t() for bt in plan.lora_Bt], dim=1)  # [out, R]
    packed = PackedLoraPlan(reorder(A, 1), reorder(B, 1), scales)
    if owner is not None:
        PACKED[owner] = (key, packed.lora_A, packed.lora_B)
    return packed


def lora_moe_prepare(lora_A, lora_B, expert, scales):
    """Gather each request's task + global expert once: lora_A [X, r, in], lora_B [X, out, r], expert [B] long,
    scales [B, 2] (task, global) -> StackedLoraPlan. Runs on the device of the weights, no host sync.

    One CPU request takes views instead (ViewLoraPlan): reading the expert index is free there (no device to
    synchronise with) and the gather copy was ~7% of the time to first token at 7B width."""
    x_experts, r, _ = lora_A.shape
    batch = expert.shape[0]
    if batch == 1 and x_experts > 1 and lora_A.device.type == "cpu":
        k, g = int(expert[0]), x_experts - 1
        s_k, s_g = scales[0, 0:1].to(lora_A.dtype), scales[0, 1:2].to(lora_A.dtype)
        if k == g:  # the task expert is the global one: counted once, as the reference does
            return ViewLoraPlan((lora_A[k],), (lora_B[k].t(),), (s_k,), [])
        return ViewLoraPlan((lora_A[k], lora_A[g]), (lora_B[k].t(), lora_B[g].t()), (s_k, s_g), [])
    return _gather_stacked(lora_A, lora_B, expert, scales)


def _gather_stacked(lora_A, lora_B, expert, scales) -> StackedLoraPlan:
    x_experts, r, _ = lora_A.shape
    batch = expert.shape[0]
    scales = scales.to(lora_B.dtype)
    if x_experts == 1:
        # Plain LoRA: one expert, the "global" half would duplicate it (the reference adds it once).
        A = lora_A.expand(batch, -1, -1)  # a view, no copy
        Bt = lora_B[0].t().unsqueeze(0) * scales[:, 0, None, None]  # [B, r, out]
        return StackedLoraPlan(A, Bt)
    g = x_experts - 1
    # If a request's task expert *is* the global one, the reference counts it once: zero the second half.
    s_task = scales[:, 0]
    s_glob = torch.where(expert == g, torch.zeros_like(scales[:, 1]), scales[:, 1])
    idx = torch.stack([expert, torch.full_like(expert, g)], dim=1)  # [B, 2]
    A = lora_A[idx].reshape(batch, 2 * r, -1)  # [B, 2r, in]
    if expand_out_major(lora_B.dtype, lora_B.device):
        # B [B, out, 2r] (B^T a view): a gather of [out, r] blocks (lora_B stored so, prepare_weights_cpu), then
        # one copy that interleaves the two halves per row
        sel = lora_B.index_select(0, idx.flatten()).view(batch, 2, -1, r)  # [B, 2, out, r]
        sel.mul_(torch.stack([s_task, s_glob], dim=1)[:, :, None, None])
        return StackedLoraPlan(A, sel.permute(0, 2, 1, 3).reshape(batch, -1, 2 * r).transpose(1, 2))
    # index_select on the transposed view writes the [r, out] blocks contiguously in one pass; the scale is
    # applied in place (half the memory traffic of gather -> scale -> transposed copy; 58 vs 117 ms at 7B width)
    Bt = lora_B.transpose(1, 2).index_select(0, idx.flatten()).view(batch, 2, r, -1)  # [B, 2, r, out]
    Bt.mul_(torch.stack([s_task, s_glob], dim=1)[:, :, None, None])
    return StackedLoraPlan(A, Bt.view(batch, 2 * r, -1))


def lora_moe_prepare_merged(lora_A, lora_B, expert, scales):
    """As :func:`lora_moe_prepare`, flagged so that the first apply merges into a private W (see should_merge)."""
    return _gather_stacked(lora_A, lora_B, expert, scales)._replace(merged=[])


def linear(x, weight, bias=None):
    """x W^T + b for a plain weight tensor or a weight module (quantised or packed: kernels/quant.py), which
    computes it itself."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight(x, bias)


def expand_out_major(dtype, device) -> bool:
    """The layout of the rank-R expand weight for one-row products (decode): True -> B [out, R] contiguous (the plan
    holds B^T as a transposed view), False -> B^T [R, out] contiguous. Measured on an AMD EPYC, 2 threads, R = 512:
    bf16 streamed [out, R] rows 1.4-2x faster (0.70 vs 0.96 ms for out = 18944; oneDNN), fp32 the other way round
    (1.50 vs 2.65 ms; MKL)."""
    return dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu"


def store_lora_b(model) -> None:
    """Store every adapter's lora_B ([X, out, r]) in the memory order its products want here: [X, out, r] itself
    where ``expand_out_major`` (selecting a request's experts is then a copy of [out, r] blocks), else rank-major
    ([X, r, out] in memory, as ``AwakerModel.init_buffers`` leaves it)."""
    with torch.no_grad():
        for mod in model.modules():
            b = getattr(mod, "lora_B", None)
            if isinstance(b, torch.Tensor) and b.dim() == 3:
                if expand_out_major(b.dtype, b.device):
                    b.data = b.data.contiguous()
                else:
                    b.data = b.data.transpose(1, 2).contiguous().transpose(1, 2)


def new_expand(like: torch.Tensor, lead: tuple, rank: int, out: int) -> torch.Tensor:
    """Zeros for B^T [*lead, rank, out] in the memory order ``expand_out_major`` picks for ``like``'s dtype and
    device (a transposed view of [*lead, out, rank] where out-major)."""
    if expand_out_major(like.dtype, like.device):
        return like.new_zeros(*lead, out, rank).transpose(-1, -2)
    return like.new_zeros(*lead, rank, out)


def stack_expand(bts, scales) -> torch.Tensor:
    """[s_1 B_1^T; s_2 B_2^T; ...] -> B^T [R, out], in the layout ``expand_out_major`` picks for its dtype."""
    r, out = bts[0].shape
    bt = new_expand(bts[0], (), r * len(bts), out)
    for i, (b, s) in enumerate(zip(bts, scales)):
        torch.mul(b, s, out=bt[i * r:(i + 1) * r])
    return bt


def _base(x, weight, bias, base):
    """x W^T + b, or ``base`` where the group it belongs to computed it already (``lora_moe_group``)."""
    return linear(x, weight, bias) if base is None else base


def _apply_views(x, weight, bias, plan: ViewLoraPlan, base=None):
    # x [1, T, in]: y = x W^T + b + sum_e ((x A_e^T) s_e) B_e^T, two rank-r GEMM pairs on views
    x2 = x[0]
    y = _base(x2, weight, bias, None if base is None else base[0])
    for A, Bt, s in zip(plan.lora_A, plan.lora_Bt, plan.scales):
        y = torch.addmm(y, F.linear(x2, A).mul_(s), Bt)
    return y.unsqueeze(0)


def _apply_stacked(x, weight, bias, plan: StackedLoraPlan, base=None):
    # x [B, T, in] -> [B, T, out]: base linear + (x A^T) Bt, accumulated into the base output.
    A, Bt = plan.lora_A, plan.lora_Bt
    if x.shape[0] == 1:
        # Batch 1: plain 2-D GEMMs on views (fewer dispatch layers than bmm, same math).
        x2 = x[0]
        y = _base(x2, weight, bias, None if base is None else base[0])
        if _rowvec_blas(x2, A, Bt):  # one fp32 row (decode): numpy's sgemv streams A and B^T (quant.OpenblasWeight)
            return y.add_(quant.rowvec_matmul(quant.rowvec_linear(x2, A[0].detach().numpy()), Bt[0])).unsqueeze(0)
        return torch.addmm(y, F.linear(x2, A[0]), Bt[0]).unsqueeze(0)
    y = _base(x, weight, bias, base)
    h = torch.bmm(x, A.transpose(1, 2))  # [B, T, R]
    return torch.baddbmm(y, h, Bt)


def _rowvec_blas(x2, A, Bt) -> bool:
    """The LoRA GEMVs of one fp32 row go through numpy's BLAS: enabled at load when the base linears measured the
    OpenBLAS layout fastest (quant.choose_dense_layouts), never under autograd, CPU only."""
    return (quant.ROWVEC_BLAS["lora"] and x2.shape[0] == 1 and x2.dtype == A.dtype == Bt.dtype == torch.float32
            and x2.device.type == "cpu" and A.device.type == "cpu" and A[0].is_contiguous()
            and not (torch.is_grad_enabled() and (x2.requires_grad or A.requires_grad or Bt.requires_grad)))


def merge_lora_plan(weight, plan: StackedLoraPlan) -> torch.Tensor:
    """Private merged weight per request: W + (s B) A -> [B, out, in] (B = requests). Costs 2*out*in*R FLOPs and
    out*in elements of memory per request; computed in fp32 and rounded once to W's dtype."""
    delta = torch.bmm(plan.lora_Bt.transpose(1, 2).float(), plan.lora_A.float())  # [B, out, in]
    dense = weight.float() if isinstance(weight, torch.Tensor) else weight.dequantize(torch.float32)
    return (delta + dense).to(weight.dtype)


def lora_moe_linear(x, weight, bias, plan, base=None):
    """x [B, T, in], weight [out, in], bias [out] | None, plan from this module's prepare (or None) -> [B, T, out].
    ``base``: x W^T + b [B, T, out] when already computed (``lora_moe_group``; not for a merging plan)."""
    if plan is None:
        return _base(x, weight, bias, base)
    if isinstance(plan, reference.LoraPlan):  # a plan made by another backend's prepare: convert (once per call)
        plan = lora_moe_prepare(*plan)
    if isinstance(plan, ViewLoraPlan):
        if x.shape[1] > 1:
            return _apply_views(x, weight, bias, plan, base)
        if not plan.stacked:
            a0 = plan.lora_A[0]
            if pack_lora(a0.dtype, a0.device) and not (torch.is_grad_enabled() and a0.requires_grad):
                plan.stacked.append(pack_view_plan(plan))
            else:
                A = torch.cat(plan.lora_A)[None]  # [1, R, in]
                plan.stacked.append(StackedLoraPlan(A, stack_expand(plan.lora_Bt, plan.scales)[None]))
        plan = plan.stacked[0]
        if isinstance(plan, PackedLoraPlan):
            x2 = x[0].contiguous()
            if torch.is_grad_enabled() and x2.requires_grad:  # oneDNN's packed product has no autograd
                raise RuntimeError("a packed LoRA decode plan (kernels.cpu.PackedLoraPlan) is inference-only: run "
                                   "decode under torch.no_grad(), or train with lora_moe_linear_autograd")
            y = _base(x2, weight, bias, None if base is None else base[0])
            h = _packed_linear(x2, plan.lora_A).mul_(plan.scales)  # [T, R], the gate scales per rank block
            return y.add_(_packed_linear(h, plan.lora_B)).unsqueeze(0)
    if plan.merged is not None:
        if base is not None:
            raise ValueError("a merging plan computes its own product: no base output for it")
        if not plan.merged:
            plan.merged.append(merge_lora_plan(weight, plan))
        W = plan.merged[0]  # [B, out, in]
        if x.shape[0] == 1:
            return F.linear(x, W[0], bias)
        y = torch.bmm(x, W.transpose(1, 2))
        return y + bias if bias is not None else y
    return _apply_stacked(x, weight, bias, plan, base)


def _fused_rows(linears, x):
    """The one FBGEMM product that holds every linear's weight, in order (``quant.fuse_int8_groups``), or None (not
    fused, or x needs gradients: the fused product has no backward)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    return fbgemm.fused_of([getattr(m.weight, "fbgemm", None) for m in linears])


def _group_bases(x, linears, fused):
    # one product for the group, then each member's columns (views) plus its own bias, as the member computes alone
    y = fused.linear(x.reshape(-1, x.shape[-1]), None)
    out = []
    for m in linears:
        rows = m.weight.fbgemm
        yi = y[:, rows.start:rows.stop]
        if m.bias is not None:
            yi = yi + m.bias.to(yi.dtype)
        out.append(yi.view(*x.shape[:-1], rows.stop - rows.start))
    return out


def linear_group(x, linears):
    """Linears of one input (q/k/v): one FBGEMM product where their int8 weights were packed as one
    (``quant.fuse_int8_groups``), each member's output a view of it; else each module alone."""
    fused = _fused_rows(linears, x)
    if fused is None:
        return reference.linear_group(x, linears)
    return tuple(_group_bases(x, linears, fused))


def lora_moe_group(x, linears, plans):
    """Adapted linears of one input (Awaker's gate/up): the base products as one, as ``linear_group``, then each
    member's experts on its own output (a merging plan computes its own product: the group then runs member by
    member)."""
    fused = _fused_rows(linears, x)
    if fused is None or any(isinstance(p, StackedLoraPlan) and p.merged is not None for p in plans):
        return reference.lora_moe_group(x, linears, plans)
    bases = _group_bases(x, linears, fused)
    return tuple(lora_moe_linear(x, m.weight, m.bias, p, base=y) for m, p, y in zip(linears, plans, bases))


def lora_moe_linear_autograd(x, weight, bias, plan):
    """The reference's ``lora_moe_linear`` (a loop over requests, the original's semantics) as batched products that
    autograd differentiates, for training: each request's task expert gathered ([B, r, in] / [B, out, r]: gather's
    backward adds the gradients into the right experts), the global expert one product over every row, the expert
    branch in fp32 and added to the base output as the reference does; a request whose task expert is the global
    one counts it once. ``plan``: the reference's LoraPlan (lora_A [X, r, in], lora_B [X, out, r], expert [B],
    scales [B, 2]). Tested against the reference's values and gradients (tests/test_kernels.py)."""
    y = linear(x, weight, bias)
    if plan is None:
        return y
    if not isinstance(plan, reference.LoraPlan):
        raise TypeError("lora_moe_linear_autograd takes the reference's LoraPlan (training kernels)")
    A, B, expert, scales = plan
    g = A.shape[0] - 1
    xf = x.float()
    s_task = scales[:, 0].float()
    h = torch.bmm(xf, A[expert].float().transpose(1, 2))  # [B, T, r]
    delta = torch.bmm(h, B[expert].float().transpose(1, 2)) * s_task[:, None, None]
    if g > 0:  # experts + a global one (one expert alone is a plain LoRA: counted once)
        s_glob = torch.where(expert == g, torch.zeros_like(s_task), scales[:, 1].float())
        delta = delta + (xf @ A[g].float().t() @ B[g].float().t()) * s_glob[:, None, None]
    return (y.float() + delta).to(y.dtype)


# Throughput figures the cost model uses when the caller has none (order of magnitude for a 2-core CPU, fp32;
# benchmarks/kernels.py measures the real ones and reports the measured break-even).
DEFAULT_READ_BW = 20e9  # bytes/s a GEMV actually streams
DEFAULT_FLOPS = 100e9  # GEMM FLOP/s


def merge_break_even_tokens(batch, d_in, d_out, rank, *, dtype_bytes=4, read_bw=DEFAULT_READ_BW,
                            flops=DEFAULT_FLOPS) -> float:
    """Decode steps after which merging has paid for itself (inf if it never does).

    Decode is memory bound, so a step costs the bytes it reads. Unmerged: W once + each request's rank-R LoRA
    (R = 2*rank), i.e. (out*in + batch*R*(in+out)) elements. Merged: each request's private W, batch*out*in.
    The merge itself is a GEMM (2*out*in*R FLOPs per request) plus reading W and writing the copy.
    """
    R = 2 * rank
    unmerged = (d_out * d_in + batch * R * (d_in + d_out)) * dtype_bytes / read_bw
    merged = batch * d_out * d_in * dtype_bytes / read_bw
    saving = unmerged - merged
    if saving <= 0:
        return float("inf")
    merge_cost = batch * (2 * d_out * d_in * R / flops + 3 * d_out * d_in * dtype_bytes / read_bw)
    return merge_cost / saving


def should_merge(expected_tokens, batch, d_in, d_out, rank, bytes_free, *, dtype_bytes=4,
                 read_bw=DEFAULT_READ_BW, flops=DEFAULT_FLOPS, memory_headroom=0.5) -> bool:
    """True when merging the selected LoRA into private weights is expected to be faster overall.

    Merge if (a) the private weights (batch*out*in*dtype_bytes) fit in ``memory_headroom`` of ``bytes_free`` and
    (b) the request will generate more tokens than the break-even (:func:`merge_break_even_tokens`). With batch > 1
    the merged step reads batch copies of W, so (b) essentially never holds: merging is a batch-1 strategy.
    """
    if batch * d_out * d_in * dtype_bytes > memory_headroom * bytes_free:
        return False
    return expected_tokens > merge_break_even_tokens(batch, d_in, d_out, rank, dtype_bytes=dtype_bytes,
                                                     read_bw=read_bw, flops=flops)


# ---------------------------------------------------------------------------------------------------------------
# Other hot ops
# ---------------------------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    # Same rounding as the reference (normalise in fp32, cast, then scale), one fused ATen op for the fp32 part.
    y = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * y.to(x.dtype)


def swiglu(gate, up):
    return F.silu(gate).mul_(up)


def attention(q, k, v, keep_mask, scale):
    """SDPA with grouped KV heads, no repeat_interleave copy. q [B, Hq, T, D]; k, v [B, Hkv, S, D];
    keep_mask [B, 1, T, S] True = may attend. Fully masked rows give zeros (as the reference).

    The mask goes in additive form: on CPU, SDPA with a boolean mask and enable_gqa takes a path ~40x slower
    than with a float mask at decode (6.3 ms vs 0.16 ms for 28/4 heads, S = 200, measured with torch 2.13).
    finfo.min rather than -inf keeps fully masked rows finite (they are zeroed below).

    bf16 / fp16 with a few query tokens (decode) take batched matmuls instead (``_attention_few_queries``): SDPA's
    reduced-precision CPU path at one query token was ~9x slower than the same math from matmuls (0.73 vs 0.08 ms
    for 28/4 heads, S = 256; 6.3 vs 0.39 ms at S = 2048; 2 threads, torch 2.13)."""
    if q.dtype in (torch.bfloat16, torch.float16) and q.shape[2] <= FEW_QUERIES and q.device.type == "cpu":
        return _attention_few_queries(q, k, v, keep_mask, scale)
    bias = torch.zeros(keep_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
        ~keep_mask, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    any_kept = keep_mask.any(-1, keepdim=True)  # [B, 1, T, 1]
    return out.masked_fill(~any_kept, 0)


# at most this many query tokens take _attention_few_queries (its fp32 scores are [B, Hq, T, S]: small for decode)
FEW_QUERIES = 16


def _attention_few_queries(q, k, v, keep_mask, scale):
    """Reduced-precision attention for a few query tokens, as SDPA's CPU flash kernel rounds it: scores and softmax
    in fp32, the probabilities rounded to the input dtype for the product with V (fp32 accumulation). GQA by
    grouping query heads [B, Hkv, rep * T, D] (no K/V copy). Fully masked rows give zeros."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    scores = torch.matmul(q.float().reshape(b, hkv, rep * t, d), k.float().transpose(-1, -2))
    scores = scores.view(b, hq, t, -1).mul_(scale).masked_fill_(~keep_mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs.view(b, hkv, rep * t, -1), v).view(b, hq, t, d)
    return out.masked_fill_(~keep_mask.any(-1, keepdim=True), 0)


def patch_embed(patches, weight):
    """Conv3d with kernel == stride is a matmul: [N, C*t*p*p] @ weight.view(E, -1)^T."""
    e = weight.shape[0]
    return F.linear(patches.to(weight.dtype), weight.reshape(e, -1))


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------

def prepare_weights_cpu(model) -> None:
    """Quantised weights run by ``MOEVL_CPU_QUANT_KERNEL`` (kernels/quant.py bind_cpu): auto (the default: int8 on
    torch's FBGEMM dynamic-quantised linear where the CPU has VNNI, kernels/fbgemm.py, int8 activations per row;
    else and for int4 the ATen CPU ops, bf16 activations) | aten | fbgemm | fastest (ONNX Runtime's MatMulNBits,
    MLAS, where measured faster per shape) | mlas (faster, at about 2.2x the weight's memory); large dense
    base weights take the layout measured fastest for their shape on this CPU (MKL plain, oneDNN packed or OpenBLAS
    one-row products; ``MOEVL_CPU_LAYOUT`` = auto | plain | onednn | openblas overrides); the adapters' lora_B in the
    memory order its products want (``store_lora_b``); ``MOEVL_CPU_PACK_LORA`` = 1 | 0 (``pack_lora``)."""
    global PACK_LORA

    policy = os.environ.get("MOEVL_CPU_QUANT_KERNEL", "auto")
    if policy not in quant.QUANT_KERNEL_POLICIES:
        raise ValueError(f"MOEVL_CPU_QUANT_KERNEL={policy!r}: set it to one of "
                         f"{', '.join(quant.QUANT_KERNEL_POLICIES)} (or unset it: auto)")
    quant.bind_all(model, functools.partial(quant.bind_cpu, policy=policy))
    quant.fuse_int8_groups(model, fuse_groups_setting())
    quant.choose_dense_layouts(model, os.environ.get("MOEVL_CPU_LAYOUT", "auto"))
    PACK_LORA = pack_lora_setting()
    store_lora_b(model)


def prepare_weights_cuda(model) -> None:
    """Quantised weights run as dequantise + matmul (not verified on a GPU)."""
    quant.bind_all(model, quant.bind_dequantize)


def _fast(name: str, merged: bool = False) -> Kernels:
    return dataclasses.replace(
        _BACKENDS["reference"],
        name=name,
        rms_norm=rms_norm,
        swiglu=swiglu,
        attention=attention,
        patch_embed=patch_embed,
        lora_moe_prepare=lora_moe_prepare_merged if merged else lora_moe_prepare,
        lora_moe_linear=lora_moe_linear,
        linear_group=linear_group,
        lora_moe_group=lora_moe_group,
        moe_ffn=moe.moe_ffn_dropless,
        prepare_weights=prepare_weights_cuda if name.startswith("cuda") else prepare_weights_cpu,
    )


for _name in ("cpu", "cuda"):
    register_backend(_fast(_name))
    register_backend(_fast(f"{_name}-merged", merged=True))
