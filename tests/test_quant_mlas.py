"""The CPU int8 / int4 kernel through ONNX Runtime's MatMulNBits (kernels/mlas.py): against a product with the
dequantised weight written out here, the stored values given back exactly, the per-shape choice, and a quantised
tiny model end to end."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moevl
from moevl.kernels import mlas, quant

pytestmark = pytest.mark.skipif(not mlas.available(), reason="onnxruntime's MatMulNBits is not usable here")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _written_out(m):
    """The weight a quantised module stands for, from its stored fields (not from kernels.quant's dequantiser)."""
    if m.mode == "int8":
        return m.qweight.float() * m.scales.float()[:, None]
    q = torch.stack((m.qweight & 0xF, m.qweight >> 4), dim=-1).reshape(m.out_features, -1).float()
    g = q.view(m.out_features, -1, m.group_size)
    return ((g - 8) * m.scales.float()[..., None] + m.zeros.float()[..., None]).view(m.out_features, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (48, 384), (40, 48)])  # 40 x 48: block 16, not 128
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_matmul_nbits_matches_the_written_out_product(mode, rows, shape, dtype):
    torch.manual_seed(rows)
    w = torch.randn(shape)
    if mode == "int8":
        m = quant.Int8Weight.from_float(w, dtype=dtype)
    else:
        if shape[1] % 32:
            pytest.skip("int4 groups of 32 or more")
        m = quant.Int4Weight.from_float(w, dtype=dtype, group_size=32, zero_point=False)
    expected_w = _written_out(m)
    x = torch.randn(rows, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    quant.bind_cpu(m, policy="mlas")
    assert m.kernel_name.startswith("onnxruntime MatMulNBits") and m.qweight.numel() == 0
    y = m(x, bias)
    assert y.shape == (rows, shape[0]) and y.dtype == dtype
    # the activations are quantised to int8 per block inside the op: an error of the order of bf16 activations
    assert rel_err(y, F.linear(x.float(), expected_w, bias.float())) < 1.5e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_stored_values_come_back_exactly_from_the_session(mode):
    w = torch.randn(80, 256)
    m = (quant.Int8Weight.from_float(w, dtype=torch.bfloat16) if mode == "int8"
         else quant.Int4Weight.from_float(w, dtype=torch.bfloat16, group_size=64, zero_point=False))
    stored = m.qweight.clone()
    quant.bind_cpu(m, policy="mlas")
    assert m.qweight.numel() == 0  # one copy of the weight (ONNX Runtime's), not two
    assert torch.equal(m.stored_qweight(), stored)
    assert torch.equal(m.state_dict()["qweight"], stored)


@pytest.mark.parametrize("again", ["fastest", "aten", "dequantize"])
def test_a_weight_bound_again_keeps_its_values(again):
    """A model placed a second time (or on another backend) rebinds weights whose values live in the session."""
    m = quant.Int8Weight.from_float(torch.randn(64, 256), dtype=torch.bfloat16)
    expected_w = _written_out(m)
    quant.bind_cpu(m, policy="mlas")
    if again == "dequantize":
        quant.bind_dequantize(m)
        assert m.mlas is None and m.kernel_name == "dequantise + matmul"
    else:
        quant.bind_cpu(m, policy=again)
        assert (m.mlas is None) == (again == "aten")
    x = torch.randn(3, 256).to(torch.bfloat16)
    assert rel_err(m(x), F.linear(x.float(), expected_w)) < 1.5e-2


def test_int4_with_a_float_zero_point_keeps_the_aten_kernel():
    """MatMulNBits has no exact form of gpt-fast's float zero points: such weights must not be bound to it."""
    m = quant.Int4Weight.from_float(torch.randn(64, 256), group_size=64, zero_point=True)
    quant.bind_cpu(m, policy="mlas")
    assert m.kernel_name.startswith("aten._weight_int4pack_mm")


def test_gradient_flows_to_the_input_through_a_mlas_weight():
    m = quant.Int8Weight.from_float(torch.randn(32, 64))
    expected = _written_out(m)
    quant.bind_cpu(m, policy="mlas")
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, expected.sum(0).expand(4, -1), atol=1e-4)


def test_mlas_is_never_the_default_and_fastest_measures_large_weights_only(monkeypatch):
    from tests.test_quant import int8_default_is_fbgemm

    default = quant.Int8Weight.from_float(torch.randn(1024, 1024), dtype=torch.bfloat16)
    quant.bind_cpu(default)  # MLAS costs memory (ONNX Runtime's copies): only when asked for
    assert default.kernel_name.startswith("quantized::linear_dynamic" if int8_default_is_fbgemm()
                                          else "aten._weight_int8pack_mm")
    small = quant.Int8Weight.from_float(torch.randn(64, 128))
    quant.bind_cpu(small, policy="fastest")
    assert small.kernel_name.startswith("aten._weight_int8pack_mm")
    big = quant.Int8Weight.from_float(torch.randn(1024, 1024), dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "_QUANT_KERNEL_CHOICE", {})
    monkeypatch.setattr(quant, "QUANT_KERNEL_TIMES", {})
    quant.bind_cpu(big, policy="fastest")
    (key, times), = quant.QUANT_KERNEL_TIMES.items()
    winner = "mlas" if times["mlas_s"] < times["aten_s"] else "aten"
    assert quant._QUANT_KERNEL_CHOICE[key] == winner
    assert big.kernel_name.startswith("onnxruntime" if winner == "mlas" else "aten")


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="aten, fastest, mlas"):
        quant.bind_cpu(quant.Int8Weight.from_float(torch.randn(16, 32)), policy="fast")


def test_an_unknown_policy_in_the_environment_is_one_line_naming_the_variable(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOEVL_CPU_QUANT_KERNEL="bogus")
    out = subprocess.run([sys.executable, "-m", "moevl.cli", "run", "--model", "awaker-tiny-random", "--prompt", "x",
                          "--quantize", "int8", "--max-new-tokens", "1"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "MOEVL_CPU_QUANT_KERNEL='bogus'" in lines[0], out.stderr


def test_recovering_from_identity_rows_is_exact_for_extreme_values():
    q = torch.tensor([[-127, 127, 0, 1] * 8, [5, -5, -128 + 1, 100] * 8], dtype=torch.int8).repeat(8, 1)
    s = torch.tensor([1e-6, 3.0] * 8)
    op = mlas.MatMulNBits(*mlas.int8_operands(q, s, 32), 8, 32)
    got = (mlas.recover_uint8(op, s[:, None]) ^ 0x80).view(torch.int8)
    assert torch.equal(got, q)
    x = np.eye(32, dtype=np.float32)[:3]
    assert np.allclose(op(x), (q.float() * s[:, None]).numpy()[:, :3].T, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantised_tiny_model_through_mlas_matches_its_reference(mode, monkeypatch):
    """The whole model with every quantised weight on MatMulNBits: next-token logits within 3% (of the largest
    logit) of the same quantised model run as dequantise-then-matmul, the routing unchanged."""
    monkeypatch.setenv("MOEVL_CPU_QUANT_KERNEL", "mlas")
    q = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    quant.quantize_model(q.model, mode, group_size=32, zero_point=False)
    oracle = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    quant.quantize_model(oracle.model, mode, group_size=32, zero_point=False)  # unbound: the reference
    moevl.place(q.model, q.device)
    kernels = {m.kernel_name for _, m in quant.quantized_weights(q.model)}
    assert all(k.startswith("onnxruntime MatMulNBits") for k in kernels), kernels
    for prompt in ("What is in the picture?", "How many shapes are there?"):
        lq, routing_q = _logits_and_routing(q, prompt)
        lo, routing_o = _logits_and_routing(oracle, prompt)
        assert rel_err(lq, lo) < 0.03, prompt
        assert routing_q == routing_o


def _logits_and_routing(session, prompt, tokens=3):
    """The logits of the prompt and of each greedy decode step ([steps, vocab], fp32), and the routing."""
    captured = []
    original = session.model.logits

    def spy(*a, **k):
        out = original(*a, **k)
        captured.append(out.detach().float().clone())
        return out
    session.model.logits = spy
    try:
        session.ask(prompt, max_new_tokens=tokens)
    finally:
        del session.model.logits
    return torch.cat(captured), [d.to_dict() for d in session.routing_decisions()]
