"""`edgelmm watch --config cameras.yaml`: the cameras one process watches.

    cameras:
      - name: dock                 # in events, MQTT topics (<prefix>/dock/events) and the view
        source: 0                  # a camera index, a video file, an rtsp:// or http:// URL, or a
                                   # GStreamer pipeline (it contains '!')
        references: [dock.jpg]     # optional: images of the normal scene
        every: 2                   # optional: this camera's own gate settings (below)
      - name: gate
        source: rtsp://10.0.0.7/stream1

Relative paths (sources that are files, references) are relative to the YAML file. Settings a
camera does not give are the command line's. The file is read with yaml.safe_load and checked
whole before anything opens: an error names the file, the camera (number and name) and the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..errors import OptionError
from .anomaly import Camera, WatchConfig
from .sinks import check_camera_name

MAX_CONFIG_BYTES = 1 << 20

# key in the YAML -> (attribute path in WatchConfig, the types it takes)
CAMERA_SETTINGS: dict[str, tuple[str, tuple[type, ...]]] = {
    "every": ("every", (int,)),
    "warmup": ("gate.warmup_frames", (int,)),
    "trigger": ("gate.trigger_frames", (int,)),
    "clear": ("gate.clear_frames", (int,)),
    "margin": ("gate.margin", (int, float)),
    "min_threshold": ("gate.min_threshold", (int, float)),
    "threshold": ("gate.threshold", (int, float)),
    "realtime": ("capture.realtime", (bool,)),
}
CAMERA_KEYS = {"name", "source", "references"} | set(CAMERA_SETTINGS)


def _resolve_source(source: Any, base: Path) -> str | int:
    if isinstance(source, bool) or not isinstance(source, (int, str)) or source == "":
        raise ValueError("'source' must be a camera index, a file, a URL or a GStreamer pipeline")
    if isinstance(source, int) or source.isdigit() or "://" in source or "!" in source:
        return source
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else base / path)


def load_cameras(path: str | Path, defaults: WatchConfig | None = None) -> list[Camera]:
    """The cameras of a cameras.yaml, each with its WatchConfig (the defaults with its own settings)."""
    import yaml

    path = Path(path)
    where = f"--config {str(path)!r}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise OptionError(f"{where}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise OptionError(f"{where}: larger than {MAX_CONFIG_BYTES >> 20} MiB; is it the right file?")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise OptionError(f"{where}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise OptionError(f"{where}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict) or set(data) != {"cameras"}:
        raise OptionError(f"{where}: want one key, 'cameras', holding a list of cameras "
                          f"(got {sorted(data) if isinstance(data, dict) else type(data).__name__})")
    items = data["cameras"]
    if not isinstance(items, list) or not items:
        raise OptionError(f"{where}: 'cameras' must be a list of at least one camera")
    base = path.resolve().parent
    defaults = defaults or WatchConfig()
    cameras: list[Camera] = []
    for number, item in enumerate(items, 1):
        name = item.get("name") if isinstance(item, dict) else None
        culprit = f"{where}, camera {number}" + (f" ({name!r})" if isinstance(name, str) else "")
        try:
            cameras.append(_camera(item, base, defaults))
        except (ValueError, TypeError) as exc:
            raise OptionError(f"{culprit}: {exc}") from None
        except OptionError as exc:
            raise OptionError(f"{culprit}: {exc}") from None
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise OptionError(f"{where}: camera names must differ; {twice} appear more than once")
    return cameras


def _camera(item: Any, base: Path, defaults: WatchConfig) -> Camera:
    if not isinstance(item, dict):
        raise ValueError(f"want a mapping with 'name' and 'source', got {type(item).__name__}")
    unknown = sorted(set(map(str, item)) - CAMERA_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; a camera takes {sorted(CAMERA_KEYS)}")
    for key in ("name", "source"):
        if key not in item:
            raise ValueError(f"'{key}' is missing")
    if not isinstance(item["name"], str):
        raise ValueError("'name' must be text")
    check_camera_name(item["name"])
    references = item.get("references", [])
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ValueError("'references' must be a list of image paths")
    config = None
    if any(key in item for key in CAMERA_SETTINGS):
        config = copy.deepcopy(defaults)
        for key, (attr, types) in CAMERA_SETTINGS.items():
            if key not in item:
                continue
            value = item[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ValueError(f"{key!r} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
            owner, _, field = attr.rpartition(".")
            setattr(config.gate if owner == "gate" else config.capture if owner == "capture" else config, field, value)
        config.validate()
    return Camera(item["name"], _resolve_source(item["source"], base),
                  [str(Path(r) if Path(r).is_absolute() else base / r) for r in references], config)
