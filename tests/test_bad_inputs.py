"""The bad-input matrix, driven through the CLI as a user would (a subprocess per row): every row must exit with
status 2, print exactly one line on stderr that names the input, print no traceback, and leave nothing on disk.
Rows that worked before this matrix existed are kept here so that they stay working."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moevl.model.tiny import DEMO_IMAGE

RUN = ["run", "--device", "cpu", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files the rows point at, built once."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty").mkdir()
    (d / "not-an-image.png").write_text("hello")
    bad_st = d / "bad-safetensors"
    bad_st.mkdir()
    (bad_st / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (bad_st / "model.safetensors").write_bytes(b"\x00" * 64)
    no_heads = d / "no-heads"
    no_heads.mkdir()
    (no_heads / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vocab_size": 512}))
    (no_heads / "model.safetensors").write_bytes(b"\x00" * 64)
    no_family = d / "no-family"
    no_family.mkdir()
    (no_family / "moevl_config.json").write_text(json.dumps({"config": {}}))
    from moevl.export.onnx import export_onnx

    onnx_dir = export_onnx("awaker-tiny", d / "onnx", validate=False, log=lambda *a: None)
    corrupt = d / "onnx-corrupt"
    shutil.copytree(onnx_dir, corrupt)
    (corrupt / "decoder.onnx").write_bytes(b"not a protobuf" * 10)
    bad_json = d / "onnx-bad-json"
    shutil.copytree(onnx_dir, bad_json)
    (bad_json / "contract.json").write_text("{ not json")
    from tests.awaker_fixtures import tiny_hf_model, write_hf_folder

    hf = write_hf_folder(tiny_hf_model(), d / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        broken = shutil.copytree(hf, d / f"hf-bad-{name}")
        (broken / name).write_text('{"truncated": ')
    return d


ROWS = [  # (id, argv with {d} = the inputs folder, a word the one line must contain)
    ("missing-folder", ["--model", "{d}/nope"], "neither a preset"),
    ("empty-folder", ["--model", "{d}/empty"], "not a model folder"),
    ("corrupt-safetensors", ["--model", "{d}/bad-safetensors"], "config.json"),
    ("config-without-heads", ["--model", "{d}/no-heads"], "num_attention_heads"),
    ("our-format-without-family", ["--model", "{d}/no-family"], "family"),
    ("missing-image", ["--model", "awaker-tiny", "--image", "{d}/nope.png"], "does not exist"),
    ("unreadable-image", ["--model", "awaker-tiny", "--image", "{d}/not-an-image.png"], "could not be read"),
    ("context-overflow", ["--model", "awaker-tiny", "--max-context", "20"], "context"),
    ("max-context-0", ["--model", "awaker-tiny", "--max-context", "0"], "--max-context"),
    ("temperature-nan", ["--model", "awaker-tiny", "--temperature", "nan"], "--temperature"),
    ("top-p-0", ["--model", "awaker-tiny", "--top-p", "0"], "--top-p"),
    ("seed-2-64", ["--model", "awaker-tiny", "--seed", str(2 ** 64)], "--seed"),
    ("unknown-device", ["--model", "awaker-tiny", "--device", "tpu"], "tpu"),
    ("npu-without-torch-npu", ["--model", "awaker-tiny", "--device", "npu"], "torch_npu"),
    ("base-on-a-preset", ["--model", "awaker-tiny", "--base", "{d}/empty"], "--base"),
    ("corrupt-onnx", ["--backend", "ort", "--model", "{d}/onnx-corrupt"], "decoder.onnx"),
    ("contract-not-json", ["--backend", "ort", "--model", "{d}/onnx-bad-json"], "contract.json"),
    ("device-with-ort", ["--backend", "ort", "--model", "{d}/onnx", "--device", "npu:0"], "--provider"),
    ("legacy-routing-with-ort", ["--backend", "ort", "--model", "{d}/onnx", "--routing", "legacy"], "legacy"),
] + [(f"invalid-json-{name}", ["--model", "{d}/hf-bad-" + name], name + " is not valid JSON")
     for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "special_tokens_map.json",
                  "generation_config.json")]


def _tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moevl.cli", *argv], cwd=cwd, capture_output=True, timeout=300)


def check_one_line(res, word):
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == 2, (res.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert word in lines[0], lines[0]


@pytest.mark.parametrize("row,argv,word", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line_exit_2_and_nothing_left(inputs, tmp_path, row, argv, word):
    before = _tree(inputs)
    argv = RUN + [a.format(d=inputs) for a in argv]
    check_one_line(run_cli(argv, tmp_path), word)
    assert _tree(inputs) == before and list(tmp_path.iterdir()) == []


def test_non_utf8_prompt(tmp_path):
    argv = [a.encode() for a in RUN + ["--model", "awaker-tiny", "--image", str(DEMO_IMAGE), "--prompt"]]
    res = subprocess.run([sys.executable.encode(), b"-m", b"moevl.cli", *argv, b"caf\xe9 \xff"], cwd=tmp_path,
                         capture_output=True, timeout=300)
    check_one_line(res, "UTF-8")


def test_export_check_of_a_corrupt_graph(inputs, tmp_path):
    check_one_line(run_cli(["export", "check", str(inputs / "onnx-corrupt")], tmp_path), "decoder.onnx")


@pytest.mark.parametrize("argv,word", [
    (["--opset", "5"], "--opset"),
    (["--validate-tokens", "0"], "--validate-tokens"),
    (["--dtype", "fp32", "--base", "{d}/empty"], "--base"),
], ids=["opset-5", "validate-tokens-0", "base-on-a-preset"])
def test_bad_export_options(inputs, tmp_path, argv, word):
    argv = ["export", "onnx", "--model", "awaker-tiny", "--out", str(tmp_path / "out")] + [a.format(d=inputs)
                                                                                         for a in argv]
    check_one_line(run_cli(argv, tmp_path), word)
    assert list(tmp_path.iterdir()) == []


# Every refusal that suggests an alternative: the alternative must work. (refused argv, the argv the message
# suggests, a word of the suggestion in the message); {d} = the inputs folder.
ADVICE = [
    ("ort-device", ["--backend", "ort", "--model", "{d}/onnx", "--device", "npu:0"],
     ["--backend", "ort", "--model", "{d}/onnx", "--provider", "cpu"], "--provider cpu"),
    ("prompt-over-context", ["--model", "awaker-tiny-random", "--max-context", "30"],
     ["--model", "awaker-tiny-random", "--max-context", "64"], "raise --max-context"),
    ("new-tokens-over-context", ["--model", "awaker-tiny", "--max-context", "40", "--max-new-tokens", "30"],
     ["--model", "awaker-tiny", "--max-context", "40", "--max-new-tokens", "3"], "lower --max-new-tokens"),
    ("310P-bf16", ["--model", "awaker-tiny", "--device", "npu-emulated:310P", "--dtype", "bf16"],
     ["--model", "awaker-tiny", "--device", "npu-emulated:310P", "--dtype", "fp16"], "--dtype fp16"),
    ("310P-fp32-moe-llava", ["--model", "moellava-tiny", "--device", "npu-emulated:310P", "--dtype", "fp32"],
     ["--model", "moellava-tiny", "--device", "npu-emulated:310P", "--dtype", "fp16"], "--dtype fp16"),
    ("broken-generation-config", ["--model", "{d}/hf-bad-generation_config.json"],
     ["--model", "{d}/hf-bad-generation_config.json", "--no-generation-config"], "--no-generation-config"),
    ("base-on-a-preset", ["--model", "awaker-tiny", "--base", "{d}/empty"], ["--model", "awaker-tiny"],
     "drop --base"),
]


@pytest.mark.parametrize("row,refused,advised,word", ADVICE, ids=[r[0] for r in ADVICE])
def test_the_alternative_a_refusal_suggests_works(inputs, tmp_path, row, refused, advised, word):
    check_one_line(run_cli(["run", "--max-new-tokens", "2"] + [a.format(d=inputs) for a in refused], tmp_path), word)
    res = run_cli(["run", "--max-new-tokens", "2"] + [a.format(d=inputs) for a in advised], tmp_path)
    assert res.returncode == 0, res.stderr.decode()
