"""Video clips in prompts: a `<video>` marker takes a `Video`, the frames of a clip in order.

A model that reads videos (Qwen2-VL / Qwen2.5-VL) encodes them as frame pairs; the frames given
are the frames it sees, as HF's video processors take them by default (`do_sample_frames` off).
Sampling a long clip down to a frame rate is done here only where the checkpoint's video
processor asks for it, and then only with the clip's own `fps` known (`Family.preprocess_media`).
From Python, frames come as images (decode with whatever you like); `video_from_path` (the CLI's
`--video`) reads a directory of frames, or a video file with OpenCV (the `watch` extra).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ImageError
from .images import load_image

# HF's Qwen2-VL video processor samples at most this many frames; more in one prompt would be
# hundreds of thousands of tokens on any model edgelmm runs.
MAX_VIDEO_FRAMES = 768


@dataclass(frozen=True)
class Video:
    """One clip for a `<video>` marker: `frames` is a list of images (paths, PIL images or HxWx3
    arrays) or one [T, H, W, 3] uint8 array, all of one size; `fps` is the rate they were taken
    at (Qwen2.5-VL places frames in time by it; transformers takes 24 frames a second when not told)."""
    frames: Any
    fps: float | None = None


@dataclass
class VideoFrames:
    """A loaded clip: [T, H, W, 3] uint8 RGB, its frame rate (None: not given) and how errors name it."""
    frames: np.ndarray
    fps: float | None = None
    label: str = "video"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.frames.shape


def load_video(video: Video, index: int | None = None, number: int | None = None) -> VideoFrames:
    """A Video -> its frames as one [T, H, W, 3] uint8 array. Raises ImageError naming the video (its
    number among the prompt's videos and, where that differs, its place among all its media: 0-based
    `index`) and the frame."""
    number = number or (index + 1 if index is not None else None)
    where = "video" if number is None else f"video {number}"
    if index is not None and index + 1 != number:
        where += f" (item {index + 1} of the prompt's media)"
    if not isinstance(video, Video):
        raise ImageError(f"{where}: want an edgelmm.Video, got {type(video).__name__}")
    fps = video.fps
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps)
                            or fps <= 0):
        raise ImageError(f"{where}: fps must be a positive number of frames per second, got {fps!r}")
    raw = video.frames
    if isinstance(raw, np.ndarray) and raw.ndim == 4:
        frames: Sequence[Any] = list(raw)
    elif isinstance(raw, (list, tuple)):
        frames = raw
    else:
        raise ImageError(f"{where}: frames must be a list of images or a [T, H, W, 3] array, got "
                         f"{type(raw).__name__}" + (f" of shape {raw.shape}" if isinstance(raw, np.ndarray) else ""))
    if not frames:
        raise ImageError(f"{where}: has no frames")
    if len(frames) > MAX_VIDEO_FRAMES:
        raise ImageError(f"{where}: has {len(frames)} frames; at most {MAX_VIDEO_FRAMES} are taken "
                         "(sample the clip down first)")
    loaded = []
    for f, frame in enumerate(frames):
        try:
            rgb = load_image(frame)
        except ImageError as exc:
            raise ImageError(f"{where} frame {f + 1}: {exc}") from None
        if loaded and rgb.shape != loaded[0].shape:
            raise ImageError(f"{where} frame {f + 1} is {rgb.shape[1]}x{rgb.shape[0]} pixels but frame 1 is "
                             f"{loaded[0].shape[1]}x{loaded[0].shape[0]}: a clip's frames share one size")
        loaded.append(rgb)
    return VideoFrames(np.stack(loaded), None if fps is None else float(fps), where)


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """`count` of `total` frames as the processor picks them, `torch.arange(0, total, total / count)
    .int()`: the steps in float64, the values stored as float32 (torch's default dtype), then
    truncated. Truncating the float64 values instead picks another frame for 4% of (total, count)
    pairs (30 frames, 22 wanted: frame 14 where the processor takes 15). Where float rounding gives
    torch one index more (17 frames, 14 wanted: 15 indices, the last one 17, past the clip: 5% of
    pairs), HF's processor fails indexing the clip; edgelmm keeps the first `count`, torch's own."""
    if total <= 0 or count <= 0:
        raise ImageError(f"cannot pick {count} of a clip's {total} frames")
    return np.arange(0, total, total / count).astype(np.float32).astype(np.int64)[:count]


def sample_frame_indices(total: int, source_fps: float, fps: float, pair: int, min_frames: int,
                         max_frames: int) -> np.ndarray:
    """Which of `total` frames taken at `source_fps` to keep to see the clip at `fps`, as HF's
    video processors sample (a multiple of `pair` frames, within [min_frames, max_frames] and the
    clip's length, evenly spaced from the first)."""
    most = math.floor(min(max_frames, total) / pair) * pair
    count = min(max(total / source_fps * fps, min_frames), most, total)
    count = math.floor(count / pair) * pair
    if count <= 0:
        raise ImageError(f"a clip of {total} frames is too short to sample {pair}-frame pairs from")
    return evenly_spaced(total, count)


def fixed_count_frame_indices(total: int, num_frames: int, pair: int) -> np.ndarray:
    """Which of `total` frames to keep where a video processor samples a fixed number (its
    `num_frames`): that number rounded to a multiple of `pair` (Python's round: halves go to the even
    multiple, 5 frames in pairs -> 4, 7 -> 8), not bounded by min/max_frames, evenly spaced."""
    count = round(num_frames / pair) * pair
    if count <= 0:
        raise ImageError(f"this model's video processor samples num_frames={num_frames}, which rounds to no "
                         f"{pair}-frame pair")
    if count > total:
        raise ImageError(f"a clip of {total} frames is too short for the {count} frames this model's video "
                         f"processor samples (num_frames={num_frames})")
    return evenly_spaced(total, count)


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class VideoTooLarge(ImageError):
    """A video file holds more frames at the sampling rate, or larger frames, than may be taken."""


def video_from_path(path: str | os.PathLike, fps: float | None = None, max_frames: int = MAX_VIDEO_FRAMES,
                    max_pixels: int | None = None, max_bytes: int | None = None) -> Video:
    """A clip from disk: a directory of frame images (in name order; `fps` their rate, if known) or a
    video file, decoded with OpenCV and sampled at `fps` frames a second (default 2, the rate Qwen's
    own tools sample at), the clip then carrying that rate; at most `max_frames` of them, of at most
    `max_pixels` each, holding at most `max_bytes` of decoded frames (default: a quarter of the
    memory available now, as the frames are copied once more when the clip is stacked; no bound where
    the system does not say, as without /proc/meminfo or sysconf): decoding stops there with
    VideoTooLarge, before the machine runs out (768 frames of 4K are 19 GB)."""
    p = Path(path)
    if p.is_dir():
        frames = sorted(f for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise ImageError(f"{str(p)!r}: a directory of frames, and it holds no {'/'.join(FRAME_SUFFIXES)} files")
        return Video([str(f) for f in frames], fps=fps)
    if not p.is_file():
        raise ImageError(f"{str(p)!r}: no such video file or directory of frames")
    try:
        import cv2
    except ImportError:
        raise ImageError(f"{str(p)!r}: decoding a video file needs OpenCV (pip install 'edgelmm[watch]'); "
                         "or give a directory of its frames") from None
    rate = float(fps or 2.0)
    if max_bytes is None:
        from .hostmem import available_bytes

        max_bytes = available_bytes() // 4 or None
    cap = cv2.VideoCapture(str(p))
    try:
        if not cap.isOpened():
            raise ImageError(f"{str(p)!r}: OpenCV cannot open it as a video")
        source_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not math.isfinite(source_fps) or source_fps <= 0:
            source_fps = rate  # unknown: every frame is taken
        frames, index, next_time = [], 0, 0.0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if max_pixels is not None and frame.shape[0] * frame.shape[1] > max_pixels:
                raise VideoTooLarge(f"{str(p)!r}: its frames are {frame.shape[1]}x{frame.shape[0]} pixels; at most "
                                    f"{max_pixels} pixels a frame are taken")
            if index / source_fps >= next_time - 1e-9:
                if max_bytes is not None and (len(frames) + 1) * frame.nbytes > max_bytes:
                    size = f"{frame.shape[1]}x{frame.shape[0]} pixels"
                    if not frames:
                        raise VideoTooLarge(f"{str(p)!r}: one frame of {size} is {frame.nbytes} bytes, more than the "
                                            f"{max_bytes} bytes of decoded frames allowed")
                    raise VideoTooLarge(f"{str(p)!r}: {len(frames) + 1} frames of {size} at {rate:g} a second would "
                                        f"hold more than {max_bytes / 1e9:.3g} GB of decoded frames; sample it at a "
                                        "lower rate, or send a shorter clip")
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                next_time += 1.0 / rate
                if len(frames) > max_frames:
                    raise VideoTooLarge(f"{str(p)!r}: more than {max_frames} frames at {rate:g} a second; sample it "
                                       "at a lower rate, or send a shorter clip")
            index += 1
    finally:
        cap.release()
    if not frames:
        raise ImageError(f"{str(p)!r}: OpenCV decoded no frames from it")
    return Video(frames, fps=rate)
