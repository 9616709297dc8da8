"""The public entry points: `load` a checkpoint (or, later, a bundle) into a Pipeline."""

from __future__ import annotations

from pathlib import Path

from .errors import BackendUnavailable
from .families import detect
from .modelfiles import ModelFiles
from .pipeline import Pipeline

BACKENDS = ("auto", "torch")


def load(path: str | Path, backend: str = "auto", *, prompt_style: str | None = None,
         threads: int | None = None, trust_remote_code: bool = False) -> Pipeline:
    """Open a HF checkpoint directory and return a Pipeline over the chosen backend.

    backend: "auto" picks the best available; "torch" is the PyTorch reference.
    prompt_style: llava family only, "mantis" (numbered images) or "plain"; default from the checkpoint name.
    """
    files = ModelFiles.open(path)
    family = detect(files, prompt_style=prompt_style)
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; available for a checkpoint: {', '.join(BACKENDS)}")
    from .runtimes.torch import TorchBackend

    return Pipeline(files, family, TorchBackend(family, threads=threads, trust_remote_code=trust_remote_code))


def info(path: str | Path, prompt_style: str | None = None, sizes=((224, 224), (480, 640), (1080, 1920))) -> dict:
    """What edgelmm knows about a checkpoint without loading weights: family, prompt style, and
    how many tokens images of a few sizes become."""
    files = ModelFiles.open(path)
    family = detect(files, prompt_style=prompt_style)
    return {
        **family.describe(),
        "architecture": family.hf_model_class,
        "context_length": files.context_length,
        "image_token": family.image_token,
        "chat_template": files.chat_template is not None,
        "image_tokens": [{"height": h, "width": w, "tokens": family.num_image_tokens(h, w)} for h, w in sizes],
    }
