"""`edgelmm watch --view`: a read-only page in the browser showing, per camera, the latest frame
with the gate's per-cell scores as a heat-map, the score over time against the threshold, and the
event list with the verifier's answers, updating live over server-sent events.

The page has no external assets (it works on a plant network with no internet) and the server is
the standard library's threaded HTTP server: the view adds no dependency to the device. Only GET
is served, on a fixed set of paths; the address defaults to 127.0.0.1 (a camera feed is not
something to publish to a network by accident).

  /                    the page
  /api/state           everything the page draws, as JSON
  /stream              server-sent events: `frame` (a camera's latest gated frame: score, cells),
                       `anomaly` (an event with its verdict), `camera` (a camera's summary at its end)
  /frame/<camera>.jpg  the camera's latest gated frame
  /thumb/<camera>/<n>.jpg  the frame event n fired on

A CameraView is a watcher's sink (events, summary) and its on_frame callback (every gated frame);
frames are JPEG-encoded only when asked for, or when over the threshold (the events' thumbnails)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import numpy as np

from ..errors import OptionError
from .sinks import check_camera_name

log = logging.getLogger("edgelmm.watch")

FRAME_MESSAGES_PER_S = 10      # per client: a 30 fps camera is not worth 30 redraws a second
KEEPALIVE_S = 10.0
THUMB_WIDTH = 320


def parse_view_address(address: str) -> tuple[str, int]:
    """':8080' -> ('127.0.0.1', 8080); 'host:port' as given (0.0.0.0 to listen on every interface)."""
    host, sep, port = (address or "").rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise OptionError(f"--view {address!r}: want [host]:port, e.g. :8080 (this machine only) or 0.0.0.0:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def encode_jpeg(image: np.ndarray, width: int | None = None, quality: int = 80) -> bytes:
    from PIL import Image

    pil = Image.fromarray(image)
    if width and pil.width > width:
        pil = pil.resize((width, max(1, round(pil.height * width / pil.width))), Image.BILINEAR)
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _round(values, digits=4) -> list[float]:
    return [round(float(v), digits) for v in values]


class CameraView:
    """One camera's part of the view: pass it to the watcher as a sink and as on_frame."""

    def __init__(self, view: "LiveView", name: str):
        self.view, self.name = view, name
        self.running = True
        self.final: dict[str, Any] | None = None    # the run's summary once it ended
        self.latest: dict[str, Any] | None = None   # the latest gated frame's numbers
        self._latest_image: np.ndarray | None = None
        self._latest_jpeg: tuple[int, bytes] | None = None
        self.scores: deque[tuple[float, float | None, float | None]] = deque(maxlen=view.history)
        self.events: list[dict[str, Any]] = []
        self._thumbs: list[bytes | None] = []
        self._over: OrderedDict[int, tuple[bytes, list[float]]] = OrderedDict()   # recent unusual frames
        self._started = time.monotonic()

    # ---- from the watcher (gate thread) ----
    def frame(self, gated, decision) -> None:
        index = gated.frame.index
        cells = _round(decision.cells) if decision.cells is not None else None
        # A frame over the threshold or in an episode is kept for the event that may follow (events
        # name the frame they fired on); normal frames are not encoded unless a page asks.
        thumb = encode_jpeg(gated.frame.image, THUMB_WIDTH) if decision.over or decision.in_episode else None
        with self.view.cond:
            if thumb is not None:
                self._over[index] = (thumb, cells)
                while len(self._over) > 64:
                    self._over.popitem(last=False)
            self._latest_image = gated.frame.image
            t = round(time.monotonic() - self._started, 3)
            self.latest = {"camera": self.name, "index": index, "t": t, "score": decision.score,
                           "threshold": decision.threshold, "in_episode": decision.in_episode,
                           "warming_up": decision.score is None, "cells": cells, "layout": decision.layout,
                           "height": int(gated.frame.image.shape[0]), "width": int(gated.frame.image.shape[1])}
            self.scores.append((t, decision.score, decision.threshold))
            self.view.changed()

    # ---- the Sink interface (verifier thread, then the camera's thread at the end) ----
    def event(self, record: dict[str, Any]) -> None:
        with self.view.cond:
            over = self._over.get(record.get("frame_index"))
            number = len(self.events)
            self._thumbs.append(over[0] if over else None)
            kept = {k: record.get(k) for k in ("episode", "check", "frame_index", "first_frame_index",
                                               "stream_time_s", "gate_score", "threshold", "snapshot", "time")}
            kept.update(number=number, camera=self.name, verifier=record.get("verifier"),
                        cells=over[1] if over else None,
                        thumb=f"/thumb/{urllib.parse.quote(self.name)}/{number}.jpg" if over else None)
            self.events.append(kept)
            oldest = len(self.events) - 1 - self.view.max_events   # beyond max_events the oldest go
            if oldest >= 0:
                self.events[oldest] = self._thumbs[oldest] = None
            self.view.publish("anomaly", kept)

    def summary(self, record: dict[str, Any]) -> None:
        with self.view.cond:
            self.final = {k: record.get(k) for k in ("stop_reason", "processed", "dropped", "events", "fps",
                                                      "gate_ms", "verifier_ms")}
            self.view.publish("camera", {"camera": self.name, "summary": self.final})

    def close(self) -> None:
        with self.view.cond:
            self.running = False
            self.view.changed()

    def describe(self) -> dict[str, Any]:
        return {"sink": "view", "url": self.view.url, "events": len(self.events)}

    # ---- for the server ----
    def state(self) -> dict[str, Any]:
        return {"name": self.name, "running": self.running, "latest": self.latest, "summary": self.final,
                "scores": list(self.scores), "events": [e for e in self.events if e is not None],
                "events_total": len(self.events)}

    def latest_jpeg(self) -> bytes | None:
        with self.view.cond:
            image, index = self._latest_image, self.latest and self.latest["index"]
            cached = self._latest_jpeg
        if image is None:
            return None
        if cached is None or cached[0] != index:
            cached = (index, encode_jpeg(image))
            self._latest_jpeg = cached
        return cached[1]

    def thumb(self, number: int) -> bytes | None:
        with self.view.cond:
            return self._thumbs[number] if 0 <= number < len(self._thumbs) else None


class LiveView:
    """The view's server. `address` as for --view (':8080'; port 0 picks a free one: see .url)."""

    def __init__(self, address: str = ":8080", history: int = 600, max_events: int = 500, max_clients: int = 16,
                 max_connections: int = 64, idle_timeout_s: float = 10.0):
        """`max_clients`: live streams at once; `max_connections`: connections of any kind at once
        (one thread each), more are closed at once; `idle_timeout_s`: a connection that sends no
        request (or a stream whose reader stops reading) for this long is dropped, so idle sockets
        cannot hold every slot."""
        self.host, self.port = parse_view_address(address)
        self.history, self.max_events, self.max_clients = history, max_events, max_clients
        self.max_connections, self.idle_timeout_s = max_connections, idle_timeout_s
        self.cameras: dict[str, CameraView] = {}
        self.cond = threading.Condition()
        self.version = 0                     # bumped on every change; streams wait on it
        self.messages: deque[tuple[int, str, dict]] = deque(maxlen=1000)   # (seq, kind, data) for the streams
        self.seq = 0
        self.clients = 0
        self.closing = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def camera(self, name: str) -> CameraView:
        check_camera_name(name)
        with self.cond:
            if name in self.cameras:
                raise OptionError(f"the view already has a camera named {name!r}")
            self.cameras[name] = CameraView(self, name)
            self.changed()
            return self.cameras[name]

    def changed(self) -> None:   # with self.cond held
        self.version += 1
        self.cond.notify_all()

    def publish(self, kind: str, data: dict) -> None:   # with self.cond held
        self.seq += 1
        self.messages.append((self.seq, kind, data))
        self.changed()

    def state(self) -> dict[str, Any]:
        with self.cond:
            return {"cameras": [c.state() for c in self.cameras.values()], "seq": self.seq}

    # ---- server ----
    def start(self) -> "LiveView":
        handler = type("Handler", (_Handler,), {"view": self, "timeout": self.idle_timeout_s})
        try:
            self._server = _BoundedServer((self.host, self.port), handler, self.max_connections)
        except OSError as exc:
            raise OptionError(f"--view {self.host}:{self.port}: cannot listen there "
                              f"({exc.strerror or type(exc).__name__})") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgelmm-view", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.changed()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `limit` at once: beyond it a connection is closed unanswered."""

    daemon_threads = True

    def __init__(self, address, handler, limit: int):
        self._slots = threading.BoundedSemaphore(limit)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    view: LiveView
    server_version = "edgelmm-view"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):   # requests are not worth a line each on the watcher's stderr
        log.debug("view: " + fmt, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def do_GET(self):  # noqa: N802 (the http.server name)
        try:
            self._get()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):   # the browser went away or stalled
            pass

    def _method_not_allowed(self):
        self.send_response(405)
        self.send_header("Allow", "GET")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _get(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        view = self.view
        if not parts:
            page = resources.files(__package__).joinpath("view.html").read_bytes()
            self._send(200, page, "text/html; charset=utf-8")
        elif parts == ["api", "state"]:
            self._send(200, json.dumps(view.state()).encode(), "application/json")
        elif parts == ["stream"]:
            self._stream()
        elif len(parts) == 2 and parts[0] == "frame" and parts[1].endswith(".jpg"):
            camera = view.cameras.get(parts[1][:-4])
            body = camera.latest_jpeg() if camera else None
            self._send(200, body, "image/jpeg") if body else self._not_found()
        elif len(parts) == 3 and parts[0] == "thumb" and parts[2].endswith(".jpg") and parts[2][:-4].isdigit():
            camera = view.cameras.get(parts[1])
            body = camera.thumb(int(parts[2][:-4])) if camera else None
            self._send(200, body, "image/jpeg") if body else self._not_found()
        else:
            self._not_found()

    def _stream(self) -> None:
        view = self.view
        with view.cond:
            if view.clients >= view.max_clients:
                self._send(503, b"too many viewers\n", "text/plain; charset=utf-8")
                return
            view.clients += 1
            seen_seq, seen_version = view.seq, -1
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            sent_index: dict[str, int] = {}
            last_write = time.monotonic()
            while True:
                with view.cond:
                    if view.version == seen_version and not view.closing:
                        view.cond.wait(timeout=KEEPALIVE_S)
                    if view.closing:
                        return
                    seen_version = view.version
                    out = [(kind, data) for seq, kind, data in view.messages if seq > seen_seq]
                    seen_seq = view.seq
                    for name, camera in view.cameras.items():   # only each camera's latest frame
                        if camera.latest and camera.latest["index"] != sent_index.get(name):
                            out.append(("frame", camera.latest))
                            sent_index[name] = camera.latest["index"]
                now = time.monotonic()
                chunk = "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in out)
                if not chunk and now - last_write >= KEEPALIVE_S:
                    chunk = ": keepalive\n\n"
                if chunk:
                    self.wfile.write(chunk.encode())
                    self.wfile.flush()
                    last_write = now
                    time.sleep(1.0 / FRAME_MESSAGES_PER_S)   # what arrives meanwhile goes in the next chunk
        finally:
            with view.cond:
                view.clients -= 1
