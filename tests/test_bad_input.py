"""Bad input ends in a typed edgelmm error that names the culprit."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import edgelmm
from edgelmm import CheckpointError, ImageError, PromptError, UnsupportedModelError
from edgelmm.images import load_image
from edgelmm.testing import sample_images


@pytest.fixture
def png(tmp_path):
    def write(arr, name="img.png"):
        p = tmp_path / name
        Image.fromarray(arr).save(p)  # a uint16 array saves as a 16-bit PNG (mode I;16)
        return p
    return write


@pytest.mark.parametrize("n_markers,n_images", [(2, 1), (1, 2), (0, 1), (3, 0)])
def test_marker_count_mismatch(pipelines, n_markers, n_images):
    pipe = pipelines("llava-siglip")
    prompt = "Describe" + " <image>" * n_markers
    with pytest.raises(PromptError, match=f"{n_markers} <image> marker\\(s\\) but {n_images} image\\(s\\)"):
        pipe.generate(prompt, sample_images(n_images), max_new_tokens=2)


def test_corrupt_image_file_names_index_and_file(pipelines, tmp_path, png):
    good = png(sample_images(1)[0], "good.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ImageError, match=r"image 2 '.*broken\.png': cannot decode") as caught:  # numbered as in the prompt
        pipelines("idefics2").generate("<image> vs <image>", [good, bad], max_new_tokens=2)
    assert caught.value.index == 1


def test_truncated_image_file(tmp_path, png):
    full = png(sample_images(1, sizes=[(64, 64)])[0], "full.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(cut, index=0)


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageError, match=r"image 3 '.*nope\.jpg': file not found"):
        load_image(tmp_path / "nope.jpg", index=2)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 40, 3), (3, 80)])
def test_tiny_images_refused(shape):
    with pytest.raises(ImageError, match=r"image 1: .* the smallest side must be at least 4"):
        load_image(np.zeros(shape, np.uint8), index=0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(png):
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0 .. 65472
    p = png(ramp, "g16.png")
    assert Image.open(p).mode.startswith("I")
    rgb = load_image(p)
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    expected = np.round(ramp.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(rgb[:, :, 0], expected) and np.array_equal(rgb[:, :, 2], expected)
    assert rgb.max() >= 254 and len(np.unique(rgb)) > 200  # clipping would leave ~1 level


def test_grayscale_and_rgba_converted(png):
    gray = png(np.full((20, 30), 77, np.uint8), "gray.png")
    assert load_image(gray).shape == (20, 30, 3) and (load_image(gray) == 77).all()
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255          # left half opaque red, right half transparent
    rgb = load_image(png(rgba, "rgba.png"))
    assert tuple(rgb[0, 0]) == (200, 0, 0)
    assert tuple(rgb[0, 29]) == (255, 255, 255)  # transparent composited onto white, as HF does


def test_array_layouts_and_float_range():
    hwc = sample_images(1, sizes=[(20, 24)])[0]
    assert np.array_equal(load_image(np.moveaxis(hwc, -1, 0)), hwc)      # CHW accepted
    assert np.array_equal(load_image(hwc.astype(np.float32) / 255), hwc)  # float in [0, 1]
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((8, 8, 3), np.nan, np.float32), index=4)
    with pytest.raises(ImageError, match="unsupported image type int"):
        load_image(5)


def test_odd_images_run_end_to_end(pipelines, png):
    ramp = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30)
    sources = [png(ramp, "g16.png"), png(np.full((30, 30), 9, np.uint8), "g.png"),
               png(np.dstack([sample_images(1)[0], np.full((40, 56), 128, np.uint8)]), "a.png")]
    g = pipelines("idefics3").generate("<image><image><image> odd ones", sources, max_new_tokens=3)
    assert len(g.token_ids) >= 1


def test_prompt_longer_than_context(pipelines):
    pipe = pipelines("idefics3")
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens \(20 of them image tokens\) but the model's "
                                          r"context window is 1024"):
        pipe.generate("word " * 1200 + "<image>", sample_images(1), max_new_tokens=2)


def test_generation_stops_at_context_window(pipelines):
    pipe = pipelines("llava-clip")
    prompt = "word " * 245  # ~980 tokens with the tiny tokenizer, close to the 1024 window
    prepared = pipe.prepare(prompt, [])
    g = pipe.generate(prompt, [], max_new_tokens=200)
    assert len(prepared.input_ids) > 900
    assert len(prepared.input_ids) + len(g.token_ids) <= pipe.context_length
    assert g.finish_reason in ("length", "stop")


def test_unknown_model_type(checkpoint, tmp_path):
    d = tmp_path / "weird"
    shutil.copytree(checkpoint("idefics3"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "fuyu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"weird: model_type 'fuyu' is not supported \(supported: llava"):
        edgelmm.load(d)


@pytest.mark.parametrize("missing,pattern", [
    ("config.json", "missing config.json"),
    ("tokenizer.json", "missing tokenizer.json"),
    ("model.safetensors", r"no \*.safetensors weights"),
    ("processor_config.json", "no image processor settings"),
])
def test_checkpoint_with_missing_files(checkpoint, tmp_path, missing, pattern):
    d = tmp_path / "partial"
    shutil.copytree(checkpoint("llava-siglip"), d)
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=pattern) as info:
        edgelmm.load(d)
    assert "partial" in str(info.value)


def test_broken_config_json(checkpoint, tmp_path):
    d = tmp_path / "badcfg"
    shutil.copytree(checkpoint("idefics2"), d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"badcfg/config.json: not valid JSON"):
        edgelmm.load(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        edgelmm.load(tmp_path / "absent")


def test_bad_message_structure(pipelines):
    pipe = pipelines("idefics2")
    with pytest.raises(PromptError, match="message 0 needs 'role' and 'content'"):
        pipe.generate([{"text": "hi"}])
    with pytest.raises(PromptError, match="unknown content part"):
        pipe.generate([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(PromptError, match="1 <video> marker\\(s\\), and idefics2 models read images only"):
        pipe.generate([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(PromptError, match="both inside the messages and as images="):
        img = sample_images(1)[0]
        pipe.generate([{"role": "user", "content": [{"type": "image", "image": img}]}], [img])
