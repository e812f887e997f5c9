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

What changes in the numbers: the activations are quantised to 8 bits. The op takes one scale for its whole input
(all rows); the kit makes that a scale **per row**: each row is divided by its own absolute maximum and one extra
row [1, -128/127, 0, ...] pins the input's range, so the op's scale (1/127) and zero point (128) are the same for
every call, a row's int8 values depend on that row alone, and its result is multiplied back by its maximum. One
request's activations never set another's, and a row's result does not depend on what else is in a batch of two
or more rows (tested bit for bit). A single row (batch-1 decode) is given to the op as it is: its own range
(asymmetric, 8 bits), about 15 % faster than with the pinning row at 7B width (1.44 vs 1.78 ms, 18944 x 3584).
One call serves every row count (decode batches and prefill). On CPUs without VNNI, FBGEMM's AVX2 int8 path adds
pairs of u8 x s8 products in saturating 16 bits: there the activations use 7 bits (``reduce_range``), as torch's
own dynamic quantisation does.

The default for int8 on CPUs with VNNI (MOEVL_CPU_QUANT_KERNEL unset or "auto", kernels/quant.py); elsewhere, or
with MOEVL_CPU_QUANT_KERNEL=aten, the ATen kernel keeps bf16 activations (weight-only). The accuracy the int8
activations cost is measured by ``benchmarks.quality`` on the trained defaults (the ``torch bf16 int8 fbgemm`` row:
within 1 point of fp32 on every task). torch marks its quantised-tensor constructors deprecated for a future
release; the kit pins torch 2.13.0, and ``available()`` turns the layout off where they are gone.
"""
from __future__ import annotations

import functools
import warnings

import torch

from moevl.ascend.device import cpu_flag_set


def vnni() -> bool:
    """Whether the CPU has 8-bit dot products without 16-bit saturation (avx512_vnni / avx_vnni / AMX-int8)."""
    return bool(cpu_flag_set() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _pack(q: torch.Tensor, scales: torch.Tensor):
    with warnings.catch_warnings():  # torch 2.13 marks the quantised-tensor constructors deprecated
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q.contiguous(), scales.double(),
                                                      torch.zeros(q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None)


@functools.cache
def available() -> bool:
    """The ops exist and the packed product gives the exact product on a small case (values on the int8 grid).
    False: the layout is simply not offered."""
    try:
        q = (torch.arange(32 * 64) % 255 - 127).to(torch.int8).reshape(32, 64)
        s = torch.full((32,), 0.5)
        x = torch.zeros(2, 64)  # values on the per-row int8 grid: the product is exact
        x[0, 3], x[0, 10], x[1, 5] = 1.0, -1.0, 4.0
        op = Int8Linear(q, s)
        ok = torch.allclose(op.linear(x, None), x @ (q.float() * 0.5).T, rtol=1e-4, atol=1e-3)
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
        # the pinning row: range [-h / (h - 1), 1] with h = 128 (64 with reduce_range) gives the op scale 1 / (h - 1)
        # and zero point h exactly: q = round(127 x) + 128 for a row scaled to absmax 1, zero exact (symmetric int8)
        h = 64.0 if self.reduce_range else 128.0
        self._pin = torch.zeros(1, self.in_features)
        self._pin[0, 0] = 1.0
        if self.in_features > 1:
            self._pin[0, 1] = -h / (h - 1)

    def stored(self) -> torch.Tensor:
        """The int8 values, bit for bit (slow: ~0.26 s for 18944 x 3584; saving and backward only)."""
        qt, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qt.int_repr()

    def linear(self, x2: torch.Tensor, bias):
        """x2 [M, in] -> x2 W^T (+ bias) in x2's dtype, each row quantised on its own (see the module's doc)."""
        if x2.shape[0] == 0:
            return x2.new_zeros(0, self.out_features)
        xf = x2.float()
        if x2.shape[0] == 1:  # one row: the op's own range is that row's (asymmetric, 8 bits), and no pinning row
            y = torch.ops.quantized.linear_dynamic(xf, self.packed, self.reduce_range).to(x2.dtype)
            return y if bias is None else y + bias.to(x2.dtype)
        # the op quantises its whole input with one (min, max): each row scaled to absmax 1 and the pinning row fix
        # that range whatever the batch holds, so row i's int8 values depend on row i alone (its own absmax: a
        # per-row symmetric scale), and its result is multiplied back by that absmax
        amax = xf.abs().amax(dim=1, keepdim=True)
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        y = torch.ops.quantized.linear_dynamic(torch.cat([xf / amax, self._pin]), self.packed, self.reduce_range)
        y = (y[:-1] * amax).to(x2.dtype)
        return y if bias is None else y + bias.to(x2.dtype)


class Rows:
    """Output rows [start, stop) of a shared Int8Linear: one member of a group of linears on the same input whose
    weights were packed as one (q/k/v, gate/up: ``quant.fuse_int8_groups``), so that the group is one product per
    step (``kernels.cpu.linear_group``). Alone, a member runs the whole product and keeps its rows.

    Why: fewer products per step (a layer's 7 become 4), each a parallel region whose OpenMP threads must be woken
    (the kit's OMP_WAIT_POLICY=PASSIVE). At 7B width, 2 layers, decode: the 14 int8 products alone took 16.1 ms, the
    8 of the fused layout 15.0 (median of 15 interleaved repeats; 11.4 vs 10.5 with spinning threads); in the whole
    decode step the per-repeat ratio was 1.00 under PASSIVE (no measurable change) and 0.97 with
    GOMP_SPINCOUNT=300000 (README). The values are the same bit for bit: a row's activations are quantised once,
    from that row alone, whichever weights it meets."""

    def __init__(self, fused: Int8Linear, start: int, stop: int):
        self.fused, self.start, self.stop = fused, start, stop
        self.out_features, self.in_features = stop - start, fused.in_features
        self.reduce_range = fused.reduce_range

    @property
    def scales(self) -> torch.Tensor:
        return self.fused.scales[self.start:self.stop]

    def stored(self) -> torch.Tensor:
        # a copy: a view would keep the whole group's unpacked values alive in each member that stores them
        return self.fused.stored()[self.start:self.stop].clone()

    def linear(self, x2: torch.Tensor, bias):
        y = self.fused.linear(x2, None)[:, self.start:self.stop].contiguous()
        return y if bias is None else y + bias.to(x2.dtype)


def fused_of(ops) -> Int8Linear | None:
    """The shared Int8Linear when ``ops`` are all its :class:`Rows`, in order and covering it, else None."""
    if not ops or not all(isinstance(o, Rows) for o in ops):
        return None
    fused = ops[0].fused
    if ops[0].start != 0 or ops[-1].stop != fused.out_features:
        return None
    if any(b.fused is not fused or b.start != a.stop for a, b in zip(ops, ops[1:])):
        return None
    return fused
