"""Whole models on the NPU code path (npu-emulated, strict mode on) against the same weights on the CPU.

Tolerances on logits: fp32 2e-4 absolute (observed ~1e-6: only summation order differs); fp16 0.1 absolute on
logits of magnitude ~5 (the fused ops round once where the reference rounds per op; observed ~1e-2), with greedy
tokens required to be identical over 8 steps.
"""
from __future__ import annotations

import pytest
import torch

from moevl.ascend.errors import DeviceError
from moevl.ascend.npu_emulation import NpuRuleError
from moevl import load
from moevl.model.tiny import DEMO_IMAGE

FP32_TOL = 2e-4
# fp16 keeps 11 significant bits: half an ulp is 2.4e-4 of a value, and the error of 4 layers of fp16 arithmetic
# grows with the logits' size, so the bound is relative to the largest logit (37 for the trained awaker-tiny)
FP16_REL = 5e-3
QUESTIONS = ["What is in the picture?", "Describe a cat sitting on a mat near the window."]
IMAGES = [[DEMO_IMAGE], []]  # one image request and one text-only: left padding in the batch


def logits_and_tokens(session, steps=8):
    batch = session.prepare(QUESTIONS, IMAGES)
    logits = session.score(batch)
    res = session.ask(QUESTIONS, images=IMAGES, max_new_tokens=steps)
    return logits, batch.attention_mask.bool(), res.token_ids


@pytest.fixture(scope="module")
def cpu_fp32():
    return logits_and_tokens(load("awaker-tiny", device="cpu", dtype="fp32"))


def npu_calls(session):
    return session.model.ops.kernels.rms_norm.__self__.tnpu.calls


def test_awaker_fp32_on_npu_emulated_equals_cpu(cpu_fp32):
    s = load("awaker-tiny", device="npu-emulated", dtype="fp32", strict_npu=True)
    logits, mask, tokens = logits_and_tokens(s)
    ref_logits, _, ref_tokens = cpu_fp32
    assert (logits[mask] - ref_logits[mask]).abs().max().item() < FP32_TOL
    assert tokens == ref_tokens
    calls = npu_calls(s)
    assert {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu"} <= set(calls)  # fp32 attention runs composed


@pytest.mark.parametrize("device", ["npu-emulated:910B", "npu-emulated:310P"])
def test_awaker_fp16_on_npu_emulated_matches_cpu_within_tolerance(cpu_fp32, device):
    s = load("awaker-tiny", device=device, dtype="fp16", strict_npu=True)
    logits, mask, tokens = logits_and_tokens(s)
    ref_logits, _, ref_tokens = cpu_fp32
    assert (logits[mask] - ref_logits[mask]).abs().max().item() < FP16_REL * ref_logits[mask].abs().max().item()
    assert tokens == ref_tokens
    calls = npu_calls(s)
    assert {"npu_prompt_flash_attention", "npu_incre_flash_attention", "npu_rms_norm"} <= set(calls)
    if device.endswith("310P"):
        assert "npu_swiglu" not in calls  # A2-only op: composed on 310P
        tnpu = s.model.ops.kernels.rms_norm.__self__.tnpu
        assert tnpu.get_npu_format(s.model.lm_head.weight) == 29  # FRACTAL_NZ
        assert tnpu.get_npu_format(s.model.model.layers[0].mlp.down_proj.weight) == 29


def test_310p_refuses_bf16():
    with pytest.raises(DeviceError, match="no bf16"):
        load("awaker-tiny", device="npu-emulated:310P", dtype="bf16")


def test_strict_mode_catches_a_host_sync_in_the_decode_step(monkeypatch):
    s = load("awaker-tiny", device="npu-emulated", dtype="fp32", strict_npu=True)
    kernels = s.model.ops.kernels
    rms = kernels.rms_norm

    def syncing_rms_norm(x, w, eps):
        if x.shape[1] == 1:
            float(x.abs().max())  # a host sync, as a careless kernel would do
        return rms(x, w, eps)

    import dataclasses

    s.model.set_kernels(dataclasses.replace(kernels, rms_norm=syncing_rms_norm))
    with pytest.raises(NpuRuleError, match="host synchronisation"):
        s.ask(QUESTIONS[:1], images=IMAGES[:1], max_new_tokens=2)


def test_compile_needs_torchair_and_says_so():
    with pytest.raises(DeviceError, match="TorchAir"):
        load("awaker-tiny", device="npu-emulated", dtype="fp32", compile=True)


def test_npu_flags_are_rejected_off_the_npu():
    with pytest.raises(ValueError, match="NPU devices only"):
        load("awaker-tiny", device="cpu", strict_npu=True)


def test_cli_has_the_npu_flags():
    from moevl.cli import build_parser

    args = build_parser().parse_args(["run", "--model", "awaker-tiny", "--device", "npu-emulated", "--strict-npu",
                                      "--compile"])
    assert args.strict_npu is True and args.compile is True
    args = build_parser().parse_args(["demo", "--device", "npu-emulated"])
    assert args.strict_npu is None and args.compile is False


def test_moellava_on_npu_emulated_equals_cpu():
    ref = load("moellava-tiny", device="cpu", dtype="fp32")
    s = load("moellava-tiny", device="npu-emulated", dtype="fp32", strict_npu=True)
    batch = ref.prepare(QUESTIONS, IMAGES)
    want, got = ref.score(batch), s.score(s.prepare(QUESTIONS, IMAGES))
    mask = batch.attention_mask.bool()
    assert (got[mask] - want[mask]).abs().max().item() < FP32_TOL
    assert {"npu_moe_init_routing_v2", "npu_grouped_matmul"} <= set(npu_calls(s))


def test_moellava_fp32_on_310p_is_refused_at_load_and_the_suggested_dtype_runs():
    """npu_grouped_matmul on 310P takes fp16 only: refused when loading (not mid-request), naming fp16; fp16 runs."""
    with pytest.raises(ValueError, match="--dtype fp16"):
        load("moellava-tiny", device="npu-emulated:310P", dtype="fp32")
    s = load("moellava-tiny", device="npu-emulated:310P", dtype="fp16")
    assert len(s.ask(QUESTIONS[:1], images=IMAGES[:1], max_new_tokens=2).token_ids[0]) >= 1


@pytest.mark.parametrize("preset", ["awaker-tiny", "moellava-tiny"])
def test_the_310p_bf16_refusal_suggests_a_dtype_that_runs(preset):
    import re

    with pytest.raises(DeviceError, match="--dtype") as e:
        load(preset, device="npu-emulated:310P", dtype="bf16")
    suggested = re.search(r"--dtype (\w+)", str(e.value)).group(1)
    s = load(preset, device="npu-emulated:310P", dtype=suggested)
    assert len(s.ask(QUESTIONS[:1], images=IMAGES[:1], max_new_tokens=2).token_ids[0]) >= 1
