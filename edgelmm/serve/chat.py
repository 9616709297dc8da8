"""An OpenAI chat-completions request, checked field by field, with its images fetched and decoded
within the server's limits. Every problem is a RequestError that names the field the way OpenAI's
API does ("messages[1].content[2].image_url") and carries the HTTP status it deserves."""

from __future__ import annotations

import base64
import binascii
import io
import math
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

# What a decoded image may be, by the format PIL reads from its first bytes (not by the URL's claim).
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
# Request fields that change nothing here when they hold their default value; any other value is
# refused, as is any field not listed, so a client never gets silently different behaviour.
INERT_FIELDS = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "user": None,
                "metadata": None, "store": False, "parallel_tool_calls": None, "service_tier": None,
                "logit_bias": None, "top_logprobs": None}
MAX_STOP_STRINGS = 4


@dataclass
class Limits:
    """What one request may carry. The body limit follows from the image limits (base64 is 4/3 of
    the bytes) plus room for text."""
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 16
    max_output_tokens: int = 2048
    max_prompt_tokens: int | None = None          # default: the model's context window
    allow_files: str | None = None                # file:// images are read only under this folder
    allow_remote: bool = False                    # http(s):// images are fetched only when set
    remote_timeout_s: float = 10.0
    # video_url parts (models that read videos; vLLM's extension of the API): a clip file, decoded
    # with OpenCV and sampled at video_fps, at most max_video_frames frames of max_image_pixels each
    max_videos: int = 1
    max_video_bytes: int = 64 * 2**20
    max_video_frames: int = 32
    video_fps: float = 2.0

    @property
    def max_body_bytes(self) -> int:
        return (self.max_images * math.ceil(self.max_image_bytes * 4 / 3)
                + self.max_videos * math.ceil(self.max_video_bytes * 4 / 3) + 2**20)


class RequestError(Exception):
    """A request the server refuses: status, message, the field at fault (`param`) and a code."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict]              # edgelmm's prompt messages; image parts carry decoded PIL images
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    model: str | None = None
    image_count: int = 0
    image_bytes: int = 0
    video_count: int = 0


def _bad(message: str, param: str | None, code: str | None = None, status: int = 400) -> RequestError:
    return RequestError(status, message, param, code)


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if not lo <= value <= hi:
        raise _bad(f"{name} must be in [{lo}, {hi}], got {value}", name, "invalid_value")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    return value


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Check a decoded JSON body and fetch/decode its images. Raises RequestError."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None)
    known = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "stream", "stream_options", "ignore_eos"}
    for name, value in body.items():
        if name in known:
            continue
        if name in INERT_FIELDS:
            if value is not None and value != INERT_FIELDS[name]:
                raise _bad(f"{name}={value!r} is not supported by this server (only {INERT_FIELDS[name]!r})", name,
                           "unsupported_value")
            continue
        raise _bad(f"unrecognized request argument supplied: {name}", name, "unknown_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string, got {model!r}", "model", "invalid_type")

    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = limits.max_output_tokens
    _integer(max_tokens, name)
    if not 1 <= max_tokens <= limits.max_output_tokens:
        raise _bad(f"{name} must be in [1, {limits.max_output_tokens}], got {max_tokens}", name, "invalid_value")
    temperature = _number(body, "temperature", 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:
        raise _bad("top_p must be greater than 0", "top_p", "invalid_value")
    seed = body.get("seed")
    if seed is not None:
        _integer(seed, "seed")
        if seed < 0:
            raise _bad(f"seed must be >= 0, got {seed}", "seed", "invalid_value")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS}, got {stop!r}", "stop",
                   "invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad(f"stream_options must be {{'include_usage': bool}}, got {options!r}", "stream_options",
                   "invalid_type")
    # ignore_eos (as vLLM and llama.cpp's server take it): answers of exactly max_tokens, for load tests.
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos", "invalid_type")
    request = ChatRequest(messages=[], max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          stop=stops, stream=stream, include_usage=bool(options.get("include_usage")), model=model,
                          ignore_eos=ignore_eos)
    request.messages = _messages(body.get("messages"), limits, request)
    return request


def _messages(messages: Any, limits: Limits, request: ChatRequest) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {'role', 'content'} objects", "messages",
                   "invalid_type" if messages is not None else "missing_required_parameter")
    out = []
    for mi, m in enumerate(messages):
        where = f"messages[{mi}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role",
                       "invalid_value")
        role = "system" if role == "developer" else role
        if isinstance(content, str):
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of parts", f"{where}.content", "invalid_type")
        parts = []
        for pi, part in enumerate(content):
            pwhere = f"{where}.content[{pi}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{pwhere}.text must be a string", f"{pwhere}.text", "invalid_type")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "video_url"):
                parts.append(_media_part(part, kind, pwhere, role, limits, request))
            else:
                raise _bad(f"{pwhere}: unknown content part type {kind!r} (want 'text', 'image_url' or 'video_url')",
                           pwhere, "invalid_value")
        out.append({"role": role, "content": parts})
    return out


def _image(url: str, where: str, limits: Limits, request: ChatRequest) -> Image.Image:
    data = _image_bytes(url, where, limits)
    request.image_bytes += len(data)
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _bad(f"{where}: not an image ({exc})", where, "invalid_image") from None
    except Image.DecompressionBombError:
        img = None
    if img is None or img.width * img.height > limits.max_image_pixels:
        size = f"{img.width}x{img.height} pixels" if img is not None else "a decompression bomb"
        raise _bad(f"{where}: the image is {size}; this server takes at most {limits.max_image_pixels} pixels",
                   where, "image_too_large", status=413)
    if img.format not in IMAGE_FORMATS:
        raise _bad(f"{where}: {img.format} images are not taken (PNG, JPEG or WebP)", where, "invalid_image")
    try:
        img.load()  # decode now: a truncated or corrupt file is this request's error, not the decoder's
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _bad(f"{where}: the image cannot be decoded ({exc})", where, "invalid_image") from None
    return img


def _media_part(part: dict, kind: str, where: str, role: str, limits: Limits, request: ChatRequest) -> dict:
    """An image_url or video_url part -> edgelmm's image or video part, within the request's count."""
    what = kind.removesuffix("_url")  # "image" or "video"
    if role != "user":
        raise _bad(f"{where}: {what}s are only taken in user messages", where, "invalid_value")
    ref = part.get(kind)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise _bad(f"{where}.{kind} must be {{'url': string}}", f"{where}.{kind}", "invalid_type")
    if what == "image":
        request.image_count += 1
        count, most = request.image_count, limits.max_images
    else:
        request.video_count += 1
        count, most = request.video_count, limits.max_videos
    if count > most:
        raise _bad(f"more than {most} {what}s in one request (the server's --max-{what}s)", where, f"too_many_{what}s")
    decode = _image if what == "image" else _video
    return {"type": what, what: decode(url, f"{where}.{kind}", limits, request)}


def _video(url: str, where: str, limits: Limits, request: ChatRequest):
    """A video_url part's clip: its file's bytes (data:, file:// or http(s):// as for images), decoded
    with OpenCV (through a temporary file: OpenCV reads videos from paths) and sampled at the server's
    video fps; every frame within the image pixel limit."""
    import tempfile

    from ..errors import ImageError
    from ..video import VideoTooLarge, video_from_path

    data = _image_bytes(url, where, limits, what="video")
    request.image_bytes += len(data)
    with tempfile.TemporaryDirectory(prefix="edgelmm-video-") as tmp:
        path = Path(tmp) / "clip"
        path.write_bytes(data)
        try:
            clip = video_from_path(path, limits.video_fps, max_frames=limits.max_video_frames,
                                   max_pixels=limits.max_image_pixels)
        except ImageError as exc:  # named by the part, not by the temporary file
            status, code = (413, "video_too_large") if isinstance(exc, VideoTooLarge) else (400, "invalid_video")
            raise _bad(f"{where}: {str(exc).replace(repr(str(path)) + ': ', '')}", where, code, status=status) from None
    return clip


def _image_bytes(url: str, where: str, limits: Limits, what: str = "image") -> bytes:
    limit = limits.max_image_bytes if what == "image" else limits.max_video_bytes
    flag = "--max-image-mb" if what == "image" else "--max-video-mb"
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _bad(f"{where}: a data URL must be data:{what}/...;base64,<data>", where, f"invalid_{what}_url")
        if len(payload) * 3 // 4 > limit:
            raise _bad(f"{where}: the {what} is over {limit} bytes (the server's {flag})", where,
                       f"{what}_too_large", status=413)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"{where}: the data URL is not valid base64 ({exc})", where, f"invalid_{what}_url") from None
    if url.startswith("file://"):
        if not limits.allow_files:
            raise _bad(f"{where}: file:// {what}s are not enabled (start the server with --allow-files DIR)", where,
                       f"invalid_{what}_url")
        root = Path(limits.allow_files).resolve()
        path = Path(urllib.request.url2pathname(url[len("file://"):])).resolve()
        if not path.is_relative_to(root):
            raise _bad(f"{where}: {path} is outside the folder this server may read ({root})", where,
                       f"invalid_{what}_url")
        if not path.is_file():
            raise _bad(f"{where}: {path} is not a file", where, f"invalid_{what}_url")
        if path.stat().st_size > limit:
            raise _bad(f"{where}: the {what} is over {limit} bytes", where, f"{what}_too_large", status=413)
        return path.read_bytes()
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise _bad(f"{where}: remote {what} URLs are not fetched (send a data: URL, or start the server with "
                       "--allow-remote-images)", where, f"invalid_{what}_url")
        try:
            with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:  # noqa: S310 (opt-in)
                data = response.read(limit + 1)
        except (OSError, ValueError) as exc:
            raise _bad(f"{where}: could not fetch the {what} ({exc})", where, f"invalid_{what}_url") from None
        if len(data) > limit:
            raise _bad(f"{where}: the {what} is over {limit} bytes", where, f"{what}_too_large", status=413)
        return data
    scheme = url.split(":", 1)[0] if ":" in url else url[:20]
    raise _bad(f"{where}: unsupported {what} URL {scheme!r}... (want data:, file:// or http(s)://)", where,
               f"invalid_{what}_url")

