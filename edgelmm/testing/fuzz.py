"""A seeded bad-input fuzzer for edgelmm: bundle manifests, GGUF headers, ONNX graphs, images,
videos, prompts and options (Python API and CLI).

Every case is one mutator (a row of MUTATORS: kind, name, function, expectation, culprit) applied
with its own seed to a copy of a base bundle exported from the shipped reference model. The copy
hardlinks every file of the base and replaces only what the mutator changes, so a case never edits
the base. A case runs in its own process, forked from a "zygote" interpreter that has already
imported edgelmm, ONNX Runtime and llama.cpp, under a wall-clock timeout and a memory limit
(RLIMIT_DATA: heap and private mappings; RLIMIT_AS made llama.cpp load 6x slower), and ends as
exactly one outcome:

  typed     an edgelmm.errors.EdgeLMMError (API), or exit status 2 from the CLI (with --json: stdout
            is one JSON object {"error": ..., "message": ...}); a refusal, as bad input should end
  accepted  ran and returned normally (fine unless the case must be refused)
  unnamed   typed, but the message does not name the culprit the case declares (a field, file,
            option or image index): counted as a failure, apart from "untyped" so it reads as the
            smaller problem it is
  untyped   any other exception (a traceback), or a CLI error that is not in the typed form
  crash     killed by a signal (SIGABRT from a GGML_ASSERT, SIGSEGV ...) or exited from C code
  hang      no result within the timeout (the process group is killed)
  wrong     accepted where the case must be refused (a path outside the bundle that loads, a NaN
            threshold taken), refused where it must be accepted (the controls, documented
            conversions), or a file opened that must not be: one outside the bundle (seen with an
            audit hook for Python and inotify for C code), or a bundle file the manifest does not hash

Expectations: "must_refuse", "may_accept" (typed or accepted are both fine) and "must_accept".

Run the campaign with `python benchmarks/fuzz.py`; tests/test_fuzz.py runs a fast slice. Nothing here
imports torch except `build_fixtures`, which runs in its own interpreter.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..manifest import FUSED_DECODER

OUTCOMES = ("typed", "accepted", "unnamed", "untyped", "crash", "hang", "wrong")
FAILING = ("unnamed", "untyped", "crash", "hang", "wrong")
MUST_REFUSE, MAY_ACCEPT, MUST_ACCEPT = "must_refuse", "may_accept", "must_accept"
MUST, MAY, OK = MUST_REFUSE, MAY_ACCEPT, MUST_ACCEPT          # short names for the tables below

MANIFEST = "edgelmm.json"
FIXTURES_INFO = "fixtures.json"
PASSWD = Path("/etc/passwd")
DEFAULT_PROMPT = "What is in <image>?"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ fixtures

def build_fixtures(root: str | Path, bundle: str | Path | None = None) -> Path:
    """Export the shipped reference model to a bundle (ONNX fp32 graphs + the f32 GGUF pair), or copy
    `bundle`, such an export made already, and write the images and the short video the cases use.
    Exporting needs torch; `ensure_fixtures` runs it in its own interpreter. The exporter's own GGUF
    check is skipped while exporting: the validator is what the campaign tests, and the base bundle
    is checked by the control cases instead."""
    import numpy as np
    from PIL import Image

    import edgelmm.gguf_file
    from edgelmm.models import reference_model
    from edgelmm.synthetic_video import VideoSpec, write_video
    from edgelmm.testing import sample_images

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if bundle is not None:
        shutil.rmtree(root / "bundle", ignore_errors=True)
        shutil.copytree(bundle, root / "bundle")
    else:
        from edgelmm.export import export

        validate, edgelmm.gguf_file.validate_gguf = edgelmm.gguf_file.validate_gguf, lambda *a, **k: None
        try:
            export(reference_model(), root / "bundle", formats=("onnx", "gguf"), gguf_types=("f32",), verify=False,
                   quiet=True, overwrite=True)
        finally:
            edgelmm.gguf_file.validate_gguf = validate
    images = root / "images"
    images.mkdir(exist_ok=True)
    good = sample_images(1, sizes=[(64, 64)])[0]
    Image.fromarray(good).save(images / "good.png")
    Image.fromarray(good).save(images / "good.jpg", quality=90)
    write_video(root / "video.avi", VideoSpec(seed=0, frames=12, anomaly="none", scale=1))
    info = {"bundle": "bundle", "reference": str(reference_model()), "good_png": "images/good.png",
            "good_jpg": "images/good.jpg", "video": "video.avi",
            "manifest_sha256": sha256_path(root / "bundle" / MANIFEST), "numpy": np.__version__}
    (root / FIXTURES_INFO).write_text(json.dumps(info, indent=1))
    return root


def ensure_fixtures(root: str | Path, python: str = sys.executable, log=print, bundle: str | Path | None = None) -> Path:
    """The fixtures under root, built (in a fresh interpreter, ~40 s on two cores) unless already there;
    from `bundle` (the reference model's ONNX fp32 + GGUF f32 export) in this one, when given."""
    root = Path(root)
    if bundle is not None and not (root / FIXTURES_INFO).is_file():
        build_fixtures(root, bundle)
    if not (root / FIXTURES_INFO).is_file():
        log(f"building fixtures in {root} (exporting the reference model) ...")
        t = time.time()
        r = subprocess.run([python, "-m", "edgelmm.testing.fuzz", "build-fixtures", str(root)],
                           capture_output=True, text=True, env=_child_env())
        if r.returncode != 0 or not (root / FIXTURES_INFO).is_file():
            raise RuntimeError(f"building the fuzz fixtures failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
        log(f"fixtures built in {time.time() - t:.0f} s")
    return root


def base_is_intact(fixtures: Path) -> bool:
    """Whether the base bundle still matches what was built (a case must never edit it)."""
    info = json.loads((fixtures / FIXTURES_INFO).read_text())
    bundle = fixtures / info["bundle"]
    if sha256_path(bundle / MANIFEST) != info["manifest_sha256"]:
        return False
    manifest = json.loads((bundle / MANIFEST).read_text())
    entries = [*manifest["files"], *(e for a in manifest["artifacts"] for e in a["files"])]
    return all((bundle / e["file"]).stat().st_size == e["size"] and sha256_path(bundle / e["file"]) == e["sha256"]
               for e in entries)


def _child_env() -> dict[str, str]:
    # No colours and no wrapping, so a CLI message is searched as one line.
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1", TERM="dumb",
                COLUMNS="4000", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")


# ----------------------------------------------------------------------- GGUF header (read + write)

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
           U64: "<Q", I64: "<q", F64: "<d"}


class GGUF:
    """A GGUF file as editable parts: version, key/values (type and value), tensor infos (name, dims,
    ggml type, offset) and the data section, re-serialised with the original alignment. Positions of
    every field in the last serialised header are kept for in-place byte edits."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.pos = 0
        self.magic = raw[:4]
        self.pos = 4
        self.version = self._u("<I")
        n_tensors, n_kv = self._u("<Q"), self._u("<Q")
        self.kvs: list[list] = []            # [key bytes, type, value]
        for _ in range(n_kv):
            key = self._str()
            vtype = self._u("<I")
            self.kvs.append([key, vtype, self._value(vtype)])
        self.tensors: list[list] = []        # [name bytes, dims, ggml type, offset]
        for _ in range(n_tensors):
            name = self._str()
            dims = [self._u("<Q") for _ in range(self._u("<I"))]
            self.tensors.append([name, dims, self._u("<I"), self._u("<Q")])
        self.alignment = self.get("general.alignment", 32)
        self.data = raw[-(-self.pos // self.alignment) * self.alignment:]
        self.positions: dict[str, list[int]] = {}

    def _u(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def _str(self) -> bytes:
        n = self._u("<Q")
        s = self.raw[self.pos:self.pos + n]
        self.pos += n
        return s

    def _value(self, vtype: int):
        if vtype == STR:
            return self._str()
        if vtype == ARR:
            etype, n = self._u("<I"), self._u("<Q")
            return (etype, [self._value(etype) for _ in range(n)])
        return self._u(_SCALAR[vtype])

    # -- editing
    def find(self, key: str) -> int | None:
        return next((i for i, kv in enumerate(self.kvs) if kv[0] == key.encode()), None)

    def get(self, key: str, default=None):
        i = self.find(key)
        return default if i is None else self.kvs[i][2]

    def set(self, key: str, vtype: int, value) -> None:
        i = self.find(key)
        if i is None:
            self.kvs.append([key.encode(), vtype, value])
        else:
            self.kvs[i][1:] = [vtype, value]

    def delete(self, key: str) -> None:
        self.kvs.pop(self.find(key))

    def tensor(self, name: str) -> list:
        return next(t for t in self.tensors if t[0] == name.encode())

    # -- writing
    def _pack_value(self, out: bytearray, vtype: int, value) -> None:
        if vtype == STR:
            self.positions.setdefault("str_len", []).append(len(out))
            out += struct.pack("<Q", len(value)) + value
        elif vtype == ARR:
            etype, items = value
            out += struct.pack("<I", etype)
            self.positions.setdefault("arr_len", []).append(len(out))
            out += struct.pack("<Q", len(items))
            for item in items:
                self._pack_value(out, etype, item)
        else:
            out += struct.pack(_SCALAR[vtype], value)

    def to_bytes(self, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
        self.positions = {}
        out = bytearray(self.magic + struct.pack("<I", self.version))
        self.positions["counts"] = [len(out)]
        out += struct.pack("<QQ", len(self.tensors) if n_tensors is None else n_tensors,
                           len(self.kvs) if n_kv is None else n_kv)
        for key, vtype, value in self.kvs:
            self._pack_value(out, STR, key)
            self.positions.setdefault("kv_type", []).append(len(out))
            out += struct.pack("<I", vtype)
            self._pack_value(out, vtype, value)
        for name, dims, ttype, offset in self.tensors:
            self._pack_value(out, STR, name)
            self.positions.setdefault("tensor", []).append(len(out))
            out += struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            out += struct.pack("<IQ", ttype, offset)
        self.positions["header_end"] = [len(out)]
        out += b"\0" * (-len(out) % self.alignment)
        return bytes(out) + self.data


# ---------------------------------------------------------------------------------------- the case

def fmt_path(path: Sequence) -> str:
    """("artifacts", 2, "files", 0, "sha256") -> "artifacts[2].files[0].sha256" (the validator's spelling)."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


class Raw:
    """A JSON literal written as-is into a manifest (NaN, Infinity, 1e400, 5000 digits, deep brackets)."""

    def __init__(self, text: str, label: str | None = None):
        self.text, self.label = text, label or text[:24]


def dumps_with_raw(obj: Any) -> str:
    """json.dumps where Raw values are spliced in as literal text."""
    raws: list[Raw] = []

    def swap(o):
        if isinstance(o, Raw):
            raws.append(o)
            return f"__fuzz_raw_{len(raws) - 1}__"
        if isinstance(o, dict):
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        return o

    text = json.dumps(swap(obj), indent=1, ensure_ascii=False)
    for i, r in enumerate(raws):
        text = text.replace(f'"__fuzz_raw_{i}__"', r.text)
    return text


class Case:
    """What a mutator works with: its seeded rng, the fixtures and a work directory of its own.
    `bundle()` makes the case's copy of the base bundle (hardlinks; `write` replaces a file by
    unlinking it first, so the base is never written); the mutator records what it chose with
    `note`, may change the row's expectation and culprit, and returns the action to run."""

    def __init__(self, mutator: "Mutator", seed: int, fixtures: Path, work: Path):
        self.mutator, self.seed = mutator, seed
        self.rng = random.Random(f"{mutator.id}:{seed}")
        self.fixtures, self.work = Path(fixtures), Path(work)
        self.info = json.loads((self.fixtures / FIXTURES_INFO).read_text())
        self.expect, self.culprit = mutator.expect, mutator.culprit
        self.notes: list[str] = []
        self.root: Path | None = None
        self.check_unhashed = True       # accepted loads must not read bundle files the manifest does not hash
        self.planted_passwd = False      # a mutator pointed the bundle at /etc/passwd: opening it is "wrong"

    # -- fixtures
    @property
    def base(self) -> Path:
        return self.fixtures / self.info["bundle"]

    @property
    def good_png(self) -> Path:
        return self.fixtures / self.info["good_png"]

    @property
    def good_jpg(self) -> Path:
        return self.fixtures / self.info["good_jpg"]

    @property
    def video(self) -> Path:
        return self.fixtures / self.info["video"]

    @property
    def reference(self) -> Path:
        return Path(self.info["reference"])

    # -- choices
    def note(self, text: str) -> None:
        self.notes.append(text)

    def pick(self, seq: Sequence, label: str | None = None):
        choice = seq[self.rng.randrange(len(seq))]
        if label:
            self.note(f"{label}={_short(choice)}")
        return choice

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    # -- the bundle copy
    def bundle(self, copy: bool = False) -> Path:
        if self.root is None:
            self.root = self.work / "bundle"
            shutil.copytree(self.base, self.root, copy_function=shutil.copy2 if copy else os.link)
        return self.root

    def path(self, rel: str) -> Path:
        return self.bundle() / rel

    def read(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write(self, rel: str, data: bytes | str) -> Path:
        """Replace a bundle file (a new inode: the hardlinked base file is untouched)."""
        p = self.path(rel)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.is_symlink() or p.exists():
            p.unlink()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        return p

    def remove(self, rel: str) -> Path:
        p = self.path(rel)
        p.unlink()
        return p

    def manifest(self) -> dict:
        return json.loads(self.read(MANIFEST))

    def save_manifest(self, manifest: Any) -> None:
        self.write(MANIFEST, manifest if isinstance(manifest, (str, bytes)) else dumps_with_raw(manifest))

    def refix(self, rel: str, manifest: dict | None = None) -> dict:
        """Make the manifest's size and sha256 of `rel` match the file again (so the checksum passes
        and what stands in the way is the check of the content). Returns the saved manifest."""
        m = manifest or self.manifest()
        p = self.path(rel)
        size, digest = p.stat().st_size, sha256_path(p)
        for entry in [*m["files"], *(e for a in m["artifacts"] for e in a["files"])]:
            if entry.get("file") == rel:
                entry["size"], entry["sha256"] = size, digest
        for art in m["artifacts"]:
            if art.get("file") == rel and "sha256" in art:
                art["sha256"] = digest
        self.save_manifest(m)
        return m

    def artifact_file(self, fmt: str, graph: str) -> str:
        return next(a["file"] for a in self.manifest()["artifacts"] if a["format"] == fmt and a["graph"] == graph)

    # -- outside the bundle
    @property
    def outside_dir(self) -> Path:
        d = self.work / "outside"
        d.mkdir(exist_ok=True)
        return d

    def outside(self, name: str, data: bytes) -> Path:
        """A file outside the bundle. Opening it at all (from Python or C) makes the case "wrong"."""
        p = self.outside_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def regular_file(self) -> Path:
        """A regular file, for 'an output path under a regular file'."""
        p = self.work / "regular"
        p.write_bytes(b"not a directory\n")
        return p

    # -- actions
    def load(self, backend: str = "onnxruntime", **kw) -> "Load":
        kw.setdefault("images", [str(self.good_png)])
        if backend == "llamacpp":
            kw.setdefault("load_kwargs", {}).setdefault("precision", "f32")
        return Load(path=kw.pop("path", None) or self.bundle(), backend=backend, **kw)

    def cli(self, *args, json_out: bool = False, ok_codes: tuple[int, ...] = (0,)) -> "Cli":
        args = [str(a) for a in args] + (["--json"] if json_out else [])
        return Cli(args=args, json=json_out, ok_codes=ok_codes)

    def run_args(self, bundle: Path | None = None, backend: str = "onnxruntime") -> list:
        return ["run", bundle or self.bundle(), "-p", DEFAULT_PROMPT, "-i", self.good_png, "--max-new-tokens", "2",
                "--backend", backend]


def _short(value: Any, n: int = 60) -> str:
    if isinstance(value, Raw):
        return value.label
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}...({len(text)} chars)"


# ------------------------------------------------------------------------------------------ actions

@dataclass
class Load:
    """edgelmm.load(path, backend, **load_kwargs) (or open_bundle without checksums, then
    pipeline_for_bundle), then generate/stream/generate_batch with a short answer."""

    path: Any
    backend: str = "onnxruntime"
    load_kwargs: dict = field(default_factory=dict)
    checksums: bool = True
    prompt: Any = DEFAULT_PROMPT
    images: Any = None
    gen_kwargs: dict = field(default_factory=lambda: {"max_new_tokens": 2})
    method: str = "generate"          # generate | stream | batch | load-only

    def run(self) -> str:
        import edgelmm
        from edgelmm.api import pipeline_for_bundle
        from edgelmm.bundle import open_bundle

        if self.checksums:
            pipe = edgelmm.load(self.path, backend=self.backend, **self.load_kwargs)
        else:
            pipe = pipeline_for_bundle(open_bundle(self.path, verify_checksums=False), backend=self.backend,
                                       **self.load_kwargs)
        if self.method == "load-only":
            return "loaded"
        if self.method == "stream":
            return "".join(pipe.stream(self.prompt, self.images, **self.gen_kwargs))[:80]
        if self.method == "batch":
            return repr([g.text for g in pipe.generate_batch(self.prompt, **self.gen_kwargs)])[:80]
        return pipe.generate(self.prompt, self.images, **self.gen_kwargs).text[:80]


@dataclass
class Call:
    """Any API call (a lambda); a typed error or a normal return, as for Load."""

    fn: Callable[[], Any]
    label: str = "call"

    def run(self) -> str:
        return _short(self.fn())


@dataclass
class Cli:
    """The `edgelmm` command with these arguments, run in-process (typer's standalone mode, as the
    console script does): exit status, stdout and stderr are what a shell would see."""

    args: list[str]
    json: bool = False
    ok_codes: tuple[int, ...] = (0,)  # documented statuses that are not errors (verify: 1, watch: 3)


# ----------------------------------------------------------------------------------- the mutators

@dataclass
class Mutator:
    """One row of the table: fn(case) damages the case's inputs and returns the action to run.
    expect and culprit (a regex the typed error's message must match, case-insensitive) are the
    defaults; fn may refine them for the variant it draws."""

    kind: str
    name: str
    fn: Callable[[Case], Any]
    expect: str = MUST_REFUSE
    culprit: str | None = None
    weight: float = 1.0
    slow: bool = False               # seconds per case (torch, export): left out of the fast slice

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


def _either(*patterns: str | None) -> str:
    return "|".join(f"(?:{p})" for p in patterns if p)


def _name(path: str | Path) -> str:
    return re.escape(os.path.basename(str(path).rstrip("/")) or str(path))


def _consume(case: Case, *, cli_share: float = 0.12, nochecks_share: float = 0.12) -> tuple[Any, str, bool]:
    """How a damaged bundle is opened: the API on ONNX Runtime or llama.cpp, sometimes without
    checksums (open_bundle(verify_checksums=False) + pipeline_for_bundle), sometimes `edgelmm run --json`.
    Returns (action, artifact format it reads, checksums on)."""
    bundle = case.bundle()
    backend = case.pick(["onnxruntime", "onnxruntime", "llamacpp"])
    fmt = {"onnxruntime": "onnx", "llamacpp": "gguf"}[backend]
    r = case.rng.random()
    if r < cli_share:
        case.note(f"via=cli run --backend {backend} --json")
        return case.cli(*case.run_args(bundle, backend), json_out=True), fmt, True
    if r < cli_share + nochecks_share:
        case.note(f"via={backend} without checksums")
        return case.load(backend, checksums=False), fmt, False
    case.note(f"via={backend}")
    return case.load(backend), fmt, True


# -- manifest: schema damage at every level

def _nodes(obj: Any, path: tuple = ()):
    if path:
        yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


def _get(obj: Any, path: Sequence) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: Sequence, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _delete(obj: Any, path: Sequence) -> None:
    del _get(obj, path[:-1])[path[-1]]


ENTRY_KEYS = ("file", "size", "sha256")
ARTIFACT_KEYS = ("graph", "format", "precision", "file", "files")


def _field_expect(manifest: dict, path: tuple, op: str, fmt: str, checksums: bool) -> str:
    """Whether damage (op "delete" or "change") at path must be refused when the bundle is opened for
    `fmt` artifacts: what the schema requires and what the runtime reads must be refused; the
    rest (reports, provenance, graph I/O descriptions, other formats' artifacts) may load."""
    top, depth = path[0], len(path)
    if not checksums and path[-1] == "sha256" and op == "change":
        return MAY
    if top in ("format_version", "family", "text"):
        return MUST
    if top == "files":
        if depth == 2 and op == "delete":
            name = manifest["files"][path[1]].get("file") if isinstance(manifest["files"][path[1]], dict) else None
            return MUST if name in ("config.json", "tokenizer.json") else MAY   # the oracle judges the rest
        return MUST if depth <= 2 or path[2] in ENTRY_KEYS else MAY
    if top == "artifacts":
        if depth == 1:
            return MUST
        art = manifest["artifacts"][path[1]]
        if depth == 2:
            if op == "delete" and art.get("graph") == FUSED_DECODER:
                return MAY   # an optional second layout: without it the plain decoder runs (older bundles)
            return MUST if op == "change" or art.get("format") == fmt else MAY
        if path[2] in ARTIFACT_KEYS:
            if path[2] == "files" and depth == 4 and op == "delete" and len(art["files"]) > 1:
                return MAY
            return MUST if depth <= 4 or path[4] in ENTRY_KEYS else MAY
        if path[2] == "sha256" and art.get("format") == fmt and checksums:
            return MAY   # a second copy of the graph's hash: refusing a wrong one is fine, ignoring it too
    return MAY


def _pick_node(case: Case, manifest: dict, fmt: str, checksums: bool, want: Callable[[tuple, Any], bool] = None):
    nodes = [(p, v) for p, v in _nodes(manifest) if want is None or want(p, v)]
    weights = [4.0 if _field_expect(manifest, p, "change", fmt, checksums) == MUST else 1.0 for p, _ in nodes]
    path, value = case.rng.choices(nodes, weights)[0]
    return path, value


def _last_key(path: tuple) -> str:
    return next((p for p in reversed(path) if isinstance(p, str)), "")


def _field_culprit(path: tuple, *extra: str) -> str:
    return _either(re.escape(fmt_path(path)), rf"\b{re.escape(_last_key(path))}\b", *extra)


def m_delete(case: Case):
    action, fmt, checksums = _consume(case)
    m = case.manifest()
    path, old = _pick_node(case, m, fmt, checksums)
    case.expect = _field_expect(m, path, "delete", fmt, checksums)
    # A whole entry gone may be reported by what it was: its graph, format or file.
    what = [re.escape(str(old[k])) for k in ("graph", "file") if isinstance(old, dict) and isinstance(old.get(k), str)]
    case.culprit = _field_culprit(path, *what) if case.expect == MUST else None
    case.note(f"delete {fmt_path(path)}")
    _delete(m, path)
    case.save_manifest(m)
    return action


RETYPES: list[Any] = [None, True, False, 0, -1, 1.5, "", "x", [], {}, [1, 2], {"x": 1}, "../../etc/passwd",
                      "\u00e9\u4e2d", [[[[]]]]]


def m_retype(case: Case):
    action, fmt, checksums = _consume(case)
    m = case.manifest()
    path, old = _pick_node(case, m, fmt, checksums)
    choices = [v for v in RETYPES if type(v) is not type(old)]
    value = case.pick(choices)
    case.expect = _field_expect(m, path, "change", fmt, checksums)
    case.culprit = _field_culprit(path) if case.expect == MUST else None
    case.note(f"{fmt_path(path)}: {_short(old, 30)} -> {_short(value, 30)}")
    _set(m, path, value)
    case.save_manifest(m)
    return action


def _hostile_numbers(old: int) -> list[tuple[Any, str | None]]:
    """(value, extra culprit pattern): numbers no field should take, as JSON allows writing them."""
    return [(-1, None), (0 if old != 0 else -5, None), (2 ** 31, None), (2 ** 63, None), (2 ** 64 + 1, None),
            (1.5, None), (True, None), (-0.0, None), (float(old) + 0.5, None),
            (Raw("NaN"), "NaN"), (Raw("Infinity"), "Infinity|inf"), (Raw("-Infinity"), "Infinity|inf"),
            (Raw("1e400"), "1e400|inf"), (Raw("9" * 5000, "5000 digits"), "digit"),
            (Raw("-" + "9" * 5000, "-5000 digits"), "digit"), (Raw("1" + "0" * 400 + ".0", "1e400 as digits"), "inf")]


def m_number(case: Case):
    action, fmt, checksums = _consume(case)
    m = case.manifest()
    path, old = _pick_node(case, m, fmt, checksums,
                           lambda p, v: isinstance(v, int) and not isinstance(v, bool))
    value, extra = case.pick(_hostile_numbers(old))
    case.expect = _field_expect(m, path, "change", fmt, checksums)
    case.culprit = _field_culprit(path, extra) if case.expect == MUST else None
    case.note(f"{fmt_path(path)}: {old} -> {_short(value, 30)}")
    _set(m, path, value)
    case.save_manifest(m)
    return action


def m_same_number_as_float(case: Case):
    """An integer field written as the same value in float (4.0): the schema says integer."""
    action, fmt, checksums = _consume(case)
    m = case.manifest()
    path, old = _pick_node(case, m, fmt, checksums, lambda p, v: isinstance(v, int) and not isinstance(v, bool))
    case.expect = MAY
    case.note(f"{fmt_path(path)}: {old} -> {float(old)}")
    _set(m, path, float(old))
    case.save_manifest(m)
    return action


def m_nesting(case: Case):
    action, fmt, checksums = _consume(case)
    m = case.manifest()
    depth = case.pick([600, 5000, 100_000, 1_000_000], "depth")
    opener = case.pick(["[", '{"a":'], "bracket")
    closer = "]" if opener == "[" else "}"
    nested = Raw(opener * depth + "1" + closer * depth, f"{opener}*{depth}")
    if case.chance(0.25):
        case.note("as the whole manifest")
        case.expect, case.culprit = MUST, "manifest|edgelmm.json|JSON|nest|object"
        case.save_manifest(nested.text)
        return action
    path, _ = _pick_node(case, m, fmt, checksums)
    case.expect = _field_expect(m, path, "change", fmt, checksums)
    if depth >= 5000:   # deeper than any JSON parser's default recursion: the manifest must be refused
        case.expect = MUST
    case.culprit = _field_culprit(path, "nest|deep|JSON|recurs") if case.expect == MUST else None
    case.note(f"at {fmt_path(path)}")
    _set(m, path, nested)
    case.save_manifest(m)
    return action


def m_garbage(case: Case):
    """The whole manifest replaced: empty, not an object, not UTF-8, a BOM, cut short, 70 MB of zeros."""
    action, _, _ = _consume(case)
    text = case.read(MANIFEST)
    variants = [
        ("empty", b"", MUST), ("null", b"null", MUST), ("list", b"[]", MUST), ("number", b"42", MUST),
        ("string", b'"bundle"', MUST), ("not utf-8", b"\xff\xfe" + text, MUST),
        ("utf-16", text.decode().encode("utf-16"), MUST), ("cut short", text[: len(text) // 2], MUST),
        ("trailing garbage", text + b"\x00garbage", MUST), ("nul bytes", b"\x00" * 100, MUST),
        ("bom", b"\xef\xbb\xbf" + text, MAY), ("whitespace", b" \n\t" + text + b"\n\n", MAY),
        ("duplicate key first", b'{"family": "nope",' + text.lstrip()[1:], MAY),
        ("duplicate key last", text.rstrip()[:-1] + b', "family": "nope"}', MUST),
    ]
    label, data, case.expect = case.pick(variants)
    case.note(label)
    case.culprit = "manifest|edgelmm.json|JSON|UTF|family" if case.expect == MUST else None
    case.save_manifest(data)
    if case.chance(0.15):
        case.note("70 MB sparse file")
        case.expect = MUST
        with open(case.path(MANIFEST), "r+b") as f:
            f.truncate(70 << 20)
    return action


# -- manifest: paths

def _graph_target(case: Case, fmt: str) -> tuple[int, dict]:
    m = case.manifest()
    arts = [(i, a) for i, a in enumerate(m["artifacts"]) if a["format"] == fmt]
    return case.pick(arts)


def _point(m: dict, index: int | None, rel: str, new: str, size: int | None, digest: str | None,
           files_index: int | None = None) -> None:
    """Make artifact `index` (or files[files_index]) name `new` instead of `rel`, with this size and hash."""
    if index is not None:
        art = m["artifacts"][index]
        art["file"] = new
        for e in art["files"]:
            if e["file"] == rel:
                e.update(file=new, **({"size": size} if size is not None else {}),
                         **({"sha256": digest} if digest is not None else {}))
        if "sha256" in art and digest is not None:
            art["sha256"] = digest
    else:
        m["files"][files_index].update(file=new, **({"size": size} if size is not None else {}),
                                       **({"sha256": digest} if digest is not None else {}))


def m_path(case: Case):
    """A manifest path that is absolute, climbs out with '..', or is not a path at all; where it
    names a real file, with that file's real size and sha256 so only the path check can stop it."""
    action, fmt, _ = _consume(case)
    m = case.manifest()
    if case.chance(0.3):
        name = case.pick(["config.json", "tokenizer.json"])
        fi = next(i for i, e in enumerate(m["files"]) if e["file"] == name)
        index, rel = None, m["files"][fi]["file"]
    else:
        fi = None
        index, art = _graph_target(case, fmt)
        rel = art["file"]
    real = case.path(rel).read_bytes()
    copy = case.outside(os.path.basename(rel), real)
    passwd = PASSWD.read_bytes() if PASSWD.is_file() else b""
    variants = [
        ("/etc/passwd", len(passwd), sha256_bytes(passwd), MUST),
        (str(copy), len(real), sha256_bytes(real), MUST),
        (f"../outside/{copy.name}", len(real), sha256_bytes(real), MUST),
        (f"{os.path.dirname(rel) or '.'}/../../outside/{copy.name}", len(real), sha256_bytes(real), MUST),
        (f"./{rel}", None, None, MAY), (rel.replace("/", "//"), None, None, MAY),
        (rel.replace("/", "/./"), None, None, MAY), (rel.replace("/", "\\"), None, None, MUST),
        (rel + "\x00.txt", None, None, MUST), ("a" * 300, None, None, MUST), ("a/" * 40 + "x", None, None, MUST),
        ("", None, None, MUST), ("/", None, None, MUST), (".", None, None, MUST),
        (os.path.dirname(rel) or "onnx", None, None, MUST), ("~/" + rel, None, None, MUST),
        ("/proc/self/environ", None, None, MUST), ("/dev/zero", 0, sha256_bytes(b""), MUST),
        (rel.upper(), None, None, MUST), (rel + " ", None, None, MUST),
        (Raw('"onnx/\\udc80.onnx"', "lone surrogate"), None, None, MUST),
    ]
    # a rewrite that leaves this path as it was (no "/" to double or turn into "\\") is no mutation
    variants = [v for v in variants if v[0] != rel]
    new, size, digest, case.expect = case.pick(variants)
    case.planted_passwd = new == str(PASSWD)
    case.note(f"{rel} -> {_short(new, 50)}")
    case.culprit = _either(r"\bfile\b", _name(new) if isinstance(new, str) and new.strip("/.") else None,
                           "outside|absolute|relative|path")
    _point(m, index, rel, new, size, digest, fi)
    case.save_manifest(m)
    return action


def m_duplicate_artifact(case: Case):
    """A second entry for a graph, placed first, naming another file (outside the bundle, or an
    unhashed copy): the first match must not win silently."""
    action, fmt, _ = _consume(case)
    m = case.manifest()
    index, art = _graph_target(case, fmt)
    dup = json.loads(json.dumps(art))
    real = case.path(art["file"]).read_bytes()
    where = case.pick(["outside", "inside", "identical"], "duplicate")
    if where == "outside":
        copy = case.outside(os.path.basename(art["file"]), real)
        _point({"artifacts": [dup]}, 0, art["file"], f"../outside/{copy.name}", len(real), sha256_bytes(real))
    elif where == "inside":
        new = art["file"] + ".dup"
        case.write(new, real)
        _point({"artifacts": [dup]}, 0, art["file"], new, len(real), sha256_bytes(real))
    else:
        case.expect = MAY
    m["artifacts"].insert(0, dup)
    case.culprit = "artifact|twice|duplicate|second|outside"
    case.save_manifest(m)
    return action


def m_empty_lists(case: Case):
    action, fmt, _ = _consume(case)
    m = case.manifest()
    key = case.pick(["files", "artifacts", "artifact files"], "emptied")
    if key == "artifact files":
        index, _ = _graph_target(case, fmt)
        m["artifacts"][index]["files"] = []
        case.culprit = r"artifacts\[\d+\]|files"
    else:
        m[key] = []
        case.culprit = _either(key, "artifact" if key == "artifacts" else None, fmt, "onnx|gguf|backend")
    case.save_manifest(m)
    return action


def m_file_not_hashed(case: Case):
    """An artifact's file is not one of its hashed files: another graph, or a planted copy."""
    action, fmt, _ = _consume(case)
    m = case.manifest()
    index, art = _graph_target(case, fmt)
    if case.chance(0.5):
        other = case.pick([a["file"] for a in m["artifacts"] if a["file"] != art["file"]], "file")
        m["artifacts"][index]["file"] = other
    else:
        planted = art["file"] + ".planted"
        case.write(planted, case.read(art["file"]))
        m["artifacts"][index]["file"] = planted
        case.note(f"file={planted} (not listed)")
    case.culprit = _either(rf"artifacts\[{index}\]", r"\bfile\b", "hash")
    case.save_manifest(m)
    return action


def _used_file(case: Case, fmt: str) -> str:
    """A file the opened backend really reads: one of its graphs or a root file."""
    if case.chance(0.3):
        return case.pick(["config.json", "tokenizer.json"])
    return _graph_target(case, fmt)[1]["file"]


def m_content_swap(case: Case):
    """Same size, other bytes, no manifest change: only the checksum can tell."""
    action, fmt, checksums = _consume(case)
    rel = _used_file(case, fmt)
    data = bytearray(case.read(rel))
    for _ in range(case.rng.randint(1, 8)):
        data[case.rng.randrange(len(data))] ^= 1 << case.rng.randrange(8)
    case.write(rel, bytes(data))
    case.note(f"bytes flipped in {rel}")
    case.expect = MUST if checksums else MAY
    case.culprit = _either("sha256|checksum|hash", _name(rel))
    return action


def m_size_lie(case: Case):
    action, fmt, _ = _consume(case)
    rel = _used_file(case, fmt)
    data = case.read(rel)
    cut = case.rng.randrange(len(data))
    case.write(rel, data[:cut] if case.chance(0.7) else data + b"\0" * case.rng.randint(1, 100))
    case.note(f"{rel} resized (manifest unchanged)")
    case.culprit = _either(r"\bsize\b", _name(rel))
    return action


def m_missing_file(case: Case):
    action, fmt, _ = _consume(case)
    rel = _used_file(case, fmt)
    case.remove(rel)
    case.note(f"removed {rel}")
    case.culprit = _either("missing|not found|no such", _name(rel))
    return action


def m_special_file(case: Case):
    """A listed file replaced by a symlink out of the bundle (to a real copy, to /etc/passwd with the
    manifest re-fixed), a symlink loop, a directory, a FIFO, or a symlinked folder."""
    action, fmt, checksums = _consume(case)
    rel = _used_file(case, fmt)
    p = case.path(rel)
    real = p.read_bytes()
    what = case.pick(["symlink out", "symlink passwd", "symlink loop", "directory", "fifo", "symlink folder",
                      "symlink inside"], "replaced by")
    p.unlink()
    case.culprit = _either(_name(rel), "symlink|outside|regular|loop|directory|fifo")
    if what == "symlink out":
        p.symlink_to(case.outside(os.path.basename(rel), real))
    elif what == "symlink passwd":
        p.symlink_to(PASSWD)
        case.planted_passwd = True
        case.refix(rel)
    elif what == "symlink loop":
        p.symlink_to(p.name + ".loop")
        p.with_name(p.name + ".loop").symlink_to(p.name)
    elif what == "directory":
        p.mkdir()
    elif what == "fifo":
        os.mkfifo(p)
    elif what == "symlink inside":    # to a hashed copy inside the bundle: harmless
        p.with_name(p.name + ".real").write_bytes(real)
        p.symlink_to(p.name + ".real")
        case.expect = MAY
    else:
        folder = os.path.dirname(rel)
        if not folder:
            case.note("(a root file: symlink out instead)")
            p.symlink_to(case.outside(os.path.basename(rel), real))
        else:
            p.write_bytes(real)    # put it back, then move the whole folder out
            moved = case.outside_dir / folder
            shutil.move(str(case.path(folder)), moved)
            case.path(folder).symlink_to(moved, target_is_directory=True)
    return action


def m_unhashed_read(case: Case):
    """A file the runtime may read is dropped from the manifest's hashed files (or a new one is
    planted): loading may work, but only if the runtime then does not read it."""
    action, _, _ = _consume(case)
    m = case.manifest()
    if case.chance(0.7):
        names = [e["file"] for e in m["files"] if e["file"] not in ("config.json", "tokenizer.json")]
        name = case.pick(names, "unlisted")
        m["files"] = [e for e in m["files"] if e["file"] != name]
        case.save_manifest(m)
    else:
        name = case.pick(["preprocessor_config.json", "special_tokens_map.json", "tokenizer.model",
                          "chat_template.json", "added_tokens.json"], "planted")
        case.write(name, json.dumps({"chat_template": "{{ 'planted' }}", "image_seq_length": 1,
                                     "do_resize": False}) if name.endswith(".json") else b"planted")
    case.expect, case.culprit = MAY, _either(_name(name), "files|hash")
    return action


def m_text_inconsistent(case: Case):
    """text dimensions inside their ranges but not the model's: no crash, no traceback."""
    action, _, _ = _consume(case)
    m = case.manifest()
    key = case.pick(list(m["text"]))
    old = m["text"][key]
    m["text"][key] = case.pick([old + 1, max(1, old - 1), old * 2, 1, 4096 if key != "vocab_size" else 1 << 24])
    case.note(f"text.{key}: {old} -> {m['text'][key]}")
    case.expect, case.culprit = MAY, None
    case.save_manifest(m)
    return action


def m_manifest_file(case: Case):
    """edgelmm.json itself is a FIFO, a directory, a symlink out of the bundle or to /dev/zero."""
    action, _, _ = _consume(case)
    p = case.path(MANIFEST)
    real = p.read_bytes()
    what = case.pick(["fifo", "directory", "symlink out", "dev zero", "symlink loop"], "manifest is")
    p.unlink()
    case.culprit = _either("edgelmm.json|manifest|bundle", "regular|symlink|outside")
    if what == "fifo":
        os.mkfifo(p)
        case.expect = MAY   # not a bundle then; what matters is that nothing blocks on it
    elif what == "directory":
        p.mkdir()
        case.expect = MAY
    elif what == "symlink out":
        p.symlink_to(case.outside(MANIFEST, real))
    elif what == "dev zero":
        p.symlink_to("/dev/zero")
        case.expect = MAY
    else:
        p.symlink_to(MANIFEST)
        case.expect = MAY
    return action


def m_format_family(case: Case):
    action, _, _ = _consume(case)
    m = case.manifest()
    key = case.pick(["format_version", "family"])
    values = {"format_version": [(0, MUST), (2, MUST), ("1", MUST), (True, MUST), (1.5, MUST), (None, MUST),
                                 (-1, MUST), (1.0, MAY), (2 ** 100, MUST)],
              "family": [("nope", MUST), ("", MUST), (None, MUST), (["llava"], MUST), ("LLAVA", MUST),
                         ("idefics3", MAY), ("llava\x00", MUST), ("x" * 100_000, MUST)]}[key]
    m[key], case.expect = case.pick(values)
    case.note(f"{key}={_short(m[key])}")
    case.culprit = rf"\b{key}\b"
    case.save_manifest(m)
    return action


def m_graph_io(case: Case):
    """The graphs' input/output descriptions renamed, retyped or reshaped."""
    action, fmt, _ = _consume(case)
    m = case.manifest()
    art, io = case.pick([(a, io) for a in m["artifacts"] for io in ("inputs", "outputs") if a.get(io)])
    desc = case.pick(art[io])
    what = case.pick(["rename", "dtype", "shape", "drop", "duplicate", "swap"], "change")
    if what == "rename":
        desc["name"] = desc["name"] + "_x"
    elif what == "dtype":
        desc["dtype"] = case.pick(["float64", "int8", "", 5, None])
    elif what == "shape":
        desc["shape"] = case.pick([[], [-1], [0, 0], "batch", [2 ** 40, 3], None])
    elif what == "drop":
        art[io].remove(desc)
    elif what == "duplicate":
        art[io].append(dict(desc))
    else:
        art["inputs"], art["outputs"] = art["outputs"], art["inputs"]
    case.note(f"{art['format']}/{art['graph']}.{io}")
    case.expect, case.culprit = MAY, None
    case.save_manifest(m)
    return action


MANIFEST_MUTATORS = [
    Mutator("manifest", "delete", m_delete),
    Mutator("manifest", "retype", m_retype),
    Mutator("manifest", "number", m_number),
    Mutator("manifest", "int-as-float", m_same_number_as_float, MAY, weight=0.3),
    Mutator("manifest", "nesting", m_nesting),
    Mutator("manifest", "garbage", m_garbage, culprit="manifest|edgelmm.json|JSON"),
    Mutator("manifest", "path", m_path, weight=2.0),
    Mutator("manifest", "duplicate-artifact", m_duplicate_artifact),
    Mutator("manifest", "empty-lists", m_empty_lists),
    Mutator("manifest", "file-not-hashed", m_file_not_hashed),
    Mutator("manifest", "content-swap", m_content_swap),
    Mutator("manifest", "size-lie", m_size_lie),
    Mutator("manifest", "missing-file", m_missing_file),
    Mutator("manifest", "special-file", m_special_file, weight=1.5),
    Mutator("manifest", "unhashed-read", m_unhashed_read, MAY),
    Mutator("manifest", "text-inconsistent", m_text_inconsistent, MAY),
    Mutator("manifest", "manifest-file", m_manifest_file),
    Mutator("manifest", "format-family", m_format_family),
    Mutator("manifest", "graph-io", m_graph_io, MAY),
]


# -- GGUF: headers damaged, then size and sha256 re-fixed so only the validator stands in the way

NAN, INF = float("nan"), float("inf")
# "{arch}": the LLM's own architecture (llama, qwen2vl), read from the file being damaged.
GGUF_KV_BAD: dict[str, list[tuple[str, list[tuple[int, Any]], str]]] = {
    "llm": [
        ("{arch}.block_count", [(U32, 0), (U32, 2 ** 32 - 1), (I32, -1), (U64, 2 ** 63), (U32, 5)], MUST),
        ("{arch}.attention.head_count", [(U32, 0), (U32, 2 ** 32 - 1), (U32, 3)], MUST),
        ("{arch}.attention.head_count_kv", [(U32, 0), (U32, 3), (U32, 8), (U32, 2 ** 32 - 1)], MUST),
        ("{arch}.embedding_length", [(U32, 0), (U32, 2 ** 31), (U32, 255)], MUST),
        ("{arch}.feed_forward_length", [(U32, 0), (U32, 2 ** 32 - 1), (U32, 767)], MUST),
        ("{arch}.attention.layer_norm_rms_epsilon", [(F32, NAN), (F32, -1e-5), (F32, INF), (F32, -INF)], MUST),
        ("{arch}.rope.dimension_count", [(U32, 0), (U32, 2 ** 32 - 1), (U32, 65), (U32, 128)], MUST),
        ("{arch}.rope.freq_base", [(F32, NAN), (F32, 0.0), (F32, -1.0), (F32, INF)], MUST),
        ("{arch}.vocab_size", [(U32, 0), (U32, 2 ** 32 - 1), (U32, 639), (U32, 641)], MUST),
        ("{arch}.attention.key_length", [(U32, 0), (U32, 63), (U32, 2 ** 32 - 1)], MUST),
        ("{arch}.context_length", [(U32, 0), (U32, 1), (U32, 2 ** 32 - 1)], MAY),
        ("tokenizer.ggml.bos_token_id", [(U32, 2 ** 32 - 1), (U32, 640), (I32, -1)], MAY),
        ("tokenizer.ggml.eos_token_id", [(U32, 2 ** 32 - 1), (U32, 640), (I32, -1)], MAY),
        ("tokenizer.ggml.model", [(STR, b"gpt2"), (STR, b"nope"), (STR, b""), (STR, b"bert")], MUST),
        ("general.architecture", [(STR, b"clip"), (STR, b"llama4x"), (STR, b"\xff\xfe"), (STR, b""),
                                  (STR, b"llama\x00")], MUST),
        ("general.alignment", [(U32, 0), (U32, 3), (U32, 2 ** 32 - 1), (U32, 1 << 20)], MUST),
        ("tokenizer.chat_template", [(STR, b"{% for %}"), (STR, b"\xff\xfe"),
                                     (STR, b"{{ raise_exception('no') }}")], MAY),
        ("general.file_type", [(U32, 99), (U32, 2 ** 32 - 1)], MAY),
    ],
    "mmproj": [
        ("clip.vision.image_size", [(U32, 0), (U32, 2 ** 32 - 1), (U32, 63), (U32, 65536)], MUST),
        ("clip.vision.patch_size", [(U32, 0), (U32, 2 ** 32 - 1), (U32, 7), (U32, 65)], MUST),
        ("clip.vision.block_count", [(U32, 0), (U32, 2 ** 32 - 1), (U32, 5)], MUST),
        ("clip.vision.embedding_length", [(U32, 0), (U32, 2 ** 32 - 1), (U32, 255)], MUST),
        ("clip.vision.feed_forward_length", [(U32, 0), (U32, 2 ** 32 - 1)], MUST),
        ("clip.vision.attention.head_count", [(U32, 0), (U32, 3), (U32, 2 ** 32 - 1)], MUST),
        ("clip.vision.attention.layer_norm_epsilon", [(F32, NAN), (F32, -1.0), (F32, INF)], MUST),
        ("clip.vision.projection_dim", [(U32, 0), (U32, 255), (U32, 2 ** 32 - 1)], MUST),
        ("clip.projector_type", [(STR, b"nope"), (STR, b""), (STR, b"idefics3"), (STR, b"ldp"), (STR, b"\xff")],
         MUST),
        ("clip.vision.feature_layer", [(ARR, (I32, [99])), (ARR, (I32, [-5])), (ARR, (I32, [])),
                                       (ARR, (I32, [3] * 1000))], MUST),
        ("clip.vision.image_mean", [(ARR, (F32, [NAN] * 3)), (ARR, (F32, [0.5])), (ARR, (F32, []))], MUST),
        ("clip.vision.image_std", [(ARR, (F32, [0.0] * 3)), (ARR, (F32, [0.5] * 2))], MUST),
        ("clip.has_vision_encoder", [(BOOL, 0), (BOOL, 7)], MUST),
        ("clip.use_gelu", [(BOOL, 0)], MAY),
    ],
}
# Keys of one architecture or projector only: damaged where the file has them.
GGUF_KV_BAD_WHERE_PRESENT: dict[str, list[tuple[str, list[tuple[int, Any]], str]]] = {
    "llm": [("{arch}.rope.dimension_sections", [(ARR, (I32, [0, 0, 0, 0])), (ARR, (I32, [2, 3])),
                                                (ARR, (I32, [-1, 3, 3, 3])), (ARR, (U32, [2, 3, 3, 0]))], MUST)],
    "mmproj": [("clip.vision.spatial_merge_size", [(U32, 0), (U32, 4), (U32, 2 ** 32 - 1)], MUST),
               ("clip.vision.n_wa_pattern", [(U32, 0), (U32, 2 ** 32 - 1)], MUST)],
}
GGUF_REQUIRED = {"llm": ["general.architecture", "{arch}.block_count", "{arch}.embedding_length",
                         "{arch}.feed_forward_length", "{arch}.attention.head_count", "{arch}.context_length",
                         "{arch}.attention.layer_norm_rms_epsilon", "{arch}.rope.dimension_sections",
                         "tokenizer.ggml.model", "tokenizer.ggml.tokens"],
                 "mmproj": ["general.architecture", "clip.projector_type", "clip.vision.image_size",
                            "clip.vision.patch_size", "clip.vision.block_count", "clip.vision.embedding_length",
                            "clip.vision.feed_forward_length", "clip.vision.attention.head_count",
                            "clip.vision.attention.layer_norm_epsilon", "clip.vision.projection_dim",
                            "clip.has_vision_encoder"]}
GGML_TYPE_SIZE = {0: 4, 1: 2}     # F32, F16 bytes per element (the base bundle's GGUFs are F32)
TYPE_NAMES = dict(enumerate("u8 i8 u16 i16 u32 i32 f32 bool str array u64 i64 f64".split()))


def _key_culprit(key: str) -> str:
    parts = key.split(".")
    tail = parts[-1] if len(parts[-1]) > 5 and parts[-1] not in ("weight", "model") else None
    return _either(re.escape(key), re.escape(".".join(parts[1:])) if len(parts) > 2 else None,
                   rf"\b{re.escape(tail)}\b" if tail else None)


def _gguf_case(case: Case, mutate: Callable[[Case, GGUF, str], bytes | None], which: str | None = None):
    """Parse one of the bundle's GGUFs, let mutate(case, gguf, graph) change it (returning the new
    bytes, or None to serialise the edited parts), write it, re-fix its size and sha256 in the
    manifest, and open the bundle with llama.cpp (the API, or `edgelmm run --json`)."""
    which = which or case.pick(["llm", "mmproj"])
    rel = case.artifact_file("gguf", which)
    case.note(rel)
    g = GGUF(case.read(rel))
    data = mutate(case, g, which)
    case.write(rel, g.to_bytes() if data is None else data)
    case.refix(rel)
    if case.culprit is None and case.expect == MUST:
        case.culprit = _name(rel)
    if case.chance(0.12):
        case.note("via=cli run --json")
        return case.cli(*case.run_args(backend="llamacpp"), json_out=True)
    return case.load("llamacpp")


def _arch(g: GGUF) -> str:
    value = g.get("general.architecture", b"llama")
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _kv_bad(g: GGUF, which: str) -> list[tuple[str, list[tuple[int, Any]], str]]:
    """GGUF_KV_BAD for this file: keys under its own architecture, plus the keys only some files have."""
    arch = _arch(g)
    extra = [(k.format(arch=arch), v, e) for k, v, e in GGUF_KV_BAD_WHERE_PRESENT[which]
             if g.find(k.format(arch=arch)) is not None]
    return [(k.format(arch=arch), v, e) for k, v, e in GGUF_KV_BAD[which]] + extra


def g_kv_value(case: Case, g: GGUF, which: str):
    key, values, case.expect = case.pick(_kv_bad(g, which))
    vtype, value = case.pick(values)
    case.note(f"{key}={_short(value, 30)} as {TYPE_NAMES[vtype]}")
    # A plausible count (5 layers, 255 wide) may be reported through the tensors it contradicts;
    # an absurd one (0, 2^32-1, NaN, negative) must be named.
    plausible = isinstance(value, int) and 1 <= value < 1 << 20
    case.culprit = _either(_key_culprit(key), "tensor" if plausible else None)
    g.set(key, vtype, value)


def g_kv_retype(case: Case, g: GGUF, which: str):
    """A key re-encoded with another type, same value where it can be (4 -> "4", 4.0, [4], true)."""
    key, old_type, old = case.pick([kv for kv in g.kvs if kv[1] != ARR or kv[2][0] != STR])
    num = old if isinstance(old, (int, float)) else 4
    choices = [(STR, str(num).encode()), (F32, float(num)), (F64, float(num)), (BOOL, 1), (ARR, (U32, [int(num)])),
               (I8, int(num) & 0x7F), (U64, int(num) & (2 ** 64 - 1)), (I32, int(num) & 0x7FFFFFFF),
               (U16, int(num) & 0xFFFF), (ARR, (STR, [b"x"]))]
    vtype, value = case.pick([c for c in choices if c[0] != old_type])
    key = key.decode(errors="replace")
    case.note(f"{key}: {TYPE_NAMES.get(old_type, old_type)} -> {TYPE_NAMES[vtype]} {_short(value, 20)}")
    case.culprit = _key_culprit(key)
    g.set(key, vtype, value)


def g_kv_delete(case: Case, g: GGUF, which: str):
    present = [kv[0].decode() for kv in g.kvs]
    key = case.pick(present)
    case.expect = MUST if key in [k.format(arch=_arch(g)) for k in GGUF_REQUIRED[which]] else MAY
    case.note(f"deleted {key}")
    case.culprit = _key_culprit(key)
    g.delete(key)


def g_kv_duplicate(case: Case, g: GGUF, which: str):
    i = case.rng.randrange(len(g.kvs))
    key, vtype, value = g.kvs[i]
    g.kvs.insert(case.rng.randrange(len(g.kvs) + 1), [key, vtype, value])
    case.note(f"{key.decode(errors='replace')} twice")
    case.culprit = _either(_key_culprit(key.decode(errors="replace")), "duplicate|twice")


def g_kv_rawtype(case: Case, g: GGUF, which: str) -> bytes:
    data = bytearray(g.to_bytes())
    i = case.rng.randrange(len(g.kvs))
    new = case.pick([13, 99, 255, 2 ** 31, 2 ** 32 - 1, STR, ARR, U64, F64, U8])
    if new == g.kvs[i][1]:
        new = 13
    case.note(f"type of {g.kvs[i][0].decode(errors='replace')} overwritten with {new}")
    struct.pack_into("<I", data, g.positions["kv_type"][i], new)
    return bytes(data)


def g_counts(case: Case, g: GGUF, which: str) -> bytes:
    field_ = case.pick(["tensor_count", "kv_count"])
    n = len(g.tensors) if field_ == "tensor_count" else len(g.kvs)
    value = case.pick([n + 1, n - 1, 0, n * 1000, 2 ** 63, 2 ** 64 - 1])
    case.note(f"{field_} {n} -> {value}")
    return g.to_bytes(**({"n_tensors": value} if field_ == "tensor_count" else {"n_kv": value}))


def g_truncate(case: Case, g: GGUF, which: str) -> bytes:
    data = g.to_bytes()
    header_end = g.positions["header_end"][0]
    cut = case.pick([case.rng.randrange(4, header_end), header_end, case.rng.randrange(header_end, len(data)),
                     len(data) - 1, len(data) - 4096, 7, 24])
    case.note(f"cut at byte {cut} of {len(data)}")
    case.culprit = _either(_name(case.artifact_file("gguf", which)), "truncat")
    return data[:cut]


def _nbytes(t: list) -> int:
    return math.prod(t[1]) * GGML_TYPE_SIZE.get(t[2], 1)


def g_tensor_dims(case: Case, g: GGUF, which: str):
    t = case.pick(g.tensors)
    name = t[0].decode()
    old = list(t[1])
    what = case.pick(["zero", "plus one", "double", "huge", "2^63", "no dims", "five dims", "swap"], "dims")
    d = case.rng.randrange(len(old))
    if what == "zero":
        t[1][d] = 0
    elif what == "plus one":
        t[1][d] += 1
    elif what == "double":
        t[1][d] *= 2
    elif what == "huge":
        t[1][d] = 2 ** 40
    elif what == "2^63":
        t[1][d] = 2 ** 63
    elif what == "no dims":
        t[1] = []
    elif what == "five dims":
        t[1] = old + [1] * (5 - len(old))
    else:
        t[1] = old[::-1] if len(set(old)) > 1 else old + [1]
        if len(set(old)) <= 1:
            case.expect = MAY if len(old) < 4 else MUST   # [n] -> [n, 1] is the same tensor to ggml
    case.note(f"{name} {old} -> {t[1]}")
    case.culprit = _either(re.escape(name), _name(case.artifact_file("gguf", which)))


def g_tensor_offset(case: Case, g: GGUF, which: str):
    i = case.rng.randrange(len(g.tensors))
    t = g.tensors[i]
    old = t[3]
    what = case.pick(["+1", "+alignment", "huge", "end of data", "another tensor's"], "offset")
    t[3] = {"+1": old + 1, "+alignment": old + g.alignment, "huge": 2 ** 63, "end of data": len(g.data),
            "another tensor's": g.tensors[(i + 1) % len(g.tensors)][3]}[what]
    fits = t[3] % g.alignment == 0 and t[3] + _nbytes(t) <= len(g.data)
    case.expect = MAY if fits else MUST   # in bounds and aligned: other weights, not a malformed file
    case.note(f"{t[0].decode()} offset {old} -> {t[3]}")
    case.culprit = _either(re.escape(t[0].decode()), _name(case.artifact_file("gguf", which)), "offset|align")


def g_tensor_type(case: Case, g: GGUF, which: str):
    t = case.pick(g.tensors)
    new, case.expect = case.pick([(99, MUST), (2 ** 32 - 1, MUST), (4, MUST), (5, MUST), (40, MUST),
                                  (1, MAY), (8, MAY), (2, MAY), (30, MAY)])
    case.note(f"{t[0].decode()} type {t[2]} -> {new}")
    t[2] = new
    case.culprit = _either(re.escape(t[0].decode()), _name(case.artifact_file("gguf", which)), "type")


def g_tensor_name(case: Case, g: GGUF, which: str):
    i = case.rng.randrange(len(g.tensors))
    old = g.tensors[i][0]
    new = case.pick([g.tensors[(i + 1) % len(g.tensors)][0], b"blk.0.nope.weight", b"x" * 100, b"\xff\xfe.weight",
                     b"", old + b"\x00"])
    g.tensors[i][0] = new
    case.note(f"tensor {old.decode()} renamed {_short(new, 40)}")
    case.culprit = _either(re.escape(old.decode()), re.escape(new.decode(errors="replace")) if new else None,
                           _name(case.artifact_file("gguf", which)), "duplicate|name")


def g_tensor_drop_or_add(case: Case, g: GGUF, which: str):
    if case.chance(0.5):
        t = g.tensors.pop(case.rng.randrange(len(g.tensors)))
        case.note(f"dropped {t[0].decode()}")
        case.culprit = _either(re.escape(t[0].decode()), "missing", "offset|gap|tensor count")   # the hole it leaves
    else:
        g.tensors.append([b"extra.weight", [4], 0, g.tensors[0][3]])
        case.note("added extra.weight")
        case.culprit = _either(r"extra\.weight", "tensor", _name(case.artifact_file("gguf", which)))


def g_tokens(case: Case, g: GGUF, which: str):
    """Duplicate token texts, token/score/type arrays of different lengths, odd token texts."""
    kinds = ["duplicate text", "duplicate text", "scores shorter", "types shorter", "scores longer",
             "no tokens", "bad token type", "invalid utf-8 text", "empty text", "huge text"]
    if g.find("tokenizer.ggml.scores") is None:   # a byte-level BPE vocab has no scores
        kinds = [k for k in kinds if "scores" not in k]
    what = case.pick(kinds, "tokens")
    tokens = g.get("tokenizer.ggml.tokens")[1]
    case.culprit = "token"
    if what == "duplicate text":
        i, j = case.rng.sample(range(3, len(tokens)), 2)
        case.note(f"token {i} = token {j} ({tokens[j]!r})")
        tokens[i] = tokens[j]
    elif what == "scores shorter":
        g.get("tokenizer.ggml.scores")[1].pop()
        case.culprit = "score|token"
    elif what == "types shorter":
        g.get("tokenizer.ggml.token_type")[1].pop()
        case.culprit = "type|token"
    elif what == "scores longer":
        g.get("tokenizer.ggml.scores")[1].append(0.0)
        case.culprit = "score|token"
    elif what == "no tokens":
        tokens.clear()
    elif what == "bad token type":
        g.get("tokenizer.ggml.token_type")[1][case.rng.randrange(len(tokens))] = case.pick([99, -1, 2 ** 31 - 1])
        case.expect = MAY
    else:
        tokens[case.rng.randrange(3, len(tokens))] = {"invalid utf-8 text": b"\xff\xfe",
                                                      "empty text": b"", "huge text": b"a" * 100_000}[what]
        case.expect = MAY


def g_string_array_length(case: Case, g: GGUF, which: str) -> bytes:
    data = bytearray(g.to_bytes())
    where = case.pick(["str_len", "arr_len"])
    pos = case.pick(g.positions[where])
    (old,) = struct.unpack_from("<Q", data, pos)
    new = case.pick([2 ** 62, 2 ** 64 - 1, old + 10 ** 6, old + 1, 2 ** 31])
    struct.pack_into("<Q", data, pos, new)
    case.note(f"{where} at byte {pos}: {old} -> {new}")
    return bytes(data)


def g_magic_version(case: Case, g: GGUF, which: str):
    what = case.pick(["magic", "version"])
    if what == "magic":
        g.magic = case.pick([b"GGUX", b"FUGG", b"\0\0\0\0", b"GGML", b"ggjt"])
        case.note(f"magic {g.magic!r}")
        case.culprit = "magic"
    else:
        g.version = case.pick([0, 1, 4, 2 ** 32 - 1])
        case.note(f"version {g.version}")
        case.culprit = "version"


def g_flip(case: Case, g: GGUF, which: str) -> bytes:
    """Random bytes flipped in the header or the tensor data: anything but a crash."""
    data = bytearray(g.to_bytes())
    header_end = g.positions["header_end"][0]
    region = case.pick(["header", "data"], "flipped in")
    case.expect = MAY
    for _ in range(case.rng.randint(1, 16)):
        i = case.rng.randrange(24, header_end) if region == "header" else case.rng.randrange(header_end, len(data))
        data[i] = case.rng.randrange(256)
    if region == "data" and case.chance(0.5):   # non-finite weights
        for _ in range(8):
            struct.pack_into("<f", data, case.rng.randrange(header_end, len(data) - 4) & ~3, case.pick([NAN, INF]))
    return bytes(data)


def g_replace(case: Case, g: GGUF, which: str) -> bytes:
    what = case.pick(["empty", "the other gguf", "an onnx graph", "text"], "replaced by")
    other = "mmproj" if which == "llm" else "llm"
    case.culprit = _either(_name(case.artifact_file("gguf", which)), "architecture|clip|llama|magic")
    return {"empty": lambda: b"", "the other gguf": lambda: case.read(case.artifact_file("gguf", other)),
            "an onnx graph": lambda: case.read("onnx/embed.onnx"), "text": lambda: b"GGUF is not here\n"}[what]()


def _gguf(mutate, which: str | None = None):
    return lambda case: _gguf_case(case, mutate, which)


GGUF_MUTATORS = [
    Mutator("gguf", "kv-value", _gguf(g_kv_value), weight=3.0),
    Mutator("gguf", "kv-retype", _gguf(g_kv_retype), weight=2.0),
    Mutator("gguf", "kv-delete", _gguf(g_kv_delete), weight=1.5),
    Mutator("gguf", "kv-duplicate", _gguf(g_kv_duplicate)),
    Mutator("gguf", "kv-raw-type", _gguf(g_kv_rawtype)),
    Mutator("gguf", "counts", _gguf(g_counts)),
    Mutator("gguf", "truncate", _gguf(g_truncate)),
    Mutator("gguf", "tensor-dims", _gguf(g_tensor_dims), weight=1.5),
    Mutator("gguf", "tensor-offset", _gguf(g_tensor_offset)),
    Mutator("gguf", "tensor-type", _gguf(g_tensor_type)),
    Mutator("gguf", "tensor-name", _gguf(g_tensor_name)),
    Mutator("gguf", "tensor-drop-add", _gguf(g_tensor_drop_or_add)),
    Mutator("gguf", "tokens", _gguf(g_tokens, "llm"), weight=1.5),
    Mutator("gguf", "length-fields", _gguf(g_string_array_length)),
    Mutator("gguf", "magic-version", _gguf(g_magic_version), weight=0.5),
    Mutator("gguf", "flip", _gguf(g_flip), MAY),
    Mutator("gguf", "replace", _gguf(g_replace), weight=0.5),
]


# -- ONNX graphs: damaged, hashes re-fixed

def _onnx_case(case: Case, mutate: Callable[[Case, bytes, str], bytes | None], graph: str | None = None):
    graph = graph or case.pick(["vision", "embed", "decoder", "decoder_fused"])
    rel = case.artifact_file("onnx", graph)
    case.note(rel)
    data = mutate(case, case.read(rel), rel)
    if data is not None:
        case.write(rel, data)
    case.refix(rel)
    if case.culprit is None and case.expect == MUST:
        case.culprit = _name(rel)
    # The runtime opens one of the two decoder layouts: load the one whose graph was damaged.
    layout = "plain" if graph == "decoder" else "fused" if graph == "decoder_fused" else "auto"
    if case.chance(0.12):
        case.note("via=cli run --json")
        return case.cli(*case.run_args(), "--layout", layout, json_out=True)
    return case.load("onnxruntime", load_kwargs={"layout": layout})


def o_truncate(case: Case, data: bytes, rel: str) -> bytes:
    cut = case.pick([0, 1, 16, case.rng.randrange(len(data)), len(data) - 1, len(data) // 2])
    case.note(f"cut at {cut} of {len(data)}")
    return data[:cut]


def o_flip(case: Case, data: bytes, rel: str) -> bytes:
    out = bytearray(data)
    head = case.chance(0.5)
    for _ in range(case.rng.randint(1, 32)):
        out[case.rng.randrange(min(len(out), 4096) if head else len(out))] = case.rng.randrange(256)
    case.note("flipped in the first 4 KB" if head else "flipped anywhere")
    return bytes(out)


def o_replace(case: Case, data: bytes, rel: str) -> bytes:
    what = case.pick(["random bytes", "text", "a gguf", "another graph", "empty protobuf"], "replaced by")
    if what == "another graph":
        other = case.pick([a for a in ("onnx/vision.onnx", "onnx/embed.onnx", "onnx/decoder.onnx",
                                       "onnx/decoder_fused.onnx") if a != rel])
        case.note(other)
        return case.read(other)
    return {"random bytes": lambda: case.rng.randbytes(min(len(data), 1 << 16)), "text": lambda: b"not onnx\n",
            "a gguf": lambda: case.read(case.artifact_file("gguf", "llm"))[:1 << 20],
            "empty protobuf": lambda: b""}[what]()


def o_model_fields(case: Case, data: bytes, rel: str) -> bytes:
    """A well-formed ModelProto that no runtime should take: unknown opset or domain, IR version 999,
    an op that does not exist, a graph with no outputs."""
    import onnx

    model = onnx.load_from_string(data)
    what = case.pick(["ir_version", "opset", "unknown op", "no outputs", "custom domain"], "changed")
    if what == "ir_version":
        model.ir_version = 999
    elif what == "opset":
        model.opset_import[0].version = 999
    elif what == "unknown op":
        model.graph.node[case.rng.randrange(len(model.graph.node))].op_type = "NoSuchOp"
    elif what == "no outputs":
        del model.graph.output[:]
    else:
        node = model.graph.node[0]
        node.domain = "com.fuzz.evil"
        model.opset_import.add(domain="com.fuzz.evil", version=1)
    return model.SerializeToString()


def o_external_data(case: Case, data: bytes, rel: str) -> bytes:
    """The largest initializer moved to external data: outside the bundle (relative or absolute,
    or /etc/passwd), into an unhashed file inside it, through a symlink out, or hashed (fine)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data) or t.ByteSize())
    raw = init.raw_data or numpy_helper.to_array(init).tobytes()
    where = case.pick(["outside relative", "outside absolute", "passwd", "unhashed", "symlink out", "hashed"],
                      "external data")
    folder = case.path(rel).parent
    if where == "outside relative":
        location = os.path.relpath(case.outside("weights.bin", raw), folder)
    elif where == "outside absolute":
        location = str(case.outside("weights.bin", raw))
    elif where == "passwd":
        location = str(PASSWD)
        case.planted_passwd = True
    else:
        location = "weights.bin"
        target = folder / location
        if where == "symlink out":
            target.symlink_to(case.outside("weights.bin", raw))
        else:
            target.write_bytes(raw)
    init.ClearField("raw_data")
    del init.external_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        init.external_data.add(key=k, value=v)
    out = model.SerializeToString()
    case.culprit = _either(_name(rel), "weights.bin|external|outside|passwd|hash")
    if where in ("hashed", "symlink out"):     # listed with its size and hash, like an export's .onnx.data
        case.write(rel, out)
        m = case.manifest()
        sub = os.path.join(os.path.dirname(rel), location)
        art = next(a for a in m["artifacts"] if a["file"] == rel)
        art["files"].append({"file": sub, "size": len(raw), "sha256": sha256_bytes(raw)})
        case.save_manifest(m)
        case.expect = MAY if where == "hashed" else MUST
    return out


def _onnx(mutate, graph: str | None = None):
    return lambda case: _onnx_case(case, mutate, graph)


ONNX_MUTATORS = [
    Mutator("onnx", "truncate", _onnx(o_truncate)),
    Mutator("onnx", "flip", _onnx(o_flip), MAY),
    Mutator("onnx", "replace", _onnx(o_replace)),
    Mutator("onnx", "model-fields", _onnx(o_model_fields, "embed")),
    Mutator("onnx", "external-data", _onnx(o_external_data, "embed"), weight=1.5),
]


# -- images

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB, with a few bytes of pixel data."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + _png_chunk(b"IEND", b""))


def _save(case: Case, name: str, image, **kw) -> Path:
    p = case.work / "images" / name
    p.parent.mkdir(exist_ok=True)
    image.save(p, **kw)
    return p


def _file(case: Case, name: str, data: bytes) -> Path:
    p = case.work / "images" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return p


def _pil(mode: str, size=(64, 64)):
    import numpy as np
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return rgb.convert(mode)


# category -> [(label, make(case) -> image input, expectation, whether the message should name the file)]
def _image_variants() -> dict[str, list[tuple[str, Callable[[Case], Any], str, bool]]]:
    import numpy as np
    from PIL import Image

    def cut(src: str):
        def make(case: Case):
            data = getattr(case, src).read_bytes()
            return _file(case, f"cut{Path(getattr(case, src)).suffix}", data[:case.rng.randrange(8, len(data) - 8)])
        return make

    def gray16(case: Case):
        arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
        return _save(case, "gray16.png", Image.fromarray(arr))

    long_name = lambda case: case.work / ("n" * 300 + ".png")   # noqa: E731

    def fifo(case: Case):
        p = case.work / "images" / "fifo.png"
        p.parent.mkdir(exist_ok=True)
        os.mkfifo(p)
        return p

    def loop(case: Case):
        p = case.work / "loop.png"
        p.symlink_to("loop.png")
        return p

    def directory(case: Case):
        p = case.work / "images" / "dir.png"
        p.mkdir(parents=True)
        return p

    def lazy_truncated(case: Case):
        data = case.good_png.read_bytes()
        p = _file(case, "lazy.png", data[: len(data) * 2 // 3])
        return Image.open(p)

    return {"damaged-file": [
        ("truncated png", cut("good_png"), MUST, True), ("truncated jpeg", cut("good_jpg"), MUST, True),
        ("png magic + garbage", lambda c: _file(c, "garbage.png", b"\x89PNG\r\n\x1a\n" + c.rng.randbytes(200)),
         MUST, True),
        ("jpeg magic + garbage", lambda c: _file(c, "garbage.jpg", b"\xff\xd8\xff\xe0" + c.rng.randbytes(200)),
         MUST, True),
        ("empty file", lambda c: _file(c, "empty.png", b""), MUST, True),
        ("text file", lambda c: _file(c, "text.png", b"<svg xmlns='http://www.w3.org/2000/svg'/>"), MUST, True),
        ("an onnx file", lambda c: c.path("onnx/embed.onnx"), MUST, True),
    ], "size": [
        ("png claims 50000x50000", lambda c: _file(c, "bomb.png", png_claiming(50000, 50000)), MUST, True),
        ("png claims 20000x20000", lambda c: _file(c, "big.png", png_claiming(20000, 20000)), MUST, True),
        ("png claims 0x0", lambda c: _file(c, "zero.png", png_claiming(0, 0)), MUST, True),
        ("png claims 2^31x1", lambda c: _file(c, "wide.png", png_claiming(2 ** 31 - 1, 1)), MUST, True),
        ("1x1 png", lambda c: _save(c, "one.png", _pil("RGB", (1, 1))), MUST, False),
        ("3x200 png", lambda c: _save(c, "thin.png", _pil("RGB", (3, 200))), MUST, False),
        ("4x4000 png", lambda c: _save(c, "strip.png", _pil("RGB", (4000, 4))), MAY, False),
    ], "format": [
        ("16-bit gray png", gray16, OK, False),
        ("gray png", lambda c: _save(c, "gray.png", _pil("L")), OK, False),
        ("rgba png", lambda c: _save(c, "rgba.png", _pil("RGBA")), OK, False),
        ("la png", lambda c: _save(c, "la.png", _pil("LA")), MAY, False),
        ("palette png", lambda c: _save(c, "p.png", _pil("P")), MAY, False),
        ("1-bit png", lambda c: _save(c, "bw.png", _pil("1")), MAY, False),
        ("cmyk jpeg", lambda c: _save(c, "cmyk.jpg", _pil("CMYK")), MAY, False),
        ("float tiff", lambda c: _save(c, "f.tiff", _pil("F")), MAY, False),
        ("int32 tiff", lambda c: _save(c, "i.tiff", _pil("I")), MAY, False),
        ("animated gif", lambda c: _save(c, "anim.gif", _pil("P"), save_all=True,
                                         append_images=[_pil("P")] * 3), MAY, False),
        ("webp", lambda c: _save(c, "x.webp", _pil("RGB")), MAY, False),
        ("bmp", lambda c: _save(c, "x.bmp", _pil("RGB")), MAY, False),
        ("I;16 PIL", lambda c: Image.fromarray(np.arange(4096, dtype=np.uint16).reshape(64, 64)), MAY, False),
    ], "path": [
        ("directory", directory, MUST, True), ("missing file", lambda c: c.work / "missing.png", MUST, True),
        ("fifo", fifo, MUST, True), ("/dev/zero", lambda c: "/dev/zero", MUST, True),
        ("symlink loop", loop, MUST, True), ("name of 300 chars", long_name, MUST, False),
        ("nul in path", lambda c: str(c.good_png) + "\x00.png", MUST, False),
    ], "object": [
        ("None", lambda c: None, MUST, False), ("int", lambda c: 42, MUST, False),
        ("float nan", lambda c: NAN, MUST, False), ("bytes", lambda c: c.good_png.read_bytes(), MAY, False),
        ("dict", lambda c: {"image": str(c.good_png)}, MAY, False), ("list", lambda c: [str(c.good_png)], MUST, False),
        ("object", lambda c: object(), MUST, False),
        ("lazy truncated PIL", lazy_truncated, MUST, False),
        ("1x1 PIL", lambda c: _pil("RGB", (1, 1)), MUST, False),
    ], "array": [
        ("array with nan", lambda c: np.full((32, 32, 3), np.nan, np.float32), MUST, False),
        ("array with inf", lambda c: np.full((32, 32, 3), np.inf, np.float64), MUST, False),
        ("empty array", lambda c: np.zeros((0, 0, 3), np.uint8), MUST, False),
        ("2-channel array", lambda c: np.zeros((32, 32, 2), np.uint8), MUST, False),
        ("4-d array", lambda c: np.zeros((2, 32, 32, 3), np.uint8), MUST, False),
        ("0-d array", lambda c: np.array(5), MUST, False),
        ("bool array", lambda c: np.ones((32, 32, 3), bool), MAY, False),
        ("complex array", lambda c: np.ones((32, 32, 3), np.complex64), MUST, False),
        ("object array", lambda c: np.full((8, 8, 3), None, object), MUST, False),
        ("int64 array over 255", lambda c: np.full((32, 32, 3), 300, np.int64), MAY, False),
        ("float array 0..1", lambda c: np.random.default_rng(0).random((32, 32, 3)), MAY, False),
        ("float16 array", lambda c: np.ones((32, 32, 3), np.float16), MAY, False),
        ("channels-first array", lambda c: np.zeros((3, 32, 32), np.uint8), MAY, False),
    ]}


def i_image(case: Case, category: str):
    label, make, case.expect, names_file = case.pick(_image_variants()[category])
    n = case.rng.randint(1, 3)
    index = case.rng.randrange(n)
    image = make(case)
    images: list[Any] = [str(case.good_png)] * n
    images[index] = str(image) if isinstance(image, Path) else image
    case.note(f"{label} as image {index + 1} of {n}")
    parts = [rf"image {index + 1}\b"]    # messages number images from 1, as prompts do
    if names_file and isinstance(image, (str, Path)):
        parts.append(re.escape(os.path.basename(str(image))[:40]))
    case.culprit = "".join(f"(?=.*{p})" for p in parts)
    backend = case.pick(["onnxruntime", "onnxruntime", "llamacpp"])
    case.note(f"via={backend}")
    return case.load(backend, prompt="Compare " + " and ".join(["<image>"] * n) + ".", images=images)


IMAGE_MUTATORS = [Mutator("image", category, lambda case, c=category: i_image(case, c))
                  for category in ("damaged-file", "size", "format", "path", "object", "array")]


# -- videos: clip files (OpenCV decodes them), directories of frames, and Video objects

def _avi_patch(data: bytes, tag: bytes, offset: int, fmt: str, values: tuple) -> bytes:
    """The fixture's AVI (MJPG in RIFF) with fields after a header chunk's tag rewritten: avih's
    frame size at +40, the video stream's BITMAPINFOHEADER size at strf +12, its rate at strh +28."""
    out = bytearray(data)
    at = out.find(tag)
    if at >= 0:
        struct.pack_into(fmt, out, at + offset, *values)
    return bytes(out)


# category -> [(label, make(case) -> a path or a Video, expectation, culprit: True = the file's name, a regex,
#              or None = "video 1")]
def _video_variants() -> dict[str, list[tuple[str, Callable[[Case], Any], str, Any]]]:
    import numpy as np

    from edgelmm.video import MAX_VIDEO_FRAMES, Video

    def avi(case: Case) -> bytes:
        return case.video.read_bytes()

    def cut(case: Case):
        data = avi(case)
        return _file(case, "cut.avi", data[:case.rng.randrange(8, len(data) - 8)])

    def flips(case: Case, within: int | None = None, most: int = 64):
        data = bytearray(avi(case))
        span = min(within or len(data), len(data))
        for _ in range(case.rng.randint(1, most)):
            data[case.rng.randrange(span)] = case.rng.randrange(256)
        return _file(case, "flipped.avi", bytes(data))

    def block(case: Case):
        data = bytearray(avi(case))
        at, n = case.rng.randrange(len(data)), case.rng.randint(16, 4096)
        data[at:at + n] = case.rng.randbytes(n)
        return _file(case, "block.avi", bytes(data))

    def claims(w: int, h: int):
        def make(case: Case):
            data = _avi_patch(avi(case), b"avih", 40, "<II", (w, h))
            return _file(case, f"claims{w}x{h}.avi", _avi_patch(data, b"strf", 12, "<II", (w, h)))
        return make

    def rate(scale: int, value: int):
        return lambda case: _file(case, f"rate{scale}-{value}.avi", _avi_patch(avi(case), b"strh", 28, "<II",
                                                                                (scale, value)))

    def frames_dir(case: Case, names: dict[str, Any]) -> Path:
        d = case.work / "images" / "frames"
        d.mkdir(parents=True, exist_ok=True)
        for name, content in names.items():
            p = d / name
            if content == "dir":
                p.mkdir()
            elif content == "fifo":
                os.mkfifo(p)
            elif isinstance(content, bytes):
                p.write_bytes(content)
            else:
                content.save(p)
        return d

    good = lambda: _pil("RGB", (32, 32))   # noqa: E731
    frames = lambda n, size=(24, 32): np.zeros((n, size[0], size[1], 3), np.uint8)   # noqa: E731
    return {"damaged-file": [
        ("truncated avi", cut, MAY, True), ("bytes flipped anywhere", flips, MAY, True),
        ("header bytes flipped", lambda c: flips(c, 4096, 8), MAY, True), ("garbage block", block, MAY, True),
        ("riff avi magic + garbage", lambda c: _file(c, "garbage.avi", b"RIFF\0\0\1\0AVI LIST" + c.rng.randbytes(400)),
         MUST, True),
        ("empty file", lambda c: _file(c, "empty.avi", b""), MUST, True),
        ("text file", lambda c: _file(c, "text.mp4", b"#EXTM3U\nhttp://127.0.0.1:1/x.ts\n"), MUST, True),
        ("an onnx file", lambda c: c.path("onnx/embed.onnx"), MUST, True),
        ("a png named .avi", lambda c: _file(c, "png.avi", c.good_png.read_bytes()), MAY, True),
    ], "header": [
        ("claims 50000x50000", claims(50000, 50000), MAY, True), ("claims 0x0", claims(0, 0), MAY, True),
        ("claims 2^31-1 x 1", claims(2 ** 31 - 1, 1), MAY, True), ("claims 1 x 2^32-1", claims(1, 2 ** 32 - 1), MAY, True),
        ("rate 0/0", rate(0, 0), MAY, True), ("rate 1/0", rate(1, 0), MAY, True),
        ("rate 1/4294967295", rate(1, 2 ** 32 - 1), MAY, True), ("rate 4294967295/1", rate(2 ** 32 - 1, 1), MAY, True),
    ], "frames-dir": [
        ("empty directory", lambda c: frames_dir(c, {}), MUST, r"frames'.*holds no"),
        ("no image names", lambda c: frames_dir(c, {"a.txt": b"x", "b.avi": b"y"}), MUST, r"frames'.*holds no"),
        ("a damaged frame", lambda c: frames_dir(c, {"0.png": good(), "1.png": c.good_png.read_bytes()[:40],
                                                     "2.png": good()}), MUST, r"video 1 frame 2\b.*1\.png"),
        ("frames of two sizes", lambda c: frames_dir(c, {"0.png": good(), "1.png": _pil("RGB", (48, 32))}), MUST,
         r"video 1 frame 2\b"),
        ("a directory named .png", lambda c: frames_dir(c, {"0.png": good(), "1.png": "dir"}), MUST,
         r"video 1 frame 2\b.*1\.png"),
        ("a fifo named .png", lambda c: frames_dir(c, {"0.png": good(), "1.png": "fifo"}), MUST,
         r"video 1 frame 2\b.*1\.png"),
        ("one good frame", lambda c: frames_dir(c, {"0.png": good()}), OK, None),
    ], "object": [
        ("fps nan", lambda c: Video(frames(2), fps=NAN), MUST, None),
        ("fps inf", lambda c: Video(frames(2), fps=float("inf")), MUST, None),
        ("fps -2", lambda c: Video(frames(2), fps=-2), MUST, None),
        ("fps 0", lambda c: Video(frames(2), fps=0), MUST, None),
        ("fps True", lambda c: Video(frames(2), fps=True), MUST, None),
        ("fps '2'", lambda c: Video(frames(2), fps="2"), MUST, None),
        ("fps 1e308", lambda c: Video(frames(2), fps=1e308), MAY, None),
        ("frames None", lambda c: Video(None), MUST, None),
        ("frames empty list", lambda c: Video([]), MUST, None),
        ("frames 5-d array", lambda c: Video(np.zeros((1, 2, 24, 32, 3), np.uint8)), MUST, None),
        ("frames with 2 channels", lambda c: Video(np.zeros((2, 24, 32, 2), np.uint8)), MUST, None),
        ("frames of nan", lambda c: Video(np.full((2, 24, 32, 3), np.nan, np.float32)), MUST, None),
        ("a None frame", lambda c: Video([frames(1)[0], None]), MUST, None),
        ("too many frames", lambda c: Video(np.zeros((MAX_VIDEO_FRAMES + 1, 8, 8, 3), np.uint8)), MUST, None),
        ("frames as a string", lambda c: Video(str(c.video)), MUST, None),
        ("a [T, H, W, 3] uint8 clip", lambda c: Video(frames(3), fps=4), OK, None),
    ]}


def v_video(case: Case, category: str):
    """A clip through the loader every entry point uses (`video_from_path` for files and directories,
    then `load_video`), as video 1 of a prompt; damaged files also through `edgelmm watch`."""
    from edgelmm.video import load_video, video_from_path

    label, make, case.expect, culprit = case.pick(_video_variants()[category])
    item = make(case)
    case.note(label)
    case.culprit = re.escape(item.name[:40]) if culprit is True else culprit or r"video 1\b"
    if isinstance(item, Path) and item.is_file() and category in ("damaged-file", "header") and case.chance(0.25):
        case.note("via=watch")
        return case.cli(*_command(case, "watch", {"SOURCE": str(item)}), json_out=True, ok_codes=OK_CODES["watch"])
    if isinstance(item, Path):
        return Call(lambda: load_video(video_from_path(item, fps=2), 0, 1).frames.shape, "video_from_path")
    return Call(lambda: load_video(item, 0, 1).frames.shape, "load_video")


VIDEO_MUTATORS = [Mutator("video", category, lambda case, c=category: v_video(case, c))
                  for category in ("damaged-file", "header", "frames-dir", "object")]


# -- prompts and sampling options (Python API)

def _prompt_variants(case: Case) -> dict[str, list[tuple[str, Any, Any, str, str | None]]]:
    """category -> [(label, prompt, images, expectation, culprit)]"""
    img = str(case.good_png)
    image_part = lambda: {"type": "image", "image": img}   # noqa: E731
    return {"markers": [
        ("2 markers, 1 image", "A <image> and <image>?", [img], MUST, "marker"),
        ("1 marker, 3 images", "What is in <image>?", [img] * 3, MUST, "marker"),
        ("no marker, 1 image", "Describe it.", [img], MUST, "marker"),
        ("50 markers, none", "<image>" * 50, [], MUST, "marker"),
        ("messages: 2 image parts, 1 image", [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                          {"type": "text", "text": "?"}]}], [img],
         MUST, "image|marker"),
        ("messages + images=", [{"role": "user", "content": [image_part(), {"type": "text", "text": "?"}]}], [img],
         MUST, "image"),
        ("images None with marker", "What is in <image>?", None, MUST, "marker|image"),
        ("images not a list", "What is in <image>?", img, MAY, "image"),
        ("huge images list", "x", [img] * 5000, MUST, "marker|image"),
    ], "text": [
        ("invalid utf-8 bytes", b"What is \xff\xfe in <image>?", [img], MUST, "UTF-8|byte"),
        ("valid utf-8 bytes", "What is in <image>? \u00e9".encode(), [img], MAY, None),
        ("lone surrogate", "What \ud800 is in <image>?", [img], MUST, r"character|unicode|surrogate|\\ud800"),
        ("lone surrogate in a message", [{"role": "user", "content": [image_part(), {"type": "text",
                                                                                      "text": "\udfff?"}]}], None,
         MUST, r"character|unicode|surrogate|\\udfff"),
        ("control characters", "What\x00\x01\x1b[31m\x7f is in <image>?", [img], MAY, None),
        ("special token text", "<s></s><unk> What is in <image>? </s>", [img], MAY, None),
        ("template syntax", "{{ raise_exception('x') }}{% for x in y %} <image>", [img], MAY, None),
    ], "context": [
        ("over the context (words)", "word " * case.pick([1200, 5000, 200_000]) + "<image>", [img], MUST,
         "context|tokens"),
        ("over the context (images)", "<image>" * 80, [img] * 80, MUST, "context|tokens"),
        ("just under the context", "word " * 900 + "<image>", [img], MAY, "context|tokens"),
    ], "types": [
        ("None", None, [img], MUST, "prompt"), ("int", 42, [img], MUST, "prompt"),
        ("float nan", NAN, [img], MUST, "prompt"), ("empty list", [], [img], MUST, "prompt|message"),
        ("dict", {"role": "user", "content": "x <image>"}, [img], MUST, "prompt|message"),
        ("list of ints", [1, 2], [img], MUST, "prompt|message"),
        ("message role int", [{"role": 1, "content": "x <image>"}], [img], MUST, "role|message"),
        ("message content int", [{"role": "user", "content": 5}], [img], MUST, "content|message"),
        ("unknown part type", [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}], [], MUST,
         "part|video|message"),
        ("image part without image", [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                      "text": "?"}]}], None, MUST,
         "image"),
        ("text part without text", [{"role": "user", "content": [{"type": "text"}]}], [], MUST, "text|part|message"),
        ("message missing role", [{"content": "x"}], [], MUST, "role|message"),
        ("role not in template", [{"role": "wizard", "content": "hello <image>"}], [img], MAY, None),
    ]}


def p_prompt(case: Case, category: str):
    label, prompt, images, case.expect, case.culprit = case.pick(_prompt_variants(case)[category])
    case.note(label)
    method = case.pick(["generate", "generate", "stream"])
    backend = case.pick(["onnxruntime", "llamacpp"])
    case.note(f"{method} via={backend}")
    return case.load(backend, prompt=prompt, images=images, method=method)


SAMPLING_BAD = [
    ("max_new_tokens", [(0, MAY), (-1, MUST), (1e9, MUST), (True, MUST), ("5", MUST), (10 ** 30, MAY), (2.0, MUST),
                        (None, MUST)]),
    ("temperature", [(NAN, MUST), (-1, MUST), (INF, MUST), ("0.5", MUST), (None, MUST), (1e-30, MAY), (1e30, MAY)]),
    ("top_p", [(0, MUST), (2, MUST), (NAN, MUST), (-1, MUST), (None, MUST), (1e-30, MAY)]),
    ("seed", [(-1, MAY), ("abc", MUST), (1.5, MUST), (2 ** 70, MAY), (True, MUST)]),
    ("chat", [("yes", MAY), (None, MAY)]),
]


def p_sampling(case: Case):
    name, values = case.pick(SAMPLING_BAD)
    value, case.expect = case.pick(values)
    case.culprit = re.escape(name).replace("_", "[_ -]")
    kw = {"max_new_tokens": 2, name: value}
    if name in ("top_p", "seed"):
        kw["temperature"] = 0.7
    case.note(f"{name}={_short(value)}")
    backend = case.pick(["onnxruntime", "llamacpp"])
    method = case.pick(["generate", "stream", "batch"])
    case.note(f"{method} via={backend}")
    prompt = [(DEFAULT_PROMPT, [str(case.good_png)])] if method == "batch" else DEFAULT_PROMPT
    return case.load(backend, prompt=prompt, gen_kwargs=kw, method=method)


def p_batch(case: Case):
    img = str(case.good_png)
    label, requests, case.expect, case.culprit = case.pick([
        ("empty batch", [], MAY, None),
        ("one bad request", [(DEFAULT_PROMPT, [img]), ("<image> <image>", [img])], MUST, "marker"),
        ("request not a pair", [DEFAULT_PROMPT], MUST, "request|prompt|pair|tuple"),
        ("request of 3", [(DEFAULT_PROMPT, [img], "x")], MUST, "request|prompt|pair|tuple"),
        ("one over the context", [(DEFAULT_PROMPT, [img]), ("word " * 3000 + "<image>", [img])], MUST,
         "context|tokens"),
        ("batch of 8", [(DEFAULT_PROMPT, [img])] * 8, MAY, None),
    ])
    case.note(label)
    return case.load(case.pick(["onnxruntime", "llamacpp"], "via"), prompt=requests, method="batch")


PROMPT_MUTATORS = [
    *(Mutator("prompt", category, lambda case, c=category: p_prompt(case, c))
      for category in ("markers", "text", "context", "types")),
    Mutator("prompt", "sampling", p_sampling, weight=1.5),
    Mutator("prompt", "batch", p_batch, weight=0.5),
]


# -- options: the Python API's load(), and every command of the CLI

def _under_file(case: Case) -> str:
    return str(case.regular_file() / "sub" / "fuzz-out")


def _in_proc(case: Case) -> str:
    return "/proc/fuzz-out"


def _nonexistent(case: Case) -> str:
    return str(case.work / "does-not-exist")


LOAD_BAD = [
    ("threads", "onnxruntime", [(-3, MUST), (0, MUST), (10 ** 6, MUST), ("4", MUST), (2.5, MUST), (True, MUST),
                                (None, OK), (1, OK)]),
    ("threads", "llamacpp", [(-3, MUST), (0, MUST), (10 ** 6, MUST), (2.5, MUST), (1, OK)]),
    ("backend", "onnxruntime", [("foo", MUST), (None, MUST), (5, MUST), ("torch", MUST), ("tensorrt", MUST), ("", MUST),
                                ("ONNXRUNTIME", MUST)]),
    ("provider", "onnxruntime", [("foo", MUST), (5, MUST), (None, MUST), ("cuda", MAY), ("tensorrt", MAY)]),
    ("precision", "onnxruntime", [("foo", MUST), (None, MUST), ("fp16", MUST), (5, MUST), ("f32", MUST)]),
    ("precision", "llamacpp", [("foo", MUST), ("q4_k_m", MUST), ("fp32", MUST), (None, MUST)]),
    ("gpu_layers", "llamacpp", [(-5, MAY), ("x", MUST), (10 ** 9, MAY), (2.5, MUST)]),
    ("prompt_style", "onnxruntime", [("foo", MAY), (5, MAY)]),
    ("max_context", "onnxruntime", [(0, MAY), (-1, MAY)]),
    ("device", "onnxruntime", [("cuda", MAY), ("foo", MAY)]),
]


def opt_load(case: Case):
    name, backend, values = case.pick(LOAD_BAD)
    value, case.expect = case.pick(values)
    case.note(f"load({name}={_short(value)}) via={backend}")
    case.culprit = _either(rf"\b{name.replace('_', '[_ -]')}\b", re.escape(str(value)) if isinstance(value, str)
                           and value else None)
    kw = {"load_kwargs": {name: value}} if name != "backend" else {}
    action = case.load(backend, **kw)
    if name == "backend":
        action.backend = value
    if backend == "llamacpp" and name != "precision":
        action.load_kwargs.setdefault("precision", "f32")
    return action


def opt_load_path(case: Case):
    values = [(None, "path|None"), (5, "path|5"), ("", "path|''"), ("\x00", "path|null|\\\\x00"),
              ("a" * 5000, "path|name|long"), (b"/tmp", "path|bytes"), ("/dev/null", "null"),
              ("/proc/self/mem", "mem"), ("/etc/passwd", "passwd"), (_nonexistent(case), "does-not-exist"),
              (_under_file(case), "fuzz-out|regular"), (str(case.path("onnx")), "onnx"),
              (str(case.path("onnx/embed.onnx")), "embed"), ("~/no-such-model", "no-such-model")]
    value, culprit = case.pick(values)
    case.note(f"load({_short(value)})")
    case.culprit = culprit
    return Call(lambda: __import__("edgelmm").load(value, backend=case.pick(["auto", "onnxruntime"])), "load")


# (command, option, [(value, expectation)], culprit, slow). A value may be a function of the case
# (a path), None for a flag without a value. Appended after the command's own arguments: the last
# occurrence of an option wins.
CLI_OPTIONS: list[tuple[str, str, list, str, bool]] = [
    ("run", "--threads", [("-3", MUST), ("0", MUST), ("100000", MUST), ("abc", MUST), ("1.5", MUST), ("1", OK)],
     "threads", False),
    ("run", "--temperature", [("nan", MUST), ("-1", MUST), ("inf", MUST), ("-inf", MUST), ("abc", MUST),
                              ("0.7", OK)], "temperature", False),
    ("run", "--top-p", [("2", MUST), ("nan", MUST), ("0", MUST), ("-0.5", MUST), ("0.9", OK)], "top.p", False),
    ("run", "--seed", [("-1", MAY), ("abc", MUST), ("99999999999999999999999", MAY)], "seed", False),
    ("run", "--max-new-tokens", [("0", MAY), ("-1", MUST), ("1e9", MUST), ("abc", MUST), ("1000000000", MAY)],
     "max.new.tokens", False),
    ("run", "--gpu-layers", [("-5", MAY), ("abc", MUST)], "gpu.layers", False),
    ("run", "--backend", [("foo", MUST), ("", MUST), ("torch", MUST)], "backend", False),
    ("run", "--provider", [("foo", MUST), ("", MUST)], "provider", False),
    ("run", "--device", [("foo", MAY)], "device", False),
    ("run", "--prompt-style", [("foo", MAY)], "prompt.style", False),
    ("run", "--image", [(_nonexistent, MUST), (lambda c: str(c.work), MUST), ("/dev/zero", MUST)],
     r"image|does-not-exist|zero", False),
    ("run", "MODEL", [(_nonexistent, MUST), ("/etc/passwd", MUST), ("/proc", MUST), ("", MUST)],
     r"model|does-not-exist|passwd|proc|path|director", False),
    ("eval", "--samples", [("-5", MUST), ("0", MAY), ("abc", MUST), ("1", OK)], "samples", False),
    ("eval", "--threads", [("0", MUST), ("-1", MUST)], "threads", False),
    ("eval", "--backend", [("foo", MUST)], "backend", False),
    ("watch", "--threshold", [("nan", MUST), ("-1", MUST), ("inf", MUST), ("0.5", OK)], "threshold", False),
    ("watch", "--margin", [("nan", MUST), ("-1", MUST), ("0", MUST), ("inf", MUST)], "margin", False),
    ("watch", "--min-threshold", [("nan", MUST), ("-0.5", MUST), ("inf", MUST)], "min.threshold", False),
    ("watch", "--every", [("0", MUST), ("-1", MUST)], "every", False),
    ("watch", "--warmup", [("-1", MUST)], "warmup", False),
    ("watch", "--trigger", [("0", MUST), ("-2", MUST)], "trigger", False),
    ("watch", "--clear", [("0", MUST), ("-1", MUST)], "clear", False),
    ("watch", "--latest", [("0", MUST), ("-1", MUST)], "latest", False),
    ("watch", "--queue-size", [("0", MUST), ("-1", MUST)], "queue.size", False),
    ("watch", "--reconnect-attempts", [("-1", MUST)], "reconnect.attempts", False),
    ("watch", "--reconnect-backoff", [("nan", MUST), ("-1", MUST), ("inf", MUST)], "reconnect.backoff", False),
    ("watch", "--duration", [("nan", MUST), ("-1", MUST), ("inf", MAY)], "duration", False),
    ("watch", "--max-frames", [("0", MAY), ("-1", MUST)], "max.frames", False),
    ("watch", "--max-new-tokens", [("0", MUST), ("-1", MUST)], "max.new.tokens", False),
    ("watch", "--prompt", [("{bogus}", MUST), ("{last", MUST), ("", MAY), ("{last} {last}", MAY)], "prompt", False),
    ("watch", "--threads", [("0", MUST), ("100000", MUST)], "threads", False),
    ("watch", "--events", [(_under_file, MUST), (lambda c: "/proc/fuzz-out.jsonl", MUST)],
     "events|fuzz-out|regular|proc", False),
    ("watch", "--out", [(_under_file, MUST), (_in_proc, MUST)], r"\bout\b|fuzz-out|regular|proc", False),
    ("watch", "--reference", [(_nonexistent, MUST), ("/dev/zero", MUST)], "reference|does-not-exist|zero", False),
    ("watch", "SOURCE", [(_nonexistent, MUST), ("-1", MUST), ("rtsp://", MUST), ("", MUST)],
     "source|does-not-exist|-1|rtsp|''", False),
    ("calibrate", "--int4-algorithm", [("foo", MUST), ("RTN", MUST)], "int4.algorithm", False),
    ("calibrate", "--vision-method", [("foo", MUST)], "vision.method", False),
    ("calibrate", "--activations", [("s16", MUST), ("foo", MUST)], "activations", False),
    ("calibrate", "--block-size", [("0", MUST), ("-32", MUST), ("7", MUST), ("33", MUST)], "block.size", False),
    ("calibrate", "--accuracy-level", [("9", MUST), ("-1", MUST)], "accuracy.level", False),
    ("calibrate", "--calib-samples", [("0", MUST), ("-1", MUST)], "calib.samples", False),
    ("calibrate", "--max-accuracy-drop", [("nan", MUST), ("-1", MUST), ("inf", MUST)], "max.accuracy.drop", False),
    ("calibrate", "--min-vision-cosine", [("nan", MUST), ("2", MUST), ("-2", MUST)], "min.vision.cosine", False),
    ("calibrate", "--eval-samples", [("-1", MUST)], "eval.samples", False),
    ("calibrate", "--precision", [("foo", MUST), ("", MUST), ("fp32", MUST)], "precision", False),
    ("calibrate", "--calib", [(_nonexistent, MUST), (_under_file, MUST), ("video:/nonexistent.mp4", MUST),
                                ("mantis:/etc/passwd", MUST), ("/dev/zero", MUST)],
     "calib|source|does-not-exist|fuzz-out|nonexistent|passwd|zero", False),
    ("calibrate", "--seed", [("-1", MUST)], "seed", False),
    ("export", "--format", [("foo", MUST), ("", MUST), ("onnx,foo", MUST)], "format", False),
    ("export", "--precision", [("foo", MUST), ("fp8", MUST)], "precision", False),
    ("export", "--gguf-types", [("q2_k", MUST), ("foo", MUST)], "gguf.types|q2_k|foo", False),
    ("export", "--calib", [("/nonexistent/data.jsonl", MUST)], "calib|nonexistent", True),
    ("export", "--int4-algorithm", [("foo", MUST)], "int4.algorithm", True),
    ("export", "--block-size", [("0", MUST), ("-1", MUST)], "block.size", True),
    ("export", "OUT", [(_under_file, MUST), (_in_proc, MUST)], r"\bout\b|fuzz-out|regular|proc", True),
    ("export", "MODEL", [(_nonexistent, MUST), ("/etc/passwd", MUST)], "model|does-not-exist|passwd", False),
    ("bench", "--threads", [("0", MUST), ("-1", MUST), ("100000", MUST)], "threads", False),
    ("bench", "--repeats", [("0", MUST), ("-1", MUST)], "repeats", False),
    ("bench", "--new-tokens", [("0", MUST), ("-1", MUST)], "new.tokens", False),
    ("bench", "--backends", [("foo", MUST), ("", MUST)], "backends|foo", False),
    ("demo-video", "--frames", [("0", MUST), ("-1", MUST)], "frames", False),
    ("demo-video", "--fps", [("nan", MUST), ("0", MUST), ("-1", MUST), ("inf", MUST)], "fps", False),
    ("demo-video", "--scale", [("0", MUST), ("-1", MUST), ("100000", MUST)], "scale", False),
    ("demo-video", "--at", [("-5", MUST), ("100000", MAY)], r"\bat\b", False),
    ("demo-video", "--anomaly", [("foo", MUST)], "anomaly", False),
    ("demo-video", "OUT", [(_under_file, MUST), (_in_proc, MUST), (lambda c: "/proc/fuzz-out.avi", MUST),
                           (lambda c: str(c.work), MUST)], r"\bout\b|fuzz-out|regular|proc|director|\d+-option", False),
    ("doctor", "--bundle", [(_nonexistent, MUST), ("/etc/passwd", MUST), ("/proc", MUST)],
     "bundle|does-not-exist|passwd|proc", False),
    ("info", "MODEL", [(_nonexistent, MUST), ("/etc/passwd", MUST), (lambda c: str(c.bundle()), MAY)],
     "model|does-not-exist|passwd|config", False),
    ("verify", "--reference", [(_nonexistent, MUST), ("/etc/passwd", MUST)], "reference|does-not-exist|passwd",
     False),
    ("verify", "--backend", [("foo", MUST)], "backend|foo", False),
    ("verify", "--precision", [("foo", MUST)], "precision|foo", False),
    ("verify", "--max-new-tokens", [("0", MUST), ("-1", MUST)], "max.new.tokens", True),
    ("build-engines", "--max-images", [("0", MUST), ("-1", MUST)], "max.images|tensorrt", False),
    ("build-engines", "--max-context", [("0", MUST), ("-1", MUST)], "max.context|tensorrt", False),
    ("build-engines", "--workspace-mib", [("0", MUST), ("-1", MUST)], "workspace|tensorrt", False),
    ("build-engines", "--precision", [("foo", MUST)], "precision|tensorrt", False),
]


def _command(case: Case, command: str, positional: dict[str, str] | None = None) -> list:
    """The command with valid arguments that finish in a second or two when nothing is wrong
    (a 2-token answer, 6 video frames, 2 eval samples); `positional` replaces MODEL/OUT/SOURCE."""
    pos = positional or {}
    b = lambda: case.bundle(copy=command == "calibrate")   # noqa: E731  (calibrate writes into the bundle)
    return {
        "run": lambda: ["run", pos.get("MODEL", b()), "-p", DEFAULT_PROMPT, "-i", case.good_png,
                        "--max-new-tokens", "2", "--backend", "onnxruntime"],
        "eval": lambda: ["eval", b(), "--samples", "2", "--backend", "onnxruntime"],
        "watch": lambda: ["watch", pos.get("SOURCE", case.video), "--bundle", b(), "--no-verify", "--max-frames", "6",
                          "--warmup", "3", "--quiet", "--events", case.work / "events.jsonl"],
        "calibrate": lambda: ["calibrate", b(), "--calib-samples", "4"],
        "export": lambda: ["export", pos.get("MODEL", case.reference), pos.get("OUT", case.work / "out"),
                           "--no-verify"],
        "bench": lambda: ["bench", b(), "--repeats", "1", "--new-tokens", "2", "--backends", "onnxruntime"],
        "demo-video": lambda: ["demo-video", pos.get("OUT", case.work / "v.avi"), "--frames", "8", "--at", "4",
                               "--scale", "1"],
        "doctor": lambda: ["doctor"],
        "info": lambda: ["info", pos.get("MODEL", case.reference)],
        "verify": lambda: ["verify", b(), "-r", case.reference],
        "build-engines": lambda: ["build-engines", b()],
    }[command]()


OK_CODES = {"verify": (0, 1), "watch": (0, 3)}    # verify: 1 = parity failed; watch: 3 = source lost


def _cli_option(command: str, option: str, values: list, culprit: str):
    def fn(case: Case):
        value, case.expect = case.pick(values)
        value = value(case) if callable(value) else value
        case.culprit = _either(culprit, re.escape(option) if option.startswith("--") else None)
        case.note(f"{command} {option} {_short(value)}")
        if option.isupper():
            args = _command(case, command, {option: value})
        else:
            args = _command(case, command) + [option] + ([] if value is None else [value])
        if command == "export" and option in ("--calib", "--int4-algorithm", "--block-size"):
            args += ["--precision", "int4" if option != "--calib" else "int8"]
        if command == "export" and option == "--gguf-types":
            args += ["--format", "gguf"]
        if command == "calibrate" and option == "--block-size":
            args += ["--precision", "int4"]
        return case.cli(*args, json_out=case.chance(0.5), ok_codes=OK_CODES.get(command, (0,)))
    return fn


COMMANDS = ("run", "eval", "watch", "calibrate", "export", "bench", "demo-video", "doctor", "info", "verify",
            "build-engines")


def cli_unknown_option(case: Case):
    """An option no command has, with --json: the error must still be one JSON object."""
    command = case.pick(COMMANDS, "command")
    bogus = case.pick(["--bogus", "--bogus=1", "-Z", "--threads-x"])
    case.note(f"option {bogus}")
    case.culprit = re.escape(bogus.split("=")[0])
    args = _command(case, command) + [bogus]
    return case.cli(*args, json_out=case.chance(0.8), ok_codes=OK_CODES.get(command, (0,)))


def cli_missing_argument(case: Case):
    command, drop, case.culprit = case.pick([
        ("run", "-p", "prompt|-p"), ("run", "MODEL", "model|missing"), ("watch", "--bundle", "bundle"),
        ("verify", "-r", "reference|-r"), ("export", "OUT", r"\bout\b|missing"),
        ("calibrate", "BUNDLE", "bundle|missing"),
        ("info", "MODEL", "model|missing")])
    args = _command(case, command)
    if drop.isupper():
        del args[2 if drop == "OUT" else 1]
    else:
        i = args.index(drop)
        del args[i:i + 2]
    case.note(f"{command} without {drop}")
    return case.cli(*args, json_out=case.chance(0.6))


def cli_unknown_command(case: Case):
    name = case.pick(["frobnicate", "", "--version", "runn", "RUN"], "command")
    case.culprit = _either(re.escape(name) if name else None, "command|usage")
    case.expect = MAY if name == "--version" else MUST
    return case.cli(name, json_out=case.chance(0.5))


OPTION_MUTATORS = [
    Mutator("option", "load", opt_load, weight=3.0),
    Mutator("option", "load-path", opt_load_path, weight=1.0),
    *(Mutator("option", f"{cmd}{opt}" if opt.startswith("-") else f"{cmd}-{opt.lower()}",
              _cli_option(cmd, opt, values, culprit),
              weight=0.6 if cmd in ("doctor", "bench", "verify") else 1.0, slow=slow)
      for cmd, opt, values, culprit, slow in CLI_OPTIONS),
    Mutator("option", "unknown-option", cli_unknown_option, weight=3.0),
    Mutator("option", "missing-argument", cli_missing_argument, weight=1.5),
    Mutator("option", "unknown-command", cli_unknown_command, weight=0.5),
]


# -- controls: valid inputs that must be accepted (they check the base bundle and the harness)

def _control_watch(case: Case):
    return case.cli(*_command(case, "watch"), json_out=True, ok_codes=(0,))


CONTROL_MUTATORS = [
    Mutator("control", "onnx", lambda c: c.load("onnxruntime"), OK),
    Mutator("control", "gguf", lambda c: c.load("llamacpp"), OK),
    Mutator("control", "gguf-rewritten", _gguf(lambda case, g, which: None), OK),   # the GGUF writer round-trips
    Mutator("control", "onnx-rewritten", _onnx(lambda case, data, rel: data), OK),
    Mutator("control", "no-checksums", lambda c: c.load(c.pick(["onnxruntime", "llamacpp"], "via"), checksums=False),
            OK),
    Mutator("control", "cli-run-json", lambda c: c.cli(*c.run_args(), json_out=True), OK),
    Mutator("control", "cli-watch-json", _control_watch, OK),
    Mutator("control", "cli-eval-json", lambda c: c.cli(*_command(c, "eval"), json_out=True), OK),
]

MUTATORS: list[Mutator] = [*CONTROL_MUTATORS, *MANIFEST_MUTATORS, *GGUF_MUTATORS, *ONNX_MUTATORS, *IMAGE_MUTATORS,
                           *VIDEO_MUTATORS, *PROMPT_MUTATORS, *OPTION_MUTATORS]
BY_ID = {m.id: m for m in MUTATORS}
KINDS = ("manifest", "gguf", "onnx", "image", "video", "prompt", "option")
assert len(BY_ID) == len(MUTATORS), "mutator ids must be unique"


# ------------------------------------------------------------------------ running one case (child)

class OpenLog:
    """Which files a case opened while its action ran: Python opens through an audit hook, opens
    from C code (ONNX Runtime, llama.cpp) through inotify on the bundle's and the outside folders."""

    IN_OPEN, IN_ISDIR = 0x20, 0x40000000

    def __init__(self, dirs: Sequence[Path]):
        self.paths: list[str] = []
        self.active = False
        self.fd, self.wds = -1, {}
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            for top in dirs:
                for d, subdirs, _ in os.walk(top, followlinks=False):
                    wd = libc.inotify_add_watch(self.fd, os.fsencode(d), self.IN_OPEN)
                    if wd >= 0:
                        self.wds[wd] = d
        except (OSError, AttributeError):
            self.fd = -1
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args) -> None:
        if self.active and event == "open" and args and isinstance(args[0], (str, bytes)):
            self.paths.append(os.fsdecode(args[0]))

    def start(self) -> None:
        self.active = True

    def stop(self) -> list[str]:
        self.active = False
        out = list(self.paths)
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 1 << 16)
            except (BlockingIOError, OSError):
                break
            i = 0
            while i + 16 <= len(data):
                wd, mask, _cookie, n = struct.unpack_from("iIII", data, i)
                name = data[i + 16:i + 16 + n].rstrip(b"\0")
                i += 16 + n
                if name and not mask & self.IN_ISDIR and wd in self.wds:
                    out.append(os.path.join(self.wds[wd], os.fsdecode(name)))
        return out


def _where(tb) -> str:
    """The innermost frame of edgelmm itself (not this harness) in a traceback: file:line in function."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/edgelmm/" in f.filename and not f.filename.endswith("testing/fuzz.py")]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    return f"{_rel(f.filename)}:{f.lineno} in {f.name}"


def _rel(filename: str) -> str:
    i = filename.rfind("/edgelmm/")
    return filename[i + 1:] if i >= 0 else filename.rsplit("site-packages/", 1)[-1]


def _describe(action: Any) -> str:
    if isinstance(action, Cli):
        return "edgelmm " + " ".join(_short(a, 80) if not isinstance(a, str) or len(a) > 80 else a for a in action.args)
    if isinstance(action, Load):
        opened = "load" if action.checksums else "open_bundle(verify_checksums=False)"
        return (f"{opened}(backend={action.backend}, {action.load_kwargs}).{action.method}("
                f"{_short(action.prompt, 50)}, images={_short(action.images, 60)}, {action.gen_kwargs})")
    return getattr(action, "label", type(action).__name__)


def _execute_api(action: Any) -> dict:
    from edgelmm.errors import EdgeLMMError

    try:
        out = action.run()
        return {"status": "accepted", "message": str(out)[:200]}
    except EdgeLMMError as exc:
        return {"status": "typed", "error": type(exc).__name__, "message": str(exc)}
    except BaseException as exc:     # noqa: BLE001  (everything else is the finding)
        return {"status": "untyped", "error": type(exc).__name__, "message": str(exc)[:300],
                "where": _where(exc.__traceback__), "traceback": traceback.format_exc()[-4000:]}


def _read_text(path: Path, limit: int = 1 << 20) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def _execute_cli(action: Cli, work: Path) -> dict:
    from edgelmm.cli import app

    code, exc = 0, None
    try:
        app(args=action.args, prog_name="edgelmm")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:      # noqa: BLE001
        exc = e
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = _read_text(work / "stdout.txt").strip(), _read_text(work / "stderr.txt").strip()
    if exc is not None:
        return {"status": "untyped", "error": type(exc).__name__, "message": str(exc)[:300],
                "where": _where(exc.__traceback__), "traceback": traceback.format_exc()[-4000:]}
    try:
        obj = json.loads(out) if action.json else None
    except ValueError:
        obj = None
    first_err = next((line for line in err.splitlines() if re.sub(r"[\s\u2500-\u257f]", "", line)), "")[:200]
    if code in action.ok_codes:
        if action.json and not isinstance(obj, dict):
            return {"status": "untyped", "error": f"exit {code}",
                    "message": f"--json but stdout is not one JSON object: {out[:120]!r}", "where": "cli"}
        return {"status": "accepted", "message": f"exit {code}"}
    if code == 2:
        if action.json:
            if isinstance(obj, dict) and "error" in obj and "message" in obj:
                return {"status": "typed", "error": str(obj["error"]), "message": str(obj["message"])}
            return {"status": "untyped", "error": "exit 2",
                    "message": f"--json but stdout is not one {{error, message}} object (stdout {out[:80]!r}; "
                               f"stderr {first_err!r})", "where": "cli --json"}
        if "Traceback" in err:
            return {"status": "untyped", "error": "exit 2", "message": f"traceback on stderr: {err[-300:]}",
                    "where": "cli"}
        text = " ".join(re.sub(r"[\u2500-\u257f]+", " ", err).split())   # without rich's box drawing
        named = re.match(r"(\w+): ", text)
        return {"status": "typed", "error": named[1] if named else "usage",
                "message": (text[named.end():] if named else text)[:2000]}
    return {"status": "untyped", "error": f"exit {code}", "message": f"exit status {code}: {first_err}",
            "where": "cli", "stderr": err[-2000:]}


def _manifest_files(root: Path) -> set[str] | None:
    """The bundle-relative paths the manifest hashes, as listed and as resolved (a hashed symlink
    to a file inside the bundle verifies that file)."""
    try:
        m = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        entries = [*m["files"], *(e for a in m["artifacts"] for e in a["files"])]
        names = {os.path.normpath(e["file"]) for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)}
    except Exception:       # noqa: BLE001  (a manifest the case broke: nothing to compare)
        return None
    real_root = os.path.realpath(root)
    return names | {os.path.relpath(os.path.realpath(os.path.join(root, n)), real_root) for n in names}


def _judge(case: Case, res: dict, opened: list[str]) -> dict:
    """The outcome from what ran, the case's expectation and culprit, and the files it opened:
    a file outside the bundle opened, or an unhashed bundle file read by a load that succeeded,
    is "wrong" whatever the case expected."""
    status = res["status"]
    message = f"{res.get('error', '')}: {res.get('message', '')}"
    outside = os.path.realpath(case.work / "outside")
    forbidden = sorted({p for p in map(os.path.realpath, opened)
                        if p.startswith(outside + os.sep) or (case.planted_passwd and p == str(PASSWD))})
    unhashed: list[str] = []
    if status == "accepted" and case.root is not None and case.check_unhashed:
        root = os.path.realpath(case.root)
        hashed = _manifest_files(case.root)
        inside = {os.path.relpath(p, root) for p in map(os.path.realpath, opened) if p.startswith(root + os.sep)}
        unhashed = sorted(p for p in inside if hashed is not None and p not in hashed
                          and p not in (MANIFEST, ".edgelmm.lock") and not p.startswith(".update-")
                          and not os.path.isdir(os.path.join(root, p)))
    if status == "untyped":
        outcome, reason = "untyped", f"{res.get('error')}: {res.get('message', '')[:160]} [at {res.get('where', '?')}]"
    elif forbidden:
        outcome, reason = "wrong", f"opened {forbidden[0]} (outside the bundle), then {status}: {message[:120]}"
    elif unhashed:
        outcome, reason = "wrong", f"read {unhashed[0]}, which the manifest does not hash (and loaded)"
    elif status == "typed" and case.expect == MUST_ACCEPT:
        outcome, reason = "wrong", f"refused a valid input: {message[:200]}"
    elif status == "accepted" and case.expect == MUST_REFUSE:
        outcome, reason = "wrong", f"accepted ({res.get('message', '')[:60]!r}) though it must be refused"
    elif status == "typed" and case.culprit and not re.search(case.culprit, message, re.I | re.S):
        outcome, reason = "unnamed", f"{message[:200]} (does not match /{case.culprit[:80]}/)"
    else:
        outcome, reason = status, message[:200]
    reason = " ".join(reason.split())
    return {"outcome": outcome, "reason": reason, "error": res.get("error"), "where": res.get("where"),
            "message": res.get("message", "")[:500], "traceback": res.get("traceback")}


def run_case(mutator_id: str, seed: int, fixtures: Path, work: Path, mem_bytes: int) -> dict:
    """Build the case and run it in this process (a forked child): typed/accepted/untyped, judged."""
    import resource

    t0 = time.time()
    mutator = BY_ID[mutator_id]
    case = Case(mutator, seed, fixtures, work)
    action = mutator.fn(case)
    t1 = time.time()
    if isinstance(action, Cli) or isinstance(action, Call):
        case.check_unhashed = isinstance(action, Cli) and action.args[:1] == ["run"]
    spec = {"expect": case.expect, "culprit": case.culprit, "notes": case.notes, "action": _describe(action)}
    (work / "spec.json").write_text(json.dumps(spec))
    watch = [d for d in (case.root, work / "outside") if d is not None and d.is_dir()]
    log = OpenLog(watch)
    if mem_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (mem_bytes, mem_bytes))
    log.start()
    res = _execute_cli(action, work) if isinstance(action, Cli) else _execute_api(action)
    opened = log.stop()
    return {**spec, **_judge(case, res, opened), "build_s": round(t1 - t0, 2), "run_s": round(time.time() - t1, 2)}


# --------------------------------------------------------------------------------------- the zygote

PRELOAD = ("numpy", "PIL.Image", "edgelmm", "edgelmm.api", "edgelmm.cli", "edgelmm.bundle", "edgelmm.gguf_file",
           "edgelmm.runtimes.onnxruntime", "edgelmm.runtimes.llamacpp", "edgelmm.apps.anomaly", "onnxruntime",
           "gguf", "onnx", "cv2")


def _crash_detail(work: Path) -> tuple[str, str]:
    """(the C-side message, the innermost edgelmm frame) of a crashed or hung case, from its stderr
    and faulthandler's dump."""
    err = _read_text(work / "stderr.txt")
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    hits = [line for line in lines if re.search(r"GGML_ASSERT|GGML_ABORT|assert|abort|terminate called|what\(\)|"
                                                r"Segmentation|error", line, re.I)]
    c_msg = re.sub(r"/\S*/(?=[\w.-]+:\d+:)", "", (hits or lines or [""])[-1])[:200]   # drop build paths
    dump = _read_text(work / "faulthandler.txt")
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', dump)
    ours = [f for f in frames if "/edgelmm/" in f[0] and not f[0].endswith("testing/fuzz.py")]
    f = (ours or frames or [None])[0]       # faulthandler lists the most recent call first
    return c_msg, (f"{_rel(f[0])}:{f[1]} in {f[2]}" if f else "?")


def run_in_fork(req: dict) -> dict:
    """Fork, run one case in the child under the limits, and classify what happened to it."""
    work = Path(req["work"])
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:   # ---- the child
        try:
            os.setpgid(0, 0)
            for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, work / "stdout.txt", os.O_WRONLY | os.O_CREAT),
                                    (2, work / "stderr.txt", os.O_WRONLY | os.O_CREAT)):
                os.dup2(os.open(name, flags, 0o644), fd)
            import faulthandler

            dump = open(work / "faulthandler.txt", "w")
            faulthandler.enable(dump, all_threads=True)
            faulthandler.register(signal.SIGUSR1, dump, all_threads=True)
            os.chdir(work)
            result = run_case(req["mutator"], req["seed"], Path(req["fixtures"]), work, req["mem_bytes"])
            (work / "result.json").write_text(json.dumps(result))
        except BaseException:      # noqa: BLE001  (a harness bug, reported as such)
            (work / "harness.txt").write_text(traceback.format_exc())
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(0)
    # ---- the zygote
    status, hung = None, False
    deadline = t0 + req["timeout"]
    while status is None:
        wpid, st = os.waitpid(pid, os.WNOHANG)
        if wpid:
            status = st
        elif time.time() > deadline:
            hung = True
            try:
                os.kill(pid, signal.SIGUSR1)       # faulthandler: where is it stuck?
                time.sleep(1.0)
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status = os.waitpid(pid, 0)[1]
        else:
            time.sleep(0.02)
    try:
        os.killpg(pid, signal.SIGKILL)             # whatever the case started
    except (ProcessLookupError, PermissionError):
        pass
    seconds = round(time.time() - t0, 2)
    spec = json.loads(_read_text(work / "spec.json") or "{}")
    out = {"id": req["id"], "mutator": req["mutator"], "seed": req["seed"], "seconds": seconds, **spec}
    if (work / "result.json").is_file() and not hung and os.WIFEXITED(status):
        out.update(json.loads(_read_text(work / "result.json")))
    elif hung:
        c_msg, where = _crash_detail(work)
        out.update(outcome="hang", where=where, reason=f"no result after {req['timeout']} s [at {where}]")
    elif os.WIFSIGNALED(status):
        c_msg, where = _crash_detail(work)
        name = signal.Signals(os.WTERMSIG(status)).name
        out.update(outcome="crash", where=where, error=name,
                   reason=f"killed by {name}: {c_msg} [at {where}]")
    elif (work / "harness.txt").is_file():
        tb = _read_text(work / "harness.txt")
        last = tb.strip().splitlines()[-1] if tb.strip() else "?"
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb)
        where = f"{_rel(frames[-1][0])}:{frames[-1][1]} in {frames[-1][2]}" if frames else "?"
        out.update(outcome="harness", where=where, reason=f"harness error {last} [at {where}]", traceback=tb[-3000:])
    else:
        c_msg, where = _crash_detail(work)
        out.update(outcome="crash", where=where, error=f"exit {os.WEXITSTATUS(status)}",
                   reason=f"exited with status {os.WEXITSTATUS(status)} from C code: {c_msg} [at {where}]")
    if out["outcome"] in ("crash", "hang", "harness", "untyped"):
        out["stderr_tail"] = _read_text(work / "stderr.txt")[-1500:]
    keep = req.get("keep", "none")
    if keep == "none" or (keep == "failing" and out["outcome"] not in FAILING + ("harness",)):
        shutil.rmtree(work, ignore_errors=True)
    else:
        out["work"] = str(work)
    return out


def zygote_main() -> None:
    """Serve cases: one JSON request per stdin line, one JSON result per stdout line."""
    os.environ.update(_child_env())
    try:
        for name in PRELOAD:
            __import__(name)
    except Exception as exc:      # noqa: BLE001
        print(json.dumps({"fatal": f"cannot import {name}: {type(exc).__name__}: {exc}"}), flush=True)
        return
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run_in_fork(json.loads(line))), flush=True)


class Zygote:
    def __init__(self, python: str = sys.executable):
        self.python = python
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.python, "-m", "edgelmm.testing.fuzz", "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, env=_child_env())
        hello = json.loads(self.proc.stdout.readline() or '{"fatal": "the zygote exited at start"}')
        if "fatal" in hello:
            raise RuntimeError(hello["fatal"])

    def run(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc = None
            return {"id": req["id"], "mutator": req["mutator"], "seed": req["seed"], "outcome": "harness",
                    "reason": "the zygote died"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ------------------------------------------------------------------------------------- the campaign

def plan(cases: int, seed: int, kinds: Sequence[str] = KINDS, include_slow: bool = True,
         controls: bool = True) -> list[tuple[str, int]]:
    """The campaign's (mutator id, case seed) list: the controls first, then kinds in turn; within a
    kind every mutator once (shuffled), then drawn by weight. The same seed gives the same list,
    and a longer campaign starts with the shorter one's cases."""
    rng = random.Random(seed)
    out = [(m.id, 0) for m in CONTROL_MUTATORS] if controls else []
    pools = {k: [m for m in MUTATORS if m.kind == k and (include_slow or not m.slow)] for k in kinds}
    pools = {k: v for k, v in pools.items() if v}
    firsts = {k: rng.sample(v, len(v)) for k, v in pools.items()}
    order = list(pools)
    i = 0
    while len(out) < cases:
        kind = order[i % len(order)]
        i += 1
        pool = pools[kind]
        m = firsts[kind].pop() if firsts[kind] else rng.choices(pool, [x.weight for x in pool])[0]
        out.append((m.id, rng.getrandbits(32)))
    return out[:max(cases, len(CONTROL_MUTATORS) if controls else 0)]


def signature(r: dict) -> str:
    """What makes two failures the same bug, for the list of distinct ones."""
    where = re.sub(r":\d+ in ", ":", r.get("where") or "?")
    outcome = r["outcome"]
    if outcome == "untyped":
        return f"untyped {r.get('error')} at {where}"
    if outcome == "crash":
        c = re.sub(r"\d+", "N", (r.get("reason") or "").split(": ", 1)[-1].split(" [at ")[0])[:70]
        return f"crash {r.get('error')} at {where}: {c}"
    if outcome == "hang":
        return f"hang at {where} ({r['mutator']})"
    if outcome == "wrong":
        what = re.sub(r"(opened|read) \S+", r"\1 FILE", (r.get("reason") or "").split(";")[0].split(" (")[0])
        return f"wrong {r['mutator']}: {what[:60]}"
    if outcome == "unnamed":
        return f"unnamed {r['mutator']}: {r.get('error')}"
    return f"{outcome} {r['mutator']}: {(r.get('reason') or '')[:60]}"


def campaign(cases: int = 300, seed: int = 0, jobs: int = 2, kinds: Sequence[str] = KINDS, timeout: float = 60,
             mem_gib: float = 4, fixtures: str | Path | None = None, work: str | Path | None = None,
             keep: str = "none", include_slow: bool = True, controls: bool = True,
             only: Sequence[tuple[str, int]] | None = None, log: Callable[[str], None] = print,
             on_result: Callable[[dict], None] | None = None) -> dict:
    """Run the campaign (or `only` these (mutator id, seed) cases) and return the report."""
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="edgelmm-fuzz-")
    fixtures = ensure_fixtures(fixtures or Path(tmp.name) / "fixtures", log=log)
    work_root = Path(work or Path(tmp.name) / "cases")
    work_root.mkdir(parents=True, exist_ok=True)
    todo = list(only) if only else plan(cases, seed, kinds, include_slow, controls)
    reqs = [{"id": i, "mutator": mid, "seed": s, "fixtures": str(fixtures), "timeout": timeout,
             "mem_bytes": int(mem_gib * (1 << 30)), "keep": keep,
             "work": str(work_root / f"{i:05d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', mid)}-{s}")}
            for i, (mid, s) in enumerate(todo)]
    results: list[dict | None] = [None] * len(reqs)
    lock = threading.Lock()
    queue = list(reversed(reqs))
    errors: list[BaseException] = []

    def worker() -> None:
        z = Zygote()
        try:
            while True:
                with lock:
                    if not queue or errors:
                        return
                    req = queue.pop()
                r = z.run(req)
                with lock:
                    results[req["id"]] = r
                    if on_result:
                        on_result(r)
        except BaseException as exc:     # noqa: BLE001
            errors.append(exc)
        finally:
            z.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"the fuzz campaign stopped: {errors[0]}") from errors[0]
    done = [r for r in results if r is not None]
    report = summarize(done, seed=seed, cases=len(reqs), jobs=jobs, timeout=timeout, mem_gib=mem_gib,
                       elapsed=time.time() - t0)
    report["base_intact"] = base_is_intact(fixtures)
    tmp.cleanup()
    return report


def summarize(results: list[dict], **meta) -> dict:
    counts = {o: 0 for o in (*OUTCOMES, "harness")}
    by_kind: dict[str, dict[str, int]] = {}
    by_mutator: dict[str, dict[str, int]] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        kind = r["mutator"].split("/")[0]
        for table, key in ((by_kind, kind), (by_mutator, r["mutator"])):
            row = table.setdefault(key, {})
            row[r["outcome"]] = row.get(r["outcome"], 0) + 1
    failures = [r for r in results if r["outcome"] in FAILING + ("harness",)]
    groups: dict[str, list[dict]] = {}
    for r in failures:
        groups.setdefault(signature(r), []).append(r)
    distinct = [{"signature": sig, "outcome": rs[0]["outcome"], "count": len(rs),
                 "example": {k: rs[0].get(k) for k in ("mutator", "seed", "reason", "notes", "action", "expect")},
                 "replay": f"--replay {rs[0]['mutator']}:{rs[0]['seed']}"}
                for sig, rs in sorted(groups.items(), key=lambda kv: (kv[1][0]["outcome"], -len(kv[1])))]
    return {**{k: (round(v, 1) if isinstance(v, float) else v) for k, v in meta.items()}, "counts": counts,
            "by_kind": by_kind, "by_mutator": by_mutator, "distinct_failures": distinct,
            "failures": [{k: r.get(k) for k in ("id", "mutator", "seed", "outcome", "reason", "expect", "notes",
                                                "action", "seconds", "work")} for r in failures],
            "results": results, "ok": not failures}


def format_counts(report: dict) -> str:
    counts = report["counts"]
    lines = ["outcome counts: " + ", ".join(f"{o} {counts.get(o, 0)}" for o in (*OUTCOMES, "harness")
                                              if counts.get(o) or o in OUTCOMES)]
    cols = [o for o in (*OUTCOMES, "harness") if any(row.get(o) for row in report["by_kind"].values())]
    lines.append(f"{'kind':<10}" + "".join(f"{c:>10}" for c in cols))
    for kind, row in sorted(report["by_kind"].items()):
        lines.append(f"{kind:<10}" + "".join(f"{row.get(c, 0):>10}" for c in cols))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["zygote"]:
        zygote_main()
    elif argv[:1] == ["build-fixtures"] and len(argv) == 2:
        build_fixtures(argv[1])
    else:
        sys.exit("usage: python -m edgelmm.testing.fuzz zygote | build-fixtures DIR  "
                 "(the campaign: python benchmarks/fuzz.py)")


if __name__ == "__main__":
    main()
