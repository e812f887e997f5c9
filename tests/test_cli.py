"""The ``moevl`` command line on the built-in preset."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moevl.cli import main
from moevl.model.tiny import DEMO_IMAGE


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_json_has_the_promised_fields(capsys):
    code, out, _ = run_cli(capsys, "demo", "--json", "--device", "cpu", "--max-new-tokens", "5")
    assert code == 0
    d = json.loads(out)
    for key in ("text", "token_ids", "ttft_ms", "decode_tokens_per_s", "device", "dtype", "routing"):
        assert key in d, key
    assert 1 <= len(d["token_ids"]) <= 5 and d["device"]["kind"] == "cpu" and d["dtype"] == "fp32"
    layers = {r["layer"] for r in d["routing"]}  # two routers per decoder layer of the preset
    assert layers == set(range(len(layers))) and len(d["routing"]) == 2 * len(layers)
    assert {r["router"] for r in d["routing"]} == {"attn", "mlp"}


def test_run_is_deterministic_and_greedy_matches_the_api(capsys):
    from moevl import load

    argv = ["run", "--model", "awaker-tiny", "--image", str(DEMO_IMAGE), "--prompt", "What is this?",
            "--device", "cpu", "--max-new-tokens", "6", "--json"]
    _, out1, _ = run_cli(capsys, *argv)
    _, out2, _ = run_cli(capsys, *argv)
    a, b = json.loads(out1), json.loads(out2)
    assert a["token_ids"] == b["token_ids"]
    api = load("awaker-tiny", device="cpu").ask("What is this?", images=[DEMO_IMAGE], max_new_tokens=6)
    assert api.token_ids[0] == a["token_ids"]


def test_streaming_text_output(capsys):
    from moevl.model.tiny import trained_default

    code, out, err = run_cli(capsys, "demo", "--device", "cpu", "--max-new-tokens", "4", "--prompt", "Describe the image.")
    banner = "TOY model trained on synthetic shapes" if trained_default("awaker-tiny") else "RANDOM weights"
    assert code == 0 and banner in err and "time to first token" in err and "routing:" in err


def test_demo_asks_its_questions_about_the_bundled_image(capsys):
    from moevl.model.tiny import demo_questions, trained_default

    if trained_default("awaker-tiny") is None:
        pytest.skip("the trained awaker-tiny is not installed (python -m moevl.train.defaults --install)")
    code, out, err = run_cli(capsys, "demo", "--device", "cpu", "--max-new-tokens", "4")
    questions = demo_questions()
    assert code == 0 and "TOY model" in err
    assert [line[3:] for line in out.splitlines() if line.startswith("Q: ")] == [q["question"] for q in questions]
    assert err.count("   routing: L0.attn: e") == len(questions)


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "awaker-tiny", "--image", "/nonexistent.png", "--device", "cpu"], "does not exist"),
    (["run", "--model", "awaker-tiny", "--device", "tpu"], "unknown device"),
    (["run", "--model", "/no/such/folder", "--device", "cpu"], "neither a preset"),
    (["run", "--model", "awaker-tiny", "--device", "cpu", "--max-context", "20"], "context"),
])
def test_bad_input_gives_an_error_not_a_traceback(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err.lower() and "Traceback" not in err


def test_unreadable_image(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, _, err = run_cli(capsys, "run", "--model", "awaker-tiny", "--image", str(bad), "--device", "cpu")
    assert code == 2 and "could not be read" in err


def test_console_script_info_runs():
    out = subprocess.run([sys.executable, "-m", "moevl.cli", "info", "--json"], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout)["torch"]
