"""Frames from a camera, a video file, an RTSP/HTTP URL or a GStreamer pipeline, read through
OpenCV's VideoCapture on a thread of their own into a bounded queue.

Accounting is exact: every frame decoded is `read`; it is later either `processed` (taken by the
consumer) or `dropped` (pushed out of a full queue, or still queued when the watcher stops), so
read == processed + dropped + queued at any moment. Frames OpenCV cannot decode are counted as
`unreadable` and skipped.

Live sources (camera, URL, GStreamer) drop the oldest frame when the consumer falls behind: the
newest frame is what matters. A file is read losslessly (the reader waits for room) unless
`realtime` asks to replay it at its own frame rate, like a camera. When a live source stops
delivering, the reader reopens it with exponential backoff; a file that ends is a clean finish.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import OptionError, SourceError
from ..options import check_int, check_number

MAX_TIMEOUT_S = 86400.0   # a day: OpenCV takes the open/read timeout in int milliseconds

# FFmpeg's own decoder messages ("No JPEG data found in image") go to stderr from C; the reader
# counts those frames as unreadable instead. Must be set before cv2 opens anything.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")

URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise SourceError(f"OpenCV is not installed: pip install 'edgelmm[watch]' ({exc})") from None
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    return cv2


@dataclass(frozen=True)
class VideoSource:
    spec: str
    kind: str                 # camera | file | url | gstreamer

    @property
    def live(self) -> bool:
        return self.kind != "file"

    def describe(self) -> dict[str, Any]:
        return {"source": self.spec, "kind": self.kind, "live": self.live}


def parse_source(source: str | int | Path) -> VideoSource:
    """A camera index ("0"), a URL, a GStreamer pipeline (has '!'), or a video file path."""
    text = str(source).strip()
    if re.fullmatch(r"\d+", text):
        return VideoSource(text, "camera")
    if text.lower().startswith(URL_SCHEMES):
        return VideoSource(text, "url")
    if "!" in text:
        return VideoSource(text, "gstreamer")
    if not Path(text).is_file():
        raise SourceError("no such video file (a source is a camera index, a URL, a GStreamer pipeline "
                          "with '!', or a video file)", source=text)
    return VideoSource(text, "file")


@dataclass
class CaptureConfig:
    queue_size: int = 8
    realtime: bool = False            # replay a file at its own fps and drop frames when behind
    reconnect_attempts: int = 5       # live sources: reopen this many times before giving up
    reconnect_backoff_s: float = 0.5  # first wait between attempts; doubles, up to 8 s
    max_failed_reads: int = 8         # consecutive failed reads that mean the stream ended or was lost
    timeout_s: float = 10.0           # open and read timeout for URLs (FFmpeg)

    def validate(self) -> None:
        """An OptionError naming the field (`edgelmm watch`'s --queue-size, --reconnect-attempts,
        --reconnect-backoff, --realtime). The seconds are checked finite first: `x < 0` lets NaN
        through, and an inf timeout overflows OpenCV's millisecond setting."""
        check_int("queue_size", self.queue_size, 1)
        check_int("reconnect_attempts", self.reconnect_attempts, 0)
        check_int("max_failed_reads", self.max_failed_reads, 1)
        check_number("reconnect_backoff_s", self.reconnect_backoff_s, 0)
        check_number("timeout_s", self.timeout_s, 0, MAX_TIMEOUT_S, lo_open=True)
        if not isinstance(self.realtime, bool):
            raise OptionError(f"realtime must be True or False, got {self.realtime!r}")


@dataclass
class Frame:
    index: int                 # 0-based count of frames read from the source
    image: np.ndarray          # RGB uint8 [H, W, 3]
    captured_at: float         # time.monotonic() when it was read


class FrameQueue:
    """A bounded FIFO between the reader and the consumer. `lossy`: a full queue drops its oldest
    frame for the new one; otherwise the reader waits for room."""

    def __init__(self, size: int, lossy: bool):
        self.size = size
        self.lossy = lossy
        self._items: deque[Frame] = deque()
        self._cond = threading.Condition()
        self.closed = False
        self.put_count = 0
        self.dropped = 0

    def put(self, frame: Frame, stop: threading.Event) -> bool:
        with self._cond:
            while not self.lossy and len(self._items) >= self.size and not stop.is_set():
                self._cond.wait(0.05)
            if stop.is_set():
                return False
            if len(self._items) >= self.size:
                self._items.popleft()
                self.dropped += 1
            self._items.append(frame)
            self.put_count += 1
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> Frame | None:
        """The oldest frame; None when nothing came within `timeout` or the queue is closed and empty."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            if not self._items:
                return None
            frame = self._items.popleft()
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def discard(self) -> int:
        """Drop what is still queued (the watcher stopped before it got to it); counted as dropped."""
        with self._cond:
            n = len(self._items)
            self._items.clear()
            self.dropped += n
            self._cond.notify_all()
            return n

    def __len__(self) -> int:
        return len(self._items)

    @property
    def finished(self) -> bool:
        return self.closed and not self._items


def gstreamer_available() -> bool:
    return "GStreamer:                   YES" in _cv2().getBuildInformation()


def open_capture(source: VideoSource, config: CaptureConfig):
    """One attempt to open `source`; returns an opened cv2.VideoCapture or None."""
    cv2 = _cv2()
    if source.kind == "camera":
        backend = cv2.CAP_V4L2 if os.name == "posix" and Path("/dev").exists() else cv2.CAP_ANY
        cap = cv2.VideoCapture(int(source.spec), backend)
    elif source.kind == "gstreamer":
        if not gstreamer_available():
            raise SourceError("this OpenCV build has no GStreamer support (pip wheels do not); use the system "
                              "OpenCV (JetPack's python3-opencv on a Jetson) for CSI cameras", source=source.spec)
        cap = cv2.VideoCapture(source.spec, cv2.CAP_GSTREAMER)
    else:
        ms = int(config.timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        cap = cv2.VideoCapture(source.spec, cv2.CAP_FFMPEG, params)
    if cap.isOpened():
        return cap
    cap.release()
    return None


def as_rgb(frame: Any, shape: tuple[int, ...] | None) -> np.ndarray | None:
    """OpenCV's BGR(A)/grey frame as RGB uint8, resized to the stream's first frame size if the
    source changed resolution (a reconnect); None if it is not an image at all."""
    cv2 = _cv2()
    if not isinstance(frame, np.ndarray) or frame.size == 0 or frame.dtype != np.uint8:
        return None
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    elif frame.ndim == 3 and frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    elif frame.ndim == 3 and frame.shape[2] == 3:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    else:
        return None
    if shape is not None and frame.shape != shape:
        frame = cv2.resize(frame, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return frame


class CaptureThread(threading.Thread):
    """Reads `source` into `queue` until the source ends, is lost, or `stop` is set."""

    def __init__(self, source: VideoSource, queue: FrameQueue, config: CaptureConfig, stop: threading.Event,
                 on_status: Callable[[str], None] | None = None):
        """`on_status(message)` hears each attempt to open or reopen the source (from this thread):
        a camera that is not there takes seconds per attempt, and a user should see them."""
        super().__init__(name="edgelmm-capture", daemon=True)
        self.on_status = on_status
        self.source = source
        self.queue = queue
        self.config = config
        self.stop_event = stop
        self.unreadable = 0
        self.reconnects = 0
        self.fps: float | None = None
        self.frame_count: int | None = None
        self.end_reason = ""
        self.error: SourceError | None = None
        self._shape: tuple[int, ...] | None = None
        self.opened = threading.Event()      # set once the first open succeeded (or failed for good)

    @property
    def read(self) -> int:
        """Frames decoded and handed to the queue (counted under the queue's lock)."""
        return self.queue.put_count

    # ---- opening, with backoff for live sources ----
    def _open_with_retries(self, first: bool):
        attempts = 1 + (self.config.reconnect_attempts if self.source.live else 0)
        delay = self.config.reconnect_backoff_s
        name = f"{self.source.kind} {self.source.spec}"
        for attempt in range(attempts):
            if self.stop_event.is_set():
                return None
            self._status(f"{'opening' if first else 'reopening'} {name} (attempt {attempt + 1} of {attempts})")
            cap = open_capture(self.source, self.config)
            if cap is not None:
                return cap
            if attempt + 1 < attempts:
                self._status(f"{name} gave no frames; attempt {attempt + 2} of {attempts} in {delay:g} s")
                if not first:
                    self.reconnects += 1
                if self.stop_event.wait(delay):
                    return None
                delay = min(delay * 2, 8.0)
        what = "OpenCV cannot open it (not a video, or a codec this build lacks)" if not self.source.live else \
            f"no frames after {attempts} attempt(s) to {'open' if first else 'reopen'} it"
        raise SourceError(what, source=self.source.spec)

    def _status(self, message: str) -> None:
        if self.on_status is not None:
            try:
                self.on_status(message)
            except Exception:  # a display callback must not stop the capture
                pass

    def run(self) -> None:
        try:
            self._run()
        except SourceError as exc:
            self.error = exc
            self.end_reason = f"source lost: {exc}"
        except Exception as exc:  # never die silently: the watcher reports it
            self.error = SourceError(f"capture failed ({type(exc).__name__}: {exc})", source=self.source.spec)
            self.end_reason = f"capture failed: {exc}"
        finally:
            self.opened.set()
            self.queue.close()

    def _run(self) -> None:
        cv2 = _cv2()
        cap = self._open_with_retries(first=True)
        if cap is None:
            self.opened.set()
            self.end_reason = "stopped"
            return
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and 0 < fps < 1000 else None
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if count and count > 0 and not self.source.live else None
        self.opened.set()   # after fps and frame_count: the watcher reads them once this is set
        pace = 1.0 / self.fps if self.config.realtime and self.fps else 0.0
        start = time.monotonic()
        failed = 0
        try:
            while not self.stop_event.is_set():
                # grab() fails on an undecodable packet and at the end; retrieve() on a bad frame
                ok = cap.grab()
                frame = as_rgb(cap.retrieve()[1], self._shape) if ok else None
                if frame is None:
                    failed += 1
                    if failed < self.config.max_failed_reads:
                        continue
                    cap.release()
                    if not self.source.live:
                        self.end_reason = "end of file" if not self.frame_count or self.read + self.unreadable \
                            >= self.frame_count else f"file ended early, at frame {self.read} of {self.frame_count}"
                        return
                    cap = self._open_with_retries(first=False)
                    if cap is None:
                        self.end_reason = "stopped"
                        return
                    self.reconnects += 1
                    failed = 0
                    continue
                # failures followed by a good frame were bad frames, not the end of the stream
                self.unreadable += failed
                failed = 0
                self._shape = self._shape or frame.shape
                if pace:
                    due = start + self.read * pace
                    if self.stop_event.wait(max(0.0, due - time.monotonic())):
                        break
                if not self.queue.put(Frame(self.read, frame, time.monotonic()), self.stop_event):
                    break
            self.end_reason = "stopped"
        finally:
            cap.release()

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "fps": self.fps, "frame_count": self.frame_count,
                "lossy": self.queue.lossy, "queue_size": self.queue.size}
