"""SIGKILL at ten points of export, calibrate and calibrate --overwrite: each leaves either no
target or a complete bundle (checksums pass, and it answers exactly as the old or the new
generation did), and the next run on the same target cleans what the killed one left.

Each run is a fresh process (forked from a server that imported everything once) that counts the steps
that change the filesystem or take long (os.replace/rename/unlink, mkdtemp, copies, rmtree, manifest
writes, each exported graph, each quantizer, verify). A SIGKILL before step k leaves the filesystem
exactly as it is when step k begins: the job is the only thing running, and its hooks run before the
step. So one uncut run copies what it has on disk at every step (the state a kill there leaves), and the
ten kill points are checked on those copies; a real SIGKILL at the middle point (the process killed
by the kernel) must leave what its copy shows, and the next run cleans it. One run instead of one per
point: each late point re-ran the whole export or calibration (11 runs, 90 s of CPU for export)."""

import json
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import edgelmm
from edgelmm.bundle import MANIFEST, open_bundle, referenced_files
from edgelmm.testing import sample_images

pytestmark = pytest.mark.slow

KILLS = 10

# One server per module imports torch, the exporter and the calibrator once (5 s of CPU a run) and
# forks a fresh child per run; the child installs the step counter and runs the job. The parent runs
# no torch op before it forks (one intra-op thread, none started), so each child starts clean.
SERVER = r"""
import json, os, shutil, signal, sys, tempfile, traceback
import torch
torch.set_num_threads(1)
import edgelmm.bundle, edgelmm.calib.quantize, edgelmm.verify, edgelmm.export.onnx
from edgelmm.calib import CalibrationOptions, calibrate
from edgelmm.export import export
import onnxruntime.quantization

REAL_COPY2, REAL_COPYTREE = shutil.copy2, shutil.copytree

def job(plan):
    steps = []

    def hook(owner, name, label):
        real = getattr(owner, name)
        def counted(*args, **kwargs):
            steps.append(label)
            if len(steps) == plan["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            if plan.get("snapshots"):  # what a kill here would leave
                REAL_COPYTREE(plan["watch"], os.path.join(plan["snapshots"], str(len(steps))),
                              symlinks=True, copy_function=REAL_COPY2)
            return real(*args, **kwargs)
        setattr(owner, name, counted)

    for name in ("replace", "rename", "unlink"):
        hook(os, name, "os." + name)
    hook(shutil, "rmtree", "rmtree")
    hook(shutil, "copy2", "copy2")
    hook(tempfile, "mkdtemp", "mkdtemp")
    hook(edgelmm.bundle, "write_manifest", "write_manifest")
    for name in ("quantize_vision_int8", "quantize_decoder_int4", "quantize_decoder_int8_dynamic"):
        hook(edgelmm.calib.quantize, name, name)
    hook(edgelmm.verify, "verify", "verify")
    if plan["job"] == "export":
        hook(edgelmm.export.onnx, "_export_one", "export graph")
        export(plan["model"], plan["out"], quiet=True)
    else:
        calibrate(plan["out"], plan["precisions"], CalibrationOptions(calib_samples=6, eval_samples=0,
                                                                      seed=plan["seed"]), overwrite=plan["overwrite"])
    with open(plan["log"], "w") as f:
        json.dump(steps, f)

replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)   # what a job prints goes to stderr; stdout carries one reply line per job
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            job(json.loads(line))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    replies.write(json.dumps({"signal": killed_by, "code": os.WEXITSTATUS(status) if killed_by is None else None}) + "\n")
    replies.flush()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("kill-server") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True)
    proc.log = log
    yield proc
    proc.stdin.close()
    proc.wait(timeout=120)


def _run(server, tmp_path, kill_at: int = -1, **plan) -> list[str]:
    """Run one job in a fresh child of the server; killed at its `kill_at`-th step, or to the end
    (then the steps it counted are returned). With `snapshots` and `watch`, the folder `watch` is
    copied to `snapshots`/k as step k begins."""
    log = tmp_path / "steps.json"
    log.unlink(missing_ok=True)
    server.stdin.write(json.dumps({**plan, "kill_at": kill_at, "log": str(log)}) + "\n")
    server.stdin.flush()
    line = server.stdout.readline()
    assert line, f"the job server died:\n{server.log.read_text()[-3000:]}"
    reply = json.loads(line)
    if kill_at < 0:
        assert reply["code"] == 0, (reply, server.log.read_text()[-3000:])
        return json.loads(log.read_text())
    assert reply["signal"] == signal.SIGKILL, (kill_at, reply, server.log.read_text()[-3000:])
    return []


def _kill_points(steps: list[str]) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(1, len(steps), KILLS)})


def _answers(bundle_dir) -> dict[str, list[int]]:
    """Greedy tokens of one two-image prompt for every ONNX precision the bundle lists (loaded with
    every checksum checked)."""
    bundle = open_bundle(bundle_dir)
    precisions = sorted({a["precision"] for a in bundle.manifest["artifacts"] if a["format"] == "onnx"})
    out = {}
    for p in precisions:
        pipe = edgelmm.load(bundle_dir, backend="onnxruntime", provider="cpu", precision=p)
        out[p] = pipe.generate("Compare <image> and <image>.", sample_images(2, seed=3), max_new_tokens=4).token_ids
    return out


def _leftovers(root) -> list[str]:
    hidden = [p.name for p in root.iterdir() if p.name.startswith((".update-", ".calib-partial", ".engines-partial"))]
    manifest = json.loads((root / MANIFEST).read_text())
    listed = referenced_files(manifest)
    stray = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent != root
             and not p.relative_to(root).parts[0].startswith(".") and str(p.relative_to(root)) not in listed]
    return hidden + stray


def _tree(root) -> list[str]:
    """Every file under `root`, with the random parts of work-folder names (pid, tempfile's suffix) cut."""
    def stable(part: str) -> str:
        return part.split("-")[0] if part.startswith(".") else re.sub(r"-[a-z0-9_]{8}$", "-*", part)
    return sorted("/".join(stable(x) for x in p.relative_to(root).parts) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("overwrite", [False, True], ids=["calibrate", "calibrate-overwrite"])
def test_calibrate_killed_at_ten_points(server, reference_bundle, tmp_path, overwrite):
    base = tmp_path / "base"
    shutil.copytree(reference_bundle, base)
    plan = dict(job="calibrate", precisions=["int8-vision+int4"], overwrite=overwrite, seed=0)
    if overwrite:  # the bundle already has the precision; the killed runs recalibrate it with another seed
        _run(server, tmp_path, out=str(base), **plan)
        plan["seed"] = 1
    before = _answers(base)
    before_gen = json.loads((base / MANIFEST).read_text()).get("generation", 0)
    done, snapshots = tmp_path / "done", tmp_path / "snapshots"
    shutil.copytree(base, done)
    steps = _run(server, tmp_path, out=str(done), snapshots=str(snapshots), watch=str(done), **plan)
    after = _answers(done)
    assert after.keys() == {"fp32", "int8-vision+int4"} and after["fp32"] == before["fp32"]
    assert "os.replace" in steps and "quantize_vision_int8" in steps

    left = {}
    for k in _kill_points(steps):
        gen = json.loads((snapshots / str(k) / MANIFEST).read_text()).get("generation", 0)
        assert gen in (before_gen, before_gen + 1), (k, steps[k - 1], gen)
        left[k] = _answers(snapshots / str(k))
        assert left[k] == (before if gen == before_gen else after), (k, steps[k - 1])
    # A real SIGKILL at the middle point leaves what its copy shows; the next run on it finishes or
    # discards what the killed one left.
    k = _kill_points(steps)[KILLS // 2]
    target = tmp_path / "killed"
    shutil.copytree(base, target)
    _run(server, tmp_path, kill_at=k, out=str(target), **plan)
    assert _tree(target) == _tree(snapshots / str(k)) and _answers(target) == left[k], (k, steps[k - 1])
    _run(server, tmp_path, out=str(target), **{**plan, "overwrite": True})
    assert _answers(target) == after and _leftovers(target) == []


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory):
    """A LLaVA+SigLIP checkpoint with one vision and one text layer: the test exports it three times,
    and torch.export's tracing grows with the layers (8.9 s of CPU a run, 12.5 with the tiny
    checkpoints' 3 + 2)."""
    from edgelmm.testing.checkpoints import build_llava

    return build_llava(tmp_path_factory.mktemp("one-layer") / "llava-siglip",
                       vision_dims={"num_hidden_layers": 1}, text_dims={"num_hidden_layers": 1})


def test_export_killed_at_ten_points(server, one_layer_checkpoint, tmp_path):
    model = one_layer_checkpoint
    done, snapshots = tmp_path / "done" / "bundle", tmp_path / "snapshots"
    done.parent.mkdir()
    steps = _run(server, tmp_path, job="export", model=str(model), out=str(done), snapshots=str(snapshots),
                 watch=str(done.parent))
    expected = _answers(done)
    assert steps.count("export graph") == 3 and "verify" in steps
    for k in _kill_points(steps):
        # A killed export leaves the complete bundle or none, and at most a hidden work folder beside it.
        left = snapshots / str(k)
        assert [p.name for p in left.iterdir() if not p.name.startswith(".")] in ([], ["bundle"]), (k, steps[k - 1])
        if (left / "bundle").exists():
            assert _answers(left / "bundle") == expected, (k, steps[k - 1])
    # A real SIGKILL at the middle point leaves what its copy shows; the next export removes the rest.
    k = _kill_points(steps)[KILLS // 2]
    target = tmp_path / "killed" / "bundle"
    target.parent.mkdir()
    _run(server, tmp_path, kill_at=k, job="export", model=str(model), out=str(target))
    assert _tree(target.parent) == _tree(snapshots / str(k)), (k, steps[k - 1])
    shutil.rmtree(target, ignore_errors=True)
    _run(server, tmp_path, job="export", model=str(model), out=str(target))
    assert sorted(p.name for p in target.parent.iterdir()) == ["bundle"]
    assert _answers(target) == expected
