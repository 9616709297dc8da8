"""Model families, one per file. `detect` picks the family of a checkpoint from its config."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..modelfiles import ModelFiles
from .base import Family, TorchParts, VisionInputs
from .idefics2 import Idefics2Family
from .idefics3 import Idefics3Family
from .llava import LlavaFamily
from .qwen2vl import Qwen2VLFamily

FAMILIES: tuple[type[Family], ...] = (LlavaFamily, Idefics2Family, Idefics3Family, Qwen2VLFamily)


def family_class(config: dict, where: str = "") -> type[Family]:
    for cls in FAMILIES:
        if cls.matches(config):
            return cls
    supported = ", ".join(t for cls in FAMILIES for t in cls.model_types)
    raise UnsupportedModelError(
        f"{where + ': ' if where else ''}model_type {config.get('model_type')!r} is not supported "
        f"(supported: {supported})")


def detect(files: ModelFiles, prompt_style: str | None = None) -> Family:
    return family_class(files.config, str(files.root))(files, prompt_style=prompt_style)


__all__ = ["FAMILIES", "Family", "TorchParts", "VisionInputs", "detect", "family_class",
           "LlavaFamily", "Idefics2Family", "Idefics3Family", "Qwen2VLFamily"]
