"""The built-in ``awaker-tiny`` preset: the full Awaker structure at toy width, random weights from a seed,
with a small tokenizer and image processor built locally (no hub is reachable). Its answers are noise; it
exists to exercise the whole pipeline in seconds."""
from __future__ import annotations

from pathlib import Path

from moevl.model import checkpoint
from moevl.model.tiny import ASSETS, train_tiny_bpe

TINY_TOKENIZER = ASSETS / "awaker-tiny"

# Qwen2-VL's chat template (the one shipped with Qwen2-VL-7B-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_assets(folder: Path = TINY_TOKENIZER) -> None:
    """(Re)build the tiny tokenizer + image processor files; deterministic. Committed under model/assets."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = train_tiny_bpe()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    # small images: at most 16 merged tokens per image keeps the demo fast
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(str(folder))


# parameter name suffixes -> initialisation (moevl.model.checkpoint.init_random_weights)
RANDOM_INIT = [
    (("norm_weight", "norm1.weight", "norm2.weight", "ln_q.weight", "layernorm.weight", "model.norm.weight"), "one", 0.1),
    (("router.gate.weight",), "normal", 0.3),  # spread routing decisions across experts
    (("lora_A",), "fan_in", 1.0),
    (("lora_B",), "normal", 0.02),
    (("bias",), "normal", 0.02),
]


def init_random_weights(model, seed: int = 0) -> None:
    """Deterministic random weights, independent of module creation order and of the device."""
    checkpoint.init_random_weights(model, seed, RANDOM_INIT)
