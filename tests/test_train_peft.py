"""peft interop both ways, against transformers' Qwen2-VL + peft (tiny, built here from random weights):
a LoRA adapter peft makes on transformers' model loads into the kit and gives transformers+peft's logits; the kit's
stage-1 adapter loads with peft onto transformers' model and gives the kit's logits.

Tolerance: fp32 logits within 2e-4 absolute, as tests/test_awaker_parity.py (observed ~1e-6).
"""
from __future__ import annotations

import pytest
import torch

from moevl.ascend.device import resolve_device
from moevl.model.awaker.checkpoint import load_awaker
from moevl.model.awaker.session import AwakerSession
from moevl.train.examples import read_records
from moevl.train.loop import TrainSettings
from moevl.train.peft_interop import apply_adapter
from moevl.train.recipe import PEFT_FOLDER, StageOptions, run_stage
from tests.awaker_fixtures import tiny_hf_model, write_hf_folder
from tests.test_awaker_parity import hf_logits
from tests.train_fixtures import shapes

TOL = 2e-4
CPU = resolve_device("cpu")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_hf_folder(tiny_hf_model(), tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("shapes") / "data", n=4)


def batch_for(session, data):
    recs = read_records(data)[:2]
    return session.prepare([r.question for r in recs], [[r.image] for r in recs])


def max_diff(a, b, mask):
    m = mask.bool()
    return (a[m] - b[m]).abs().max().item()


def test_a_peft_adapter_trained_on_transformers_loads_into_the_kit(hf_folder, data, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(tiny_hf_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                      init_lora_weights=False))  # random A and B: LoRA matters
    hf.eval()
    hf.save_pretrained(str(tmp_path / "adapter"))
    model, proc = load_awaker(hf_folder, CPU)
    base = AwakerSession(model, proc, CPU)
    batch = batch_for(base, data)
    before = base.score(batch)
    apply_adapter(model, tmp_path / "adapter")
    ours = AwakerSession(model, proc, CPU).score(batch)
    theirs = hf_logits(hf, batch, base.cfg)
    assert max_diff(ours, theirs, batch.attention_mask) < TOL
    assert max_diff(before, theirs, batch.attention_mask) > 100 * TOL  # the adapter changed the logits


def test_the_kits_stage1_adapter_loads_with_peft_onto_transformers(hf_folder, data, tmp_path):
    from peft import PeftModel

    out = run_stage(hf_folder, data, "1", tmp_path / "s1", "cpu", TrainSettings(steps=3, batch_size=2, lr=5e-2),
                    StageOptions(lora_rank=4, lora_alpha=8.0), progress=False, log=lambda m: None)
    model, proc = load_awaker(out, CPU)
    kit = AwakerSession(model, proc, CPU)
    batch = batch_for(kit, data)
    ours = kit.score(batch)
    hf = PeftModel.from_pretrained(tiny_hf_model(), str(out / PEFT_FOLDER)).eval()
    theirs = hf_logits(hf, batch, kit.cfg)
    assert max_diff(ours, theirs, batch.attention_mask) < TOL
    base = hf_logits(tiny_hf_model(), batch, kit.cfg)
    assert max_diff(base, theirs, batch.attention_mask) > 100 * TOL  # the adapter was loaded, and matters


def test_a_folder_that_is_not_an_adapter_is_named(tmp_path, hf_folder):
    model, _ = load_awaker(hf_folder, CPU)
    with pytest.raises(ValueError, match="not a peft adapter folder"):
        apply_adapter(model, tmp_path)

from tests.train_fixtures import _no_npu_accelerator_leak  # noqa: E402,F401  (autouse)
