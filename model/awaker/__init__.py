"""Awaker2.5-VL: Qwen2-VL (vision tower + merger + M-RoPE decoder) with LoRA-MoE adapters and an instance-level
router. Modules: config (dataclasses, presets), lora_moe (the adapted linear and the router), network, inputs
(processor, positions, the router's prompt span), checkpoint (formats, key mapping, loading), session, tiny."""
from __future__ import annotations

from moevl.model.awaker import checkpoint, config
from moevl.model.family import Family


def load(spec, device, dtype=None, routing="prefill", base=None, max_context=None, lora_alpha=None):
    """-> AwakerSession for a preset, an Awaker2.5-VL release (+ ``base``: its Qwen2-VL folder), a Hugging Face
    Qwen2-VL folder or our format."""
    from moevl.model.awaker.session import AwakerSession

    model, processor = checkpoint.load_awaker(spec, device, dtype, base=base, lora_alpha=lora_alpha)
    return AwakerSession(model, processor, device, routing=routing, max_context=max_context)


FAMILY = Family(
    name="awaker",
    presets=tuple(config.PRESETS),
    detect=checkpoint.detect,
    load=load,
    formats="pytorch_model.bin (Awaker2.5-VL release) or config.json + *.safetensors (Hugging Face Qwen2-VL)",
    export="moevl.export.builders.awaker",
)
