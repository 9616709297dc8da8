"""Bad options and bad files end in a typed error that names the culprit, before any work starts.

Where a check must run before the weights load, the checkpoint or bundle given is one whose weights
are missing (or a path that does not exist): any other error than the expected one would mean the
check ran too late."""

import json
import math
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import edgelmm
from edgelmm.cli import app
from edgelmm.errors import (BundleError, CalibrationError, CalibrationOptionError, CheckpointError, ImageError,
                            OptionError, PromptError)
from edgelmm.images import load_image
from edgelmm.options import MAX_THREADS
from edgelmm.testing import sample_images

LONG = "x" * 300  # one path component over the usual 255-character limit (ENAMETOOLONG)


def cli(*args):
    """Run the CLI in-process; returns (exit code, stdout)."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no traceback
    return r.exit_code, r.stdout


def cli_json_error(*args) -> dict:
    """The one JSON object a failing command prints on stdout with --json (exit status 2)."""
    code, out = cli(*args, "--json")
    assert code == 2, out
    return json.loads(out)


@pytest.fixture
def weightless(checkpoint, tmp_path):
    """A copy of a tiny checkpoint with its weights deleted: loading it fails, so an error other
    than the one under test means the check came after the weights were reached."""
    d = tmp_path / "weightless"
    shutil.copytree(checkpoint("llava-siglip"), d)
    for w in [*d.glob("*.safetensors"), *d.glob("*.bin")]:
        w.unlink()
    return d


# ---- 1. files that used to raise untyped errors ----

@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "chat_template.jinja"])
def test_non_utf8_checkpoint_file(checkpoint, tmp_path, name):
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llava-siglip"), d)
    (d / name).write_bytes(b'{"model_type": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=re.escape(name)):
        edgelmm.info(d)
    err = cli_json_error("info", d)
    assert err["error"] == "CheckpointError" and name in err["message"]


def _png_header(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (a few bytes of data: PIL checks the
    size when it opens the file, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_image_files_that_are_not_images(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(50000, 50000))
    assert Image.MAX_IMAGE_PIXELS  # PIL's bomb protection stays on
    with pytest.raises(ImageError, match=r"image 0 '.*bomb\.png': refused as a decompression bomb"):
        load_image(bomb, index=0)
    with pytest.raises(ImageError, match=r"image 1 '.*': is a directory"):
        load_image(tmp_path, index=1)
    with pytest.raises(ImageError, match=r"image 2 '.*x{300}.*': cannot open \(File name too long\)"):
        load_image(tmp_path / f"{LONG}.png", index=2)


def test_over_long_model_path(tmp_path):
    with pytest.raises(CheckpointError, match="File name too long"):
        edgelmm.load(tmp_path / LONG)
    assert cli_json_error("info", tmp_path / LONG)["error"] == "CheckpointError"


@pytest.mark.parametrize("option,value", [("--temperature", "nan"), ("--temperature", "inf"),
                                          ("--top-p", "nan"), ("--seed", "-1"), ("--max-new-tokens", "0")])
def test_sampling_options_refused_before_the_model_loads(tmp_path, option, value):
    err = cli_json_error("run", tmp_path / "no-model", "-p", "hi", option, value)
    name = option.lstrip("-").replace("-", "_")
    assert err["error"] == "PromptError" and err["message"].startswith(name), err


def test_sampling_arguments_of_the_python_api(pipelines):
    pipe = pipelines("llava-siglip")
    for kw, pattern in [(dict(max_new_tokens=2.5), r"max_new_tokens must be an integer, got 2\.5"),
                        (dict(max_new_tokens=True), "max_new_tokens must be an integer, got True"),
                        (dict(seed=1.5), "seed must be an integer"), (dict(seed=-3), "seed must be >= 0"),
                        (dict(temperature=math.nan), "temperature must be a finite number"),
                        (dict(top_p=math.nan), "top_p must be a finite number")]:
        kw = {"max_new_tokens": 2, **kw}
        with pytest.raises(PromptError, match=pattern):
            pipe.generate("hi", **kw)
        with pytest.raises(PromptError, match=pattern):
            pipe.generate_batch([("hi", None)], **kw)
    assert pipe.generate("hi", max_new_tokens=np.int64(2), seed=np.int64(3)).token_ids  # numpy ints are ints


def test_prompt_text_that_is_not_unicode(pipelines):
    pipe = pipelines("llava-siglip")
    img = sample_images(1)[0]
    with pytest.raises(PromptError, match=r"prompt: character 4 \('\\ud800'\) is not valid Unicode"):
        pipe.generate("abc \ud800 <image>", [img], max_new_tokens=2)
    with pytest.raises(PromptError, match=r"message 0 part 1: character 0 \('\\udcff'\)"):
        pipe.generate([{"role": "user", "content": [{"type": "image", "image": img},
                                                    {"type": "text", "text": "\udcff?"}]}], max_new_tokens=2)
    with pytest.raises(PromptError, match=r"prompt: byte 2 \(b'\\xff'\) is not valid UTF-8"):
        pipe.generate(b"hi\xff <image>", [img], max_new_tokens=2)
    # valid UTF-8 bytes are a prompt like any other
    assert pipe.generate("hé <image>".encode(), [img], max_new_tokens=2).token_ids == \
        pipe.generate("hé <image>", [img], max_new_tokens=2).token_ids


# ---- 2. options that used to be accepted ----

@pytest.mark.parametrize("threads", [-3, 0, 100000])
def test_threads_out_of_range(tmp_path, checkpoint, threads):
    with pytest.raises(OptionError, match=r"threads must be"):
        edgelmm.load(checkpoint("llava-siglip"), threads=threads)
    for command in (["run", tmp_path / "no-model", "-p", "hi"], ["eval", tmp_path / "no-model"],
                    ["bench", tmp_path / "no-bundle"],
                    ["watch", "0", "--bundle", tmp_path / "no-bundle", "--max-frames", "1"]):
        err = cli_json_error(*command, "--threads", threads)
        assert err["error"] == "OptionError" and "threads must be" in err["message"], (command, err)
    assert MAX_THREADS < 100000


def test_threads_must_be_an_int(checkpoint):
    with pytest.raises(OptionError, match="threads must be an integer, got 2.0"):
        edgelmm.load(checkpoint("llava-siglip"), threads=2.0)


@pytest.mark.parametrize("samples", ["0", "-5"])
def test_eval_needs_samples(tmp_path, samples):
    err = cli_json_error("eval", tmp_path / "no-model", "--samples", samples)
    assert err["error"] == "OptionError" and err["message"] == f"--samples must be >= 1, got {samples}"


@pytest.mark.parametrize("option,value,name", [("--threshold", "nan", "threshold"), ("--threshold", "-1", "threshold"),
                                               ("--margin", "nan", "margin"), ("--margin", "inf", "margin"),
                                               ("--margin", "0", "margin"), ("--min-threshold", "nan", "min_threshold"),
                                               ("--duration", "nan", "duration_s"),
                                               ("--reconnect-backoff", "inf", "reconnect_backoff_s")])
def test_watch_numbers_must_be_finite_and_in_range(tmp_path, option, value, name):
    err = cli_json_error("watch", "0", "--bundle", tmp_path / "no-bundle", option, value)
    assert err["error"] == "OptionError" and err["message"].startswith(f"{name} must be"), err


# ---- 3. checks that used to come after minutes of work ----

@pytest.mark.parametrize("args,error,pattern", [
    (["--calib", "/nonexistent/data.jsonl"], "CalibrationError",
     r"calibration source '/nonexistent/data.jsonl' does not exist"),
    (["--calib", "synthetic:nosuchsplit"], "CalibrationError", "the synthetic splits are"),
    (["--int4-algorithm", "foo"], "CalibrationOptionError",
     r"unknown INT4 algorithm \(--int4-algorithm\) 'foo'; choose from rtn"),
    (["--vision-method", "foo"], "CalibrationOptionError", r"--vision-method"),
    (["--block-size", "24"], "CalibrationOptionError", r"--block-size\) must be a power of two >= 16, got 24"),
    (["--block-size", "8"], "CalibrationOptionError", r"--block-size"),
    (["--block-size", "0"], "CalibrationOptionError", r"--block-size"),
    (["--calib-samples", "0"], "CalibrationOptionError", r"--calib-samples\) must be >= 1"),
    (["--max-accuracy-drop", "nan"], "CalibrationOptionError", r"--max-accuracy-drop\) must be a finite number"),
])
def test_calibration_options_refused_before_any_work(weightless, tmp_path, args, error, pattern):
    # export: the weights are missing, so reaching them would be a CheckpointError or worse
    err = cli_json_error("export", weightless, tmp_path / "out", "--precision", "int4", *args)
    assert err["error"] == error and re.search(pattern, err["message"]), err
    # calibrate: the bundle does not exist, so opening it would be a BundleError
    if args[0] == "--calib":
        args = ["--samples", *args[1:]]
    err = cli_json_error("calibrate", tmp_path / "no-bundle", "--precision", "int4", *args)
    assert err["error"] == error and re.search(pattern, err["message"]), err


def test_calibration_options_api(tmp_path):
    from edgelmm.calib import CalibrationOptions, calibrate

    with pytest.raises(CalibrationOptionError, match=r"INT4 block size \(--block-size\).*got 48"):
        calibrate(tmp_path / "no-bundle", ["int4"], CalibrationOptions(int4_block_size=48))
    assert issubclass(CalibrationOptionError, OptionError) and issubclass(CalibrationOptionError, CalibrationError)
    for bad, flag in [(dict(seed=1.0), "--seed"), (dict(image_root=str(tmp_path / "absent")), "--image-root"),
                      (dict(min_vision_cosine=math.nan), "--min-vision-cosine"),
                      (dict(eval_samples=-1), "--eval-samples"), (dict(int4_accuracy_level=7), "--accuracy-level"),
                      (dict(gate="no"), "gate")]:
        with pytest.raises(CalibrationOptionError, match=flag):
            CalibrationOptions(**bad).validate()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CalibrationError, match="not a known calibration source"):
        CalibrationOptions(samples=str(tmp_path / "notes.txt")).validate()
    with pytest.raises(CalibrationError, match="not a folder"):
        CalibrationOptions(samples=f"folder:{tmp_path / 'notes.txt'}").validate()
    with pytest.raises(CalibrationError, match="File name too long"):
        CalibrationOptions(samples=str(tmp_path / LONG)).validate()


def test_export_into_an_existing_folder_refused_before_loading(weightless, tmp_path):
    from edgelmm.export import export

    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        export(weightless, tmp_path / "out")
    err = cli_json_error("export", weightless, tmp_path / "out")
    assert err["error"] == "BundleError" and "already exists" in err["message"]


# ---- 4. click's usage errors honour --json ----

@pytest.mark.parametrize("args,pattern", [
    (["run", "-p", "hi"], r"(?i)missing argument 'model'"),
    (["run", "m", "-p", "hi", "--threads", "abc"], r"Invalid value for '--threads'.*integer"),
    (["run", "m", "-p", "hi", "--no-such-option"], r"No such option: --no-such-option"),
    (["no-such-command"], r"No such command 'no-such-command'"),
])
def test_usage_errors_are_json_with_json(args, pattern):
    err = cli_json_error(*args)
    assert err["error"] == "UsageError" and re.search(pattern, err["message"]), err
    code, out = cli(*args)  # without --json: click's own usage message, not JSON
    assert code == 2 and not out.strip().startswith("{")
