"""The qwen2vl family (Qwen2-VL and Qwen2.5-VL) beyond the every-family parity tests: the vision
tower at its native resolution against the model's own, M-RoPE positions through batches and the
ONNX bundle, and what it refuses."""

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
    assert [t.shape[2:] for t in vision.pixel_values] == [(40, 40), (24, 72), (72, 24), (48, 40), (16, 24), (40, 56)]
    ours = pipe.image_features(vision).reshape(-1, 64)
    f = pipe.family
    patches, grid = qwen_patches(vision.pixel_values, f.patch, f.merge, f.temporal)
    with torch.no_grad():
        theirs = pipe.backend.model.model.get_image_features(torch.from_numpy(patches), torch.from_numpy(grid))
    theirs = torch.cat(list(theirs.pooler_output)).numpy()
    assert ours.shape == theirs.shape == (sum(r * c for r, c in vision.token_grids), 64)
    assert np.abs(ours - theirs).max() <= 1e-5


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


def test_gguf_is_refused_before_the_weights_load(checkpoint, tmp_path, monkeypatch):
    """llama.cpp has Qwen2-VL, edgelmm does not write it yet: said at once, naming what is missing."""
    import edgelmm.runtimes.torch as torch_backend
    from edgelmm.export import export

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(torch_backend, "load_hf_model", no_load)
    with pytest.raises(ExportError, match="Qwen2-VL / Qwen2.5-VL GGUF.*qwen2vl_merger.*use ONNX"):
        export(checkpoint("qwen2vl"), tmp_path / "out", ["onnx", "gguf"], quiet=True)
    assert not (tmp_path / "out").exists()


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
