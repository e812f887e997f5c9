"""The step-level scheduler: one thread drives the batching engine (``moevl.model.engine``); requests wait in a
bounded queue, are prefilled and join the running batch at step boundaries, and leave when they finish, are
cancelled (a client went away) or the server shuts down.

Each request keeps its own sampling settings and seed (a private generator), its own stop strings and its own
routing. Results go back to the HTTP side as events on the request's ``events`` callback (called from the
scheduler thread; the server turns them into an asyncio queue).

Exported (ORT/OM) sessions have no step-level engine: ``SerialScheduler`` runs their requests one after another
with ``generate`` behind the same interface (request-level, not continuous batching).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable

import torch

from moevl.model.generate import GenerationConfig, NonFiniteLogitsError, generate, sample


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows (HTTP 429 with Retry-After)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests (HTTP 503 with Retry-After)."""


@dataclasses.dataclass
class Request:
    """One chat completion as the scheduler sees it. ``batch``: the prepared prompt (a batch of one)."""

    batch: object
    config: GenerationConfig
    stop: list[str]
    events: Callable[[str, dict], None]  # (kind, data): "token" {text}, "done" {...}, "error" {message}
    prompt_tokens: int = 0
    created: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: str | None = None  # the finish reason once it is decided
    ignore_eos: bool = False  # the end-of-sequence token is an ordinary token (benchmarks, tests)
    # filled in while it runs
    token_ids: list = dataclasses.field(default_factory=list)
    text: str = ""     # the text so far (stop strings cut off)
    sent: int = 0      # characters of text already sent
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [1, V] tokens the repetition penalty applies to

    def cancel(self) -> None:
        """Called from any thread (a client disconnected): the scheduler drops the request at its next step."""
        self.cancelled = True


class Hooks:
    """What the scheduler reports (the server's Prometheus metrics); every method is optional to override."""

    def queue_depth(self, n: int) -> None: ...
    def running(self, n: int) -> None: ...
    def step(self, batch_size: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def finished(self, req: Request, reason: str, routing: list) -> None: ...


class _SchedulerBase:
    def __init__(self, session, max_batch: int, max_queue: int, hooks: Hooks | None = None):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be a whole number >= 0 (--max-queue), not {max_queue!r}")
        self.session = session
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.hooks = hooks or Hooks()
        self.tokenizer = session.tokenizer
        self.eos = set(session.eos_token_ids)
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._abort = False
        self._taken = 0  # requests taken from the queue and not yet in a row (being prefilled)
        self._thread = threading.Thread(target=self._run, name="moevl-scheduler", daemon=True)

    # -- the HTTP side
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue + self._free_rows():
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(req)
            self.hooks.queue_depth(len(self._waiting))
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown: no new requests; the running and waiting ones finish within ``timeout`` seconds,
        what is left then is cancelled with an error event."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        with self._cv:
            self._abort = True
            self._cv.notify()
        self._thread.join(5.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _free_rows(self) -> int:
        return 0

    # -- shared by both schedulers
    def _emit_text(self, req: Request, text: str, final: bool) -> str | None:
        """req.text = text (the whole answer so far) cut at the first stop string; send what is safe to send
        (not what may be the start of a stop string or of a character). -> "stop" when a stop string matched."""
        reason = None
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        req.text = text
        if final or reason:
            end = len(text)
        else:
            end = len(text) - (max((len(s) for s in req.stop), default=1) - 1)  # a stop string may be starting
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                end = min(end, len(text) - 1)
        if end > req.sent:
            req.events("token", {"text": text[req.sent:end]})
            req.sent = end
        return reason

    def _finish(self, req: Request, reason: str, routing: list, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(req.token_ids, skip_special_tokens=True)
        self._emit_text(req, text, final=True)  # (cut at the same stop string again, if one matched)
        now = time.perf_counter()
        usage = {"prompt_tokens": req.prompt_tokens, "completion_tokens": len(req.token_ids),
                 "total_tokens": req.prompt_tokens + len(req.token_ids)}
        self.hooks.finished(req, reason, routing)
        req.events("done", {"finish_reason": reason, "usage": usage, "routing": [d.to_dict() for d in routing],
                            "text": req.text, "token_ids": list(req.token_ids),
                            "seconds": now - req.created})

    def _fail(self, req: Request, message: str, status: int = 500) -> None:
        req.events("error", {"message": message, "status": status})

    def _take_waiting(self, n: int) -> list[Request]:
        out = []
        with self._cv:
            while self._waiting and len(out) < n:
                out.append(self._waiting.popleft())
            self._taken = len(out)
            self.hooks.queue_depth(len(self._waiting))
        return out

    def _placed(self) -> None:
        """One request taken from the queue has its row now (or is gone)."""
        with self._cv:
            self._taken -= 1


class Scheduler(_SchedulerBase):
    """Continuous batching over a PyTorch session (``session.batch_engine``)."""

    def __init__(self, session, max_batch: int = 8, max_queue: int = 64, hooks: Hooks | None = None,
                 max_len: int | None = None):
        super().__init__(session, max_batch, max_queue, hooks)
        self.engine = session.batch_engine(max_batch, max_len)
        self.max_len = self.engine.max_len
        self._rows: list[Request] = []  # row i's request
        self._last: list[int] = []      # row i's last sampled token

    def _free_rows(self) -> int:
        return self.max_batch - len(self._rows) - self._taken

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._rows and not self._stopping:
                    self._cv.wait()
                if self._abort or (self._stopping and not self._waiting and not self._rows):
                    break
            try:
                self._admit()
                self._drop_done()
                if self._rows:
                    self._step()
                    self._drop_done()
            except Exception as e:  # noqa: BLE001  a fault of the model: every request in flight learns of it
                self._fail_all(f"the model failed: {type(e).__name__}: {e}")
        self._fail_all("the server shut down before the request finished", status=503)

    def _fail_all(self, message: str, status: int = 500) -> None:
        for req in self._rows:
            self._fail(req, message, status)
        while self.engine.n:
            self.engine.remove(self.engine.n - 1)
        self._rows, self._last = [], []
        for req in self._take_waiting(len(self._waiting)):
            self._fail(req, message, status)
        with self._cv:
            self._taken = 0
        self.hooks.running(0)

    def _admit(self) -> None:
        for req in self._take_waiting(self.engine.free):
            try:
                self._place(req)
            finally:
                self._placed()
        self.hooks.running(len(self._rows))

    def _place(self, req: Request) -> None:
        """Prefill one request into a row; its first token."""
        if req.cancelled:
            self.hooks.finished(req, "cancelled", [])
            return
        try:
            row, logits = self.engine.add(req.batch)
        except Exception as e:  # noqa: BLE001  this request's own failure (the others go on)
            self._fail(req, f"the model failed on this request: {type(e).__name__}: {e}")
            return
        if not bool(torch.isfinite(logits).all()):
            self.engine.remove(row)
            self._fail(req, str(NonFiniteLogitsError(
                "the model produced non-finite logits (NaN/inf) for the first token: its weights hold NaN/inf "
                "or overflow in this dtype")))
            return
        cfg = req.config
        if cfg.seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        if cfg.repetition_penalty != 1.0:
            vocab = logits.shape[-1]
            ids = req.batch.input_ids[0].cpu().clamp(0, vocab - 1)
            req.seen = torch.zeros(1, vocab, dtype=torch.bool)
            req.seen[0, ids] = True
        self._rows.append(req)
        self._last.append(0)
        self._take_token(len(self._rows) - 1, self._sample(req, logits[None])[0])

    def _sample(self, req: Request, logits: torch.Tensor) -> list[int]:
        cfg = req.config
        host = req.generator is not None or req.seen is not None
        return sample(logits.float().cpu() if host else logits.float(), cfg, req.generator, req.seen).tolist()

    def _take_token(self, row: int, tok: int) -> None:
        req = self._rows[row]
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
            self.hooks.first_token(req.first_token_at - req.created)
        self._last[row] = tok
        if tok in self.eos and not req.ignore_eos:
            req.done = "stop"
            return
        req.token_ids.append(tok)
        if req.seen is not None:
            req.seen[0, tok] = True
        if self._emit_text(req, self.tokenizer.decode(req.token_ids, skip_special_tokens=True), False) == "stop":
            req.done = "stop"
        elif len(req.token_ids) >= req.config.max_new_tokens:
            req.done = "length"

    def _step(self) -> None:
        n = len(self._rows)
        self.hooks.step(n)
        logits = self.engine.step(torch.tensor(self._last))
        greedy = [i for i, r in enumerate(self._rows) if r.config.temperature == 0 and r.seen is None]
        toks = [0] * n
        if greedy:
            best = logits[greedy].argmax(-1).tolist()
            for i, t in zip(greedy, best):
                toks[i] = t
        for i, req in enumerate(self._rows):
            if i not in greedy:
                toks[i] = self._sample(req, logits[i:i + 1])[0]
        for i, t in enumerate(toks):
            self._take_token(i, t)

    def _drop_done(self) -> None:
        for row in range(len(self._rows) - 1, -1, -1):
            req = self._rows[row]
            reason = req.done
            if reason is None and not req.cancelled:
                continue
            routing = self.engine.routing_decisions(row)
            moved = self.engine.remove(row)
            if moved is not None:
                self._rows[row], self._last[row] = self._rows[moved], self._last[moved]
            self._rows.pop()
            self._last.pop()
            if req.cancelled:
                self.hooks.finished(req, "cancelled", routing)
            else:
                self._finish(req, reason, routing)
        self.hooks.running(len(self._rows))


class SerialScheduler(_SchedulerBase):
    """Request-level serving for sessions without a step-level engine (the ORT/OM sessions): one request at a
    time through ``generate``, streaming through its ``on_text``; a cancelled request stops at its next token."""

    def __init__(self, session, max_batch: int = 1, max_queue: int = 64, hooks: Hooks | None = None):
        super().__init__(session, 1, max_queue, hooks)
        self.max_len = session.max_context
        self._current: Request | None = None

    def _free_rows(self) -> int:
        return 0 if self._current is not None or self._taken else 1

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._abort or (self._stopping and not self._waiting):
                    break
            for req in self._take_waiting(1):
                self._current = req
                self._placed()
                try:
                    self._serve(req)
                finally:
                    self._current = None
        for req in self._take_waiting(len(self._waiting)):
            self._fail(req, "the server shut down before the request finished", 503)

    def _serve(self, req: Request) -> None:
        if req.cancelled:
            self.hooks.finished(req, "cancelled", [])
            return
        acc = []

        def on_text(i, delta):
            if req.first_token_at is None:
                req.first_token_at = time.perf_counter()
                self.hooks.first_token(req.first_token_at - req.created)
            if req.cancelled or self._abort:
                raise _Cancelled
            acc.append(delta)
            if self._emit_text(req, "".join(acc), final=False) == "stop":
                raise _Cancelled

        self.hooks.running(1)
        try:
            with self.session.serialised():
                res = generate(self.session, req.batch, req.config, on_text)
                routing = self.session.routing_decisions()
        except _Cancelled:
            if not req.cancelled and not self._abort:  # a stop string matched
                req.token_ids = self.tokenizer(req.text, add_special_tokens=False).input_ids  # (usage only)
                self._finish(req, "stop", [], text=req.text)
            else:
                self.hooks.finished(req, "cancelled", [])
            return
        except Exception as e:  # noqa: BLE001
            self._fail(req, f"the model failed: {type(e).__name__}: {e}")
            return
        finally:
            self.hooks.running(0)
        req.token_ids = res.token_ids[0]
        self._finish(req, "stop" if res.finish_reasons[0] == "eos" else "length", routing, text=res.texts[0])


class _Cancelled(Exception):
    """A request of the serial scheduler stops early (cancelled, or a stop string matched)."""
