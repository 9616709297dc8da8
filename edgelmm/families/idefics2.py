"""Idefics2 (Mantis-8B-Idefics2): SigLIP-style vision tower with native aspect ratio (padded
tiles + pixel mask), a perceiver resampler giving `image_seq_len` tokens per tile, Mistral text.

With image splitting each image becomes its 4 quadrants plus the whole image (5 tiles); the
prompt wraps each tile's tokens in <fake_token_around_image>.
"""

from __future__ import annotations

import re

import numpy as np

from .. import images as im
from .base import Family, GGUFRefusal, TorchParts, VisionInputs

FAKE_TOKEN = "<fake_token_around_image>"


def idefics2_resize_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > longest:
        width = longest
        height = int(width / aspect)
    elif height > width and height > longest:
        height = longest
        width = int(height * aspect)
    return max(height, shortest), max(width, shortest)


class Idefics2Family(Family):
    name = "idefics2"
    model_types = ("idefics2",)
    variable_tile_size = True

    def __init__(self, files, prompt_style=None):
        super().__init__(files, prompt_style)
        ip = files.image_processor_config
        self.norm = im.Normalization.from_config(ip, im.IMAGENET_STANDARD_MEAN, im.IMAGENET_STANDARD_STD)
        self.size = ip.get("size") or {"shortest_edge": 378, "longest_edge": 980}
        self.do_resize = ip.get("do_resize", True)
        self.resample = ip.get("resample", 2)
        self.split = bool(ip.get("do_image_splitting", False))
        perceiver = self.config.get("perceiver_config") or {}
        self.seq_len = int(files.processor_config.get("image_seq_len") or perceiver.get("resampler_n_latents", 64))

    def _tiles(self, img: np.ndarray) -> list[np.ndarray]:
        parts = [img]
        if self.split:
            h, w = img.shape[:2]
            mh, mw = h // 2, w // 2
            parts = [img[:mh, :mw], img[:mh, mw:], img[mh:, :mw], img[mh:, mw:], img]
        out = []
        for p in parts:
            if self.do_resize:
                if "shortest_edge" in self.size and "longest_edge" in self.size:
                    h, w = idefics2_resize_size(p.shape[0], p.shape[1], self.size["shortest_edge"],
                                                self.size["longest_edge"])
                else:
                    h, w = self.size["height"], self.size["width"]
                p = im.resize(np.ascontiguousarray(p), h, w, self.resample)
            out.append(self.norm.apply(p))
        return out

    def preprocess(self, images):
        tiles, counts = [], []
        for img in images:
            t = self._tiles(img)
            tiles.extend(t)
            counts.append(len(t))
        if tiles:
            pixel_values, mask = im.pad_stack(tiles)
        else:
            pixel_values, mask = np.zeros((0, 3, 1, 1), np.float32), np.zeros((0, 1, 1), np.int64)
        one = f"{FAKE_TOKEN}{self.image_token * self.seq_len}{FAKE_TOKEN}"
        reps = [one * n for n in counts]
        return VisionInputs(pixel_values, mask, counts, reps, [i.shape[:2] for i in images])

    def expand_prompt(self, text, vision):
        # Same string surgery as the HF Idefics2 processor: every marker expands alike, adjacent
        # fake tokens collapse, and a word glued to a closing fake token gets a space.
        one = f"{FAKE_TOKEN}{self.image_token * self.seq_len}{FAKE_TOKEN}"
        image_str = one * 5 if self.split else one
        text = text.replace(self.image_token, image_str)
        text = text.replace(FAKE_TOKEN + FAKE_TOKEN, FAKE_TOKEN)
        return re.sub(rf"{re.escape(FAKE_TOKEN)}(?=[^\s<])", f"{FAKE_TOKEN} ", text)

    def gguf_refusal(self) -> GGUFRefusal:
        return GGUFRefusal("llama.cpp has no projector for Idefics2 (its perceiver resampler); export ONNX instead "
                           "(--format onnx)")

    def torch_parts(self, model):
        def vision(pixel_values, mask=None):
            out = model.model.get_image_features(pixel_values=pixel_values[None],
                                                 pixel_attention_mask=None if mask is None else mask[None])
            feats = out.pooler_output[0]
            return feats.reshape(pixel_values.shape[0], -1, feats.shape[-1])

        return TorchParts(vision=vision, embed_tokens=model.get_input_embeddings(),
                          decoder=model.model.text_model, lm_head=model.lm_head)
