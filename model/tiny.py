"""The built-in ``awaker-tiny`` preset: the full Awaker structure at toy width, random weights from a seed,
with a small tokenizer and image processor built locally (no hub is reachable). Its answers are noise; it
exists to exercise the whole pipeline in seconds."""
from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "awaker-tiny"
DEMO_IMAGE = ASSETS / "demo.png"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]  # ids 0..6, as model.config.awaker_tiny() expects

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

_CORPUS = """You are a helpful assistant. Describe the image in detail. What is in this picture?
The picture shows a red square, a blue circle and a green triangle on a white background.
How many shapes are there? What colour is the circle? Where is the triangle? There are three shapes.
The circle is blue. The triangle is in the lower right corner. A cat sits on a mat near the window.
Answer the question briefly. Yes. No. I think it is a drawing of simple geometric shapes."""


def build_tiny_assets(folder: Path = TINY_TOKENIZER) -> None:
    """(Re)build the tiny tokenizer + image processor files; deterministic. Committed under model/assets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    # small images: at most 16 merged tokens per image keeps the demo fast
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(str(folder))


def build_demo_image(path: Path = DEMO_IMAGE) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (112, 84), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([8, 8, 40, 40], fill=(220, 30, 30))
    d.ellipse([56, 10, 96, 50], fill=(30, 60, 220))
    d.polygon([(60, 78), (104, 78), (82, 52)], fill=(30, 170, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights, independent of module creation order and of the device."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm_weight") or name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")) \
                or name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("router.gate.weight"):
            t = 0.3 * torch.randn(p.shape, generator=g)  # spread routing decisions across experts
        elif name.endswith("lora_A"):
            t = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        elif name.endswith("lora_B"):
            t = 0.02 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(p.shape, generator=g)
        else:
            t = 0.05 * torch.randn(p.shape, generator=g)
        p.copy_(t.to(p.dtype))
