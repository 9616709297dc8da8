"""SIGKILL at ten points of export, calibrate and calibrate --overwrite: each leaves either no
target or a complete bundle (checksums pass, and it answers exactly as the old or the new
generation did), and the next run on the same target cleans what the killed one left.

Each run is a fresh interpreter that counts the steps that change the filesystem or take long
(os.replace/rename/unlink, mkdtemp, copies, rmtree, manifest writes, each exported graph, each quantizer, verify)
and kills itself with SIGKILL at the k-th: a real kill at a known point, so the test does not
depend on timing. One uncut run first lists the steps; the kill points are spread over them."""

import json
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

DRIVER = r"""
import json, os, shutil, signal, sys
plan = json.loads(sys.argv[1])
steps = []

def hook(owner, name, label):
    real = getattr(owner, name)
    def counted(*args, **kwargs):
        steps.append(label)
        if len(steps) == plan["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(owner, name, counted)

import edgelmm.bundle, edgelmm.calib.quantize, edgelmm.verify
for name in ("replace", "rename", "unlink"):
    hook(os, name, "os." + name)
hook(shutil, "rmtree", "rmtree")
hook(shutil, "copy2", "copy2")
import tempfile
hook(tempfile, "mkdtemp", "mkdtemp")
hook(edgelmm.bundle, "write_manifest", "write_manifest")
for name in ("quantize_vision_int8", "quantize_decoder_int4", "quantize_decoder_int8_dynamic"):
    hook(edgelmm.calib.quantize, name, name)
hook(edgelmm.verify, "verify", "verify")
if plan["job"] == "export":
    import edgelmm.export.onnx
    hook(edgelmm.export.onnx, "_export_one", "export graph")
    from edgelmm.export import export
    export(plan["model"], plan["out"], quiet=True)
else:
    from edgelmm.calib import CalibrationOptions, calibrate
    calibrate(plan["out"], plan["precisions"], CalibrationOptions(calib_samples=6, eval_samples=0, seed=plan["seed"]),
              overwrite=plan["overwrite"])
with open(plan["log"], "w") as f:
    json.dump(steps, f)
"""


def _run(tmp_path, kill_at: int = -1, **plan) -> tuple[int, list[str]]:
    log = tmp_path / "steps.json"
    log.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps({**plan, "kill_at": kill_at, "log": str(log)})],
                       capture_output=True, text=True, timeout=900)
    if kill_at < 0:
        assert r.returncode == 0, r.stderr[-3000:]
        return 0, json.loads(log.read_text())
    assert r.returncode == -signal.SIGKILL, (kill_at, r.returncode, r.stderr[-3000:])
    return r.returncode, []


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


@pytest.mark.parametrize("overwrite", [False, True], ids=["calibrate", "calibrate-overwrite"])
def test_calibrate_killed_at_ten_points(reference_bundle, tmp_path, overwrite):
    base = tmp_path / "base"
    shutil.copytree(reference_bundle, base)
    plan = dict(job="calibrate", precisions=["int8-vision+int4"], overwrite=overwrite, seed=0)
    if overwrite:  # the bundle already has the precision; the killed runs recalibrate it with another seed
        _run(tmp_path, out=str(base), **plan)
        plan["seed"] = 1
    before = _answers(base)
    before_gen = json.loads((base / MANIFEST).read_text()).get("generation", 0)
    done = tmp_path / "done"
    shutil.copytree(base, done)
    _, steps = _run(tmp_path, out=str(done), **plan)
    after = _answers(done)
    assert after.keys() == {"fp32", "int8-vision+int4"} and after["fp32"] == before["fp32"]
    assert "os.replace" in steps and "quantize_vision_int8" in steps

    for k in _kill_points(steps):
        target = tmp_path / f"killed-{k}"
        shutil.copytree(base, target)
        _run(tmp_path, kill_at=k, out=str(target), **plan)
        gen = json.loads((target / MANIFEST).read_text()).get("generation", 0)
        expected = before if gen == before_gen else after
        assert gen in (before_gen, before_gen + 1), (k, steps[k - 1], gen)
        assert _answers(target) == expected, (k, steps[k - 1])
    # The next run on a killed target finishes or discards what the killed one left.
    _run(tmp_path, out=str(target), **{**plan, "overwrite": True})
    assert _answers(target) == after and _leftovers(target) == []


def test_export_killed_at_ten_points(checkpoint, tmp_path):
    model = checkpoint("llava-siglip")
    done = tmp_path / "done" / "bundle"
    _, steps = _run(tmp_path, job="export", model=str(model), out=str(done))
    expected = _answers(done)
    assert steps.count("export graph") == 3 and "verify" in steps
    for k in _kill_points(steps):
        target = tmp_path / f"killed-{k}" / "bundle"
        _run(tmp_path, kill_at=k, job="export", model=str(model), out=str(target))
        if target.exists():
            assert _answers(target) == expected, (k, steps[k - 1])
    # A killed export leaves only a hidden work folder beside the target; the next export removes it.
    parent = target.parent
    assert [p.name for p in parent.iterdir() if not p.name.startswith(".")] in ([], ["bundle"])
    shutil.rmtree(target, ignore_errors=True)
    _run(tmp_path, job="export", model=str(model), out=str(target))
    assert sorted(p.name for p in parent.iterdir()) == ["bundle"]
    assert _answers(target) == expected
