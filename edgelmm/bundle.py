"""The bundle: one directory, one manifest (edgelmm.json). Every exporter writes into it, every
runtime reads only it. Written into a temporary sibling directory and renamed into place when
complete, so an interrupted export never leaves a bundle that loads; every file carries a sha256
that is checked before any runtime session is created."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import BundleError

MANIFEST = "edgelmm.json"
FORMAT_VERSION = 1


def graph_file(graph: str, variant: str) -> str:
    """An ONNX graph's file name inside onnx/: vision.onnx (fp32), vision.fp16.onnx, decoder.int4.onnx ..."""
    return f"{graph}.onnx" if variant == "fp32" else f"{graph}.{variant}.onnx"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    p = root / rel
    return {"file": rel, "size": p.stat().st_size, "sha256": sha256_file(p)}


def checkpoint_fingerprint(model_dir: Path) -> str:
    """sha256 over the config and the weight files' names, sizes and heads: cheap on an 8B
    checkpoint, and it changes when the weights do."""
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.name == "config.json" or p.suffix == ".safetensors":
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
    return h.hexdigest()


def build_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("edgelmm", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "gguf"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed: not part of this build
            continue
    return out


@contextmanager
def staging_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside out_dir; on success it replaces out_dir atomically
    (a rename on the same filesystem). On any failure or signal nothing appears at out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError("already exists (pass overwrite=True / --overwrite to replace it)", path=str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    def artifact(self, graph: str, fmt: str, precision: str) -> dict[str, Any]:
        for a in self.manifest["artifacts"]:
            if a["graph"] == graph and a["format"] == fmt and a["precision"] == precision:
                return a
        have = sorted({(a["format"], a["precision"]) for a in self.manifest["artifacts"]})
        raise BundleError(f"no {fmt}/{precision} {graph} graph in this bundle (it has {have})", path=str(self.root))

    def path(self, artifact: dict[str, Any]) -> Path:
        return self.root / artifact["file"]


_REQUIRED_KEYS = ("format_version", "family", "artifacts", "files", "text")


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _check_file(root: Path, entry: dict[str, Any]) -> None:
    p = root / entry["file"]
    if not p.is_file():
        raise BundleError("missing (listed in the manifest)", path=str(p))
    size = p.stat().st_size
    if size != entry["size"]:
        raise BundleError(f"size {size} bytes, manifest says {entry['size']} (truncated or replaced)", path=str(p))
    if sha256_file(p) != entry["sha256"]:
        raise BundleError("sha256 does not match the manifest (the file is corrupt or was modified)", path=str(p))


def open_bundle(path: str | Path, verify_checksums: bool = True) -> Bundle:
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"not a bundle: no {MANIFEST}", path=str(root))
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"manifest is not valid JSON ({exc})", path=str(mpath)) from None
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"manifest lacks {', '.join(missing)}", path=str(mpath))
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"manifest format_version {manifest['format_version']!r} is not one this edgelmm reads "
                          f"({FORMAT_VERSION}); re-export the bundle or upgrade edgelmm", path=str(mpath))
    if verify_checksums:
        for entry in manifest["files"]:
            _check_file(root, entry)
        for art in manifest["artifacts"]:
            for entry in art["files"]:
                _check_file(root, entry)
    return Bundle(root=root, manifest=manifest)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
