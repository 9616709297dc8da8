"""The memory budget (--max-memory): sizes parsed, parameters counted from safetensors headers, steps
that cannot fit refused before any work with what would fit; verify's reference run kept as answers
so several candidates share one pass; progress lines where no terminal shows a live status."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from edgelmm.errors import MemoryBudgetError, OptionError  # noqa: E402
from edgelmm.memory import GiB, checkpoint_parameters, kv_cache_bytes, parse_size  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgelmm", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.mark.parametrize("text,expected", [("12G", 12 * GiB), ("12GiB", 12 * GiB), ("1.5GB", 1_500_000_000),
                                           ("800M", 800 * 1024 ** 2), ("4096", 4096), (" 2 g ", 2 * GiB),
                                           ("auto", None), (None, None)])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12X", "-1G", "0", "1e9", "G", "12 G B", "nan"])
def test_bad_sizes_name_the_option(text):
    with pytest.raises(OptionError, match="--max-memory"):
        parse_size(text)


def test_parameters_counted_from_headers_match_the_model(checkpoint, pipelines):
    model = pipelines("llava-siglip").backend.model
    # save_pretrained writes a tied weight once: count the distinct storages, as the file does.
    distinct = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    assert checkpoint_parameters(checkpoint("llava-siglip")) == sum(distinct.values())


def test_damaged_safetensors_header_is_a_checkpoint_error(tmp_path):
    from edgelmm.errors import CheckpointError

    (tmp_path / "model.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint_parameters(tmp_path)


def test_kv_cache_size():
    # Llama-3.2-1B: 16 layers x 8 KV heads x 64 x 131072 positions x f16 = 4 GiB, the 4.3 GB.
    text = {"num_layers": 16, "num_kv_heads": 8, "head_dim": 64}
    assert kv_cache_bytes(text, 131072) == 4 * GiB
    assert kv_cache_bytes(text, 8192) == GiB // 4


def test_export_over_budget_is_refused_before_any_work(checkpoint, tmp_path):
    from edgelmm.export import export

    out = tmp_path / "bundle"
    with pytest.raises(MemoryBudgetError, match=r"loading the fp32 PyTorch model needs ~\d+\.\d+ GB but the budget "
                                                r"is 0\.10 GB \(--max-memory\)"):
        export(checkpoint("llava-siglip"), out, max_memory=100 * 1024 ** 2, quiet=True)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_names_the_step_over_budget(checkpoint, bundle, tmp_path):
    r = cli("export", checkpoint("llava-siglip"), tmp_path / "b", "--max-memory", "50M", "--json")
    err = json.loads(r.stdout)
    assert r.returncode == 2 and err["error"] == "MemoryBudgetError" and "fp32 PyTorch model" in err["message"]
    r = cli("export", checkpoint("llava-siglip"), tmp_path / "b", "--max-memory", "lots")
    assert r.returncode == 2 and "--max-memory" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", bundle("llava-siglip"), "-p", "<image>", "--image", "x.png", "--max-memory", "1M", "--json")
    err = json.loads(r.stdout)
    assert r.returncode == 2 and err["error"] == "MemoryBudgetError" and "fp32 onnx artifact set" in err["message"]


def test_load_over_budget_names_the_smaller_sets(bundle, tmp_path):
    import edgelmm
    from edgelmm.bundle import open_bundle
    from edgelmm.memory import RUNTIME_BASE, artifact_set_bytes

    path = bundle("llava-siglip")
    manifest = open_bundle(path).manifest
    fp32 = artifact_set_bytes(manifest, "onnx", "fp32")
    # what one runtime loads: of the two decoder layouts, one
    assert fp32 == sum(f["size"] for a in manifest["artifacts"] for f in a["files"]
                       if a["precision"] == "fp32" and a["graph"] != "decoder_fused") > 0
    with pytest.raises(MemoryBudgetError, match="loading llava-siglip: the fp32 onnx artifact set needs"):
        edgelmm.load(path, backend="onnxruntime", provider="cpu", max_memory=RUNTIME_BASE)
    # Enough for the artifacts: loads and answers.
    pipe = edgelmm.load(path, backend="onnxruntime", provider="cpu", max_memory=RUNTIME_BASE + 10 * fp32)
    assert pipe.backend.precision == "fp32"


def test_calibration_over_budget_is_refused_before_any_work(bundle, tmp_path):
    import shutil

    from edgelmm.bundle import open_bundle
    from edgelmm.calib import QUANTIZED_PRECISIONS, calibrate
    from edgelmm.memory import RUNTIME_BASE, artifact_set_bytes, calibrate_steps

    path = tmp_path / "b"
    shutil.copytree(bundle("llava-siglip"), path)
    before = (path / "edgelmm.json").read_bytes()
    manifest = open_bundle(path).manifest
    steps = calibrate_steps(manifest, ["int8-vision+int4"], QUANTIZED_PRECISIONS)
    assert [s.name for s in steps] == ["the fp32 ONNX Runtime reference", "the INT4 decoder quantizer",
                                       "the INT8 vision quantizer", "measuring int8-vision+int4 against fp32"]
    fp32 = artifact_set_bytes(manifest, "onnx", "fp32")
    assert steps[0].need > fp32 > steps[-1].need - RUNTIME_BASE  # the quantized set is smaller than fp32
    # Just under the largest step: refused before any work, naming the first step over the budget.
    budget = max(s.need for s in steps) - 1
    first = next(s for s in steps if s.need > budget)
    with pytest.raises(MemoryBudgetError) as refused:
        calibrate(path, ["int8-vision+int4"], max_memory=budget)
    assert str(refused.value).startswith(f"calibrating b: {first.name} needs ~") and first.hint in str(refused.value)
    files = sorted(p.name for p in path.iterdir() if p.name != ".edgelmm.lock")  # the writers' lock stays
    assert (path / "edgelmm.json").read_bytes() == before and files == sorted(p.name for p in bundle("llava-siglip").iterdir())
    r = cli("calibrate", path, "--precision", "int4", "--max-memory", "10M", "--json")
    err = json.loads(r.stdout)
    assert r.returncode == 2 and err["error"] == "MemoryBudgetError" and "fp32 ONNX Runtime reference" in err["message"]
    r = cli("calibrate", path, "--precision", "int4", "--calib-tiles", "0")
    assert r.returncode == 2 and "calib_tiles" in r.stderr and "Traceback" not in r.stderr


def test_one_reference_run_serves_several_candidates(bundle, pipelines):
    import edgelmm
    from edgelmm.verify import reference_run, verify

    reference = pipelines("idefics3")
    candidate = edgelmm.load(bundle("idefics3"), backend="onnxruntime", provider="cpu")
    answers = reference_run(reference, max_new_tokens=8)
    shared, direct = verify(candidate, answers, max_new_tokens=8), verify(candidate, reference, max_new_tokens=8)
    assert shared["passed"] and direct["passed"]
    for key, value in direct["summary"].items():
        assert shared["summary"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # The kept prefill logits are the ones a separate prefill gives, and the tokens those of stream_tokens.
    from edgelmm.pipeline import SamplingParams

    case = answers.cases[0]
    tokens = list(reference.stream_tokens(case.prepared, SamplingParams(max_new_tokens=8), features=case.features))
    assert case.tokens == tokens and len(tokens) > 0
    n = case.embeds.shape[1]
    again = reference.backend.decode(case.embeds, np.ones((1, n), np.int64), np.arange(n)[None],
                                     reference.backend.new_cache(1))
    assert np.abs(again - case.logits).max() < 1e-5
    with pytest.raises(ValueError, match="generated 8 tokens, not 16"):
        verify(candidate, answers, max_new_tokens=16)


def test_verify_bounds_its_tiles_and_names_the_cases_left_out(bundle, pipelines, monkeypatch):
    """SmolVLM's processor makes 9-17 tiles of every image: the verify prompts run while their tiles
    stay within VERIFY_TILES (the one- and two-image cases always), and the report names the rest."""
    import edgelmm
    from edgelmm import verify as verify_module

    monkeypatch.setattr(verify_module, "VERIFY_TILES", 10)
    candidate = edgelmm.load(bundle("idefics3"), backend="onnxruntime", provider="cpu")
    answers = verify_module.reference_run(pipelines("idefics3"), max_new_tokens=4)
    report = verify_module.verify(candidate, answers, max_new_tokens=4)
    assert [c["case"] for c in report["cases"]] == ["1-image", "2-images"]
    assert report["skipped_cases"] == [{"case": "3-images", "reason": "tile budget: 13 tiles verified, at most 10"}]
    assert report["passed"] and all(c["pixels_equal"] for c in report["cases"])
    # The reference keeps a digest of its tiles, not the tiles.
    assert all(len(c.prepared.vision.pixel_values) == 0 for c in answers.cases)


@pytest.mark.parametrize("config,chunk", [
    ({"image_size": 512, "patch_size": 16, "num_attention_heads": 12}, 1),   # SmolVLM: 1024 patches
    ({"image_size": 384, "patch_size": 14, "num_attention_heads": 16}, 1),   # SigLIP-so400m: 729
    ({"image_size": 224, "patch_size": 14, "num_attention_heads": 16}, 4),   # CLIP-L/14 at 224: 257
    ({"image_size": 32, "patch_size": 8, "num_attention_heads": 2}, 4),      # the tiny test towers
    ({}, 4), ({"image_size": "x", "patch_size": 0}, 4), (["not", "a", "dict"], 4),
])
def test_vision_chunk_keeps_attention_scores_bounded(config, chunk):
    from edgelmm.runtimes.onnxruntime import VISION_SCORES_BYTES, vision_chunk_for

    assert vision_chunk_for(config) == chunk
    if isinstance(config, dict) and config.get("num_attention_heads") and chunk > 1:
        patches = (config["image_size"] // config["patch_size"]) ** 2 + 1
        assert chunk * config["num_attention_heads"] * patches ** 2 * 4 <= VISION_SCORES_BYTES
