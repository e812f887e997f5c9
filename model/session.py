"""What every session shares, whatever the family or the backend: preparing requests, asking, scoring, and the
static-KV-cache bookkeeping of one batch.

A session is what ``moevl.load`` returns: model (or graphs) + processor + device, ready to answer.

    vl = moevl.load("awaker-tiny", device="cpu")            # or a checkpoint folder, or an exported folder
    res = vl.ask("What is in the picture?", images=["cat.png"], max_new_tokens=32)

``moevl.model.generate.generate`` drives a session through two steps: ``prefill(batch, max_len)`` -> logits of the
last prompt position [B, V], and ``decode(tokens [B])`` -> logits of the next position.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch

from moevl.model.generate import GenerationResult, generate, resolve_generation


class CacheState:
    """Static-KV-cache bookkeeping for one batch: which cache slots hold real tokens, where the next token is
    written, and each request's next text position."""

    def __init__(self, attention_mask: torch.Tensor, next_position: torch.Tensor, max_len: int):
        b, length = attention_mask.shape
        self.valid = torch.zeros(b, max_len, dtype=torch.bool, device=attention_mask.device)
        self.valid[:, :length] = attention_mask.bool()
        self.pos = next_position.clone()  # [B]
        self.cur = length

    def prompt(self):
        """(cache_pos [L], keep [B, 1, L, S]) for the prefill of the whole prompt."""
        cache_pos = torch.arange(self.cur, device=self.valid.device)
        return cache_pos, attention_keep(self.valid, cache_pos)

    def step(self):
        """(cache_pos [1], keep [B, 1, 1, S], positions [B]) for the next decode step; advances the cursor."""
        self.valid[:, self.cur] = True
        cache_pos = torch.tensor([self.cur], device=self.valid.device)
        out = cache_pos, attention_keep(self.valid, cache_pos), self.pos
        self.cur += 1
        self.pos = self.pos + 1
        return out


def attention_keep(valid: torch.Tensor, cache_pos: torch.Tensor) -> torch.Tensor:
    """keep [B, 1, T, S]: causal over cache slots, padding slots masked; every query sees itself, so no row
    is fully masked (a padding query would otherwise produce NaN and poison its cache slot)."""
    s = torch.arange(valid.shape[1], device=valid.device)
    q = cache_pos[:, None]
    keep = (s[None, :] <= q)[None] & (valid[:, None, :] | (s[None, :] == q)[None])
    return keep[:, None]


class Session:
    """The user-facing half every session shares. A session provides ``processor`` (``chat`` and ``__call__``),
    ``tokenizer``, ``device``, ``family``, ``max_context``, ``eos_token_ids``, ``pad_token_id``, ``prefill``,
    ``decode``, ``routing_decisions`` and ``dtype_name``.

    Thread safety: a session serialises its callers. ``ask`` and ``score`` hold the session's lock from the first
    token to the last, so concurrent calls from several threads run one after another, each with the answer it
    would get alone (the static KV cache and the request state belong to one request at a time). The low-level
    ``prefill`` / ``decode`` steps are not locked: a caller driving them owns the session for the request.
    """

    family: str
    # sampling defaults from the model folder's generation_config.json (moevl.load reads it), and that file
    generation_defaults: dict = {}
    generation_config_path: Path | None = None

    def generation_config(self, **given):
        """A request's sampling values (None = not given) over the model's defaults -> (GenerationConfig,
        settings: every value used and where it came from)."""
        return resolve_generation(self.generation_defaults, given)

    @contextlib.contextmanager
    def serialised(self):
        """Hold the session for one request (re-entrant, so a locked call may call another)."""
        lock = self.__dict__.setdefault("_request_lock", threading.RLock())  # setdefault is atomic: one lock
        with lock:
            yield

    def prepare(self, questions: list[str], images: list[list] | None = None):
        images = images or [[] for _ in questions]
        prompts = [self.processor.chat(q, num_images=len(imgs)) for q, imgs in zip(questions, images)]
        return self.processor(prompts, images, max_length=self.max_context)

    def ask(self, question: str | list[str], images=None, on_text=None, **gen) -> GenerationResult:
        """One question (images: a list of its images) or a list of questions (images: one list per question).
        ``gen``: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed; what is not given (or None)
        comes from the model's generation_config.json, else the kit's defaults (``result.settings`` says which)."""
        questions, images = request_lists(question, images)
        cfg, settings = self.generation_config(**gen)
        with self.serialised():
            batch = self.prepare(questions, images)
            result = generate(self, batch, cfg, on_text)
        result.settings = settings
        return result

    def describe(self) -> dict:
        return self.device.describe()


class TorchSession(Session):
    """A PyTorch model on a Device. Families implement ``_prefill(batch, max_len)`` and ``_decode(tokens)``; this
    class runs them under inference mode and the device's step guard, and keeps the KV caches (allocated by the
    model, reused across requests while long enough)."""

    def __init__(self, model, processor, device, max_context: int | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.cfg = model.cfg
        self.max_context = check_max_context(max_context) or model.cfg.max_position_embeddings
        self.eos_token_ids = set(model.cfg.eos_token_ids)
        self.pad_token_id = model.cfg.pad_token_id
        self._cache: CacheState | None = None
        self._last_hidden = None

    @property
    def dtype_name(self) -> str:
        from moevl.ascend.device import dtype_name

        return dtype_name(self.model.lm_head.weight.dtype)

    def compile(self) -> None:
        """Run the decode step (one token, static KV cache) in the device's graph mode; prefill stays eager."""
        eager = self.model.forward
        compiled = self.device.compile_step(eager)

        def forward(inputs_embeds, *args, **kwargs):
            step = compiled if inputs_embeds.shape[1] == 1 else eager
            return step(inputs_embeds, *args, **kwargs)

        self.model.forward = forward

    def batch_engine(self, max_batch: int, max_len: int | None = None):
        """A continuous-batching engine over this model (``moevl.model.engine``), with its own KV caches for
        ``max_batch`` requests of up to ``max_len`` tokens (default: the session's context)."""
        from moevl.model.engine import BatchEngine

        return BatchEngine(self, max_batch, max_len)

    def _setup(self, batch, max_len: int) -> CacheState:
        """Caches for this batch (reused when long enough) and the bookkeeping over them."""
        length = self.model.setup_caches(batch.input_ids.shape[0], max_len, limit=self.max_context)
        self._cache = CacheState(batch.attention_mask, batch.next_position, length)
        return self._cache

    @torch.inference_mode()
    def prefill(self, batch, max_len: int) -> torch.Tensor:
        with self.device.step_guard(host_sync_ok=True):
            return self._prefill(batch.to(self.device.torch_device), max_len)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.device.step_guard(host_sync_ok=False):
            return self._decode(tokens)

    @torch.inference_mode()
    def score(self, batch) -> torch.Tensor:
        """Logits at every prompt position [B, L, V] (for checks against other implementations)."""
        with self.serialised():
            self.prefill(batch, batch.input_ids.shape[1])
            return self.model.logits(self._last_hidden)


_IMAGE_TYPES = (str, Path)


def _is_image(x) -> bool:
    return isinstance(x, _IMAGE_TYPES) or type(x).__module__.startswith("PIL.")


def request_lists(question, images) -> tuple[list[str], list[list] | None]:
    """``ask``'s arguments -> (questions, one image list per question), or a ValueError naming the argument.

    question: a string, or a non-empty list of strings. images: for one question, None or a list of images (paths
    or PIL images); for a list of questions, None or a list with one list of images per question."""
    if isinstance(question, str):
        questions = [question]
    elif isinstance(question, (list, tuple)) and question and all(isinstance(q, str) for q in question):
        questions = list(question)
    else:
        raise ValueError(f"question must be a string or a non-empty list of strings, not {_describe(question)}")
    for q in questions:
        try:
            q.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. a command-line argument that was not UTF-8 (surrogate escapes)
            raise ValueError(f"the question is not valid UTF-8 text (byte {e.object[e.start:e.end]!r} at "
                             f"{e.start}): pass UTF-8 text (--prompt)") from None
    if images is None:
        return questions, None
    if isinstance(images, (str, Path, bytes)) or _is_image(images):
        raise ValueError(f"images must be a list (images=[{images!r}]), not {_describe(images)}")
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of image paths or PIL images, not {_describe(images)}")
    if len(questions) == 1 and images and all(_is_image(i) for i in images):
        images = [images]  # one question's flat image list
    if isinstance(question, str):
        if images and all(isinstance(i, (list, tuple)) for i in images) and len(images) == 1:
            images = images[0]  # [[a, b]] for one question is accepted too
        bad = [i for i in images if not _is_image(i)]
        if bad:
            raise ValueError(f"images must hold image paths or PIL images, not {_describe(bad[0])}")
        return questions, [list(images)]
    if len(images) != len(questions) or not all(isinstance(i, (list, tuple)) for i in images):
        raise ValueError(f"images must be one list of images per question: {len(questions)} questions but "
                         f"images is {_describe(images)}")
    bad = [i for imgs in images for i in imgs if not _is_image(i)]
    if bad:
        raise ValueError(f"images must hold image paths or PIL images, not {_describe(bad[0])}")
    return questions, [list(i) for i in images]


def _describe(x) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"{type(x).__name__} {x!r}"[:80]


def check_max_context(max_context: int | None) -> int | None:
    if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
        raise ValueError(f"max_context must be a whole number of tokens >= 2 (--max-context), not {max_context!r}")
    return max_context
