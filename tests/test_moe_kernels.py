"""Token-level top-k MoE FFN (kernels/moe.py): routing formula, and every dispatch variant equals the reference.

Tolerances: fp32 1e-5 relative to the output scale (dispatch is exact: the same GEMMs on the same rows, combined in
the same order up to commutativity), bf16 2e-2, fp16 5e-3.
"""
import pytest
import torch
import torch.nn.functional as F

from moevl.kernels import get_kernels
from moevl.kernels.moe import MoeExperts, gumbel_noise, moe_ffn, route

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def close(actual, expected, dtype):
    scale = expected.float().abs().max().clamp(min=1.0)
    err = (actual.float() - expected.float()).abs().max() / scale
    assert err <= TOL[dtype], f"max error {err:.3g} > {TOL[dtype]} for {dtype}"


def make_experts(kind, num_experts, hidden, ffn, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    if kind == "gelu":
        return MoeExperts.gelu_mlp(w(num_experts, ffn, hidden), w(num_experts, ffn),
                                   w(num_experts, hidden, ffn), w(num_experts, hidden))
    return MoeExperts.swiglu_mlp(w(num_experts, ffn, hidden), w(num_experts, ffn, hidden), w(num_experts, hidden, ffn))


def make_inputs(n, hidden, num_experts, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g).to(dtype), torch.randn(num_experts, hidden, generator=g)


@pytest.mark.parametrize("impl", ["dropless", "dense"])
@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("n,hidden,ffn", [(1, 16, 24), (37, 29, 53), (64, 32, 40)])
@pytest.mark.parametrize("routing", ["deterministic", "deepspeed"])
def test_dispatch_matches_reference_fp32(impl, kind, n, hidden, ffn, routing):
    experts = make_experts(kind, 4, hidden, ffn)
    x, wg = make_inputs(n, hidden, 4)
    ref, ref_info = moe_ffn(x, wg, experts, routing=routing, generator=torch.Generator().manual_seed(5),
                            impl="reference")
    out, info = moe_ffn(x, wg, experts, routing=routing, generator=torch.Generator().manual_seed(5), impl=impl)
    assert torch.equal(info.expert_idx, ref_info.expert_idx)
    close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["dropless", "dense"])
def test_dispatch_matches_reference_low_precision(impl, dtype):
    experts = make_experts("swiglu", 4, 32, 48, dtype)
    x, wg = make_inputs(23, 32, 4, dtype)
    ref, _ = moe_ffn(x, wg, experts, impl="reference")
    out, _ = moe_ffn(x, wg, experts, impl=impl)
    assert out.dtype == dtype
    close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropless_grouped_mm_path_matches_reference(dtype):
    # the CUDA default (torch._grouped_mm over the sorted slices), exercised through its CPU kernel
    from moevl.kernels.moe import experts_dropless, experts_reference
    experts = make_experts("swiglu", 4, 32, 48, dtype)
    x, wg = make_inputs(29, 32, 4, dtype)
    x[:, 0] = 5.0
    wg[:, 0] = torch.tensor([0.0, 0.0, 0.0, -100.0])  # expert 3 gets no tokens: an empty group
    info = route(x, wg)
    assert not (info.expert_idx == 3).any()
    close(experts_dropless(x, experts, info, use_grouped_mm=True), experts_reference(x, experts, info), dtype)


def test_experts_that_receive_no_tokens():
    experts = make_experts("gelu", 4, 16, 24)
    x, wg = make_inputs(9, 16, 4)
    x[:, 0] = 5.0  # a constant feature...
    wg[:, 0] = torch.tensor([0.0, 0.0, -100.0, -100.0])  # ...that rules experts 2 and 3 out for every token
    ref, info = moe_ffn(x, wg, experts, impl="reference")
    assert not (info.expert_idx >= 2).any()
    for impl in ("dropless", "dense"):
        close(moe_ffn(x, wg, experts, impl=impl)[0], ref, torch.float32)


def test_padding_rows_do_not_change_real_rows():
    experts = make_experts("swiglu", 4, 16, 24)
    x, wg = make_inputs(10, 16, 4)
    padded = torch.cat([x, torch.zeros(6, 16)])
    for impl in ("reference", "dropless", "dense"):
        alone, _ = moe_ffn(x, wg, experts, impl=impl)
        with_pad, _ = moe_ffn(padded, wg, experts, impl=impl)
        close(with_pad[:10], alone, torch.float32)


def test_top2_formula_written_out():
    # Independent of kernels.moe's helpers: softmax of fp32 logits, two largest, renormalised; y = sum w_i E_i(x).
    experts = make_experts("gelu", 4, 8, 12)
    x, wg = make_inputs(5, 8, 4)
    y, info = get_kernels("cpu").moe_ffn(x, wg, experts)
    for i in range(5):
        p = torch.softmax(x[i] @ wg.t(), dim=0)
        e1 = int(p.argmax())
        p_rest = p.clone()
        p_rest[e1] = -1
        e2 = int(p_rest.argmax())
        w1, w2 = p[e1] / (p[e1] + p[e2]), p[e2] / (p[e1] + p[e2])

        def expert(e):
            h = x[i] @ experts.w_in[e].t() + experts.b_in[e]
            h = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))  # gelu_new
            return h @ experts.w_out[e].t() + experts.b_out[e]

        assert info.expert_idx[i].tolist() == [e1, e2]
        torch.testing.assert_close(info.weights[i], torch.stack([w1, w2]))
        torch.testing.assert_close(y[i], w1 * expert(e1) + w2 * expert(e2), rtol=1e-5, atol=1e-5)


def test_gumbel_noise_is_torch_gumbel_draw():
    # DeepSpeed 0.9.5 draws torch.distributions.Gumbel(0, 1).rsample(logits.shape)
    torch.manual_seed(7)
    want = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample((6, 4))
    torch.manual_seed(7)
    torch.testing.assert_close(gumbel_noise((6, 4), "cpu"), want)


def test_deepspeed_routing_same_seed_same_routing_and_differs_from_deterministic():
    x, wg = make_inputs(200, 16, 4)
    a = route(x, wg, routing="deepspeed", generator=torch.Generator().manual_seed(3))
    b = route(x, wg, routing="deepspeed", generator=torch.Generator().manual_seed(3))
    det = route(x, wg, routing="deterministic")
    assert torch.equal(a.expert_idx, b.expert_idx)
    assert torch.equal(a.expert_idx[:, 0], det.expert_idx[:, 0])  # the first expert never sees noise
    assert (a.expert_idx[:, 1] != det.expert_idx[:, 1]).any()
    assert (a.expert_idx[:, 0] != a.expert_idx[:, 1]).all()
    # combine weights come from the noise-free softmax of the chosen pair
    p = a.probs.gather(1, a.expert_idx)
    torch.testing.assert_close(a.weights, p / p.sum(1, keepdim=True))


def test_deepspeed_routing_uses_the_global_rng_without_a_generator():
    x, wg = make_inputs(50, 16, 4)
    torch.manual_seed(11)
    a = route(x, wg, routing="deepspeed")
    torch.manual_seed(11)
    b = route(x, wg, routing="deepspeed")
    assert torch.equal(a.expert_idx, b.expert_idx)


def test_bad_arguments_say_what_to_do():
    experts = make_experts("gelu", 4, 8, 12)
    x, wg = make_inputs(3, 8, 4)
    with pytest.raises(ValueError, match="routing"):
        moe_ffn(x, wg, experts, routing="noisy")
    with pytest.raises(ValueError, match="top_k"):
        moe_ffn(x, wg, experts, top_k=1, routing="deepspeed")
    with pytest.raises(ValueError, match="impl"):
        moe_ffn(x, wg, experts, impl="fastest")


def test_top1_and_top3_dispatch():
    experts = make_experts("swiglu", 4, 16, 24)
    x, wg = make_inputs(20, 16, 4)
    for k in (1, 3):
        ref, _ = moe_ffn(x, wg, experts, top_k=k, impl="reference")
        for impl in ("dropless", "dense"):
            close(moe_ffn(x, wg, experts, top_k=k, impl=impl)[0], ref, torch.float32)


def test_backends_wire_the_variants():
    assert get_kernels("reference").moe_ffn.__name__ == "moe_ffn_reference"
    assert get_kernels("cpu").moe_ffn.__name__ == "moe_ffn_dropless"
    assert get_kernels("export").moe_ffn.__name__ == "moe_ffn_dense"


def test_gelu_new_is_torch_tanh_gelu():
    h = torch.randn(100)
    want = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    torch.testing.assert_close(F.gelu(h, approximate="tanh"), want)
