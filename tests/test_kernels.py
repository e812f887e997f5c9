"""The fast CPU/CUDA kernels equal their references (kernels/reference.py) over shapes and dtypes.

Tolerances: fp32 1e-5 relative to the output scale; bf16 3e-2, fp16 5e-3 (the fast LoRA path keeps the expert
branch in the input dtype where the reference accumulates it in fp32; x A^T is rounded once to the dtype).
"""
import pytest
import torch

from moevl.kernels import get_kernels, reference
from moevl.kernels import cpu
from moevl.kernels import export as kexport

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def close(actual, expected, dtype):
    scale = expected.float().abs().max().clamp(min=1.0)
    err = (actual.float() - expected.float()).abs().max() / scale
    assert err <= TOL[dtype], f"max error {err:.3g} (relative to {scale:.3g}) > {TOL[dtype]} for {dtype}"


def lora_case(batch, t, d_in, d_out, rank, experts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, t, d_in, generator=g).to(dtype)
    W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    bias = torch.randn(d_out, generator=g).to(dtype)
    A = (torch.randn(experts, rank, d_in, generator=g) / d_in**0.5).to(dtype)
    B = (torch.randn(experts, d_out, rank, generator=g) / rank**0.5).to(dtype)
    # different task expert per request (never the global one, which is last)
    expert = torch.tensor([(3 * b + 1) % max(experts - 1, 1) for b in range(batch)])
    p = torch.rand(batch, generator=g) * 0.5 + 0.5
    scales = torch.stack([p * p * 2.0, (1 - p) * 2.0], dim=1)
    return x, W, bias, A, B, expert, scales


GRID = [
    # batch, T, in, out, rank, experts (4 task + 1 global, or plain LoRA = 1)
    (1, 1, 37, 53, 256, 5),
    (3, 1, 37, 53, 3, 5),
    (3, 7, 37, 53, 5, 5),
    (1, 9, 64, 48, 8, 5),
    (4, 2, 16, 24, 7, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,t,d_in,d_out,rank,experts", GRID)
def test_lora_moe_linear_matches_reference(batch, t, d_in, d_out, rank, experts, dtype):
    x, W, bias, A, B, expert, scales = lora_case(batch, t, d_in, d_out, rank, experts, dtype)
    ref = reference.lora_moe_linear(x, W, bias, reference.lora_moe_prepare(A, B, expert, scales))
    ops = get_kernels("cpu")
    out = ops.lora_moe_linear(x, W, bias, ops.lora_moe_prepare(A, B, expert, scales))
    assert out.shape == ref.shape and out.dtype == dtype
    close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,t,d_in,d_out,rank,experts", GRID)
def test_the_training_lora_moe_linear_matches_the_reference_in_values_and_gradients(batch, t, d_in, d_out, rank,
                                                                                     experts, dtype):
    x, W, bias, A, B, expert, scales = lora_case(batch, t, d_in, d_out, rank, experts, dtype, seed=batch)
    if experts > 1 and batch > 1:
        expert[-1] = experts - 1  # one request whose task expert is the global one: counted once
    grads = []
    for fn in (reference.lora_moe_linear, cpu.lora_moe_linear_autograd):
        leaves = [v.detach().clone().requires_grad_() for v in (x, A, B)]
        out = fn(leaves[0], W, bias, reference.lora_moe_prepare(leaves[1], leaves[2], expert, scales))
        torch.manual_seed(1)
        (out.float() * torch.randn(out.shape)).sum().backward()
        grads.append((out, [v.grad for v in leaves]))
    (ref, ref_grads), (out, out_grads) = grads
    assert out.shape == ref.shape and out.dtype == dtype
    close(out, ref, dtype)
    for got, want in zip(out_grads, ref_grads):
        close(got, want, dtype)


def test_lora_moe_plan_is_reused_across_steps_without_changing():
    x, W, bias, A, B, expert, scales = lora_case(2, 1, 37, 53, 4, 5, torch.float32)
    ops = get_kernels("cpu")
    plan = ops.lora_moe_prepare(A, B, expert, scales)
    first = ops.lora_moe_linear(x, W, bias, plan)
    second = ops.lora_moe_linear(x, W, bias, plan)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_lora_moe_linear_without_plan_is_the_base_linear():
    x, W, bias, *_ = lora_case(2, 3, 37, 53, 4, 5, torch.float32)
    torch.testing.assert_close(get_kernels("cpu").lora_moe_linear(x, W, bias, None), x @ W.t() + bias)


def test_global_expert_chosen_as_task_expert_counts_once():
    x, W, bias, A, B, _, scales = lora_case(2, 3, 16, 24, 4, 5, torch.float32)
    expert = torch.tensor([4, 1])
    ref = reference.lora_moe_linear(x, W, bias, reference.lora_moe_prepare(A, B, expert, scales))
    out = cpu.lora_moe_linear(x, W, bias, cpu.lora_moe_prepare(A, B, expert, scales))
    close(out, ref, torch.float32)


@pytest.mark.parametrize("batch,t", [(1, 1), (1, 5), (3, 1), (3, 4)])
def test_merged_strategy_equals_unmerged(batch, t):
    x, W, bias, A, B, expert, scales = lora_case(batch, t, 37, 53, 6, 5, torch.float32)
    unmerged = get_kernels("cpu")
    merged = get_kernels("cpu-merged")
    plan = merged.lora_moe_prepare(A, B, expert, scales)
    want = unmerged.lora_moe_linear(x, W, bias, unmerged.lora_moe_prepare(A, B, expert, scales))
    close(merged.lora_moe_linear(x, W, bias, plan), want, torch.float32)
    assert len(plan.merged) == 1 and plan.merged[0].shape == (batch, 53, 37)
    close(merged.lora_moe_linear(x, W, bias, plan), want, torch.float32)  # second step reuses the merged W


def test_should_merge_at_the_extremes():
    gib = 2**30
    # one long request, plenty of memory: merge
    assert cpu.should_merge(10**6, 1, 3584, 18944, 256, 64 * gib)
    # a single token never repays a 70 GFLOP merge
    assert not cpu.should_merge(1, 1, 3584, 18944, 256, 64 * gib)
    # no memory for the private copy
    assert not cpu.should_merge(10**6, 1, 3584, 18944, 256, 100 * 2**20)
    # a batch reads one private W per request each step: never pays
    assert not cpu.should_merge(10**6, 8, 3584, 18944, 256, 10**6 * gib)
    assert cpu.merge_break_even_tokens(8, 3584, 18944, 256) == float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,s,hq,hkv", [(1, 9, 4, 2), (5, 5, 4, 4), (6, 11, 6, 2), (20, 24, 8, 2)])
def test_attention_matches_reference_with_gqa_and_fully_masked_rows(t, s, hq, hkv, dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, hq, t, 16, generator=g).to(dtype)
    k = torch.randn(2, hkv, s, 16, generator=g).to(dtype)
    v = torch.randn(2, hkv, s, 16, generator=g).to(dtype)
    keep = torch.rand(2, 1, t, s, generator=g) > 0.3
    keep[..., 0] = True
    keep[1, 0, 0] = False  # a padding query that sees nothing -> zeros
    ref = reference.attention(q, k, v, keep, 0.25)
    out = get_kernels("cpu").attention(q, k, v, keep, 0.25)
    assert torch.isfinite(out.float()).all()
    assert (out[1, :, 0] == 0).all()
    close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_reference(dtype):
    x = torch.randn(3, 5, 53).to(dtype) * 3
    w = (torch.rand(53) + 0.5).to(dtype)
    close(get_kernels("cpu").rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embed_as_matmul_matches_conv3d(dtype):
    weight = torch.randn(24, 3, 2, 4, 4).to(dtype)
    patches = torch.randn(7, 3 * 2 * 4 * 4)
    close(get_kernels("cpu").patch_embed(patches, weight), reference.patch_embed(patches, weight), dtype)


def test_swiglu_matches_reference():
    gate, up = torch.randn(4, 37), torch.randn(4, 37)
    close(get_kernels("cpu").swiglu(gate, up), reference.swiglu(gate, up), torch.float32)


def test_backends_are_registered():
    ops = get_kernels("cpu")
    assert ops.name == "cpu" and ops.lora_moe_linear is cpu.lora_moe_linear
    assert get_kernels("cuda").attention is cpu.attention
    assert get_kernels("export").lora_moe_linear is kexport.lora_moe_linear_dense
    for name in ("reference", "cpu", "cuda", "cpu-merged", "export"):
        assert get_kernels(name).moe_ffn is not None


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank_major", [False, True])
def test_single_request_plan_serves_prefill_then_decode(rank_major, dtype, pack, monkeypatch):
    """Batch 1 on the CPU: views at prefill (T > 1), stacked once at the first T = 1 step (and packed for oneDNN in
    bf16 where cpu.pack_lora); every step equals the reference, with lora_B stored either way (rank-major as
    fp32 models keep it, store_lora_b)."""
    monkeypatch.setattr(cpu, "PACK_LORA", pack)
    # the packed path's numerics wherever oneDNN runs bf16 at all (the kit packs only with native bf16)
    monkeypatch.setattr(cpu, "onednn_bf16_native", torch.ops.mkldnn._is_mkldnn_bf16_supported)
    x, W, bias, A, B, expert, scales = lora_case(1, 6, 37, 53, 256, 5, dtype)
    if rank_major:
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
    plan = cpu.lora_moe_prepare(A, B, expert, scales)
    ref_plan = reference.lora_moe_prepare(A, B, expert, scales)
    close(cpu.lora_moe_linear(x, W, bias, plan), reference.lora_moe_linear(x, W, bias, ref_plan), dtype)
    for t in range(3):
        step = x[:, t:t + 1]
        close(cpu.lora_moe_linear(step, W, bias, plan), reference.lora_moe_linear(step, W, bias, ref_plan), dtype)
    assert len(plan.stacked) == 1  # stacked once, reused
    packed = pack and dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert isinstance(plan.stacked[0], cpu.PackedLoraPlan) == packed
    if not packed:  # the decode expand's weight in the memory order measured faster for the dtype
        bt = plan.stacked[0].lora_Bt[0]  # [2r, out]
        assert (bt.t() if dtype != torch.float32 else bt).is_contiguous()


def test_bf16_packing_needs_native_bf16_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(cpu, "onednn_bf16_native", lambda: True)
    assert cpu.pack_lora(torch.bfloat16, "cpu")
    assert not cpu.pack_lora(torch.float16, "cpu") and not cpu.pack_lora(torch.float32, "cpu")
    assert not cpu.pack_lora(torch.bfloat16, "meta")
    monkeypatch.setattr(cpu, "PACK_LORA", False)
    assert not cpu.pack_lora(torch.bfloat16, "cpu")
    monkeypatch.setattr(cpu, "PACK_LORA", True)
    monkeypatch.setattr(cpu, "onednn_bf16_native", lambda: False)
    assert not cpu.pack_lora(torch.bfloat16, "cpu")


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
def test_packed_stack_is_reused_only_for_the_same_unchanged_experts(monkeypatch):
    """The next request with the same experts reuses the packed stack (its own gate scales applied); another
    expert, or adapters changed in place, are packed anew, and every answer equals the reference."""
    monkeypatch.setattr(cpu, "onednn_bf16_native", lambda: True)
    monkeypatch.setattr(cpu, "PACK_LORA", True)
    x, W, bias, A, B, expert, scales = lora_case(1, 1, 64, 96, 16, 4, torch.bfloat16)

    def decode(expert, scales):
        plan = cpu.lora_moe_prepare(A, B, expert, scales)
        out = cpu.lora_moe_linear(x, W, bias, plan)
        close(out, reference.lora_moe_linear(x, W, bias, reference.lora_moe_prepare(A, B, expert, scales)),
              torch.bfloat16)
        return plan.stacked[0]

    first = decode(expert, scales)
    again = decode(expert, scales.flip(1))  # same experts, other gate weights
    assert again.lora_A is first.lora_A and again.lora_B is first.lora_B
    assert not torch.equal(again.scales, first.scales)
    other = decode(torch.tensor([2]), scales)
    assert other.lora_A is not first.lora_A and len(cpu.PACKED) >= 1
    with torch.no_grad():
        A.mul_(-1.0)  # in place: the version counter moves, the addresses do not
    changed = decode(torch.tensor([2]), scales)
    assert changed.lora_A is not other.lora_A


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
def test_a_bf16_session_decodes_through_the_packed_stack(monkeypatch):
    """Through moevl.load and ask (not only the kernel): batch-1 bf16 decode packs every adapted linear's stack,
    and the answer is the one the plain stack gives."""
    import moevl

    monkeypatch.setattr(cpu, "onednn_bf16_native", lambda: True)
    packed = []
    real = cpu.pack_view_plan
    monkeypatch.setattr(cpu, "pack_view_plan", lambda plan: packed.append(1) or real(plan))
    s = moevl.load("awaker-tiny", device="cpu", dtype="bf16")
    from moevl.model.tiny import DEMO_IMAGE

    ask = dict(images=[[str(DEMO_IMAGE)]], max_new_tokens=12, temperature=0.0)
    monkeypatch.setattr(cpu, "PACK_LORA", False)
    plain = s.ask(["Describe the image."], **ask).texts
    assert not packed
    monkeypatch.setattr(cpu, "PACK_LORA", True)
    assert s.ask(["Describe the image."], **ask).texts == plain
    adapted = sum(1 for m in s.model.modules() if getattr(m, "lora_A", None) is not None)
    assert len(packed) == adapted > 0


def test_packed_plan_is_not_made_under_autograd():
    """Trainable adapters (requires_grad, grad enabled): the decode stack stays plain (oneDNN's packed product has
    no autograd), and the gradient flows into the adapters."""
    x, W, bias, A, B, expert, scales = lora_case(1, 2, 16, 24, 8, 3, torch.bfloat16)
    A.requires_grad_(True)
    plan = cpu.lora_moe_prepare(A, B, expert, scales)
    y = cpu.lora_moe_linear(x[:, :1], W, bias, plan)
    assert isinstance(plan.stacked[0], cpu.StackedLoraPlan)
    y.float().sum().backward()
    assert A.grad is not None and A.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_b_storage_follows_the_dtype_and_keeps_the_values(dtype):
    from moevl.model.awaker.lora_moe import AdaptedLinear
    from moevl.kernels import KernelRef

    lin = AdaptedLinear(8, 12, False, 5, 4, KernelRef(get_kernels("cpu")))
    B = torch.randn(5, 12, 4).to(dtype)
    lin.lora_B.data = B.clone()
    cpu.store_lora_b(lin)
    assert torch.equal(lin.lora_B, B) and lin.lora_B.shape == (5, 12, 4)
    # bf16: [X, out, r] as is; fp32: rank-major ([X, r, out] in memory)
    assert lin.lora_B.is_contiguous() == (dtype == torch.bfloat16)
    assert lin.lora_B.transpose(1, 2).is_contiguous() == (dtype == torch.float32)


def test_a_bad_pack_setting_is_one_line_naming_the_variable(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOEVL_CPU_PACK_LORA="false")
    out = subprocess.run([sys.executable, "-m", "moevl.cli", "run", "--model", "awaker-tiny-random", "--prompt", "x",
                          "--dtype", "bf16", "--max-new-tokens", "1"], env=env, cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "MOEVL_CPU_PACK_LORA='false'" in lines[0], out.stderr


def test_the_pack_setting_is_read_at_placement(monkeypatch):
    from moevl.model.awaker.lora_moe import AdaptedLinear
    from moevl.kernels import KernelRef

    lin = AdaptedLinear(8, 12, False, 3, 4, KernelRef(get_kernels("cpu")))
    monkeypatch.setattr(cpu, "PACK_LORA", True)
    monkeypatch.setenv("MOEVL_CPU_PACK_LORA", "0")
    cpu.prepare_weights_cpu(lin)
    assert cpu.PACK_LORA is False
    monkeypatch.setenv("MOEVL_CPU_PACK_LORA", "1")
    cpu.prepare_weights_cpu(lin)
    assert cpu.PACK_LORA is True


def test_importing_moevl_first_sets_the_openmp_wait_policy_and_keeps_the_users(tmp_path):
    # read by libgomp when torch loads it: moevl sets PASSIVE only when torch is not imported yet, never over a value
    # the user set, and leaves GOMP_SPINCOUNT to the user (it helps FBGEMM int8 decode, hurts fp32: README)
    import os
    import subprocess
    import sys

    code = "import os, moevl, torch; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["PASSIVE", "None"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="ACTIVE"), cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["ACTIVE", "None"], out.stderr
    late = "import os, torch, moevl; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", late], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.split()[-1] == "None", out.stderr  # torch first: too late, nothing set
