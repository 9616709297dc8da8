"""Idefics3 / SmolVLM (the ~1B class): SigLIP tower on fixed square tiles, pixel-shuffle
connector (image_seq_len tokens per tile), Llama text model.

Large images are resized to multiples of the tile size and split into a grid of tiles plus a
downscaled global image; the prompt names each tile (<row_r_col_c>) and the global image.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .. import images as im
from .base import Family, GGUFPlan, TorchParts, VisionInputs

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TAG = "<global-img>"
MAX_IMAGE_SIZE = 4096


def _rescale_to_max_len(height: int, width: int, max_len: int, min_len: int = 1) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect)
        width += width % 2
    return max(height, min_len), max(width, min_len)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect)
        width = math.ceil(width / tile) * tile
    return height, width


class Idefics3Family(Family):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")

    def __init__(self, files, prompt_style=None):
        super().__init__(files, prompt_style)
        ip = files.image_processor_config
        self.norm = im.Normalization.from_config(ip, im.IMAGENET_STANDARD_MEAN, im.IMAGENET_STANDARD_STD)
        self.longest = int((ip.get("size") or {}).get("longest_edge", 4 * 364))
        self.tile = int((ip.get("max_image_size") or {}).get("longest_edge", 364))
        self.do_resize = ip.get("do_resize", True)
        self.split = bool(ip.get("do_image_splitting", True))
        self.resample = ip.get("resample", 1)
        vcfg = self.config.get("vision_config") or {}
        default_len = ((vcfg.get("image_size", 364) // vcfg.get("patch_size", 14)) ** 2) // (
            self.config.get("scale_factor", 2) ** 2)
        self.seq_len = int(files.processor_config.get("image_seq_len") or default_len)

    def _tiles(self, img: np.ndarray) -> tuple[list[np.ndarray], int, int]:
        if self.do_resize:
            h, w = _rescale_to_max_len(img.shape[0], img.shape[1], self.longest)
            h, w = _scale_below(h, w, MAX_IMAGE_SIZE)
            img = im.resize(img, h, w, self.resample)
        if not self.split:
            return [im.resize(img, self.tile, self.tile, self.resample)], 0, 0
        h, w = _tile_multiple(img.shape[0], img.shape[1], self.tile)
        img = im.resize(img, h, w, self.resample)
        if h > self.tile or w > self.tile:
            rows, cols = (h - self.tile) // self.tile + 1, (w - self.tile) // self.tile + 1
            frames = [img[r * self.tile:(r + 1) * self.tile, c * self.tile:(c + 1) * self.tile]
                      for r in range(rows) for c in range(cols)]
            frames.append(im.resize(img, self.tile, self.tile, self.resample))
            return [np.ascontiguousarray(f) for f in frames], rows, cols
        return [img], 0, 0

    def _replacement(self, rows: int, cols: int) -> str:
        image = self.image_token * self.seq_len
        global_part = f"{FAKE_TOKEN}{GLOBAL_TAG}{image}{FAKE_TOKEN}"
        if rows == 0 and cols == 0:
            return global_part
        grid = ""
        for r in range(rows):
            for c in range(cols):
                grid += f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{image}"
            grid += "\n"
        return grid + "\n" + global_part

    def preprocess(self, images):
        tiles, counts, reps = [], [], []
        for img in images:
            frames, rows, cols = self._tiles(img)
            tiles.extend(self.norm.apply(f) for f in frames)
            counts.append(len(frames))
            reps.append(self._replacement(rows, cols))
        if tiles:
            pixel_values, mask = im.pad_stack(tiles)
        else:
            pixel_values, mask = np.zeros((0, 3, 1, 1), np.float32), np.zeros((0, 1, 1), np.int64)
        return VisionInputs(pixel_values, mask, counts, reps, [i.shape[:2] for i in images])

    def expand_prompt(self, text, vision):
        it = iter(vision.replacements)
        return re.sub(re.escape(self.image_token), lambda _: next(it), text)

    def gguf_plan(self) -> GGUFPlan:
        """llama.cpp's "idefics3" projector: pixel shuffle by scale_factor, then one linear layer."""
        tower = "model.vision_model"
        vcfg = self.config["vision_config"]
        return GGUFPlan("idefics3", tower,
                        (("v.post_ln.weight", f"{tower}.post_layernorm.weight"),
                         ("v.post_ln.bias", f"{tower}.post_layernorm.bias"),
                         ("mm.model.fc.weight", "model.connector.modality_projection.proj.weight")),
                        (("clip.vision.projector.scale_factor", int(self.config.get("scale_factor", 2))),
                         # edgelmm splits images into tiles itself (exactly as the HF processor) and hands
                         # llama.cpp one tile per bitmap; a preprocessing size equal to the tile size keeps
                         # mtmd from splitting again.
                         ("clip.vision.preproc_image_size", vcfg["image_size"])))

    def torch_parts(self, model):
        def vision(pixel_values, mask=None):
            out = model.model.get_image_features(pixel_values=pixel_values[None],
                                                 pixel_attention_mask=None if mask is None else mask[None])
            feats = out.pooler_output[0]
            return feats.reshape(pixel_values.shape[0], -1, feats.shape[-1])

        return TorchParts(vision=vision, embed_tokens=model.get_input_embeddings(),
                          decoder=model.model.text_model, lm_head=model.lm_head)
