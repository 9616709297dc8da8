"""The server's Prometheus metrics, in a registry of its own (two servers in one process, as in the
tests, do not share counters). Every series carries the backend and precision that answered."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # a `_created` timestamp beside every series only doubles the page

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, backend: str = "unknown", precision: str = "unknown"):
        self.registry = CollectorRegistry()
        self.labels = {"backend": backend, "precision": precision}
        base = ["backend", "precision"]
        r = self.registry
        self._requests = Counter("edgelmm_requests", "Chat completion requests answered, by HTTP status.",
                                 [*base, "status"], registry=r)
        self._prompt = Counter("edgelmm_prompt_tokens", "Prompt tokens of answered requests (image tokens "
                               "included).", base, registry=r)
        self._completion = Counter("edgelmm_completion_tokens", "Tokens generated for answered requests.", base,
                                   registry=r)
        self._cancelled = Counter("edgelmm_cancelled_tokens", "Tokens generated for requests whose client went "
                                  "away before the answer ended (each row stops at the next decode step).", base,
                                  registry=r)
        self._images = Counter("edgelmm_images", "Images received in answered requests.", base, registry=r)
        self._queue = Gauge("edgelmm_queue_depth", "Requests waiting for a batch.", base, registry=r)
        self._running = Gauge("edgelmm_running_requests", "Requests in the batch being decoded.", base, registry=r)
        self._ttft = Histogram("edgelmm_time_to_first_token_seconds", "From a request's arrival to its first "
                               "token (queueing, image encoding and prefill included).", base,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self._per_token = Histogram("edgelmm_time_per_output_token_seconds", "Between consecutive tokens of one "
                                    "request.", base, buckets=_TOKEN_BUCKETS, registry=r)
        self._duration = Histogram("edgelmm_request_duration_seconds", "From arrival to the last token.", base,
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self._batch = Histogram("edgelmm_batch_size", "Requests decoded together in one batch.", base,
                                buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.set_model(backend, precision)

    def set_model(self, backend: str, precision: str) -> None:
        self.labels = {"backend": backend, "precision": precision}
        self.queue_depth(0)
        self.running(0)

    def _l(self, metric, **extra):
        return metric.labels(**self.labels, **extra)

    def request(self, status: int) -> None:
        self._l(self._requests, status=str(status)).inc()

    def tokens(self, prompt: int, completion: int, images: int) -> None:
        self._l(self._prompt).inc(prompt)
        self._l(self._completion).inc(completion)
        self._l(self._images).inc(images)

    def cancelled(self, tokens: int) -> None:
        self._l(self._cancelled).inc(tokens)

    def queue_depth(self, n: int) -> None:
        self._l(self._queue).set(n)

    def running(self, n: int) -> None:
        self._l(self._running).set(n)

    def first_token(self, seconds: float) -> None:
        self._l(self._ttft).observe(seconds)

    def next_token(self, seconds: float) -> None:
        self._l(self._per_token).observe(seconds)

    def finished(self, seconds: float) -> None:
        self._l(self._duration).observe(seconds)

    def batch(self, size: int) -> None:
        self._l(self._batch).observe(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
