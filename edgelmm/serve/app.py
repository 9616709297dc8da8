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
    limits = state.options.limits

    def authorized(request: Request) -> None:
        key = state.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", None,
                               "invalid_api_key")

    def ready_pipeline() -> Pipeline:
        if state.closing:
            raise RequestError(503, "the server is shutting down", None, "shutting_down")
        if state.pipeline is None:
            if state.error:
                raise RequestError(503, f"the model failed to load: {state.error}", None, "model_not_loaded")
            raise RequestError(503, "the model is still loading; retry shortly", None, "model_loading")
        return state.pipeline

    async def health(request: Request) -> Response:
        if state.pipeline is not None and not state.closing:
            info = state.pipeline.describe()
            return JSONResponse({"status": "ok", "model": state.model_id, "backend": info.get("backend"),
                                 "precision": info.get("precision"), "max_batch": state.options.max_batch})
        status = "shutting_down" if state.closing else "error" if state.error else "loading"
        return JSONResponse({"status": status, **({"error": state.error} if state.error else {})}, status_code=503)

    async def models(request: Request) -> Response:
        authorized(request)
        ready_pipeline()
        return JSONResponse({"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                                          "owned_by": "edgelmm"}]})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    async def read_json(request: Request) -> Any:
        limit = limits.max_body_bytes
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

    def prepare(body: Any, pipe: Pipeline):
        chat = parse_chat_request(body, limits)
        try:
            prepared = pipe.prepare(chat.messages)
        except ImageError as exc:
            raise RequestError(400, str(exc), "messages", "invalid_image") from None
        except PromptError as exc:
            code = "context_length_exceeded" if "context window" in str(exc) else "invalid_prompt"
            raise RequestError(400, str(exc), "messages", code) from None
        most = limits.max_prompt_tokens
        if most is not None and len(prepared.input_ids) > most:
            raise RequestError(400, f"the prompt is {len(prepared.input_ids)} tokens; this server takes at most "
                               f"{most} (--max-prompt-tokens)", "messages", "context_length_exceeded")
        return chat, prepared

    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        authorized(request)
        pipe = ready_pipeline()
        body = await read_json(request)
        chat, prepared = await run_in_threadpool(prepare, body, pipe)
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
            state.scheduler.submit(job)
        except QueueFull as exc:
            raise RequestError(429, str(exc), None, "queue_full") from None
        except ShuttingDown as exc:
            raise RequestError(503, str(exc), None, "shutting_down") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = len(prepared.input_ids)

        def usage(completion: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def answered(completion: int) -> None:
            state.metrics.request(200)
            state.metrics.tokens(prompt_tokens, completion, chat.image_count)

        if chat.stream:
            def chunk(delta: dict, finish: str | None = None, **extra) -> str:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
                return f"data: {json.dumps(body)}\n\n"

            async def sse():
                ended = False
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        event = await events.get()
                        if event[0] == "text":
                            yield chunk({"content": event[1]})
                        elif event[0] == "error":
                            ended = True
                            state.metrics.request(event[1])
                            yield f"data: {json.dumps(RequestError(event[1], event[2]).body())}\n\n"
                            break
                        else:
                            _, reason, completion = event
                            if reason == "cancelled":
                                break
                            ended = True
                            answered(completion)
                            yield chunk({}, reason)
                            if chat.include_usage:
                                body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                        "model": state.model_id, "choices": [], "usage": usage(completion)}
                                yield f"data: {json.dumps(body)}\n\n"
                            yield "data: [DONE]\n\n"
                            break
                finally:
                    job.cancelled.set()  # a client that went away ends its row at the next decode step
                    if not ended:
                        state.metrics.request(499)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        pieces = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        state.metrics.request(499)
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
            state.metrics.request(499)
            return Response(status_code=499)
        answered(completion)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_id,
                             "system_fingerprint": None,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                          "logprobs": None, "finish_reason": reason}],
                             "usage": usage(completion)})

    async def on_request_error(request: Request, exc: RequestError) -> Response:
        if request.url.path.startswith("/v1/chat"):
            state.metrics.request(exc.status)
        return _error(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        return _error(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                                   "not_found" if exc.status_code == 404 else None))

    async def on_disconnect(request: Request, exc: ClientDisconnect) -> Response:
        state.metrics.request(499)
        return Response(status_code=499)

    async def on_any_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed")
        message = str(exc) if isinstance(exc, EdgeLMMError) else f"internal error: {type(exc).__name__}"
        return _error(RequestError(500, message, None, "internal_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not state.ready.is_set():
            threading.Thread(target=state.start, name="edgelmm-load", daemon=True).start()
        yield
        state.closing = True
        if state.scheduler is not None:
            await run_in_threadpool(state.scheduler.close)

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                    exception_handlers={RequestError: on_request_error, HTTPException: on_http_error,
                                        ClientDisconnect: on_disconnect, Exception: on_any_error},
                    lifespan=lifespan)
    app.state.edgelmm = state
    return app
