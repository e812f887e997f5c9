"""generation_config.json is honoured as transformers honours it, can be ignored, and the settings used are reported."""
import json
import subprocess
import sys

import pytest
import torch

import moevl
from moevl.model.generate import GenerationConfig, penalise_repetition, read_generation_config, sample
from moevl.model.tiny import DEMO_IMAGE
from tests.awaker_fixtures import tiny_hf_model, write_hf_folder

QWEN2_VL = {"bos_token_id": 0, "pad_token_id": 0, "do_sample": True, "eos_token_id": [2],
            "repetition_penalty": 1.05, "temperature": 0.01, "top_k": 1, "top_p": 0.001}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_hf_folder(tiny_hf_model(), tmp_path_factory.mktemp("hf"))


def _with_config(hf, tmp_path, config):
    import shutil

    folder = shutil.copytree(hf, tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps(config) if isinstance(config, dict) else config)
    return folder


def test_repetition_penalty_matches_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[torch.arange(3)[:, None], ids] = True
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(penalise_repetition(logits, seen, 1.3), want)


def test_greedy_with_a_penalty_avoids_the_seen_top_token():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, GenerationConfig(repetition_penalty=1.5), None, seen).item() == 1
    assert sample(logits, GenerationConfig(), None, seen).item() == 0


def test_qwen2_vl_style_config_is_read_as_transformers_would():
    cfg = read_generation_config_from(QWEN2_VL)
    assert cfg == {"repetition_penalty": 1.05, "temperature": 0.01, "top_k": 1, "top_p": 0.001}
    # do_sample false (or absent, transformers' default): greedy, whatever temperature says
    assert read_generation_config_from({"temperature": 0.7, "top_p": 0.5}) == {"temperature": 0.0}


def read_generation_config_from(data, tmp_path_factory=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "generation_config.json"
        path.write_text(json.dumps(data))
        return read_generation_config(path)


def test_load_honours_the_folder_config_and_reports_where_each_value_came_from(hf, tmp_path):
    folder = _with_config(hf, tmp_path, QWEN2_VL)
    vl = moevl.load(folder, device="cpu")
    res = vl.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=6, top_p=1.0)
    s = res.settings
    assert (s["repetition_penalty"], s["top_k"], s["temperature"]) == (1.05, 1, 0.01)
    assert s["source"] == {"max_new_tokens": "request", "temperature": "generation_config.json",
                           "top_p": "request", "top_k": "generation_config.json",
                           "repetition_penalty": "generation_config.json"}
    # the same as asking for those values explicitly with no config file
    plain = moevl.load(folder, device="cpu", generation_config=False)
    same = plain.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=6, repetition_penalty=1.05,
                     temperature=0.01, top_k=1, top_p=1.0)
    assert res.token_ids == same.token_ids
    assert plain.ask("Hi", max_new_tokens=2).settings["source"]["repetition_penalty"] == "default"


def test_the_penalty_changes_a_repetitive_greedy_answer(hf, tmp_path):
    vl = moevl.load(hf, device="cpu", generation_config=False)
    free = vl.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=24).token_ids[0]
    penalised = vl.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=24,
                       repetition_penalty=5.0).token_ids[0]
    assert len(set(free)) < len(free), "the random tiny model repeats itself greedily (precondition)"
    assert free != penalised and len(set(penalised)) > len(set(free))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moevl.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_json_says_which_settings_were_used_and_can_ignore_the_file(hf, tmp_path):
    folder = _with_config(hf, tmp_path, QWEN2_VL)
    out = _cli("run", "--model", folder, "--prompt", "Hi", "--max-new-tokens", "3", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["generation"]["repetition_penalty"] == 1.05
    assert r["generation"]["source"]["repetition_penalty"] == "generation_config.json"
    assert r["generation_config"] == str(folder / "generation_config.json")
    out = _cli("run", "--model", folder, "--prompt", "Hi", "--json", "--no-generation-config")
    r = json.loads(out.stdout)
    assert r["generation"]["repetition_penalty"] == 1.0 and r["generation_config"] is None
    assert r["generation"]["max_new_tokens"] == 32 and r["generation"]["source"]["max_new_tokens"] == "default"


@pytest.mark.parametrize("content, words", [("{not json", "not valid JSON"),
                                            ({"do_sample": True, "top_p": 7}, "top_p")])
def test_a_broken_generation_config_is_one_line_naming_the_file(hf, tmp_path, content, words):
    folder = _with_config(hf, tmp_path, content)
    out = _cli("run", "--model", folder, "--prompt", "Hi", "--max-new-tokens", "2")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "generation_config.json" in lines[0] and words in lines[0], out.stderr
    assert "Traceback" not in out.stderr
