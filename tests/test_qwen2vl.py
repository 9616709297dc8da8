"""The qwen2vl family (Qwen2-VL and Qwen2.5-VL) beyond the every-family parity tests: the vision
tower at its native resolution against the model's own, M-RoPE positions through batches, the ONNX
bundle and llama.cpp's GGUF pair, and what it refuses."""

import numpy as np
import pytest
import torch

import edgelmm
from edgelmm.errors import ExportError, ImageError
from edgelmm.families.qwen2vl import smart_resize
from edgelmm.images import sample_images

from .test_reference_parity import qwen_patches

QWEN_KINDS = ["qwen2vl", "qwen2.5vl"]
# Square, wide, tall, one over the pixel budget (shrunk), one under it (grown), and one whose token
# grid is not a multiple of Qwen2.5-VL's 2x2-token windows (partial windows at the edges).
SIZES = [(40, 40), (24, 72), (72, 24), (90, 80), (9, 12), (40, 56)]


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_vision_tower_matches_the_models_own(pipelines, kind):
    """Each image through edgelmm's tensor-only tower (one size at a time) against the model's
    get_image_features on the processor's flattened patches of all of them at once."""
    pipe = pipelines(kind)
    images = sample_images(len(SIZES), seed=5, sizes=SIZES)
    vision = pipe.family.preprocess(images)
    # every image its own size: (90, 80) shrinks to the budget (48 x 40), (9, 12) grows to it (16 x 24)
    assert [t.shape[-2:] for t in vision.pixel_values] == [(40, 40), (24, 72), (72, 24), (48, 40), (16, 24), (40, 56)]
    ours = pipe.image_features(vision).reshape(-1, 64)
    f = pipe.family
    patches, grid = qwen_patches(vision.pixel_values, f.patch, f.merge, f.temporal)
    with torch.no_grad():
        theirs = pipe.backend.model.model.get_image_features(torch.from_numpy(patches), torch.from_numpy(grid))
    theirs = torch.cat(list(theirs.pooler_output)).numpy()
    assert ours.shape == theirs.shape == (sum(r * c for r, c in vision.token_grids), 64)
    assert np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_images_of_one_size_share_a_vision_run_wherever_they_are(pipelines, kind):
    """In-context examples alternate sizes (A B A B): one vision run per size, not per change of size,
    the rows put back in prompt order, equal to each image run alone; the answer is unchanged."""
    pipe = pipelines(kind)
    a, b = sample_images(2, seed=11, sizes=[(40, 40), (24, 72)]), sample_images(2, seed=12, sizes=[(40, 40), (24, 72)])
    images = [a[0], a[1], b[0], b[1]]  # sizes A B A B
    vision = pipe.family.preprocess(images)
    alone = [pipe.image_features(pipe.family.preprocess([im])).reshape(-1, 64) for im in images]
    calls = []
    encode = pipe.backend.encode_images

    def counted(pixel_values, mask=None):
        calls.append(pixel_values.shape)
        return encode(pixel_values, mask)

    pipe.backend.encode_images = counted
    try:
        together = pipe.image_features(vision).reshape(-1, 64)
    finally:
        del pipe.backend.encode_images
    assert [c[0] for c in calls] == [2, 2] and {c[-2:] for c in calls} == {(40, 40), (24, 72)}
    assert together.shape == np.concatenate(alone).shape
    assert np.abs(together - np.concatenate(alone)).max() <= 1e-5


def test_smart_resize_is_the_processors():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (28, 28), (27, 29), (100, 3), *rng.integers(1, 4000, size=(200, 2)).tolist()]:
        if max(h, w) / min(h, w) > 200:
            continue
        for budget in [(56 * 56, 28 * 28 * 1280), (256, 2304), (3136, 12845056)]:
            assert smart_resize(h, w, 28, *budget) == hf_smart_resize(h, w, 28, *budget), (h, w, budget)


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_batched_rows_with_different_grids_match_each_alone(pipelines, bundle, kind):
    """Left-padded rows whose M-RoPE positions run ahead of their token counts by different amounts
    (one wide image, two tall ones, none): each row's tokens are the ones it gets alone, on the
    PyTorch reference and on the ONNX bundle, and the two agree."""
    requests = [("Describe <image>.", sample_images(1, seed=1, sizes=[(24, 72)])),
                ("Compare <image> and <image>.", sample_images(2, seed=2, sizes=[(72, 24), (40, 56)])),
                ("Count to five.", [])]
    for pipe in (pipelines(kind), edgelmm.load(bundle(kind), backend="onnxruntime", provider="cpu")):
        prepared = [pipe.prepare(p, imgs) for p, imgs in requests]
        # the text after an image continues from the grid's longer side, not from the token count
        ahead = [len(p.input_ids) - int(p.positions.max()) - 1 for p in prepared]
        assert ahead[0] > 0 and ahead[1] > 0 and ahead[2] == 0 and ahead[0] != ahead[1]
        together = pipe.generate_batch(requests, max_new_tokens=10)
        alone = [pipe.generate(p, imgs, max_new_tokens=10) for p, imgs in requests]
        assert [g.token_ids for g in together] == [g.token_ids for g in alone]
        if pipe.backend.name == "torch":
            want = [g.token_ids for g in alone]
        else:
            assert [g.token_ids for g in alone] == want


def test_the_onnx_decoder_takes_three_position_components(bundle):
    import onnx

    graph = onnx.load(str(bundle("qwen2vl") / "onnx" / "decoder.onnx"), load_external_data=False).graph
    shape = next(i for i in graph.input if i.name == "position_ids").type.tensor_type.shape
    assert [d.dim_value or d.dim_param for d in shape.dim][0] == 3 and len(shape.dim) == 3


def test_gguf_with_windows_llamacpp_cannot_take_is_refused_before_the_weights_load(checkpoint, tmp_path,
                                                                                    monkeypatch):
    """llama.cpp's qwen2.5vl_merger attends within 112-pixel windows: the tiny Qwen2.5-VL's 16-pixel
    windows are refused at once, naming both sizes."""
    import edgelmm.runtimes.torch as torch_backend
    from edgelmm.export import export

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(torch_backend, "load_hf_model", no_load)
    with pytest.raises(ExportError, match="112-pixel windows; this model's are 16 pixels"):
        export(checkpoint("qwen2.5vl"), tmp_path / "out", ["onnx", "gguf"], quiet=True)
    assert not (tmp_path / "out").exists()


# ---- llama.cpp: the qwen2vl text architecture with 4-component positions, the Qwen projectors ----
# Qwen2.5-VL with the released models' 112-pixel windows (14x14 tokens here): images over 112 pixels
# wide or tall span several windows.
GGUF_KINDS = ["qwen2vl", "qwen2.5vl-w112"]
GGUF_SIZES = {"qwen2vl": [(40, 56), (24, 72), (48, 40)], "qwen2.5vl-w112": [(72, 120), (120, 64), (40, 56)]}


@pytest.fixture(scope="module")
def qwen_gguf(checkpoint, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgelmm[llamacpp]')")
    from .conftest import cached_exports

    return cached_exports(checkpoint, tmp_path_factory.mktemp("qwen-gguf"), formats=["gguf"],
                          gguf_types=["f32", "q8_0"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_f32_gguf_matches_pytorch(qwen_gguf, pipelines, kind):
    """verify's cases (1-3 images) through llama.cpp at the other families' GGUF thresholds; the
    export's own verify of both types passed."""
    import json

    from edgelmm.verify import verify

    pipe = edgelmm.load(qwen_gguf(kind), backend="llamacpp", precision="f32")
    assert pipe.backend.describe()["architecture"] == "qwen2vl" and pipe.backend.positions_per_token == 4
    report = verify(pipe, pipelines(kind), "f32")
    s = report["summary"]
    assert report["passed"], report["failures"]
    # verify's three image prompts, then an image and a four-frame clip (two pairs llama.cpp merges)
    assert [(c["images"], c["videos"]) for c in report["cases"]] == [(1, 0), (2, 0), (3, 0), (1, 1)]
    assert s["vision_cosine_min"] >= 0.999 and s["vision_max_abs"] <= 5e-4
    assert s["logits_max_abs"] <= 1e-3 and s["decoder_logits_max_abs"] <= 1e-3 and s["batch2_logits_max_abs"] <= 1e-3
    assert all(len(c["reference_tokens"]) == 16 and c["candidate_tokens"] == c["reference_tokens"]
               for c in report["cases"])
    assert s["backend_tokenizer_match"] == 1.0
    if kind == "qwen2.5vl-w112":  # verify's images are made large enough to span several windows
        from edgelmm.verify import CASES, case_images

        grid = pipe.prepare(CASES[0].prompt, case_images(pipe, 0, CASES[0])).vision.token_grids[0]
        assert max(grid) > 112 // 8, grid
    stored = json.loads((qwen_gguf(kind) / "edgelmm.json").read_text())["verify"]
    assert stored["f32"]["passed"] and stored["q8_0"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_gguf_answers_as_pytorch_for_images_of_their_own_sizes(qwen_gguf, pipelines, kind):
    """0-3 images of different sizes and an in-context prompt, alone and as one left-padded batch:
    llama.cpp's tokens are PyTorch's, and each image's features match the tower's."""
    pipe, ref = edgelmm.load(qwen_gguf(kind), backend="llamacpp", precision="f32"), pipelines(kind)
    a, b, c = GGUF_SIZES[kind]
    requests = [("Count to five.", []),
                ("Describe <image>.", sample_images(1, seed=1, sizes=[a])),
                ("Compare <image> and <image>.", sample_images(2, seed=2, sizes=[b, c])),
                ("<image> is a red square. <image> is a blue circle. What is <image>?",
                 sample_images(3, seed=3, sizes=[c, a, b]))]
    want = [ref.generate(p, imgs, max_new_tokens=12).token_ids for p, imgs in requests]
    assert [pipe.generate(p, imgs, max_new_tokens=12).token_ids for p, imgs in requests] == want
    assert [g.token_ids for g in pipe.generate_batch(requests, max_new_tokens=12)] == want
    vision = ref.family.preprocess(requests[3][1])
    ours, theirs = pipe.image_features(vision), ref.image_features(vision)
    assert ours.shape == theirs.shape == (1, sum(r * c for r, c in vision.token_grids), 64)
    assert np.abs(ours - theirs).max() <= 5e-4


@pytest.mark.slow
def test_gguf_positions_of_the_wrong_shape_are_named(qwen_gguf):
    from edgelmm.errors import PromptError

    backend = edgelmm.load(qwen_gguf("qwen2vl"), backend="llamacpp", precision="f32").backend
    embeds = np.zeros((1, 2, 64), np.float32)
    with pytest.raises(PromptError, match=r"position_ids of shape \[1, 2\]; this qwen2vl model takes \[3, 1, 2\]"):
        backend.decode(embeds, np.ones((1, 2), np.int64), np.zeros((1, 2), np.int64), backend.new_cache(1))


def test_an_image_too_long_for_the_processor_is_named(pipelines):
    pipe = pipelines("qwen2vl")
    images = sample_images(2, seed=0, sizes=[(40, 40), (4, 1000)])
    with pytest.raises(ImageError, match="image 2 is 1000x4 pixels.*at most 200 times"):
        pipe.prepare("<image> and <image>", images)


def test_calibration_quantizes_both_graphs_on_images_of_their_own_sizes(bundle, tmp_path):
    """INT8 vision ranges from tiles of several sizes through the dynamic-size tower, GPTQ on decoder
    prefills fed with their M-RoPE positions, and the INT4 bundle answers."""
    import shutil

    from edgelmm.calib import CalibrationOptions, calibrate

    dst = tmp_path / "bundle"
    shutil.copytree(bundle("qwen2vl"), dst)
    r = calibrate(dst, ["int8-vision+int4"], CalibrationOptions(int4_algorithm="gptq", calib_samples=6, eval_samples=0,
                                                                sensitivity=False))
    q, graphs = r.quality["int8-vision+int4"], r.calibration["graphs"]
    # a random 2-layer model with wide weights: GPTQ from 4 prompts measured 0.87 (RTN 0.96)
    assert q["passed"] and q["vision_cosine_min"] >= 0.99 and q["decoder_logits_cosine_min"] > 0.8, q
    assert graphs["decoder.int4"]["calibration_prompts"] == r.calibration["calibrated_on"] >= 4
    assert graphs["vision.int8"]["calibration_tiles"] >= 4
    pipe = edgelmm.load(dst, backend="onnxruntime", provider="cpu", precision="int8-vision+int4")
    answer = pipe.generate("Describe <image>.", sample_images(1, sizes=[(24, 72)]), max_new_tokens=4)
    assert pipe.describe()["precision"] == "int8-vision+int4" and 1 <= len(answer.token_ids) <= 4


@pytest.mark.slow
def test_qwen2_pre_tokenizer_becomes_llamacpps_qwen2(checkpoint, tmp_path):
    """The released Qwen2 tokenizers split text with their own regex (digits one by one) before the
    byte-level BPE: it is written as llama.cpp's "qwen2" pre-tokenizer, which llama.cpp loads, and
    llama.cpp's own tokenizer agrees with HF's on text with digits, contractions and newlines."""
    import json
    import shutil

    from tokenizers import Tokenizer

    from edgelmm.export import export
    from edgelmm.export.gguf import _QWEN2_PATTERN

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src = tmp_path / "Qwen2-VL-tiny"
    shutil.copytree(checkpoint("qwen2vl"), src)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    bundle = export(src, tmp_path / "bundle", formats=["gguf"], gguf_types=["f32"], verify=False, quiet=True)
    manifest = json.loads((bundle / "edgelmm.json").read_text())
    assert next(a for a in manifest["artifacts"] if a["graph"] == "llm")["tokenizer"]["pre"] == "qwen2"
    hf = Tokenizer.from_file(str(src / "tokenizer.json"))
    backend = edgelmm.load(bundle, backend="llamacpp", precision="f32").backend
    for text in ["12345 apples and 678 pears", "It's 2026, isn't it?\n\n  Yes.", "<|vision_start|>a1b22c333"]:
        assert backend.tokenize(text, False) == hf.encode(text, add_special_tokens=False).ids, text


@pytest.mark.slow
def test_bench_measures_the_gguf_pair(qwen_gguf):
    import json

    from typer.testing import CliRunner

    from edgelmm.cli import app

    r = CliRunner().invoke(app, ["bench", str(qwen_gguf("qwen2vl")), "--backends", "llamacpp", "--repeats", "1",
                                 "--new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["results"]
    assert sorted(row["precision"] for row in rows) == ["f32", "q8_0"]
    assert all("error" not in row and row["decode_ms_at_context"]["100"] > 0 for row in rows), rows


@pytest.mark.parametrize("change, reason", [
    ({"window_size": 64}, "112-pixel windows; this model's are 64 pixels"),
    ({"fullatt_block_indexes": [0, 1]}, None),                    # every layer: n_wa_pattern 1
    ({"fullatt_block_indexes": [0]}, r"every n-th layer; this model does on layers \[0\]"),
    ({"hidden_act": "gelu"}, "gates its MLP with SiLU; this tower's is gelu"),
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}},
     "vision rotary uses base 10000; this tower's is 20000"),
])
def test_what_llamacpps_qwen_graph_fixes_is_checked(checkpoint, tmp_path, change, reason):
    """Each vision setting llama.cpp's Qwen2.5-VL graph hard-codes, changed in the config of the
    112-pixel-window checkpoint: refused naming it, or (a pattern it can express) accepted."""
    import json
    import re
    import shutil

    from edgelmm.export.gguf import gguf_support
    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles

    src = tmp_path / "Qwen2.5-VL-tiny-w112"
    shutil.copytree(checkpoint("qwen2.5vl-w112"), src)
    config = json.loads((src / "config.json").read_text())
    config["vision_config"].update(change)
    (src / "config.json").write_text(json.dumps(config))
    support = gguf_support(detect(ModelFiles.open(src)))
    if reason is None:
        assert support.supported, support.reason
    else:
        assert not support.supported and not support.forceable
        assert re.search(reason, support.reason), support.reason
