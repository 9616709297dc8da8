"""LLaVA architecture: a SigLIP or CLIP vision tower, an MLP projector and a Llama text model.
Covers Mantis-8B-siglip-llama3, Mantis-8B-clip-llama3 and LLaVA-1.5.

Every image becomes a fixed number of tokens (patches, minus CLS under the "default" feature
strategy). Mantis checkpoints number the images in the text: the i-th marker becomes
"(image i: <Image><image></Image>)", as Mantis' own processor writes it.
"""

from __future__ import annotations

import re

import numpy as np

from .. import images as im
from ..errors import CheckpointError, PromptError
from .base import Family, GGUFPlan, GGUFRefusal, TorchParts, VisionInputs

MANTIS_LABEL = "(image {n}: <Image>{marker}</Image>)"


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)

    def __init__(self, files, prompt_style=None):
        if prompt_style is None:
            # Mantis publishes plain LlavaForConditionalGeneration checkpoints; its name is the only mark.
            hint = f"{files.root.name} {files.config.get('_name_or_path', '')}".lower()
            prompt_style = "mantis" if "mantis" in hint else "plain"
        if prompt_style not in ("mantis", "plain"):
            raise PromptError(f"llava prompt style must be 'mantis' or 'plain', got {prompt_style!r}")
        super().__init__(files, prompt_style)
        ip = files.image_processor_config
        self.ip_type = ip.get("image_processor_type", "")
        vcfg = self.config.get("vision_config") or {}
        self.vision_type = vcfg.get("model_type", "clip_vision_model")
        defaults = (im.IMAGENET_STANDARD_MEAN, im.IMAGENET_STANDARD_STD) if "siglip" in self.vision_type.lower() \
            else (im.OPENAI_CLIP_MEAN, im.OPENAI_CLIP_STD)
        self.norm = im.Normalization.from_config(ip, *defaults)
        self.size = ip.get("size") or {}
        self.crop = ip.get("crop_size") if ip.get("do_center_crop", "crop_size" in ip) else None
        self.do_resize = ip.get("do_resize", True)
        self.do_pad_square = bool(ip.get("do_pad", False)) and "Llava" in self.ip_type
        self.resample = ip.get("resample", 3)
        pc = files.processor_config
        self.patch_size = int(pc.get("patch_size") or vcfg.get("patch_size") or 14)
        self.strategy = pc.get("vision_feature_select_strategy") or self.config.get(
            "vision_feature_select_strategy", "default")
        has_cls = "clip" in self.vision_type.lower() and "siglip" not in self.vision_type.lower()
        self.additional_tokens = int(pc.get("num_additional_image_tokens", 1 if has_cls else 0))

    def _process_one(self, img: np.ndarray) -> np.ndarray:
        if self.do_pad_square:
            img = im.pad_to_square(img, tuple(int(m * 255) for m in self.norm.mean))
        if self.do_resize:
            if "height" in self.size and "width" in self.size:
                h, w = self.size["height"], self.size["width"]
            elif "shortest_edge" in self.size:
                h, w = im.shortest_edge_size(img.shape[0], img.shape[1], self.size["shortest_edge"])
            else:
                raise CheckpointError(f"{self.files.root}: unsupported image processor size {self.size}")
            img = im.resize(img, h, w, self.resample)
        if self.crop:
            img = im.center_crop(img, self.crop["height"], self.crop["width"])
        return self.norm.apply(img)

    def tokens_for(self, height: int, width: int) -> int:
        n = (height // self.patch_size) * (width // self.patch_size) + self.additional_tokens
        return n - 1 if self.strategy == "default" else n

    def preprocess(self, images):
        tiles = [self._process_one(img) for img in images]
        if tiles:
            pixel_values = np.stack(tiles)
        else:
            pixel_values = np.zeros((0, 3, 1, 1), np.float32)
        replacements = [self.image_token * self.tokens_for(t.shape[1], t.shape[2]) for t in tiles]
        return VisionInputs(pixel_values, None, [1] * len(tiles), replacements, [i.shape[:2] for i in images])

    def label_images(self, text: str) -> str:
        """Mantis numbering, applied to the rendered prompt before token expansion."""
        if self.prompt_style != "mantis":
            return text
        counter = iter(range(1, text.count(self.image_marker) + 1))
        return re.sub(re.escape(self.image_marker),
                      lambda _: MANTIS_LABEL.format(n=next(counter), marker=self.image_marker), text)

    def expand_prompt(self, text, vision):
        return self.substitute_images(self.label_images(text), vision)

    def gguf_refusal(self) -> GGUFRefusal | None:
        if "siglip" not in self.vision_type:
            return GGUFRefusal("a CLIP vision tower has a CLS token, and llama.cpp's llava graph places it after the "
                               "patches instead of before them, which shifts every position embedding and gives "
                               "wrong image features (cosine ~0.6 vs PyTorch). Pass --force to write it anyway; "
                               "`edgelmm verify` will show the damage", forceable=True)
        if self.strategy == "default":
            return GGUFRefusal("vision_feature_select_strategy 'default' drops the first patch of a SigLIP tower (it "
                               "has no CLS token); llama.cpp keeps every patch")
        return None

    def gguf_plan(self) -> GGUFPlan:
        """llama.cpp's "mlp" projector: the two linear layers of the multi-modal projector."""
        n_layers = (self.config.get("vision_config") or {})["num_hidden_layers"]
        layer = self.config.get("vision_feature_layer", -2)
        layers = [layer] if isinstance(layer, int) else list(layer)
        # llama.cpp numbers feature layers as HF's hidden_states index (0 = the encoder's input).
        feature_layers = [n if n >= 0 else n_layers + 1 + n for n in layers]
        proj = "model.multi_modal_projector"
        return GGUFPlan("mlp", "model.vision_tower",
                        (("mm.0.weight", f"{proj}.linear_1.weight"), ("mm.0.bias", f"{proj}.linear_1.bias"),
                         ("mm.2.weight", f"{proj}.linear_2.weight"), ("mm.2.bias", f"{proj}.linear_2.bias")),
                        (("clip.vision.feature_layer", feature_layers),))

    def torch_parts(self, model):
        layer = self.config.get("vision_feature_layer", -2)
        strategy = self.config.get("vision_feature_select_strategy", "default")

        import torch

        layers = [layer] if isinstance(layer, int) else list(layer)

        # The same steps as HF's get_image_features, but tensor-only: HF returns a Python list per
        # image, which the ONNX exporter would unroll to a fixed image count.
        def vision(pixel_values, mask=None):
            out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            picked = [out.hidden_states[i] for i in layers]
            if strategy == "default":
                picked = [h[:, 1:] for h in picked]
            return model.model.multi_modal_projector(torch.cat(picked, dim=-1))

        return TorchParts(vision=vision, embed_tokens=model.get_input_embeddings(),
                          decoder=model.model.language_model, lm_head=model.lm_head)
