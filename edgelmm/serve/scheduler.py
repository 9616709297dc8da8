"""The queue in front of a Pipeline: requests wait in a bounded queue, and one worker thread takes
up to `max_batch` of them at a time (those that arrived within `window_s` of the first) and decodes
them together with Pipeline.stream_batch, a decode step at a time. A row leaves the batch when it
ends (EOS, its max_tokens, one of its stop strings) or its client goes away; rows join only between
batches (no backend here can prefill a new row into a cache that is decoding others).

Each request gets its events (text pieces, then the end) through a callback the worker calls, so
the HTTP side can be async while the model runs in its own thread."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..errors import EdgeLMMError
from ..pipeline import Pipeline, PreparedPrompt, SamplingParams
from .metrics import Metrics

log = logging.getLogger("edgelmm.serve")


class QueueFull(Exception):
    """The queue holds as many requests as it may: the client should retry later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (HTTP 503)."""


@dataclass
class Job:
    prepared: PreparedPrompt
    params: SamplingParams
    emit: Callable[[tuple], None]          # called from the worker: ("text", piece) ... then ("end", ...)
    stop_strings: list[str] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Row:
    """One request's answer as it grows: the tokens, the text shown so far, and whether a stop
    string has ended it. Text that could still become a stop string is held back."""

    def __init__(self, job: Job, pipeline: Pipeline):
        self.job, self.pipeline = job, pipeline
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False
        self.text = ""
        self.last = None
        self.hold = max((len(s) for s in job.stop_strings), default=1) - 1

    def add(self, token: int) -> None:
        now = time.perf_counter()
        self.ids.append(token)
        text = self.pipeline.decode_text(self.ids)
        for s in self.job.stop_strings:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        ready = len(text) if self.stopped else len(text) - self.hold
        if text.endswith("\ufffd") and not self.stopped:  # half of a multi-byte character: wait for the rest
            ready = min(ready, len(text) - 1)
        if ready > self.shown:
            self.job.emit(("text", text[self.shown:ready]))
            self.shown = ready
        self.text = text
        self.last = now

    def finish(self, reason: str) -> None:
        text = self.pipeline.decode_text(self.ids) if not self.stopped else self.text
        if len(text) > self.shown:
            self.job.emit(("text", text[self.shown:]))
        self.job.emit(("end", reason, len(self.ids)))


class Scheduler:
    def __init__(self, pipeline: Pipeline, metrics: Metrics, max_batch: int = 4, max_queue: int = 64,
                 window_s: float = 0.005):
        self.pipeline, self.metrics = pipeline, metrics
        self.max_batch, self.max_queue, self.window_s = max_batch, max_queue, window_s
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._loaded = False
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="edgelmm-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the server's --max-queue); retry later")
            self._pending.append(job)
            self.metrics.queue_depth(len(self._pending))
            self._cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Take no new work; finish what is queued and running, then stop the worker."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._closing:
                self._cv.wait()
            if not self._pending:
                return None
            # Wait for company only under load (the last batch had several rows, or others were
            # waiting): a lone client would pay the window on every request for nothing.
            deadline = time.perf_counter() + (self.window_s if self._loaded else 0.0)
            while len(self._pending) < self.max_batch and not self._closing:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            self._loaded = len(batch) > 1 or bool(self._pending)
            self.metrics.queue_depth(len(self._pending))
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = []
            for job in batch:
                if job.cancelled.is_set():
                    job.emit(("end", "cancelled", 0))
                else:
                    live.append(job)
            if live:
                self._run(live)

    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.metrics.batch(len(jobs))
        self.metrics.running(len(jobs))
        rows = [_Row(job, self.pipeline) for job in jobs]
        ended = [False] * len(rows)

        def stop(i: int) -> bool:
            return rows[i].stopped or jobs[i].cancelled.is_set()

        try:
            for i, token in self.pipeline.stream_batch([j.prepared for j in jobs], [j.params for j in jobs], stop):
                row = rows[i]
                if row.last is None:
                    self.metrics.first_token(time.perf_counter() - jobs[i].arrived)
                else:
                    self.metrics.next_token(time.perf_counter() - row.last)
                row.add(token)
            for i, row in enumerate(rows):
                eos = bool(row.ids) and row.ids[-1] in self.pipeline.eos_ids and not jobs[i].params.ignore_eos
                reason = ("cancelled" if jobs[i].cancelled.is_set() and not row.stopped
                          else "stop" if row.stopped or eos else "length")
                row.finish(reason)
                ended[i] = True
                if reason == "cancelled":
                    self.metrics.cancelled(len(row.ids))
                self.metrics.finished(time.perf_counter() - jobs[i].arrived)
        except EdgeLMMError as exc:
            for i, job in enumerate(jobs):
                if not ended[i]:
                    job.emit(("error", 400, str(exc)))
        except Exception as exc:  # the server stays up; the requests of this batch get a 500
            log.exception("decoding a batch failed")
            for i, job in enumerate(jobs):
                if not ended[i]:
                    job.emit(("error", 500, f"the backend failed: {type(exc).__name__}: {exc}"))
        finally:
            self.metrics.running(0)
