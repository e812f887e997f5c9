"""MoE-LLaVA: CLIP/SigLIP tower -> mlp2x_gelu projector -> Phi-2 / StableLM-2 decoder with top-2 token-level MoE
layers. Modules: config (dataclasses, presets, known towers), network, inputs (processor), checkpoint (formats,
key mapping, loading, saving), session."""
from __future__ import annotations

from moevl.model.family import Family
from moevl.model.moe_llava import checkpoint, config


def load(spec, device, dtype=None, moe_routing=None, vision_tower=None, max_context=None, moe_seed=None):
    """-> MoeLlavaSession for a preset, a LanguageBind MoE-LLaVA folder (+ ``vision_tower``: a local CLIP/SigLIP
    folder when the shards lack the tower) or our format."""
    from moevl.model.moe_llava.session import MoeLlavaSession

    model, processor = checkpoint.load_moe_llava(spec, device, dtype, vision_tower=vision_tower)
    return MoeLlavaSession(model, processor, device, moe_routing=moe_routing or "deterministic",
                           moe_seed=moe_seed or 0, max_context=max_context)


FAMILY = Family(
    name="moe-llava",
    presets=tuple(config.PRESETS),
    detect=checkpoint.detect,
    load=load,
    formats="config.json with model_type moe_llava_phi | moe_llava_stablelm (MoE-LLaVA)",
    export="moevl.export.builders.moe_llava",
)
