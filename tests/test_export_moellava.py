"""ONNX export of MoE-LLaVA (moellava-tiny: Phi-2 flavour + CLIP; and a StableLM-2 + SigLIP checkpoint folder):
contract, ATC op check, ONNX Runtime parity per graph, expert choices, whole-generation token equality, CLI.

Tolerances (relative to max(1, max |PyTorch|)): fp32 1e-4 (observed ~1e-6), fp16 1e-2 (observed ~1e-3);
greedy tokens and per-token expert choices must be equal.
"""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from export.check import check_onnx_dir
from export.moe_llava_onnx import OrtMoeLlavaSession
from export.onnx_export import TOLERANCE, ExportError, export_onnx, read_contract
from export.runtime import open_ort_session
from export.validate import greedy_tokens
from model.api import load
from model.tiny import DEMO_IMAGE
from tests import moe_llava_fixtures as fx

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def torch_session():
    return load("moellava-tiny", device="cpu")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, torch_session):
    out = tmp_path_factory.mktemp("export") / "moellava-tiny-onnx"
    return export_onnx("moellava-tiny", out, session=torch_session, **QUIET)


@pytest.fixture(scope="module")
def ort_session(onnx_dir):
    return OrtMoeLlavaSession(onnx_dir)


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
    ort = open_ort_session(onnx_dir)  # picked by the contract's family
    assert isinstance(ort, OrtMoeLlavaSession)
    gen = dict(max_new_tokens=10, temperature=0.8, top_k=50, seed=4)
    want = torch_session.ask("What is in the picture?", images=[str(DEMO_IMAGE)], **gen)
    got = ort.ask("What is in the picture?", images=[str(DEMO_IMAGE)], **gen)
    assert got.token_ids == want.token_ids and got.texts == want.texts


def test_fp16_export_validates_within_its_tolerance(tmp_path):
    out = export_onnx("moellava-tiny", tmp_path / "fp16", dtype="fp16", validate_tokens=4, **QUIET)
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
    ort = OrtMoeLlavaSession(out)
    torch_s = load(folder, device="cpu", vision_tower=tower_dir)
    batch = torch_s.prepare(["Describe.", "A much longer question without any image at all?"],
                            [[str(DEMO_IMAGE)], []])
    assert torch.equal(ort.prepare(["Describe.", "A much longer question without any image at all?"],
                                   [[str(DEMO_IMAGE)], []]).pixels, batch.pixels)
    assert greedy_tokens(ort, batch, 8) == greedy_tokens(torch_s, batch, 8)


def test_deepspeed_routing_is_refused_and_leaves_no_folder(tmp_path):
    with pytest.raises(ExportError, match="deterministic"):
        export_onnx("moellava-tiny", tmp_path / "out", moe_routing="deepspeed", **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_cli_run_backend_ort_gives_the_torch_answer(onnx_dir, capsys):
    from model.cli import main

    args = ["run", "--image", str(DEMO_IMAGE), "--max-new-tokens", "5", "--json"]
    assert main(args + ["--model", "moellava-tiny", "--device", "cpu"]) == 0
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


def test_om_build_says_it_is_awaker_only(onnx_dir, tmp_path):
    from export.om import build_om

    with pytest.raises(ValueError, match="Awaker exports only"):
        build_om(onnx_dir, tmp_path / "om", **QUIET)
