"""ONNX export of awaker-tiny: contract, ATC op check, ONNX Runtime parity, generation, atomic output, OM gears.

Tolerances (relative to max(1, max |PyTorch|)): fp32 1e-4 (observed < 1e-6), fp16 1e-2 (observed ~1e-3);
greedy tokens must be equal in both.
"""
from __future__ import annotations

import json
import shlex

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from moevl.export.check import check_onnx_dir
from moevl.export.graph import GearError
from moevl.export.om import atc_command, build_om, om_graphs
from moevl.export.graph import CONTRACT, TOLERANCE, read_contract
from moevl.export.onnx import export_onnx
from moevl.export.graph import ProviderError
from moevl.export.ort import make_session
from moevl.export.session import open_om, open_ort
from moevl.export.validate import ValidationError, greedy_tokens
from moevl import load
from moevl.model.tiny import DEMO_IMAGE
from tests.awaker_fixtures import non_square_image

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def torch_session():
    return load("awaker-tiny-random", device="cpu")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, torch_session):
    out = tmp_path_factory.mktemp("export") / "awaker-tiny-onnx"
    return export_onnx("awaker-tiny-random", out, session=torch_session, **QUIET)


@pytest.fixture(scope="module")
def ort_session(onnx_dir):
    return open_ort(onnx_dir)


def test_contract_names_every_graph_input_and_output(onnx_dir):
    c = read_contract(onnx_dir)
    assert c["family"] == "awaker" and c["dtype"] == "fp32" and c["opset"] == 17
    assert "dynamo=False" in c["exporter"]  # the TorchScript exporter still works on this torch
    assert set(c["graphs"]) == {"vision", "embedding", "decoder"}
    for name, g in c["graphs"].items():
        model = onnx.load(str(onnx_dir / g["file"]))
        assert [i.name for i in model.graph.input] == [t["name"] for t in g["inputs"]], name
        assert [o.name for o in model.graph.output] == [t["name"] for t in g["outputs"]], name
        for t, vi in zip(g["inputs"], model.graph.input):
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert dims == t["shape"], (name, t["name"])
    dec = c["graphs"]["decoder"]
    assert [t["name"] for t in dec["inputs"]][:4] == ["inputs_embeds", "attention_keep", "position_ids",
                                                      "router_input"]
    assert dec["inputs"][4] == {"name": "past_key_values.0.key", "dtype": "float32",
                                "shape": ["batch", 2, "past_seq", 16]}
    assert dec["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 512]}
    assert c["routing"]["input"] == "router_input" and c["special_tokens"]["image_token_id"] == 5
    assert {"tokenizer.json", "preprocessor_config.json"} <= set(c["processor_files"])
    assert c["validation"]["greedy"]["equal"]


def test_graphs_pass_the_atc_op_check(onnx_dir):
    report = check_onnx_dir(onnx_dir)
    assert report.ok, report.problems
    ops = {op for g in report.graphs for op in g.ops}
    assert not ops & {"NonZero", "ScatterND", "If", "Loop", "Einsum", "TopK"}
    assert "MatMul" in ops and "CumSum" in ops


def _graph_with(op_nodes, inputs, initializers=()):
    g = helper.make_graph(op_nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_check_fails_on_forbidden_unknown_and_dynamic_topk(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    bad = _graph_with([helper.make_node("NonZero", ["x"], ["nz"]),
                       helper.make_node("TopK", ["x", "k"], ["y", "i"]),
                       helper.make_node("Gelu", ["x"], ["g"])], [x, k])
    onnx.save(bad, tmp_path / "bad.onnx")
    good = _graph_with([helper.make_node("TopK", ["x", "kc"], ["y", "i"])], [x],
                       [helper.make_tensor("kc", TensorProto.INT64, [1], [2])])
    onnx.save(good, tmp_path / "good.onnx")
    report = check_onnx_dir(tmp_path)
    by = {g.name: g for g in report.graphs}
    assert not by["good"].problems
    problems = " | ".join(by["bad"].problems)
    assert "NonZero" in problems and "non-constant K" in problems and "Gelu" in problems
    assert not report.ok


def test_validation_errors_are_within_the_stated_bound(onnx_dir):
    v = read_contract(onnx_dir)["validation"]
    assert set(v["graphs"]) >= {"vision.image_features", "embedding.inputs_embeds", "decoder.prefill_logits",
                                "decoder.decode_logits"}
    for name, e in v["graphs"].items():
        assert e["max_rel"] <= TOLERANCE["fp32"], name


def test_batch_of_two_images_of_different_sizes_generates_the_pytorch_tokens(torch_session, ort_session, tmp_path):
    images = [[str(DEMO_IMAGE)], [str(non_square_image(tmp_path))]]
    questions = ["Describe the image.", "How many shapes are there in this picture?"]
    batch = torch_session.prepare(questions, images)
    assert batch.attention_mask.sum(-1).unique().numel() == 2  # different prompt lengths
    assert greedy_tokens(ort_session, batch, 10) == greedy_tokens(torch_session, batch, 10)
    routing = np.array([[r.attn_expert.tolist(), r.mlp_expert.tolist()] for r in torch_session.last_routing])
    assert np.array_equal(routing, ort_session.last_routing[0])


def test_text_only_ask_matches_pytorch_through_model_generate(torch_session, ort_session):
    want = torch_session.ask("What colour is the circle?", max_new_tokens=12, temperature=0.7, top_k=20, seed=3)
    got = ort_session.ask("What colour is the circle?", max_new_tokens=12, temperature=0.7, top_k=20, seed=3)
    assert got.token_ids == want.token_ids and got.texts == want.texts
    assert got.finish_reasons == want.finish_reasons


def test_fp16_export_validates_within_its_tolerance(tmp_path, torch_session):
    out = export_onnx("awaker-tiny-random", tmp_path / "fp16", dtype="fp16", **QUIET)
    c = read_contract(out)
    assert c["dtype"] == "fp16" and c["graphs"]["decoder"]["inputs"][0]["dtype"] == "float16"
    assert all(e["max_rel"] <= TOLERANCE["fp16"] for e in c["validation"]["graphs"].values())
    assert c["validation"]["greedy"]["equal"]


def test_failing_validation_leaves_no_folder(tmp_path, torch_session, monkeypatch):
    import moevl.export.validate

    def fail(*a, **k):
        raise ValidationError("injected")

    monkeypatch.setattr(moevl.export.validate, "validate_export", fail)
    with pytest.raises(ValidationError):
        export_onnx("awaker-tiny-random", tmp_path / "out", session=torch_session, **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_no_folder(tmp_path, torch_session, monkeypatch):
    import moevl.export.onnx as ex

    real = ex._export_graph

    def interrupted(spec, folder, opset):
        if spec.name == "decoder":
            raise KeyboardInterrupt
        return real(spec, folder, opset)

    monkeypatch.setattr(ex, "_export_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx("awaker-tiny-random", tmp_path / "out", session=torch_session, validate=False, **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_is_refused_and_force_replaces_only_an_export(tmp_path, torch_session):
    # (issue 10: --force used to wipe any folder; it now replaces only an export the kit wrote)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_onnx("awaker-tiny-random", out, session=torch_session, validate=False, **QUIET)
    with pytest.raises(FileExistsError, match="not a moevl ONNX export"):
        export_onnx("awaker-tiny-random", out, session=torch_session, validate=False, force=True, **QUIET)
    assert (out / "keep.txt").read_text() == "mine"
    ours = export_onnx("awaker-tiny-random", tmp_path / "ours", session=torch_session, validate=False, **QUIET)
    export_onnx("awaker-tiny-random", ours, session=torch_session, validate=False, force=True, **QUIET)
    assert (ours / CONTRACT).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]


def test_cann_provider_fails_loudly_when_missing(onnx_dir):
    with pytest.raises(ProviderError, match="CANNExecutionProvider"):
        make_session(onnx_dir / "decoder.onnx", "cann")


def test_int8_decoder_is_cached_and_mostly_agrees(onnx_dir, ort_session):
    q = open_ort(onnx_dir, quantize="int8")
    assert (onnx_dir / "decoder.int8.onnx").is_file()
    batch = ort_session.prepare(["Describe the image."], [[str(DEMO_IMAGE)]])
    ref, got = greedy_tokens(ort_session, batch, 8)[0], greedy_tokens(q, batch, 8)[0]
    assert ref[0] == got[0]  # the first token survives int8 on this model; later ones may diverge
    q2 = open_ort(onnx_dir, quantize="int8")  # from the cache
    assert greedy_tokens(q2, batch, 8)[0] == got


def test_cli_run_backend_ort_prints_the_torch_fields(onnx_dir, capsys):
    from moevl.cli import main

    assert main(["run", "--backend", "ort", "--model", str(onnx_dir), "--image", str(DEMO_IMAGE),
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "token_ids", "ttft_ms", "decode_tokens_per_s", "device", "dtype", "routing"} <= set(out)
    assert out["device"]["chip"] == "CPUExecutionProvider" and len(out["token_ids"]) == 4
    assert main(["export", "check", str(onnx_dir)]) == 0


# ---------------------------------------------------------------------------------------------- OM
GEARS = {"prefill": [32, 64], "decode": [64, 128], "vision": [16, 64]}


def test_atc_command_lines_for_910b2_and_310p3(onnx_dir, tmp_path):
    """Expected strings written by hand from the ATC docs (--framework=5 ONNX, ND, -1 dims + --dynamic_dims)."""
    c = read_contract(onnx_dir)
    graphs = {g.name: g for g in om_graphs(c, GEARS, batch=1)}
    cmd = shlex.join(atc_command(graphs["decoder_decode"], "/m", "/o", "Ascend910B2", "origin"))
    past = ";".join(f"past_key_values.{i}.{k}:1,2,-1,16" for i in range(2) for k in ("key", "value"))
    assert cmd == ("atc --framework=5 --model=/m/decoder.onnx --output=/o/decoder_decode --soc_version=Ascend910B2 "
                   "--input_format=ND '--input_shape=inputs_embeds:1,1,64;attention_keep:1,1,1,-1;position_ids:3,1,1;"
                   f"router_input:1,64;{past}' '--dynamic_dims=65,64,64,64,64;129,128,128,128,128' "
                   "--precision_mode_v2=origin --log=error")
    cmd = atc_command(graphs["decoder_prefill"], "/m", "/o", "Ascend310P3", "mixed_float16", "/o/mixlist.json")
    assert cmd[4] == "--soc_version=Ascend310P3"
    assert cmd[6] == ("--input_shape=inputs_embeds:1,-1,64;attention_keep:1,1,-1,-1;position_ids:3,1,-1;"
                      "router_input:1,64;" + past.replace("-1", "1"))
    assert cmd[7:] == ["--dynamic_dims=32,32,33,32;64,64,65,64", "--precision_mode_v2=mixed_float16",
                       "--modify_mixlist=/o/mixlist.json", "--log=error"]
    assert atc_command(graphs["vision"], "/m", "/o", "Ascend310P3", "fp16")[6:8] == [
        "--input_shape=patches:-1,1176;vision_pos:-1,2;vision_keep:-1,-1", "--dynamic_dims=16,16,16,16;64,64,64,64"]
    assert graphs["embedding"].gears[:3] == [(1, 1, 1), (1, 4, 1), (1, 16, 1)]
    with pytest.raises(ValueError, match="multiples of 4"):
        om_graphs(c, dict(GEARS, vision=[10, 20]))


def test_build_om_without_atc_writes_a_script(onnx_dir, tmp_path):
    out = build_om(onnx_dir, tmp_path / "om", soc="Ascend310P3", precision="mixed_float16", gears=GEARS, **QUIET)
    script = (out / "build_om.sh").read_text()
    assert script.count("\natc --framework=5") == 4 and "--soc_version=Ascend310P3" in script
    assert json.loads((out / "mixlist.json").read_text())["black-list"]["to-add"]
    cfg = json.loads((out / "om_config.json").read_text())
    assert cfg["hardware_verified"] is False and "not run" in cfg["status"]


def test_om_loop_over_gear_shaped_sessions_matches_ort(onnx_dir, ort_session, tmp_path):
    om_dir = build_om(onnx_dir, tmp_path / "om", soc="Ascend910B2", gears=GEARS, **QUIET)
    om = open_om(om_dir, emulated=True)
    batch = ort_session.prepare(["Describe the image."], [[str(DEMO_IMAGE)]])
    assert greedy_tokens(om, batch, 12) == greedy_tokens(ort_session, batch, 12)
    assert om.runner.runners["decoder_prefill"].calls == [(64, 64, 65, 64)]  # 47-token prompt padded to the 64 gear
    assert set(om.runner.runners["decoder_decode"].calls) == {(65,) + (64,) * 4}
    text = ort_session.prepare(["What colour is the circle?"])
    assert greedy_tokens(om, text, 6) == greedy_tokens(ort_session, text, 6)
    with pytest.raises(GearError, match="largest gear"):
        om.ask("Describe the image. " * 20, max_new_tokens=2)


def test_cli_reports_missing_cann_and_ais_bench_as_errors_not_tracebacks(onnx_dir, tmp_path, capsys):
    from moevl.cli import main

    assert main(["run", "--backend", "ort", "--provider", "cann", "--model", str(onnx_dir)]) == 1
    assert "CANNExecutionProvider" in capsys.readouterr().err
    om_dir = build_om(onnx_dir, tmp_path / "om", soc="Ascend910B2", gears=GEARS, **QUIET)
    assert main(["run", "--backend", "om", "--model", str(om_dir)]) == 1
    assert "ais_bench" in capsys.readouterr().err
    assert main(["export", "check", str(tmp_path / "nothing-here")]) == 1
