"""The HTTP side: an ASGI app (Starlette) with OpenAI's chat-completions, models, health and
Prometheus metrics endpoints. Starlette rather than FastAPI: the request schema is OpenAI's, checked
by edgelmm/serve/chat.py so that each error names its field in OpenAI's error shape (FastAPI's
pydantic models answer 422 in a shape of their own), and the device side installs two small
packages instead of pydantic's compiled core as well."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EdgeLMMError, ImageError, PromptError
from ..pipeline import Pipeline, SamplingParams
from .chat import RequestError, parse_chat_request
from .metrics import CONTENT_TYPE, Metrics
from .options import ServerOptions
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("edgelmm.serve")


class _State:
    def __init__(self, load: Callable[[], Pipeline], options: ServerOptions):
        self.load, self.options = load, options
        self.pipeline: Pipeline | None = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics()
        self.error: str | None = None
        self.closing = False
        self.model_id = options.model_name or "edgelmm"
        self.ready = threading.Event()

    def start(self) -> None:
        try:
            pipe = self.load()
            info = pipe.describe()
            self.metrics.set_model(str(info.get("backend", "unknown")), str(info.get("precision", "unknown")))
            self.model_id = self.options.model_name or pipe.files.root.name
            self.scheduler = Scheduler(pipe, self.metrics, self.options.max_batch, self.options.max_queue,
                                       self.options.batch_window_s)
            self.pipeline = pipe
        except Exception as exc:  # /health says why; requests get 503
            log.exception("loading the model failed")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(load: Pipeline | Callable[[], Pipeline], options: ServerOptions | None = None) -> Starlette:
    """The ASGI app over a Pipeline, or over `load`, which makes one: it runs in a thread at startup,
    so /health answers (503, loading) at once and turns 200 when the model is ready."""
    ready = load if isinstance(load, Pipeline) else None
    state = _State((lambda: ready) if ready is not None else load, options or ServerOptions())
    if ready is not None:
        state.start()
    api = _Endpoints(state)
    app = Starlette(routes=[Route("/health", api.health), Route("/v1/models", api.models),
                            Route("/metrics", api.metrics),
                            Route("/v1/chat/completions", api.chat_completions, methods=["POST"])],
                    exception_handlers={RequestError: api.on_request_error, HTTPException: api.on_http_error,
                                        ClientDisconnect: api.on_disconnect, Exception: api.on_any_error},
                    lifespan=api.lifespan)
    app.state.edgelmm = state
    return app


class _Endpoints:
    """The routes, error handlers and lifespan over one server's state."""

    def __init__(self, state: _State):
        self.state = state
        self.limits = state.options.limits

    # ---- checks every request goes through ----
    def authorized(self, request: Request) -> None:
        key = self.state.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", None,
                               "invalid_api_key")

    def ready_pipeline(self) -> Pipeline:
        state = self.state
        if state.closing:
            raise RequestError(503, "the server is shutting down", None, "shutting_down")
        if state.pipeline is None:
            if state.error:
                raise RequestError(503, f"the model failed to load: {state.error}", None, "model_not_loaded")
            raise RequestError(503, "the model is still loading; retry shortly", None, "model_loading")
        return state.pipeline

    async def read_json(self, request: Request) -> Any:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the request body is {declared} bytes; this server takes at most {limit}", None,
                               "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the request body is over {limit} bytes", None, "request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None

    def prepare(self, body: Any, pipe: Pipeline):
        chat = parse_chat_request(body, self.limits)
        try:
            prepared = pipe.prepare(chat.messages)
        except ImageError as exc:
            raise RequestError(400, str(exc), "messages", "invalid_image") from None
        except PromptError as exc:
            code = "context_length_exceeded" if "context window" in str(exc) else "invalid_prompt"
            raise RequestError(400, str(exc), "messages", code) from None
        most = self.limits.max_prompt_tokens
        if most is not None and len(prepared.input_ids) > most:
            raise RequestError(400, f"the prompt is {len(prepared.input_ids)} tokens; this server takes at most "
                               f"{most} (--max-prompt-tokens)", "messages", "context_length_exceeded")
        return chat, prepared

    # ---- routes ----
    async def health(self, request: Request) -> Response:
        state = self.state
        if state.pipeline is not None and not state.closing:
            info = state.pipeline.describe()
            return JSONResponse({"status": "ok", "model": state.model_id, "backend": info.get("backend"),
                                 "precision": info.get("precision"), "max_batch": state.options.max_batch})
        status = "shutting_down" if state.closing else "error" if state.error else "loading"
        return JSONResponse({"status": status, **({"error": state.error} if state.error else {})}, status_code=503)

    async def models(self, request: Request) -> Response:
        self.authorized(request)
        self.ready_pipeline()
        return JSONResponse({"object": "list", "data": [{"id": self.state.model_id, "object": "model",
                                                          "created": 0, "owned_by": "edgelmm"}]})

    async def metrics(self, request: Request) -> Response:
        return Response(self.state.metrics.exposition(), media_type=CONTENT_TYPE)

    async def chat_completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        self.authorized(request)
        pipe = self.ready_pipeline()
        body = await self.read_json(request)
        chat, prepared = await run_in_threadpool(self.prepare, body, pipe)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:  # from the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                job.cancelled.set()

        job = Job(prepared, SamplingParams(chat.max_tokens, chat.temperature, chat.top_p, chat.seed, chat.ignore_eos),
                  emit=emit, stop_strings=chat.stop, arrived=arrived)
        try:
            self.state.scheduler.submit(job)
        except QueueFull as exc:
            raise RequestError(429, str(exc), None, "queue_full") from None
        except ShuttingDown as exc:
            raise RequestError(503, str(exc), None, "shutting_down") from None
        answer = _Answer(self.state, chat, len(prepared.input_ids))
        if chat.stream:
            return StreamingResponse(self._stream(answer, job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(answer, job, events, request)

    async def _stream(self, answer: "_Answer", job: Job, events: asyncio.Queue):
        """Server-sent events in OpenAI's chunk format, ending with [DONE]."""
        ended = False
        try:
            yield answer.chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if event[0] == "text":
                    yield answer.chunk({"content": event[1]})
                elif event[0] == "error":
                    ended = True
                    self.state.metrics.request(event[1])
                    yield f"data: {json.dumps(RequestError(event[1], event[2]).body())}\n\n"
                    break
                else:
                    _, reason, completion = event
                    if reason == "cancelled":
                        break
                    ended = True
                    answer.counted(completion)
                    yield answer.chunk({}, reason)
                    if answer.chat.include_usage:
                        yield answer.chunk(None, usage=answer.usage(completion))
                    yield "data: [DONE]\n\n"
                    break
        finally:
            job.cancelled.set()  # a client that went away ends its row at the next decode step
            if not ended:
                self.state.metrics.request(499)

    async def _whole(self, answer: "_Answer", job: Job, events: asyncio.Queue, request: Request) -> Response:
        """The whole answer at once; a client that goes away while it is made cancels its row."""
        pieces = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.state.metrics.request(499)
                        return Response(status_code=499)
                    continue
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    raise RequestError(event[1], event[2], None, "generation_failed")
                else:
                    _, reason, completion = event
                    break
        finally:
            job.cancelled.set()
        if reason == "cancelled":
            self.state.metrics.request(499)
            return Response(status_code=499)
        answer.counted(completion)
        return JSONResponse({"id": answer.id, "object": "chat.completion", "created": answer.created,
                             "model": self.state.model_id, "system_fingerprint": None,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                          "logprobs": None, "finish_reason": reason}],
                             "usage": answer.usage(completion)})

    # ---- errors ----
    async def on_request_error(self, request: Request, exc: RequestError) -> Response:
        if request.url.path.startswith("/v1/chat"):
            self.state.metrics.request(exc.status)
        return _error(exc)

    async def on_http_error(self, request: Request, exc: HTTPException) -> Response:
        return _error(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                                   "not_found" if exc.status_code == 404 else None))

    async def on_disconnect(self, request: Request, exc: ClientDisconnect) -> Response:
        self.state.metrics.request(499)
        return Response(status_code=499)

    async def on_any_error(self, request: Request, exc: Exception) -> Response:
        log.exception("request failed")
        message = str(exc) if isinstance(exc, EdgeLMMError) else f"internal error: {type(exc).__name__}"
        return _error(RequestError(500, message, None, "internal_error"))

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        state = self.state
        if not state.ready.is_set():
            threading.Thread(target=state.start, name="edgelmm-load", daemon=True).start()
        yield
        state.closing = True
        if state.scheduler is not None:
            await run_in_threadpool(state.scheduler.close)


class _Answer:
    """One completion's identity and accounting: its id, its chunks, its usage and its metrics."""

    def __init__(self, state: _State, chat, prompt_tokens: int):
        self.state, self.chat, self.prompt_tokens = state, chat, prompt_tokens
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(self, completion: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def counted(self, completion: int) -> None:
        self.state.metrics.request(200)
        self.state.metrics.tokens(self.prompt_tokens, completion, self.chat.image_count)

    def chunk(self, delta: dict | None, finish: str | None = None, **extra) -> str:
        """A chat.completion.chunk event; delta None: the usage chunk, with no choices."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.state.model_id, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"
