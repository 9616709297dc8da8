"""Calibration samples: multi-image prompts drawn from the user's own data.

A source is named by a spec: `synthetic[:split]`, a Mantis-Instruct JSONL file, a MIMIC-IT
instruction JSON, a folder of images (grouped into multi-image sets), or a video file (frames
sampled at a rate). A `kind:` prefix (`mantis:`, `mimicit:`, `folder:`, `video:`) overrides the
detection. Every record is checked before it is used (each image decodes, the `<image>` markers
match the images); bad records are skipped and counted with their reason, never silently.

Sampling is seeded and stratified by (number of images, size of the largest image), so a small
calibration set still covers the prompt shapes the data has. Runtime side: numpy/PIL (OpenCV only
for video), no torch.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import CalibrationError, ImageError
from ..images import load_image
from ..prompt import IMAGE_MARKER

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
KINDS = ("synthetic", "mantis", "mimicit", "folder", "video")
# Size strata: the largest image side, in pixels (thumbnails / typical photos / large frames).
SIZE_BUCKETS = ((256, "small"), (768, "medium"))
FOLDER_GROUP_SIZES = (1, 2, 3, 4)
FOLDER_PROMPT = "Describe what the images show and how they differ."
VIDEO_PROMPT = "These are consecutive frames from a camera. What happens across them?"


def size_bucket(images: list[np.ndarray]) -> str:
    side = max(max(im.shape[:2]) for im in images)
    return next((name for limit, name in SIZE_BUCKETS if side <= limit), "large")


@dataclass
class CalibSample:
    """One multi-image prompt: chat messages whose text carries `<image>` markers (an answer, when
    the record has one, is the last assistant turn) and the decoded images in marker order."""
    messages: list[dict[str, Any]]
    images: list[np.ndarray]
    origin: str                      # where it came from: "file.jsonl:17", "video.mp4@frames 30-120"

    @property
    def stratum(self) -> tuple[int, str]:
        return len(self.images), size_bucket(self.images)


@dataclass
class CalibSet:
    source: str
    kind: str
    samples: list[CalibSample]
    scanned: int                     # records read from the source
    skipped: Counter = field(default_factory=Counter)      # reason -> count
    skip_examples: list[str] = field(default_factory=list)  # a few "origin: reason" lines
    seed: int = 0

    def strata(self) -> dict[str, int]:
        counts = Counter(f"{n} image(s), {size}" for n, size in (s.stratum for s in self.samples))
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "samples": len(self.samples), "scanned": self.scanned,
                "skipped": sum(self.skipped.values()), "skip_reasons": dict(self.skipped),
                "skip_examples": self.skip_examples, "strata": self.strata(), "seed": self.seed}

    def split(self, held_out: int) -> tuple[list[CalibSample], list[CalibSample]]:
        """(calibration, held-out) with the held-out samples taken evenly across the set, so both
        keep the strata mix. The held-out ones measure quality; they are never calibrated on."""
        if len(self.samples) < 2:
            raise CalibrationError(f"{self.source}: {len(self.samples)} usable sample(s); calibration needs at "
                                   "least 2 (one to calibrate on, one to measure)")
        held_out = max(1, min(held_out, len(self.samples) // 2))
        step = len(self.samples) / held_out
        picks = {int(i * step) for i in range(held_out)}
        return ([s for i, s in enumerate(self.samples) if i not in picks],
                [s for i, s in enumerate(self.samples) if i in picks])


class Skip(Exception):
    """A record that cannot be used; the message is the reason that gets counted."""


# A record before validation: where it came from, its messages, and a thunk per image.
Record = tuple[str, list[dict[str, Any]], list[Callable[[], np.ndarray]]]


def _markers(messages: list[dict[str, Any]]) -> int:
    return sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m.get("content"), str))


def _validate(record: Record) -> CalibSample:
    origin, messages, loaders = record
    n = _markers(messages)
    if n != len(loaders):
        raise Skip(f"marker count mismatch ({n} {IMAGE_MARKER} marker(s), {len(loaders)} image(s))")
    if not loaders:
        raise Skip("no images")
    images = []
    for i, load in enumerate(loaders):
        try:
            images.append(load())
        except ImageError as exc:
            text = str(exc)
            raise Skip(("missing image" if "no such file" in text or "not found" in text else "unreadable image")
                       + f" ({text})") from None
        if images[-1].shape[0] < 4 or images[-1].shape[1] < 4:
            raise Skip(f"image {i + 1} is smaller than 4x4 pixels")
    return CalibSample(messages, images, origin)


def _image_loader(path: Path, index: int) -> Callable[[], np.ndarray]:
    return lambda: load_image(path, index=index)


# ---------------------------------------------------------------- readers

def _read_synthetic(split: str) -> Iterator[Record]:
    from .. import synthetic

    i = 0
    while True:
        s = synthetic.make_sample(split, i)
        messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in s.messages]
        messages.append({"role": "assistant", "content": s.answer})
        yield (f"synthetic:{split}:{i}", messages, [(lambda im=im: im) for im in s.images])
        i += 1


def _text_of(content: Any) -> str:
    """OpenAI-style content parts -> text with `<image>` markers."""
    if isinstance(content, str):
        return content
    return "".join(IMAGE_MARKER if p.get("type") == "image" else p.get("text", "") for p in content)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _conversation(turns: Any) -> list[dict[str, Any]]:
    """Mantis-Instruct turns ({"role", "content"}) or ShareGPT turns ({"from", "value"})."""
    if not isinstance(turns, list) or not turns:
        raise Skip("no conversation")
    out = []
    for t in turns:
        if not isinstance(t, dict):
            raise Skip("conversation turn is not an object")
        role = _ROLES.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or not isinstance(content, (str, list)):
            raise Skip(f"conversation turn without a known role and text ({sorted(t)})")
        out.append({"role": role, "content": _text_of(content)})
    return out


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:  # decoded per line, so one damaged record is skipped, not the whole file
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, Skip("not UTF-8 text")
                continue
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, Skip(f"invalid JSON ({exc.msg})")


def _read_mantis(path: Path, image_root: Path) -> Iterator[Record | tuple[str, Skip]]:
    records = _json_lines(path) if path.suffix == ".jsonl" else enumerate(_load_json(path), 1)
    for lineno, rec in records:
        origin = f"{path.name}:{lineno}"
        try:
            if isinstance(rec, Skip):
                raise rec
            if not isinstance(rec, dict):
                raise Skip("record is not an object")
            images = rec.get("images", [])
            if isinstance(images, (str, dict)):
                images = [images]
            paths = [image_root / (im["path"] if isinstance(im, dict) else im) for im in images]
            messages = _conversation(rec.get("conversation", rec.get("conversations")))
            yield origin, messages, [_image_loader(p, i) for i, p in enumerate(paths)]
        except (Skip, KeyError, TypeError) as exc:
            yield origin, exc if isinstance(exc, Skip) else Skip(f"malformed record ({type(exc).__name__}: {exc})")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read ({exc.strerror})") from None


def _mimicit_images(path: Path) -> dict[str, Any]:
    """MIMIC-IT keeps images apart from instructions: a JSON map of image id -> base64 (`<name>_images.json`
    or `images.json` beside the instructions), or image files named by id."""
    for candidate in (path.with_name(path.stem.replace("_instructions", "") + "_images.json"),
                      path.with_name("images.json")):
        if candidate.is_file() and candidate != path:
            return _load_json(candidate)
    return {}


def _read_mimicit(path: Path, image_root: Path) -> Iterator[Record | tuple[str, Skip]]:
    import base64
    import io

    from PIL import Image

    doc = _load_json(path)
    data = doc.get("data", doc) if isinstance(doc, dict) else {str(i): r for i, r in enumerate(doc)}
    encoded = _mimicit_images(path)

    def loader(image_id: str, index: int) -> Callable[[], np.ndarray]:
        if image_id in encoded:
            def decode():
                try:
                    raw = base64.b64decode(encoded[image_id], validate=False)
                    return load_image(Image.open(io.BytesIO(raw)), index=index)
                except Exception as exc:  # binascii/PIL errors on a corrupt entry
                    raise ImageError(f"cannot decode base64 image {image_id!r} ({exc})", index=index) from None
            return decode
        for suffix in ("", *IMAGE_SUFFIXES):
            if os.path.isfile(image_root / f"{image_id}{suffix}"):  # False, not OSError, for an over-long id
                return _image_loader(image_root / f"{image_id}{suffix}", index)
        return _image_loader(image_root / image_id, index)  # reported as a missing image

    for key, rec in data.items():
        origin = f"{path.name}:{key}"
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
            yield origin, Skip("record without an instruction")
            continue
        ids = rec.get("image_ids") or []
        # MIMIC-IT instructions carry no markers: the images come first, as in its in-context format.
        messages = [{"role": "user", "content": IMAGE_MARKER * len(ids) + "\n" + rec["instruction"]}]
        if isinstance(rec.get("answer"), str):
            messages.append({"role": "assistant", "content": rec["answer"]})
        yield origin, messages, [loader(str(i), n) for n, i in enumerate(ids)]


def _read_folder(path: Path, seed: int) -> Iterator[Record | tuple[str, Skip]]:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    # A corrupt file is skipped on its own (a header check), not with the set it would have joined.
    readable = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.verify()
            readable.append(p)
        except Exception as exc:  # PIL raises many types for a broken file
            yield f"{path.name}/{p.name}", Skip(f"unreadable image ({exc})")
    files = readable
    rng = random.Random(seed)
    i = 0
    while i < len(files):
        group = files[i:i + rng.choice(FOLDER_GROUP_SIZES)]
        i += len(group)
        text = " ".join(f"Image {k + 1}: {IMAGE_MARKER}" for k in range(len(group))) + " " + FOLDER_PROMPT
        yield (f"{path.name}/{group[0].name}", [{"role": "user", "content": text}],
               [_image_loader(p, k) for k, p in enumerate(group)])


def _read_video(path: Path, every_s: float, frames_per_sample: int) -> Iterator[Record | tuple[str, Skip]]:
    try:
        import cv2
    except ImportError:
        raise CalibrationError("video calibration sources need OpenCV: pip install 'edgelmm[watch]'") from None
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise CalibrationError(f"{path}: OpenCV cannot open this video")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        step = max(1, round(fps * every_s))
        frames: list[tuple[int, np.ndarray]] = []
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if index % step == 0:
                frames.append((index, np.ascontiguousarray(frame[:, :, ::-1])))  # BGR -> RGB
                if len(frames) == frames_per_sample:
                    text = " ".join(IMAGE_MARKER for _ in frames) + " " + VIDEO_PROMPT
                    yield (f"{path.name}@frames {frames[0][0]}-{frames[-1][0]}", [{"role": "user", "content": text}],
                           [(lambda im=im: im) for _, im in frames])
                    frames = []
            index += 1
    finally:
        cap.release()


def check_source(spec: str) -> None:
    """The cheap part of reading a source, for checking options before any work starts: the spec
    names a known kind (a synthetic split that exists) and its path exists and is a file or folder
    as that kind needs. Nothing is read."""
    from ..synthetic import SPLITS

    if not isinstance(spec, str) or not spec:
        raise CalibrationError(f"calibration source must be a path or 'synthetic', got {spec!r}")
    kind, sep, rest = spec.partition(":")
    if not (sep and kind in KINDS):
        kind, rest = ("synthetic", "") if spec == "synthetic" else (None, spec)
    if kind == "synthetic":
        if (rest or "train") not in SPLITS:
            raise CalibrationError(f"calibration source {spec!r}: the synthetic splits are {', '.join(SPLITS)}")
        return
    path = Path(rest)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # e.g. a name over 255 characters
        raise CalibrationError(f"calibration source {rest!r}: cannot open ({exc.strerror})") from None
    if not exists:
        raise CalibrationError(f"calibration source {spec!r} does not exist (a file, a folder, or 'synthetic')")
    if kind == "folder" and not is_dir:
        raise CalibrationError(f"calibration source {spec!r}: not a folder")
    if kind in ("mantis", "mimicit", "video") and is_dir:
        raise CalibrationError(f"calibration source {spec!r}: a folder, not a {kind} file")
    if kind is None and not is_dir and path.suffix.lower() not in (*VIDEO_SUFFIXES, ".json", ".jsonl"):
        raise CalibrationError(f"{spec}: not a known calibration source (JSONL/JSON records, an image folder, "
                               f"a video {'/'.join(VIDEO_SUFFIXES)}, or 'synthetic'); prefix it with one of "
                               f"{', '.join(k + ':' for k in KINDS)} to say what it is")


def detect_kind(spec: str) -> tuple[str, str]:
    """'kind:path' or a bare spec -> (kind, path-or-split)."""
    check_source(spec)
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        return kind, rest
    if spec == "synthetic":
        return "synthetic", "train"
    path = Path(spec)
    if path.is_dir():
        return "folder", spec
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return "video", spec
    first = next((r for _, r in _json_lines(path)), None) if path.suffix == ".jsonl" else _load_json(path)
    if isinstance(first, list):
        first = first[0] if first else None
    if isinstance(first, dict) and ("data" in first or "instruction" in first):
        return "mimicit", spec
    return "mantis", spec


def collect(spec: str, samples: int = 64, seed: int = 0, *, image_root: str | Path | None = None,
            video_every_s: float = 1.0, video_frames: int = 4, max_scan: int | None = None,
            on_progress: Callable[[int], None] | None = None) -> CalibSet:
    """Read up to `max_scan` records (default max(20 x samples, 200)) from the source, skip and
    count the bad ones, and draw `samples` of the good ones, stratified by (images, size)."""
    if samples < 1:
        raise CalibrationError(f"--calib-samples must be >= 1, got {samples}")
    kind, target = detect_kind(spec)
    max_scan = max_scan or max(20 * samples, 200)
    if kind == "synthetic":
        # The generator is endless and already balanced over tasks; read just what is needed.
        reader: Iterator = _read_synthetic(target or "train")
        max_scan = min(max_scan, 4 * samples)
    else:
        path = Path(target)
        if not path.exists():
            raise CalibrationError(f"calibration source {target!r} does not exist")
        root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
        reader = {"mantis": lambda: _read_mantis(path, root), "mimicit": lambda: _read_mimicit(path, root),
                  "folder": lambda: _read_folder(path, seed),
                  "video": lambda: _read_video(path, video_every_s, video_frames)}[kind]()
    good: list[CalibSample] = []
    skipped: Counter = Counter()
    examples: list[str] = []
    scanned = 0
    for item in reader:
        if scanned >= max_scan:
            break
        scanned += 1
        origin, *rest = item
        try:
            if isinstance(rest[0], Skip):
                raise rest[0]
            good.append(_validate((origin, rest[0], rest[1])))
        except Skip as why:
            reason = str(why).split(" (")[0]
            skipped[reason] += 1
            if len(examples) < 5:
                examples.append(f"{origin}: {why}")
        if on_progress:
            on_progress(scanned)
    if not good:
        raise CalibrationError(f"{spec}: none of the {scanned} record(s) could be used "
                               f"({dict(skipped) or 'the source is empty'}); first problems: {examples}")
    return CalibSet(spec, kind, stratified(good, samples, seed), scanned, skipped, examples, seed)


def stratified(samples: list[CalibSample], n: int, seed: int) -> list[CalibSample]:
    """n samples with each (images, size) stratum represented in proportion to its share
    (largest remainder), at least one from each stratum while n allows; seeded."""
    if n >= len(samples):
        return list(samples)
    groups: dict[tuple[int, str], list[CalibSample]] = defaultdict(list)
    for s in samples:
        groups[s.stratum].append(s)
    keys = sorted(groups)
    quota = {k: n * len(groups[k]) / len(samples) for k in keys}
    take = {k: int(q) for k, q in quota.items()}
    if n >= len(keys):
        for k in keys:
            take[k] = max(take[k], 1)
    for k in sorted(keys, key=lambda k: quota[k] - int(quota[k]), reverse=True):
        if sum(take.values()) >= n:
            break
        if take[k] < len(groups[k]):
            take[k] += 1
    while sum(take.values()) > n:  # the minimum-one rule can overshoot: trim the biggest strata
        biggest = max(keys, key=lambda k: take[k])
        take[biggest] -= 1
    rng = random.Random(seed)
    picked = [s for k in keys for s in rng.sample(groups[k], take[k])]
    rng.shuffle(picked)
    return picked
