"""moevl.load: the one entry for every backend, and the bugs the layout change fixed (each failed before)."""
import json

import pytest
import torch

import moevl
from moevl.ascend.device import CpuDevice
from moevl.model import family
from moevl.model.checkpoint import CheckpointError
from moevl.model.tiny import DEMO_IMAGE


def test_a_moe_llava_folder_with_a_single_pytorch_model_bin_is_moe_llava(tmp_path):
    folder = tmp_path / "moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "moe_llava_phi", "mm_image_tower": "local/tiny"}))
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    assert family.family_of(folder).name == "moe-llava"
    from moevl.model.awaker.checkpoint import detect

    assert detect(folder) is None  # not an Awaker release although it holds pytorch_model.bin
    with pytest.raises(CheckpointError, match="--vision-tower"):  # MoE-LLaVA's loader reads it and asks for more
        moevl.load(folder, device="cpu")


def test_dtype_is_taken_once_also_with_a_device_object():
    s = moevl.load("awaker-tiny", device=CpuDevice(), dtype="bf16")
    assert s.dtype_name == "bf16" and s.model.lm_head.weight.dtype == torch.bfloat16
    assert moevl.load("awaker-tiny", device="cpu", dtype="fp16").dtype_name == "fp16"


def test_kv_caches_are_reused_while_long_enough_and_rounded_up():
    s = moevl.load("awaker-tiny", device="cpu")
    first = s.ask("What is this?", images=[DEMO_IMAGE], max_new_tokens=3)
    k = s.model.caches[0].k
    assert k.shape[2] % 256 == 0
    s.ask("What is this? Describe the picture in detail, please.", images=[DEMO_IMAGE], max_new_tokens=6)
    assert s.model.caches[0].k is k  # no new allocation (nor a new compiled graph) for another request length
    again = s.ask("What is this?", images=[DEMO_IMAGE], max_new_tokens=3)
    assert again.token_ids == first.token_ids  # stale slots of the longer request are masked


def test_compiled_decode_step_takes_each_family_forward_signature(monkeypatch):
    """--compile wraps model.forward for one-token steps; MoE-LLaVA's forward has 6 parameters (routing mode and
    generator), which the old NPU wrapper (5 parameters) refused with a TypeError."""
    for preset, n_args in (("moellava-tiny", 6), ("awaker-tiny", 5)):
        s = moevl.load(preset, device="cpu")
        # the data set's caption question: the trained defaults answer it at length, so all 4 tokens are
        # generated (no end-of-turn token cuts the decode steps short)
        want = s.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=4)
        assert len(want.token_ids[0]) == 4
        calls = []

        def fake_compile(fn):
            def compiled(*args, **kwargs):
                calls.append(len(args) + len(kwargs))
                return fn(*args, **kwargs)
            return compiled

        monkeypatch.setattr(s.device, "compile_step", fake_compile)
        s.compile()
        got = s.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=4)
        assert got.token_ids == want.token_ids
        assert calls == [n_args] * (len(got.token_ids[0]) - 1)  # the decode steps only, with every argument


def test_backends_are_one_entry_and_refuse_what_they_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        moevl.load("awaker-tiny", backend="tensorrt")
    with pytest.raises(FileNotFoundError, match="contract.json"):
        moevl.load(tmp_path, backend="ort")
    with pytest.raises(ValueError, match="legacy is PyTorch-only"):
        moevl.load(tmp_path, backend="ort", routing="legacy")
    with pytest.raises(ValueError, match="do not apply to the awaker family"):
        moevl.load("awaker-tiny", device="cpu", vision_tower="x")
