"""The ONNX Runtime backend over a bundle's three ONNX graphs.

Provider order TensorRT EP -> CUDA EP -> CPU. onnxruntime-gpu lists CUDA and TensorRT as
available even on a machine without a GPU and then silently falls back to CPU, so what is
reported (and checked against an explicit request) is `session.get_providers()`.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..calib import QUANTIZED_PRECISIONS
from ..errors import BackendUnavailable, BundleError
from ..onnx_file import check_external_data
from ..options import check_int, check_threads

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"auto": PROVIDER_ORDER, "tensorrt": PROVIDER_ORDER, "cuda": PROVIDER_ORDER[1:],
                    "cpu": PROVIDER_ORDER[2:]}


def nvidia_gpu_present() -> bool:
    """A desktop GPU shows /dev/nvidia0; a Jetson's integrated GPU shows /dev/nvhost-ctrl-gpu."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/nvhost-ctrl-gpu")


def tensorrt_libraries_load() -> str | None:
    """None when TensorRT 10's libnvinfer loads here, else why not. ONNX Runtime's TensorRT provider
    needs it; without it ORT prints an "EP Error" banner and falls back on its own, so we look first."""
    try:
        ctypes.CDLL("libnvinfer.so.10")
        return None
    except OSError as exc:
        return f"libnvinfer.so.10 (TensorRT 10) does not load: {exc}"


def _np_dtype(ort_type: str):
    return {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(ort_type, np.float32)


@dataclass
class GpuOptions:
    """ONNX Runtime's GPU providers. The TensorRT provider builds an engine per graph on first use
    (minutes on a Jetson), so its engines and timing cache are kept on disk and reused."""
    device_id: int = 0
    fp16: bool = True                  # TensorRT provider: allow fp16 kernels
    # CUDA provider: TF32 matmuls on Ampere and later. Off, so an fp32 graph computes in fp32 and
    # matches the CPU to fp32 limits (on an H100, TF32 moved vision features by 0.019); the fp16
    # graphs are the fast path.
    tf32: bool = False
    engine_cache_dir: str | None = None  # default ~/.cache/edgelmm/ort-tensorrt/<decoder hash>-<precision>

    def provider_options(self, provider: str, bundle: Bundle, precision: str) -> dict[str, Any]:
        if provider == "CUDAExecutionProvider":
            return {"device_id": self.device_id, "use_tf32": int(self.tf32)}
        if provider != "TensorrtExecutionProvider":
            return {}
        # Keyed by the decoder graph's hash: another bundle, or a re-export, never reuses stale engines.
        key = bundle.artifact("decoder", "onnx", precision)["sha256"][:16]
        cache = self.engine_cache_dir or str(Path(os.environ.get("EDGELMM_CACHE", Path.home() / ".cache" / "edgelmm"))
                                             / "ort-tensorrt" / f"{key}-{precision}")
        return {"device_id": self.device_id, "trt_fp16_enable": self.fp16,
                # QDQ graphs (calibrated INT8 vision) run as INT8 only with this on
                "trt_int8_enable": precision.startswith("int8"),
                "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}


# Tiles per vision-graph run: enough to keep the matmuls efficient, few enough that the arena stays
# bounded whatever the number of images in a prompt: at most VISION_CHUNK, and at most what keeps
# one layer's attention scores [tiles, heads, patches, patches] within VISION_SCORES_BYTES (the
# arena keeps its largest run: SmolVLM's 1024-patch tiles four at a time held ~3 GB).
VISION_CHUNK = 4
VISION_SCORES_BYTES = 64 << 20


def vision_chunk_for(vision_config: dict) -> int:
    """Tiles per vision run for a tower of this config (image_size, patch_size, num_attention_heads)."""
    try:
        side = int(vision_config["image_size"]) // int(vision_config["patch_size"])
        heads = int(vision_config.get("num_attention_heads", 1))
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return VISION_CHUNK
    patches = side * side + 1  # CLIP's class token; one row more is harmless for SigLIP
    return max(1, min(VISION_CHUNK, VISION_SCORES_BYTES // max(1, heads * patches * patches * 4)))


# Prompt positions per decoder run in a prefill (see OnnxRuntimeBackend.decode).
PREFILL_CHUNK = 512
# On the CPU provider ONNX Runtime maps a graph's external data and, by default, packs every MatMul
# weight into a heap copy for its GEMM kernels: 1.5x the weights resident. Graphs above this size
# run from the mapped weights instead (prefill ~15% slower, decode the same, measured on a 200M
# model; 1.0x resident): from SmolVLM-256M's 0.5 GB decoder up, memory decides what runs at all
# (a two-photo SmolVLM run on a 2.5 GB budget). Small graphs and quantized ones keep the packed kernels.
PREPACK_LIMIT = 256 << 20


class OrtCache:
    """Past keys/values, replaced by the decoder's present outputs each step. With IO binding they
    are OrtValues that stay where the decoder wrote them (GPU memory under CUDA/TensorRT), so the
    cache never crosses to the host between steps; without it, numpy arrays."""

    def __init__(self, values: list):
        self.values = values

    @property
    def length(self) -> int:
        if not self.values:
            return 0
        v = self.values[0]
        return int((v.shape() if callable(v.shape) else v.shape)[2])


class OnnxRuntimeBackend:
    name = "onnxruntime"
    # InferenceSession.run may be called from several threads at once (`edgelmm watch` encodes
    # frames while its verifier decodes); the KV cache is per generation, so nothing is shared.
    thread_safe = True

    def __init__(self, bundle: Bundle, provider: str = "auto", threads: int | None = None, precision: str = "fp32",
                 io_binding: bool | None = None, gpu: GpuOptions | None = None, vision_chunk: int = VISION_CHUNK,
                 prefill_chunk: int = PREFILL_CHUNK):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed: pip install onnxruntime ({exc})") from None
        if provider not in PROVIDER_ALIASES:
            raise BackendUnavailable(f"unknown provider {provider!r}; choose from {', '.join(PROVIDER_ALIASES)}")
        check_threads(threads)  # ORT starts every thread when a session is created: 100000 stalls it
        self.ort = ort
        self.bundle = bundle
        self.precision = precision
        self.requested = provider
        available = set(ort.get_available_providers())
        if provider == "auto" and not nvidia_gpu_present():
            # onnxruntime-gpu lists the GPU providers anyway; trying them only logs load errors.
            available &= {"CPUExecutionProvider"}
        if "TensorrtExecutionProvider" in available and provider in ("auto", "tensorrt"):
            missing = tensorrt_libraries_load()
            if missing and provider == "tensorrt":
                raise BackendUnavailable(f"provider 'tensorrt' was asked for but {missing}: install TensorRT 10 "
                                         "(JetPack has it; on a desktop the tensorrt wheels) or use provider='cuda'")
            if missing:
                available.discard("TensorrtExecutionProvider")
        self.gpu = gpu or GpuOptions()
        providers = [p for p in PROVIDER_ALIASES[provider] if p in available]
        providers = [(p, self.gpu.provider_options(p, bundle, precision)) for p in providers]
        ort.set_default_logger_severity(3)  # missing CUDA libraries are reported by us, below, not as log spam

        def session_options(prepack: bool):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            if not prepack:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            return opts

        self.threads = threads
        self.vision_chunk = check_int("vision_chunk", vision_chunk, 1)
        self.prefill_chunk = check_int("prefill_chunk", prefill_chunk, 1)
        self.sessions, self.prepacked = {}, {}
        for graph in ("vision", "embed", "decoder"):
            art = bundle.artifact(graph, "onnx", precision)
            path = bundle.path(art)
            # ONNX Runtime opens the graph's external data itself: only files the manifest hashes.
            check_external_data(bundle.root, art["file"], {e["file"] for e in art["files"]})
            # Quantized graphs keep their packed kernels whatever their size: MatMulNBits unpacked
            # decodes a Mantis-1B INT4 decoder at 0.3 tokens/s instead of 2.6, in about the same memory.
            quantized = QUANTIZED_PRECISIONS.get(precision, {}).get(graph, "fp32") != "fp32"
            self.prepacked[graph] = quantized or sum(f["size"] for f in art["files"]) < PREPACK_LIMIT
            try:
                sess = ort.InferenceSession(str(path), sess_options=session_options(self.prepacked[graph]),
                                            providers=providers)
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
        self.present_names = [o.name for o in self.sessions["decoder"].get_outputs()][1:]
        if len(self.past_names) != 2 * self.num_layers or len(self.present_names) != 2 * self.num_layers:
            raise BundleError(f"the manifest's text.num_layers is {self.num_layers} but the decoder graph takes "
                              f"{len(self.past_names)} past and gives {len(self.present_names)} present tensors "
                              "(two per layer)", path=str(bundle.root / "edgelmm.json"))
        for inp in self.sessions["decoder"].get_inputs()[3:]:  # [batch, kv_heads, past, head_dim]
            fixed = [d if isinstance(d, int) else None for d in inp.shape]  # symbolic axes are strings
            if len(fixed) != 4 or fixed[1] not in (None, self.kv_heads) or fixed[3] not in (None, self.head_dim):
                raise BundleError(f"the decoder graph's {inp.name} has shape {inp.shape} but the manifest's text says "
                                  f"{self.kv_heads} KV heads of {self.head_dim}", path=str(bundle.root / "edgelmm.json"))
        for graph in ("vision", "embed"):
            outputs = len(self.sessions[graph].get_outputs())
            if outputs != 1:
                raise BundleError(f"the {graph} graph gives {outputs} outputs, not one",
                                  path=str(bundle.path(bundle.artifact(graph, "onnx", precision))))
        # fp16 graphs take and give fp16; the backend contract stays float32 at the boundary.
        self.pixel_dtype = _np_dtype(self.sessions["vision"].get_inputs()[0].type)
        self.kv_dtype = _np_dtype(self.sessions["decoder"].get_inputs()[0].type)
        # Where the KV cache lives between steps: on the GPU when a GPU provider runs the decoder.
        self.kv_device = "cuda" if self.providers[0] in PROVIDER_ORDER[:2] else "cpu"
        # IO binding by default only where it saves copies: on the CPU provider numpy feeds are
        # already zero-copy, and binding measured no faster (7.53 vs 7.45 ms/token on a 60M model).
        self.io_binding = self.kv_device == "cuda" if io_binding is None else io_binding

    def vision_feeds(self, pixel_values, pixel_attention_mask=None) -> dict[str, np.ndarray]:
        """The vision graph's inputs, as ONNX Runtime takes them (calibration records these)."""
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, self.pixel_dtype)}
        if "pixel_attention_mask" in self.vision_inputs:
            if pixel_attention_mask is None:
                pixel_attention_mask = np.ones((pixel_values.shape[0],) + pixel_values.shape[2:], np.int64)
            feeds["pixel_attention_mask"] = pixel_attention_mask.astype(np.int64)
        return feeds

    def prefill_feeds(self, inputs_embeds) -> dict[str, np.ndarray]:
        """The decoder's inputs for a batch-1 prefill with an empty cache (calibration records these)."""
        n = inputs_embeds.shape[1]
        feeds = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, self.kv_dtype),
                 "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n, dtype=np.int64)[None]}
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        feeds.update((name, empty) for name in self.past_names)
        return feeds

    def _run(self, graph: str, feeds: dict[str, Any]) -> list:
        """session.run, with ONNX Runtime's own error types (a graph whose shapes disagree with its
        manifest, a damaged graph that loaded) turned into a BundleError naming the graph's file."""
        try:
            return self.sessions[graph].run(None, feeds)
        except Exception as exc:  # ORT raises pybind types (InvalidArgument, Fail, RuntimeException)
            path = self.bundle.path(self.bundle.artifact(graph, "onnx", self.precision))
            raise BundleError(f"onnxruntime failed to run this graph ({type(exc).__name__}: {str(exc)[:500]})",
                              path=str(path)) from None

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        """Tiles go through the vision graph `vision_chunk` at a time: ONNX Runtime's arena keeps the
        largest batch it has seen, so one batch of every tile of a prompt (26 for two photos on
        SmolVLM) would hold gigabytes for the rest of the session."""
        out = []
        for start in range(0, max(len(pixel_values), 1), self.vision_chunk):
            end = start + self.vision_chunk
            mask = None if pixel_attention_mask is None else pixel_attention_mask[start:end]
            out.append(self._run("vision", self.vision_feeds(pixel_values[start:end], mask))[0])
        return np.concatenate(out).astype(np.float32, copy=False)

    def embed_tokens(self, input_ids):
        return self._run("embed", {"input_ids": input_ids.astype(np.int64)})[0].astype(np.float32, copy=False)

    def new_cache(self, batch_size: int = 1) -> OrtCache:
        empty = np.zeros((batch_size, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        if self.io_binding:
            empty = self.ort.OrtValue.ortvalue_from_numpy(empty, self.kv_device, 0)
        return OrtCache([empty] * (2 * self.num_layers))

    def decode(self, inputs_embeds, attention_mask, position_ids, cache: OrtCache):
        """A long prefill runs through the KV cache in chunks of `prefill_chunk` positions: each
        chunk's attention scores against the past, not the whole prompt's against itself at once (a
        three-image Mantis-1B prompt of 2187 tokens: 612 MB per score tensor, and several of them)."""
        n, chunk = inputs_embeds.shape[1], self.prefill_chunk
        past = attention_mask.shape[1] - n
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = self._decode_once(inputs_embeds[:, start:end], attention_mask[:, :past + end],
                                       position_ids[:, start:end], cache)
        return logits

    def _decode_once(self, inputs_embeds, attention_mask, position_ids, cache: OrtCache):
        feeds = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, self.kv_dtype),
                 "attention_mask": np.ascontiguousarray(attention_mask, np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, np.int64)}
        session = self.sessions["decoder"]
        if not self.io_binding:
            feeds.update(zip(self.past_names, cache.values))
            logits, *present = self._run("decoder", feeds)
            cache.values = present
            return logits.astype(np.float32, copy=False)
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, cache.values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the sampler runs on the host
        for name in self.present_names:
            binding.bind_output(name, self.kv_device)
        session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        cache.values = present
        return logits.numpy().astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self.providers, "requested_provider": self.requested,
                "precision": self.precision, "threads": self.threads or "default",
                "io_binding": self.io_binding, "kv_device": self.kv_device if self.io_binding else "host",
                "prepacked_weights": self.prepacked,
                "provider_options": (self.sessions["decoder"].get_provider_options().get(self.providers[0], {})
                                     if self.kv_device == "cuda" else {}),
                "onnxruntime": self.ort.__version__}
