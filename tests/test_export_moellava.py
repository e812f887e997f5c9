"""ONNX export of MoE-LLaVA (moellava-tiny: Phi-2 flavour + CLIP; and a StableLM-2 + SigLIP checkpoint folder):
contract, ATC op check, ONNX Runtime parity per graph, expert choices, whole-generation token equality, CLI.

Tolerances (relative to max(1, max |PyTorch|)): fp32 1e-4 (observed ~1e-6), fp16 1e-2 (observed ~1e-3);
greedy tokens and per-token expert choices must be equal.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from moevl.export.check import check_onnx_dir
from moevl.export.graph import TOLERANCE, ExportError, read_contract
from moevl.export.onnx import export_onnx
from moevl.export.session import open_om, open_ort
from moevl.export.validate import greedy_tokens
from moevl import load
from moevl.model.tiny import DEMO_IMAGE
from tests import moe_llava_fixtures as fx

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def torch_session():
    return load("moellava-tiny-random", device="cpu")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, torch_session):
    out = tmp_path_factory.mktemp("export") / "moellava-tiny-onnx"
    return export_onnx("moellava-tiny-random", out, session=torch_session, **QUIET)


@pytest.fixture(scope="module")
def ort_session(onnx_dir):
    return open_ort(onnx_dir)


def test_contract_names_every_graph_input_and_output(onnx_dir):
    c = read_contract(onnx_dir)
    assert c["family"] == "moe-llava" and c["dtype"] == "fp32" and c["opset"] == 17
    for name, g in c["graphs"].items():
        model = onnx.load(str(onnx_dir / g["file"]))
        assert [i.name for i in model.graph.input] == [t["name"] for t in g["inputs"]], name
        assert [o.name for o in model.graph.output] == [t["name"] for t in g["outputs"]], name
        for t, vi in zip(g["inputs"] + g["outputs"], list(model.graph.input) + list(model.graph.output)):
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert dims == t["shape"], (name, t["name"])
    g = c["graphs"]
    assert g["vision"]["inputs"] == [{"name": "pixel_values", "dtype": "float32",
                                      "shape": ["num_images", 3, 56, 56]}]
    assert [t["name"] for t in g["embedding"]["inputs"]] == ["input_ids", "image_features"]
    dec = g["decoder"]
    assert [t["name"] for t in dec["inputs"]][:4] == ["inputs_embeds", "attention_keep", "position_ids",
                                                      "past_key_values.0.key"]
    assert dec["inputs"][2]["shape"] == ["batch", "seq"]  # 1-D positions (not M-RoPE)
    assert dec["inputs"][3] == {"name": "past_key_values.0.key", "dtype": "float32",
                                "shape": ["batch", 4, "past_seq", 16]}
    assert dec["outputs"][:2] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 512]},
                                  {"name": "moe_experts", "dtype": "int64", "shape": [2, "batch", "seq", 2]}]
    assert len(dec["outputs"]) == 2 + 2 * 3
    assert c["moe"]["layers"] == [0, 2] and c["moe"]["top_k"] == 2 and c["moe"]["routing"] == "deterministic"
    assert c["special_tokens"]["image_token_index"] == -200 and c["routing"] is None
    assert c["image_processor"]["crop_size"] == {"height": 56, "width": 56}
    assert c["config"]["arch"] == "phi" and c["validation"]["greedy"]["equal"]


def test_graphs_pass_the_atc_op_check_with_a_constant_k_topk(onnx_dir):
    report = check_onnx_dir(onnx_dir)
    assert report.ok, report.problems
    ops = {g.name: set(g.ops) for g in report.graphs}
    assert "TopK" in ops["decoder"] and "MatMul" in ops["decoder"]  # routing; the dense experts
    assert "CumSum" in ops["embedding"]
    assert not set().union(*ops.values()) & {"NonZero", "ScatterND", "If", "Loop", "Einsum"}


def test_validation_errors_are_within_the_stated_bound(onnx_dir):
    v = read_contract(onnx_dir)["validation"]
    assert set(v["graphs"]) == {"vision.image_features", "embedding.inputs_embeds", "decoder.prefill_logits",
                                "decoder.decode_logits"}
    for name, e in v["graphs"].items():
        assert e["max_rel"] <= TOLERANCE["fp32"], name
    assert v["experts_equal"]


def test_image_and_text_only_requests_generate_the_pytorch_tokens_and_experts(torch_session, ort_session):
    batch = torch_session.prepare(["Describe the image.", "Is it a circle?"], [[str(DEMO_IMAGE)], []])
    assert batch.pixels.shape[0] == 1 and batch.attention_mask.sum(-1).unique().numel() == 2
    assert greedy_tokens(ort_session, batch, 10) == greedy_tokens(torch_session, batch, 10)
    want = [d.to_dict() for d in torch_session.routing_decisions()]
    assert [d.to_dict() for d in ort_session.routing_decisions()] == want
    assert [d["layer"] for d in want] == [0, 2]


def test_sampled_ask_matches_pytorch_through_model_generate(torch_session, onnx_dir):
    ort = open_ort(onnx_dir)  # picked by the contract's family
    assert ort.family == "moe-llava" and type(ort.io).__module__.endswith("builders.moe_llava")
    gen = dict(max_new_tokens=10, temperature=0.8, top_k=50, seed=4)
    want = torch_session.ask("What is in the picture?", images=[str(DEMO_IMAGE)], **gen)
    got = ort.ask("What is in the picture?", images=[str(DEMO_IMAGE)], **gen)
    assert got.token_ids == want.token_ids and got.texts == want.texts


def test_fp16_export_validates_within_its_tolerance(tmp_path):
    out = export_onnx("moellava-tiny-random", tmp_path / "fp16", dtype="fp16", validate_tokens=4, **QUIET)
    c = read_contract(out)
    assert c["dtype"] == "fp16" and c["graphs"]["decoder"]["inputs"][0]["dtype"] == "float16"
    assert all(e["max_rel"] <= TOLERANCE["fp16"] for e in c["validation"]["graphs"].values())
    assert c["validation"]["greedy"]["equal"]


def test_stablelm_siglip_checkpoint_folder_exports_and_runs_without_its_tower_folder(tmp_path):
    """StableLM-2 (sequential block, SwiGLU experts, partial rotary 0.25, GQA 4/2 heads) + SigLIP, MoE on layer 0:
    exported from an original-layout folder + a tower folder; the export carries the image processor settings."""
    lm, tower = fx.tiny_stablelm(), fx.tiny_siglip()
    tower_dir = fx.write_tower_folder(tower, tmp_path / "siglip", "siglip")
    moe = fx.make_moe_weights(lm, "stablelm", (0,), experts="random")
    sd = fx.original_state_dict(lm, "stablelm", moe, fx.random_projector(lm.config.hidden_size))
    folder = fx.write_original_folder(tmp_path / "ckpt", fx.original_config(lm, "stablelm", (0,), kind="siglip"), sd)
    out = export_onnx(folder, tmp_path / "onnx", vision_tower=tower_dir, validate_tokens=6, **QUIET)
    c = read_contract(out)
    assert c["config"]["arch"] == "stablelm" and c["config"]["vision"]["kind"] == "siglip"
    assert c["graphs"]["decoder"]["inputs"][3]["shape"] == ["batch", 2, "past_seq", 16]
    assert c["vision"]["num_image_tokens_per_image"] == 15  # SigLIP: token 0 dropped as the original does
    assert c["validation"]["experts_equal"] and c["validation"]["greedy"]["equal"]
    assert not (out / "preprocessor_config.json").exists()
    ort = open_ort(out)
    torch_s = load(folder, device="cpu", vision_tower=tower_dir)
    batch = torch_s.prepare(["Describe.", "A much longer question without any image at all?"],
                            [[str(DEMO_IMAGE)], []])
    assert torch.equal(ort.prepare(["Describe.", "A much longer question without any image at all?"],
                                   [[str(DEMO_IMAGE)], []]).pixels, batch.pixels)
    assert greedy_tokens(ort, batch, 8) == greedy_tokens(torch_s, batch, 8)


def test_deepspeed_routing_is_refused_and_leaves_no_folder(tmp_path):
    with pytest.raises(ExportError, match="deterministic"):
        export_onnx("moellava-tiny-random", tmp_path / "out", moe_routing="deepspeed", **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_cli_run_backend_ort_gives_the_torch_answer(onnx_dir, capsys):
    from moevl.cli import main

    args = ["run", "--image", str(DEMO_IMAGE), "--max-new-tokens", "5", "--json"]
    assert main(args + ["--model", "moellava-tiny-random", "--device", "cpu"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(args + ["--backend", "ort", "--model", str(onnx_dir)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["family"] == "moe-llava" and got["device"]["chip"] == "CPUExecutionProvider"
    assert got["dtype"] == "fp32" and len(got["token_ids"]) == 5
    assert (got["token_ids"], got["text"], got["routing"]) == (want["token_ids"], want["text"], want["routing"])
    assert main(["export", "check", str(onnx_dir)]) == 0
    capsys.readouterr()
    assert main(["run", "--backend", "ort", "--model", str(onnx_dir), "--moe-routing", "deepspeed"]) != 0
    assert "deepspeed is PyTorch-only" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- int8
def test_router_nodes_are_the_constant_weight_matmuls_that_feed_a_topk():
    from onnx import TensorProto, helper, numpy_helper

    from moevl.export.ort import router_nodes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])
    w = [numpy_helper.from_array(np.ones(shape, np.float32), name) for name, shape in
         (("w_gate", (8, 4)), ("w_attn", (8, 8)), ("w_up", (8, 8)))]
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    nodes = [helper.make_node("MatMul", ["x", "w_gate"], ["logits"], name="/mlp/MatMul"),  # gate -> Softmax -> TopK
             helper.make_node("Softmax", ["logits"], ["probs"]),
             helper.make_node("TopK", ["probs", "k"], ["top", "idx"]),
             helper.make_node("MatMul", ["x", "w_attn"], ["s"], name="attn"),           # Softmax, but no TopK
             helper.make_node("Softmax", ["s"], ["a"]),
             helper.make_node("MatMul", ["a", "w_up"], ["y"], name="up"),
             helper.make_node("MatMul", ["x", "a"], ["z"], name="dynamic"),             # no constant weight
             helper.make_node("TopK", ["z", "k"], ["zt", "zi"]),
             helper.make_node("MatMul", ["x", "w_up"], ["r"], name="/layers.0/router/MatMul")]  # Awaker's naming
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=w + [k])
    assert router_nodes(graph) == ["/mlp/MatMul", "/layers.0/router/MatMul"]


def test_int8_decoder_quantises_the_experts_but_not_the_routers(onnx_dir):
    q = open_ort(onnx_dir, quantize="int8")
    assert q.describe()["quantize"] == "int8" and (onnx_dir / "decoder.int8.onnx").is_file()
    model = onnx.load(str(onnx_dir / "decoder.int8.onnx"))
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    by_op: dict[str, list] = {}
    for n in model.graph.node:
        by_op.setdefault(n.op_type, []).append(n)
    # the routers: fp32 MatMuls on the [hidden, num_experts] gate weight, one per MoE layer, feeding Softmax -> TopK
    routers = [n for n in by_op["MatMul"] if inits.get(n.input[1]) == [64, 4]]
    assert [n.name for n in routers] == ["/model/layers.0/mlp/MatMul", "/model/layers.2/mlp/MatMul"]
    assert not any(inits.get(n.input[1]) == [64, 4] for n in by_op["MatMulInteger"])
    # the experts ([E, H, F] and [E, F, H] weights), attention and lm_head are int8
    int8_shapes = [inits[n.input[1]] for n in by_op["MatMulInteger"]]
    assert int8_shapes.count([4, 64, 128]) == 2 and int8_shapes.count([4, 128, 64]) == 2
    assert [64, 512] in int8_shapes and len(by_op["TopK"]) == 2


def test_int8_is_refused_unless_one_router_per_moe_layer_is_found(onnx_dir, tmp_path):
    import shutil

    from moevl.export.ort import quantize_decoder

    shutil.copy(onnx_dir / "decoder.onnx", tmp_path / "decoder.onnx")
    contract = read_contract(onnx_dir)
    contract["moe"]["layers"] = [0, 1, 2]  # a third MoE layer whose router the graph does not have
    with pytest.raises(ValueError, match="found 2 router MatMuls .* expected one per MoE layer \\(3\\)"):
        quantize_decoder(tmp_path, contract, **QUIET)
    assert not (tmp_path / "decoder.int8.onnx").exists()


def test_int8_keeps_the_expert_choices_and_the_first_tokens(torch_session, onnx_dir):
    from moevl.export.builders.moe_llava import int8_agreement
    from moevl.export.validate import sample_batch

    report = int8_agreement(onnx_dir, sample_batch(torch_session), tokens=8)
    # observed on moellava-tiny (random weights): top-1 experts all equal, top-2 sets 98.9%; tokens diverge late
    assert report["top1_expert_agreement"] >= 0.97 and report["topk_set_agreement"] >= 0.95
    assert report["routed_tokens"] == 2 * (int(sample_batch(torch_session).attention_mask.sum()) + 2 * 7)
    assert all(d is None or d >= 3 for d in report["first_divergence"])


def test_cli_run_backend_ort_quantize_int8(onnx_dir, capsys):
    from moevl.cli import main

    assert main(["run", "--backend", "ort", "--quantize", "int8", "--model", str(onnx_dir), "--image",
                 str(DEMO_IMAGE), "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "moe-llava" and out["device"]["quantize"] == "int8" and len(out["token_ids"]) == 4
    assert [d["layer"] for d in out["routing"]] == [0, 2]


# ---------------------------------------------------------------------------------------------- OM
GEARS = {"prefill": [64, 160], "decode": [128, 256], "images": [1, 2, 4]}


def test_atc_command_lines_for_moe_llava(onnx_dir):
    """Expected strings written by hand from the ATC docs: 1-D position_ids, no router_input, NCHW image input with an
    image-count gear, feature rows = images x 16 tokens."""
    import shlex

    from moevl.export.om import atc_command, om_graphs

    graphs = {g.name: g for g in om_graphs(read_contract(onnx_dir), GEARS, batch=1)}
    assert list(graphs) == ["vision", "embedding", "decoder_prefill", "decoder_decode"]
    assert shlex.join(atc_command(graphs["vision"], "/m", "/o", "Ascend910B2", "origin")) == (
        "atc --framework=5 --model=/m/vision.onnx --output=/o/vision --soc_version=Ascend910B2 --input_format=NCHW "
        "--input_shape=pixel_values:-1,3,56,56 '--dynamic_dims=1;2;4' --precision_mode_v2=origin --log=error")
    assert atc_command(graphs["embedding"], "/m", "/o", "Ascend310P3", "fp16")[5:8] == [
        "--input_format=ND", "--input_shape=input_ids:1,-1;image_features:-1,64",
        "--dynamic_dims=1,1;1,16;1,32;1,64;64,1;64,16;64,32;64,64;160,1;160,16;160,32;160,64"]
    past = ";".join(f"past_key_values.{i}.{k}:1,4,-1,16" for i in range(3) for k in ("key", "value"))
    assert atc_command(graphs["decoder_prefill"], "/m", "/o", "Ascend910B2", "mixed_float16", "/o/mix.json")[5:] == [
        "--input_format=ND",
        "--input_shape=inputs_embeds:1,-1,64;attention_keep:1,1,-1,-1;position_ids:1,-1;" + past.replace("-1", "1"),
        "--dynamic_dims=64,64,65,64;160,160,161,160", "--precision_mode_v2=mixed_float16",
        "--modify_mixlist=/o/mix.json", "--log=error"]
    assert atc_command(graphs["decoder_decode"], "/m", "/o", "Ascend910B2", "origin")[6:8] == [
        f"--input_shape=inputs_embeds:1,1,64;attention_keep:1,1,1,-1;position_ids:1,1;{past}",
        "--dynamic_dims=129,128,128,128,128,128,128;257,256,256,256,256,256,256"]
    # one images gear: a static vision model (no --dynamic_dims)
    one = {g.name: g for g in om_graphs(read_contract(onnx_dir), dict(GEARS, images=[1]))}["vision"]
    assert atc_command(one, "/m", "/o", "Ascend910B2", "origin")[5:8] == [
        "--input_format=NCHW", "--input_shape=pixel_values:1,3,56,56", "--precision_mode_v2=origin"]


def test_build_om_writes_the_script_and_the_cli_accepts_a_moe_llava_folder(onnx_dir, tmp_path, capsys):
    from moevl.cli import main

    out = tmp_path / "om"
    assert main(["export", "om", "--onnx", str(onnx_dir), "--soc", "Ascend910B2", "--out", str(out),
                 "--gears", "prefill=64,160", "--gears", "decode=128,256", "--gears", "images=1,2,4"]) == 0
    script = (out / "build_om.sh").read_text()
    assert script.count("\natc --framework=5") == 4 and "router_input" not in script
    cfg = json.loads((out / "om_config.json").read_text())
    assert cfg["contract"]["family"] == "moe-llava" and cfg["hardware_verified"] is False
    assert cfg["graphs"]["vision"]["input_format"] == "NCHW"
    capsys.readouterr()
    assert main(["run", "--backend", "om", "--model", str(out)]) == 1  # no ais_bench here: an error, not a trace
    assert "ais_bench" in capsys.readouterr().err


def test_om_loop_over_gear_shaped_sessions_matches_ort(onnx_dir, ort_session, tmp_path):
    from moevl.export.graph import GearError
    from moevl.export.om import build_om

    om = open_om(build_om(onnx_dir, tmp_path / "om", soc="Ascend910B2", gears=GEARS, **QUIET), emulated=True)
    batch = ort_session.prepare(["Describe the image."], [[str(DEMO_IMAGE)]])
    assert batch.input_ids.shape[1] == 119
    assert greedy_tokens(om, batch, 12) == greedy_tokens(ort_session, batch, 12)
    assert [d.to_dict() for d in om.routing_decisions()] == [d.to_dict() for d in ort_session.routing_decisions()]
    calls = {n: r.calls for n, r in om.runner.runners.items()}
    assert calls["vision"] == [(1,)] and calls["embedding"][0] == (160, 16)  # 119 tokens -> the 160 gear
    assert calls["decoder_prefill"] == [(160, 160, 161, 160)]
    # KV 119..129 over 11 decode steps: the 128 gear, then 256 once the cache passes 128
    assert calls["decoder_decode"] == [(129,) + (128,) * 6] * 10 + [(257,) + (256,) * 6]
    # three images: padded to the 4-image gear, 48 feature rows to the 64-row gear
    three = ort_session.prepare(["Compare them."], [[str(DEMO_IMAGE)] * 3])
    assert greedy_tokens(om, three, 4) == greedy_tokens(ort_session, three, 4)
    assert om.runner.runners["vision"].calls[-1] == (4,) and om.runner.runners["embedding"].calls[-4] == (160, 64)
    text = ort_session.prepare(["What colour is the circle?"])
    assert greedy_tokens(om, text, 6) == greedy_tokens(ort_session, text, 6)
    with pytest.raises(GearError, match="largest gear"):
        om.ask("Describe.", images=[str(DEMO_IMAGE)] * 5, max_new_tokens=2)
