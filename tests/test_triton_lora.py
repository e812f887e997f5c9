"""The Triton LoRA-MoE kernel (kernels/triton_lora.py) against the reference loop over requests, on CPU tensors
through Triton's interpreter (TRITON_INTERPRET=1; no GPU needed). Small shapes: the interpreter runs every
program in numpy.

Tolerances (kernel vs reference.lora_moe_linear, both summing the expert branch in fp32 and adding it to the
base output once): fp32 1e-5; fp16 2e-3 (1-2 ulp: the sums differ in order); bf16 1.6e-2 (2 ulp: Triton 3.9's
interpreter also rounds fp32 -> bf16 toward zero where a GPU rounds to nearest).
"""
import os

# Must be set before the kernels are first built (they are jit-decorated at their first launch).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'moevl-ascend[triton]'): "
                                     "the Triton LoRA-MoE kernel cannot be checked here")

from moevl.kernels import cpu, get_kernels, reference, triton_lora  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _layer(n_experts, rank, d_in, d_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    A = torch.randn(n_experts, rank, d_in, generator=g) / d_in**0.5
    B = torch.randn(n_experts, d_out, rank, generator=g) / rank**0.5
    return W.to(dtype), A.to(dtype), B.to(dtype)


def _scales(batch, seed=1):
    p = torch.rand(batch, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.5  # router top-1 p >= 1/X
    return torch.stack([p * p * 2.0, (1 - p) * 2.0], dim=1)  # Awaker: p^2 s, (1 - p) s with s = 2


def _check(x, W, bias, A, B, expert, scales, **knobs):
    ref = reference.lora_moe_linear(x, W, bias, reference.lora_moe_prepare(A, B, expert, scales))
    out = triton_lora.lora_moe_linear(x, W, bias, triton_lora.lora_moe_prepare(A, B, expert, scales), **knobs)
    tol = TOL[x.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # the experts must matter in the comparison, or a kernel that adds nothing would pass
    assert (ref.float() - F.linear(x, W, bias).float()).abs().max() > 20 * tol
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("rank", [8, 16, 64, 256])
def test_matches_reference_over_ranks(rank):
    W, A, B = _layer(5, rank, 48, 80)
    x = torch.randn(4, 1, 48)
    _check(x, W, None, A, B, torch.tensor([0, 4, 2, 2]), _scales(4))


@pytest.mark.parametrize("batch", [1, 7, 16])
@pytest.mark.parametrize("mix", ["all_same", "all_different", "repeated", "global_as_task"])
def test_expert_mixes(batch, mix):
    n_experts = batch + 1 if mix == "all_different" else 5
    expert = {"all_same": torch.full((batch,), 1),
              "all_different": torch.arange(batch),
              "repeated": torch.arange(batch) % 3,
              "global_as_task": torch.arange(batch) % n_experts}[mix]  # expert 4 is the global one
    W, A, B = _layer(n_experts, 16, 40, 56)
    _check(torch.randn(batch, 1, 40), W, None, A, B, expert, _scales(batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("round_h", [False, True])
def test_dtypes(dtype, round_h):
    W, A, B = _layer(5, 32, 64, 96, dtype)
    x = torch.randn(5, 2, 64).to(dtype)
    _check(x, W, None, A, B, torch.tensor([3, 3, 0, 4, 1]), _scales(5), round_h=round_h)


def test_odd_sizes_strided_inputs_and_row_tiles():
    """Sizes that are no multiple of any block (masking), x a strided view, lora_B stored rank-major (as the Awaker
    model keeps it), prefill rows spanning several row tiles with requests sharing a tile, and the shrink split
    over `in` (291 = 3 blocks of 128, the last partial)."""
    d_in, d_out, rank = 291, 53, 24
    W, A, B = _layer(4, rank, d_in, d_out)
    B = B.transpose(1, 2).contiguous().transpose(1, 2)  # [X, out, r] view of [X, r, out] storage
    A = torch.randn(4, d_in, rank).transpose(1, 2) / d_in**0.5  # [X, r, in], non-contiguous
    x = torch.randn(3, 2 * 25, d_in + 5)[:, ::2, 3:3 + d_in]  # [3, 25, 37], strided in every dim
    assert not x.is_contiguous()
    for split_k in (1, 2, 3):
        _check(x, W, torch.randn(d_out), A, B, torch.tensor([2, 0, 3]), _scales(3), split_k=split_k)


def test_plain_lora_uses_the_task_scale_only():
    W, A, B = _layer(1, 8, 24, 40)
    scales = torch.tensor([[2.0, 0.7], [0.5, 0.7]])  # the global scale must be ignored with one expert
    _check(torch.randn(2, 3, 24), W, None, A, B, torch.tensor([0, 0]), scales)


def test_accumulates_into_the_given_output_in_place():
    W, A, B = _layer(5, 16, 32, 48)
    x, expert, scales = torch.randn(3, 1, 32), torch.tensor([1, 2, 1]), _scales(3)
    y = F.linear(x, W)
    out = triton_lora.lora_moe_accumulate_(y, x, triton_lora.lora_moe_prepare(A, B, expert, scales))
    assert out.data_ptr() == y.data_ptr()
    ref = reference.lora_moe_linear(x, W, None, reference.lora_moe_prepare(A, B, expert, scales))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_zero_scales_leave_the_base_linear_exactly():
    W, A, B = _layer(5, 16, 32, 48)
    x = torch.randn(2, 1, 32)
    out = triton_lora.lora_moe_linear(x, W, None,
                                      triton_lora.lora_moe_prepare(A, B, torch.tensor([1, 4]), torch.zeros(2, 2)))
    assert torch.equal(out, F.linear(x, W))


def test_expert_coefficients_by_hand():
    # 3 task experts + global (index 3); request 1 chose the global expert as its task expert: counted once
    coeff = triton_lora.expert_coefficients(torch.tensor([1, 3, 0]),
                                            torch.tensor([[0.5, 0.25], [0.8, 0.1], [1.5, 0.0]]), 4)
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.25],
                             [0.0, 0.0, 0.0, 0.8],
                             [1.5, 0.0, 0.0, 0.0]])
    assert torch.equal(coeff, expected)


def test_a_plan_for_another_batch_is_one_clear_error():
    W, A, B = _layer(5, 8, 16, 24)
    plan = triton_lora.lora_moe_prepare(A, B, torch.tensor([0, 1]), _scales(2))
    with pytest.raises(ValueError, match="prepared for 2 requests"):
        triton_lora.lora_moe_linear(torch.randn(3, 1, 16), W, None, plan)


def test_cuda_set_uses_triton_only_for_cuda_tensors():
    cuda, cpu_set = get_kernels("cuda"), get_kernels("cpu")
    assert cuda.lora_moe_linear is triton_lora.cuda_lora_moe_linear
    assert cpu_set.lora_moe_prepare is cpu.lora_moe_prepare and cpu_set.lora_moe_linear is cpu.lora_moe_linear
    # CPU tensors under the "cuda" set keep the composed PyTorch path
    W, A, B = _layer(5, 8, 16, 24)
    expert, scales, x = torch.tensor([0, 3]), _scales(2), torch.randn(2, 1, 16)
    plan = cuda.lora_moe_prepare(A, B, expert, scales)
    assert not isinstance(plan, triton_lora.TritonLoraPlan)
    torch.testing.assert_close(cuda.lora_moe_linear(x, W, None, plan),
                               cpu.lora_moe_linear(x, W, None, cpu.lora_moe_prepare(A, B, expert, scales)))


def test_benchmark_without_cuda_says_so_and_writes_nothing(tmp_path, capsys):
    from moevl.benchmarks import lora_kernel

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    assert lora_kernel.main(["--quick", "--out", str(tmp_path / "r")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_benchmark_measurement_runs_on_tiny_shapes():
    """The benchmark's own code path (variants, reference check, timing, floor) on CPU with tiny widths."""
    from moevl.benchmarks import lora_kernel

    rows = lora_kernel.measure([1, 3], {"a": (24, 40), "b": (40, 24)}, rank=16, task_experts=2,
                               device=torch.device("cpu"), dtype=torch.float32, repeats=1, iters=1)
    assert [r["batch"] for r in rows] == [1, 3]
    assert [r["distinct_experts"] for r in rows] == [2, 3]
    for r in rows:
        assert r["triton_max_abs_err"] < 1e-4 and r["composed_max_abs_err"] < 1e-4
        assert r["floor"] > 1 and r["base_us"] > 0


def test_awaker_tiny_scores_the_same_with_the_triton_lora_ops():
    """The model's own plans (its routers' experts and scales, its lora_B layout) through the Triton ops."""
    import dataclasses

    import moevl
    from moevl.model.tiny import DEMO_IMAGE

    vl = moevl.load("awaker-tiny", device="cpu")
    batch = vl.prepare(["What is in the picture?", "Describe the colours."], [[DEMO_IMAGE], []])
    ref = get_kernels("reference")
    variants = {
        "reference": ref,
        "triton": dataclasses.replace(ref, name="triton-interpreted", lora_moe_prepare=triton_lora.lora_moe_prepare,
                                      lora_moe_linear=triton_lora.lora_moe_linear),
        "no-experts": dataclasses.replace(ref, name="no-experts",
                                          lora_moe_linear=lambda x, w, b, plan: F.linear(x, w, b)),
    }
    logits = {}
    for name, kernels in variants.items():
        vl.model.set_kernels(kernels)
        logits[name] = vl.score(batch)
    assert (logits["no-experts"] - logits["reference"]).abs().max() > 1e-2  # the experts matter here
    # fp32 in another summation order: the retrained awaker-tiny's logits differ by up to 1.5e-5 (measured); the
    # experts move them by more than 1e-2
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-5, atol=5e-5)
