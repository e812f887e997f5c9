"""The OpenAI-compatible HTTP API (FastAPI): ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics``. A thin layer over ``moevl.load`` and the scheduler; the same app runs under uvicorn
(``moevl serve``) and as a Ray Serve deployment (``moevl.serve.ray_app``).

    app = create_app(ServerConfig("awaker-tiny", device="cpu"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import inspect
import json
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moevl.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from moevl.serve.protocol import ApiError, ChatRequest, bad, parse_chat_request
from moevl.serve.scheduler import QueueFull, Request as EngineRequest, Scheduler, SerialScheduler, ShuttingDown


@dataclasses.dataclass
class ServerConfig:
    """What ``moevl serve`` takes (see its --help)."""

    model: str
    device: str = "auto"
    backend: str = "torch"
    dtype: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_context: int | None = None  # per request (prompt + answer); default min(the model's, 4096)
    api_key: str | None = None
    allowed_media_dir: str | None = None
    served_model_name: str | None = None
    shutdown_timeout: float = 30.0
    load_options: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name or self.model


DEFAULT_MAX_CONTEXT = 4096  # the KV cache is preallocated for max_batch x this


class Server:
    """The loaded model and its scheduler. ``start()`` loads in a background thread (``/health`` answers 503
    until it is done); ``close()`` shuts down gracefully."""

    def __init__(self, cfg: ServerConfig, session=None):
        self.cfg = cfg
        self.metrics = Metrics(cfg.name)
        self.session = session
        self.scheduler = None
        self.error: str | None = None
        self.exception: BaseException | None = None  # what loading raised
        self.media_dir = Path(cfg.allowed_media_dir).resolve() if cfg.allowed_media_dir else None
        self.created = int(time.time())
        self._loader: threading.Thread | None = None
        self.on_error = None  # called (from the loading thread) when the model cannot be loaded

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.scheduler.alive

    def start(self, background: bool = True) -> None:
        if background:
            self._loader = threading.Thread(target=self._load, name="moevl-load", daemon=True)
            self._loader.start()
        else:
            self._load()

    def _load(self) -> None:
        import moevl

        cfg = self.cfg
        try:
            if self.session is None:
                opts = {k: v for k, v in cfg.load_options.items() if v is not None}
                if cfg.max_context is not None:
                    opts["max_context"] = cfg.max_context
                self.session = moevl.load(cfg.model, device=cfg.device, backend=cfg.backend, dtype=cfg.dtype, **opts)
            s = self.session
            if hasattr(s, "batch_engine"):
                max_len = cfg.max_context or min(s.max_context, DEFAULT_MAX_CONTEXT)
                sched = Scheduler(s, cfg.max_batch, cfg.max_queue, self.metrics, max_len=max_len)
            else:
                sched = SerialScheduler(s, 1, cfg.max_queue, self.metrics)
            sched.start()
            self.scheduler = sched
        except Exception as e:  # noqa: BLE001  reported by /health and the log
            self.error, self.exception = f"{type(e).__name__}: {e}", e
            import logging

            logging.getLogger("moevl.serve").error("the model could not be loaded: %s", self.error)
            if self.on_error is not None:
                self.on_error()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop(self.cfg.shutdown_timeout)

    # -- one chat completion
    def prepare(self, chat: ChatRequest) -> EngineRequest:
        """(in a worker thread) the prompt batch and the generation settings, or a 400."""
        s, sched = self.session, self.scheduler
        proc = s.processor
        if chat.history and "history" not in inspect.signature(proc.chat).parameters:
            raise bad(f"multi-turn conversations are not supported by the {s.family} family's prompt template: "
                      "send one user message", "messages")
        for text in [chat.question, *(t for turn in chat.history for t in turn)]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("the messages hold text that is not valid UTF-8 (a lone surrogate)", "messages") from None
        try:
            kw = {"history": chat.history} if chat.history else {}
            prompt = proc.chat(chat.question, num_images=len(chat.images), **kw)
            batch = proc([prompt], [chat.images], max_length=sched.max_len)
        except ValueError as e:
            raise bad(str(e), "messages") from None
        n_prompt = int(batch.input_ids.shape[1])
        room = sched.max_len - n_prompt
        if room < 1:
            raise bad(f"the prompt ({n_prompt} tokens) fills the context of {sched.max_len} tokens: shorten the "
                      "messages or use smaller images", "messages", "context_length_exceeded")
        max_new = chat.max_tokens
        if max_new is None:
            max_new = min(s.generation_defaults.get("max_new_tokens", room), room)
        elif n_prompt + max_new > sched.max_len:
            raise bad(f"the prompt ({n_prompt} tokens) + max_tokens ({max_new}) exceeds the context of "
                      f"{sched.max_len} tokens: lower max_tokens or shorten the messages", "max_tokens",
                      "context_length_exceeded")
        try:
            config, _ = s.generation_config(max_new_tokens=max_new, **chat.sampling)
        except ValueError as e:
            raise bad(str(e)) from None
        if chat.ignore_eos and not isinstance(sched, Scheduler):
            raise bad("'ignore_eos' needs the torch backend (the exported graphs' loop stops at the end token)",
                      "ignore_eos", "unsupported_parameter")
        return EngineRequest(batch=batch, config=config, stop=chat.stop, events=None, prompt_tokens=n_prompt,
                             ignore_eos=chat.ignore_eos)


def create_app(cfg: ServerConfig | None = None, server: Server | None = None, load: bool = True,
               close: bool | None = None) -> FastAPI:
    """The FastAPI app. ``server``: an existing Server (or one is made from ``cfg``); ``load``: start loading it
    in the background when the app starts (lifespan); ``close`` (default: ``load``): shut it down gracefully when
    the app stops."""
    server = server or Server(cfg)
    close = load if close is None else close

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load:
            server.start()
        yield
        if close:
            await run_in_threadpool(server.close)

    app = FastAPI(title="moevl", lifespan=lifespan)
    app.state.server = server
    install_routes(app, server)
    return app


def install_routes(app: FastAPI, server: Server) -> None:
    cfg = server.cfg

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(server, e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(server, ApiError(e.status_code, str(e.detail)), count=False)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return error_response(server, bad(str(e)))

    def check_auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_ready() -> None:
        if not server.ready:
            why = f"the model failed to load: {server.error}" if server.error else "the model is still loading"
            raise ApiError(503, why, retry_after=None if server.error else 5)

    @app.get("/health")
    async def health():
        if server.ready:
            return {"status": "ok"}
        why = f"the model failed to load: {server.error}" if server.error else "loading"
        return JSONResponse({"status": why}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        card = {"id": cfg.name, "object": "model", "created": server.created, "owned_by": "moevl"}
        if server.ready:
            card["max_model_len"] = server.scheduler.max_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise bad("the request body is not valid JSON") from None
        chat = await run_in_threadpool(parse_chat_request, body, server.media_dir)
        if chat.model != cfg.name:
            raise ApiError(404, f"the model '{chat.model}' does not exist: this server serves '{cfg.name}' "
                                "(GET /v1/models)", "model", "model_not_found")
        check_ready()
        req = await run_in_threadpool(server.prepare, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.events = lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data))
        try:
            server.scheduler.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}): retry later", code="queue_full", retry_after=1) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), retry_after=5) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if chat.stream:
            return StreamingResponse(stream(server, req, events, chat, rid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await complete(server, request, req, events, rid, created)


def error_response(server: Server, e: ApiError, count: bool = True) -> JSONResponse:
    if count:
        server.metrics.request(e.status)
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def complete(server, request, req, events, rid, created):
    """A non-streaming completion; a client that goes away cancels its request."""
    watch = asyncio.ensure_future(_disconnected(request))
    text = []
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                req.cancel()
                server.metrics.request("cancelled")
                return Response(status_code=499)
            kind, data = get.result()
            if kind == "token":
                text.append(data["text"])
            elif kind == "error":
                raise ApiError(data["status"], data["message"], retry_after=5 if data["status"] == 503 else None)
            else:
                break
    finally:
        watch.cancel()
    server.metrics.request(200)
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": server.cfg.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": data["text"]},
                     "finish_reason": data["finish_reason"], "logprobs": None}],
        "usage": data["usage"],
        "moevl_routing": data["routing"],
    }


async def stream(server, req, events, chat, rid, created):
    """Server-sent events: a role chunk, one chunk per text delta, the finish chunk (with the routing), the usage
    chunk if asked, then [DONE]. A client that goes away cancels its request (this generator is closed)."""
    name = server.cfg.name

    def chunk(delta, finish=None, **extra):
        c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        if chat.include_usage:
            c["usage"] = None
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    done = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, data = await events.get()
            if kind == "token":
                yield chunk({"content": data["text"]})
            elif kind == "error":
                err = ApiError(data["status"], data["message"])
                server.metrics.request(err.status)
                done = True
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            else:
                yield chunk({}, data["finish_reason"], moevl_routing=data["routing"])
                if chat.include_usage:
                    u = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                         "choices": [], "usage": data["usage"]}
                    yield f"data: {json.dumps(u)}\n\n"
                server.metrics.request(200)
                done = True
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client went away (or the server is stopping): free the batch slot
            req.cancel()
            server.metrics.request("cancelled")


class ThreadedServer:
    """uvicorn serving ``app`` from a background thread on an ephemeral 127.0.0.1 port (tests, benchmarks).

        with ThreadedServer(create_app(cfg)) as srv:
            OpenAI(base_url=srv.url + "/v1", api_key="-")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, graceful_timeout: int | None = None):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, ready_timeout: float = 120.0) -> "ThreadedServer":
        import urllib.error
        import urllib.request

        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    raise
                if b"failed to load" in e.read():
                    raise RuntimeError("the model failed to load (GET /health)") from None
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the server at {self.url} was not ready within {ready_timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
