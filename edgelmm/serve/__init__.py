"""`edgelmm serve`: an OpenAI-compatible HTTP server over a bundle (the `serve` extra: starlette,
uvicorn, prometheus-client; no torch). The pieces, each in its own file: chat.py checks a request
and decodes its images within the limits, scheduler.py batches requests in front of the Pipeline,
metrics.py keeps the Prometheus series, app.py is the ASGI app.

    from edgelmm.serve import Server, ServerOptions
    with Server(edgelmm.load("bundle"), ServerOptions(max_batch=4), port=8000) as server:
        print(server.url)   # http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import socket
import threading

from ..errors import BackendUnavailable
from .chat import Limits, RequestError
from .options import ServerOptions

__all__ = ["Limits", "RequestError", "Server", "ServerOptions"]



def _server_packages():
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise BackendUnavailable(f"the server needs the serve extra: pip install 'edgelmm[serve]' ({exc})") from None
    return uvicorn, create_app


class Server:
    """The server over a Pipeline (or a function that loads one at startup, while /health says
    "loading"), on a socket it binds itself (port 0 takes a free one: `port` says which). `run()`
    serves in this thread until SIGINT/SIGTERM, then finishes the requests in flight; `start()` /
    `stop()` (or `with`) serve from a background thread, as tests and embedding programs want."""

    def __init__(self, load, options: ServerOptions | None = None, host: str = "127.0.0.1",
                 port: int = 8000, graceful_timeout_s: float = 60.0, log_level: str = "warning"):
        uvicorn, create_app = _server_packages()
        self.app = create_app(load, options)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise BackendUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.socket.listen(128)
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def state(self):
        return self.app.state.edgelmm

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model has loaded (or failed to: `state.error`)."""
        return self.state.ready.wait(timeout)

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.run, name="edgelmm-server", daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
