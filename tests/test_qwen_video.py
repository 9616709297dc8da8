"""Videos in Qwen2-VL / Qwen2.5-VL prompts: `<video>` markers with `edgelmm.Video` clips, alone and
interleaved with images, against the HF model (its own vision tower over the processor's patch
layout, its own M-RoPE positions, its own generate), then through the ONNX bundle and llama.cpp.

HF's video processor needs torchvision, which cannot be installed beside this torch: the patches
HF's model gets here are edgelmm's resized frames in the processor's documented layout."""

import numpy as np
import pytest
import torch

import edgelmm
from edgelmm import Video
from edgelmm.errors import ImageError, PromptError
from edgelmm.images import sample_images
from edgelmm.video import VideoFrames, evenly_spaced, fixed_count_frame_indices, sample_frame_indices

from .test_reference_parity import qwen_patches

KINDS = ["qwen2vl", "qwen2.5vl"]


def clip(n_frames, size=(40, 56), seed=0):
    """n frames of one size that differ from each other (a scene that changes every frame)."""
    return sample_images(n_frames, seed=seed, sizes=[size])


def hf_inputs(pipe, prepared):
    """The HF model's inputs for a prepared prompt: images and videos as its processors lay them out."""
    f, vision = pipe.family, prepared.vision
    ids = prepared.input_ids
    kw = {"input_ids": torch.from_numpy(ids[None]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
          "mm_token_type_ids": torch.from_numpy(((ids == f.image_token_id) + 2 * (ids == f.video_token_id))[None])}
    for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
        items = [vision.pixel_values[i] for i in range(vision.num_images) if vision.kind(i) == kind]
        if items:
            pv, grid = qwen_patches(items, f.patch, f.merge, f.temporal)
            kw[pv_key], kw[grid_key] = torch.from_numpy(pv), torch.from_numpy(grid)
    seconds = [vision.seconds_per_group[i] for i in range(vision.num_images) if vision.kind(i) == "video"]
    if seconds and f.is_25:
        kw["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return kw


# Prompts whose videos are short enough that HF's positions and the Qwen release's agree (see
# test_text_after_a_video_starts_after_its_last_frame): fps 8 makes Qwen2.5-VL's step one position.
REQUESTS = [
    ("What happens in <video>?", lambda: [Video(clip(5, seed=1), fps=8)]),
    ("<image> is the start. <video> Then what?", lambda: [sample_images(1, seed=2, sizes=[(24, 72)])[0],
                                                         Video(clip(4, (48, 40), seed=3), fps=8)]),
    ("Compare <video> with <video> and <image>.", lambda: [Video(clip(2, seed=4), fps=8),
                                                          Video(clip(3, (24, 72), seed=5), fps=8),
                                                          sample_images(1, seed=6, sizes=[(40, 40)])[0]]),
]


@pytest.mark.parametrize("kind", KINDS)
def test_video_prompts_answer_as_hf_generate(pipelines, kind):
    """Video alone, image then video, two videos and an image: the prompt's video tokens (an odd
    last frame repeated), its M-RoPE positions, the prefill logits and 12 greedy tokens equal the
    HF model's on the same patches."""
    pipe = pipelines(kind)
    model = pipe.backend.model
    for prompt, media in REQUESTS:
        prepared = pipe.prepare(prompt, media())
        vision = prepared.vision
        kw = hf_inputs(pipe, prepared)
        n_video_tokens = int((prepared.input_ids == pipe.family.video_token_id).sum())
        videos = [i for i in range(vision.num_images) if vision.kind(i) == "video"]
        assert n_video_tokens == sum(vision.tiles_per_image[i] * np.prod(vision.token_grids[i]) for i in videos)
        assert [vision.pixel_values[i].shape[:2] for i in videos] == [
            ((len(m.frames) + 1) // 2, 2) for m in media() if isinstance(m, Video)]
        with torch.no_grad():
            want_pos, _ = model.model.get_rope_index(
                kw["input_ids"], kw["mm_token_type_ids"], kw.get("image_grid_thw"), kw.get("video_grid_thw"),
                **({"second_per_grid_ts": kw["second_per_grid_ts"]} if "second_per_grid_ts" in kw else {}))
        assert (want_pos[:, 0].numpy() == prepared.positions).all(), prompt
        with torch.no_grad():
            hf_logits = model(**kw).logits[0, -1].float().numpy()
            hf_tokens = model.generate(**kw, max_new_tokens=12, do_sample=False)[0, len(prepared.input_ids):].tolist()
        logits, tokens = pipe.greedy_from_embeddings(pipe.merged_embeddings(prepared), 12, prepared.positions)
        assert np.abs(logits[0] - hf_logits).max() <= 1e-4, prompt
        assert tokens == hf_tokens, prompt
        assert pipe.generate(prompt, media(), max_new_tokens=12).token_ids == hf_tokens


@pytest.mark.parametrize("kind", KINDS)
def test_video_features_are_the_models_own(pipelines, kind):
    """A clip's frame pairs through edgelmm's tower (one pair per tile, attention within each pair)
    against the model's get_video_features on the processor's layout of the whole clip."""
    pipe = pipelines(kind)
    vision = pipe.family.preprocess_media([edgelmm.video.load_video(Video(clip(6, (72, 24), seed=7)))])
    ours = pipe.image_features(vision).reshape(-1, 64)
    pv, grid = qwen_patches(vision.pixel_values, pipe.family.patch, pipe.family.merge, pipe.family.temporal)
    assert grid.tolist() == [[3, 72 // 4, 24 // 4]]
    with torch.no_grad():
        theirs = pipe.backend.model.model.get_video_features(torch.from_numpy(pv), torch.from_numpy(grid))
    theirs = torch.cat(list(theirs.pooler_output)).numpy()
    assert ours.shape == theirs.shape == (3 * 9 * 3, 64)
    assert np.abs(ours - theirs).max() <= 1e-5
    # the frames of a pair matter: the same clip with each pair's frames swapped gives other features
    swapped = pipe.image_features(type(vision)(**{**vision.__dict__, "pixel_values": [vision.pixel_values[0][:, ::-1]]}))
    assert np.abs(swapped.reshape(-1, 64) - ours).max() > 1e-3


def test_qwen25_places_frames_in_time_by_the_clips_frame_rate(pipelines):
    """Qwen2.5-VL: a pair's temporal position is its index x tokens_per_second x the seconds a
    pair spans (2 / fps; transformers takes 24 fps where none is given), as the model's
    get_rope_index computes it; Qwen2-VL counts pairs."""
    frames = clip(6)
    for kind, fps, step in [("qwen2.5vl", 2.0, 4), ("qwen2.5vl", 8.0, 1), ("qwen2.5vl", 3.0, 2),
                            ("qwen2.5vl", None, 0), ("qwen2vl", 2.0, 1), ("qwen2vl", None, 1)]:
        pipe = pipelines(kind)
        prepared = pipe.prepare("<video>", [Video(frames, fps=fps)], chat=False)
        video = prepared.input_ids == pipe.family.video_token_id
        t = np.unique(prepared.positions[0, video])
        first = int(np.argmax(video))
        # tokens_per_second is 4 in the tiny Qwen2.5-VL config: fps 3 -> 2/3 s a pair -> 2.67 -> 0, 2, 5
        expected = [0, 2, 5] if (kind, fps) == ("qwen2.5vl", 3.0) else [k * step for k in range(3)]
        assert (t - first).tolist() == sorted(set(expected)), (kind, fps)
        kw = hf_inputs(pipe, prepared)
        want, _ = pipe.backend.model.model.get_rope_index(
            kw["input_ids"], kw["mm_token_type_ids"], None, kw["video_grid_thw"],
            **({"second_per_grid_ts": kw["second_per_grid_ts"]} if "second_per_grid_ts" in kw else {}))
        assert (want[:, 0, video].numpy() == prepared.positions[:, video]).all(), (kind, fps)


@pytest.mark.parametrize("kind", KINDS)
def test_text_after_a_video_starts_after_its_last_frame(pipelines, kind):
    """Where a clip runs longer in time than it is wide: the text after it starts one past the
    largest position in it, as the Qwen models' own release (and vLLM) place it. transformers 5.24
    starts it at the video's start + its longer side, which puts the question among the clip's
    later frames; every other position (the video's own, the text before) is transformers'."""
    pipe = pipelines(kind)
    prepared = pipe.prepare("Watch <video> and say what changed.", [Video(clip(12, (24, 24)), fps=2)])
    ids, pos = prepared.input_ids, prepared.positions
    video = np.flatnonzero(ids == pipe.family.video_token_id)
    after = video[-1] + 1
    assert pos[:, after].tolist() == [int(pos[:, video].max()) + 1] * 3
    assert (pos[:, after:] == pos[:, after:after + 1] + np.arange(len(ids) - after)).all()
    kw = hf_inputs(pipe, prepared)
    want, _ = pipe.backend.model.model.get_rope_index(
        kw["input_ids"], kw["mm_token_type_ids"], None, kw["video_grid_thw"],
        **({"second_per_grid_ts": kw["second_per_grid_ts"]} if "second_per_grid_ts" in kw else {}))
    want = want[:, 0].numpy()
    assert (want[:, :after] == pos[:, :after]).all()
    hf_start = int(pos[0, video[0]]) + 3  # 24 x 24 pixels: 3 x 3 tokens
    assert want[:, after].tolist() == [hf_start] * 3 and hf_start < pos[0, video].max()


@pytest.mark.parametrize("kind", KINDS)
def test_the_onnx_bundle_reads_videos_as_pytorch(pipelines, bundle, kind):
    """The same vision graph takes images and video frame pairs: features <= 1e-4, prefill logits
    <= 1e-3 and tokens identical to the PyTorch reference, alone and as a left-padded batch."""
    ref = pipelines(kind)
    pipe = edgelmm.load(bundle(kind), backend="onnxruntime", provider="cpu", precision="fp32")
    requests = [(p, m()) for p, m in REQUESTS] + [("Count to three.", [])]
    for prompt, media in requests[:3]:
        a, b = ref.prepare(prompt, media), pipe.prepare(prompt, media)
        assert (a.input_ids == b.input_ids).all() and (a.positions == b.positions).all()
        fa, fb = ref.image_features(a.vision), pipe.image_features(b.vision)
        assert np.abs(fa - fb).max() <= 1e-4
        la, ta = ref.greedy_from_embeddings(ref.merged_embeddings(a), 12, a.positions)
        lb, tb = pipe.greedy_from_embeddings(pipe.merged_embeddings(b), 12, b.positions)
        assert np.abs(la - lb).max() <= 1e-3 and ta == tb
    want = [ref.generate(p, m, max_new_tokens=10).token_ids for p, m in requests]
    assert [g.token_ids for g in pipe.generate_batch(requests, max_new_tokens=10)] == want
    # pixels of the wrong rank (what an older bundle's [N, 3, H, W] graph meets) are named, not ORT's error
    from edgelmm.errors import BundleError

    with pytest.raises(BundleError, match=r"vision.*takes pixel values of rank 5 and this model's preprocessing "
                                          r"gives rank 4 .*export it again"):
        pipe.backend.encode_images(np.zeros((1, 3, 16, 16), np.float32))


@pytest.fixture(scope="module")
def qwen_gguf(checkpoint, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgelmm[llamacpp]')")
    from .conftest import cached_exports

    return cached_exports(checkpoint, tmp_path_factory.mktemp("qwen-video-gguf"), formats=["gguf"],
                          gguf_types=["f32"])


@pytest.mark.slow
def test_llamacpp_merges_a_frame_pair_as_the_model_does(qwen_gguf, pipelines):
    """llama.cpp's mtmd takes a pair of different frames as two mergeable bitmaps and encodes them
    as one chunk, through the GGUF's two per-frame halves of the patch convolution: its features
    are the tower's, and its tokens PyTorch's."""
    ref = pipelines("qwen2vl")
    pipe = edgelmm.load(qwen_gguf("qwen2vl"), backend="llamacpp", precision="f32")
    prompt, media = REQUESTS[1][0], REQUESTS[1][1]()
    a, b = ref.prepare(prompt, media), pipe.prepare(prompt, media)
    fa, fb = ref.image_features(a.vision), pipe.image_features(b.vision)
    assert fa.shape == fb.shape and np.abs(fa - fb).max() <= 5e-4
    assert pipe.generate(prompt, media, max_new_tokens=12).token_ids == ref.generate(prompt, media,
                                                                                     max_new_tokens=12).token_ids


def test_video_mistakes_are_named(pipelines):
    qwen, llava = pipelines("qwen2vl"), pipelines("llava-siglip")
    frames = clip(3)
    with pytest.raises(PromptError, match=r"1 <video> marker\(s\), and llava models read images only"):
        llava.prepare([{"role": "user", "content": [{"type": "video", "video": Video(frames)}]}])
    # for a model that reads no videos "<video>" is text, as its HF processor takes it
    assert "<video>" in llava.prepare("What is a <video> tag?").expanded
    with pytest.raises(PromptError, match=r"a Video was given, and llava models read images only"):
        llava.prepare("What happens in <video>?", [Video(frames)])
    with pytest.raises(PromptError, match=r"has 0 <image> marker\(s\) but 0 image\(s\) and 1 video\(s\)"):
        qwen.prepare("What happens?", [Video(frames)])
    with pytest.raises(PromptError, match=r"marker 1 of the prompt is <image> but item 1 of its media is a Video"):
        qwen.prepare("<image> then <video>", [Video(frames), frames[0]])
    with pytest.raises(PromptError, match=r"has 1 <image> and 1 <video> marker\(s\) but 1 image\(s\) were given"):
        qwen.prepare("<image> then <video>", [frames[0]])
    with pytest.raises(ImageError, match=r"video 1 \(item 2 of the prompt's media\) frame 3 is 72x24 pixels but "
                                          r"frame 1 is 56x40"):
        qwen.prepare("<image> then <video>", [frames[0], Video([*frames[:2], sample_images(1, sizes=[(24, 72)])[0]])])
    with pytest.raises(ImageError, match=r"video 1: has no frames"):
        qwen.prepare("<video>", [Video([])])
    with pytest.raises(ImageError, match=r"video 1: fps must be a positive number"):
        qwen.prepare("<video>", [Video(frames, fps=0)])
    with pytest.raises(ImageError, match=r"video 1 frame 2: .*file not found"):
        qwen.prepare("<video>", [Video([frames[0], "/nonexistent/frame.png"])])
    # a video part of a chat message carries its clip
    msgs = [{"role": "user", "content": [{"type": "video", "video": Video(frames)}, {"type": "text", "text": "Why?"}]}]
    assert qwen.prepare(msgs).vision.kinds == ["video"]


def test_frame_sampling_follows_the_processors_rule():
    """Where a video processor samples (do_sample_frames): the clip's length at the target rate,
    within [min_frames, max_frames], a multiple of the pair size, evenly spaced from frame 0."""
    assert sample_frame_indices(30, 30.0, 2.0, 2, 4, 768).tolist() == [0, 7, 15, 22]    # 2 frames -> min 4
    assert sample_frame_indices(300, 30.0, 2.0, 2, 4, 768).tolist() == list(range(0, 300, 15))  # 10 s at 2 fps
    assert sample_frame_indices(301, 25.0, 1.0, 2, 4, 6).tolist() == [0, 50, 100, 150, 200, 250]  # max_frames
    with pytest.raises(ImageError, match="too short"):
        sample_frame_indices(1, 30.0, 2.0, 2, 4, 768)


def test_frame_indices_are_the_processors_own():
    """The processor spaces sampled frames with `torch.arange(0, total, total / count).int()` (float32
    values, truncated): edgelmm's indices equal torch's for every pair. Where float rounding gives torch
    one index more, that index is the clip's length (HF's processor fails on it): edgelmm keeps
    torch's first `count`."""
    longer = 0
    for total in range(1, 161):
        for count in range(1, total + 1):
            want = torch.arange(0, total, total / count).int().numpy()
            if len(want) > count:
                longer += 1
                assert len(want) == count + 1 and want[-1] == total, (total, count)
            assert evenly_spaced(total, count).tolist() == want[:count].tolist(), (total, count)
    assert longer > 0  # the case is real, not hypothetical
    assert evenly_spaced(30, 22)[11] == 15         # float64 truncation would take frame 14
    assert evenly_spaced(17, 14).tolist()[-2:] == [14, 15]  # torch's 15th index, 17, is past the clip
    with pytest.raises(ImageError, match="cannot pick 0 of a clip's 10 frames"):
        evenly_spaced(10, 0)


def test_a_fixed_frame_count_follows_the_processors_rule():
    """`num_frames` in the video processor's config: rounded to whole pairs with Python's round (halves to
    even), no min/max_frames bound, evenly spaced; more frames than the clip has is a named error."""
    assert fixed_count_frame_indices(10, 4, 2).tolist() == [0, 2, 5, 7]
    assert len(fixed_count_frame_indices(10, 5, 2)) == 4 and len(fixed_count_frame_indices(10, 7, 2)) == 8
    assert fixed_count_frame_indices(40, 2, 2).tolist() == [0, 20]  # under min_frames (4): not raised to it
    with pytest.raises(ImageError, match=r"num_frames=1, which rounds to no 2-frame pair"):
        fixed_count_frame_indices(10, 1, 2)
    with pytest.raises(ImageError, match=r"a clip of 5 frames is too short for the 6 frames"):
        fixed_count_frame_indices(5, 6, 2)


def test_the_video_processors_num_frames_is_read(checkpoint, tmp_path):
    """A checkpoint whose video processor samples a fixed number of frames: a clip keeps that many (in
    pairs), the rate scaled as its sampled_fps, and a clip too short for it is refused naming the
    video. num_frames with fps, or one that rounds to no pair, is the checkpoint's error (HF's
    sample_frames refuses both at once)."""
    import json
    import shutil

    from edgelmm.errors import CheckpointError
    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles

    src = tmp_path / "q"
    shutil.copytree(checkpoint("qwen2.5vl"), src)
    video_cfg = src / "video_preprocessor_config.json"
    base = {**json.loads(video_cfg.read_text()), "do_sample_frames": True}
    for change, message in [({"num_frames": 4, "fps": 8}, r"num_frames \(4\) and fps \(8\) are both set"),
                            ({"num_frames": 1}, r"num_frames 1 rounds to no 2-frame pair")]:
        video_cfg.write_text(json.dumps({**base, **change}))
        with pytest.raises(CheckpointError, match=r"video processor's settings: " + message):
            detect(ModelFiles.open(src))
    video_cfg.write_text(json.dumps({**base, "num_frames": 4}))
    family = detect(ModelFiles.open(src))
    frames = np.stack(clip(10))
    vision = family.preprocess_media([VideoFrames(frames, 5.0, "video 1")])
    assert vision.pixel_values[0].shape[:2] == (2, 2)   # 4 frames: 2 pairs
    assert vision.seconds_per_group[0] == pytest.approx(1.0)  # a pair at the sampled rate: 4 / 10 x 5 = 2 fps
    alone = family.preprocess_media([VideoFrames(frames[[0, 2, 5, 7]], None, "video 1")])
    assert np.array_equal(vision.pixel_values[0], alone.pixel_values[0])  # frames 0, 2, 5, 7 of the clip
    video_cfg.write_text(json.dumps({**json.loads(video_cfg.read_text()), "num_frames": 8}))
    family = detect(ModelFiles.open(src))
    assert family.preprocess_media([VideoFrames(frames, None, "video 1")]).pixel_values[0].shape[0] == 4
    with pytest.raises(ImageError, match=r"video 2: a clip of 6 frames is too short for the 8 frames"):
        family.preprocess_media([VideoFrames(frames[:6], 5.0, "video 2")])


def test_run_takes_videos_from_the_command_line(checkpoint, pipelines, tmp_path, monkeypatch):
    """`edgelmm run --video`: a directory of frames (taken as they are) and a video file (decoded
    with OpenCV, sampled at --fps), merged with --image in the order of the prompt's markers."""
    import json

    import cv2
    from PIL import Image
    from typer.testing import CliRunner

    from edgelmm.cli import app

    pipe = pipelines("qwen2vl")
    frames = clip(5, seed=9)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    image = tmp_path / "start.png"
    Image.fromarray(sample_images(1, seed=10, sizes=[(24, 72)])[0]).save(image)
    prompt = "<image> first, then <video>. What changed?"
    args = ["run", str(checkpoint("qwen2vl")), "--backend", "torch", "-p", prompt, "-i", str(image),
            "--video", str(folder), "--max-new-tokens", "6", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    want = pipe.generate(prompt, [str(image), Video(frames)], max_new_tokens=6)
    assert json.loads(r.output)["token_ids"] == want.token_ids

    movie = tmp_path / "clip.avi"  # 10 frames at 5 fps: 2 s, sampled at 2 fps -> frames 0, 3, 5, 8
    writer = cv2.VideoWriter(str(movie), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (56, 40))
    for f in clip(10, seed=11):
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    r = CliRunner().invoke(app, [*args[:8], "--video", str(movie), "--fps", "2", *args[10:]])
    assert r.exit_code == 0, r.output
    decoded = edgelmm.video.video_from_path(movie, 2.0)
    assert len(decoded.frames) == 4 and decoded.fps == 2.0
    assert json.loads(r.output)["prompt_tokens"] == len(pipe.prepare(prompt, [str(image), decoded]).input_ids)
    # decoded frames past the memory budget stop the decoding, named (4 frames of 56x40x3 are 26,880 bytes)
    assert len(edgelmm.video.video_from_path(movie, 2.0, max_bytes=4 * 56 * 40 * 3).frames) == 4
    with pytest.raises(edgelmm.video.VideoTooLarge, match=r"clip\.avi'?: 4 frames of 56x40 pixels at 2 a second "
                                                          r"would hold more than"):
        edgelmm.video.video_from_path(movie, 2.0, max_bytes=4 * 56 * 40 * 3 - 1)
    with pytest.raises(edgelmm.video.VideoTooLarge, match=r"one frame of 56x40 pixels is 6720 bytes, more than the 100"):
        edgelmm.video.video_from_path(movie, 2.0, max_bytes=100)
    # by default a quarter of the memory available (here made small); no bound where none is known
    from edgelmm import hostmem

    monkeypatch.setattr(hostmem, "available_bytes", lambda: 4 * (3 * 56 * 40 * 3))
    with pytest.raises(edgelmm.video.VideoTooLarge, match=r"4 frames of 56x40"):
        edgelmm.video.video_from_path(movie, 2.0)
    monkeypatch.setattr(hostmem, "available_bytes", lambda: 0)
    assert len(edgelmm.video.video_from_path(movie, 2.0).frames) == 4

    r = CliRunner().invoke(app, [*args[:8], *args[10:]])  # the <video> marker without a --video
    assert r.exit_code != 0 and "has 1 <image> and 1 <video> marker(s) but 1 image(s) were given" in r.output


def test_info_says_what_a_pair_of_frames_costs(checkpoint):
    """`edgelmm info`: a model that reads videos says so, with the tokens a pair of frames becomes
    at the video processor's budget (here the tiny model's 256..2304 pixels, 8-pixel tokens)."""
    data = edgelmm.info(checkpoint("qwen2vl"), sizes=((40, 56), (480, 640)))
    assert data["reads_videos"] and data["video_token"] == "<|video_pad|>"
    assert [r["tokens"] for r in data["video_tokens_per_frame_pair"]] == [5 * 7, 5 * 6]  # 640x480 shrinks to 48x40
    assert edgelmm.info(checkpoint("llava-siglip"))["reads_videos"] is False


def test_a_clip_too_long_for_the_context_is_refused_before_its_frames_are_resized(pipelines, tmp_path):
    """The tiny model's 1024 positions: 80 frames of 40x56 are 40 pairs x 35 tokens = 1400 tokens,
    refused from the frame count and size alone; damaged or missing video files are named."""
    qwen = pipelines("qwen2vl")
    frames = np.zeros((80, 40, 56, 3), np.uint8)
    with pytest.raises(PromptError, match=r"videos are 1400 tokens \(video 1 1400\) but the model's context window "
                                          r"is 1024"):
        qwen.prepare("<video>", [Video(frames)])
    assert qwen.family.video_tokens(edgelmm.video.load_video(Video(frames[:5]))) == 3 * 35
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(range(256)) * 8)
    with pytest.raises(ImageError, match="broken.avi"):
        edgelmm.video.video_from_path(broken)
    with pytest.raises(ImageError, match="no such video file"):
        edgelmm.video.video_from_path(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no"):
        edgelmm.video.video_from_path(tmp_path / "empty")


def test_serve_takes_a_video_url(bundle, tmp_path):
    """`edgelmm serve` on a Qwen bundle: a video_url part (a data: URL of an AVI file, vLLM's
    extension of the chat API) is decoded with OpenCV, sampled at the server's fps, and answered
    with exactly the tokens Pipeline.generate gives for the same frames; a clip over the frame limit
    is 413, a damaged one 400, a video for a model that reads none 400, and the server stays up."""
    import base64
    import http.client
    import json

    import cv2

    from edgelmm.serve import Limits, Server, ServerOptions

    movie = tmp_path / "clip.avi"  # 12 frames at 6 fps: 2 s, sampled at 2 fps -> 4 frames
    writer = cv2.VideoWriter(str(movie), cv2.VideoWriter_fourcc(*"MJPG"), 6.0, (56, 40))
    for f in clip(12, seed=12):
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    url = "data:video/x-msvideo;base64," + base64.b64encode(movie.read_bytes()).decode()
    pipe = edgelmm.load(bundle("qwen2vl"), backend="onnxruntime", provider="cpu", precision="fp32")

    def post(server, content, max_tokens=6):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        reply = json.loads(r.read().decode())
        conn.close()
        return r.status, reply

    limits = Limits(max_video_frames=4)
    with Server(lambda: pipe, ServerOptions(limits=limits), port=0) as server:
        assert server.wait_ready(60)
        status, reply = post(server, [{"type": "text", "text": "What happens in "},
                                      {"type": "video_url", "video_url": {"url": url}},
                                      {"type": "text", "text": "?"}])
        assert status == 200, reply
        decoded = edgelmm.video.video_from_path(movie, 2.0)
        want = pipe.generate("What happens in <video>?", [decoded], max_new_tokens=6)
        assert reply["choices"][0]["message"]["content"] == want.text
        assert reply["usage"]["prompt_tokens"] == want.prompt_tokens
        assert reply["usage"]["completion_tokens"] == len(want.token_ids)

        long = tmp_path / "long.avi"  # 30 frames at 6 fps: 5 s -> 10 frames at 2 fps, over the limit of 4
        writer = cv2.VideoWriter(str(long), cv2.VideoWriter_fourcc(*"MJPG"), 6.0, (56, 40))
        for f in clip(30, seed=13):
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()
        too_long = "data:video/x-msvideo;base64," + base64.b64encode(long.read_bytes()).decode()
        status, reply = post(server, [{"type": "video_url", "video_url": {"url": too_long}}])
        assert status == 413 and "more than 4 frames at 2 a second" in reply["error"]["message"]
        assert reply["error"]["param"] == "messages[0].content[0].video_url"
        status, reply = post(server, [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAAAAA"}}])
        assert status == 400 and "OpenCV cannot open it as a video" in reply["error"]["message"]
        two = [{"type": "video_url", "video_url": {"url": url}}] * 2
        status, reply = post(server, two)
        assert status == 400 and "more than 1 videos" in reply["error"]["message"]
        status, reply = post(server, [{"type": "text", "text": "Say hi."}])
        assert status == 200
    llava = edgelmm.load(bundle("llava-siglip"), backend="onnxruntime", provider="cpu", precision="fp32")
    with Server(lambda: llava, ServerOptions(), port=0) as server:
        assert server.wait_ready(60)
        status, reply = post(server, [{"type": "video_url", "video_url": {"url": url}}])
        assert status == 400 and "llava models read images only" in reply["error"]["message"]


def test_processor_settings_of_the_wrong_type_are_the_checkpoints_error(checkpoint, tmp_path):
    """A video (or image) processor config is read like any file: a value of the wrong type or range
    is a CheckpointError naming the checkpoint and the setting; an integral float is taken."""
    import json
    import shutil

    from edgelmm.errors import CheckpointError

    src = tmp_path / "q"
    shutil.copytree(checkpoint("qwen2vl"), src)
    video_cfg = src / "video_preprocessor_config.json"
    good = json.loads(video_cfg.read_text())
    for change, message in [({"min_pixels": "abc"}, r"video processor's settings: min_pixels must be an integer"),
                            ({"size": {"shortest_edge": 5000, "longest_edge": 100}}, r"max_pixels must be >= 5000"),
                            ({"do_sample_frames": True, "fps": -1}, r"fps must be in \(0, 1000\]"),
                            ({"do_sample_frames": True, "num_frames": 0}, r"num_frames must be >= 1, got 0")]:
        video_cfg.write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match=message):
            edgelmm.info(src)
    video_cfg.write_text(json.dumps({**good, "min_pixels": 256.0}))
    assert edgelmm.info(src)["reads_videos"]
    image_cfg = src / "preprocessor_config.json"
    image_cfg.write_text(json.dumps({**json.loads(image_cfg.read_text()), "patch_size": "x"}))
    with pytest.raises(CheckpointError, match=r"image processor's settings: patch_size must be an integer"):
        edgelmm.info(src)
