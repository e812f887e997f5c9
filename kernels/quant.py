"""Weight-only quantisation of the base linears (int8 per channel, int4 per group of 128) and the weights' layouts.

What is quantised: the decoder's base linears (q/k/v/o, gate/up/down; Awaker's LoRA-MoE linears keep their experts),
MoE-LLaVA's stacked expert weights (one quantised weight per expert: :class:`QuantizedExperts`) and lm_head.
Routers, biases, adapters (LoRA experts), norms, embeddings and the vision tower stay in the compute dtype.

How (gpt-fast's quantize.py is the model): a linear's ``weight`` Parameter is replaced by a weight module that is
called as ``weight(x, bias) -> x W^T + b`` (``kernels.cpu.linear`` and ``reference.lora_moe_linear`` call it so;
``nn.Linear`` modules become :class:`WeightLinear`). The weight module holds the stored form:

- :class:`Int8Weight`: ``qweight`` int8 [out, in], ``scales`` [out]; W = qweight * scales[:, None] (symmetric).
- :class:`Int4Weight`: ``qweight`` uint8 [out, in / 2] (two 4-bit values per byte, the even column in the low
  nibble), ``scales`` and ``zeros`` [out, in / group]; W = (q - 8) * scale + zero per group (with a zero point;
  ``zero_point=False`` gives the symmetric form, zero = 0).

That stored form is what ``moevl quantize`` writes (device-independent). When a model is placed on a device the
backend binds each weight to its kernel (``Kernels.prepare_weights``, once): CPU ``aten._weight_int8pack_mm`` /
``_weight_int4pack_mm_for_cpu`` with bf16 activations (the fast path needs bf16: with fp32 activations the int8
kernel ran at 0.53x of fp32 F.linear on an AMD EPYC, shared/notes/performance.md), CUDA dequantise + matmul
(not verified on a GPU), NPU ``torch_npu.npu_weight_quant_batchmatmul`` (kernels/npu.py; emulated, not verified on
hardware). Every path is compared in tests/test_quant*.py with :meth:`QuantizedWeight.reference` (dequantise, then
F.linear), the oracle.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
GROUP_SIZE = 128

# Linears that are never quantised: anything under these module names (the routers decide the experts, the vision
# tower runs once per image, the projector is small) - matched on dotted name components.
KEEP = ("router", "visual", "vision_tower", "mm_projector", "embed_tokens")


# ------------------------------------------------------------------------------------------------- the numbers
ROWS_PER_CHUNK = 4096  # quantise this many output rows at a time: the fp32 temporaries stay small (lm_head)


def _by_rows(fn, w: torch.Tensor, *args):
    """fn applied to blocks of rows of w, outputs concatenated along rows (bounded temporary memory: each block's
    outputs are written into the whole outputs as they come, not kept for a cat)."""
    if w.shape[0] <= ROWS_PER_CHUNK:
        return fn(w, *args)
    outs = None
    for i in range(0, w.shape[0], ROWS_PER_CHUNK):
        part = fn(w[i:i + ROWS_PER_CHUNK], *args)
        if outs is None:
            outs = tuple(t.new_empty((w.shape[0],) + tuple(t.shape[1:])) for t in part)
        for o, t in zip(outs, part):
            o[i:i + t.shape[0]].copy_(t)
        del part
    return outs


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scales fp32 [out]), symmetric per output channel: w ~ q * scale."""
    return _by_rows(_quantize_int8, w)


def _quantize_int8(w):
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE, zero_point: bool = True):
    """w [out, in] -> (q uint8 [out, in / 2] packed nibbles, scales fp32 [out, in / g], zeros fp32 [out, in / g]).

    With a zero point (min/max, as gpt-fast): scale = (max - min) / 15, zero = min + 8 * scale, q = round((w - min)
    / scale) in 0..15. Symmetric: scale = max|w| / 7, zero = 0, q = round(w / scale) + 8 in 1..15 (0 unused)."""
    if w.shape[1] % group_size or group_size % 2:
        raise ValueError(f"int4 needs the input width ({w.shape[1]}) to be a multiple of the group size "
                         f"({group_size})")
    return _by_rows(_quantize_int4, w, group_size, zero_point)


def _quantize_int4(w, group_size, zero_point):
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    if zero_point:
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scales = ((hi - lo) / 15.0).clamp(min=1e-12)
        zeros = lo + 8.0 * scales
        q = torch.round((g - lo[..., None]) / scales[..., None])
    else:
        scales = (g.abs().amax(dim=-1) / 7.0).clamp(min=1e-12)
        zeros = torch.zeros_like(scales)
        q = torch.round(g / scales[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.uint8).reshape(out_f, in_f)
    return pack_int4(q), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> uint8 [out, in / 2], column 2j in the low nibble, 2j + 1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] -> uint8 [out, in] values 0..15 (inverse of pack_int4)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed, scales, zeros, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).float()
    out_f, in_f = q.shape
    groups = scales.shape[1]
    w = (q.view(out_f, groups, -1) - 8.0) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(out_f, in_f).to(dtype)


# ------------------------------------------------------------------------------------------------- weight modules
class _GradThroughWeight(torch.autograd.Function):
    """Backward to the input through a frozen packed/quantised weight (the fast kernels have no autograd):
    dx = dy W, with W dequantised on the fly. The weight itself gets no gradient (it is frozen)."""

    @staticmethod
    def forward(ctx, x2, bias, weight_module):
        ctx.weight_module = weight_module
        return weight_module.run(x2, bias)

    @staticmethod
    def backward(ctx, dy):
        w = ctx.weight_module.dequantize(dy.dtype)
        return dy @ w, None, None


class QuantizedWeight(nn.Module):
    """A linear's weight [out, in] in a non-plain form; ``weight(x, bias)`` computes x W^T + b for x [..., in].

    ``dtype`` is the compute dtype (what the model's activations are: code that asks ``lm_head.weight.dtype``
    gets the model's dtype), ``shape`` the logical [out, in]. ``kernel`` is what a backend bound
    (``bind``); unbound, the reference runs."""

    mode = ""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.compute_dtype = dtype
        self.kernel = None  # (x2 [M, in], bias | None) -> [M, out]; None: self.reference
        self.kernel_name = "reference"
        self.mlas = None  # kernels.mlas.MatMulNBits once bound to it (then the stored values live only there)
        self.fbgemm = None  # kernels.fbgemm.Int8Linear likewise (int8 only)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def nbytes(self) -> int:
        """Bytes a decode step reads for this weight."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def bind(self, kernel, name: str) -> None:
        self.kernel, self.kernel_name = kernel, name

    def run(self, x2, bias):
        return (self.kernel or self.reference)(x2, bias)

    def reference(self, x2, bias):
        """The oracle: dequantise to the activations' dtype, then a plain F.linear."""
        return F.linear(x2, self.dequantize(x2.dtype), None if bias is None else bias.to(x2.dtype))

    def forward(self, x, bias=None):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() and x.requires_grad:
            y = _GradThroughWeight.apply(x2, bias, self)
        else:
            y = self.run(x2, bias)
        return y.view(*lead, self.out_features)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.mode}, out={self.out_features}, in={self.in_features}, kernel={self.kernel_name}"


class Int8Weight(QuantizedWeight):
    mode = "int8"

    def __init__(self, out_features, in_features, dtype, device=None):
        super().__init__(out_features, in_features, dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype=None) -> Int8Weight:
        q, s = quantize_int8(w)
        m = cls(w.shape[0], w.shape[1], dtype or w.dtype, device=w.device)
        m.qweight, m.scales = q, s.to(m.compute_dtype)
        return m

    def nbytes(self) -> int:
        if self.mlas is not None:  # ONNX Runtime's copy: the values, one fp32 scale per block
            return self.out_features * self.in_features + self.out_features * self.in_features // self.mlas.block * 4
        if self.fbgemm is not None:  # FBGEMM's packed copy: the values, one scale per channel
            return self.out_features * self.in_features + self.out_features * 4
        return super().nbytes()

    def dequantize(self, dtype=torch.float32):
        return dequantize_int8(self.stored_qweight(), self.scales, dtype)

    def stored_qweight(self) -> torch.Tensor:
        """The stored int8 values, recovered from ONNX Runtime's session when the MLAS layout replaced them (slow for
        big weights: a product with identity rows; ``moevl quantize`` saves before any layout is chosen), or unpacked
        from FBGEMM's packed weight (exact; ~0.26 s for 18944 x 3584)."""
        if self.fbgemm is not None:
            return self.fbgemm.stored()
        if self.mlas is None:
            return self.qweight
        from moevl.kernels import mlas

        s = self.scales.float()[:, None].expand(-1, self.in_features // self.mlas.block)
        return (mlas.recover_uint8(self.mlas, s) ^ 0x80).view(torch.int8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.mlas is not None or self.fbgemm is not None:  # the stored form, not the kernel's private layout
            destination[prefix + "qweight"] = self.stored_qweight()


class Int4Weight(QuantizedWeight):
    mode = "int4"

    def __init__(self, out_features, in_features, dtype, group_size=GROUP_SIZE, device=None):
        super().__init__(out_features, in_features, dtype)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.cpu_packed = None  # (packed, scales_and_zeros) once bound to the CPU kernel (then qweight is dropped)

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype=None, group_size=GROUP_SIZE, zero_point=True) -> Int4Weight:
        q, s, z = quantize_int4(w, group_size, zero_point)
        m = cls(w.shape[0], w.shape[1], dtype or w.dtype, group_size, device=w.device)
        m.qweight, m.scales, m.zeros = q, s.to(m.compute_dtype), z.to(m.compute_dtype)
        return m

    def nbytes(self) -> int:
        if self.cpu_packed is not None:
            return sum(t.numel() * t.element_size() for t in self.cpu_packed)
        if self.mlas is not None:  # ONNX Runtime's copy: the nibbles, one fp32 scale per group
            return self.out_features * self.in_features // 2 + self.scales.numel() * 4
        return super().nbytes()

    def dequantize(self, dtype=torch.float32):
        return dequantize_int4(self.stored_qweight(), self.scales, self.zeros, dtype)

    def stored_qweight(self) -> torch.Tensor:
        """The stored (device-independent) nibbles, recovered from the CPU layout when it replaced them (slow for
        big weights: a product with identity rows; ``moevl quantize`` saves before any layout is chosen)."""
        if self.mlas is not None:
            from moevl.kernels import mlas

            return pack_int4(mlas.recover_uint8(self.mlas, self.scales))
        if self.cpu_packed is None:
            return self.qweight
        return pack_int4(_unpack_cpu_int4(self))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cpu_packed is not None or self.mlas is not None:  # the stored form, not the CPU kernel's private layout
            destination[prefix + "qweight"] = self.stored_qweight()


class QuantizedExperts(nn.ModuleList):
    """A stacked expert weight [E, out, in] (MoE-LLaVA's ``w_in`` / ``w_up`` / ``w_out``, kernels/moe.py) held as
    one quantised weight module per expert: ``experts[e]`` is expert e's :class:`Int8Weight` / :class:`Int4Weight`,
    called as ``experts[e](x, bias)`` by the MoE dispatch, so each expert runs its own bound kernel. Saved as
    ``<name>.<e>.qweight`` / ``.scales`` (/ ``.zeros``). Not a tensor: a path that needs the dense stack (the grouped
    GEMM, when asked for) takes :meth:`dequantize`."""

    @property
    def mode(self) -> str:
        return self[0].mode

    @property
    def dtype(self) -> torch.dtype:
        return self[0].dtype

    @property
    def device(self) -> torch.device:
        return self[0].device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self[0].shape))

    def dim(self) -> int:
        return 3

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The dense stack [E, out, in] (for the paths that need one; the per-expert path never builds it)."""
        return torch.stack([m.dequantize(dtype) for m in self])

    def extra_repr(self) -> str:
        e, out_f, in_f = self.shape
        return f"{self.mode}, experts={e}, out={out_f}, in={in_f}"


# ------------------------------------------------------------------------------------------------- CPU kernels
# aten._weight_int8pack_mm (CPU, torch 2.13) reads its operands with aligned vector loads: it segfaulted here (an
# Intel Xeon with avx512) on a weight starting 8 bytes off (a qweight read from safetensors is only 8-byte aligned),
# on bf16 activations starting 16 bytes off (a slice of rows, as the MoE dispatch passes, may start anywhere) and
# on input widths that are not a multiple of 16. So: 64-byte aligned copies where needed; other widths take the
# reference.
INT8_CPU_ALIGN = 64
INT8_CPU_WIDTH = 16


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % INT8_CPU_ALIGN == 0 else t.clone()


# Prefill (many rows at once): the int8 CPU op is a row-at-a-time product, ~1 ms per row for an 18944 x 3584
# weight here, while dequantising into bf16 (one pass) and one bf16 GEMM (AMX/oneDNN) costs about what 8-16 of those
# rows do, whatever the row count (`python -m moevl.benchmarks.quant --only-kernel-table` ->
# benchmarks/results/quant-kernels-cpu.md, an Intel Xeon with AMX). So from PREFILL_ROWS rows on, the weight is
# dequantised into a per-thread scratch buffer and multiplied in bf16 (weights over PREFILL_MAX_ELEMENTS, lm_head at
# 7B width, keep the op: no 1 GB scratch). Int4's dequantisation in eager ops cost more than its op saved.
PREFILL_ROWS = 16
PREFILL_MAX_ELEMENTS = 1 << 27
_scratch = threading.local()


def _bf16_scratch(out_features: int, in_features: int) -> torch.Tensor:
    """A bf16 [out, in] view of this thread's scratch buffer (grown when needed, kept for the next call)."""
    need = out_features * in_features
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < need:
        buf = _scratch.buf = torch.empty(need, dtype=torch.bfloat16)
    return buf[:need].view(out_features, in_features)


def _prefill_path(module: QuantizedWeight, rows: int) -> bool:
    return rows >= PREFILL_ROWS and module.out_features * module.in_features <= PREFILL_MAX_ELEMENTS


def _int8_cpu(module: Int8Weight):
    scales = module.scales.to(torch.bfloat16)
    module.qweight = _aligned(module.qweight)

    def kernel(x2, bias):
        xb = x2.to(torch.bfloat16)
        if _prefill_path(module, xb.shape[0]):  # (x q^T) * s = x (q * s)^T: the scales go on the output
            y = F.linear(xb, _bf16_scratch(module.out_features, module.in_features).copy_(module.qweight)) * scales
        else:
            y = torch.ops.aten._weight_int8pack_mm(_aligned(xb), module.qweight, scales)
        y = y.to(x2.dtype)
        return y if bias is None else y + bias.to(x2.dtype)
    return kernel


def _int4_cpu_packed(module: Int4Weight):
    """The stored nibbles in ``_convert_weight_to_int4pack_for_cpu``'s layout + bf16 scales-and-zeros."""
    # row blocks (multiples of 64: the layout is local to its blocks of rows, checked in tests): the int32 input the
    # op wants is 8x the packed size, too much to build at once for lm_head. Each block is written into the one
    # output as it is made (no list of blocks + cat: the freed blocks stayed in the malloc heap, and the load's
    # peak RSS varied from 0.9x to 1.4x the file from run to run)
    stored = module.qweight
    packed = None
    for i in range(0, stored.shape[0], 1024):
        block = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(stored[i:i + 1024]).to(torch.int32), 1)
        if packed is None:
            packed = block.new_empty((stored.shape[0],) + tuple(block.shape[1:]))
        packed[i:i + block.shape[0]].copy_(block)
        del block
    sz = torch.stack((module.scales.t(), module.zeros.t()), dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def _int4_aten_kernel(packed, sz, g):
    def kernel(x2, bias):  # (dequantising int4 into bf16 for prefill did not pay here: 80 ms for 18944 x 3584)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, g, sz)
        y = y.to(x2.dtype)
        return y if bias is None else y + bias.to(x2.dtype)
    return kernel


def _int4_cpu(module: Int4Weight):
    if module.cpu_packed is None:
        module.cpu_packed = _int4_cpu_packed(module)
        # the CPU layout replaces the stored nibbles (same size): holding both would double the weight memory
        module.qweight = torch.empty(0, dtype=torch.uint8, device=module.qweight.device)
    return _int4_aten_kernel(*module.cpu_packed, module.group_size)


def _cpu_int4_nibbles(packed: torch.Tensor, out_features: int, in_features: int, out=None) -> torch.Tensor:
    """The 0..15 values [out, in] of ``_convert_weight_to_int4pack_for_cpu``'s layout, for out % 64 == 0: blocks of 64
    rows, each [in, 32] bytes, the low nibble row j of the block and the high nibble row 32 + j (torch 2.13's CPU
    layout, checked once per process by ``_cpu_int4_layout_known``): a pass over the bytes, where the general
    route (``_unpack_cpu_int4``: the kernel on identity rows) costs a matmul. ``out``: where to write them."""
    blocks = out_features // 64
    b = packed.reshape(blocks, in_features, 32)
    out = torch.empty(out_features, in_features, dtype=torch.uint8) if out is None else out
    o = out.view(blocks, 2, 32, in_features)
    o[:, 0].copy_((b & 0xF).transpose(1, 2))
    o[:, 1].copy_((b >> 4).transpose(1, 2))
    return out


_LAYOUT_CHECK: list[bool] = []


def _cpu_int4_layout_known() -> bool:
    """Whether this torch's CPU int4 layout is the one ``_cpu_int4_nibbles`` reads (checked on random values)."""
    if not _LAYOUT_CHECK:
        q = torch.randint(0, 16, (128, 256), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            _LAYOUT_CHECK.append(torch.equal(_cpu_int4_nibbles(packed, 128, 256).to(torch.int32), q))
        except RuntimeError:
            _LAYOUT_CHECK.append(False)
    return _LAYOUT_CHECK[0]


def _unpack_cpu_int4(module: Int4Weight, rows: int = 1024) -> torch.Tensor:
    """The 0..15 values [out, in] back from the CPU layout: the kernel applied to identity rows gives W^T exactly
    (fp32 activations and fp32 scale 1 / zero 8: the values q themselves), a chunk of rows at a time."""
    packed, sz = module.cpu_packed
    if module.out_features % 64 == 0 and _cpu_int4_layout_known():
        return _cpu_int4_nibbles(packed, module.out_features, module.in_features)
    ones = torch.stack((torch.ones(sz.shape[:2]), torch.full(sz.shape[:2], 8.0)), dim=-1)  # q*1 - 8*1 + 8 = q
    out = torch.empty(module.out_features, module.in_features, dtype=torch.uint8)
    eye = torch.eye(module.in_features)
    for start in range(0, module.in_features, rows):
        block = torch.ops.aten._weight_int4pack_mm_for_cpu(eye[start:start + rows].contiguous(), packed,
                                                           module.group_size, ones)  # [rows, out] = q^T
        out[:, start:start + rows] = block.t().round().to(torch.uint8)
    return out


# the CPU kernels a quantised weight can take: "auto" (the default: "fbgemm" for int8 where the CPU has 8-bit dot
# products (VNNI / AMX-int8), else "aten"; int4 "aten"), "aten" (torch's int8/int4 ops, bf16 activations) or
# "mlas" (ONNX Runtime's MatMulNBits, kernels/mlas.py: faster on the AMD EPYC, but ONNX Runtime held about 2.2x the
# int8 bytes of each weight it took, measured with RSS: 1157 MB for a 545 MB int8 lm_head, so the model is no
# longer "small"); "fastest" measures both per shape, once per process (QUANT_KERNEL_TIMES), and keeps MLAS where
# it is faster; "fbgemm" (int8 only; int4 keeps ATen): torch's own dynamic-quantised linear (kernels/fbgemm.py:
# faster still on the AMD EPYC, about the int8 bytes in memory, activations quantised to 8 bits per row). Chosen by
# MOEVL_CPU_QUANT_KERNEL (kernels/cpu.py). Why "auto" picks FBGEMM for int8 on VNNI CPUs: measured side by side at
# 7B width on an AMD EPYC (2 threads), int8 decode took ~29 ms/token on FBGEMM and ~47 on ATen (whose one-row
# int8 x bf16 product is compute-bound on 2 cores: 24-34 GB/s), at the same memory, and the trained defaults'
# accuracy on FBGEMM was within 1 point of fp32 on every task (benchmarks/results/quality-cpu.md).
QUANT_KERNEL_POLICIES = ("auto", "aten", "fastest", "mlas", "fbgemm")
_QUANT_KERNEL_CHOICE: dict[tuple, str] = {}
QUANT_KERNEL_TIMES: dict[tuple, dict] = {}


def _aten_usable(module: QuantizedWeight) -> bool:
    if isinstance(module, Int8Weight):
        return module.in_features % INT8_CPU_WIDTH == 0
    return isinstance(module, Int4Weight) and module.out_features % 16 == 0  # the CPU int4 layout's rule


def _mlas_block(module: QuantizedWeight) -> int | None:
    """The MatMulNBits block for this weight, or None where MLAS has no exact form of it (int4 with a float zero
    point, widths no block divides) or onnxruntime is not usable."""
    from moevl.kernels import mlas

    if module.qweight.numel() == 0 or module.device.type != "cpu":
        return None
    if isinstance(module, Int8Weight):
        block = mlas.block_for(module.in_features)
    elif isinstance(module, Int4Weight) and not bool(module.zeros.any()):  # symmetric only
        block = mlas.block_for(module.in_features, module.group_size)
    else:
        return None
    return block if block is not None and mlas.available() else None


def _mlas_op(module: QuantizedWeight, block: int):
    from moevl.kernels import mlas

    if isinstance(module, Int8Weight):
        return mlas.MatMulNBits(*mlas.int8_operands(module.qweight, module.scales, block), 8, block)
    return mlas.MatMulNBits(*mlas.int4_operands(module.qweight, module.scales), 4, block)


def _bind_mlas(module: QuantizedWeight, op) -> None:
    module.mlas = op
    if module.qweight.numel():
        module.qweight = torch.empty(0, dtype=module.qweight.dtype)  # ONNX Runtime holds the only copy now
    module.bind(op.linear, f"onnxruntime MatMulNBits (MLAS, {op.bits}-bit, int8 activations per {op.block})")


def _quant_kernel_key(module: QuantizedWeight) -> tuple:
    return (module.mode, *module.shape, getattr(module, "group_size", None), torch.get_num_threads())


def measure_quant_kernel(module: QuantizedWeight, op, repeats: int = 5) -> str:
    """"mlas" when the MatMulNBits session ``op`` computes this weight's one-row product faster than the ATen kernel
    (interleaved, best of ``repeats`` each), else "aten"; measured once per shape and form per process."""
    key = _quant_kernel_key(module)
    if key not in _QUANT_KERNEL_CHOICE:
        if isinstance(module, Int8Weight):
            aten = _int8_cpu(module)
        else:
            aten = _int4_aten_kernel(*_int4_cpu_packed(module), module.group_size)
        x = torch.randn(1, module.in_features, dtype=module.compute_dtype)
        best = {"aten": float("inf"), "mlas": float("inf")}
        for _ in range(2):
            best["aten"] = min(best["aten"], time_gemv(lambda v: aten(v, None), x, repeats))
            best["mlas"] = min(best["mlas"], time_gemv(lambda v: op.linear(v, None), x, repeats))
        del aten
        _QUANT_KERNEL_CHOICE[key] = "mlas" if best["mlas"] < best["aten"] else "aten"
        QUANT_KERNEL_TIMES[key] = {f"{k}_s": v for k, v in best.items()}
    return _QUANT_KERNEL_CHOICE[key]


def bind_cpu(module: QuantizedWeight, policy: str = "auto") -> None:
    """A quantised weight's CPU kernel, by ``policy``: "auto" (FBGEMM for int8 on a CPU with VNNI, else ATen),
    "aten", "fbgemm" (int8; int4 takes ATen), "mlas" (where MLAS has an exact form of the weight, else ATen) or
    "fastest": MLAS where it measured faster for this shape, for weights of at least MIN_PACKED elements (smaller
    ones take ATen: their product is not bandwidth-bound, and the choice would depend on the machine's noise)."""
    if policy not in QUANT_KERNEL_POLICIES:
        raise ValueError(f"unknown CPU quantised-kernel policy {policy!r}; use one of "
                         f"{', '.join(QUANT_KERNEL_POLICIES)}")
    if policy == "auto":
        from moevl.kernels import fbgemm

        policy = "fbgemm" if isinstance(module, Int8Weight) and fbgemm.vnni() else "aten"
    if module.fbgemm is not None:  # bound before: keep it, or give the values back for another kernel
        if policy == "fbgemm":
            _bind_fbgemm(module, module.fbgemm)
            return
        _unbind_fbgemm(module)
    if policy == "fbgemm":
        if module.mlas is not None:
            _unbind_mlas(module)
        if _fbgemm_usable(module):
            from moevl.kernels import fbgemm

            _bind_fbgemm(module, fbgemm.Int8Linear(module.qweight, module.scales))
            return
        policy = "aten"  # int4, or no FBGEMM here
    if module.mlas is not None:  # bound before (a model placed again): keep the session, or leave it for ATen
        if policy != "aten":
            _bind_mlas(module, module.mlas)
            return
        _unbind_mlas(module)
    block = None
    if policy == "mlas" or (policy == "fastest" and module.out_features * module.in_features >= MIN_PACKED):
        block = _mlas_block(module)
    forced = policy == "mlas" or not _aten_usable(module)
    if block is not None and (forced or _QUANT_KERNEL_CHOICE.get(_quant_kernel_key(module)) != "aten"):
        op = _mlas_op(module, block)  # (a shape already measured slower on MLAS builds no session)
        if forced or measure_quant_kernel(module, op) == "mlas":
            _bind_mlas(module, op)
            return
        del op
    if isinstance(module, Int8Weight) and _aten_usable(module):
        module.bind(_int8_cpu(module), "aten._weight_int8pack_mm (bf16 activations)")
    elif isinstance(module, Int4Weight) and _aten_usable(module):
        module.bind(_int4_cpu(module), "aten._weight_int4pack_mm_for_cpu (bf16 activations)")
    else:
        bind_dequantize(module)


def _fbgemm_usable(module: QuantizedWeight) -> bool:
    from moevl.kernels import fbgemm

    return (isinstance(module, Int8Weight) and module.qweight.numel() > 0 and module.device.type == "cpu"
            and fbgemm.available())


def _bind_fbgemm(module: Int8Weight, op) -> None:
    module.fbgemm = op
    if module.qweight.numel():
        module.qweight = torch.empty(0, dtype=module.qweight.dtype)  # the packed weight is the only copy now
    from moevl.kernels import fbgemm

    module.bind(op.linear, "quantized::linear_dynamic (FBGEMM, int8 activations per row"
                + (", packed with the linears of its input)" if isinstance(op, fbgemm.Rows) else ")"))


def fuse_int8_groups(model: nn.Module, enable: bool = True) -> int:
    """Pack each group of linears on the same input that a module lists in ``fused_linear_groups`` (q/k/v, gate/up:
    names of submodules) as one FBGEMM weight (kernels/fbgemm.py ``Rows``), where every member's weight is an int8
    weight bound to FBGEMM; ``enable`` False gives fused members their own packed weight back. The values are not
    touched: the stored rows are concatenated, with their channel scales. -> how many groups are fused now."""
    from moevl.kernels import fbgemm

    fused_now = 0
    for mod in model.modules():
        for names in getattr(mod, "fused_linear_groups", ()):
            try:
                weights = [getattr(mod.get_submodule(n), "weight", None) for n in names]
            except AttributeError:  # a layer without this group (MoE-LLaVA's MoE layers have no gate/up)
                continue
            if not all(isinstance(w, Int8Weight) and w.fbgemm is not None for w in weights):
                continue
            already = fbgemm.fused_of([w.fbgemm for w in weights]) is not None
            if not enable:
                for w in weights:
                    if isinstance(w.fbgemm, fbgemm.Rows):
                        _bind_fbgemm(w, fbgemm.Int8Linear(w.fbgemm.stored(), w.fbgemm.scales))
                continue
            if not already:
                stored = [w.fbgemm.stored() for w in weights]
                scales = torch.cat([w.fbgemm.scales for w in weights])
                for w in weights:  # the separate packed copies go before the shared one is made (peak memory):
                    w.fbgemm = None  # the bound kernel held them too
                    w.bind(None, "reference")
                q = torch.cat(stored)
                del stored
                shared = fbgemm.Int8Linear(q, scales)
                del q
                start = 0
                for w in weights:
                    _bind_fbgemm(w, fbgemm.Rows(shared, start, start + w.out_features))
                    start += w.out_features
            fused_now += 1
    return fused_now


def _unbind_fbgemm(module: Int8Weight) -> None:
    stored = module.fbgemm.stored()
    module.fbgemm = None
    module.qweight = stored.to(module.scales.device)


def _unbind_mlas(module: QuantizedWeight) -> None:
    """The stored values back from ONNX Runtime's session into ``qweight`` (the session is dropped)."""
    stored = module.stored_qweight()
    module.mlas = None
    module.qweight = stored.to(module.scales.device)


def bind_dequantize(module: QuantizedWeight) -> None:
    """CUDA (not verified on a GPU here): dequantise to the activations' dtype, then the dense matmul."""
    if module.mlas is not None:
        _unbind_mlas(module)
    if module.fbgemm is not None:
        _unbind_fbgemm(module)
    module.bind(module.reference, "dequantise + matmul")


# ------------------------------------------------------------------------------------------------- dense layouts
class OnednnWeight(QuantizedWeight):
    """A dense fp32/bf16 weight reordered once into oneDNN's blocked layout for a one-row product (decode):
    ``mkldnn._linear_pointwise`` streams it (on an AMD EPYC this fp32 GEMV reached 29.5 GB/s vs MKL F.linear's 17,
    shared/notes/performance.md; on an Intel Xeon with AMX MKL was as fast: the choice is measured per shape,
    :func:`choose_dense_layouts`). Not quantised: its state dict is the plain ``weight`` again."""

    mode = "onednn"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[0], weight.shape[1], weight.dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # opaque: not a buffer
        self.kernel_name = "oneDNN packed (mkldnn._linear_pointwise)"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def nbytes(self) -> int:
        return self.out_features * self.in_features * torch.empty(0, dtype=self.compute_dtype).element_size()

    def run(self, x2, bias):
        y = torch.ops.mkldnn._linear_pointwise(x2.to(self.compute_dtype).contiguous(), self.packed,
                                               None if bias is None else bias.to(self.compute_dtype), "none", [], "")
        return y.to(x2.dtype)

    def dequantize(self, dtype=torch.float32):
        return self.packed.to_dense().to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix[:-1]] = self.dequantize(self.compute_dtype)  # the plain "<linear>.weight"

    def __deepcopy__(self, memo):
        return OnednnWeight(self.dequantize(self.compute_dtype))


class OpenblasWeight(QuantizedWeight):
    """A dense fp32 weight kept as it is (no copy: it shares the Parameter's storage) whose one-row product (batch-1
    decode) runs through numpy's BLAS (OpenBLAS in numpy's PyPI wheels): ``numpy.matmul(W, x)`` is an sgemv that
    streams W. On the AMD EPYC it reached 30.8 GB/s for 152064 x 3584 (the whole read bandwidth, 30.2 GB/s in the
    same run) where MKL F.linear reached 18.1 and the oneDNN-packed weight 28.4. Several rows (prefill, batched
    decode) go to oneDNN on the same plain weight (``mkldnn._linear_pointwise`` takes it without a reorder per call:
    as fast as the packed copy there, 1.6-2.7x MKL's F.linear at 2-119 rows; OpenBLAS's sgemm with 2-16 rows was
    2-4x slower than oneDNN). Float32 only (numpy has no bfloat16). Its state dict is the plain weight."""

    mode = "openblas"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[0], weight.shape[1], weight.dtype)
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"the OpenBLAS layout takes a CPU float32 weight, not {weight.dtype} on {weight.device}")
        self.plain = weight.detach().contiguous()  # not a buffer: the state dict holds it as "<linear>.weight"
        self._np = self.plain.numpy()
        self.kernel_name = "OpenBLAS sgemv (numpy.matmul) for one row, oneDNN on the plain weight for several"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def nbytes(self) -> int:
        return self.plain.numel() * self.plain.element_size()

    def run(self, x2, bias):
        if x2.dtype != torch.float32:
            return F.linear(x2, self.plain.to(x2.dtype), None if bias is None else bias.to(x2.dtype))
        if x2.shape[0] == 1:
            return rowvec_linear(x2, self._np, bias)
        if torch.backends.mkldnn.is_available():  # oneDNN takes the plain weight as it is (no reorder per call)
            return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.plain, bias, "none", [], "")
        return F.linear(x2, self.plain, bias)

    def dequantize(self, dtype=torch.float32):
        return self.plain.to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix[:-1]] = self.plain  # the plain "<linear>.weight"

    def __deepcopy__(self, memo):
        return OpenblasWeight(self.plain.clone())


def rowvec_linear(x2: torch.Tensor, w_np, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [1, in] float32 CPU, w_np a C-contiguous float32 numpy [out, in] -> [1, out] = x2 W^T (+ bias) through
    numpy's sgemv (the GIL is released while it runs)."""
    import numpy as np

    out = torch.empty(1, w_np.shape[0], dtype=torch.float32)
    np.matmul(w_np, x2.detach()[0].contiguous().numpy(), out=out.numpy()[0])
    return out.add_(bias) if bias is not None else out


def rowvec_matmul(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """h [1, k] @ m [k, n] (float32, CPU; numpy passes a transposed view to BLAS as such) through numpy's sgemv
    -> [1, n]."""
    import numpy as np

    out = torch.empty(1, m.shape[1], dtype=torch.float32)
    np.matmul(h.detach()[0].contiguous().numpy(), m.detach().numpy(), out=out.numpy()[0])
    return out


@functools.cache
def blas_rowvec_usable() -> bool:
    """numpy is importable and its matmul fills an ``out`` view of a torch tensor (always so with numpy's wheels)."""
    try:
        import numpy as np  # noqa: F401

        w = torch.arange(6, dtype=torch.float32).view(2, 3)
        y = rowvec_linear(torch.ones(1, 3), w.numpy())
        return bool(torch.equal(y, torch.tensor([[3.0, 12.0]])))
    except Exception:  # numpy missing or built without a working BLAS: the layout is simply not offered
        return False


# Awaker's batch-1 LoRA decode (kernels/cpu.py) takes numpy's sgemv too once a base linear chose "openblas" here
ROWVEC_BLAS = {"lora": False}

# (out, in, dtype, threads) -> "onednn" | "openblas" | "plain": measured once per process (timings in LAYOUT_TIMES)
_LAYOUT_CHOICE: dict[tuple, str] = {}
LAYOUT_TIMES: dict[tuple, dict] = {}
LAYOUT_POLICIES = ("auto", "plain", "onednn", "openblas")
# Smaller weights stay plain: their product is not bandwidth-bound and timing them would make small (test) models'
# layouts depend on the machine's noise.
MIN_PACKED = 1 << 20


def time_gemv(fn, x, repeats: int) -> float:
    """Best wall time of ``fn(x)`` over ``repeats`` calls after one warm-up (the layout choice and the benchmark)."""
    import time

    fn(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return best


def measure_layout(w: torch.Tensor, repeats: int = 5, margin: float = 0.05) -> str:
    """The fastest one-row product of ``w`` here: "onednn" (oneDNN-packed) or "openblas" (numpy's sgemv, fp32 only)
    when it beats F.linear (MKL, "plain") by more than ``margin``, else "plain". Interleaved, best of ``repeats``
    each (the machine is shared: the minimum is the steady figure)."""
    key = (*w.shape, w.dtype, torch.get_num_threads())
    if key not in _LAYOUT_CHOICE:
        x = torch.randn(1, w.shape[1], dtype=w.dtype)
        candidates = {"onednn": OnednnWeight(w)} if torch.backends.mkldnn.is_available() else {}
        if w.dtype == torch.float32 and blas_rowvec_usable():
            candidates["openblas"] = OpenblasWeight(w)
        best = {"plain": float("inf"), **{k: float("inf") for k in candidates}}
        for _ in range(2):
            best["plain"] = min(best["plain"], time_gemv(lambda v: F.linear(v, w), x, repeats))
            for k, m in candidates.items():
                best[k] = min(best[k], time_gemv(lambda v, m=m: m.run(v, None), x, repeats))
        del candidates
        fastest = min(best, key=lambda k: (k == "plain", best[k]))  # the fastest non-plain (plain when alone)
        _LAYOUT_CHOICE[key] = fastest if best[fastest] < (1 - margin) * best["plain"] else "plain"
        LAYOUT_TIMES[key] = {f"{k}_s": v for k, v in best.items()} | {"bytes": w.numel() * w.element_size()}
    return _LAYOUT_CHOICE[key]


@torch.no_grad()
def choose_dense_layouts(model: nn.Module, policy: str = "auto") -> dict[str, str]:
    """CPU, once at load: each plain fp32/bf16 base linear (and lm_head) keeps its weight ("plain", MKL F.linear),
    is reordered for oneDNN ("onednn") or keeps its weight with one-row products through numpy's OpenBLAS
    ("openblas", fp32 only), by ``policy``: "auto" = what :func:`measure_layout` measured fastest for that shape
    here. -> {linear name: layout}. Once any linear takes "openblas", Awaker's batch-1 LoRA decode GEMVs do too."""
    if policy not in LAYOUT_POLICIES:
        raise ValueError(f"unknown CPU weight layout policy {policy!r}; use one of {', '.join(LAYOUT_POLICIES)}")
    chosen = {}
    if policy == "plain":
        return chosen
    if policy == "onednn" and not torch.backends.mkldnn.is_available():
        return chosen
    for name, mod in base_linears(model, include_lm_head=True):
        w = mod.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            continue
        if policy == "auto" and w.numel() < MIN_PACKED:
            continue
        if policy == "openblas" and (w.dtype != torch.float32 or not blas_rowvec_usable()):
            continue
        layout = policy if policy != "auto" else measure_layout(w)
        chosen[name] = layout
        _apply_layout(model, name, mod, layout)
    model.dense_layouts = chosen
    return chosen


def _apply_layout(model: nn.Module, name: str, mod: nn.Module, layout: str) -> None:
    if layout == "onednn":
        _set_weight(model, name, mod, OnednnWeight(mod.weight))
    elif layout == "openblas":
        _set_weight(model, name, mod, OpenblasWeight(mod.weight))
        ROWVEC_BLAS["lora"] = True


@torch.no_grad()
def apply_dense_layouts(model: nn.Module, chosen: dict[str, str]) -> None:
    """Give the named plain base linears the layouts ``chosen`` (what :func:`choose_dense_layouts` returned) again,
    e.g. after :func:`restore_dense` for an ONNX export: the same choices, nothing measured."""
    mods = dict(base_linears(model, include_lm_head=True))
    for name, layout in chosen.items():
        mod = mods.get(name)
        if mod is not None and isinstance(mod.weight, nn.Parameter):
            _apply_layout(model, name, mod, layout)
    model.dense_layouts = dict(chosen)


@torch.no_grad()
def restore_dense(model: nn.Module) -> int:
    """Undo :func:`choose_dense_layouts` (plain Parameters again: what tracing for ONNX needs). -> how many."""
    count = 0
    for name, mod in list(model.named_modules()):
        w = getattr(mod, "weight", None)
        if not isinstance(w, (OnednnWeight, OpenblasWeight)):
            continue
        dense = nn.Parameter(w.dequantize(w.compute_dtype), requires_grad=False)
        if isinstance(mod, WeightLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = dense
            if mod.bias is not None:
                lin.bias = mod.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
        else:
            del mod.weight
            mod.weight = dense
        count += 1
    model.dense_layouts = {}
    return count


# ------------------------------------------------------------------------------------------------- model surgery
class WeightLinear(nn.Module):
    """An nn.Linear whose weight is a weight module: y = weight(x, bias)."""

    def __init__(self, weight: nn.Module, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):
        return self.weight(x, self.bias)


def base_linears(model: nn.Module, include_lm_head: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linears weight-only quantisation applies to: modules with a 2-D ``weight`` Parameter
    and ``in_features`` (nn.Linear, Awaker's AdaptedLinear), outside KEEP; lm_head if ``include_lm_head``."""
    out = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if any(p in KEEP for p in parts) or (name == "lm_head" and not include_lm_head):
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 2 and hasattr(mod, "in_features"):
            out.append((name, mod))
    return out


def stacked_experts(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, attribute) of the stacked expert weights [E, out, in] weight-only quantisation applies
    to: the attributes a module lists in ``stacked_expert_weights`` (MoE-LLaVA's MoeFFN: w_in, w_up, w_out) that
    are still 3-D float Parameters, outside KEEP. (The router and the biases are other attributes: never listed.)"""
    out = []
    for name, mod in model.named_modules():
        if any(p in KEEP for p in name.split(".")):
            continue
        for attr in getattr(mod, "stacked_expert_weights", ()):
            w = getattr(mod, attr, None)
            if isinstance(w, nn.Parameter) and w.dim() == 3:
                out.append((name, mod, attr))
    return out


def _int4_group(in_features: int, group_size: int) -> int | None:
    """The group for an input width: ``group_size``, else the largest smaller one of 64, 32 that divides it (small
    models); None: the weight stays in the compute dtype."""
    return next((g for g in (group_size, 64, 32) if g <= group_size and in_features % g == 0), None)


def _quantize_one(w: torch.Tensor, mode: str, group_size: int, zero_point: bool) -> QuantizedWeight | None:
    if mode == "int8":
        return Int8Weight.from_float(w, dtype=w.dtype)
    g = _int4_group(w.shape[1], group_size)
    return None if g is None else Int4Weight.from_float(w, dtype=w.dtype, group_size=g, zero_point=zero_point)


def quantize_experts(w: torch.Tensor, mode: str, group_size: int = GROUP_SIZE,
                     zero_point: bool = True) -> QuantizedExperts | None:
    """A stacked expert weight [E, out, in] -> one quantised weight per expert (None: int4 with an input width no
    group divides; the stack stays as it is)."""
    check_mode(mode)
    mods = [_quantize_one(w[e], mode, group_size, zero_point) for e in range(w.shape[0])]
    return None if mods[0] is None else QuantizedExperts(mods)


def _set_weight(model: nn.Module, name: str, mod: nn.Module, weight: QuantizedWeight) -> None:
    if isinstance(mod, nn.Linear):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, WeightLinear(weight, mod.bias))
    else:  # a module that passes self.weight to a kernel (AdaptedLinear -> kernels' lora_moe_linear)
        del mod.weight
        mod.weight = weight


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--quantize {mode!r}: use one of {', '.join(MODES)}")
    return mode


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = GROUP_SIZE, zero_point: bool = True,
                   include_lm_head: bool = True) -> nn.Module:
    """Replace the base linears' weights and the stacked expert weights by int8/int4 weights, in place, one at a
    time (each fp32/bf16 weight is freed as soon as its quantised form exists). -> model (with
    ``model.quantization`` set)."""
    check_mode(mode)
    for name, mod in base_linears(model, include_lm_head):
        qw = _quantize_one(mod.weight, mode, group_size, zero_point)
        if qw is not None:
            _set_weight(model, name, mod, qw)
    for _, mod, attr in stacked_experts(model):  # MoE-LLaVA's experts: most of its bytes
        qe = quantize_experts(getattr(mod, attr), mode, group_size, zero_point)
        if qe is not None:
            delattr(mod, attr)
            setattr(mod, attr, qe)
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None,
                          "zero_point": zero_point if mode == "int4" else None, "lm_head": include_lm_head}
    return model


def quantized_weights(model: nn.Module) -> list[tuple[str, QuantizedWeight]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedWeight) and m.mode in MODES]


def prepare_for_state_dict(model: nn.Module, sd: dict, dtype: torch.dtype) -> None:
    """Before loading a saved quantised model (keys ``<linear>.weight.qweight``, ``<moe>.<w_in>.<e>.qweight``): give
    each such linear its quantised weight module and each such expert stack its :class:`QuantizedExperts` (on the
    meta device, as the model: the float weights are never allocated) so that names and shapes line up."""
    for name, mod in base_linears(model, include_lm_head=True):
        if f"{name}.weight.qweight" in sd:
            _set_weight(model, name, mod, _empty_quantized(sd, f"{name}.weight", *mod.weight.shape, dtype))
    for name, mod, attr in stacked_experts(model):
        prefix = f"{name}.{attr}" if name else attr
        if f"{prefix}.0.qweight" in sd:
            num_e, out_f, in_f = getattr(mod, attr).shape
            qe = QuantizedExperts(_empty_quantized(sd, f"{prefix}.{e}", out_f, in_f, dtype) for e in range(num_e))
            delattr(mod, attr)
            setattr(mod, attr, qe)


def _empty_quantized(sd: dict, prefix: str, out_f: int, in_f: int, dtype) -> QuantizedWeight:
    """An empty (meta) int8/int4 weight module for the saved keys ``<prefix>.qweight`` ... (int4: it has zeros)."""
    if f"{prefix}.zeros" in sd:
        groups = sd[f"{prefix}.scales"].shape[1]
        return Int4Weight(out_f, in_f, dtype, group_size=in_f // max(groups, 1), device="meta")
    return Int8Weight(out_f, in_f, dtype, device="meta")


def bind_all(model: nn.Module, binder) -> int:
    """Bind every quantised weight of ``model`` with ``binder(module)``. -> how many."""
    mods = quantized_weights(model)
    for _, m in mods:
        binder(m)
    return len(mods)


def describe(model: nn.Module) -> dict | None:
    """The model's quantisation (mode, group size, kernels, bytes) or None."""
    mods = quantized_weights(model)
    if not mods:
        return None
    info = dict(getattr(model, "quantization", None) or {"mode": mods[0][1].mode})
    info["linears"] = len(mods)  # each expert of a quantised stack counts as one
    info["expert_stacks"] = sum(isinstance(m, QuantizedExperts) for m in model.modules())
    info["kernels"] = sorted({m.kernel_name for _, m in mods})
    info["weight_bytes"] = sum(m.nbytes() for _, m in mods)
    return info


def quantize_loaded(model: nn.Module, mode: str) -> nn.Module:
    """``moevl.load(..., quantize=mode)``: quantise a loaded model, or accept one that already is (a folder written
    by ``moevl quantize``) when the modes agree."""
    check_mode(mode)
    mods = quantized_weights(model)
    if mods:
        have = mods[0][1].mode
        if have != mode:
            raise ValueError(f"this model folder is already quantised to {have}: drop --quantize or pass "
                             f"--quantize {have}")
        return model
    return quantize_model(model, mode)
