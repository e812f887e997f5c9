"""Fused LoRA-MoE linear in Triton (punica-style): one source for CUDA and, through triton-ascend, Ascend NPUs.

What it computes (the oracle is :func:`moevl.kernels.reference.lora_moe_linear`, the original's loop over requests):
    y[b] = x[b] W^T + bias + sum_e C[b, e] * (x[b] A_e^T) B_e^T
    C[b, k_b] = s_task[b];  C[b, g] = s_glob[b], or 0 when k_b == g  (Awaker: p^2 s and (1 - p) s; g = global expert)
for a batch whose requests chose different task experts k_b, reading the experts straight from the stacked
weights (lora_A [X, r, in], lora_B [X, out, r], any strides): nothing is gathered or copied per request.

How: the base linear is the library GEMM (``kernels.cpu.linear``: cuBLAS, or a quantised weight's own op); two
Triton kernels then add the experts into its output:
- shrink: h[e, m, :] = C[b(m), e] * x[m] A_e^T, accumulated in fp32 (split over ``in`` for parallelism at decode,
  the partial sums added by one torch sum);
- expand: y[m, n-tile] += sum_e h[e, m, :] B_e[n-tile]^T, a read-modify-write of y in place, in y's dtype
  (the expert branch is summed in fp32 and added to the base output once, as the original does).
A tile of rows loops over the experts and skips every expert none of its rows uses. At decode the rows are the
requests (<= 16: one tile), so each selected expert's A and B are read once per step however many requests chose
it; punica's BGMV reads them once per request and counts on the cache. The step still has to read W plus the union
of the selected experts: at Awaker's r = 256 and 3584 -> 18944 that floor is 1.17x the base linear for one request
and 1.42x once all 5 experts are in use (``bytes_floor``), whatever the kernel.

The expand dot takes h in fp32 (exact, CUDA cores) for up to ``ROUND_H_ABOVE_ROWS`` rows, and rounded to the
weights' dtype (tensor cores, as punica/vLLM do) above that, i.e. in prefill, where the dot is compute bound.

Triton is optional (``pip install 'moevl-ascend[triton]'``). The kernels are built at their first launch, so
``TRITON_INTERPRET=1`` set before that runs them on CPU tensors (how the tests check them without a GPU). The
block sizes are untuned defaults: nothing here has been measured on a GPU or an NPU yet.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import torch

from moevl.kernels import cpu, reference  # cpu also registers the composed "cuda" set this module extends
from moevl.kernels.dispatch import _BACKENDS, register_backend

ROUND_H_ABOVE_ROWS = 64
_TARGET_PROGRAMS = 512  # shrink programs to aim for at decode (a few per SM), reached by splitting over ``in``


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonLoraPlan(NamedTuple):
    """All experts of one linear plus each request's coefficients.

    lora_A [X, r, in], lora_B [X, out, r] (the stacked weights themselves, any strides); coeff [B, X] fp32:
    C[b, e], the scale request b gives expert e (zero for experts it does not use).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    coeff: torch.Tensor


def expert_coefficients(expert: torch.Tensor, scales: torch.Tensor, num_experts: int) -> torch.Tensor:
    """expert [B] long (task expert per request), scales [B, 2] (task, global) -> C [B, X] fp32.

    The global expert is the last one. A request whose task expert is the global one counts it once, with the task
    scale; plain LoRA (X = 1) uses the task scale only - both as the reference does. Runs on the device, no sync."""
    batch = expert.shape[0]
    scales = scales.float()
    coeff = torch.zeros(batch, num_experts, dtype=torch.float32, device=expert.device)
    coeff.scatter_(1, expert.long()[:, None], scales[:, :1])
    if num_experts > 1:
        g = num_experts - 1
        coeff[:, g] += torch.where(expert == g, torch.zeros_like(scales[:, 1]), scales[:, 1])
    return coeff


def lora_moe_prepare(lora_A, lora_B, expert, scales) -> TritonLoraPlan:
    """Same arguments as :func:`moevl.kernels.reference.lora_moe_prepare`: lora_A [X, r, in], lora_B [X, out, r],
    expert [B], scales [B, 2] -> TritonLoraPlan (a [B, X] table; the weights are not copied)."""
    return TritonLoraPlan(lora_A, lora_B, expert_coefficients(expert, scales, lora_A.shape[0]))


def lora_moe_linear(x, weight, bias, plan, *, split_k: int | None = None, round_h: bool | None = None):
    """x [B, T, in], weight [out, in] (or a quantised weight module), bias [out] | None, plan (TritonLoraPlan |
    None) -> [B, T, out].

    ``split_k`` (parts of ``in`` the shrink is split into) and ``round_h`` (expand with h in the weights' dtype)
    are tuning knobs; None chooses them from the shapes."""
    y = cpu.linear(x, weight, bias)  # a plain or a quantised weight (kernels/quant.py)
    if plan is None:
        return y
    return lora_moe_accumulate_(y, x, plan, split_k=split_k, round_h=round_h)


def lora_moe_accumulate_(y, x, plan: TritonLoraPlan, *, split_k: int | None = None, round_h: bool | None = None):
    """y [B, T, out] += sum_e C[b, e] (x A_e^T) B_e^T, in place (y is typically the base linear's output).
    Returns y."""
    A, B, coeff = plan
    n_exp, rank, d_in = A.shape
    batch, tokens, _ = x.shape
    d_out = B.shape[1]
    if x.shape[-1] != d_in or B.shape[0] != n_exp or B.shape[2] != rank:
        raise ValueError(f"LoRA-MoE shapes do not fit: x {tuple(x.shape)}, lora_A {tuple(A.shape)} "
                         f"(experts, rank, in), lora_B {tuple(B.shape)} (experts, out, rank)")
    if coeff.shape != (batch, n_exp):
        raise ValueError(f"the plan was prepared for {coeff.shape[0]} requests and {coeff.shape[1]} experts, "
                         f"x has {batch} requests and the weights {n_exp} experts: prepare it for this batch")
    if y.shape != (batch, tokens, d_out):
        raise ValueError(f"output {tuple(y.shape)} does not fit x {tuple(x.shape)} and lora_B {tuple(B.shape)}")
    if not triton_available():
        raise RuntimeError("the Triton LoRA-MoE kernel needs triton: pip install 'moevl-ascend[triton]'")
    if x.numel() == 0 or y.numel() == 0:
        return y

    rows = batch * tokens
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    block_r = max(16, min(64, _next_pow2(rank)))
    block_k = max(16, min(128, _next_pow2(d_in)))
    block_n = max(16, min(64, _next_pow2(d_out)))
    m_blocks = -(-rows // block_m)
    r_blocks = -(-rank // block_r)
    k_blocks = -(-d_in // block_k)
    if split_k is None:
        split_k = 1 if _interpreting() else max(1, min(k_blocks, _TARGET_PROGRAMS // (m_blocks * r_blocks)))
    split_k = max(1, min(int(split_k), k_blocks))
    k_per_split = -(-k_blocks // split_k) * block_k
    split_k = -(-d_in // k_per_split)  # no empty splits
    if round_h is None:
        round_h = rows > ROUND_H_ABOVE_ROWS and B.dtype in (torch.float16, torch.bfloat16)
    # Triton's interpreter (3.7.1, 3.9.0) gets tl.dot on bf16 wrong (it multiplies the raw bits); on a GPU fp32
    # operands need the exact ("ieee") dot. Up-casting 16-bit operands is exact (their products fit fp32), so the
    # interpreter computes what the GPU's 16-bit dot with fp32 accumulation computes.
    interp = _interpreting()
    shrink_fp32 = interp or x.dtype != A.dtype or x.dtype == torch.float32
    expand_fp32 = interp or not round_h or B.dtype == torch.float32

    coeff = coeff.to(device=x.device, dtype=torch.float32).contiguous()
    # Only the (expert, row tile) pairs the shrink computes are written, and only those the expand reads (both
    # kernels skip an expert by the same test on the same row tiles), so the buffer needs no zeroing.
    h = torch.empty(split_k, n_exp, rows, rank, dtype=torch.float32, device=x.device)  # [splits, X, rows, r]
    shrink, expand = _kernels()
    shrink[(m_blocks, r_blocks, split_k)](
        x, A, coeff, h, rows, tokens, d_in, rank, n_exp, k_per_split,
        x.stride(0), x.stride(1), x.stride(2), A.stride(0), A.stride(1), A.stride(2),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, DOT_FP32=shrink_fp32)
    # The split partial sums are added once here, not by each of the expand's many column tiles
    h = h[0] if split_k == 1 else h.sum(0)  # [X, rows, r]
    expand[(-(-d_out // block_n), m_blocks)](
        h, B, coeff, y, rows, tokens, d_out, rank, n_exp,
        B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1), y.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, ROUND_H=bool(round_h), DOT_FP32=expand_fp32)
    return y


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bytes_floor(batch_experts: int, d_in: int, d_out: int, rank: int) -> float:
    """Lower bound of a memory-bound LoRA-MoE step over the base linear: (W + the distinct selected experts) / W."""
    return (d_in * d_out + batch_experts * rank * (d_in + d_out)) / (d_in * d_out)


@functools.cache
def _kernels():
    """Build (jit-decorate) the kernels at first use, so that TRITON_INTERPRET set before then is honoured."""
    import triton
    import triton.language as tl

    @triton.jit
    def lora_shrink(x_ptr, a_ptr, c_ptr, h_ptr, M, T, K, R, X, k_per_split,
                    sxb, sxt, sxk, sae, sar, sak,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
        # grid (row tiles, rank tiles, splits of K); h [splits, X, M, R] fp32
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        req = rows // T
        # [BLOCK_M] row starts (x may be strided), in int64: batch * tokens * width can pass 2^31 in prefill
        x_rows = x_ptr + req.to(tl.int64) * sxb + (rows % T).to(tl.int64) * sxt
        ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for e in range(0, X):
            c = tl.load(c_ptr + req * X + e, mask=row_ok, other=0.0)  # [BLOCK_M] this expert's scale per row
            if tl.max(tl.abs(c), axis=0) > 0:  # some row of the tile uses expert e
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(k_lo, k_hi, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < k_hi
                    xt = tl.load(x_rows[:, None] + ks[None, :] * sxk,
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
                    at = tl.load(a_ptr + e * sae + ranks[None, :] * sar + ks[:, None] * sak,
                                 mask=k_ok[:, None] & rank_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_R] = A_e^T
                    if DOT_FP32:
                        acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(xt, at)
                acc = acc * c[:, None]
                h_off = ((pid_k * X + e) * M + rows[:, None]) * R + ranks[None, :]
                tl.store(h_ptr + h_off, acc, mask=row_ok[:, None] & rank_ok[None, :])

    @triton.jit
    def lora_expand(h_ptr, b_ptr, c_ptr, y_ptr, M, T, N, R, X,
                    sbe, sbn, sbr, syb, syt, syn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                    ROUND_H: tl.constexpr, DOT_FP32: tl.constexpr):
        # grid (output column tiles, row tiles): y[rows, cols] += sum_e h[e, rows, :] B_e[cols, :]^T; h [X, M, R]
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        req = rows // T
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(0, X):
            c = tl.load(c_ptr + req * X + e, mask=row_ok, other=0.0)
            if tl.max(tl.abs(c), axis=0) > 0:  # the same test as the shrink's: only written h is read
                for r0 in range(0, R, BLOCK_R):
                    ranks = r0 + tl.arange(0, BLOCK_R)
                    rank_ok = ranks < R
                    h = tl.load(h_ptr + (e * M + rows[:, None]) * R + ranks[None, :],
                                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
                    bt = tl.load(b_ptr + e * sbe + cols[None, :] * sbn + ranks[:, None] * sbr,
                                 mask=rank_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N] = B_e^T
                    if ROUND_H:
                        h = h.to(bt.dtype)
                    if DOT_FP32:
                        acc += tl.dot(h.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(h, bt)
        y_ptrs = (y_ptr + req.to(tl.int64)[:, None] * syb + (rows % T).to(tl.int64)[:, None] * syt
                  + cols[None, :] * syn)
        ym = row_ok[:, None] & col_ok[None, :]
        y = tl.load(y_ptrs, mask=ym, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ym)

    return lora_shrink, lora_expand


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernel set: Triton where it can run (triton imports, the weights are on a CUDA device), else the
# composed PyTorch path of kernels/cpu.py. No NPU set uses this yet (triton-ascend is untested here).
# ---------------------------------------------------------------------------------------------------------------

_composed = _BACKENDS["cuda"]


def cuda_lora_moe_prepare(lora_A, lora_B, expert, scales):
    if lora_A.is_cuda and triton_available():
        return lora_moe_prepare(lora_A, lora_B, expert, scales)
    return _composed.lora_moe_prepare(lora_A, lora_B, expert, scales)


def cuda_lora_moe_linear(x, weight, bias, plan):
    if isinstance(plan, reference.LoraPlan) and x.is_cuda and triton_available():
        plan = lora_moe_prepare(*plan)  # a plan made by another backend's prepare
    if isinstance(plan, TritonLoraPlan):
        return lora_moe_linear(x, weight, bias, plan)
    return _composed.lora_moe_linear(x, weight, bias, plan)


register_backend(dataclasses.replace(_composed, lora_moe_prepare=cuda_lora_moe_prepare,
                                     lora_moe_linear=cuda_lora_moe_linear))
