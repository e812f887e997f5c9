"""Weight-only quantisation (kernels/quant.py): the numbers, each kernel against dequantise-then-matmul, a quantised
tiny model against fp32, `moevl quantize` save/load, and bad input."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import moevl
from moevl.kernels import quant

def int8_default_is_fbgemm() -> bool:
    """What the default CPU int8 kernel should be here, read from the CPU flags (not from the kit's code): torch's
    FBGEMM linear where the CPU has 8-bit dot products (VNNI / AMX-int8) and FBGEMM runs, else ATen's."""
    from pathlib import Path

    from moevl.kernels import fbgemm

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")) and fbgemm.available()


SHAPES = [(64, 128), (96, 256), (48, 384)]  # [out, in]: out a multiple of 16 (the CPU int4 layout's rule)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ------------------------------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_is_at_most_half_a_step_per_channel(shape):
    w = torch.randn(shape)
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (shape[0],)
    err = (quant.dequantize_int8(q, s) - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)
    # the largest weight of each row is represented exactly (scale = max|w| / 127)
    assert torch.allclose(q.abs().amax(1).float(), torch.full((shape[0],), 127.0))


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group, zero_point):
    w = torch.randn(64, 256)
    packed, s, z = quant.quantize_int4(w, group, zero_point)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8 and s.shape == (64, 256 // group)
    assert zero_point or torch.all(z == 0)
    err = (quant.dequantize_int4(packed, s, z) - w).abs().view(64, -1, group)
    assert torch.all(err <= s[..., None] / 2 + 1e-5)


def test_int4_packing_round_trips_and_puts_the_even_column_in_the_low_nibble():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert torch.equal(quant.unpack_int4(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) + 16 * int(q[0, 1])


def test_a_width_not_divisible_by_the_group_is_refused():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quant.quantize_int4(torch.randn(16, 100), 32)


# ------------------------------------------------------------------------------------------------- kernels
def _modules(w, dtype):
    return [quant.Int8Weight.from_float(w, dtype=dtype)] + [
        quant.Int4Weight.from_float(w, dtype=dtype, group_size=g) for g in (32, 64, 128) if w.shape[1] % g == 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 7, 20])  # 2 x 20 rows: int8 takes the prefill path (dequantise + bf16 GEMM)
def test_cpu_kernels_match_dequantise_then_matmul(shape, tokens, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape)
    x = torch.randn(2, tokens, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    for m in _modules(w, dtype):
        # the oracle, written out here: dequantised W (fp32) and the bf16 activations the fast kernels take
        if m.mode == "int8":
            wd = m.qweight.float() * m.scales.float()[:, None]
        else:
            qv = quant.unpack_int4(m.qweight).float().view(shape[0], -1, m.group_size)
            wd = ((qv - 8) * m.scales.float()[..., None] + m.zeros.float()[..., None]).view(shape)
        expected = F.linear(x.to(torch.bfloat16).float(), wd, bias.float())
        quant.bind_cpu(m, policy="aten")
        assert m.kernel_name.startswith("aten._weight_int")
        y = m(x, bias)
        assert y.shape == (2, tokens, shape[0]) and y.dtype == dtype
        assert rel_err(y, expected) < 1.5e-2, (m.mode, m.kernel_name)


def test_int4_cpu_layout_replaces_the_stored_nibbles_and_gives_them_back():
    w = torch.randn(64, 256)
    m = quant.Int4Weight.from_float(w, group_size=64)
    stored = m.qweight.clone()
    quant.bind_cpu(m, policy="aten")
    assert m.qweight.numel() == 0  # one copy of the weight, not two
    assert torch.equal(m.stored_qweight(), stored)
    assert torch.equal(m.state_dict()["qweight"], stored)


def test_int8_prefill_rows_go_through_the_bf16_scratch_and_decode_rows_do_not(monkeypatch):
    calls = []
    scratch = quant._bf16_scratch
    monkeypatch.setattr(quant, "_bf16_scratch", lambda *a: calls.append(a) or scratch(*a))
    m = quant.Int8Weight.from_float(torch.randn(96, 128), dtype=torch.bfloat16)
    quant.bind_cpu(m, policy="aten")
    m(torch.randn(quant.PREFILL_ROWS - 1, 128, dtype=torch.bfloat16))
    assert calls == []
    m(torch.randn(quant.PREFILL_ROWS, 128, dtype=torch.bfloat16))
    assert calls == [(96, 128)]


@pytest.mark.parametrize("rows", [128, 80])  # 128: the layout read directly; 80 (a tail block): the kernel route
def test_int4_stored_nibbles_come_back_from_the_cpu_layout(rows):
    q = torch.randint(0, 16, (rows, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
    m = quant.Int4Weight(rows, 256, torch.float32, group_size=64)
    m.qweight, m.scales, m.zeros = quant.pack_int4(q), torch.ones(rows, 4), torch.zeros(rows, 4)
    quant.bind_cpu(m, policy="aten")
    assert quant._cpu_int4_layout_known()
    assert torch.equal(quant._unpack_cpu_int4(m).to(torch.int32), q)


def test_int4_cpu_layout_packed_in_row_blocks_equals_packed_at_once():
    q = torch.randint(0, 16, (2048 + 80, 128), dtype=torch.int32)
    m = quant.Int4Weight(q.shape[0], 128, torch.float32, group_size=64)
    m.qweight, m.scales, m.zeros = quant.pack_int4(q), torch.ones(q.shape[0], 2), torch.zeros(q.shape[0], 2)
    quant.bind_cpu(m, policy="aten")
    assert torch.equal(m.cpu_packed[0], torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))


def test_the_int8_cpu_kernel_takes_unaligned_weights_and_activations():
    """aten._weight_int8pack_mm segfaulted here on operands not 32-byte aligned (a qweight read from safetensors is
    8-byte aligned; the MoE dispatch passes slices of rows): the binding runs it on aligned copies."""
    buf = torch.randint(-127, 128, (64 * 64 + 8,), dtype=torch.int8)
    m = quant.Int8Weight(64, 64, torch.bfloat16)
    m.qweight, m.scales = buf[8:].view(64, 64), torch.rand(64).to(torch.bfloat16)
    expected_w = m.qweight.float() * m.scales.float()[:, None]
    quant.bind_cpu(m, policy="aten")
    assert m.kernel_name.startswith("aten._weight_int8pack_mm")
    x = torch.randn(7 * 64 + 8).to(torch.bfloat16)[8:].view(7, 64)  # starts 16 bytes off
    assert rel_err(m(x), F.linear(x.float(), expected_w)) < 1e-2


def test_an_input_width_the_cpu_int8_kernel_cannot_take_runs_the_reference():
    m = quant.Int8Weight.from_float(torch.randn(64, 40))  # rows of 40: not a multiple of 16 (it segfaulted)
    quant.bind_cpu(m, policy="aten")
    assert m.kernel_name == "dequantise + matmul"
    x = torch.randn(7, 40)
    assert torch.allclose(m(x), F.linear(x, m.dequantize()), atol=1e-5)


def test_an_output_width_the_cpu_int4_layout_cannot_take_runs_the_reference():
    m = quant.Int4Weight.from_float(torch.randn(40, 64), group_size=32)
    quant.bind_cpu(m, policy="aten")
    assert m.kernel_name == "dequantise + matmul"
    x = torch.randn(3, 64)
    assert torch.allclose(m(x), F.linear(x, m.dequantize()), atol=1e-5)


def test_gradient_flows_to_the_input_through_a_quantised_weight():
    w = torch.randn(32, 64)
    m = quant.Int8Weight.from_float(w)
    quant.bind_cpu(m, policy="aten")
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, m.dequantize().sum(0).expand(4, -1), atol=1e-4)


# ------------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def fp32_session():
    return moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")


@pytest.mark.parametrize("mode,group,tol", [("int8", None, 0.03), ("int4", 32, 0.35)])
def test_a_quantised_tiny_model_stays_close_to_fp32_and_routes_the_same(fp32_session, mode, group, tol,
                                                                       monkeypatch):
    """Next-token logits of whole prompts: the ATen CPU kernels within 3% (of the largest logit) of the same
    quantised model run as dequantise-then-matmul in fp32 (the oracle), and within ``tol`` of the fp32 model (stated:
    the tiny model's random weights make int4's 16 levels per group cost ~20%); every routing decision unchanged.
    (FBGEMM, int8's default on VNNI CPUs: tests/test_quant_fbgemm.py.)"""
    monkeypatch.setenv("MOEVL_CPU_QUANT_KERNEL", "aten")
    base = fp32_session
    q = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    quant.quantize_model(q.model, mode, group_size=group or quant.GROUP_SIZE)
    oracle = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    quant.quantize_model(oracle.model, mode, group_size=group or quant.GROUP_SIZE)  # unbound: the reference
    moevl.place(q.model, q.device)
    assert len(quant.quantized_weights(q.model)) == 15  # q/k/v/o/gate/up/down x 2 layers + lm_head
    assert all(m.kernel_name.startswith("aten._weight_int") for _, m in quant.quantized_weights(q.model))
    assert all(m.kernel is None for _, m in quant.quantized_weights(oracle.model))
    for prompt in ("What is in the picture?", "Describe the image in detail.", "How many shapes are there?"):
        lb = _next_token_logits(base, prompt)
        lq = _next_token_logits(q, prompt)
        assert rel_err(lq, _next_token_logits(oracle, prompt)) < 0.03, prompt
        assert rel_err(lq, lb) < tol, prompt
        assert [d.to_dict() for d in q.routing_decisions()] == [d.to_dict() for d in base.routing_decisions()]


def _next_token_logits(session, prompt):
    return _all_logits(session, prompt, tokens=1)  # [batch, vocab], fp32


def test_quantised_weights_are_used_by_the_lora_moe_linears(fp32_session):
    q = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32", quantize="int8")
    mlp = q.model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj.weight, quant.Int8Weight) and mlp.gate_proj.num_lora  # experts kept
    assert mlp.gate_proj.lora_A.dtype == torch.float32  # adapters stay in the compute dtype
    assert q.model.model.embed_tokens.weight.dtype == torch.float32
    assert q.model.lm_head.weight.dtype == torch.float32  # the compute dtype, as code that asks expects
    assert not any(isinstance(m, quant.QuantizedWeight) for n, m in q.model.named_modules() if "router" in n)


# ------------------------------------------------------------------------------------------------- save / load
def test_moevl_quantize_saves_packed_weights_that_load_without_fp32_weights(tmp_path, fp32_session):
    from safetensors import safe_open

    from moevl.quantize import quantize_folder

    out = quantize_folder("awaker-tiny-random", tmp_path / "q4", "int4", group_size=32, log=lambda m: None)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_tensor(k).dtype for k in keys if k.startswith("model.layers.0.mlp.up_proj.weight")}
    assert "model.layers.0.mlp.up_proj.weight" not in keys  # no fp32 copy of a base weight
    assert dtypes["model.layers.0.mlp.up_proj.weight.qweight"] == torch.uint8
    assert "model.layers.0.mlp.up_proj.lora_A" in keys  # the experts, in the compute dtype
    assert json.loads((out / "quantization.json").read_text())["mode"] == "int4"

    direct = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    quant.quantize_model(direct.model, "int4", group_size=32)
    moevl.place(direct.model, direct.device)
    loaded = moevl.load(str(out), device="cpu", dtype="fp32")
    types = {type(m) for _, m in quant.quantized_weights(loaded.model)}
    assert types == {quant.Int4Weight}
    assert not [n for n, p in loaded.model.model.named_parameters() if n.endswith("proj.weight")]  # no dense base
    prompt = "What is in the picture?"
    assert torch.equal(_next_token_logits(loaded, prompt), _next_token_logits(direct, prompt))


def test_loading_a_quantised_folder_with_another_mode_is_refused(tmp_path):
    from moevl.quantize import quantize_folder

    out = quantize_folder("awaker-tiny-random", tmp_path / "q8", "int8", log=lambda m: None)
    with pytest.raises(ValueError, match="already quantised to int8"):
        moevl.load(str(out), device="cpu", quantize="int4")


# ------------------------------------------------------------------------------------------------- bad input
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moevl.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (("quantize", "--model", "no/such/folder", "--out", "OUT", "--int8"), "neither a preset"),
    (("quantize", "--model", "awaker-tiny-random", "--out", "OUT", "--int4", "--group-size", "7"), "even group size"),
    (("run", "--model", "awaker-tiny-random", "--device", "cpu", "--quantize", "int3"), "invalid choice"),
])
def test_bad_quantisation_input_is_one_line_and_exit_2(tmp_path, args, needle):
    args = tuple(str(tmp_path / "out") if a == "OUT" else a for a in args)
    res = _cli(*args)
    assert res.returncode == 2
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing partial left


# ------------------------------------------------------------------------------------------------- CPU dense layouts
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES)
def test_onednn_packed_weight_matches_f_linear(shape, dtype, tol):
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    m = quant.OnednnWeight(w)
    for tokens in (1, 9):
        x = torch.randn(2, tokens, shape[1]).to(dtype)
        assert rel_err(m(x, bias), F.linear(x.float(), w.float(), bias.float())) < tol
    assert torch.equal(m.dequantize(dtype), w)


@pytest.mark.parametrize("shape", SHAPES + [(3000, 700)])
def test_openblas_weight_matches_f_linear_for_one_row_and_many(shape):
    torch.manual_seed(0)
    w, bias = torch.randn(shape), torch.randn(shape[0])
    m = quant.OpenblasWeight(w)
    assert m.plain.data_ptr() == w.data_ptr()  # the same storage: no copy of the weight
    for lead in ((1, 1), (1, 7), (3, 1)):  # one row goes through numpy's sgemv, several through oneDNN / F.linear
        x = torch.randn(*lead, shape[1])
        ref = (x.double() @ w.double().t() + bias.double()).float()
        assert rel_err(m(x, bias), ref) < 1e-5 and rel_err(m(x), ref - bias) < 1e-5
    xb = torch.randn(1, shape[1], dtype=torch.bfloat16)  # another activation dtype: computed in that dtype
    assert m(xb).dtype == torch.bfloat16
    x = torch.randn(1, shape[1], requires_grad=True)  # frozen weight: the gradient reaches the input
    m(x).sum().backward()
    assert rel_err(x.grad[0], w.double().sum(0).float()) < 1e-5
    with pytest.raises(ValueError, match="float32"):
        quant.OpenblasWeight(w.to(torch.bfloat16))


def test_the_one_row_lora_gemvs_through_blas_match_the_reference():
    from moevl.kernels import cpu, reference

    torch.manual_seed(0)
    x, w = torch.randn(1, 1, 96), torch.randn(80, 96)
    lora_A, lora_B = torch.randn(3, 8, 96), torch.randn(3, 80, 8)
    expert, scales = torch.tensor([1]), torch.tensor([[0.7, 0.3]])
    want = reference.lora_moe_linear(x, w, None, reference.lora_moe_prepare(lora_A, lora_B, expert, scales))
    saved = quant.ROWVEC_BLAS["lora"]
    try:
        for on in (False, True):
            quant.ROWVEC_BLAS["lora"] = on
            got = cpu.lora_moe_linear(x, quant.OpenblasWeight(w), None, cpu.lora_moe_prepare(lora_A, lora_B, expert,
                                                                                             scales))
            assert rel_err(got, want) < 1e-5, on
    finally:
        quant.ROWVEC_BLAS["lora"] = saved


def _all_logits(session, prompt, tokens=4):
    """The logits of the prompt and of each greedy decode step ([steps, vocab], fp32)."""
    captured = []
    model = session.model
    original = model.logits

    def spy(*a, **k):
        out = original(*a, **k)
        captured.append(out.detach().float().clone())
        return out
    model.logits = spy
    try:
        session.ask(prompt, max_new_tokens=tokens)
    finally:
        del model.logits
    assert captured, "the session computed no logits"
    return torch.cat(captured)


@pytest.mark.parametrize("layout,kind", [("onednn", quant.OnednnWeight), ("openblas", quant.OpenblasWeight)])
def test_the_cpu_layouts_are_a_plain_weight_to_the_outside(fp32_session, layout, kind):
    q = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    assert quant.choose_dense_layouts(q.model) == {}  # "auto": small weights are never timed nor packed
    before = {k: v.clone() for k, v in q.model.state_dict().items()}
    saved = quant.ROWVEC_BLAS["lora"]
    try:
        chosen = quant.choose_dense_layouts(q.model, layout)
        assert set(chosen.values()) == {layout} and len(chosen) == 15
        assert isinstance(q.model.model.layers[0].mlp.up_proj.weight, kind)
        assert isinstance(q.model.lm_head.weight, kind)
        assert quant.ROWVEC_BLAS["lora"] == (layout == "openblas")
        after = q.model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
        prompt = "What is in the picture?"
        assert rel_err(_next_token_logits(q, prompt), _next_token_logits(fp32_session, prompt)) < 1e-4
        got, want = _all_logits(q, prompt), _all_logits(fp32_session, prompt)  # prefill + one-row decode steps
        assert got.shape == want.shape and got.shape[0] > 1 and rel_err(got, want) < 1e-4
    finally:
        quant.ROWVEC_BLAS["lora"] = saved
    assert quant.restore_dense(q.model) == 15
    assert isinstance(q.model.lm_head, torch.nn.Linear) and isinstance(q.model.lm_head.weight, torch.nn.Parameter)
    assert torch.equal(q.model.lm_head.weight, before["lm_head.weight"])


def test_a_quantised_model_is_not_exported_and_a_packed_one_is_traced_plain(tmp_path):
    from moevl.export.onnx import ExportError, export_onnx

    q = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32", quantize="int8")
    with pytest.raises(ExportError, match="cannot be exported"):
        export_onnx("awaker-tiny-random", tmp_path / "onnx", session=q, validate=False, log=lambda m: None)
    assert not (tmp_path / "onnx").exists()
    packed = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    quant.choose_dense_layouts(packed.model, "onednn")
    quant.restore_dense(packed.model)
    assert not [m for m in packed.model.modules() if isinstance(m, quant.QuantizedWeight)]


@pytest.mark.parametrize("layout", ["onednn", "openblas"])
def test_an_exported_session_gets_its_weight_layouts_back(layout, tmp_path, monkeypatch):
    """export_onnx traces plain weights; the session it was given runs on with its layouts afterwards (it ran
    plain MKL products before: a 7B-width fp32 decode step took 239 ms after an export, ~125 before)."""
    from moevl.export.onnx import export_onnx

    if layout == "openblas" and not quant.blas_rowvec_usable():
        pytest.skip("numpy's BLAS is not usable for one-row products here")
    s = moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")
    chosen = quant.choose_dense_layouts(s.model, layout)
    kind = quant.OnednnWeight if layout == "onednn" else quant.OpenblasWeight
    assert chosen and isinstance(s.model.lm_head.weight, kind)
    prompt = "What is in the picture?"
    before = _all_logits(s, prompt)
    export_onnx("awaker-tiny-random", tmp_path / "onnx", session=s, validate=False, log=lambda m: None)
    assert s.model.dense_layouts == chosen and isinstance(s.model.lm_head.weight, kind)
    assert sum(isinstance(m, kind) for m in s.model.modules()) == len(chosen)
    assert torch.equal(_all_logits(s, prompt), before)
    # also when the export fails half-way through tracing
    import moevl.export.onnx as onnx_export

    def broken(*a, **k):
        raise RuntimeError("tracing failed")
    monkeypatch.setattr(onnx_export, "_export_graph", broken)
    with pytest.raises(RuntimeError, match="tracing failed"):
        export_onnx("awaker-tiny-random", tmp_path / "again", session=s, validate=False, log=lambda m: None)
    assert isinstance(s.model.lm_head.weight, kind) and not (tmp_path / "again").exists()
    assert torch.equal(_all_logits(s, prompt), before)


def test_int4_with_the_ort_backend_is_refused_before_loading(tmp_path):
    res = _cli("run", "--backend", "ort", "--model", str(tmp_path / "no-export"), "--quantize", "int4")
    assert res.returncode == 2 and "use --quantize int8, or int4 with --backend torch" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantising_by_row_blocks_equals_quantising_at_once(mode, monkeypatch):
    # large weights (lm_head) are quantised a block of rows at a time into the whole outputs: the same numbers as
    # one pass over every row (a row's quantisation depends on that row only)
    from moevl.kernels import quant

    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(0))
    fn = quant.quantize_int8 if mode == "int8" else quant.quantize_int4
    whole = fn(w)
    monkeypatch.setattr(quant, "ROWS_PER_CHUNK", 64)  # 200 rows: blocks of 64, 64, 64, 8
    blocks = fn(w)
    assert len(whole) == len(blocks)
    for a, b in zip(whole, blocks):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
