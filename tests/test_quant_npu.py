"""Quantised linears on the NPU path (torch_npu.npu_weight_quant_batchmatmul), through the CPU emulation bound to
the torch-npu 2.13.0 schema. Not verified on hardware: these prove the calls are schema-exact and the numbers match
dequantise-then-matmul, not how the real kernel rounds or how fast it is."""
import pytest
import torch
import torch.nn.functional as F

import moevl
from moevl.ascend.npu_emulation import EmulatedTorchNpu, NpuRuleError
from moevl.ascend.npu_schema import SchemaBindError, kit_schemas
from moevl.kernels import quant
from moevl.kernels.npu import NpuKernels


def test_the_schemas_are_the_wheels():
    s = kit_schemas()["npu_weight_quant_batchmatmul"]
    assert [a.name for a in s.args] == ["x", "weight", "antiquant_scale", "antiquant_offset", "quant_scale",
                                        "quant_offset", "bias", "antiquant_group_size", "inner_precise",
                                        "weight_dtype"]
    assert kit_schemas()["npu_convert_weight_to_int4pack"].signature() == \
        "npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0) -> Tensor"


def test_a_call_off_the_schema_fails_as_on_the_npu():
    tnpu = EmulatedTorchNpu("910B")
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w = torch.randint(-8, 8, (64, 32), dtype=torch.int8)
    s = torch.rand(32, dtype=torch.bfloat16)
    with pytest.raises(SchemaBindError, match="group_size"):
        tnpu.npu_weight_quant_batchmatmul(x, w, s, group_size=32)
    with pytest.raises(SchemaBindError):
        tnpu.npu_weight_quant_batchmatmul(x, w)  # antiquant_scale is required


def test_documented_limits_are_enforced():
    tnpu = EmulatedTorchNpu("910B")
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w = torch.randint(-8, 8, (64, 32), dtype=torch.int8)
    with pytest.raises(NpuRuleError, match="antiquant_scale dtype"):
        tnpu.npu_weight_quant_batchmatmul(x, w, torch.rand(32))  # fp32 scale with bf16 x
    with pytest.raises(NpuRuleError, match="bias must be"):
        tnpu.npu_weight_quant_batchmatmul(x, w, torch.rand(32, dtype=torch.bfloat16),
                                          bias=torch.rand(32, dtype=torch.bfloat16))
    with pytest.raises(NpuRuleError, match="dtype"):
        tnpu.npu_weight_quant_batchmatmul(x.float(), w, torch.rand(32))  # fp32 activations
    with pytest.raises(NpuRuleError, match="per-group"):
        EmulatedTorchNpu("310P").npu_weight_quant_batchmatmul(
            x.half(), w, torch.rand(2, 32, dtype=torch.float16), antiquant_group_size=32)
    with pytest.raises(NpuRuleError, match="not supported on 310P"):
        EmulatedTorchNpu("310P").npu_convert_weight_to_int4pack(torch.zeros(4, 8, dtype=torch.int32))


def test_int4_pack_round_trips():
    tnpu = EmulatedTorchNpu("910B")
    w = torch.randint(-8, 8, (16, 64), dtype=torch.int32)
    packed = tnpu.npu_convert_weight_to_int4pack(w)
    assert packed.shape == (16, 8) and packed.dtype == torch.int32
    assert torch.equal(EmulatedTorchNpu._unpack_int4(packed), w.long())


@pytest.mark.parametrize("chip,dtype", [("910B", torch.bfloat16), ("910B", torch.float32), ("310P", torch.float16)])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_npu_quantised_linear_matches_dequantise_then_matmul(chip, dtype, mode):
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    m = (quant.Int8Weight.from_float(w, dtype=dtype) if mode == "int8"
         else quant.Int4Weight.from_float(w, dtype=dtype, group_size=64))
    kernels = NpuKernels(EmulatedTorchNpu(chip), chip)
    if mode == "int4" and chip == "310P":
        with pytest.raises(ValueError, match="use --quantize int8"):
            kernels.bind_quantized(m)
        return
    kernels.bind_quantized(m)
    assert m.kernel_name.startswith("torch_npu.npu_weight_quant_batchmatmul")
    x = torch.randn(3, 5, 256).to(dtype)
    bias = torch.randn(96).to(dtype)
    act = torch.float16 if chip == "310P" else torch.bfloat16
    expected = F.linear(x.to(act).float(), m.dequantize(torch.float32), bias.float())
    y = m(x, bias)
    assert y.dtype == dtype and y.shape == (3, 5, 96)
    err = ((y.float() - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-2
    assert kernels.tnpu.calls["npu_weight_quant_batchmatmul"] == 1


def test_a_quantised_model_on_the_emulated_npu_runs_the_npu_op():
    from moevl.model.tiny import DEMO_IMAGE

    vl = moevl.load("awaker-tiny", device="npu-emulated", quantize="int8")
    # a caption is longer than 3 tokens, so 3 decode steps run (a short answer would end at its first token)
    res = vl.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=3)
    assert len(res.token_ids[0]) == 3
    kernels = {m.kernel_name for _, m in quant.quantized_weights(vl.model)}
    assert kernels == {"torch_npu.npu_weight_quant_batchmatmul (W8A16)"}
    assert vl.device.torch_npu().calls["npu_weight_quant_batchmatmul"] > 0
