"""Procedural camera videos for `edgelmm watch`: a normal scene from `synthetic.py` with the small
motion and noise of a real camera (shapes sway by a pixel, the light flickers, every frame has
fresh sensor noise), then, at a known frame, an anomaly:

  appear        a new object appears and stays
  fall          a new object falls in from the top edge and lands on the floor
  scene-change  the lighting changes (a different background)
  none          no anomaly: the whole video is normal

Frames are drawn at the reference model's 64-pixel scale times `scale`, so the model sees the
scenes it was trained on. Used by the tests, the watch benchmark and `edgelmm demo-video`.
Needs numpy and PIL; writing a video file needs OpenCV (the `watch` extra).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from . import synthetic
from .errors import OptionError
from .options import check_int, check_number

ANOMALIES = ("appear", "fall", "scene-change", "none")
FALL_FRAMES = 8          # an object falls from the top edge to the floor in this many frames
MAX_SIZE = synthetic.MAX_SIZE   # frame side in pixels, at most (--scale 64)
MAX_FPS = 1000.0         # the frame rate written into the file, at most


@dataclass(frozen=True)
class VideoSpec:
    seed: int = 0
    frames: int = 210
    anomaly: str = "appear"
    anomaly_frame: int = 150         # the first frame that shows the anomaly (after watch's 90-frame warm-up)
    anomaly_length: int | None = None   # frames it lasts (None: to the end)
    repeat_every: int | None = None     # it comes back every this many frames (long soak videos)
    fps: float = 30.0
    scale: int = 2                   # frame size = 64 * scale pixels square
    sway_px: float = 0.6             # amplitude of each shape's slow sway, in 64-pixel units
    flicker: float = 2.0             # amplitude of the global brightness flicker (grey levels)

    def validate(self) -> None:
        """Each setting is named as `edgelmm demo-video` spells it, then as the field (the checks are
        the CLI's too). Numbers are checked finite first: an inf fps never ends writing."""
        if self.anomaly not in ANOMALIES:
            raise OptionError(f"--anomaly: anomaly must be one of {', '.join(ANOMALIES)}, got {self.anomaly!r}")
        check_int("--seed (seed)", self.seed, 0)        # numpy's generators take no negative seed
        check_int("--frames (frames)", self.frames, 1)
        check_int("--scale (scale)", self.scale, 1)
        if self.scale > MAX_SIZE // synthetic.IMAGE_SIZE:   # render() would ask for TiBs
            raise OptionError(f"--scale (scale) must be at most {MAX_SIZE // synthetic.IMAGE_SIZE} (frames are "
                              f"{synthetic.IMAGE_SIZE} x scale pixels a side, {MAX_SIZE} at most), got {self.scale}")
        check_number("--fps (fps)", self.fps, 0, MAX_FPS, lo_open=True)
        check_number("sway_px", self.sway_px, 0, synthetic.IMAGE_SIZE)
        check_number("flicker", self.flicker, 0, 255)
        if self.anomaly != "none":
            check_int("--at (anomaly_frame)", self.anomaly_frame)
            if self.frames < 2:
                raise OptionError(f"--frames (frames) must be >= 2 to show an anomaly after a normal first frame, "
                                  f"got {self.frames} (or use --anomaly none)")
            if not 0 < self.anomaly_frame < self.frames:
                raise OptionError(f"--at: anomaly_frame must be within 1..{self.frames - 1}, got {self.anomaly_frame} "
                                  f"(a frame after the first of the {self.frames}-frame video)")
        if self.anomaly_length is not None:
            check_int("anomaly_length", self.anomaly_length, 1)
        if self.repeat_every is not None:
            check_int("repeat_every", self.repeat_every, 1)
            if self.anomaly_length is None or self.repeat_every <= self.anomaly_length:
                raise OptionError("repeat_every needs an anomaly_length shorter than it")

    def since_anomaly(self, f: int) -> int | None:
        """Frames since the anomaly (showing at frame f) began, or None when frame f is normal."""
        if self.anomaly == "none" or f < self.anomaly_frame:
            return None
        since = f - self.anomaly_frame
        if self.repeat_every:
            since %= self.repeat_every
        return since if self.anomaly_length is None or since < self.anomaly_length else None

    def anomaly_starts(self) -> list[int]:
        """The frames where an anomaly begins."""
        return [f for f in range(self.frames) if self.since_anomaly(f) == 0]

    @property
    def size(self) -> int:
        return synthetic.IMAGE_SIZE * self.scale

    def describe(self) -> dict:
        return {**asdict(self), "width": self.size, "height": self.size,
                "anomaly_frame": self.anomaly_frame if self.anomaly != "none" else None,
                "anomaly_starts": self.anomaly_starts(), "anomaly_box": intruder_box(self)}


def _scaled(shapes: list[synthetic.Shape], k: int) -> list[synthetic.Shape]:
    return [replace(s, x=s.x * k, y=s.y * k, r=s.r * k) for s in shapes]


def _plan(spec: VideoSpec, rng: np.random.Generator):
    """What the video shows: background, shapes and their sway, the intruder, the changed light."""
    bg = synthetic.random_background(rng)
    base = synthetic.scene(rng, int(rng.integers(1, 4)))
    phases = rng.uniform(0, 2 * math.pi, (len(base), 2))
    period = float(rng.uniform(40, 80))
    intruder = synthetic.place(rng, base, y_range=(36, 56) if spec.anomaly == "fall" else None)
    new_bg = synthetic.random_background(rng)
    while abs(int(np.mean(new_bg.base)) - int(np.mean(bg.base))) < 40:   # a visible change of light
        new_bg = synthetic.random_background(rng)
    return bg, base, phases, period, intruder, new_bg


def intruder_box(spec: VideoSpec) -> tuple[int, int, int, int] | None:
    """Where the object of an `appear` anomaly is, in frame pixels: (x0, y0, x1, y1); None for
    the other anomalies (a falling object moves; a change of light is everywhere)."""
    if spec.anomaly != "appear":
        return None
    shape = _plan(spec, np.random.default_rng([spec.seed, 7]))[4]
    k = spec.scale
    return (max(0, math.floor((shape.x - shape.r) * k)), max(0, math.floor((shape.y - shape.r) * k)),
            min(spec.size, math.ceil((shape.x + shape.r) * k)), min(spec.size, math.ceil((shape.y + shape.r) * k)))


def frames(spec: VideoSpec) -> Iterator[np.ndarray]:
    """The video's RGB uint8 frames, [size, size, 3], in order."""
    spec.validate()
    rng = np.random.default_rng([spec.seed, 7])
    bg, base, phases, period, intruder, new_bg = _plan(spec, rng)
    for f in range(spec.frames):
        t = 2 * math.pi * f / period
        shapes = [replace(s, x=s.x + spec.sway_px * math.sin(t + p[0]), y=s.y + spec.sway_px * math.sin(t + p[1]))
                  for s, p in zip(base, phases)]
        background = bg
        since = spec.since_anomaly(f)
        if since is not None:
            if spec.anomaly == "appear":
                shapes.append(intruder)
            elif spec.anomaly == "fall":
                progress = min(1.0, (since + 1) / FALL_FRAMES) ** 2
                top = intruder.r + 1
                shapes.append(replace(intruder, y=top + (intruder.y - top) * progress))
            else:
                background = new_bg
        light = spec.flicker * math.sin(2 * math.pi * f / 17.0)
        background = replace(background, base=tuple(int(np.clip(c + light, 0, 255)) for c in background.base))
        yield synthetic.render(_scaled(shapes, spec.scale), background, rng, size=spec.size)


def write_video(path: str | Path, spec: VideoSpec) -> dict:
    """Write the video as Motion-JPEG in an AVI (readable by every OpenCV build) and return its
    description: the spec, the frame size and the anomaly's first frame (None for 'none')."""
    import cv2

    spec.validate()   # before anything is written: OpenCV's writer spins on an inf frame rate
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), spec.fps, (spec.size, spec.size))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write an MJPG video here")
    try:
        for frame in frames(spec):
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))   # OpenCV writes BGR
    finally:
        writer.release()
    return {"path": str(path), **spec.describe()}
