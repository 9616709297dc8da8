"""The PyTorch reference backend: the HF model itself, split along the graph contract.
Everything else is measured against it. Needs the `export` extra."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BackendUnavailable, CheckpointError
from ..families import Family


class TorchCache:
    def __init__(self):
        from transformers import DynamicCache

        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())


def load_hf_model(family: Family, dtype: str = "float32", trust_remote_code: bool = False):
    """Load the checkpoint with from_pretrained(local dir), safetensors only, no remote code unless asked."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailable(f"the torch backend needs the export extra: pip install 'edgelmm[export]' ({exc})") from None
    root = family.files.root
    if not any(root.glob("*.safetensors")):
        raise CheckpointError(f"{root}: no *.safetensors weights (edgelmm loads safetensors only, never pickles)")
    cls_name = family.hf_model_class or ""
    cls = getattr(transformers, cls_name, None) or transformers.AutoModelForImageTextToText
    try:
        model = cls.from_pretrained(root, local_files_only=True, use_safetensors=True,
                                    dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{root}: transformers could not load the model ({type(exc).__name__}: {exc})") from None
    return model.eval()


class TorchBackend:
    name = "torch"

    def __init__(self, family: Family, model=None, dtype: str = "float32", threads: int | None = None,
                 trust_remote_code: bool = False, device: str = "cpu"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r} was asked for but torch {torch.__version__} sees no CUDA GPU "
                                     f"({'a CPU-only build' if not torch.version.cuda else 'no GPU or driver'}); "
                                     "install a CUDA build of torch, or use device='cpu'")
        self.device = torch.device(device)
        self.model = model if model is not None else load_hf_model(family, dtype, trust_remote_code)
        self.model.to(self.device)
        self.parts = family.torch_parts(self.model)
        self.dtype = next(self.model.parameters()).dtype

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        with self.torch.inference_mode():
            pv = self._t(pixel_values).to(self.dtype)
            mask = None if pixel_attention_mask is None else self._t(pixel_attention_mask)
            return self.parts.vision(pv, mask).float().cpu().numpy()

    def embed_tokens(self, input_ids):
        with self.torch.inference_mode():
            return self.parts.embed_tokens(self._t(input_ids.astype(np.int64))).float().cpu().numpy()

    def new_cache(self, batch_size: int = 1) -> TorchCache:
        return TorchCache()

    def decode(self, inputs_embeds, attention_mask, position_ids, cache: TorchCache):
        with self.torch.inference_mode():
            out = self.parts.decoder(inputs_embeds=self._t(inputs_embeds).to(self.dtype),
                                     attention_mask=self._t(attention_mask.astype(np.int64)),
                                     position_ids=self._t(position_ids.astype(np.int64)),
                                     past_key_values=cache.cache, use_cache=True)
            hidden = out.last_hidden_state[:, -1:, :]
            return self.parts.lm_head(hidden)[:, -1, :].float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "threads": self.torch.get_num_threads()}
