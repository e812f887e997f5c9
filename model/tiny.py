"""What the built-in tiny presets share: the bundled demo image and the small byte-level BPE both tiny tokenizers
are trained from (no hub is reachable, so the kit builds its own; the files are committed under model/assets)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEMO_IMAGE = ASSETS / "demo.png"
# The trained built-in defaults (``python -m moevl.train.defaults --install``): one checkpoint folder per preset in
# the kit's format. The tokenizer folders above stay for the random-weights test models of the same families.
TRAINED = ASSETS / "defaults"


DEMO_QUESTIONS = ASSETS / "demo.json"  # questions about DEMO_IMAGE, with the answers the data set gives


def demo_questions() -> list[dict]:
    """[{"task", "lang", "question", "answer"}, ...] about DEMO_IMAGE (written with it by the defaults build)."""
    import json

    if not DEMO_QUESTIONS.is_file():
        return [{"task": "caption", "lang": "en", "question": "Describe the image.", "answer": None}]
    return json.loads(DEMO_QUESTIONS.read_text(encoding="utf-8"))["questions"]


def trained_default(preset: str) -> Path | None:
    """The trained checkpoint folder of a tiny preset, or None when the build has not installed one."""
    folder = TRAINED / preset
    return folder if (folder / "moevl_config.json").is_file() else None

# ids 0..6 of the tiny tokenizers; Qwen2-VL's special tokens, which Awaker's tiny config expects
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

_CORPUS = """You are a helpful assistant. Describe the image in detail. What is in this picture?
The picture shows a red square, a blue circle and a green triangle on a white background.
How many shapes are there? What colour is the circle? Where is the triangle? There are three shapes.
The circle is blue. The triangle is in the lower right corner. A cat sits on a mat near the window.
Answer the question briefly. Yes. No. I think it is a drawing of simple geometric shapes."""


def train_tiny_bpe(corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE (ids 0..6: SPECIAL_TOKENS) trained on ``corpus`` (lines; default: a small English corpus);
    deterministic. -> tokenizers.Tokenizer"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus if corpus is not None else _CORPUS.splitlines() * 4, trainer)
    return tok


def build_demo_image(path: Path = DEMO_IMAGE) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (112, 84), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([8, 8, 40, 40], fill=(220, 30, 30))
    d.ellipse([56, 10, 96, 50], fill=(30, 60, 220))
    d.polygon([(60, 78), (104, 78), (82, 52)], fill=(30, 170, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
