"""The PyTorch reference backend: the HF model itself, split along the graph contract.
Everything else is measured against it. Needs the `export` extra."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BackendUnavailable, CheckpointError
from ..families import Family
from ..options import default_threads
from .base import Capabilities


VISION_CHUNK = 4  # tiles per vision-tower call


class TorchCache:
    def __init__(self):
        from transformers import DynamicCache

        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())


def cache_argument(decoder, cache) -> dict[str, Any]:
    """The KV cache as the text model's forward takes it: `cache=` since transformers renamed
    `past_key_values` (which now warns on every call), `past_key_values=` before."""
    import inspect

    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return {name: cache}


def returned_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def load_hf_model(family: Family, dtype: str = "float32", trust_remote_code: bool = False):
    """Load the checkpoint with from_pretrained(local dir), safetensors only, no remote code unless asked.

    An fp32 model from a checkpoint stored in one 16-bit type loads in that type first (mapped from
    the files, nothing read yet) and is then upcast tensor by tensor, each tensor's file pages let
    go once it is converted: the peak is the fp32 model, not the fp32 model beside the whole mapped
    file (a bf16 Mantis-1B: 9.7 -> ~7 GB; a 3B: ~21 -> ~14 GB). bf16/fp16 -> fp32 is exact, so the
    weights are those from_pretrained(dtype=float32) gives (a test compares them tensor by tensor)."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailable(f"the torch backend needs the export extra: pip install 'edgelmm[export]' ({exc})") from None
    from ..memory import checkpoint_float_dtype

    root = family.files.root
    if not any(root.glob("*.safetensors")):
        raise CheckpointError(f"{root}: no *.safetensors weights (edgelmm loads safetensors only, never pickles)")
    cls_name = family.hf_model_class or ""
    cls = getattr(transformers, cls_name, None) or transformers.AutoModelForImageTextToText
    stored = {"BF16": torch.bfloat16, "F16": torch.float16}.get(checkpoint_float_dtype(root) or "")
    upcast = dtype == "float32" and stored is not None
    # edgelmm's own progress line says "loading"; transformers' bar would write a frame per tensor
    # group into logs (and fight a live status on a terminal). Put back as it was afterwards.
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(root, local_files_only=True, use_safetensors=True,
                                    dtype=stored if upcast else getattr(torch, dtype),
                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{root}: transformers could not load the model ({type(exc).__name__}: {exc})") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if upcast:
        upcast_releasing_pages(model, torch.float32)
    return model.eval()


def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files ending in `suffix` (Linux /proc)."""
    ranges = []
    try:
        for line in open("/proc/self/maps"):
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip().endswith(suffix):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    except (OSError, ValueError):
        return []
    return ranges


def upcast_releasing_pages(model, dtype) -> None:
    """Convert every floating parameter and buffer to `dtype` one at a time. Where the old tensor
    lies in a mapped safetensors file and nothing else shares it, its pages are handed back
    (madvise DONTNEED: the mapping is file-backed, so this only drops what the process has read),
    keeping the resident peak at the converted model instead of the converted model plus the file."""
    import ctypes
    import mmap

    import torch

    mapped = _file_mappings(".safetensors")
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        madvise = None
    page = mmap.PAGESIZE
    tensors = [(m, name, t, isinstance(t, torch.nn.Parameter))
               for m in model.modules() for name, t in list(m._parameters.items()) + list(m._buffers.items())
               if t is not None]
    users: dict[int, set[int]] = {}  # data address -> the tensors there (a tied weight is one tensor)
    for _m, _n, t, _p in tensors:
        users.setdefault(t.data_ptr(), set()).add(id(t))
    done: dict[int, object] = {}  # one converted tensor per old one: tied weights stay tied
    for module, name, t, is_param in tensors:
        if not t.is_floating_point() or t.dtype == dtype:
            continue
        key = id(t)
        if key not in done:
            start, nbytes = t.data_ptr(), t.numel() * t.element_size()
            converted = t.data.to(dtype)
            if is_param:
                t.data = converted
                done[key] = t
            else:
                done[key] = converted
                module._buffers[name] = converted
            first, last = -(-start // page) * page, (start + nbytes) // page * page
            if (madvise is not None and len(users[start]) == 1 and last > first
                    and any(lo <= start and start + nbytes <= hi for lo, hi in mapped)):
                madvise(first, last - first, getattr(mmap, "MADV_DONTNEED", 4))
        elif not is_param:
            module._buffers[name] = done[key]
    if hasattr(model, "config"):
        model.config.dtype = dtype


class TorchBackend:
    name = "torch"
    capabilities = Capabilities()   # the reference: one generation at a time, the Pipeline's tokenizer

    def __init__(self, family: Family, model=None, dtype: str = "float32", threads: int | None = None,
                 trust_remote_code: bool = False, device: str = "cpu"):
        import torch

        threads = threads or default_threads()
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
        """VISION_CHUNK tiles per vision-tower call: SmolVLM makes 17 tiles of every image, and one
        call over a three-image prompt's 51 tiles holds ~2.5 GB of attention scores per layer."""
        out = []
        with self.torch.inference_mode():
            for start in range(0, max(len(pixel_values), 1), VISION_CHUNK):
                end = start + VISION_CHUNK
                pv = self._t(pixel_values[start:end]).to(self.dtype)
                mask = None if pixel_attention_mask is None else self._t(pixel_attention_mask[start:end])
                out.append(self.parts.vision(pv, mask).float().cpu().numpy())
        return np.concatenate(out)

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
                                     use_cache=True, **cache_argument(self.parts.decoder, cache.cache))
            hidden = out.last_hidden_state[:, -1:, :]
            return self.parts.lm_head(hidden)[:, -1, :].float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "threads": self.torch.get_num_threads()}
