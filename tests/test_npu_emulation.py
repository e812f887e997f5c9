"""The CPU emulation of torch_npu: schema contract with the torch-npu 2.13.0 wheel, each op against the plain
reference, the chip rules it enforces, and the kit's NPU kernels (kernels/npu.py) against the reference ops.

Tolerances: fp32 1e-5 (summation order); fp16 / bf16 ops compare against the fp32 reference of the same inputs
with 2e-2 / 5e-2 absolute on unit-scale values (one rounding of the output plus rounding of the inputs).
"""
from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moevl.ascend import npu_schema
from moevl.ascend.npu_emulation import EmulatedTorchNpu, NpuRuleError, NpuStrictGuard
from moevl.ascend.npu_schema import KIT_OPS, SchemaBindError, kit_schemas, parse_schema
from moevl.kernels import moe, reference
from moevl.kernels.npu import NpuKernels, check_no_reference_ops

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}
E910, E310 = EmulatedTorchNpu("910B"), EmulatedTorchNpu("310P")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def close(a, b, dtype):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= TOL[dtype], f"max diff {diff} > {TOL[dtype]} ({dtype})"


# ------------------------------------------------------------------------------------------ schema contract
def _wheel() -> Path | None:
    for cand in [os.environ.get("TORCH_NPU_WHEEL"), *Path("/tmp/tnpu").glob("torch_npu-2.13.0-*.whl")]:
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def test_cache_names_its_source_wheel():
    schemas, source = npu_schema.read_cache()
    assert source["torch_npu"] == "2.13.0"
    assert re.fullmatch(r"torch_npu-2\.13\.0-.*\.whl", source["wheel"])
    assert re.fullmatch(r"[0-9a-f]{64}", source["sha256"])
    assert source["entry"] == npu_schema.YAML_IN_WHEEL
    assert set(KIT_OPS) <= set(schemas)


@pytest.mark.skipif(_wheel() is None, reason="torch-npu 2.13.0 wheel not downloaded (pip download torch-npu==2.13.0 "
                                              "--no-deps -d /tmp/tnpu, or set TORCH_NPU_WHEEL)")
def test_cache_equals_the_wheel():
    wheel = _wheel()
    from_wheel = npu_schema.schemas_from_yaml_text(npu_schema.read_wheel_yaml(wheel))
    cached, source = npu_schema.read_cache()
    import hashlib

    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == source["sha256"]
    for op in KIT_OPS:
        assert len(set(from_wheel[op])) == 1, f"{op} is declared differently more than once in the wheel"
        assert cached[op] == from_wheel[op][0]


def test_every_op_the_kit_calls_is_emulated_with_exactly_its_schema():
    import moevl.kernels.npu as kit

    called = set(re.findall(r"tnpu\.(\w+)\(", inspect.getsource(kit)))
    assert called and called <= set(KIT_OPS), f"kernels/npu.py calls ops without a cached schema: {called - set(KIT_OPS)}"
    for op in KIT_OPS:
        method = getattr(EmulatedTorchNpu, op)
        assert method.emulates == op
        body = inspect.signature(method.__wrapped__).parameters
        names = [n for n in body if n != "self"]
        schema_names = [a.name if a.name != "self" else "self_" for a in kit_schemas()[op].args]
        assert names == schema_names, f"{op}: emulation parameters differ from the wheel's schema"


def test_schema_parser_reads_types_defaults_and_keyword_only():
    s = parse_schema("f.ov(Tensor self, Tensor? w, float eps=1e-06, *, str mode='half', int[2] r=[], "
                     "int n=2147483647, bool flag=False, str lay=\"BSH\", int? t=None) -> (Tensor, Tensor)")
    assert (s.name, s.overload) == ("f", "ov")
    got = {a.name: (a.type, None if a.required else a.default, a.kwarg_only) for a in s.args}
    assert got == {"self": ("Tensor", None, False), "w": ("Tensor?", None, False), "eps": ("float", 1e-6, False),
                   "mode": ("str", "half", True), "r": ("int[2]", [], True), "n": ("int", 2147483647, True),
                   "flag": ("bool", False, True), "lay": ("str", "BSH", True), "t": ("int?", None, True)}
    assert s.args[1].required  # "Tensor? w" without default must still be passed


x4 = torch.randn(1, 2, 3, 8)


@pytest.mark.parametrize("call, message", [
    (lambda: E910.npu_rms_norm(x4, torch.ones(8), eps=1e-6), "unexpected keyword argument 'eps'"),
    (lambda: E910.npu_prompt_flash_attention(x4, x4, x4, None), "at most 3 positional"),
    (lambda: E910.npu_incre_flash_attention(x4, x4, x4, num_heads=2.0), "must be int"),
    (lambda: E910.npu_rms_norm(x4, torch.ones(8), "1e-6"), "must be float"),
    (lambda: E910.npu_swiglu(x4, dim=True), "must be int"),
    (lambda: E910.npu_moe_finalize_routing(x4, None, None, None, None), "missing required argument"),
    (lambda: E910.npu_rms_norm(x4, torch.ones(8), 1e-6, epsilon=1e-6), "multiple values"),
    (lambda: E910.npu_moe_init_routing_v2(x4, x4, active_expert_range=[0, 1, 2]), "must be int[2]"),
    (lambda: E910.npu_grouped_matmul(x4, [x4]), "must be Tensor[]"),
])
def test_schema_binding_rejects_what_the_npu_binding_rejects(call, message):
    with pytest.raises(SchemaBindError, match=re.escape(message)):
        call()


def test_float_arguments_accept_ints_like_the_real_binding():
    y, rstd = E910.npu_rms_norm(x4, torch.ones(8), 1)
    assert y.shape == x4.shape and rstd.shape == (1, 2, 3, 1) and rstd.dtype == torch.float32


# ------------------------------------------------------------------------------------------ ops vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 16), (2, 5, 64), (1, 1, 7, 24)])
def test_rms_norm_matches_reference(dtype, shape):
    x = torch.randn(shape, generator=gen())
    w = 1 + 0.1 * torch.randn(shape[-1], generator=gen(1))
    y, rstd = E910.npu_rms_norm(x.to(dtype), w.to(dtype), epsilon=1e-6)
    close(y, reference.rms_norm(x, w, 1e-6), dtype)
    close(rstd, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, h, t, d", [(1, 4, 1, 16), (2, 3, 5, 128), (1, 2, 7, 80)])
def test_rotary_mul_matches_reference_rotary(dtype, b, h, t, d):
    q, k = torch.randn(b, h, t, d, generator=gen()), torch.randn(b, h, t, d, generator=gen(1))
    ang = torch.randn(b, t, d, generator=gen(2))
    cos, sin = ang.cos(), ang.sin()
    want_q, want_k = reference.apply_rotary(q, k, cos, sin)
    r1, r2 = cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)  # B1SD
    close(E910.npu_rotary_mul(q.to(dtype), r1, r2), want_q, dtype)
    close(E910.npu_rotary_mul(k.to(dtype), r1, r2, rotary_mode="half"), want_k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_swiglu_first_half_is_the_gate(dtype):
    gate, up = torch.randn(2, 3, 24, generator=gen()), torch.randn(2, 3, 24, generator=gen(1))
    close(E910.npu_swiglu(torch.cat((gate, up), -1).to(dtype), dim=-1), reference.swiglu(gate, up), dtype)


def _keep(b, t, s, seed=0):
    """Random keep mask [B, 1, T, S] (True = attend) with every query seeing at least one key (its diagonal)."""
    keep = torch.rand(b, 1, t, s, generator=gen(seed)) > 0.4
    keep[..., torch.arange(t), torch.arange(s - t, s)] = True
    return keep


ATTN_GRID = [  # b, hq, hkv, t, s, d
    (1, 4, 4, 5, 9, 16), (2, 4, 2, 5, 9, 16), (2, 8, 1, 3, 11, 32), (2, 4, 2, 1, 9, 16), (3, 6, 3, 1, 17, 8),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, hq, hkv, t, s, d", ATTN_GRID)
def test_flash_attention_matches_reference_with_gqa_and_padding_masks(dtype, b, hq, hkv, t, s, d):
    q = torch.randn(b, hq, t, d, generator=gen())
    k, v = torch.randn(b, hkv, s, d, generator=gen(1)), torch.randn(b, hkv, s, d, generator=gen(2))
    keep = _keep(b, t, s)
    want = reference.attention(q, k, v, keep, d ** -0.5)
    args = dict(atten_mask=~keep, num_heads=hq, scale_value=d ** -0.5, num_key_value_heads=hkv)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    if t == 1:
        out = E910.npu_incre_flash_attention(qd, kd, vd, input_layout="BNSD", **args)
    else:
        out = E910.npu_prompt_flash_attention(qd, kd, vd, input_layout="BNSD", next_tokens=2147483647, **args)
    close(out, want, dtype)
    # The same call in BSH layout ([B, S, N*D]) gives the same numbers.
    bsh = [x.transpose(1, 2).reshape(b, x.shape[2], -1).contiguous() for x in (qd, kd, vd)]
    op = E910.npu_incre_flash_attention if t == 1 else E910.npu_prompt_flash_attention
    extra = {} if t == 1 else {"next_tokens": 2147483647}
    out_bsh = op(*bsh, input_layout="BSH", **args, **extra)
    close(out_bsh.view(b, t, hq, d).transpose(1, 2), want, dtype)


def test_prompt_attention_default_next_tokens_zero_cuts_a_causal_band():
    b, h, t, d = 1, 2, 6, 16
    q, k, v = (torch.randn(b, h, t, d, generator=gen(i)).half() for i in range(3))
    nothing_masked = torch.zeros(t, t, dtype=torch.bool)
    out = E910.npu_prompt_flash_attention(q, k, v, atten_mask=nothing_masked, num_heads=h, scale_value=d ** -0.5,
                                          input_layout="BNSD")  # next_tokens defaults to 0
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    close(out, reference.attention(q.float(), k.float(), v.float(), causal, d ** -0.5), torch.float16)


def test_incre_attention_actual_seq_lengths_ignore_the_cache_tail():
    b, h, s, d = 2, 2, 10, 16
    q = torch.randn(b, h, 1, d, generator=gen()).half()
    k, v = torch.randn(b, h, s, d, generator=gen(1)).half(), torch.randn(b, h, s, d, generator=gen(2)).half()
    out = E910.npu_incre_flash_attention(q, k, v, actual_seq_lengths=[4, 7], num_heads=h, scale_value=0.25,
                                         input_layout="BNSD")
    keep = (torch.arange(s)[None, :] < torch.tensor([4, 7])[:, None])[:, None, None, :]
    close(out, reference.attention(q.float(), k.float(), v.float(), keep, 0.25), torch.float16)


@pytest.mark.parametrize("group_list_type", [0, 1])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 2]])
def test_grouped_matmul_groups_rows_by_counts_or_cumsum_with_empty_groups(group_list_type, counts):
    m, kdim, n = sum(counts), 24, 32
    x = torch.randn(m, kdim, generator=gen())
    w = torch.randn(len(counts), kdim, n, generator=gen(1))
    gl = torch.tensor(counts).cumsum(0) if group_list_type == 0 else torch.tensor(counts)
    y = E910.npu_grouped_matmul([x], [w], group_list=gl, split_item=2, group_type=0,
                                group_list_type=group_list_type)[0]
    want = torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip([0, *torch.tensor(counts).cumsum(0)[:-1]],
                                                                   torch.tensor(counts).cumsum(0)))])
    close(y, want, torch.float32)
    # a transposed view of a [E, N, K] weight (the torch Linear layout) is accepted as [E, K, N]
    y_t = E910.npu_grouped_matmul([x], [w.transpose(1, 2).contiguous().transpose(1, 2)], group_list=gl,
                                  split_item=2, group_type=0, group_list_type=group_list_type)[0]
    close(y_t, want, torch.float32)


def test_grouped_matmul_rejects_group_lists_that_do_not_cover_x():
    x, w = torch.randn(6, 8), torch.randn(2, 8, 16)
    with pytest.raises(NpuRuleError, match="must equal x's M"):
        E910.npu_grouped_matmul([x], [w], group_list=torch.tensor([2, 3]), split_item=2, group_type=0,
                                group_list_type=1)
    with pytest.raises(NpuRuleError, match="non-decreasing"):
        E910.npu_grouped_matmul([x], [w], group_list=torch.tensor([4, 2]), split_item=2, group_type=0)


def test_gating_top_k_softmax_does_not_renormalise_and_numbers_rows_k_major():
    x = torch.randn(5, 6, generator=gen())
    y, idx, row_idx = E910.npu_moe_gating_top_k_softmax(x, None, k=2)
    p, i = torch.softmax(x, -1).topk(2, -1)
    close(y, p, torch.float32)
    assert idx.dtype == torch.int32 and torch.equal(idx.long(), i)
    assert torch.equal(row_idx, torch.tensor([[n + j * 5 for j in range(2)] for n in range(5)], dtype=torch.int32))


@pytest.mark.parametrize("row_idx_type", [0, 1])
def test_init_routing_v2_sorts_slots_by_expert(row_idx_type):
    x = torch.randn(4, 8, generator=gen())
    idx = torch.tensor([[2, 0], [2, 3], [0, 2], [3, 0]], dtype=torch.int32)
    ex, row, counts, _ = E910.npu_moe_init_routing_v2(
        x, idx, active_num=8, expert_num=5, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, 5], quant_mode=-1, row_idx_type=row_idx_type)
    order = idx.reshape(-1).long().argsort(stable=True)  # source slots n*K + j in expert order
    assert torch.equal(ex, x[order // 2])
    assert torch.equal(counts, torch.tensor([3, 0, 3, 2, 0]))
    want = torch.empty(8, dtype=torch.int32)
    if row_idx_type == 0:  # gather: source slot -> row of expanded_x
        want[order] = torch.arange(8, dtype=torch.int32)
    else:  # scatter: row of expanded_x -> source slot
        want = order.to(torch.int32)
    assert torch.equal(row, want)


def test_finalize_routing_numbers_source_slots_k_major():
    n, k, h = 3, 2, 4
    rows = torch.randn(n * k, h, generator=gen())
    perm = torch.randperm(n * k, generator=gen(1)).to(torch.int32)  # entry j*N + i -> row
    scales = torch.rand(n, k, generator=gen(2))
    bias = torch.randn(5, h, generator=gen(3))
    experts = torch.randint(0, 5, (n, k), generator=gen(4), dtype=torch.int32)
    skip = torch.randn(n, h, generator=gen(5))
    out = E910.npu_moe_finalize_routing(rows, skip, None, bias, scales, perm, experts, drop_pad_mode=0, k=k)
    want = skip.clone()
    for i in range(n):
        for j in range(k):
            want[i] += scales[i, j] * (rows[perm[i + j * n]] + bias[experts[i, j]])
    close(out, want, torch.float32)


# ------------------------------------------------------------------------------------------ chip rules
@pytest.mark.parametrize("call, message", [
    (lambda: E310.npu_rms_norm(x4.bfloat16(), torch.ones(8).bfloat16()), "bfloat16 is not supported"),
    (lambda: E310.npu_swiglu(x4.half()), "not supported on 310P"),
    (lambda: E310.npu_moe_finalize_routing(torch.ones(2, 2), None, None, None, None,
                                           torch.zeros(2, dtype=torch.int32), None), "not supported on 310P"),
    (lambda: E310.npu_moe_gating_top_k_softmax(torch.ones(2, 4)), "not supported on 310P"),
    (lambda: E310.npu_rotary_mul(x4.half(), x4.half(), x4.half()), "D == 128"),
    (lambda: E310.npu_grouped_matmul([torch.ones(4, 8).half()], [torch.ones(2, 8, 24).half()],
                                     group_list=torch.tensor([2, 2]), split_item=2, group_type=0,
                                     group_list_type=1), "N a multiple of 16"),
    (lambda: E310.npu_grouped_matmul([torch.ones(4, 8).half()], [torch.ones(8, 16).half()], group_type=-1),
     "group_type=0 only"),
    (lambda: E310.npu_prompt_flash_attention(torch.ones(1, 4, 2, 16).half(), torch.ones(1, 2, 2, 16).half(),
                                             torch.ones(1, 2, 2, 16).half(), num_heads=4, num_key_value_heads=2,
                                             input_layout="BNSD"), "no GQA"),
    (lambda: E910.npu_prompt_flash_attention(x4, x4, x4, num_heads=2, input_layout="BNSD"), "float32 is not"),
    (lambda: E910.npu_prompt_flash_attention(x4.half().transpose(2, 3), x4.half().transpose(2, 3),
                                             x4.half().transpose(2, 3), num_heads=2, input_layout="BNSD"),
     "contiguous"),
    (lambda: E910.npu_incre_flash_attention(x4.half(), x4.half(), x4.half(), num_heads=2, input_layout="BNSD"),
     "query S must be 1"),
    (lambda: E910.npu_moe_init_routing_v2(torch.ones(2, 4), torch.zeros(2, 1, dtype=torch.int32), expert_num=2,
                                          active_expert_range=[0, 2]), "expert_tokens_num_flag must be True"),
    (lambda: E910.npu_moe_init_routing_v2(torch.ones(2, 4), torch.zeros(2, 1, dtype=torch.int64), expert_num=2,
                                          expert_tokens_num_flag=True, expert_tokens_num_type=1), "int32"),
])
def test_chip_rules_are_enforced(call, message):
    with pytest.raises(NpuRuleError, match=re.escape(message)):
        call()


def test_310p_init_routing_returns_the_cumsum_whatever_the_type():
    idx = torch.tensor([[1], [0], [1]], dtype=torch.int32)
    _, _, tokens, _ = E310.npu_moe_init_routing_v2(torch.ones(3, 4).half(), idx, expert_num=3,
                                                   expert_tokens_num_type=1, expert_tokens_num_flag=True)
    assert tokens.tolist() == [1, 3, 3]


def test_format_cast_tags_the_copy_as_fractal_nz():
    e = EmulatedTorchNpu("310P")
    w = torch.randn(16, 16).half()
    nz = e.npu_format_cast(w, 29)
    assert torch.equal(nz, w) and e.get_npu_format(nz) == 29 and e.get_npu_format(w) == 2


# ------------------------------------------------------------------------------------------ the kit's NPU ops
@pytest.mark.parametrize("chip", ["910B", "310P"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, hq, hkv, t, s, d", ATTN_GRID[1:4])
def test_npu_kernel_attention_matches_reference(chip, dtype, b, hq, hkv, t, s, d):
    ops = NpuKernels(EmulatedTorchNpu(chip), chip)
    q = torch.randn(b, hq, t, d, generator=gen()).to(dtype)
    k, v = (torch.randn(b, hkv, s, d, generator=gen(i)).to(dtype) for i in (1, 2))
    keep = _keep(b, t, s)
    out = ops.attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, keep, d ** -0.5)  # non-contiguous q
    close(out, reference.attention(q.float(), k.float(), v.float(), keep, d ** -0.5), dtype)
    fused = {"npu_prompt_flash_attention", "npu_incre_flash_attention"} & set(ops.tnpu.calls)
    assert bool(fused) == (dtype != torch.float32)  # PFA/IFA take fp16/bf16 only: fp32 runs composed


@pytest.mark.parametrize("chip", ["910B", "310P"])
def test_npu_kernel_norm_rotary_swiglu_match_reference(chip):
    ops = NpuKernels(EmulatedTorchNpu(chip), chip)
    x = torch.randn(2, 3, 128, generator=gen()).half()
    w = (1 + 0.1 * torch.randn(128, generator=gen(1))).half()
    close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x.float(), w.float(), 1e-6), torch.float16)
    close(ops.swiglu(x, x * 2), reference.swiglu(x.float(), 2 * x.float()), torch.float16)
    q, k = torch.randn(1, 2, 3, 128, generator=gen(2)).half(), torch.randn(1, 1, 3, 128, generator=gen(3)).half()
    ang = torch.randn(1, 3, 128, generator=gen(4))
    got = ops.apply_rotary(q, k, ang.cos().half(), ang.sin().half())
    want = reference.apply_rotary(q.float(), k.float(), ang.cos(), ang.sin())
    for g, w_ in zip(got, want):
        close(g, w_, torch.float16)
    assert ops.tnpu.calls["npu_rotary_mul"] == 2  # D = 128 takes the fused op on both chips
    assert ("npu_swiglu" in ops.tnpu.calls) == (chip == "910B")


def _experts(activation, num_e, h, f, dtype, bias):
    g = gen(7)
    w_in = torch.randn(num_e, f, h, generator=g) * 0.2
    w_out = torch.randn(num_e, h, f, generator=g) * 0.2
    if activation == "swiglu":
        return moe.MoeExperts.swiglu_mlp(w_in.to(dtype), (torch.randn(num_e, f, h, generator=g) * 0.2).to(dtype),
                                         w_out.to(dtype))
    b_in = (torch.randn(num_e, f, generator=g) * 0.1).to(dtype) if bias else None
    b_out = (torch.randn(num_e, h, generator=g) * 0.1).to(dtype) if bias else None
    return moe.MoeExperts.gelu_mlp(w_in.to(dtype), b_in, w_out.to(dtype), b_out)


@pytest.mark.parametrize("chip, dtype", [("910B", torch.float32), ("910B", torch.bfloat16), ("310P", torch.float16)])
@pytest.mark.parametrize("activation, bias", [("gelu_tanh", True), ("swiglu", False)])
@pytest.mark.parametrize("n", [1, 13])
def test_npu_moe_ffn_matches_the_reference(chip, dtype, activation, bias, n):
    h, f, num_e = 32, 48, 4
    x = torch.randn(n, h, generator=gen()).to(dtype)
    router = torch.randn(num_e, h, generator=gen(1))
    router[3] -= 100.0  # expert 3 never chosen: an empty group
    experts = _experts(activation, num_e, h, f, dtype, bias)
    ops = NpuKernels(EmulatedTorchNpu(chip), chip)
    y, info = ops.moe_ffn(x, router, experts, top_k=2)
    y_ref, info_ref = moe.moe_ffn_reference(x, router, experts, top_k=2)
    assert torch.equal(info.expert_idx, info_ref.expert_idx)
    close(info.weights, info_ref.weights, torch.float32)
    close(y, y_ref, dtype if dtype != torch.bfloat16 else torch.bfloat16)
    used = set(ops.tnpu.calls)
    assert {"npu_moe_init_routing_v2", "npu_grouped_matmul"} <= used
    assert ({"npu_moe_gating_top_k_softmax", "npu_moe_finalize_routing"} <= used) == (chip == "910B")


def test_npu_moe_ffn_has_no_host_sync_or_float64():
    ops = NpuKernels(EmulatedTorchNpu("910B"), "910B")
    x, router = torch.randn(6, 32, generator=gen()), torch.randn(4, 32, generator=gen(1))
    with NpuStrictGuard(host_sync_ok=False):
        ops.moe_ffn(x, router, _experts("gelu_tanh", 4, 32, 48, torch.float32, True))


def test_strict_guard_rejects_host_sync_float64_and_conv3d():
    t = torch.ones(2)
    for sync in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t.sum() > 0)):
        with torch.inference_mode(), pytest.raises(NpuRuleError, match="host synchronisation"), NpuStrictGuard():
            sync()
    assert t.tolist() == [1.0, 1.0]  # the guard restores Tensor.tolist on exit
    with pytest.raises(NpuRuleError, match="float64"), NpuStrictGuard(host_sync_ok=True):
        t.double()
    with pytest.raises(NpuRuleError, match="Conv3d"), NpuStrictGuard(host_sync_ok=True):
        F.conv3d(torch.ones(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2))


def test_strict_mode_rejects_reference_hot_ops():
    from moevl.kernels import get_kernels

    check_no_reference_ops(get_kernels("npu-emulated"))
    check_no_reference_ops(get_kernels("npu"))  # registering "npu" imports no torch_npu
    with pytest.raises(NpuRuleError, match="plain reference"):
        check_no_reference_ops(get_kernels("reference"))
