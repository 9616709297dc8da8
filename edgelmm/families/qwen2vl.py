"""Qwen2-VL and Qwen2.5-VL (one processor, one prompt format): a native-resolution vision
transformer and a Qwen2 text model with multimodal rotary positions (M-RoPE).

- An image keeps its aspect ratio: it is resized so both sides are multiples of patch x merge
  (28 pixels) and its area lies within [min_pixels, max_pixels] ("smart resize"), cut into
  14-pixel patches, and every 2x2 block of patches becomes one token. So every image has its own
  token count and its own tile size: the vision graph takes images of one size at a time.
- The model's unit is a pair of frames (temporal_patch_size 2): an image is sent as a pair of two
  equal frames, a video as consecutive pairs (an odd last frame repeated), [G, 2, 3, H, W]. Each
  pair is attended over on its own and gives one grid of tokens, so a video is G tiles of one size
  and the vision graph takes images and videos alike. The processor lays patches out block by
  block; the vision graph does that itself from the resized frames.
- Videos: the frames given are the frames the model sees (HF's default; sampled to the video
  processor's fps only where its config asks). They are resized like images, with PIL's bicubic
  filter: HF's video processor resizes with torchvision, whose antialiased bicubic can differ from
  PIL's by a level of 8-bit brightness here and there (torchvision cannot be installed beside
  the torch edgelmm builds with, so that difference is not measured).
- Every text position is a triple (temporal, height, width): an image token's is its cell in the
  token grid, offset by the text before it; a video token's also has its pair's index in time
  (Qwen2.5-VL: scaled to tokens_per_second by the seconds a pair spans); text tokens have three
  equal components that go on from the largest position before them. `positions()` computes them,
  as the model's get_rope_index does.
- Qwen2.5-VL's tower differs in its blocks (RMSNorm, gated MLP) and in attention: most layers
  attend within windows of window_size pixels (8x8 patches at 14 pixels), a few
  (fullatt_block_indexes) over the whole image.
"""

from __future__ import annotations

import math

import numpy as np

from .. import images as im
from ..errors import CheckpointError, ImageError, PromptError
from ..options import check_int, check_number
from ..prompt import IMAGE_MARKER, VIDEO_MARKER
from ..video import VideoFrames, fixed_count_frame_indices, sample_frame_indices
from ..gguf_names import QWEN2VL_BLOCK, QWEN2VL_TOWER, QWEN25VL_BLOCK
from .base import ClipShape, Family, GGUFPlan, GGUFRefusal, TorchParts, VisionInputs

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
MAX_ASPECT = 200  # the processor refuses images longer than this many times their width (or height)
UNKNOWN_VIDEO_FPS = 24.0  # what transformers takes a clip's frame rate to be when it is not given


def _setting_int(name: str, value, lo: int = 1, hi: int | None = None) -> int:
    """A processor setting that must be a whole number (a JSON 3136.0 is taken as 3136)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_int(name, value, lo, hi, error=CheckpointError)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's target size: sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as that allows (Python's round, as the processor uses)."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLFamily(Family):
    name = "qwen2vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    default_image_token = "<|image_pad|>"
    default_video_token = "<|video_pad|>"
    position_dims = 3
    tiles_keep_size = True

    def __init__(self, files, prompt_style=None):
        super().__init__(files, prompt_style or "plain")
        # A processor config is read like any file: a value of the wrong type or range is the
        # checkpoint's error, named, not a ValueError from deep in preprocessing.
        for which, read, cfg in (("image", self._image_settings, files.image_processor_config),
                                 ("video", self._video_settings, files.video_processor_config)):
            try:
                read(cfg if isinstance(cfg, dict) else {})
            except (TypeError, ValueError, AttributeError, CheckpointError) as exc:
                raise CheckpointError(f"{files.root}: the {which} processor's settings: {exc}") from None
        vcfg = self.config.get("vision_config") or {}
        self.tokens_per_second = float(vcfg.get("tokens_per_second", 4))  # HF's Qwen2.5-VL default
        for key, mine in (("patch_size", self.patch), ("spatial_merge_size", self.merge),
                          ("temporal_patch_size", self.temporal)):
            if key in vcfg and int(vcfg[key]) != mine:
                raise CheckpointError(f"{files.root}: the image processor's {key.replace('spatial_', '')} {mine} "
                                      f"differs from the vision tower's {vcfg[key]}")

    def _image_settings(self, ip: dict) -> None:
        size = ip.get("size") or {}
        self.patch = _setting_int("patch_size", ip.get("patch_size", 14), 1, 1024)
        self.merge = _setting_int("merge_size", ip.get("merge_size", 2), 1, 64)
        self.temporal = _setting_int("temporal_patch_size", ip.get("temporal_patch_size", 2), 1, 64)
        # Top-level min/max_pixels win over `size`, as in the processor's constructor.
        self.min_pixels = _setting_int("min_pixels", ip.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = _setting_int("max_pixels", ip.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280,
                                       self.min_pixels)
        self.do_resize = ip.get("do_resize", True)
        self.resample = ip.get("resample", 3)
        self.norm = im.Normalization.from_config(ip, im.OPENAI_CLIP_MEAN, im.OPENAI_CLIP_STD)

    def _video_settings(self, vp: dict) -> None:
        """The video processor's settings (its class defaults where the config is silent; min/max_pixels
        override size, as in its constructor)."""
        size = vp.get("size") or {}
        low, high = vp.get("min_pixels"), vp.get("max_pixels")
        low = size.get("shortest_edge", 128 * 28 * 28) if low is None else low
        high = size.get("longest_edge", 28 * 28 * 768) if high is None else high
        self.video_min_pixels = _setting_int("min_pixels", low)
        self.video_max_pixels = _setting_int("max_pixels", high, self.video_min_pixels)
        self.video_sample = bool(vp.get("do_sample_frames", False))
        fps = vp.get("fps")  # the rate it samples clips down to (do_sample_frames)
        self.video_fps = None if fps is None else check_number("fps", fps, 0, 1000, lo_open=True, error=CheckpointError)
        # or a fixed number of frames per clip: not both, which HF's sample_frames refuses
        count = vp.get("num_frames")
        self.video_num_frames = None if count is None else _setting_int("num_frames", count)
        if self.video_num_frames is not None and round(self.video_num_frames / self.temporal) < 1:
            raise CheckpointError(f"num_frames {self.video_num_frames} rounds to no {self.temporal}-frame pair")
        if self.video_sample and self.video_num_frames is not None and self.video_fps is not None:
            raise CheckpointError(f"num_frames ({self.video_num_frames}) and fps ({self.video_fps:g}) are both set with "
                                  "do_sample_frames: a video processor samples by one of them (HF refuses both)")
        self.video_min_frames = _setting_int("min_frames", vp.get("min_frames", 4))
        self.video_max_frames = _setting_int("max_frames", vp.get("max_frames", 768), self.video_min_frames)
        # qwen-vl-utils' bound on a whole clip's pixels (off unless the config turns it on, as in transformers 5.24)
        self.video_cap_pixels = bool(vp.get("cap_pixels_per_frame", False))
        self.video_max_tokens = _setting_int("max_video_tokens", vp.get("max_video_tokens", 128000))
        self.video_resample = vp.get("resample", 3)
        self.video_norm = im.Normalization.from_config(vp, im.OPENAI_CLIP_MEAN, im.OPENAI_CLIP_STD)

    # ---- images ----
    def target_size(self, height: int, width: int, index: int = 0) -> tuple[int, int]:
        if max(height, width) / min(height, width) > MAX_ASPECT:
            raise ImageError(f"image {index + 1} is {width}x{height} pixels: Qwen2-VL takes images at most "
                             f"{MAX_ASPECT} times longer than wide")
        factor = self.patch * self.merge
        if not self.do_resize:
            if height % factor or width % factor:
                raise ImageError(f"image {index + 1} is {width}x{height} pixels and the processor does not "
                                 f"resize: both sides must be multiples of {factor}")
            return height, width
        h, w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        if not h or not w:  # only with min_pixels 0: a side under half a token rounds to nothing
            raise ImageError(f"image {index + 1} is {width}x{height} pixels: a side is too short for one "
                             f"{factor}-pixel token at this processor's min_pixels {self.min_pixels}")
        return h, w

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tokens a resized image of this size becomes."""
        step = self.patch * self.merge
        return height // step, width // step

    def preprocess(self, images):
        return self.preprocess_media(images)

    def preprocess_media(self, items):
        """Each image one frame pair [1, 2, 3, H, W] (the image twice, as the processor repeats it in
        time); each video its frames in pairs [G, 2, 3, H, W]."""
        tiles, replacements, grids, kinds, seconds, sizes = [], [], [], [], [], []
        for i, item in enumerate(items):
            if isinstance(item, VideoFrames):
                pairs, spg = self._video_pairs(item)
                kinds.append("video")
            else:
                h, w = self.target_size(item.shape[0], item.shape[1], i)
                frame = self.norm.apply(im.resize(item, h, w, self.resample) if self.do_resize else item)
                pairs, spg = np.repeat(frame[None, None], self.temporal, axis=1), None
                kinds.append("image")
            tiles.append(pairs)
            rows, cols = self.token_grid(pairs.shape[-2], pairs.shape[-1])
            grids.append((rows, cols))
            seconds.append(spg)
            sizes.append(item.shape[1:3] if isinstance(item, VideoFrames) else item.shape[:2])
            token = self.video_token if kinds[-1] == "video" else self.image_token
            replacements.append(token * (len(pairs) * rows * cols))
        return VisionInputs(tiles, None, [len(t) for t in tiles], replacements, sizes, token_grids=grids,
                            kinds=kinds, seconds_per_group=seconds)

    def _video_plan(self, video: VideoFrames) -> tuple[np.ndarray, float | None, int, int]:
        """A clip's frames as the processor keeps them (sampled where its config asks), their rate,
        and the (H, W) they are resized to."""
        frames, fps = video.frames, video.fps
        if self.video_sample and (self.video_num_frames or self.video_fps):
            try:
                if self.video_num_frames:
                    keep = fixed_count_frame_indices(len(frames), self.video_num_frames, self.temporal)
                else:
                    if fps is None:
                        raise ImageError(f"this model's video processor samples clips at {self.video_fps:g} frames "
                                         "a second, which needs the clip's own frame rate (Video(frames, fps=...))")
                    keep = sample_frame_indices(len(frames), fps, float(self.video_fps), self.temporal,
                                                self.video_min_frames, self.video_max_frames)
            except ImageError as e:
                raise ImageError(f"{video.label}: {e}") from None
            # HF's sampled_fps (a clip without a rate keeps none: positions then take the model's default)
            frames, fps = frames[keep], None if fps is None else len(keep) / len(frames) * fps
        height, width = frames.shape[1:3]
        if max(height, width) / min(height, width) > MAX_ASPECT:
            raise ImageError(f"{video.label}: frames of {width}x{height} pixels are more than {MAX_ASPECT} times "
                             "longer than wide")
        factor = self.patch * self.merge
        max_pixels = self.video_max_pixels
        if self.video_cap_pixels:  # an even share of the clip's budget per frame, floored
            budget = int(self.video_max_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, budget * self.temporal // len(frames)), int(self.video_min_pixels * 1.05))
        h, w = smart_resize(height, width, factor, self.video_min_pixels, max_pixels)
        if not h or not w:
            raise ImageError(f"{video.label}: frames of {width}x{height} pixels are too small for one "
                             f"{factor}-pixel token")
        return frames, fps, h, w

    def video_tokens(self, video: VideoFrames) -> int:
        frames, _, h, w = self._video_plan(video)
        rows, cols = self.token_grid(h, w)
        return -(-len(frames) // self.temporal) * rows * cols

    def _video_pairs(self, video: VideoFrames) -> tuple[np.ndarray, float]:
        """A clip's frames -> [G, 2, 3, H, W] frame pairs and the seconds each pair spans."""
        frames, fps, h, w = self._video_plan(video)
        normed = np.stack([self.video_norm.apply(im.resize(f, h, w, self.video_resample)) for f in frames])
        short = -len(normed) % self.temporal  # an odd last frame is repeated to complete its pair
        if short:
            normed = np.concatenate([normed, np.repeat(normed[-1:], short, axis=0)])
        pairs = normed.reshape(-1, self.temporal, *normed.shape[1:])
        return np.ascontiguousarray(pairs), self.temporal / (fps or UNKNOWN_VIDEO_FPS)

    def verify_image_sizes(self, sizes):
        """verify's images (about 64 pixels a side) fit in one of Qwen2.5-VL's attention windows:
        scaled so that they span two or more (x4 at the released 112-pixel windows)."""
        window = int((self.config.get("vision_config") or {}).get("window_size", 0) or 0) if self.is_25 else 0
        scale = max(1, math.ceil(2 * window / 64))
        return [(h * scale, w * scale) for h, w in sizes]

    # ---- prompt ----
    def count_image_markers(self, text: str) -> int:
        # The chat template writes <|vision_start|><|image_pad|><|vision_end|> per image; a prompt
        # without a template keeps edgelmm's <image> markers.
        return text.count(IMAGE_MARKER) + text.count(self.image_token)

    def count_video_markers(self, text: str) -> int:
        return text.count(VIDEO_MARKER) + text.count(self.video_token)

    def expand_prompt(self, text, vision):
        text = text.replace(IMAGE_MARKER, f"{VISION_START}{self.image_token}{VISION_END}")
        text = text.replace(VIDEO_MARKER, f"{VISION_START}{self.video_token}{VISION_END}")
        return self.substitute_images(text, vision)

    def positions(self, input_ids: np.ndarray, vision: VisionInputs) -> np.ndarray:
        """[3, S] M-RoPE positions of a prompt, as the model's get_rope_index computes them: text runs
        count on from the position after the largest before them; an image's tokens take their
        (row, column) in the token grid, offset by where the image starts, and a video's also their
        frame pair's index in time (Qwen2.5-VL: times tokens_per_second and the seconds a pair
        spans, in float32 and truncated, as the model does); the text after an image or video
        starts after the largest position in it."""
        ids = np.asarray(input_ids)
        out = np.empty((3, len(ids)), np.int64)
        kind = np.zeros(len(ids), np.int8)
        kind[ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            kind[ids == self.video_token_id] = 2
        start, i, k = 0, 0, 0
        while i < len(ids):
            j = i
            while j < len(ids) and kind[j] == kind[i]:
                j += 1
            if not kind[i]:
                out[:, i:j] = start + np.arange(j - i)
                start += j - i
                i = j
                continue
            want = "video" if kind[i] == 2 else "image"
            # a run of media tokens may hold several items of one kind (no text between them)
            while i < j:
                if k >= vision.num_images or vision.kind(k) != want:
                    raise PromptError(f"{want} tokens {i}..{j - 1} of the prompt do not match the prompt's media "
                                      "(images and videos must be separated by text, as the chat template writes "
                                      "them)")
                rows, cols = vision.token_grids[k]
                groups = vision.tiles_per_image[k] if want == "video" else 1
                n = groups * rows * cols
                if i + n > j:
                    raise PromptError(f"{want} tokens {i}..{j - 1} of the prompt are not item {k + 1}'s "
                                      f"{groups}x{rows}x{cols} grid")
                cells = np.arange(rows * cols)
                t = np.zeros(groups, np.int64)
                if want == "video":
                    t = np.arange(groups)
                    if self.is_25:  # pair index x (tokens_per_second x seconds per pair), in float32, truncated
                        step = np.float32(self.tokens_per_second) * np.float32(vision.seconds_per_group[k])
                        t = (t.astype(np.float32) * step).astype(np.int64)
                out[0, i:i + n] = start + np.repeat(t, rows * cols)
                out[1, i:i + n] = start + np.tile(cells // cols, groups)
                out[2, i:i + n] = start + np.tile(cells % cols, groups)
                start = int(out[:, i:i + n].max()) + 1
                k += 1
                i += n
        return out

    # ---- GGUF (llama.cpp's qwen2vl text architecture and qwen2vl_merger / qwen2.5vl_merger) ----
    @property
    def is_25(self) -> bool:
        return self.config.get("model_type") == "qwen2_5_vl"

    def gguf_refusal(self) -> GGUFRefusal | None:
        """What llama.cpp's Qwen graphs (tools/mtmd/models/qwen2vl.cpp) fix that a checkpoint may not."""
        vcfg = self.config.get("vision_config") or {}
        why = []
        if self.temporal != 2:
            why.append(f"llama.cpp splits the patch convolution into two frames; temporal_patch_size is "
                       f"{self.temporal}")
        if self.merge != 2:
            why.append(f"llama.cpp merges 2x2 patches; spatial_merge_size is {self.merge}")
        theta = float((vcfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        if theta != 10000.0:
            why.append(f"llama.cpp's vision rotary uses base 10000; this tower's is {theta:g}")
        if self.is_25 and vcfg.get("hidden_act", "silu") != "silu":
            why.append(f"llama.cpp's qwen2.5vl_merger gates its MLP with SiLU; this tower's is {vcfg['hidden_act']}")
        if self.is_25:
            window = int(vcfg.get("window_size", 112))
            if window != 112:
                why.append(f"llama.cpp's qwen2.5vl_merger attends within 112-pixel windows; this model's are "
                           f"{window} pixels")
            full = sorted(vcfg.get("fullatt_block_indexes") or [])
            every = full[0] + 1 if full else 0
            if not every or full != [i for i in range(int(vcfg.get("depth", 0))) if (i + 1) % every == 0]:
                why.append(f"llama.cpp attends over the whole image on every n-th layer; this model does on "
                           f"layers {full}")
        return GGUFRefusal("; ".join(why)) if why else None

    def gguf_plan(self) -> GGUFPlan:
        vcfg = self.config["vision_config"]
        if self.is_25:
            width, ffn, activation = int(vcfg["hidden_size"]), int(vcfg["intermediate_size"]), "silu"
            block, extra = QWEN25VL_BLOCK, (("clip.vision.n_wa_pattern", sorted(vcfg["fullatt_block_indexes"])[0] + 1),)
        else:
            width = int(vcfg["embed_dim"])
            ffn = int(width * vcfg.get("mlp_ratio", 4))
            activation = "gelu_quick" if vcfg.get("hidden_act", "quick_gelu") == "quick_gelu" else "gelu"
            block, extra = QWEN2VL_BLOCK, ()
        factor = self.patch * self.merge
        # image_size: the largest square image the processor keeps, within clip.cpp's 8192 (it sizes
        # nothing from it for these projectors)
        side = min(int(math.isqrt(self.max_pixels)), 8192) // factor * factor
        shape = ClipShape(max(factor, side), self.patch, width, ffn, int(vcfg["depth"]), int(vcfg["num_heads"]),
                          1e-6, activation)  # HF's vision norms: eps 1e-6
        return GGUFPlan("qwen2.5vl_merger" if self.is_25 else "qwen2vl_merger", "model.visual", (),
                        (("clip.vision.spatial_merge_size", self.merge), *extra), text_arch="qwen2vl",
                        tower_tensors=QWEN2VL_TOWER, blocks="blocks", block_tensors=block, shape=shape)

    # ---- torch ----
    def torch_parts(self, model):
        return TorchParts(vision=vision_function(model.model.visual, self.patch, self.merge, self.temporal),
                          embed_tokens=model.get_input_embeddings(), decoder=model.model.language_model,
                          lm_head=model.lm_head)


def vision_function(visual, patch: int, merge: int, temporal: int):
    """The vision tower over frame pairs of one size, [N, 2, 3, H, W] -> [N, tokens, D], tensor-only
    (an image is a pair of two equal frames; a video's pairs are its consecutive frames).

    The same steps as the model's forward for N pairs of one grid, written without its per-item
    Python loops (which the ONNX exporter would unroll for one image size): the patches cut in the
    processor's block order from the resized frames, 2-D rotary positions from the grid, attention
    within each pair (the model attends within each temporal slice of a video), and the 2x2 merger.

    Qwen2.5-VL's windowed layers: the model reorders the patches window by window and attends
    within each run; attention does not depend on the order of the tokens it is given (each keeps
    its own rotary angles) and the windows move whole 2x2 merge units, so the same result comes
    from attending in place under a same-window mask, with no reordering to undo."""
    import torch

    window = int(getattr(visual, "window_size", 0) or 0)
    full_layers = set(getattr(visual, "fullatt_block_indexes", None) or ())
    units_per_window = window // merge // patch

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(pixel_values, mask=None):
        n_img, frames, c, height, width = pixel_values.shape
        gh, gw = height // patch, width // patch
        bh, bw = gh // merge, gw // merge
        x = pixel_values.reshape(n_img, temporal, c, bh, merge, patch, bw, merge, patch)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                 # N, bh, bw, m, m, C, T, p, p
        hidden = visual.patch_embed(x.reshape(n_img * gh * gw, c * temporal * patch * patch))
        n_patch, dim = gh * gw, hidden.shape[-1]
        hidden = hidden.reshape(n_img, n_patch, dim)

        # Each patch's (row, column), in the same block-by-block order.
        rows = (torch.arange(bh).view(-1, 1, 1, 1) * merge + torch.arange(merge).view(1, 1, -1, 1))
        cols = (torch.arange(bw).view(1, -1, 1, 1) * merge + torch.arange(merge).view(1, 1, 1, -1))
        grid = torch.stack([rows.expand(bh, bw, merge, merge).reshape(-1),
                            cols.expand(bh, bw, merge, merge).reshape(-1)], dim=-1)
        cos, sin = visual.rotary_pos_emb(hidden, grid)          # [n_patch, head_dim], float32
        cos, sin = cos[None, None].float(), sin[None, None].float()
        in_window = None
        if units_per_window:
            window_id = (grid[:, 0] // merge // units_per_window) * bw + grid[:, 1] // merge // units_per_window
            in_window = (window_id[:, None] == window_id[None, :])[None, None]

        for layer, block in enumerate(visual.blocks):
            attn = block.attn
            heads = attn.num_heads
            qkv = attn.qkv(block.norm1(hidden)).reshape(n_img, n_patch, 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)                              # N, heads, patches, head_dim
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
            mask = None if in_window is None or layer in full_layers else in_window
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.proj(out.transpose(1, 2).reshape(n_img, n_patch, dim))
            hidden = hidden + block.mlp(block.norm2(hidden))

        merged = visual.merger(hidden)                           # [N * patches / m^2, D_text]
        return merged.reshape(n_img, n_patch // (merge * merge), merged.shape[-1])

    return forward
