"""CPU int8 / int4 weight products through ONNX Runtime's MLAS: one ``MatMulNBits`` node (com.microsoft) per weight.

Why: on the AMD EPYC (avx512_vnni, no AMX) MLAS's MatMulNBits with ``accuracy_level=4`` (the activations quantised
to int8 per block of the weight's group, int8 dot products) streamed an int8 lm_head (152064 x 3584) at 42 GB/s
where ``aten._weight_int8pack_mm`` streamed 25 GB/s (13.3 vs 21.6 ms, one row, 2 threads), and the 7B-width MLP
shapes about 1.5x faster (``python -m moevl.benchmarks.quant --only-kernel-table`` has the per-shape table). The
op is a maintained library's kernel (MLAS, ONNX Runtime's BLAS): the kit only lays the weight out for it.

How the kit's stored forms map onto it, exactly (no new rounding of the weight):
- int8 per channel (w = q * s): B = q + 128 as uint8 (MatMulNBits's default zero point for 8 bits is 128), the
  channel's scale repeated for each block of ``block`` columns.
- int4 symmetric (w = (q - 8) * s per group, zero = 0): B = the kit's nibbles as they are (the even column in the
  low nibble, MatMulNBits's order; its default zero point for 4 bits is 8), one scale per group.
int4 with a float zero point (the kit's default, gpt-fast's form) has no exact MatMulNBits form (its zero points
are integers or a float path that ran at 0.3 GB/s here): those weights keep the ATen kernel.

The activations reach the op in float32 and are quantised by it per block of ``block`` inputs (int8, symmetric):
an error of the order of bf16 activations (what the ATen kernels need), checked against the dequantised reference
in tests/test_quant_mlas.py. ONNX Runtime keeps its own copies of the weight, so the kit drops its stored tensor
once the session exists and recovers it from the session when it is needed (saving, backward):
:func:`recover_uint8`, exact, slow (a product with identity rows). Even so, ONNX Runtime itself held about 2.2x the
int8 bytes of each weight (RSS; the unpacked initializer stays beside MLAS's packed copy): the layout trades memory
for speed, which is why it is opt-in (kernels/quant.py, MOEVL_CPU_QUANT_KERNEL).
"""
from __future__ import annotations

import functools

import torch

BLOCKS = (128, 64, 32, 16)  # MatMulNBits block sizes tried, largest first (a power of 2 >= 16 dividing the width)


@functools.cache
def available() -> bool:
    """onnxruntime imports and its CPU MatMulNBits (8 and 4 bits, accuracy level 4) gives numpy's product on a
    small exact case. False: the layout is simply not offered."""
    try:
        import numpy as np

        for bits in (8, 4):
            q = np.arange(32 * 64, dtype=np.int64).reshape(32, 64) % (1 << bits)
            w = (q - (1 << (bits - 1))).astype(np.float32) * 0.5
            packed = q.astype(np.uint8) if bits == 8 else (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
            s = MatMulNBits(packed, np.full((32, 64 // 32), 0.5, np.float32), bits, 32, threads=1)
            x = np.zeros((2, 64), np.float32)
            x[0, 3], x[1, 10] = 1.0, -2.0
            if not np.allclose(s(x), x @ w.T, rtol=1e-3, atol=1e-3):
                return False
        return True
    except Exception:  # onnxruntime missing, too old (no 8-bit MatMulNBits) or without the contrib ops
        return False


def block_for(in_features: int, group: int | None = None) -> int | None:
    """The MatMulNBits block for an input width: ``group`` (int4: the kit's group) when it is one of BLOCKS, else the
    largest of BLOCKS dividing the width (int8, per channel: any block gives the same weights). None: no block."""
    if group is not None:
        return group if group in BLOCKS and in_features % group == 0 else None
    return next((b for b in BLOCKS if in_features % b == 0), None)


class MatMulNBits:
    """One ONNX Runtime session computing x [M, K] float32 -> x W^T [M, N] float32 for W stored as MatMulNBits's
    ``B`` uint8 [N, K / block * block * bits / 8] (rows of packed blocks) and ``scales`` float32 [N, K / block]."""

    def __init__(self, packed, scales, bits: int, block: int, threads: int | None = None):
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n = packed.shape[0]
        k = scales.shape[1] * block
        self.out_features, self.in_features, self.bits, self.block = n, k, bits, block
        blocks = k // block
        b = np.ascontiguousarray(packed, dtype=np.uint8).reshape(n, blocks, block * bits // 8)
        node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                                bits=bits, block_size=block, accuracy_level=4)
        graph = helper.make_graph(
            [node], "moevl_matmul_nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
            initializer=[numpy_helper.from_array(b, "B"),
                         numpy_helper.from_array(np.ascontiguousarray(scales, np.float32).reshape(-1), "scales")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = min(model.ir_version, onnx.IR_VERSION)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # torch's OpenMP threads run the rest of the step: ORT's pool must sleep, not spin, between calls
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        proto = model.SerializeToString()
        del model, graph, b
        self.session = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])

    def __call__(self, x):
        """numpy float32 [M, K] -> numpy float32 [M, N]."""
        return self.session.run(None, {"A": x})[0]

    def linear(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x2 [M, K] (any float dtype, CPU) -> [M, N] in x2's dtype, + bias."""
        xf = x2.detach().to(torch.float32).contiguous()
        y = torch.from_numpy(self(xf.numpy()))
        y = y if x2.dtype == torch.float32 else y.to(x2.dtype)
        return y if bias is None else y.add_(bias.to(y.dtype))


def int8_operands(qweight: torch.Tensor, scales: torch.Tensor, block: int):
    """The kit's int8 (q int8 [N, K], per-channel scales [N]) -> MatMulNBits's (B uint8 [N, K], scales [N, K/block])."""
    b = (qweight.view(torch.uint8) ^ 0x80).numpy()  # q + 128 (two's complement: flip the sign bit)
    s = scales.float()[:, None].expand(-1, qweight.shape[1] // block).contiguous().numpy()
    return b, s


def int4_operands(qweight: torch.Tensor, scales: torch.Tensor):
    """The kit's symmetric int4 (nibbles uint8 [N, K/2], scales [N, K/g]) -> MatMulNBits's (B, scales)."""
    return qweight.contiguous().numpy(), scales.float().contiguous().numpy()


def recover_uint8(op: MatMulNBits, scales: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """The unsigned values [N, K] (0..255 for 8 bits, 0..15 for 4) back from a session: the product with identity
    rows is (B - zero point) * scale exactly up to float rounding (an identity row quantises to 127 * (1/127) in
    every block), so B = round(y / scale) + zero point. ``scales`` float [N, K / block]."""
    import numpy as np

    n, k, block = op.out_features, op.in_features, op.block
    zero = 1 << (op.bits - 1)
    out = torch.empty(n, k, dtype=torch.uint8)
    s = scales.float()
    for start in range(0, k, rows):
        stop = min(start + rows, k)
        eye = np.zeros((stop - start, k), np.float32)
        eye[np.arange(stop - start), np.arange(start, stop)] = 1.0
        y = torch.from_numpy(op(eye)).t()  # [N, rows] = (B - zero) * scale for columns start..stop
        cols = torch.arange(start, stop) // block
        q = torch.round(y / s[:, cols]) + zero
        out[:, start:stop] = q.clamp_(0, (1 << op.bits) - 1).to(torch.uint8)
    return out
