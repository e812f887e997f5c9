"""Weight-only quantisation of MoE-LLaVA's stacked experts (kernels/quant.py QuantizedExperts, kernels/moe.py): every
dispatch variant against the dequantised stack run through the reference loop with plain F.linear, the round-trip
error against fp32, routing unchanged for the same input, a quantised tiny model, `moevl quantize` save/load and the
saved file's size, and the emulated NPU path. Tiny models only (moellava-tiny-random: hidden 64, FFN 128, 4 experts,
top-2, MoE layers 0 and 2 of 3)."""
import json

import pytest
import torch
import torch.nn.functional as F

import moevl
from moevl.kernels import moe, quant
from tests.test_quant import _next_token_logits  # the logits of the next token, spied on the session
from tests.test_quant import int8_default_is_fbgemm

# the default int8 kernel here and the bytes of one scale as it holds it (FBGEMM: fp32 per channel; ATen: bf16)
INT8_KERNEL, INT8_SCALE_BYTES = (("quantized::linear_dynamic (FBGEMM, int8 activations per row)", 4)
                                 if int8_default_is_fbgemm() else ("aten._weight_int8pack_mm (bf16 activations)", 2))

E, H, FFN, TOKENS = 4, 64, 128, 11


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def random_experts(activation: str, seed: int = 0) -> moe.MoeExperts:
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    if activation == "swiglu":
        return moe.MoeExperts.swiglu_mlp(w(E, FFN, H), w(E, FFN, H), w(E, H, FFN))
    return moe.MoeExperts.gelu_mlp(w(E, FFN, H), 0.3 * torch.randn(E, FFN, generator=g), w(E, H, FFN),
                                   0.3 * torch.randn(E, H, generator=g))


def dequantised_by_hand(stack: quant.QuantizedExperts) -> torch.Tensor:
    """The oracle's weights, written out here from the stored form: int8 q * scale per row; int4 nibbles (the even
    column in the low one) (q - 8) * scale + zero per group."""
    out = []
    for m in stack:
        if m.mode == "int8":
            out.append(m.qweight.float() * m.scales.float()[:, None])
        else:
            p = m.stored_qweight()
            q = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(m.out_features, m.in_features).float()
            q = q.view(m.out_features, -1, m.group_size)
            out.append(((q - 8) * m.scales.float()[..., None] + m.zeros.float()[..., None]).reshape(q.shape[0], -1))
    return torch.stack(out)


def quantised(experts: moe.MoeExperts, mode: str, group: int = 64):
    """-> (experts with quantised stacks, the same experts with the stacks dequantised by hand, fp32)."""
    stacks = {k: quant.quantize_experts(getattr(experts, k), mode, group) for k in ("w_in", "w_up", "w_out")
              if getattr(experts, k) is not None}
    oracle = experts._replace(**{k: dequantised_by_hand(s) for k, s in stacks.items()})
    return experts._replace(**stacks), oracle


def plain_reference(x, experts: moe.MoeExperts, info: moe.RoutingInfo):
    """experts_reference with tensors only: every expert through plain F.linear (fp32)."""
    assert not experts.quantized
    return moe.experts_reference(x.float(), experts._replace(
        **{k: None if v is None else v.float() for k, v in experts._asdict().items() if k != "activation"}), info)


# ------------------------------------------------------------------------------------------------- the dispatch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_dispatch_variant_matches_the_dequantised_stack_through_the_reference(mode, activation, dtype):
    """CPU kernels (bf16 activations) within 2% of the largest output; unbound (the weight modules' reference) 1e-5
    in fp32. The grouped GEMM, asked for explicitly, dequantises the stacks."""
    torch.manual_seed(0)
    q, oracle = quantised(random_experts(activation), mode)
    q = q._replace(**{k: v.to(dtype) for k, v in q._asdict().items() if isinstance(v, torch.Tensor)})  # biases
    x = torch.randn(TOKENS, H).to(dtype)
    info = moe.route(x, torch.randn(E, H), top_k=2)
    assert len(set(info.expert_idx.flatten().tolist())) > 1
    expected = plain_reference(x, oracle, info)
    if dtype == torch.float32:  # unbound: each expert's module runs dequantise + F.linear
        assert rel_err(moe.experts_dropless(x, q, info), expected) < 1e-5
    for stack in (q.w_in, q.w_up, q.w_out):
        if stack is not None:
            for m in stack:
                quant.bind_cpu(m, policy="aten")
                assert m.kernel_name.startswith("aten._weight_int")
    for name, run in (("reference", moe.experts_reference), ("dropless", moe.experts_dropless),
                      ("dense", moe.experts_dense),
                      ("grouped", lambda *a: moe.experts_dropless(*a, use_grouped_mm=True))):
        y = run(x, q, info)
        assert y.shape == (TOKENS, H) and y.dtype == dtype
        tol = 2e-2 if name != "grouped" or dtype == torch.bfloat16 else 1e-5  # grouped: dequantised, fp32 GEMM
        assert rel_err(y, expected) < tol, name


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_experts_on_onnx_runtimes_matmul_nbits_match_the_dequantised_stack(mode):
    """Each expert's weight bound to MLAS (kernels/mlas.py; int4 in its symmetric form, MLAS's exact one): the
    dropless dispatch within 2% of the largest output of the hand-dequantised stack through the reference."""
    from moevl.kernels import mlas

    if not mlas.available():
        pytest.skip("onnxruntime's MatMulNBits is not usable here")
    torch.manual_seed(1)
    experts = random_experts("swiglu")
    stacks = {k: quant.quantize_experts(getattr(experts, k), mode, 64, zero_point=False)
              for k in ("w_in", "w_up", "w_out")}
    oracle = experts._replace(**{k: dequantised_by_hand(v) for k, v in stacks.items()})
    q = experts._replace(**stacks)
    for stack in stacks.values():
        for m in stack:
            quant.bind_cpu(m, policy="mlas")
            assert m.kernel_name.startswith("onnxruntime MatMulNBits")
    x = torch.randn(TOKENS, H).to(torch.bfloat16)
    info = moe.route(x, torch.randn(E, H).to(torch.bfloat16), top_k=2)
    y = moe.experts_dropless(x, q, info)
    assert y.dtype == torch.bfloat16 and rel_err(y, plain_reference(x, oracle, info)) < 2e-2


def test_int8_experts_on_fbgemm_match_the_dequantised_stack():
    """Each int8 expert weight bound to torch's FBGEMM linear (kernels/fbgemm.py, int8 activations per row): the
    dropless dispatch within 2% of the largest output of the hand-dequantised stack through the reference."""
    from moevl.kernels import fbgemm

    if not fbgemm.available():
        pytest.skip("torch's quantized::linear_dynamic is not usable here")
    torch.manual_seed(2)
    experts = random_experts("swiglu")
    stacks = {k: quant.quantize_experts(getattr(experts, k), "int8") for k in ("w_in", "w_up", "w_out")}
    oracle = experts._replace(**{k: dequantised_by_hand(v) for k, v in stacks.items()})
    q = experts._replace(**stacks)
    for stack in stacks.values():
        for m in stack:
            quant.bind_cpu(m, policy="fbgemm")
            assert m.kernel_name.startswith("quantized::linear_dynamic")
    x = torch.randn(TOKENS, H).to(torch.bfloat16)
    info = moe.route(x, torch.randn(E, H).to(torch.bfloat16), top_k=2)
    y = moe.experts_dropless(x, q, info)
    assert y.dtype == torch.bfloat16 and rel_err(y, plain_reference(x, oracle, info)) < 2e-2


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantisation_error_of_the_experts_is_bounded_against_fp32(mode, tol):
    """Through the CPU kernels, against the unquantised fp32 experts (random weights: int4's 16 levels per group of
    64 cost ~8% of the largest output here)."""
    experts = random_experts("gelu_tanh", seed=1)
    q, _ = quantised(experts, mode)
    for stack in (q.w_in, q.w_out):
        quant.bind_all(stack, quant.bind_cpu)
    x = torch.randn(64, H)
    info = moe.route(x, torch.randn(E, H), top_k=2)
    assert rel_err(moe.experts_dropless(x, q, info), plain_reference(x, experts, info)) < tol


def test_a_stacked_quantised_weight_looks_like_the_stack():
    w = torch.randn(E, FFN, H)
    stack = quant.quantize_experts(w, "int8")
    assert stack.shape == (E, FFN, H) and stack.dtype == torch.float32 and len(stack) == E
    assert isinstance(stack[2], quant.Int8Weight) and stack[2].shape == (FFN, H)
    assert stack.nbytes() == E * (FFN * H + FFN * 4)  # int8 values + one fp32 scale per output row
    assert rel_err(stack.dequantize(), w) < 1e-2
    assert quant.quantize_experts(torch.randn(E, FFN, 40), "int4") is None  # no group divides 40: stays float


# ------------------------------------------------------------------------------------------------- a tiny model
@pytest.fixture(scope="module")
def float_fp32():
    return moevl.load("moellava-tiny-random", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def float_bf16():
    return moevl.load("moellava-tiny-random", device="cpu", dtype="bf16")


@pytest.fixture(scope="module")
def int8_bf16():
    return moevl.load("moellava-tiny-random", device="cpu", dtype="bf16", quantize="int8")


def moe_layers(session):
    return [layer.mlp for layer in session.model.model.layers if layer.is_moe]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_routing_is_unchanged_for_the_same_input_and_router_and_biases_stay(float_fp32, mode):
    q = moevl.load("moellava-tiny-random", device="cpu", dtype="fp32", quantize=mode)
    x = torch.randn(2, 9, H, generator=torch.Generator().manual_seed(3))
    for ref, mlp in zip(moe_layers(float_fp32), moe_layers(q)):
        assert isinstance(mlp.w_in, quant.QuantizedExperts) and isinstance(mlp.w_out, quant.QuantizedExperts)
        for name in ("router", "b_in", "b_out"):
            kept = getattr(mlp, name)
            assert isinstance(kept, torch.nn.Parameter) and kept.dtype == torch.float32
            assert torch.equal(kept, getattr(ref, name))
        with torch.no_grad():
            y_ref, idx_ref = ref(x, "deterministic", None)
            y, idx = mlp(x, "deterministic", None)
        assert torch.equal(idx, idx_ref)
        assert rel_err(y, y_ref) < (0.03 if mode == "int8" else 0.2)


def test_load_with_int8_leaves_no_float_expert_stack_and_stays_close(int8_bf16, float_bf16, float_fp32):
    model = int8_bf16.model
    assert not [n for n, p in model.named_parameters() if p.dim() == 3 and p.is_floating_point()]
    stacks = [getattr(mlp, k) for mlp in moe_layers(int8_bf16) for k in ("w_in", "w_out")]
    assert len(stacks) == 4 and all(isinstance(s, quant.QuantizedExperts) for s in stacks)
    assert {m.kernel_name for s in stacks for m in s} == {INT8_KERNEL}
    # the reported weight bytes count the experts: int8 values + a scale per row, per expert
    info = quant.describe(model)
    sb = INT8_SCALE_BYTES
    expert_bytes = 2 * E * ((FFN * H + FFN * sb) + (H * FFN + H * sb))
    others = sum(m.nbytes() for n, m in quant.quantized_weights(model) if ".w_in." not in n and ".w_out." not in n)
    assert info["weight_bytes"] == expert_bytes + others and info["expert_stacks"] == 4
    for prompt in ("What is in the picture?", "Describe the image in detail."):
        lq = _next_token_logits(int8_bf16, prompt)
        assert rel_err(lq, _next_token_logits(float_bf16, prompt)) < 0.03, prompt  # observed ~0.014
        assert rel_err(lq, _next_token_logits(float_fp32, prompt)) < 0.03, prompt


# ------------------------------------------------------------------------------------------------- save / load
QUANTISED_KEYS = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".dense.weight", ".fc1.weight",
                  ".fc2.weight", ".mlp.w_in", ".mlp.w_out")


def expected_data_bytes(float_sd: dict, mode: str) -> int:
    """The tensor bytes of a quantised fp32 checkpoint, from the float state dict: the decoder's linears, the expert
    stacks and lm_head quantised (int8: 1 byte per weight + an fp32 scale per row; int4: half a byte + fp32 scale
    and zero per group of the largest of 128/64/32 dividing the input width), everything else as it is."""
    total = 0
    for k, v in float_sd.items():
        if k == "lm_head.weight" or (k.startswith("model.layers.") and k.endswith(QUANTISED_KEYS)):
            rows = v.numel() // v.shape[-1]
            if mode == "int8":
                total += v.numel() + 4 * rows
            else:
                group = next(g for g in (128, 64, 32) if v.shape[-1] % g == 0)
                total += v.numel() // 2 + 2 * 4 * rows * (v.shape[-1] // group)
        else:
            total += v.numel() * v.element_size()
    return total


def data_bytes(path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_moevl_quantize_writes_packed_experts_that_load_as_quantised_at_load(tmp_path, float_fp32, monkeypatch,
                                                                            mode):
    from safetensors import safe_open

    from moevl.quantize import quantize_folder

    out = quantize_folder("moellava-tiny-random", tmp_path / mode, mode, log=lambda m: None)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q0 = f.get_tensor("model.layers.0.mlp.w_in.0.qweight")
        router = f.get_tensor("model.layers.0.mlp.router")
    assert "model.layers.0.mlp.w_in" not in keys and "model.layers.2.mlp.w_out" not in keys  # no float stack
    assert {f"model.layers.0.mlp.w_out.{e}.scales" for e in range(E)} <= keys
    assert q0.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert router.dtype == torch.float32 and torch.equal(router, moe_layers(float_fp32)[0].router)
    assert json.loads((out / "quantization.json").read_text())["expert_stacks"] == 2 * 2  # w_in, w_out x 2 layers

    float_sd = float_fp32.model.state_dict()
    assert data_bytes(out / "model.safetensors") == expected_data_bytes(float_sd, mode)

    direct = moevl.load("moellava-tiny-random", device="cpu", dtype="fp32", quantize=mode)

    def refuse(*a, **k):
        raise AssertionError("loading a quantised folder quantised float weights")
    monkeypatch.setattr(quant, "quantize_experts", refuse)
    monkeypatch.setattr(quant, "quantize_model", refuse)
    loaded = moevl.load(str(out), device="cpu", dtype="fp32")
    monkeypatch.undo()
    assert not [n for n, p in loaded.model.named_parameters() if p.dim() == 3]
    assert all(isinstance(s, quant.QuantizedExperts) for mlp in moe_layers(loaded) for s in (mlp.w_in, mlp.w_out))
    assert moevl.load(str(out), device="cpu", dtype="fp32", quantize=mode).model is not None  # the same mode: fine
    for prompt in ("What is in the picture?", "How many shapes are there?"):
        assert torch.equal(_next_token_logits(loaded, prompt), _next_token_logits(direct, prompt)), prompt


def test_the_quantised_file_is_smaller_by_the_expected_ratio(tmp_path, float_fp32):
    """Whole tiny checkpoint: fp32 -> int8 about 0.46x here (the vision tower, embeddings and norms stay fp32); the
    experts alone: int8 ~0.27x of their fp32 bytes, int4 ~0.16x."""
    from moevl.model.moe_llava.checkpoint import save_moe_llava
    from moevl.quantize import quantize_folder

    save_moe_llava(float_fp32.model, float_fp32.processor, tmp_path / "fp32")
    fp32 = data_bytes(tmp_path / "fp32" / "model.safetensors")
    float_sd = float_fp32.model.state_dict()
    assert fp32 == sum(v.numel() * v.element_size() for v in float_sd.values())
    int8 = data_bytes(quantize_folder("moellava-tiny-random", tmp_path / "q8", "int8", log=lambda m: None)
                      / "model.safetensors")
    assert int8 == expected_data_bytes(float_sd, "int8") and 0.40 < int8 / fp32 < 0.50
    experts = {k: v for k, v in float_sd.items() if k.endswith((".mlp.w_in", ".mlp.w_out"))}
    ratio8 = expected_data_bytes(experts, "int8") / sum(v.numel() * 4 for v in experts.values())
    ratio4 = expected_data_bytes(experts, "int4") / sum(v.numel() * 4 for v in experts.values())
    assert 0.25 < ratio8 < 0.28 and 0.14 < ratio4 < 0.17


# ------------------------------------------------------------------------------------------------- NPU (emulated)
def test_quantised_experts_run_the_npu_weight_quant_op_on_the_emulated_npu():
    """Emulated (not verified on hardware): every base linear, every expert of both MoE layers (all experts on all
    rows: no host sync) and lm_head through npu_weight_quant_batchmatmul, once per forward."""
    vl = moevl.load("moellava-tiny-random", device="npu-emulated", quantize="int8")
    res = vl.ask("What is in the picture?", max_new_tokens=3)
    assert len(res.token_ids[0]) == 3
    cfg = vl.model.cfg
    dense_layers = cfg.num_layers - len(cfg.moe_layers)
    per_forward = 4 * cfg.num_layers + 2 * dense_layers + 2 * E * len(cfg.moe_layers) + 1
    assert vl.device.torch_npu().calls["npu_weight_quant_batchmatmul"] == 3 * per_forward
    assert {m.kernel_name for mlp in moe_layers(vl) for m in mlp.w_in} == {
        "torch_npu.npu_weight_quant_batchmatmul (W8A16)"}


@pytest.mark.parametrize("mode", [None, "int8"])
def test_the_moellava_benchmark_counts_the_bytes_a_decode_token_reads_as_held(mode):
    """benchmarks.e2e_moellava's bytes per decode token, against a count written from the config here: fp32 4 bytes a
    weight; int8 1 byte a weight + one scale per output row (the linears and the experts; bf16, fp32 as FBGEMM
    holds it), the rest bf16."""
    from moevl.benchmarks.e2e_moellava import measured_bytes_per_decode_step

    s = moevl.load("moellava-tiny-random", device="cpu", dtype="fp32" if mode is None else "bf16", quantize=mode)
    cfg = s.model.cfg
    h, f, v, k, e = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.top_k, cfg.num_experts
    fl = 4 if mode is None else 2

    def linear(o, i, bias=True):  # weight as held + bias (float)
        return (o * i * fl if mode is None else o * i + INT8_SCALE_BYTES * o) + (o * fl if bias else 0)

    norms = 2 * h * fl  # one LayerNorm (weight + bias) per Phi layer
    attn = 4 * linear(h, h)
    dense_ffn = linear(f, h) + linear(h, f)
    moe_ffn = k * (linear(f, h, False) + linear(h, f, False) + (f + h) * fl) + e * h * fl  # top-k experts + router
    n_moe = len(cfg.moe_layers)
    expected = (cfg.num_layers * (attn + norms) + (cfg.num_layers - n_moe) * dense_ffn + n_moe * moe_ffn
                + linear(v, h, False))
    assert measured_bytes_per_decode_step(s.model, k) == expected
