"""The bundle: one directory, one manifest (edgelmm.json). Every exporter writes into it, every
runtime reads only it. Written into a temporary sibling directory and renamed into place when
complete, so an interrupted export never leaves a bundle that loads; every file carries a sha256
that is checked before any runtime session is created."""

from __future__ import annotations

import fcntl
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
from .manifest import MANIFEST, check_regular_file, is_bundle, parse_manifest, validate_manifest
from .modelfiles import PROMPT_FILES

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


def file_entry(root: Path, rel: str, name: str | None = None) -> dict[str, Any]:
    """{"file", "size", "sha256"} of root/rel, listed under `name` (default rel)."""
    p = root / rel
    return {"file": name or rel, "size": p.stat().st_size, "sha256": sha256_file(p)}


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _leftover_pid(name: str, marker: str) -> int | None:
    """The pid in a work directory's name (`.NAME.partial-PID-xxxx`), or None when it has none."""
    rest = name.split(marker, 1)[1] if marker in name else ""
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _remove_leftovers(parent: Path, stem: str) -> None:
    """Work directories of killed exports to the same target (their process is gone)."""
    for marker in (".partial-", ".old-"):
        for p in parent.glob(f".{stem}{marker}*"):
            pid = _leftover_pid(p.name, marker)
            if pid is not None and pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:
        return False


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _readable_as_umask(path: Path) -> None:
    """onnx writes external data 0600 (its C++ writer): a bundle's files get the umask's mode, as
    any other file the user writes, so a service running as another user can read them."""
    mode = 0o666 & _umask_mode()
    if path.stat().st_mode & 0o777 != mode:
        path.chmod(mode)


@contextmanager
def staging_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside out_dir; on success it replaces out_dir atomically
    (a rename on the same filesystem). On any failure or signal nothing appears at out_dir, and
    what a killed run left beside it is removed by the next run to the same target."""
    out_dir = Path(out_dir)
    try:
        if out_dir.exists() and not overwrite:
            raise BundleError("already exists (pass overwrite=True / --overwrite to replace it)", path=str(out_dir))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out_dir.parent, out_dir.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
        # mkdtemp makes 0700 folders; a bundle is read by services running as other users.
        tmp.chmod(_umask_mode())
    except OSError as exc:
        blocker = next((str(p) for p in out_dir.parents if _is_file(p)), None)
        why = f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc
        raise BundleError(f"cannot create the output folder here ({why})", path=str(out_dir)) from None
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                _readable_as_umask(p)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def select_artifacts(manifest: dict[str, Any], *, graph: str | None = None, format: str | None = None,
                     precision: str | None = None) -> list[dict[str, Any]]:
    """The manifest's artifacts whose graph, format and precision are the ones given (None: any), in
    manifest order. The one way to look artifacts up, for a Bundle and for a manifest being written."""
    return [a for a in manifest["artifacts"] if (graph is None or a["graph"] == graph)
            and (format is None or a["format"] == format) and (precision is None or a["precision"] == precision)]


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    def artifacts(self, *, graph: str | None = None, format: str | None = None,
                  precision: str | None = None) -> list[dict[str, Any]]:
        """The artifacts matching every field given (select_artifacts)."""
        return select_artifacts(self.manifest, graph=graph, format=format, precision=precision)

    def precisions(self, format: str = "onnx") -> list[str]:
        return sorted({a["precision"] for a in self.artifacts(format=format)})

    def formats(self) -> list[str]:
        return sorted({a["format"] for a in self.artifacts()})

    def artifact(self, graph: str, fmt: str, precision: str) -> dict[str, Any]:
        found = self.artifacts(graph=graph, format=fmt, precision=precision)
        if found:
            return found[0]
        have = sorted({(a["format"], a["precision"]) for a in self.artifacts()})
        raise BundleError(f"no {fmt}/{precision} {graph} graph in this bundle (it has {have})", path=str(self.root))

    def path(self, artifact: dict[str, Any]) -> Path:
        return self.root / artifact["file"]


def _family_names() -> tuple[str, ...]:
    from .families import FAMILIES

    return tuple(f.name for f in FAMILIES)


def open_bundle(path: str | Path, verify_checksums: bool = True) -> Bundle:
    """Open a bundle: the manifest's schema first (types, ranges, paths inside the bundle, every
    artifact's file among its hashed entries), then every listed file is a regular file of the
    listed size and, with verify_checksums, has the listed sha256. Raises BundleError naming the
    field or file."""
    root = Path(path)
    mpath = root / MANIFEST
    if not is_bundle(root):
        if (root / "config.json").is_file():
            raise BundleError(f"this is a Hugging Face checkpoint, not an edgelmm bundle (no {MANIFEST}); make a bundle "
                              f"from it first: edgelmm export {root} BUNDLE", path=str(root))
        raise BundleError(f"not a bundle: no {MANIFEST}", path=str(root))
    if mpath.resolve().parent != root.resolve():
        raise BundleError("the manifest is a link to a file outside the bundle", path=str(mpath))
    manifest = parse_manifest(mpath)
    entries = validate_manifest(manifest, root, mpath, format_version=FORMAT_VERSION, families=_family_names())
    # The runtimes read these from the bundle's root when they are there: each must be hashed.
    listed = {e["file"] for e in manifest["files"]}
    unlisted = [name for name in PROMPT_FILES if name not in listed and os.path.lexists(root / name)]
    if unlisted:
        raise BundleError(f"{', '.join(unlisted)} present but not listed (hashed) in the manifest; a runtime would "
                          "read it unchecked", path=str(root))
    for entry in entries:
        p = check_regular_file(root, entry)
        if verify_checksums and sha256_file(p) != entry["sha256"]:
            raise BundleError("sha256 does not match the manifest (the file is corrupt or was modified)", path=str(p))
    return Bundle(root=root, manifest=manifest)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    return {e["file"] for e in manifest["files"]} | {e["file"] for a in manifest["artifacts"] for e in a["files"]}


UPDATE_PREFIX = ".update-"
JOURNAL = "journal.json"
LOCK = ".edgelmm.lock"


class BundleUpdate:
    """One transaction on an existing bundle (see `update_bundle`). New files are written under
    `work` with names no manifest generation has used; `commit(manifest)` moves them in, replaces
    the manifest in one rename, then removes the files only the old manifest named."""

    def __init__(self, bundle: Bundle, work: Path):
        self.bundle, self.root, self.work = bundle, bundle.root, work
        self.generation = int(bundle.manifest.get("generation", 0)) + 1
        self._taken = referenced_files(bundle.manifest)

    def new_file(self, rel: str) -> Path:
        """Where to write the file that will live at `rel` (e.g. "onnx/decoder.int4.onnx"): a path in
        the work directory, under a name that neither the bundle nor its manifest uses (so the
        files the current manifest names are never touched before the manifest is replaced).
        Files the writer puts beside it (ONNX external data) travel with it."""
        folder, _, name = rel.rpartition("/")
        stem, dot, ext = name.partition(".")
        candidate = rel
        if candidate in self._taken or (self.root / candidate).exists():
            candidate = f"{folder + '/' if folder else ''}{stem}.g{self.generation}{dot}{ext}"
        if candidate in self._taken or (self.root / candidate).exists():
            raise BundleError(f"{candidate!r} already exists; remove files the manifest does not list", path=str(self.root))
        self._taken.add(candidate)
        out = self.work / candidate
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def trial_rel(self, path: Path) -> str:
        """A work file's path relative to the bundle (for a trial manifest, before commit)."""
        return str(path.relative_to(self.root))

    def final_rel(self, path: Path) -> str:
        """The bundle-relative path a work file will have after commit."""
        return str(path.relative_to(self.work))

    def entries(self, path: Path) -> list[dict[str, Any]]:
        """Hashed entries (final names) of a work file and the files written beside it with its name
        as prefix (external data), the graph first."""
        beside = sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path)
        return [file_entry(self.root, self.trial_rel(p), self.final_rel(p)) for p in [path, *beside]]

    def where_now(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """File entries (final names, from `entries`) pointed at where the files sit before commit."""
        return [{**e, "file": self.trial_rel(self.work / e["file"])} for e in entries]

    def trial(self, manifest: dict[str, Any]) -> Bundle:
        """The bundle as `manifest` describes it, its new files still in the work directory (their
        entries from `where_now`): what a writer measures or verifies before it commits, so a failure
        leaves the bundle as it was."""
        return Bundle(self.root, manifest)

    def commit(self, manifest: dict[str, Any]) -> None:
        new = [str(p.relative_to(self.work)) for p in sorted(self.work.rglob("*"))
               if p.is_file() and p.parent != self.work]
        old = sorted(referenced_files(self.bundle.manifest) - referenced_files(manifest))
        manifest = {**manifest, "generation": self.generation}
        # A crash from here on is finished by the next update: the journal says what to remove.
        (self.work / JOURNAL).write_text(json.dumps({"new": new, "old": old}), encoding="utf-8")
        for rel in new:
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            _readable_as_umask(self.work / rel)
            os.replace(self.work / rel, self.root / rel)
        write_manifest(self.work, manifest)
        os.replace(self.work / MANIFEST, self.root / MANIFEST)  # the one step that switches generations
        self.bundle.manifest = manifest
        _finish_leftover(self.root, self.work, manifest)


def _finish_leftover(root: Path, work: Path, manifest: dict[str, Any]) -> None:
    """Remove an update's work directory and, by its journal, the files it moved in or made
    obsolete that the bundle's current manifest does not name."""
    journal = work / JOURNAL
    keep = referenced_files(manifest)
    if journal.is_file():
        try:
            listed = json.loads(journal.read_text(encoding="utf-8"))
            names = [*listed.get("new", []), *listed.get("old", [])]
        except (ValueError, OSError, AttributeError, TypeError):
            names = []
        real_root = root.resolve()
        for rel in map(str, names):
            p = root / rel
            # The journal is a file in the bundle too: it never removes what is kept or outside.
            if rel not in keep and rel not in (MANIFEST, LOCK) and real_root in p.resolve().parents:
                p.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)


@contextmanager
def update_bundle(path: str | Path, verify_checksums: bool = True) -> Iterator[BundleUpdate]:
    """A transaction on an existing bundle, for calibrate, build-engines and any later writer.
    Holds the bundle's lock (a second writer gets a BundleError at once), finishes or discards
    what killed updates left, and yields a BundleUpdate. Without a commit, or on any error, the
    bundle stays exactly as it was; a SIGKILL at any point leaves either the old or the new
    generation, both complete."""
    root = Path(path)
    bundle = open_bundle(root, verify_checksums=verify_checksums)
    try:
        lock = open(root / LOCK, "a")
    except OSError as exc:
        raise BundleError(f"cannot write to the bundle ({exc.strerror})", path=str(root)) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BundleError("another edgelmm process is updating this bundle (calibrate or build-engines); "
                              "wait for it to finish", path=str(root)) from None
        # With the lock held, every work folder here is a killed run's; those of earlier edgelmm
        # versions (.calib-partial-*, .engines-partial-*) have no journal and are just removed.
        for pattern in (f"{UPDATE_PREFIX}*", ".calib-partial-*", ".engines-partial-*"):
            for leftover in root.glob(pattern):
                _finish_leftover(root, leftover, bundle.manifest)
        work = Path(tempfile.mkdtemp(prefix=f"{UPDATE_PREFIX}{os.getpid()}-", dir=root))
        txn = BundleUpdate(bundle, work)
        try:
            yield txn
        finally:
            _finish_leftover(root, work, txn.bundle.manifest)
