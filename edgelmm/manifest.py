"""The manifest's schema, checked on load before anything else reads it.

A bundle may come from anywhere (a copy over the network, a damaged disk, someone's edit), so the
manifest is hostile input: every field the runtimes read is checked for type and range here, every
path is relative and stays inside the bundle after symlinks are resolved, and every file an
artifact opens is one of its hashed entries. A violation is a BundleError naming the field
(`artifacts[2].files[0].sha256`), never a KeyError or a loop over a count of 10^9.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

from .errors import BundleError

MANIFEST = "edgelmm.json"      # a bundle is a folder with this file
# ONNX precision -> the variant of each graph it runs (file names: vision.int8.onnx, decoder.int4.onnx
# ...); calibration writes them, the runtimes and the memory estimates read them.
QUANTIZED_PRECISIONS: dict[str, dict[str, str]] = {
    "int8": {"vision": "int8", "embed": "fp32", "decoder": "int8"},
    "int4": {"vision": "fp32", "embed": "fp32", "decoder": "int4"},
    "int8-vision+int4": {"vision": "int8", "embed": "fp32", "decoder": "int4"},
}


def is_bundle(path) -> bool:
    """Whether `path` is an edgelmm bundle (a folder with a manifest); False for a path the
    filesystem cannot even look up (a name too long): the caller says what it is."""
    try:
        return (Path(path) / MANIFEST).is_file()
    except OSError:
        return False

# Larger than any manifest edgelmm writes (a few hundred KB with every report) by far; a manifest
# of gigabytes is refused before it is read into memory.
MAX_MANIFEST_BYTES = 64 << 20
MAX_LIST = 10_000                 # files, artifacts, graph inputs/outputs
MAX_PATH_PARTS = 8
MAX_NAME_BYTES = 255              # one path component (the filesystem's own limit)
MAX_FILE_BYTES = 1 << 44          # 16 TiB
SHA256 = re.compile(r"[0-9a-f]{64}")
TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")   # graph, format, precision names

MAX_CONTEXT = 1 << 24              # positions a fused decoder's rotary table may hold
# The decoder in ONNX Runtime's fused layout (export/fused_decoder.py), beside the plain "decoder".
FUSED_DECODER = "decoder_fused"
GRAPHS = {"onnx": ("vision", "embed", "decoder", FUSED_DECODER), "tensorrt": ("vision", "embed", "decoder"),
          "gguf": ("llm", "mmproj")}
# Text dimensions the runtimes size caches and loops by. A model has at most thousands of layers;
# these bounds are far above any real model and far below what would exhaust memory.
TEXT_BOUNDS = {"num_layers": (1, 4096), "num_kv_heads": (1, 4096), "head_dim": (1, 65536),
               "hidden_size": (1, 1 << 20), "vocab_size": (1, 1 << 24)}
OPTIONAL_DICTS = ("source", "built_with", "verify", "quality", "calibration", "tensorrt")


def _fail(field: str, problem: str, where: Path) -> BundleError:
    return BundleError(f"manifest field {field}: {problem}", path=str(where))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_manifest(path: Path) -> dict[str, Any]:
    """Read and parse the manifest file with bounded size, depth and numbers."""
    try:
        st = path.stat()
    except OSError as exc:
        raise BundleError(f"cannot read the manifest ({exc.strerror})", path=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError("the manifest is not a regular file", path=str(path))
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"the manifest is {st.st_size} bytes (at most {MAX_MANIFEST_BYTES}): not one edgelmm wrote",
                          path=str(path))
    try:
        text = path.read_bytes().decode("utf-8")
        manifest = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise BundleError(f"the manifest is not UTF-8 text ({exc.reason} at byte {exc.start})", path=str(path)) from None
    except RecursionError:
        raise BundleError("the manifest nests too deeply to be one edgelmm wrote", path=str(path)) from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers of thousands of digits
        raise BundleError(f"the manifest is not valid JSON ({exc})", path=str(path)) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"the manifest is a JSON {type(manifest).__name__}, not an object", path=str(path))
    return manifest


class _Checker:
    def __init__(self, root: Path, where: Path):
        self.root = root
        self.real_root = root.resolve()
        self.where = where

    def fail(self, field: str, problem: str) -> BundleError:
        return _fail(field, problem, self.where)

    def dict(self, obj: Any, field: str, required: tuple[str, ...] = ()) -> dict:
        if not isinstance(obj, dict):
            raise self.fail(field, f"expected an object, got {type(obj).__name__}")
        missing = [k for k in required if k not in obj]
        if missing:
            raise self.fail(field, f"lacks {', '.join(missing)}")
        return obj

    def list(self, obj: Any, field: str) -> list:
        if not isinstance(obj, list):
            raise self.fail(field, f"expected a list, got {type(obj).__name__}")
        if len(obj) > MAX_LIST:
            raise self.fail(field, f"{len(obj)} entries (at most {MAX_LIST})")
        return obj

    def int(self, obj: Any, field: str, lo: int, hi: int) -> int:
        if not isinstance(obj, int) or isinstance(obj, bool):
            raise self.fail(field, f"expected an integer, got {type(obj).__name__}")
        if not lo <= obj <= hi:
            raise self.fail(field, f"{obj} is outside {lo}..{hi}")
        return obj

    def str(self, obj: Any, field: str, pattern: re.Pattern | None = None, max_len: int = 4096) -> str:
        if not isinstance(obj, str):
            raise self.fail(field, f"expected a string, got {type(obj).__name__}")
        if len(obj) > max_len or (pattern is not None and not pattern.fullmatch(obj)):
            raise self.fail(field, f"{obj[:80]!r} is not a valid value")
        return obj

    def path(self, rel: Any, field: str) -> str:
        """A bundle-relative path: no absolute path, no '..', no empty or over-long component, and
        inside the bundle after resolving symlinks."""
        rel = self.str(rel, field)
        parts = rel.split("/")
        if (rel.startswith("/") or "\\" in rel or "\x00" in rel or len(parts) > MAX_PATH_PARTS
                or any(p in ("", ".", "..") or len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
                       for p in parts)):
            raise self.fail(field, f"{rel[:80]!r} is not a relative path inside the bundle")
        try:
            real = (self.root / rel).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise self.fail(field, f"{rel!r} cannot be resolved ({exc})") from None
        if real != self.real_root and self.real_root not in real.parents:
            raise self.fail(field, f"{rel!r} points outside the bundle")
        return rel

    def file_entry(self, entry: Any, field: str) -> dict:
        self.dict(entry, field, ("file", "size", "sha256"))
        self.path(entry["file"], f"{field}.file")
        self.int(entry["size"], f"{field}.size", 0, MAX_FILE_BYTES)
        self.str(entry["sha256"], f"{field}.sha256", SHA256)
        return entry


def validate_manifest(manifest: dict[str, Any], root: Path, where: Path, *, format_version: int,
                      families: tuple[str, ...]) -> list[dict[str, Any]]:
    """Check the whole manifest; return every hashed file entry once (deduplicated by path, with
    entries naming the same file required to agree)."""
    c = _Checker(root, where)
    c.dict(manifest, "(top level)", ("format_version", "family", "artifacts", "files", "text"))
    version = manifest["format_version"]
    if version != format_version or isinstance(version, bool):
        raise BundleError(f"manifest format_version {repr(version)[:40]} is not one this edgelmm reads "
                          f"({format_version}); re-export the bundle or upgrade edgelmm", path=str(where))
    c.str(manifest["family"], "family")
    if manifest["family"] not in families:
        raise c.fail("family", f"{manifest['family'][:80]!r} is not a family this edgelmm knows ({', '.join(families)})")
    for key in ("model_type", "prompt_style"):
        if manifest.get(key) is not None:
            c.str(manifest[key], key, max_len=256)
    for key in OPTIONAL_DICTS:
        if key in manifest:
            c.dict(manifest[key], key)
    for precision, report in manifest.get("quality", {}).items():
        c.dict(report, f"quality.{precision}")
    if "generation" in manifest:
        c.int(manifest["generation"], "generation", 0, 1 << 31)

    text = c.dict(manifest["text"], "text", tuple(TEXT_BOUNDS))
    for key, (lo, hi) in TEXT_BOUNDS.items():
        c.int(text[key], f"text.{key}", lo, hi)

    hashed: dict[str, dict] = {}

    def remember(entry: dict, field: str) -> None:
        seen = hashed.setdefault(entry["file"], entry)
        if (seen["size"], seen["sha256"]) != (entry["size"], entry["sha256"]):
            raise c.fail(field, f"{entry['file']!r} is listed twice with different sizes or hashes")

    for i, entry in enumerate(c.list(manifest["files"], "files")):
        remember(c.file_entry(entry, f"files[{i}]"), f"files[{i}]")
    listed = {e["file"] for e in manifest["files"]}
    for required in ("config.json", "tokenizer.json"):  # what every runtime reads from the bundle's root
        if required not in listed:
            raise c.fail("files", f"does not list {required} (every file a runtime reads must be hashed)")

    keys: set[tuple[str, str, str]] = set()
    for i, art in enumerate(c.list(manifest["artifacts"], "artifacts")):
        f = f"artifacts[{i}]"
        c.dict(art, f, ("graph", "format", "precision", "file", "files"))
        fmt = c.str(art["format"], f"{f}.format", TOKEN)
        if fmt not in GRAPHS:
            raise c.fail(f"{f}.format", f"{fmt!r} is not one of {', '.join(GRAPHS)}")
        graph = c.str(art["graph"], f"{f}.graph", TOKEN)
        if graph not in GRAPHS[fmt]:
            raise c.fail(f"{f}.graph", f"{graph!r} is not a {fmt} graph ({', '.join(GRAPHS[fmt])})")
        precision = c.str(art["precision"], f"{f}.precision", TOKEN)
        key = (graph, fmt, precision)
        if key in keys:
            raise c.fail(f, f"a second {fmt}/{precision} {graph} artifact (each may appear once)")
        keys.add(key)
        c.path(art["file"], f"{f}.file")
        entries = c.list(art["files"], f"{f}.files")
        for j, entry in enumerate(entries):
            remember(c.file_entry(entry, f"{f}.files[{j}]"), f"{f}.files[{j}]")
        if art["file"] not in {e["file"] for e in entries}:
            raise c.fail(f"{f}.file", f"{art['file']!r} is not one of the artifact's hashed files")
        c.dict(art, f, ("inputs", "outputs"))  # the runtimes check a graph's names against these
        for io in ("inputs", "outputs"):
            for j, desc in enumerate(c.list(art[io], f"{f}.{io}")):
                c.dict(desc, f"{f}.{io}[{j}]", ("name",))
                c.str(desc["name"], f"{f}.{io}[{j}].name", max_len=1024)
        if fmt == "tensorrt":
            engine = c.dict(art.get("engine"), f"{f}.engine", ("target",))
            c.dict(engine["target"], f"{f}.engine.target")
        if graph == FUSED_DECODER:  # the positions its rotary table holds: the runtime's cache limit
            c.int(art.get("max_context"), f"{f}.max_context", 1, MAX_CONTEXT)
    for i, art in enumerate(manifest["artifacts"]):  # the fused layout comes beside the plain one, never alone
        if art["graph"] == FUSED_DECODER and ("decoder", art["format"], art["precision"]) not in keys:
            raise c.fail(f"artifacts[{i}]", f"a fused {art['precision']} decoder without the plain {art['precision']} "
                                            "decoder it was exported beside")
    return list(hashed.values())


def check_regular_file(root: Path, entry: dict[str, Any]) -> Path:
    """The entry's file exists, is a regular file (not a FIFO or device that would block or never
    end a read) and has the listed size. Returns its path."""
    p = root / entry["file"]
    try:
        st = p.stat()
    except FileNotFoundError:
        raise BundleError("missing (listed in the manifest)", path=str(p)) from None
    except OSError as exc:
        raise BundleError(f"cannot be read ({exc.strerror})", path=str(p)) from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError("not a regular file (a bundle holds only regular files)", path=str(p))
    if st.st_size != entry["size"]:
        raise BundleError(f"size {st.st_size} bytes, manifest says {entry['size']} (truncated or replaced)",
                          path=str(p))
    return p


__all__ = ["MAX_MANIFEST_BYTES", "check_regular_file", "parse_manifest", "validate_manifest"]
