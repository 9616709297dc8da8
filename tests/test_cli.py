"""The CLI, run in-process (typer's runner: the commands' own code, without a new interpreter's
seconds of imports per call), and once as `python -m edgelmm` to check the entry point."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

from PIL import Image
from typer.testing import CliRunner

from edgelmm.cli import app
from edgelmm.testing import sample_images


def cli(*args):
    """(returncode, stdout, stderr) of one command; a traceback would fail here."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def test_run_json_matches_python_api(checkpoint, pipelines, tmp_path):
    paths = []
    for i, arr in enumerate(sample_images(2)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    r = cli("run", checkpoint("idefics2"), "-p", "Compare <image> and <image>", "-i", paths[0], "-i", paths[1],
            "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    api = pipelines("idefics2").generate("Compare <image> and <image>", [str(p) for p in paths], max_new_tokens=8)
    assert out["token_ids"] == api.token_ids and out["answer"] == api.text
    assert out["timings_ms"]["prefill_ms"] > 0 and out["backend"]["backend"] == "torch"


def test_run_streams_text(checkpoint, tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(sample_images(1)[0]).save(p)
    r = cli("run", checkpoint("llava-clip"), "-p", "What is in <image>?", "-i", p, "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout.strip()) > 0


def test_run_bad_input_is_a_clear_error(checkpoint, tmp_path):
    r = cli("run", checkpoint("llava-siglip"), "-p", "two <image> <image>", "-i", tmp_path / "missing.png")
    assert r.returncode == 2
    assert "PromptError" in r.stderr and "2 <image> marker(s) but 1 image(s)" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("run", checkpoint("llava-siglip"), "-p", "one <image>", "-i", tmp_path / "missing.png", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "ImageError"


def test_info_json(checkpoint):
    r = cli("info", checkpoint("llava-clip"), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["family"] == "llava" and data["prompt_style"] == "mantis"
    assert all(row["tokens"] == 16 for row in data["image_tokens"])  # 4x4 patches, CLS dropped


def test_every_command_has_help():
    commands = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert {"run", "export", "verify", "eval", "calibrate", "bench", "watch", "serve", "demo-images"} <= set(commands)
    for cmd in commands:
        r = cli(cmd, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, cmd
    r = subprocess.run([sys.executable, "-m", "edgelmm", "run", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert r.returncode == 0 and "--precision" in r.stdout   # the installed entry point


def test_eval_json_on_the_reference_model():
    r = cli("eval", "--samples", "9", "--backend", "torch", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["samples"] == 9 and len(out["tasks"]) == 9 and 0.0 <= out["accuracy"] <= 1.0
    assert set(out["skills"]) == {"co-reference", "comparison", "reasoning", "temporal", "anomaly", "in-context"}
    assert out["backend"]["backend"] == "torch"


def test_eval_on_a_missing_model_is_a_clear_error(tmp_path):
    r = cli("eval", tmp_path / "nothing-here", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "CheckpointError"
