"""Tiny offline checkpoints of each supported family, built from config objects and saved with
`save_pretrained`, so tests load them through the same `from_pretrained(dir)` path a user's
downloaded checkpoint takes. Needs the `export` extra (torch, transformers)."""

from ..images import sample_images
from .checkpoints import FAMILY_BUILDERS, build_tiny_checkpoint

__all__ = ["FAMILY_BUILDERS", "build_tiny_checkpoint", "sample_images"]
