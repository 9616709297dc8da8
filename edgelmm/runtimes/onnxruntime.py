"""The ONNX Runtime backend over a bundle's three ONNX graphs.

Provider order TensorRT EP -> CUDA EP -> CPU. onnxruntime-gpu lists CUDA and TensorRT as
available even on a machine without a GPU and then silently falls back to CPU, so what is
reported (and checked against an explicit request) is `session.get_providers()`.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailable, BundleError

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"auto": PROVIDER_ORDER, "tensorrt": PROVIDER_ORDER, "cuda": PROVIDER_ORDER[1:],
                    "cpu": PROVIDER_ORDER[2:]}


def nvidia_gpu_present() -> bool:
    """A desktop GPU shows /dev/nvidia0; a Jetson's integrated GPU shows /dev/nvhost-ctrl-gpu."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/nvhost-ctrl-gpu")


class OrtCache:
    """Past keys/values as numpy arrays, replaced by the decoder's present outputs each step."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    @property
    def length(self) -> int:
        return int(self.arrays[0].shape[2]) if self.arrays else 0


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, provider: str = "auto", threads: int | None = None, precision: str = "fp32"):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed: pip install onnxruntime ({exc})") from None
        if provider not in PROVIDER_ALIASES:
            raise BackendUnavailable(f"unknown provider {provider!r}; choose from {', '.join(PROVIDER_ALIASES)}")
        self.ort = ort
        self.bundle = bundle
        self.precision = precision
        self.requested = provider
        available = set(ort.get_available_providers())
        if provider == "auto" and not nvidia_gpu_present():
            # onnxruntime-gpu lists the GPU providers anyway; trying them only logs load errors.
            available &= {"CPUExecutionProvider"}
        providers = [p for p in PROVIDER_ALIASES[provider] if p in available]
        ort.set_default_logger_severity(3)  # missing CUDA libraries are reported by us, below, not as log spam
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.threads = threads
        self.sessions = {}
        for graph in ("vision", "embed", "decoder"):
            art = bundle.artifact(graph, "onnx", precision)
            path = bundle.path(art)
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # ORT raises its own pybind types for corrupt graphs
                raise BundleError(f"onnxruntime cannot load this graph ({type(exc).__name__}: {exc})", path=str(path)) from None
            want = [i["name"] for i in art["inputs"]]
            got = [i.name for i in sess.get_inputs()]
            if want != got:
                raise BundleError(f"graph inputs {got} do not match the manifest's {want}", path=str(path))
            self.sessions[graph] = sess
        self.providers = self.sessions["decoder"].get_providers()
        if provider in ("cuda", "tensorrt"):
            wanted = "CUDAExecutionProvider" if provider == "cuda" else "TensorrtExecutionProvider"
            if wanted not in self.providers:
                raise BackendUnavailable(
                    f"provider {provider!r} was asked for but the session runs on {self.providers}: "
                    "install onnxruntime-gpu with a matching CUDA (and TensorRT) and check the GPU driver")
        dims = bundle.manifest["text"]
        self.num_layers, self.kv_heads, self.head_dim = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"]
        self.vision_inputs = [i.name for i in self.sessions["vision"].get_inputs()]
        self.past_names = [i.name for i in self.sessions["decoder"].get_inputs()][3:]

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)}
        if "pixel_attention_mask" in self.vision_inputs:
            if pixel_attention_mask is None:
                pixel_attention_mask = np.ones((pixel_values.shape[0],) + pixel_values.shape[2:], np.int64)
            feeds["pixel_attention_mask"] = pixel_attention_mask.astype(np.int64)
        return self.sessions["vision"].run(None, feeds)[0]

    def embed_tokens(self, input_ids):
        return self.sessions["embed"].run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def new_cache(self, batch_size: int = 1) -> OrtCache:
        empty = np.zeros((batch_size, self.kv_heads, 0, self.head_dim), np.float32)
        return OrtCache([empty] * (2 * self.num_layers))

    def decode(self, inputs_embeds, attention_mask, position_ids, cache: OrtCache):
        feeds = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, np.float32),
                 "attention_mask": attention_mask.astype(np.int64), "position_ids": position_ids.astype(np.int64)}
        feeds.update(zip(self.past_names, cache.arrays))
        logits, *present = self.sessions["decoder"].run(None, feeds)
        cache.arrays = present
        return logits

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self.providers, "requested_provider": self.requested,
                "precision": self.precision, "threads": self.threads or "default",
                "onnxruntime": self.ort.__version__}
