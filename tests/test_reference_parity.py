"""The reference Pipeline against the HF model and processor themselves, on every family."""

import numpy as np
import pytest
import torch
from PIL import Image

from edgelmm.testing import sample_images

from .conftest import KINDS

SIZES = [(40, 56), (64, 48), (30, 90), (72, 72), (50, 33)]


def qwen_patches(tiles, patch, merge, temporal):
    """Frame pairs [G, T, C, H, W] (one array per image or video) -> the Qwen2-VL processors'
    pixel_values [patches, C*T*p*p] and grid_thw, laid out as their patchify documents (pairs in
    time order, 2x2 blocks of patches, each patch its channels, then frames, then pixels)."""
    rows, grids = [], []
    for pairs in tiles:
        g, t, c, h, w = pairs.shape
        assert t == temporal
        gh, gw = h // patch, w // patch
        x = pairs.reshape(g, t, c, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows.append(x.reshape(g * gh * gw, c * t * patch * patch))
        grids.append([g, gh, gw])
    return np.concatenate(rows), np.array(grids, np.int64)


def hf_processor(pipe, path):
    """The checkpoint's own HF processor. Qwen2-VL's also wants a video processor, which transformers
    builds only with torchvision (not installed); the image and text halves are what is compared."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    if pipe.family.name != "qwen2vl":
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    proc.tokenizer = AutoTokenizer.from_pretrained(path)
    proc.video_processor = None
    proc.chat_template = pipe.files.chat_template
    proc.image_token, proc.image_token_id = "<|image_pad|>", proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    proc.video_token, proc.video_token_id = "<|video_pad|>", proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return proc


def hf_generate(pipe, prepared, max_new_tokens):
    kw = {"input_ids": torch.from_numpy(prepared.input_ids[None]),
          "attention_mask": torch.ones(1, len(prepared.input_ids), dtype=torch.long)}
    if prepared.vision.num_images:
        if pipe.family.name == "qwen2vl":
            f = pipe.family
            pv, grid = qwen_patches(prepared.vision.pixel_values, f.patch, f.merge, f.temporal)
            kw.update(pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid),
                      mm_token_type_ids=torch.from_numpy((prepared.input_ids == f.image_token_id)[None].astype(np.int64)))
            out = pipe.backend.model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False)
            return out[0, len(prepared.input_ids):].tolist()
        pv = torch.from_numpy(prepared.vision.pixel_values)
        if pipe.family.name == "llava":
            kw["pixel_values"] = pv
        else:
            kw["pixel_values"] = pv[None]
            kw["pixel_attention_mask"] = torch.from_numpy(prepared.vision.pixel_attention_mask)[None]
    out = pipe.backend.model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prepared.input_ids):].tolist()


def interleaved(n):
    return "Look at" + ",".join(f" image {i + 1} <image>" for i in range(n)) + ". What changed?"


def in_context_messages(images):
    """MIMIC-IT style: two solved examples, then the query."""
    return [
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Which colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The shape is red."}]},
        {"role": "user", "content": [{"type": "image", "image": images[1]}, {"type": "text", "text": "Which colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The shape is blue."}]},
        {"role": "user", "content": [{"type": "image", "image": images[2]}, {"type": "text", "text": "Which colour?"}]},
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
def test_greedy_matches_hf_generate(pipelines, kind, n_images):
    pipe = pipelines(kind)
    images = sample_images(n_images, seed=n_images, sizes=SIZES[n_images:] + SIZES[:n_images])
    prepared = pipe.prepare(interleaved(n_images), images)
    ours = pipe.generate(interleaved(n_images), images, max_new_tokens=16)
    assert ours.token_ids == hf_generate(pipe, prepared, 16)
    assert len(ours.token_ids) == 16 or ours.finish_reason == "stop"


@pytest.mark.parametrize("kind", KINDS)
def test_in_context_prompt_matches_hf_generate(pipelines, kind):
    pipe = pipelines(kind)
    images = sample_images(3, seed=11)
    messages = in_context_messages(images)
    prepared = pipe.prepare(messages)
    assert prepared.vision.num_images == 3
    ours = pipe.generate(messages, max_new_tokens=12)
    assert ours.token_ids == hf_generate(pipe, prepared, 12)


def hf_messages(prompt_text):
    parts = []
    chunks = prompt_text.split("<image>")
    for i, chunk in enumerate(chunks):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return [{"role": "user", "content": parts}]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_prompt_ids_and_pixels_equal_hf_processor(pipelines, checkpoint, kind, n_images):
    pipe = pipelines(kind)
    proc = hf_processor(pipe, checkpoint(kind))
    images = sample_images(n_images, seed=3)
    text = interleaved(n_images)
    prepared = pipe.prepare(text, images)

    hf_text = proc.apply_chat_template(hf_messages(text), add_generation_prompt=True, tokenize=False)
    assert prepared.text == hf_text
    # Mantis numbering is the only text edit before HF's processor; HF's apply_chat_template skips
    # the tokenizer's BOS when the template already wrote it, and so do we.
    labelled = pipe.family.label_images(hf_text) if hasattr(pipe.family, "label_images") else hf_text
    bos = pipe.files.special_token("bos_token")
    hf = proc(text=labelled, images=[Image.fromarray(i) for i in images] or None, return_tensors="np",
              add_special_tokens=not (bos and labelled.startswith(bos)))
    assert prepared.input_ids.tolist() == hf["input_ids"][0].tolist()
    if n_images and pipe.family.name == "qwen2vl":
        f = pipe.family
        pv, grid = qwen_patches(prepared.vision.pixel_values, f.patch, f.merge, f.temporal)
        assert (grid == hf["image_grid_thw"]).all() and np.abs(pv - hf["pixel_values"]).max() == 0.0
        # M-RoPE positions as the model computes them from the processor's outputs
        want, _ = pipe.backend.model.model.get_rope_index(
            torch.from_numpy(hf["input_ids"]), torch.from_numpy(hf["mm_token_type_ids"]),
            torch.from_numpy(hf["image_grid_thw"]))
        assert (want[:, 0].numpy() == prepared.positions).all()
    elif n_images:
        hp = hf["pixel_values"].reshape(-1, *hf["pixel_values"].shape[-3:])
        assert hp.shape == prepared.vision.pixel_values.shape
        assert np.abs(hp - prepared.vision.pixel_values).max() == 0.0
        if "pixel_attention_mask" in hf:
            hm = hf["pixel_attention_mask"].reshape(-1, *hf["pixel_attention_mask"].shape[-2:])
            assert (hm == prepared.vision.pixel_attention_mask).all()


def test_mantis_numbering_in_llava_prompt(pipelines):
    pipe = pipelines("llava-siglip")
    prepared = pipe.prepare("Compare <image> with <image>.", sample_images(2))
    assert pipe.family.prompt_style == "mantis"
    assert "(image 1: <Image><image></Image>) with (image 2: <Image><image></Image>)" in pipe.family.label_images(prepared.text)
    assert int((prepared.input_ids == pipe.family.image_token_id).sum()) == 2 * 16


@pytest.mark.parametrize("splitting", [False, True])
def test_idefics2_preprocessing_with_and_without_splitting(tmp_path, splitting):
    from transformers import AutoProcessor

    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles
    from edgelmm.testing.checkpoints import build_idefics2

    d = build_idefics2(tmp_path, do_image_splitting=splitting)
    fam = detect(ModelFiles.open(d))
    images = sample_images(3, seed=5, sizes=[(20, 100), (90, 40), (48, 48)])
    ours = fam.preprocess(images)
    hf = AutoProcessor.from_pretrained(d, local_files_only=True).image_processor(
        [Image.fromarray(i) for i in images], return_tensors="np")
    hp = hf["pixel_values"].reshape(-1, *hf["pixel_values"].shape[-3:])
    assert ours.tiles_per_image == [5 if splitting else 1] * 3
    assert hp.shape == ours.pixel_values.shape
    assert np.abs(hp - ours.pixel_values).max() == 0.0
    assert (hf["pixel_attention_mask"].reshape(hp.shape[0], *hp.shape[-2:]) == ours.pixel_attention_mask).all()


@pytest.mark.parametrize("size,tiles", [((30, 30), 5), ((40, 90), 3), ((90, 40), 3), ((12, 200), 3)])
def test_idefics3_tile_grid_matches_hf(checkpoint, pipelines, size, tiles):
    from transformers import AutoProcessor

    fam = pipelines("idefics3").family
    img = sample_images(1, seed=9, sizes=[size])
    ours = fam.preprocess(img)
    hf = AutoProcessor.from_pretrained(checkpoint("idefics3"), local_files_only=True).image_processor(
        [Image.fromarray(img[0])], return_tensors="np", return_row_col_info=True)
    assert ours.tiles_per_image == [tiles]
    rows, cols = hf["rows"][0][0], hf["cols"][0][0]
    assert (rows * cols + 1 if rows else 1) == tiles
    assert np.abs(hf["pixel_values"][0] - ours.pixel_values).max() == 0.0


@pytest.mark.parametrize("size,tiles", [((64, 64), 17), ((48, 200), 5), ((1080, 1920), 13)])
def test_idefics3_tiles_at_smolvlm_sizes_match_hf(checkpoint, tmp_path, size, tiles):
    """SmolVLM's processor (longest edge 2048, 512-px tiles) resizes every image to 2048 px first, so
    even a 64x64 image becomes 4x4 tiles and a global one: that is the checkpoint's own behaviour,
    which edgelmm follows (the ONNX Runtime backend encodes the tiles in bounded chunks)."""
    import json
    import shutil

    from transformers import AutoProcessor

    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles

    d = tmp_path / "smolvlm-sizes"
    shutil.copytree(checkpoint("idefics3"), d)
    config = json.loads((d / "processor_config.json").read_text())
    config["image_processor"].update(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    (d / "processor_config.json").write_text(json.dumps(config))
    img = sample_images(1, seed=3, sizes=[size])
    ours = detect(ModelFiles.open(d)).preprocess(img)
    hf = AutoProcessor.from_pretrained(d, local_files_only=True).image_processor([Image.fromarray(img[0])],
                                                                                return_tensors="np")
    assert ours.tiles_per_image == [tiles] and ours.pixel_values.shape == (tiles, 3, 512, 512)
    assert np.abs(hf["pixel_values"][0] - ours.pixel_values).max() == 0.0
