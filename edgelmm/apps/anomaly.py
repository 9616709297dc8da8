"""Real-time anomaly detection on a camera stream, in two stages.

  capture thread  -> bounded frame queue (capture.py: drops the oldest frame when behind, counted)
  gate, per frame -> the bundle's vision graph embeds the frame once; gate.py scores it against a
                     memory of the normal scene, with hysteresis
  verifier thread -> on a suspected anomaly, one multi-image question to the LMM: the last normal
                     frame and the latest frames, answered from the features the gate already
                     computed (no frame is encoded twice); asynchronous, so the gate keeps up
  events          -> one JSON line per question asked (and a summary line at the end), snapshots

`edgelmm watch` is a thin layer over `AnomalyWatcher`; from Python:

    watcher = AnomalyWatcher(edgelmm.load("bundle"), WatchConfig(out_dir="snaps"), on_event=print)
    report = watcher.run("rtsp://camera/stream")     # until the source ends, stop(), or a limit
"""

from __future__ import annotations

import logging
import re
import string
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np

from ..errors import EdgeLMMError, ImageError, OptionError, PromptError
from ..images import ImageInput, load_images
from ..pipeline import Pipeline, SamplingParams
from ..options import check_int, check_number, check_output_dir, check_output_file
from ..prompt import IMAGE_MARKER, check_text
from ..runtimes.base import capabilities_of
from ..synthetic import ANOMALY_PROMPT
from .capture import CaptureConfig, CaptureThread, Frame, FrameQueue, parse_source
from .gate import GateConfig, GateDecision, NormalSceneGate
from .sinks import JsonLinesSink, Sink

log = logging.getLogger(__name__)
LATENCY_WINDOW = 2048        # latencies kept for the percentiles (a bounded memory for long runs)
PROMPT_FIELDS = ("last", "latest")   # the verifier prompt's placeholders


@dataclass
class WatchConfig:
    gate: GateConfig = field(default_factory=GateConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    every: int = 1                       # gate every Nth frame read (the others are processed, not gated)
    latest_frames: int = 3               # latest frames shown to the verifier, after the normal one
    prompt: str = ANOMALY_PROMPT         # {last}: number of the last image; markers are added if absent
    verify: bool = True                  # ask the LMM about each suspected anomaly
    max_new_tokens: int = 24
    verifier_queue: int = 2              # suspected anomalies waiting for the verifier; more are not verified
    recheck_frames: int = 15             # while the verifier says no and the episode goes on, ask
                                         # again this many gated frames later (0: never)
    max_checks: int = 3                  # questions per episode, at most
    max_frames: int | None = None        # stop after processing this many frames
    duration_s: float | None = None      # stop after this long
    out_dir: str | Path | None = None    # snapshots of the frames each event was about
    summary_every_s: float = 1.0

    def validate(self) -> None:
        # Finite-aware checks (options.check_number): a NaN passes `x <= 0`, and a NaN margin or
        # threshold would mean no event can ever fire. The gate and capture check their own fields.
        self.gate.validate()
        self.capture.validate()
        if self.duration_s is not None:
            check_number("duration_s", self.duration_s, 0, lo_open=True)
        if self.max_frames is not None:
            check_int("max_frames", self.max_frames, 1)
        check_number("summary_every_s", self.summary_every_s, 0, lo_open=True)
        for name in ("every", "latest_frames", "verifier_queue", "max_new_tokens", "max_checks"):
            check_int(name, getattr(self, name), 1)
        check_int("recheck_frames", self.recheck_frames, 0)
        if not isinstance(self.verify, bool):
            raise OptionError(f"verify must be True or False, got {self.verify!r}")
        # The prompt is checked with --no-verify too: a bad one given on purpose is a mistake either way.
        self.verifier_prompt()
        markers = self.prompt.count(IMAGE_MARKER)
        if markers not in (0, self.latest_frames + 1):
            raise PromptError(f"the verifier prompt has {markers} {IMAGE_MARKER} markers but asks about "
                              f"{self.latest_frames + 1} images (1 normal + {self.latest_frames} latest)")
        if self.out_dir is not None:   # probed now, not when the first event's snapshot is saved
            check_output_dir("snapshot folder --out (out_dir)", self.out_dir)

    def verifier_prompt(self) -> str:
        """The prompt with its placeholders filled in: {last} is the number of the last image (the
        normal frame is image 1), {latest} the number of latest frames; {{ and }} are literal braces.
        A PromptError for anything else in braces, which would reach the model as it was typed."""
        where = "the verifier prompt (--prompt)"
        if not isinstance(self.prompt, str):
            raise PromptError(f"{where} must be a string, got {type(self.prompt).__name__}")
        check_text(self.prompt, where)
        want = "it knows {last} (the last image's number) and {latest} (how many latest frames); write {{ and }} " \
               "for literal braces"
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None]
        except ValueError as exc:   # a lone { or }
            raise PromptError(f"{where} is not a valid template ({exc}); {want}") from None
        unknown = [f for f in fields if f.split(".")[0].split("[")[0] not in PROMPT_FIELDS]
        if unknown:
            raise PromptError(f"{where} has an unknown placeholder {{{unknown[0]}}}; {want}")
        n = self.latest_frames + 1
        try:
            text = self.prompt.format(last=n, latest=self.latest_frames)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:   # {last:s}, {last[0]}
            raise PromptError(f"{where} cannot be filled in ({type(exc).__name__}: {exc}); {want}") from None
        return text if IMAGE_MARKER in text else IMAGE_MARKER * n + text


@dataclass
class Verdict:
    status: str                  # done | skipped: verifier busy | cancelled | disabled | error: ...
    answer: str | None = None    # yes | no | unclear
    text: str | None = None      # the description after yes/no
    raw: str | None = None       # the model's whole answer
    latency_ms: float | None = None


YES = {"yes", "yeah", "yep", "abnormal", "anomalous"}
NO = {"no", "nope", "nothing", "normal"}


def parse_answer(text: str) -> tuple[str, str]:
    """The model's answer -> ("yes" | "no" | "unclear", the rest of the text)."""
    match = re.match(r"\W*([A-Za-z']+)\W*(.*)", text, flags=re.S)
    if not match:
        return "unclear", text.strip()
    first = match.group(1).lower()
    answer = "yes" if first in YES else "no" if first in NO else "unclear"
    return answer, (match.group(2) if answer != "unclear" else text).strip()


@dataclass
class GatedFrame:
    frame: Frame
    features: np.ndarray         # the vision graph's output for this frame, [tiles, T, D]
    score: float | None
    label: str = ""              # how snapshots and events name it

    @property
    def name(self) -> str:
        return self.label or f"frame {self.frame.index}"


@dataclass
class Episode:
    """One stretch of frames the gate finds abnormal; the verifier is asked once, and again while
    it keeps answering no and the stretch goes on (a falling object is clearer once it has landed)."""
    id: int
    first: GatedFrame                # its first frame over the threshold
    checks: int = 0
    awaiting: bool = False           # a check is queued or running
    answer: str | None = None        # the last check's answer
    frames_since_check: int = 0


@dataclass
class AnomalyEvent:
    id: int
    episode: int                     # events of one episode are checks of one anomaly
    check: int                       # 1 for the first question, 2... for re-checks
    frame_index: int                 # the frame that confirmed the anomaly (the event fires on it)
    first_frame_index: int           # the first frame over the threshold in this episode
    time: str                        # wall clock, ISO 8601 UTC
    stream_time_s: float | None      # frame_index / the source's fps
    gate_score: float
    threshold: float
    frames: list[str]                # what the verifier was shown: the normal frame, then the latest
    latency_ms: dict[str, float]     # gate (this frame), detect (first frame captured -> event), verifier
    snapshot: list[str] = field(default_factory=list)
    verifier: Verdict | None = None
    camera: str | None = None        # the camera's name when a process watches several

    def as_dict(self) -> dict[str, Any]:
        out = {"type": "anomaly", **asdict(self)}
        if self.camera is None:
            del out["camera"]
        return out


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    arr = np.asarray(values, np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p95": round(float(np.percentile(arr, 95)), 3)}


class WatchStats:
    """Counters and latency windows; `snapshot()` is what the live line and the summary show."""

    def __init__(self):
        self.started = time.monotonic()
        self.processed = 0
        self.gated = 0
        self.episodes = 0
        self.events = 0
        self.verified = 0
        self.verifier_skipped = 0
        self.gate_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.verifier_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.detect_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._recent: deque[float] = deque(maxlen=512)     # processing times of the last frames, for fps

    def processed_one(self) -> None:
        self.processed += 1
        self._recent.append(time.monotonic())

    def fps(self) -> float:
        now = time.monotonic()
        recent = [t for t in list(self._recent) if now - t <= 2.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)

    def snapshot(self, capture: CaptureThread, frames: FrameQueue) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {
            "elapsed_s": round(elapsed, 3), "fps": round(self.fps(), 2),
            "mean_fps": round(self.processed / elapsed, 2) if elapsed > 0 else 0.0,
            "read": capture.read, "processed": self.processed, "dropped": frames.dropped, "queued": len(frames),
            "unreadable": capture.unreadable, "reconnects": capture.reconnects, "gated": self.gated,
            "episodes": self.episodes, "events": self.events, "verified": self.verified,
            "verifier_skipped": self.verifier_skipped,
            "gate_ms": percentiles(list(self.gate_ms)), "verifier_ms": percentiles(list(self.verifier_ms)),
            "detect_ms": percentiles(list(self.detect_ms)),
        }


def summary_line(s: dict[str, Any]) -> str:
    def ms(p):
        return "-" if p["p50"] is None else f"{p['p50']:.1f}/{p['p95']:.1f}"
    return (f"{s['fps']:6.1f} fps  queue {s['queued']}  read {s['read']}  dropped {s['dropped']}  "
            f"unreadable {s['unreadable']}  events {s['events']}  gate p50/p95 {ms(s['gate_ms'])} ms  "
            f"verifier p50/p95 {ms(s['verifier_ms'])} ms")


@dataclass
class WatchReport:
    stop_reason: str
    source: dict[str, Any]
    stats: dict[str, Any]
    gate: dict[str, Any]
    events: list[AnomalyEvent]
    runtime: dict[str, Any] = field(default_factory=dict)   # backend, precision and why (Pipeline.describe)
    camera: str | None = None                                # the camera's name when a process watches several

    @property
    def source_lost(self) -> bool:
        return self.stop_reason.startswith(("source lost", "capture failed"))

    def as_dict(self) -> dict[str, Any]:
        return {"type": "summary", **({"camera": self.camera} if self.camera else {}), "stop_reason": self.stop_reason,
                "source": self.source, **self.stats, "gate": self.gate, "runtime": self.runtime}


class SerializedBackend:
    """Runs a backend that is not thread-safe one call at a time: the gate then waits for at most
    one verifier step (a decode call), never for a whole answer."""

    def __init__(self, backend):
        self._backend = backend
        self._lock = threading.Lock()
        self.name = backend.name

    def __getattr__(self, attr):
        value = getattr(self._backend, attr)
        if not callable(value):
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)
        return locked


EVENTS_NAME = "events file --events (events)"


def check_events(events: str | Path | TextIO | None) -> None:
    """An OptionError naming --events and the path when a JSON-lines file cannot be appended to
    there (under a regular file, in /proc, a folder): before the source opens, not after."""
    if events is not None and not hasattr(events, "write"):
        check_output_file(EVENTS_NAME, events)


class EventSink:
    """Where a run's records go: the JSON-lines file or stream (`events`), the other sinks
    (apps/sinks.py: MQTT, webhook) and a Python callback, in that order for each event. A sink or
    callback that raises is logged and counted, and the run goes on."""

    def __init__(self, events: str | Path | TextIO | None, on_event: Callable[[AnomalyEvent], None] | None,
                 sinks: Sequence[Sink] = ()):
        self.on_event = on_event
        self.callback_errors = 0
        self.sink_errors = 0
        # checked when the watcher was made (check_events); JsonLinesSink reports what changed since
        self.sinks: list[Sink] = ([JsonLinesSink(events, EVENTS_NAME)] if events is not None else []) + list(sinks)

    def _each(self, method: str, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(record)
            except Exception:
                self.sink_errors += 1
                log.exception("the %s sink raised", type(sink).__name__)

    def write(self, record: dict[str, Any]) -> None:
        self._each("summary", record)

    def event(self, event: AnomalyEvent) -> None:
        self._each("event", event.as_dict())
        if self.on_event:
            try:
                self.on_event(event)
            except Exception:   # a user's callback must not stop the watcher
                self.callback_errors += 1
                log.exception("the on_event callback raised")

    def describe(self) -> list[dict[str, Any]]:
        return [sink.describe() for sink in self.sinks]

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                self.sink_errors += 1
                log.exception("closing the %s sink raised", type(sink).__name__)


@dataclass
class VerifyJob:
    event: AnomalyEvent
    episode: Episode
    shown: list[GatedFrame]          # the normal frame first, then the latest frames
    fired_at: float                  # time.monotonic() when the gate fired
    watcher: "AnomalyWatcher"        # whose event it is (the verifier may serve several cameras)


class Verifier(threading.Thread):
    """Saves each event's snapshot, asks the LMM about it (unless verification is off), emits it.
    One worker serves every camera of a process: each watcher has its own bounded lane (its
    config.verifier_queue), and the worker takes the lanes in turn, so a busy camera cannot starve
    a quiet one."""

    def __init__(self):
        super().__init__(name="edgelmm-verifier", daemon=True)
        self._lanes: dict[int, deque[VerifyJob]] = {}
        self._limits: dict[int, int] = {}
        self._order: list[int] = []         # lanes in the order they were opened
        self._next = 0                      # where the round-robin goes on from
        self._busy: int | None = None       # the lane whose job is being answered
        self._cv = threading.Condition()
        self._closing = False

    def open_lane(self, watcher: "AnomalyWatcher") -> None:
        with self._cv:
            key = id(watcher)
            self._lanes[key], self._limits[key] = deque(), watcher.config.verifier_queue
            self._order.append(key)

    def submit(self, job: VerifyJob) -> bool:
        with self._cv:
            lane = self._lanes[id(job.watcher)]
            if len(lane) >= self._limits[id(job.watcher)]:
                return False
            lane.append(job)
            self._cv.notify_all()
            return True

    def take(self) -> VerifyJob | None:
        """The next job, lanes in turn (None once closed and every lane is empty). Called by the worker."""
        with self._cv:
            while True:
                for i in range(len(self._order)):
                    key = self._order[(self._next + i) % len(self._order)]
                    if self._lanes[key]:
                        self._next = (self._next + i + 1) % len(self._order)
                        self._busy = key
                        return self._lanes[key].popleft()
                if self._closing:
                    return None
                self._cv.wait()

    def finish_lane(self, watcher: "AnomalyWatcher") -> None:
        """Wait until this watcher's questions are answered, then close its lane."""
        key = id(watcher)
        with self._cv:
            while self._lanes[key] or self._busy == key:
                self._cv.wait()
            del self._lanes[key], self._limits[key]
            at = self._order.index(key)
            self._order.remove(key)
            if at < self._next:   # the turn stays with the lane it was on
                self._next -= 1
            self._next = self._next % len(self._order) if self._order else 0

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self.join()

    def run(self) -> None:
        while (job := self.take()) is not None:
            watcher = job.watcher
            try:
                watcher.save_snapshot(job)
                job.event.verifier = self.verify(job) if watcher.config.verify else Verdict("disabled")
            except Exception as exc:   # a failed answer is reported in the event, never lost
                log.exception("verifier failed")
                job.event.verifier = Verdict(f"error: {type(exc).__name__}: {exc}")
            job.episode.answer = job.event.verifier.answer
            job.episode.awaiting = False
            watcher.emit(job.event)
            with self._cv:
                self._busy = None
                self._cv.notify_all()

    def verify(self, job: VerifyJob) -> Verdict:
        w = job.watcher
        if w.aborted.is_set():
            return Verdict("cancelled")
        t0 = time.perf_counter()
        prepared = w.pipeline.prepare(w.config.verifier_prompt(), [g.frame.image for g in job.shown])
        # merged_embeddings checks that the prompt's image tokens match these feature rows
        features = np.concatenate([g.features for g in job.shown], axis=0)
        ids: list[int] = []
        for token in w.pipeline.stream_tokens(prepared, SamplingParams(w.config.max_new_tokens), features=features):
            ids.append(token)
            if w.aborted.is_set():
                return Verdict("cancelled", raw=w.pipeline.decode_text(ids))
        raw = w.pipeline.decode_text(ids)
        answer, text = parse_answer(raw)
        latency = (time.perf_counter() - t0) * 1e3
        job.event.latency_ms["verifier"] = round(latency, 3)
        job.event.latency_ms["event_to_verdict"] = round((time.monotonic() - job.fired_at) * 1e3, 3)
        w.stats.verifier_ms.append(latency)
        w.stats.verified += 1
        return Verdict("done", answer, text, raw, round(latency, 3))


class AnomalyWatcher:
    def __init__(self, pipeline: Pipeline, config: WatchConfig | None = None, *,
                 references: Sequence[ImageInput] = (), events: str | Path | TextIO | None = None,
                 on_event: Callable[[AnomalyEvent], None] | None = None,
                 on_summary: Callable[[dict[str, Any]], None] | None = None,
                 on_status: Callable[[str], None] | None = None, sinks: Sequence[Sink] = (),
                 camera: str | None = None, on_frame: Callable[[GatedFrame, GateDecision], None] | None = None):
        """`references`: images of the normal scene, remembered for good (warm-up still runs unless
        config.gate.warmup_frames is 0). `events`: a JSON-lines file or stream for the events and
        the final summary. `on_event` is called from the verifier thread with each finished event;
        `on_status` from the capture thread with each attempt to open or reopen the source.
        `sinks` (apps/sinks.py: MQTT, webhook) get every event and the summary too, and are closed
        at the end of the run. `on_frame` is called from the gate's thread with each gated frame and
        the gate's decision (after warm-up: its per-cell scores too), for the live view."""
        self.config = config or WatchConfig()
        self.config.validate()
        check_events(events)
        if not (capabilities_of(pipeline.backend).thread_safe or isinstance(pipeline.backend, SerializedBackend)):
            pipeline = Pipeline(pipeline.files, pipeline.family, SerializedBackend(pipeline.backend),
                                selection=pipeline.selection, precision_reason=pipeline.precision_reason)
        self.pipeline = pipeline
        self.gate = NormalSceneGate(self.config.gate)
        self.events_target = events
        self.extra_sinks = list(sinks)
        self.camera = camera
        self.on_event = on_event
        self.on_summary = on_summary
        self.on_status = on_status
        self.on_frame = on_frame
        self.stopping = threading.Event()
        self.aborted = threading.Event()
        self.stats = WatchStats()
        self.events: list[AnomalyEvent] = []
        self._stop_reason = ""
        self._sink: EventSink | None = None
        self._latest: deque[GatedFrame] = deque(maxlen=self.config.latest_frames)
        self._last_normal: GatedFrame | None = None
        self._first_over: GatedFrame | None = None
        self._episode: Episode | None = None
        self._fps: float | None = None
        self._running: tuple[CaptureThread, FrameQueue] | None = None   # while run() runs, for live_stats()
        self.references: list[GatedFrame] = []
        for i, image in enumerate(load_images(list(references))):
            feats = self.encode(image)
            self.gate.add_reference(feats)
            self.references.append(GatedFrame(Frame(-1 - i, image, time.monotonic()), feats, None,
                                               label=f"reference image {i + 1}"))

    # ---- control ----
    def stop(self, reason: str = "stopped") -> None:
        """Finish cleanly: stop reading, answer what the verifier already has, flush the events."""
        self._stop_reason = self._stop_reason or reason
        self.stopping.set()

    def abort(self, reason: str = "aborted") -> None:
        """As stop(), and cancel the verifier's answers in progress (a second Ctrl-C)."""
        self.aborted.set()
        self.stop(reason)

    def live_stats(self) -> dict[str, Any] | None:
        """The counters of the run in progress (what the status line shows), from any thread; None
        before run() opens its source and after it returns."""
        running = self._running
        return self.stats.snapshot(*running) if running else None

    def _runtime(self) -> dict[str, Any]:
        d = self.pipeline.describe()
        return {k: d[k] for k in ("backend", "providers", "precision", "precision_reason", "decoder_layout") if k in d}

    # ---- stage 1 ----
    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.pipeline.image_features(self.pipeline.family.preprocess([image]))

    def _gate(self, frame: Frame, verifier: Verifier) -> None:
        t0 = time.perf_counter()
        features = self.encode(frame.image)
        try:
            decision = self.gate.observe(features)
        except ValueError as exc:
            raise ImageError(str(exc), source=f"frame {frame.index}") from None
        gate_ms = (time.perf_counter() - t0) * 1e3
        self.stats.gate_ms.append(gate_ms)
        self.stats.gated += 1
        gated = GatedFrame(frame, features, decision.score)
        self._latest.append(gated)
        if self.on_frame:
            try:
                self.on_frame(gated, decision)
            except Exception:   # the view must not stop the watcher
                self._sink.callback_errors += 1
                log.exception("the on_frame callback raised")
        if decision.normal:
            self._last_normal = gated
        if decision.over and self._first_over is None:
            self._first_over = gated
        elif not decision.over and not decision.in_episode:
            self._first_over = None
        episode = self._episode
        if decision.started:
            self.stats.episodes += 1
            self._episode = Episode(self.stats.episodes, self._first_over or gated)
            self._check(self._episode, gated, decision.threshold, gate_ms, verifier)
        elif decision.in_episode and episode is not None:
            episode.frames_since_check += 1
            if (self.config.verify and self.config.recheck_frames and not episode.awaiting
                    and episode.answer != "yes" and episode.checks < self.config.max_checks
                    and episode.frames_since_check >= self.config.recheck_frames):
                self._check(episode, gated, decision.threshold, gate_ms, verifier)
        elif not decision.in_episode:
            self._episode = None

    def _check(self, episode: Episode, gated: GatedFrame, threshold: float, gate_ms: float,
               verifier: Verifier) -> None:
        """Emit an event about `episode` and queue its question for the verifier."""
        now = time.monotonic()
        first = episode.first
        episode.checks += 1
        episode.frames_since_check = 0
        episode.awaiting = True
        normal = self._last_normal or (self.references[0] if self.references else None)
        shown = ([normal] if normal else []) + list(self._latest)
        if len(shown) < self.config.latest_frames + 1:      # too early to show a normal frame: repeat the oldest
            shown = [shown[0]] * (self.config.latest_frames + 1 - len(shown)) + shown
        self.stats.events += 1
        if episode.checks == 1:
            self.stats.detect_ms.append((now - first.frame.captured_at) * 1e3)
        event = AnomalyEvent(
            id=self.stats.events, episode=episode.id, check=episode.checks,
            frame_index=gated.frame.index, first_frame_index=first.frame.index,
            time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            stream_time_s=round(gated.frame.index / self._fps, 3) if self._fps else None,
            gate_score=round(float(gated.score), 6), threshold=round(float(threshold), 6),
            frames=[g.name for g in shown],
            latency_ms={"gate": round(gate_ms, 3), "detect": round((now - first.frame.captured_at) * 1e3, 3)},
            camera=self.camera)
        job = VerifyJob(event, episode, shown, now, self)
        if not verifier.submit(job):
            self.stats.verifier_skipped += 1
            self.save_snapshot(job)
            event.verifier = Verdict("skipped: verifier busy")
            episode.awaiting = False
            self.emit(event)

    # ---- events ----
    def save_snapshot(self, job: VerifyJob) -> None:
        if self.config.out_dir is None:
            return
        from PIL import Image

        folder = Path(self.config.out_dir) / f"event-{job.event.id:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, g in enumerate(job.shown):
            role = "normal" if i == 0 else "latest"
            tag = f"ref{-g.frame.index}" if g.frame.index < 0 else f"f{g.frame.index:06d}"
            path = folder / f"{i + 1}-{role}-{tag}.jpg"
            Image.fromarray(g.frame.image).save(path, quality=90)
            job.event.snapshot.append(str(path))

    def emit(self, event: AnomalyEvent) -> None:
        self.events.append(event)
        if self._sink:
            self._sink.event(event)

    # ---- the loop ----
    def run(self, source: str | int | Path, verifier: Verifier | None = None) -> WatchReport:
        """Watch `source` until it ends, stop() is called, or max_frames / duration is reached.
        Raises SourceError if the source cannot be opened at all. `verifier`: one shared with other
        cameras' watchers (watch_cameras); by default the run has its own."""
        cfg = self.config
        src = parse_source(source)
        frames = FrameQueue(cfg.capture.queue_size, lossy=src.live or cfg.capture.realtime)
        capture = CaptureThread(src, frames, cfg.capture, self.stopping, on_status=self.on_status)
        capture.start()
        while not capture.opened.wait(0.05):
            pass
        if capture.error is not None and capture.read == 0:
            capture.join()
            EventSink(None, None, self.extra_sinks).close()   # an MQTT status goes back to "offline"
            raise capture.error
        self._fps = capture.fps
        self.stats = WatchStats()
        try:
            self._sink = EventSink(self.events_target, self.on_event, self.extra_sinks)
        except BaseException:
            self.stopping.set()   # the capture thread is running: wind it down before the error goes up
            capture.join()
            frames.discard()
            EventSink(None, None, self.extra_sinks).close()
            raise
        own_verifier = verifier is None
        if own_verifier:
            verifier = Verifier()
            verifier.start()
        verifier.open_lane(self)
        self._running = (capture, frames)
        deadline = self.stats.started + cfg.duration_s if cfg.duration_s else None
        next_summary = time.monotonic() + cfg.summary_every_s
        reason = ""
        try:
            while not reason:
                if self.stopping.is_set():
                    reason = self._stop_reason or "stopped"
                elif cfg.max_frames is not None and self.stats.processed >= cfg.max_frames:
                    reason = f"max frames ({cfg.max_frames})"
                elif deadline is not None and time.monotonic() >= deadline:
                    reason = f"duration ({cfg.duration_s:g} s)"
                else:
                    frame = frames.get(timeout=0.05)
                    if frame is not None:
                        self.stats.processed_one()
                        if frame.index % cfg.every == 0:
                            self._gate(frame, verifier)
                    elif frames.finished:   # the reader ended: the source did, or stop() made it
                        reason = (self._stop_reason if self.stopping.is_set() else capture.end_reason) or "source ended"
                    if self.on_summary and time.monotonic() >= next_summary:
                        next_summary += cfg.summary_every_s
                        self.on_summary(self.stats.snapshot(capture, frames))
        except BaseException:
            self.aborted.set()      # an error or KeyboardInterrupt in the loop: wind down fast
            raise
        finally:
            self._running = None
            self.stopping.set()
            capture.join()
            frames.discard()
            verifier.finish_lane(self)
            if own_verifier:
                verifier.close()
            report = WatchReport(reason or "interrupted", capture.describe(),
                                 self.stats.snapshot(capture, frames), self.gate.describe(), list(self.events),
                                 self._runtime(), camera=self.camera)
            report.stats["callback_errors"] = self._sink.callback_errors
            report.stats["sink_errors"] = self._sink.sink_errors
            report.stats["sinks"] = self._sink.describe()
            self._sink.write(report.as_dict())
            self._sink.close()
        return report


def load_for_watch(bundle: str | Path, **load_options) -> Pipeline:
    """The bundle's Pipeline (api.load's options). A checkpoint is refused: the PyTorch reference
    would gate every frame ~10x slower than the bundle's runtimes, so export it first."""
    from ..api import load
    from ..bundle import is_bundle, open_bundle
    from ..options import check_threads

    check_threads(load_options.get("threads"))   # an option's error before the folder's
    if not is_bundle(bundle):
        open_bundle(bundle)   # raises a BundleError that says what the folder is and what to do
    return load(bundle, **load_options)


def watch(source: str | int | Path, bundle: str | Path, config: WatchConfig | None = None, *,
          backend: str = "auto", provider: str = "auto", threads: int | None = None, precision: str = "auto",
          references: Sequence[ImageInput] = (), events: str | Path | TextIO | None = None,
          on_event: Callable[[AnomalyEvent], None] | None = None) -> WatchReport:
    """Load `bundle` and watch `source` (see AnomalyWatcher)."""
    pipeline = load_for_watch(bundle, backend=backend, provider=provider, threads=threads, precision=precision)
    return AnomalyWatcher(pipeline, config, references=references, events=events, on_event=on_event).run(source)




@dataclass
class Camera:
    """One camera of watch_cameras: its name (in events, topics and the view), its source, images
    of its normal scene, and its own settings where they differ from the shared ones."""
    name: str
    source: str | int | Path
    references: list[ImageInput] = field(default_factory=list)
    config: WatchConfig | None = None


class _SharedSink:
    """One sink written by several watchers (a shared events file; JsonLinesSink writes under a
    lock): closed once, by its owner, not by each watcher at the end of its run."""

    def __init__(self, sink: Sink):
        self.sink = sink

    def event(self, record: dict[str, Any]) -> None:
        self.sink.event(record)

    def summary(self, record: dict[str, Any]) -> None:
        self.sink.summary(record)

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return self.sink.describe()


def watch_cameras(pipeline: Pipeline, cameras: Sequence[Camera], config: WatchConfig | None = None, *,
                  events: str | Path | TextIO | None = None,
                  sinks_for: Callable[[str], Sequence[Sink]] | None = None,
                  on_event: Callable[[AnomalyEvent], None] | None = None,
                  on_summary: Callable[[str, dict[str, Any]], None] | None = None,
                  on_watchers: Callable[[dict[str, AnomalyWatcher]], None] | None = None,
                  view=None) -> dict[str, WatchReport]:
    """Several cameras in one process: per camera a capture thread, a gate memory and its counters
    (an AnomalyWatcher each), and one verifier for all of them that takes their questions in turn.
    Events carry their camera's name; each camera's summary is its own record. `events` (one file or
    stream for all), `sinks_for(name)` (per camera: its MQTT topic), `view` (a LiveView: each camera
    gets its part). A camera whose source cannot be opened ends with that error as its stop reason;
    the others go on. `on_watchers` gets the watchers once made (to stop them from a signal handler)."""
    import copy

    names = [c.name for c in cameras]
    if not cameras or len(set(names)) != len(names):
        raise OptionError(f"cameras need distinct names, got {names}")
    check_events(events)
    if not (capabilities_of(pipeline.backend).thread_safe or isinstance(pipeline.backend, SerializedBackend)):
        # one lock for every camera's gate and the verifier, not one per watcher
        pipeline = Pipeline(pipeline.files, pipeline.family, SerializedBackend(pipeline.backend),
                            selection=pipeline.selection, precision_reason=pipeline.precision_reason)
    watchers: dict[str, AnomalyWatcher] = {}
    shared = _SharedSink(JsonLinesSink(events, EVENTS_NAME)) if events is not None else None
    try:
        for c in cameras:
            sinks = ([shared] if shared else []) + list(sinks_for(c.name) if sinks_for else ())
            part = view.camera(c.name) if view is not None else None
            watchers[c.name] = AnomalyWatcher(
                pipeline, copy.deepcopy(c.config or config or WatchConfig()), references=c.references,
                on_event=on_event, sinks=sinks + ([part] if part else []), camera=c.name,
                on_summary=(lambda stats, name=c.name: on_summary(name, stats)) if on_summary else None,
                on_frame=part.frame if part else None)
    except BaseException:
        if shared:
            shared.sink.close()
        raise
    if on_watchers:
        on_watchers(watchers)
    verifier = Verifier()
    verifier.start()
    reports: dict[str, WatchReport] = {}

    def run(camera: Camera) -> None:
        try:
            reports[camera.name] = watchers[camera.name].run(camera.source, verifier=verifier)
        except EdgeLMMError as exc:   # this camera's source: the others go on
            reports[camera.name] = WatchReport(f"capture failed: {exc}", {"source": str(camera.source)}, {}, {}, [],
                                               camera=camera.name)
            if shared:
                shared.summary(reports[camera.name].as_dict())

    threads = [threading.Thread(target=run, args=(c,), name=f"edgelmm-camera-{c.name}") for c in cameras]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        verifier.close()
        if shared:
            shared.sink.close()
    return {c.name: reports[c.name] for c in cameras if c.name in reports}


__all__ = ["AnomalyEvent", "AnomalyWatcher", "Camera", "GateConfig", "CaptureConfig", "Verdict", "WatchConfig",
           "WatchReport", "parse_answer", "watch", "watch_cameras"]
