"""A newcomer's first hour (issue 28): a bundle given where a checkpoint is needed and the reverse,
--precision on every command that runs a bundle (and why auto took what it took), questions the
shipped model answers, and tables that keep their names whole at 80 columns."""

import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

import edgelmm
from edgelmm import synthetic
from edgelmm.cli import app
from edgelmm.errors import BundleError
from edgelmm.synthetic_video import VideoSpec, write_video
from edgelmm.testing import sample_images


def cli(*args, columns: int = 80):
    """The CLI in-process at a terminal width; (exit code, stdout)."""
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns), "NO_COLOR": "1"})
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout


def json_error(*args) -> dict:
    code, out = cli(*args, "--json")
    assert code == 2, out
    return json.loads(out)


def test_a_bundle_where_a_checkpoint_is_needed(bundle, tmp_path):
    b = bundle("llava-siglip")
    err = json_error("export", b, tmp_path / "out")
    assert err["error"] == "CheckpointError" and err["message"] == (
        f"{b}: this is an edgelmm bundle, but export needs the Hugging Face checkpoint directory it was exported "
        "from (config.json, the weights, the tokenizer)")
    assert not (tmp_path / "out").exists()
    err = json_error("verify", b, "--reference", b)
    assert err["error"] == "CheckpointError" and "but verify --reference needs the Hugging Face checkpoint" in err["message"]


def test_a_checkpoint_where_a_bundle_is_needed(checkpoint, tmp_path):
    ckpt = checkpoint("llava-siglip")
    hint = re.escape(f"{ckpt}: this is a Hugging Face checkpoint, not an edgelmm bundle (no edgelmm.json); make a "
                     f"bundle from it first: edgelmm export {ckpt} BUNDLE")
    video = write_video(tmp_path / "v.avi", VideoSpec(frames=4, anomaly="none", scale=1))["path"]
    for args in (["verify", ckpt, "-r", ckpt], ["calibrate", ckpt], ["bench", ckpt], ["build-engines", ckpt],
                 ["watch", video, "--bundle", ckpt]):
        err = json_error(*args)
        assert err["error"] == "BundleError" and re.fullmatch(hint, err["message"]), (args, err)
    from edgelmm.apps.anomaly import watch
    with pytest.raises(BundleError, match="not an edgelmm bundle"):   # not the PyTorch reference at 10x the cost
        watch(video, ckpt)


def test_precision_on_run_eval_and_watch(reference_bundle, tmp_path):
    from edgelmm.models import reference_model

    images = [str(tmp_path / f"{i}.png") for i in range(2)]
    for path, array in zip(images, sample_images(2, sizes=[(64, 64)] * 2)):
        Image.fromarray(array).save(path)
    code, out = cli("run", reference_bundle, "-p", "Compare <image> and <image>.", "-i", images[0], "-i", images[1],
                    "--precision", "fp32", "--max-new-tokens", "2", "--json")
    described = json.loads(out)["backend"]
    assert code == 0 and described["precision"] == "fp32" and described["precision_reason"] == "asked for"
    code, out = cli("run", reference_bundle, "-p", "<image>", "-i", images[0], "--max-new-tokens", "1", "--json")
    assert json.loads(out)["backend"]["precision_reason"] == (
        "auto: the first of int8-vision+int4, int4, int8, fp32 that this bundle has for the CPU")
    for command in (["run", reference_bundle, "-p", "<image>", "-i", images[0]], ["eval", reference_bundle],
                    ["watch", "0", "--bundle", reference_bundle]):
        err = json_error(*command, "--precision", "int4")
        assert err["error"] == "OptionError" and err["message"] == (
            "precision 'int4' is not in this bundle for backend 'onnxruntime'; it has fp32 (or 'auto')"), command
    err = json_error("eval", reference_model(), "--precision", "q4_k_m")
    assert err["error"] == "OptionError" and "a checkpoint runs on the PyTorch reference in fp32" in err["message"]
    code, out = cli("eval", reference_bundle, "--samples", "9", "--precision", "fp32", "--json")
    assert code == 0 and json.loads(out)["backend"]["precision_reason"] == "asked for"
    video = write_video(tmp_path / "v.avi", VideoSpec(frames=20, anomaly="none", scale=1))["path"]
    events = tmp_path / "events.jsonl"
    code, out = cli("watch", video, "--bundle", reference_bundle, "--precision", "fp32", "--no-verify", "--quiet",
                    "--events", events, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["read"] == 20
    assert summary["runtime"] == {"backend": "onnxruntime", "providers": ["CPUExecutionProvider"], "precision": "fp32",
                                  "precision_reason": "asked for", "decoder_layout": "fused"}


def test_verify_names_the_precisions_a_bundle_has(bundle, checkpoint):
    err = json_error("verify", bundle("llava-siglip"), "-r", checkpoint("llava-siglip"), "--precision", "int3")
    assert err["error"] == "BackendUnavailable" and "(it has onnxruntime: fp32); --precision takes one" in err["message"]


def test_demo_images_are_questions_the_shipped_model_answers(reference_bundle, tmp_path):
    """`edgelmm demo-images` writes one held-out question of each kind; the README's table of them
    (round 0) says the reference model answers 8 of 9 right, counting being the miss."""
    code, out = cli("demo-images", tmp_path, "--json")
    samples = json.loads(out)
    assert code == 0 and [s["task"] for s in samples] == [t.name for t in synthetic.TASKS]
    pipe = edgelmm.load(reference_bundle, threads=1)
    right = {}
    for s in samples:
        answer = pipe.generate(s["messages"], s["images"], max_new_tokens=16).text
        right[s["task"]] = synthetic.normalise_answer(answer) == synthetic.normalise_answer(s["answer"])
    assert [t for t, ok in right.items() if not ok] == ["count_all"], right
    code, text = cli("demo-images", tmp_path)
    first = samples[0]
    assert code == 0 and "colour_of (co-reference), expected answer: red" in text
    assert f"edgelmm run MODEL -p '{first['prompt']}' -i {first['images'][0]} -i {first['images'][1]}" in text
    assert "3 turns (solved examples, then the question)" in text


def test_tables_keep_names_whole_at_80_columns(capsys, monkeypatch):
    """A table too wide for the terminal becomes one block per row: no backend or precision name is cut."""
    from edgelmm import cli as cli_module

    monkeypatch.setenv("COLUMNS", "80")
    quality = {p: {"vision_cosine_min": 0.99871, "decoder_kl_max": 2.1e-4, "logits_kl_max": 3.2e-4,
                   "token_match_mean": 0.984, "accuracy": 0.931, "accuracy_fp32": 0.936, "size_bytes": 9.4e6,
                   "passed": p != "int8", "failures": ["vision feature cosine 0.976 < 0.99"] * (p == "int8")}
               for p in ("int8", "int4", "int8-vision+int4")}
    cli_module._print_quality(quality)
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in quality:
        assert re.search(rf"^{re.escape(name)}$", text, re.M), text
    assert "  gate: FAIL: vision feature cosine 0.976 < 0.99" in text
    cli_module._print_rows("narrow", ("precision", "MB"), [["int8-vision+int4", "9.4"]])
    narrow = capsys.readouterr().out
    assert "int8-vision+int4" in narrow and "│" in narrow   # it fits: still a table


@pytest.mark.parametrize("kind", ["llava-siglip", "idefics2", "idefics3"])
def test_the_pytorch_reference_warns_of_nothing(pipelines, kind):
    """transformers renamed past_key_values to cache: the old name warned on every decode step of
    every command that runs the reference (export, verify, run on a checkpoint)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipelines(kind).generate("What is in <image>?", sample_images(1), max_new_tokens=3).token_ids


def test_loading_a_checkpoint_draws_no_bar_of_transformers(checkpoint, capfd):
    """edgelmm's own line says "loading"; transformers' per-tensor bar wrote dozens of frames into
    an export's log. The setting is put back for the application around edgelmm."""
    import transformers

    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles
    from edgelmm.runtimes.torch import load_hf_model

    before = transformers.utils.logging.is_progress_bar_enabled()
    capfd.readouterr()
    load_hf_model(detect(ModelFiles.open(checkpoint("idefics3"))))
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled() == before
