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
    with pytest.raises(ImageError, match=r"image 1 '.*bomb\.png': refused as a decompression bomb"):
        load_image(bomb, index=0)
    with pytest.raises(ImageError, match=r"image 2 '.*': is a directory, not an image file"):
        load_image(tmp_path, index=1)
    with pytest.raises(ImageError, match=r"image 3 '.*x{300}.*': cannot open \(File name too long\)"):
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


def test_threads_from_the_environment(reference_gguf_bundle, monkeypatch):
    # EDGELMM_THREADS is every backend's default (the suite itself runs with 1); an asked number wins.
    monkeypatch.setenv("EDGELMM_THREADS", "2")
    for backend in ("onnxruntime", "llamacpp"):
        assert edgelmm.load(reference_gguf_bundle, backend=backend).describe()["threads"] == 2, backend
        assert edgelmm.load(reference_gguf_bundle, backend=backend, threads=1).describe()["threads"] == 1, backend
    for bad in ("two", "0", "-1", "100000"):
        monkeypatch.setenv("EDGELMM_THREADS", bad)
        with pytest.raises(OptionError, match="EDGELMM_THREADS"):
            edgelmm.load(reference_gguf_bundle, backend="onnxruntime")


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
    # calibrate: the bundle does not exist, so opening it would be a BundleError; the same flags
    err = cli_json_error("calibrate", tmp_path / "no-bundle", "--precision", "int4", *args)
    assert err["error"] == error and re.search(pattern, err["message"]), err


def test_calibrate_samples_flag_names_its_new_spelling(tmp_path):
    """--samples was calibrate's source while eval's --samples is a count: the source is --calib on
    export and calibrate alike, and the old spelling says so instead of reading a path as a count."""
    err = cli_json_error("calibrate", tmp_path / "no-bundle", "--samples", "frames/")
    assert err["error"] == "OptionError" and "is now --calib frames/" in err["message"], err


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
        CalibrationOptions(source=str(tmp_path / "notes.txt")).validate()
    with pytest.raises(CalibrationError, match="not a folder"):
        CalibrationOptions(source=f"folder:{tmp_path / 'notes.txt'}").validate()
    with pytest.raises(CalibrationError, match="File name too long"):
        CalibrationOptions(source=str(tmp_path / LONG)).validate()


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


# ---- 5. fuzz findings (benchmarks/fuzz.py --replay KIND/NAME:SEED) ----

def test_negative_calibration_seed_refused_before_any_work(weightless, tmp_path):
    # option/calibrate--seed:2294362797 ran calibration for minutes
    from edgelmm.calib import CalibrationOptions

    err = cli_json_error("calibrate", tmp_path / "no-bundle", "--seed", "-1")
    assert err["error"] == "CalibrationOptionError" and re.search(r"seed \(--seed\) must be >= 0, got -1",
                                                                   err["message"]), err
    err = cli_json_error("export", weightless, tmp_path / "out", "--precision", "int4", "--seed", "-1")
    assert err["error"] == "CalibrationOptionError" and "--seed" in err["message"], err
    with pytest.raises(CalibrationOptionError, match=r"--seed\) must be >= 0"):
        CalibrationOptions(seed=-5).validate()


@pytest.mark.parametrize("value,pattern", [("inf", "must be a finite number, got inf"),
                                           ("nan", "must be a finite number, got nan"),
                                           ("0", r"must be in \(0"), ("-1", r"must be in \(0")])
def test_demo_video_fps_must_be_finite_and_positive(tmp_path, value, pattern):
    # option/demo-video--fps:3239029312: an inf frame rate spun in OpenCV's writer forever
    out = tmp_path / "sub" / "v.avi"
    err = cli_json_error("demo-video", out, "--frames", "4", "--at", "2", "--scale", "1", "--fps", value)
    assert err["error"] == "OptionError" and re.match(r"--fps \(fps\) " + pattern, err["message"]), err
    assert not out.parent.exists()   # refused before anything was written


def test_demo_video_scale_bounded(tmp_path):
    # option/demo-video--scale:1164685595: a MemoryError asking for 596 TiB
    from edgelmm import synthetic

    err = cli_json_error("demo-video", tmp_path / "v.avi", "--scale", "100000")
    assert err["error"] == "OptionError" and re.match(r"--scale \(scale\) must be at most 64 .*got 100000",
                                                      err["message"]), err
    for scale in ("0", "-1"):
        assert cli_json_error("demo-video", tmp_path / "v.avi", "--scale", scale)["message"].startswith("--scale")
    with pytest.raises(OptionError, match=r"image size must be in \[1, 4096\], got 100000"):
        synthetic.render([], synthetic.Background((128, 128, 128), (0.0, 0.0), 3.0), np.random.default_rng(0),
                         size=100000)


def test_demo_video_at_is_named_as_typed(tmp_path):
    # option/demo-video--at:3474825488 said anomaly_frame, not --at
    for at in ("-5", "100000"):
        err = cli_json_error("demo-video", tmp_path / "v.avi", "--frames", "8", "--at", at)
        assert err["error"] == "OptionError" and re.match(rf"--at: anomaly_frame must be within 1\.\.7, got {at}",
                                                          err["message"]), err


def _watch_args(tmp_path, *extra):
    """`watch` on a source and a bundle that do not exist: an error other than the one under test
    would mean the check ran after the bundle loaded or the source opened."""
    return ["watch", str(tmp_path / "no-video.avi"), "--bundle", str(tmp_path / "no-bundle"), "--max-frames", "1",
            *extra]


def _regular_file(tmp_path):
    f = tmp_path / "regular"
    f.write_text("x")
    return f


@pytest.mark.parametrize("where", ["under a file", "in /proc", "a folder"])
def test_watch_events_file_that_cannot_be_written(tmp_path, where):
    # option/watch--events:3367969787 (NotADirectoryError), option/watch--events:3674495662 (FileNotFoundError)
    from edgelmm.apps.anomaly import check_events

    path = {"under a file": _regular_file(tmp_path) / "sub" / "events.jsonl", "in /proc": "/proc/fuzz-out.jsonl",
            "a folder": tmp_path}[where]
    err = cli_json_error(*_watch_args(tmp_path, "--events", path))
    pattern = r"events file --events \(events\) '.*'(: cannot be written| is a folder)"
    assert err["error"] == "OptionError" and re.match(pattern, err["message"]), err
    assert str(path) in err["message"]
    with pytest.raises(OptionError, match="--events"):
        check_events(path)
    ok = tmp_path / "new" / "events.jsonl"
    check_events(ok)
    assert not (tmp_path / "new").exists()   # the probe leaves nothing behind


@pytest.mark.parametrize("where", ["under a file", "in /proc", "a file"])
def test_watch_snapshot_folder_that_cannot_be_made(tmp_path, where):
    # option/watch--out:2817857884 exited 0: snapshots failed later, in the verifier thread
    from edgelmm.apps.anomaly import WatchConfig

    path = {"under a file": _regular_file(tmp_path) / "sub" / "snaps", "in /proc": "/proc/fuzz-out",
            "a file": _regular_file(tmp_path)}[where]
    err = cli_json_error(*_watch_args(tmp_path, "--out", path))
    assert err["error"] == "OptionError" and re.match(r"snapshot folder --out \(out_dir\) '.*'", err["message"]), err
    ok = tmp_path / "a" / "snaps"
    WatchConfig(out_dir=ok).validate()
    assert not (tmp_path / "a").exists()   # probed, then removed again


@pytest.mark.parametrize("prompt,pattern", [("{bogus}", r"unknown placeholder \{bogus\}"),
                                            ("{last", "not a valid template"), ("{}", r"unknown placeholder \{\}"),
                                            ("images 2-{last:s}", "cannot be filled in")])
def test_watch_prompt_placeholders(tmp_path, prompt, pattern):
    # option/watch--prompt:1802903493: '{bogus}' reached the model as typed (and --no-verify hid it)
    from edgelmm.apps.anomaly import WatchConfig

    err = cli_json_error(*_watch_args(tmp_path, "--no-verify", "--prompt", prompt))
    assert err["error"] == "PromptError" and err["message"].startswith("the verifier prompt (--prompt)") \
        and re.search(pattern, err["message"]), err
    with pytest.raises(PromptError, match=pattern):
        WatchConfig(prompt=prompt, verify=False).validate()
    good = WatchConfig(prompt="images 2-{last} ({latest} latest) {{braces}}?", latest_frames=3)
    good.validate()
    assert good.verifier_prompt() == "<image>" * 4 + "images 2-4 (3 latest) {braces}?"


@pytest.mark.parametrize("value,error,pattern", [("", "OptionError", "--backends is empty"),
                                                 (" , ", "OptionError", "--backends has an empty"),
                                                 ("onnxruntime,", "OptionError", "--backends has an empty"),
                                                 ("foo", "BackendUnavailable", r"unknown backend\(s\) \['foo'\]")])
def test_bench_backends_empty_or_unknown(tmp_path, value, error, pattern):
    # option/bench--backends:4066929578: '' meant every backend, exit 0
    err = cli_json_error("bench", tmp_path / "no-bundle", "--backends", value)   # refused before the bundle opens
    assert err["error"] == error and re.search(pattern, err["message"]), err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_verify_max_new_tokens_below_one(tmp_path, value):
    # option/verify--max-new-tokens:648639589: -1 and 0 verified nothing and exited 0
    err = cli_json_error("verify", tmp_path / "no-bundle", "-r", tmp_path / "no-model", "--max-new-tokens", value)
    assert err["error"] == "OptionError" and "--max-new-tokens" in err["message"], err


def test_message_roles_and_text_parts():
    # prompt/types:2120395274 (role 1 accepted), prompt/types:3999960623 (text part without text accepted)
    from edgelmm.prompt import parse_prompt

    for role in (1, None, "", " "):
        with pytest.raises(PromptError, match=r"message 0: 'role' must be a non-empty string"):
            parse_prompt([{"role": role, "content": "hi"}])
    with pytest.raises(PromptError, match=r"message 1 part 0: a text part needs a string 'text', and it has none"):
        parse_prompt([{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(PromptError, match=r"message 0 part 1: a text part needs a string 'text', got 5 \(int\)"):
        parse_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": 5}]}])
    # roles the template may or may not know are the template's to judge
    parsed = parse_prompt([{"role": "system", "content": [{"type": "text", "text": "x"}]}])
    assert parsed.messages[0]["role"] == "system"


def test_generate_batch_requests_must_be_pairs(pipelines):
    # prompt/batch:3385674489: ValueError (too many values to unpack)
    pipe = pipelines("llava-siglip")
    for requests, pattern in [(["hi"], r"request 0 must be a \(prompt, images\) pair, got str"),
                              ([("hi", None), ("hi", None, "x")], r"request 1 must be a \(prompt, images\) pair, "
                                                                    r"got tuple of 3"),
                              ("hi", "requests must be a list of"), (5, "requests must be a list of")]:
        with pytest.raises(PromptError, match=pattern):
            pipe.generate_batch(requests, max_new_tokens=1)


def test_gate_and_capture_configs_refuse_nan_from_python():
    from edgelmm.apps.capture import CaptureConfig
    from edgelmm.apps.gate import GateConfig

    for kw, name in [(dict(margin=math.nan), "margin"), (dict(min_threshold=math.nan), "min_threshold"),
                     (dict(threshold=math.inf), "threshold"), (dict(warmup_frames=2.5), "warmup_frames"),
                     (dict(trigger_frames=0), "trigger_frames")]:
        with pytest.raises(OptionError, match=rf"^{name} must be"):
            GateConfig(**kw).validate()
    for kw, name in [(dict(reconnect_backoff_s=math.nan), "reconnect_backoff_s"),
                     (dict(timeout_s=math.inf), "timeout_s"), (dict(queue_size=0), "queue_size"),
                     (dict(reconnect_attempts=-1), "reconnect_attempts")]:
        with pytest.raises(OptionError, match=rf"^{name} must be"):
            CaptureConfig(**kw).validate()
