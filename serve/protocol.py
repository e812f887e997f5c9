"""OpenAI's chat-completions request, checked field by field: what the server implements is taken, what it does not
is refused with a 400 naming the field (never silently ignored), and images come only from data URLs or, under
--allowed-media-dir, file:// paths (there is no network fetching).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import urllib.parse
from pathlib import Path


class ApiError(Exception):
    """An error the client gets as OpenAI's JSON body {"error": {message, type, param, code}} with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 503: "service_unavailable", 500: "internal_server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# Fields that are accepted only with their neutral value (anything else would change the answer in a way the
# server does not implement).
NEUTRAL = {"n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0, "parallel_tool_calls": None,
           "store": False}
NOT_IMPLEMENTED = ("tools", "tool_choice", "functions", "function_call", "top_logprobs", "logit_bias", "audio",
                   "prediction", "web_search_options", "reasoning_effort", "response_format", "modalities")
ACCEPTED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
            "stream", "stream_options", "user", "metadata", "top_k", "repetition_penalty", "service_tier",
            "ignore_eos")
MAX_STOP = 4
MAX_IMAGE_BYTES = 20 * 2**20


@dataclasses.dataclass
class ChatRequest:
    model: str
    question: str                  # the last user message's text
    history: list[tuple[str, str]]  # earlier (user, assistant) turns
    images: list                   # PIL images (of the first user message)
    max_tokens: int | None
    sampling: dict                 # temperature / top_p / seed / top_k / repetition_penalty given by the request
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False       # (vLLM's extension) generate max_tokens tokens whatever the model says


def parse_chat_request(body, allowed_media_dir: Path | None) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name in NOT_IMPLEMENTED:
        if body.get(name) not in (None, [], {}) and not (name == "response_format" and _is_text_format(body[name])):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] is not None and body[name] != neutral:
            raise bad(f"'{name}' must be {neutral} (or left out): this server does not implement other values",
                      name, "unsupported_parameter")
    unknown = sorted(set(body) - set(ACCEPTED) - set(NEUTRAL) - set(NOT_IMPLEMENTED))
    if unknown:
        raise bad(f"unknown field(s) {unknown}", unknown[0], "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string", "model")
    question, history, images = _messages(body.get("messages"), allowed_media_dir)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad(f"'{param}' must be a whole number >= 1, not {max_tokens!r}", param)
    sampling = {}
    t = body.get("temperature")
    if t is not None:
        if not _is_number(t) or not 0 <= t <= 2:
            raise bad(f"'temperature' must be a number in [0, 2], not {t!r}", "temperature")
        sampling["temperature"] = float(t)
    p = body.get("top_p")
    if p is not None:
        if not _is_number(p) or not 0 < p <= 1:
            raise bad(f"'top_p' must be a number in (0, 1], not {p!r}", "top_p")
        sampling["top_p"] = float(p)
    k = body.get("top_k")
    if k is not None:
        if not _is_int(k) or k < -1:
            raise bad(f"'top_k' must be a whole number >= 0 (0 or -1: off), not {k!r}", "top_k")
        sampling["top_k"] = max(int(k), 0)
    rp = body.get("repetition_penalty")
    if rp is not None:
        if not _is_number(rp) or rp <= 0:
            raise bad(f"'repetition_penalty' must be a number > 0, not {rp!r}", "repetition_penalty")
        sampling["repetition_penalty"] = float(rp)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not -2**63 <= seed < 2**64:
            raise bad(f"'seed' must be a whole number, not {seed!r}", "seed")
        sampling["seed"] = seed % 2**64
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("'stream_options' is only allowed with stream: true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise bad("'stream_options' may only hold 'include_usage'", "stream_options")
        include_usage = bool(opts.get("include_usage", False))
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("'ignore_eos' must be true or false", "ignore_eos")
    return ChatRequest(model, question, history, images, max_tokens, sampling, stop, stream, include_usage,
                       ignore_eos)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_text_format(x) -> bool:
    return isinstance(x, dict) and x.get("type") == "text"


def _messages(messages, media_dir):
    """-> (question, history [(user, assistant)], images). The families' prompt templates hold their own system
    prompt and put images in the first user turn, so that is what the server takes."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    texts, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role in ("system", "developer"):
            raise bad(f"{where}: {role} messages are not supported: the model's own system prompt is used",
                      f"{where}.role", "unsupported_parameter")
        if role not in ("user", "assistant"):
            raise bad(f"{where}.role must be 'user' or 'assistant', not {role!r}", f"{where}.role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise bad(f"{where}: the messages must alternate user, assistant, ..., user; {where} should be a "
                      f"{expected} message", f"{where}.role")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad(f"{where}: field(s) {extra} are not supported", f"{where}.{extra[0]}", "unsupported_parameter")
        text, imgs = _content(m.get("content"), f"{where}.content", media_dir, role)
        if imgs and i > 0:
            raise bad(f"{where}: images are taken only in the first user message (where the model's prompt "
                      "template places them)", f"{where}.content")
        texts.append(text)
        images.extend(imgs)
    if len(texts) % 2 == 0:
        raise bad("the last message must be a user message", f"messages[{len(texts) - 1}].role")
    history = [(texts[k], texts[k + 1]) for k in range(0, len(texts) - 1, 2)]
    return texts[-1], history, images


def _content(content, where, media_dir, role):
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of content parts", where)
    texts, images = [], []
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{w}.image_url.url must be a string", f"{w}.image_url")
            images.append(load_image_url(url, f"{w}.image_url", media_dir))
        else:
            raise bad(f"{w}: content part type {kind!r} is not supported (text, and image_url in user messages)",
                      w, "unsupported_parameter")
    return "\n".join(texts), images


def load_image_url(url: str, where: str, media_dir: Path | None):
    """A data:image/...;base64, URL or (under --allowed-media-dir) a file:// URL -> a decoded RGB PIL image."""
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
            raise bad(f"{where}: a data URL must look like data:image/png;base64,<data>", where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{where}: the data URL is not valid base64", where, "invalid_image") from None
        return _decode_image(raw, where)
    if url.startswith("file://"):
        if media_dir is None:
            raise bad(f"{where}: file:// URLs are refused: start the server with --allowed-media-dir DIR to allow "
                      "files under DIR", where, "invalid_image_url")
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
        if not path.is_relative_to(media_dir.resolve()):
            raise bad(f"{where}: {path} is not under the allowed media folder", where, "invalid_image_url")
        if not path.is_file():
            raise bad(f"{where}: {path} does not exist", where, "invalid_image_url")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise bad(f"{where}: the image is over {MAX_IMAGE_BYTES // 2**20} MiB", where, "invalid_image")
        return _decode_image(path.read_bytes(), where)
    scheme = url.split(":", 1)[0] if ":" in url else url[:20]
    raise bad(f"{where}: {scheme!r} URLs are refused: this server does not fetch from the network; send the image "
              "as a data:image/...;base64, URL", where, "invalid_image_url")


def _decode_image(raw: bytes, where: str):
    from PIL import Image

    if len(raw) > MAX_IMAGE_BYTES:
        raise bad(f"{where}: the image is over {MAX_IMAGE_BYTES // 2**20} MiB", where, "invalid_image")
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
        return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bad(f"{where}: the image is too large to decode ({e})", where, "invalid_image") from None
    except Exception:  # noqa: BLE001  PIL raises many kinds for a broken file
        raise bad(f"{where}: the image could not be decoded (not a PNG/JPEG/WebP/... image, or truncated)", where,
                  "invalid_image") from None
