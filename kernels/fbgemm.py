"""CPU int8 weight products through PyTorch's own dynamic-quantised linear, ``quantized::linear_dynamic`` (FBGEMM,
behind torch's "x86" / "fbgemm" quantised engine): the kit's per-channel int8 weight packed once, the activations
quantised to 8 bits per row by the op, int8 dot products (VNNI), fp32 output.

Why: on the AMD EPYC (avx512_vnni, no AMX) it streamed a 18944 x 3584 int8 weight at 57 GB/s where
``aten._weight_int8pack_mm`` streamed 30 (1.19 vs 2.23 ms, one row, 2 threads, the same weight repeated), and the
packed weight costs about its int8 bytes (RSS, measured: +69 MB for 68 MB of int8), unlike ONNX Runtime's MLAS
(kernels/mlas.py: ~2.2x). The op is a maintained library's kernel; the kit only hands it the weight.

How the stored form maps onto it, exactly: the int8 values q and the fp32 channel scales s become a per-channel
quantised tensor (zero point 0, ``torch._make_per_channel_quantized_tensor``: no new rounding), packed with
``quantized::linear_prepack``; ``quantized::linear_unpack`` gives q back bit for bit (saving, backward).

What changes in the numbers: the activations are quantised (asymmetric uint8, one scale per tensor the op is given).
The kit gives the op **one row at a time**, so every row (request, token) has its own scale: one request's
activations never set another's, and an answer does not depend on what else is in the batch. Rows from
``ROWS_PER_CALL`` on (prefill) take the dequantised weight and one bf16 GEMM instead (the row-at-a-time op would
read the weight once per row). On CPUs without VNNI, FBGEMM's AVX2 int8 path adds pairs of u8 x s8 products in
saturating 16 bits: there the activations use 7 bits (``reduce_range``), as torch's own dynamic quantisation does.

Opt-in (MOEVL_CPU_QUANT_KERNEL=fbgemm, kernels/quant.py): the default ATen kernel keeps bf16 activations. The
accuracy it costs is measured by ``benchmarks.quality`` on the trained defaults (the ``torch bf16 int8 fbgemm``
row). torch marks its quantised-tensor constructors deprecated for a future release; the kit pins torch 2.13.0,
and ``available()`` turns the layout off where they are gone.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS_PER_CALL = 16  # from this many rows on: dequantise + one bf16 GEMM (the prefill path of the ATen kernel too)


@functools.cache
def vnni() -> bool:
    """Whether the CPU has 8-bit dot products without 16-bit saturation (avx512_vnni / avx_vnni / AMX-int8)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _pack(q: torch.Tensor, scales: torch.Tensor):
    with warnings.catch_warnings():  # torch 2.13 marks the quantised-tensor constructors deprecated
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q.contiguous(), scales.double(),
                                                      torch.zeros(q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None)


@functools.cache
def available() -> bool:
    """The ops exist and the packed product gives the exact product on a small case (integers, 1-row input).
    False: the layout is simply not offered."""
    try:
        q = (torch.arange(32 * 64) % 255 - 127).to(torch.int8).reshape(32, 64)
        s = torch.full((32,), 0.5)
        x = torch.zeros(1, 64)
        x[0, 3], x[0, 10] = 1.0, -2.0
        op = Int8Linear(q, s)
        ok = torch.allclose(op.linear(x, None), x @ (q.float() * 0.5).T, rtol=1e-2, atol=1e-2)
        return bool(ok and torch.equal(op.stored(), q))
    except Exception:  # no quantised engine, or the ops are gone from this torch
        return False


class Int8Linear:
    """One int8 per-channel weight [out, in] packed for ``quantized::linear_dynamic``."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        self.out_features, self.in_features = q.shape
        self.scales = scales.float()
        self.packed = _pack(q, self.scales)
        self.reduce_range = not vnni()

    def stored(self) -> torch.Tensor:
        """The int8 values, bit for bit."""
        qt, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qt.int_repr()

    def linear(self, x2: torch.Tensor, bias):
        """x2 [M, in] -> x2 W^T (+ bias) in x2's dtype."""
        rows = x2.shape[0]
        if rows == 0:
            y = x2.new_zeros(0, self.out_features)
        elif rows >= ROWS_PER_CALL:
            w = self.stored().to(torch.bfloat16)
            y = F.linear(x2.to(torch.bfloat16), w) * self.scales.to(torch.bfloat16)
        else:
            xf = x2.float()
            if rows == 1:
                y = torch.ops.quantized.linear_dynamic(xf, self.packed, self.reduce_range)
            else:  # one row per call: each row quantised with its own scale
                y = torch.cat([torch.ops.quantized.linear_dynamic(xf[i:i + 1], self.packed, self.reduce_range)
                               for i in range(rows)])
        y = y.to(x2.dtype)
        return y if bias is None else y + bias.to(x2.dtype)
