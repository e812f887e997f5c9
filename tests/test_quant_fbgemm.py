"""The CPU int8 kernel through torch's FBGEMM dynamic-quantised linear (kernels/fbgemm.py): against a product with
the dequantised weight written out here, each row independent of the others in its batch, the stored values given
back exactly, rebinding, and a quantised tiny model end to end."""
import pytest
import torch
import torch.nn.functional as F

import moevl
from moevl.kernels import fbgemm, quant

pytestmark = pytest.mark.skipif(not fbgemm.available(), reason="torch's quantized::linear_dynamic is not usable here")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _written_out(m):
    """The weight an int8 module stands for, from its stored fields (not from kernels.quant's dequantiser)."""
    return m.qweight.float() * m.scales.float()[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (40, 48), (7, 5)])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_fbgemm_matches_the_written_out_product(rows, shape, dtype):
    torch.manual_seed(rows)
    m = quant.Int8Weight.from_float(torch.randn(shape), dtype=dtype)
    expected_w = _written_out(m)
    x = torch.randn(rows, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    quant.bind_cpu(m, policy="fbgemm")
    assert m.kernel_name.startswith("quantized::linear_dynamic") and m.qweight.numel() == 0
    y = m(x, bias)
    assert y.shape == (rows, shape[0]) and y.dtype == dtype
    # the activations are quantised to 8 bits per row inside the op (7 without VNNI): an error of that order
    assert rel_err(y, F.linear(x.float(), expected_w, bias.float())) < (3e-2 if fbgemm.vnni() else 6e-2)


def test_each_row_is_quantised_on_its_own():
    """One request's large activations must not coarsen another's: a row's result is the same alone and beside an
    outlier row (a per-tensor activation scale would give the small row ~1000x coarser steps)."""
    m = quant.Int8Weight.from_float(torch.randn(64, 256))
    expected_w = _written_out(m)
    quant.bind_cpu(m, policy="fbgemm")
    small = torch.randn(1, 256) * 1e-3
    big = torch.randn(1, 256) * 1e3
    alone = m(small)  # one row: quantised by the op over its own range
    together = m(torch.cat([big, small, big]))
    many = m(torch.cat([big] * 20 + [small]))  # a prefill-sized call: the same one op
    with_small = m(torch.cat([small, small * 1e-3]))
    assert torch.equal(together[1:2], many[-1:]) and torch.equal(together[1:2], with_small[:1])
    for y in (alone, together[1:2]):
        assert rel_err(y, small @ expected_w.T) < 3e-2


def test_the_stored_values_come_back_exactly_and_are_saved():
    q = torch.tensor([[-127, 127, 0, 1] * 8, [5, -5, -126, 100] * 8], dtype=torch.int8).repeat(8, 1)
    m = quant.Int8Weight(16, 32, torch.bfloat16)
    m.qweight, m.scales = q.clone(), torch.tensor([1e-6, 3.0] * 8).to(torch.bfloat16)
    quant.bind_cpu(m, policy="fbgemm")
    assert m.qweight.numel() == 0 and m.fbgemm is not None  # one copy of the weight (FBGEMM's packed one)
    assert torch.equal(m.stored_qweight(), q)
    assert torch.equal(m.state_dict()["qweight"], q)
    assert m.nbytes() == 16 * 32 + 16 * 4


@pytest.mark.parametrize("again", ["fbgemm", "aten", "mlas", "dequantize"])
def test_a_weight_bound_again_keeps_its_values(again):
    m = quant.Int8Weight.from_float(torch.randn(64, 256), dtype=torch.bfloat16)
    stored = m.qweight.clone()
    expected_w = _written_out(m)
    quant.bind_cpu(m, policy="fbgemm")
    if again == "dequantize":
        quant.bind_dequantize(m)
        assert m.fbgemm is None and m.kernel_name == "dequantise + matmul"
    else:
        quant.bind_cpu(m, policy=again)
        assert (m.fbgemm is not None) == (again == "fbgemm")
    assert torch.equal(m.stored_qweight(), stored)
    x = torch.randn(3, 256).to(torch.bfloat16)
    assert rel_err(m(x), F.linear(x.float(), expected_w)) < 3e-2


def test_int4_keeps_the_aten_kernel():
    m = quant.Int4Weight.from_float(torch.randn(64, 256), group_size=64)
    quant.bind_cpu(m, policy="fbgemm")
    assert m.kernel_name.startswith("aten._weight_int4pack_mm") and m.fbgemm is None


@pytest.mark.parametrize("vnni", [True, False])
def test_the_default_policy_takes_fbgemm_for_int8_only_on_a_cpu_with_vnni(vnni, monkeypatch):
    monkeypatch.setattr(fbgemm, "vnni", lambda: vnni)
    i8 = quant.Int8Weight.from_float(torch.randn(64, 128), dtype=torch.bfloat16)
    i4 = quant.Int4Weight.from_float(torch.randn(64, 256), group_size=64)
    quant.bind_cpu(i8)
    quant.bind_cpu(i4)
    assert i8.kernel_name.startswith("quantized::linear_dynamic" if vnni else "aten._weight_int8pack_mm")
    assert i4.kernel_name.startswith("aten._weight_int4pack_mm")
    # and through the environment moevl.place reads: unset = auto, aten pins ATen
    for env, want in ((None, "quantized::linear_dynamic" if vnni else "aten."), ("aten", "aten.")):
        if env is None:
            monkeypatch.delenv("MOEVL_CPU_QUANT_KERNEL", raising=False)
        else:
            monkeypatch.setenv("MOEVL_CPU_QUANT_KERNEL", env)
        s = moevl.load("awaker-tiny-random", device="cpu", dtype="bf16", quantize="int8")
        assert {m.kernel_name.startswith(want) for _, m in quant.quantized_weights(s.model)} == {True}, env


def test_gradient_flows_to_the_input_through_an_fbgemm_weight():
    m = quant.Int8Weight.from_float(torch.randn(32, 64))
    expected = _written_out(m)
    quant.bind_cpu(m, policy="fbgemm")
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, expected.sum(0).expand(4, -1), atol=1e-4)


def test_a_quantised_tiny_model_through_fbgemm_matches_its_reference(monkeypatch):
    """Every int8 weight on FBGEMM: next-token logits within 3% (of the largest logit) of the same quantised model
    run as dequantise-then-matmul, the routing unchanged."""
    from tests.test_quant_mlas import _logits_and_routing

    monkeypatch.setenv("MOEVL_CPU_QUANT_KERNEL", "fbgemm")
    q = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    quant.quantize_model(q.model, "int8")
    oracle = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    quant.quantize_model(oracle.model, "int8")  # unbound: the reference
    moevl.place(q.model, q.device)
    kernels = {m.kernel_name for _, m in quant.quantized_weights(q.model)}
    assert all(k.startswith("quantized::linear_dynamic") for k in kernels), kernels
    for prompt in ("What is in the picture?", "How many shapes are there?"):
        lq, routing_q = _logits_and_routing(q, prompt)
        lo, routing_o = _logits_and_routing(oracle, prompt)
        assert rel_err(lq, lo) < 0.03, prompt
        assert routing_q == routing_o


class _Group(torch.nn.Module):
    """Three linears of one input, as a decoder layer lists them (``fused_linear_groups``)."""
    fused_linear_groups = (("q", "k", "v"),)

    def __init__(self, shapes, bias):
        super().__init__()
        for name, (o, i) in zip("qkv", shapes):
            w = quant.Int8Weight.from_float(torch.randn(o, i), dtype=torch.bfloat16)
            setattr(self, name, quant.WeightLinear(w, torch.randn(o).to(torch.bfloat16) if bias else None))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 6])
def test_a_group_packed_as_one_gives_each_member_its_own_values_bit_for_bit(rows, bias):
    from moevl.kernels import cpu

    torch.manual_seed(rows)
    g = _Group([(48, 64), (16, 64), (24, 64)], bias)
    members = (g.q, g.k, g.v)
    stored = [m.weight.qweight.clone() for m in members]
    for m in members:
        quant.bind_cpu(m.weight, policy="fbgemm")
    x = torch.randn(2, rows, 64).to(torch.bfloat16)
    alone = [m(x) for m in members]
    assert cpu.linear_group(x, members)[0] is not None and fbgemm.fused_of([m.weight.fbgemm for m in members]) is None
    assert quant.fuse_int8_groups(g) == 1
    shared = fbgemm.fused_of([m.weight.fbgemm for m in members])
    assert shared is not None and shared.out_features == 88
    together = cpu.linear_group(x, members)
    for a, t, m, q in zip(alone, together, members, stored):
        assert t.shape == a.shape and torch.equal(t, a)
        assert torch.equal(m(x), a)  # a member alone still gives its own rows
        assert torch.equal(m.weight.stored_qweight(), q)  # and its stored values (what saving writes)
        assert m.weight.kernel_name.endswith("packed with the linears of its input)")
    assert quant.fuse_int8_groups(g) == 1  # fused already: left as it is
    assert fbgemm.fused_of([m.weight.fbgemm for m in members]) is shared
    assert quant.fuse_int8_groups(g, enable=False) == 0  # one packed weight per linear again
    assert not any(isinstance(m.weight.fbgemm, fbgemm.Rows) for m in members)
    for a, m, q in zip(alone, members, stored):
        assert torch.equal(m(x), a) and torch.equal(m.weight.stored_qweight(), q)


def test_members_in_another_order_or_of_two_groups_are_not_one_product():
    g = _Group([(8, 32), (8, 32), (8, 32)], False)
    for m in (g.q, g.k, g.v):
        quant.bind_cpu(m.weight, policy="fbgemm")
    quant.fuse_int8_groups(g)
    ops = [g.q.weight.fbgemm, g.k.weight.fbgemm, g.v.weight.fbgemm]
    assert fbgemm.fused_of(ops) is not None
    assert fbgemm.fused_of(ops[::-1]) is None and fbgemm.fused_of(ops[:2]) is None
    quant.bind_cpu(g.k.weight, policy="aten")  # one member leaves: the rest is no group
    assert fbgemm.fused_of([g.q.weight.fbgemm, g.k.weight.fbgemm, g.v.weight.fbgemm]) is None


@pytest.mark.parametrize("preset", ["awaker-tiny-random", "moellava-tiny-random"])
def test_fused_groups_change_no_logit_of_a_quantised_model(preset, monkeypatch):
    """q/k/v and gate/up packed as one FBGEMM weight each: every logit of prefill and decode equal, bit for bit, to
    one packed weight per linear (Awaker's gate/up with their LoRA experts on top)."""
    from tests.test_quant_mlas import _logits_and_routing

    monkeypatch.setenv("MOEVL_CPU_QUANT_KERNEL", "fbgemm")
    runs = {}
    for fuse in ("0", "1"):
        monkeypatch.setenv("MOEVL_CPU_FUSE_GROUPS", fuse)
        s = moevl.load(preset, device="cpu", dtype="bf16", quantize="int8")
        rows = [m.weight.fbgemm for m in s.model.modules() if isinstance(getattr(m, "weight", None), quant.Int8Weight)]
        assert any(isinstance(r, fbgemm.Rows) for r in rows) == (fuse == "1")
        # one request (batch-1 plans) and two at once (stacked plans)
        runs[fuse] = [_logits_and_routing(s, p, tokens=4)
                      for p in ("What is in the picture?", ["How many shapes?", "Describe the image in detail."])]
    for (l0, r0), (l1, r1) in zip(runs["0"], runs["1"]):
        assert torch.equal(l0, l1) and r0 == r1


def test_a_bad_fuse_groups_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("MOEVL_CPU_FUSE_GROUPS", "yes")
    with pytest.raises(ValueError, match="MOEVL_CPU_FUSE_GROUPS='yes'"):
        moevl.load("awaker-tiny-random", device="cpu", dtype="bf16", quantize="int8")


def test_regrouping_frees_the_separate_copies_and_rebinding_keeps_only_each_members_values():
    import gc
    import weakref

    g = _Group([(256, 128), (64, 128), (64, 128)], False)
    members = (g.q, g.k, g.v)
    for m in members:
        quant.bind_cpu(m.weight, policy="fbgemm")
    old = [weakref.ref(m.weight.fbgemm) for m in members]
    quant.fuse_int8_groups(g)
    gc.collect()
    assert all(r() is None for r in old)  # the separate packed weights are gone (the bound kernels held them too)
    for m in members:  # placed again on another kernel: each member stores its own rows, not a view of the group's
        quant.bind_cpu(m.weight, policy="aten")
    for m, rows in zip(members, (256, 64, 64)):
        q = m.weight.qweight
        assert q.shape == (rows, 128) and q.untyped_storage().nbytes() == rows * 128
