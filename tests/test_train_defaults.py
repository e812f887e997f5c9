"""The built-in defaults: a smoke version of their build (a few records and steps: the pipeline, not the quality),
and the quality of the committed weights through the normal inference path (``moevl.load(preset)``).

The quality test answers the fixed 100-question sample the build measured (generated here with the validation seed;
nothing is downloaded) and needs the accuracy the build recorded in the preset's quality.json, minus MARGIN: a change
that breaks inference numerics (kernels, processor, tokenizer, positions, routing) fails it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import moevl
from moevl.model.tiny import TRAINED, demo_questions, trained_default
from moevl.train.defaults import CI_SAMPLE, FOCUS, QUALITY_FILE, BuildPlan, build

MARGIN = 0.03  # 3 of the 100 questions


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    plan = BuildPlan(captions=6, mix=10, fresh=6, focus=4, general=2, validation=1, batch=2, steps={k: 1 for k in BuildPlan().steps},
                     batches={k: 2 for k in BuildPlan().batches}, lora_rank=2, lora_alpha=4.0)
    out = tmp_path_factory.mktemp("defaults")
    return out, build(out, seed=0, plan=plan, progress=False, log=lambda m: None)


def test_smoke_build_writes_every_stage_and_evaluates(smoke):
    tmp_path, summary = smoke
    for stage in ("awaker/stage-vision", "moellava/stage-vision", "awaker/stage0", "awaker/stage0-fresh",
                  "awaker/stage0-fresh2", "awaker/stage0-fresh3", "awaker/stage1", "awaker/stage2", "awaker/stage3",
                  "moellava/stage0", "moellava/stage0-mix", "moellava/stage0-fresh", "moellava/stage0-fresh2",
                  "moellava/stage0-fresh3", "moellava/stage0-fresh4", "moellava/stage-moe"):
        assert (tmp_path / stage / "moevl_config.json").is_file(), stage
        assert (tmp_path / stage / "loss.jsonl").read_text().count("\n") == 1
    assert (tmp_path / "awaker/stage1/peft_adapter/adapter_model.safetensors").is_file()
    for name, weak in FOCUS.items():  # the last cycle: the model's focus set, then the balanced general set
        info = json.loads((tmp_path / f"{name}/stage0-fresh3/train.json").read_text())
        assert [Path(d).parent.name for d in info["data"]] == [f"focus-{name}", "mix-general"]
        assert info["records"] == 4 + 2
        tasks = {r["task"] for r in json.loads((tmp_path / f"data/focus-{name}/shapes.json").read_text())}
        assert tasks == set(weak)
    for name in ("awaker", "moellava"):  # the tower pretrained by stage vision is what stage 0 keeps
        assert json.loads((tmp_path / f"{name}/stage-vision/train.json").read_text())["probe_accuracy"]["shapes"] > 0
        trained = json.loads((tmp_path / f"{name}/stage0/train.json").read_text())["trained"]
        assert not any(k.startswith(("visual.blocks.", "vision_tower.")) for k in trained)
    for name in ("awaker", "moellava"):
        q = summary["quality"][name]
        assert q["n"] == 10 and set(q["accuracy"]) == {"count", "color", "shape", "position", "caption"}
        assert q["ci_sample"]["n"] == CI_SAMPLE
    tok = json.loads((tmp_path / "assets/awaker-tiny/tokenizer.json").read_text(encoding="utf-8"))
    assert tok["model"]["vocab"]["<|im_start|>"] == 1  # Qwen2-VL's special tokens keep the ids the config names


@pytest.mark.parametrize("preset", ["awaker-tiny", "moellava-tiny"])
def test_committed_defaults_answer_the_fixed_sample(preset, tmp_path):
    from moevl.train.data import make_shapes
    from moevl.train.evaluate import evaluate

    folder = trained_default(preset)
    if folder is None:
        pytest.skip(f"no trained {preset} in {TRAINED} (python -m moevl.train.defaults --install)")
    recorded = json.loads((folder / QUALITY_FILE).read_text())["ci_sample"]
    sample = make_shapes(tmp_path / "sample", recorded["n"], recorded["seed"])
    report = evaluate(moevl.load(preset, device="cpu", dtype="fp32"), sample, batch_size=32, max_new_tokens=40)
    assert report["overall"]["accuracy"] >= recorded["accuracy"] - MARGIN, (
        f"{preset}: {report['overall']['correct']}/{report['n']} exact, the build measured {recorded['correct']}")


def test_demo_questions_are_about_the_bundled_image():
    from moevl.model.tiny import DEMO_QUESTIONS

    if not DEMO_QUESTIONS.is_file():
        pytest.skip("no demo questions yet: they are written with the trained defaults "
                    "(python -m moevl.train.defaults --install)")
    qs = demo_questions()
    assert {q["task"] for q in qs} >= {"count", "caption"}
    assert all(q["question"] and q["answer"] for q in qs)


def test_installed_defaults_are_what_the_presets_and_the_demo_run(smoke, tmp_path, monkeypatch, capsys):
    from moevl.cli import main
    from moevl.model import tiny
    from moevl.train import defaults

    build_dir, _ = smoke
    monkeypatch.setattr(tiny, "TRAINED", tmp_path / "defaults")
    for name, stage in (("awaker", "awaker/stage3"), ("moellava", "moellava/stage-moe")):
        defaults.install_preset(build_dir / stage, name)
    s = moevl.load("awaker-tiny", device="cpu")
    assert s.cfg.hidden_size == defaults.awaker_config().hidden_size and s.cfg.adapters.num_experts == 4
    assert moevl.load("moellava-tiny", device="cpu").cfg.moe_layers == (0, 2)
    assert main(["demo", "--device", "cpu", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "TOY model trained on synthetic shapes" in err and "RANDOM" not in err
    questions = demo_questions()
    assert out.count("Q: ") == len(questions) and err.count("routing: L0.attn") == len(questions)

from tests.train_fixtures import _no_npu_accelerator_leak  # noqa: E402,F401  (autouse)


def test_one_command_builds_both_models_side_by_side(tmp_path):
    """``python -m moevl.train.defaults`` runs one process per model (``--jobs 2``) and merges what they did."""
    from moevl.train import defaults

    assert defaults.main(["--out", str(tmp_path), "--smoke", "--jobs", "2"]) == 0
    summary = json.loads((tmp_path / "build.json").read_text())
    assert set(summary["quality"]) == {"awaker", "moellava"}
    for name in ("awaker", "moellava"):
        part = json.loads((tmp_path / f"build-{name}.json").read_text())  # written by that model's own process
        assert set(part["quality"]) == {name}
        assert summary["timings_s"][f"{name}.0"] == part["timings_s"][f"{name}.0"]
        assert summary["quality"][name]["accuracy"] == part["quality"][name]["accuracy"]
    assert summary["timings_s"]["wall"] > 0


def test_build_reuses_a_data_set_only_of_the_same_count_seed_and_tasks(tmp_path):
    # a build folder reused with another --seed must not train on the first seed's data
    from moevl.train.data import MARKER, TASKS, make_shapes
    from moevl.train.defaults import _data_made

    make_shapes(tmp_path / "d", 3, 5)
    assert _data_made(tmp_path / "d") == (3, 5, TASKS)
    assert _data_made(tmp_path / "d") != (3, 6, TASKS)
    make_shapes(tmp_path / "f", 3, 5, tasks=("color", "position"))
    assert _data_made(tmp_path / "f") == (3, 5, ("color", "position"))  # a focus set is not the mix of that seed
    (tmp_path / "d" / MARKER).write_text("{not json")
    assert _data_made(tmp_path / "d") is None
    assert _data_made(tmp_path / "missing") is None
