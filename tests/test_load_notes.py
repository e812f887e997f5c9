"""What loading says: a 16-bit checkpoint upcast to fp32 (memory doubles), and an Awaker release's LoRA rank and
the alpha assumed for it (the release format does not record alpha), with --lora-alpha to set it."""
import copy
import logging
import subprocess
import sys

import pytest
import torch

from moevl.ascend.device import resolve_device
from moevl.model.awaker.checkpoint import load_awaker
from tests.awaker_fixtures import RANK, random_adapters, tiny_hf_model, write_hf_folder, write_release

CPU = resolve_device("cpu")


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=11)


@pytest.fixture(scope="module")
def release(hf, tmp_path_factory):
    base = write_hf_folder(hf, tmp_path_factory.mktemp("base"))
    adapters = random_adapters(hf, seed=12)
    return base, write_release(hf, adapters, tmp_path_factory.mktemp("rel")), adapters


@pytest.fixture
def notes(caplog):
    caplog.set_level(logging.INFO, logger="moevl")
    return caplog


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moevl.cli", *map(str, args)], capture_output=True, text=True)


def test_a_bf16_checkpoint_upcast_to_fp32_is_said_with_its_sizes(hf, tmp_path, notes):
    folder = write_hf_folder(copy.deepcopy(hf).to(torch.bfloat16), tmp_path / "bf16")
    load_awaker(folder, CPU, torch.float32)
    [msg] = [r.getMessage() for r in notes.records if "stores its weights in bf16" in r.getMessage()]
    numel = sum(p.numel() for p in hf.parameters())
    assert f"{numel * 4 / 1e9:.2f} GB instead of {numel * 2 / 1e9:.2f} GB" in msg and "--dtype bf16" in msg
    notes.clear()
    load_awaker(folder, CPU, torch.bfloat16)  # kept as stored: nothing to say
    assert not [r for r in notes.records if "stores its weights" in r.getMessage()]


def test_an_fp32_checkpoint_gets_no_upcast_note(hf, tmp_path, notes):
    load_awaker(write_hf_folder(hf, tmp_path / "fp32"), CPU, torch.float32)
    assert not [r for r in notes.records if "stores its weights" in r.getMessage()]


def test_the_cli_prints_the_upcast_note_as_one_line(hf, tmp_path):
    folder = write_hf_folder(copy.deepcopy(hf).to(torch.bfloat16), tmp_path / "bf16")
    out = _cli("run", "--model", folder, "--prompt", "Hi", "--max-new-tokens", "1", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    notes = [x for x in out.stderr.splitlines() if x.startswith("moevl: note:")]
    assert len(notes) == 1 and "bf16" in notes[0] and "fp32" in notes[0]


def test_a_release_of_another_rank_says_the_rank_and_the_alpha_assumed(release, notes):
    base, rel, _ = release
    model, _ = load_awaker(rel, CPU, base=base)
    [msg] = [r.getMessage() for r in notes.records if "LoRA rank" in r.getMessage()]
    assert f"rank {RANK}" in msg and "2 x rank is assumed" in msg and "--lora-alpha" in msg
    assert model.cfg.adapters.alpha == 2 * RANK


def test_lora_alpha_sets_the_scaling_of_every_adapter(hf, release):
    base, rel, adapters = release
    model, _ = load_awaker(rel, CPU, base=base, lora_alpha=3.0)
    assert model.cfg.adapters.scaling == pytest.approx(3.0 / RANK)
    assert model.cfg.adapters.qkv_scaling == pytest.approx(3.0 / RANK)
    # q/k/v are merged with that scaling: W + (alpha / r) B A, checked from the raw weights
    mod = "model.language_model.layers.0.self_attn.q_proj"
    w = hf.state_dict()[mod + ".weight"]
    want = w + (3.0 / RANK) * adapters[mod]["B"] @ adapters[mod]["A"]
    got = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(got, want, atol=1e-5)


def test_lora_alpha_on_anything_but_a_release_is_refused(release):
    base, _, _ = release
    out = _cli("run", "--model", base, "--lora-alpha", "16", "--prompt", "Hi")
    assert out.returncode == 2 and "--lora-alpha applies to an Awaker2.5-VL release" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _cli("run", "--model", "awaker-tiny", "--lora-alpha", "-1", "--prompt", "Hi")
    assert out.returncode == 2 and "lora_alpha must be a finite number > 0" in out.stderr
