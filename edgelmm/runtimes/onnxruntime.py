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
from ..errors import BackendUnavailable, BundleError, PromptError
from ..manifest import FUSED_DECODER as FUSED_GRAPH, QUANTIZED_PRECISIONS
from ..onnx_file import check_external_data
from ..options import check_int, check_threads, default_threads
from .base import Capabilities
from .ort_fused import CUDA_GRAPH_CONTEXT, FUSED_FIRST_PAST, FUSED_INITIAL_CAPACITY, FusedCache, GraphSlots

__all__ = ["OnnxRuntimeBackend", "GpuOptions", "FusedCache", "FUSED_INITIAL_CAPACITY"]

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
    # CUDA provider, fused fp16 decoder: each decode step captured once as a CUDA graph and replayed
    # (one launch instead of hundreds of kernels), over buffers of cuda_graph_context positions per
    # batch size kept for the backend's life (runtimes/ort_fused.GraphSlots).
    cuda_graph: bool = False
    cuda_graph_context: int = CUDA_GRAPH_CONTEXT

    def provider_options(self, provider: str, bundle: Bundle, precision: str, graph: str = "decoder") -> dict[str, Any]:
        if provider == "CUDAExecutionProvider":
            options = {"device_id": self.device_id, "use_tf32": int(self.tf32)}
            if self.cuda_graph and graph == "decoder":  # the vision and embed graphs run as before
                options["enable_cuda_graph"] = 1
            return options
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
    capabilities = Capabilities(thread_safe=True, greedy_ids=True)

    def __init__(self, bundle: Bundle, provider: str = "auto", threads: int | None = None, precision: str = "fp32",
                 io_binding: bool | None = None, gpu: GpuOptions | None = None, vision_chunk: int = VISION_CHUNK,
                 prefill_chunk: int = PREFILL_CHUNK, layout: str = "auto"):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed: pip install onnxruntime ({exc})") from None
        if provider not in PROVIDER_ALIASES:
            raise BackendUnavailable(f"unknown provider {provider!r}; choose from {', '.join(PROVIDER_ALIASES)}")
        check_threads(threads)  # ORT starts every thread when a session is created: 100000 stalls it
        threads = threads or default_threads()
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
        if self.gpu.cuda_graph:
            check_int("cuda_graph_context", self.gpu.cuda_graph_context, 1)
            if provider != "cuda":
                raise BackendUnavailable(f"cuda_graph captures the decode step on ONNX Runtime's CUDA provider: ask "
                                         f"for provider 'cuda' (this load asked for {provider!r})")
        names = [p for p in PROVIDER_ALIASES[provider] if p in available]
        ort.set_default_logger_severity(3)  # missing CUDA libraries are reported by us, below, not as log spam

        def session_options(prepack: bool):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            if not prepack:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            # Signed QDQ stays signed: ONNX Runtime's x86 rewrite of s8 Q/DQ to u8 leaves an opset-21
            # QuantizeLinear with output_dtype INT8 beside a UINT8 zero point, and the session fails
            # to load (the TensorRT graphs are opset 21). u8-calibrated graphs are not affected.
            opts.add_session_config_entry("session.qdqisint8allowed", "1")
            return opts

        self.threads = threads
        self.vision_chunk = check_int("vision_chunk", vision_chunk, 1)
        self.prefill_chunk = check_int("prefill_chunk", prefill_chunk, 1)
        self.sessions, self.prepacked = {}, {}
        self.layout = self._pick_layout(bundle, precision, layout, provider, self.gpu.cuda_graph)
        decoder_graph = FUSED_GRAPH if self.layout == "fused" else "decoder"
        for graph in ("vision", "embed", "decoder"):
            providers = [(p, self.gpu.provider_options(p, bundle, precision, graph)) for p in names]
            art = bundle.artifact(decoder_graph if graph == "decoder" else graph, "onnx", precision)
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
        first_past = FUSED_FIRST_PAST if self.layout == "fused" else 3
        self.past_names = [i.name for i in self.sessions["decoder"].get_inputs()][first_past:]
        outputs = self.sessions["decoder"].get_outputs()
        # The fused graph's greedy id (bundles before it have none: the host takes the argmax)
        self.has_next_token = self.layout == "fused" and any(o.name == "next_token" for o in outputs)
        self.present_names = [o.name for o in outputs[1:] if o.name != "next_token"]
        # M-RoPE decoders (Qwen2-VL) take position_ids [3, batch, seq]; text-only positions [batch, seq]
        # given to them are the same in all three components.
        self.position_rank = next((len(i.shape) for i in self.sessions["decoder"].get_inputs()
                                   if i.name == "position_ids"), 2)
        if len(self.past_names) != 2 * self.num_layers or len(self.present_names) != 2 * self.num_layers:
            raise BundleError(f"the manifest's text.num_layers is {self.num_layers} but the decoder graph takes "
                              f"{len(self.past_names)} past and gives {len(self.present_names)} present tensors "
                              "(two per layer)", path=str(bundle.root / "edgelmm.json"))
        for inp in self.sessions["decoder"].get_inputs()[first_past:]:  # [batch, kv_heads, past, head_dim]
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
        self.pixel_rank = len(self.sessions["vision"].get_inputs()[0].shape)
        self.kv_dtype = _np_dtype(self.sessions["decoder"].get_inputs()[0].type)
        # Where the KV cache lives between steps: on the GPU when a GPU provider runs the decoder.
        self.kv_device = "cuda" if self.providers[0] in PROVIDER_ORDER[:2] else "cpu"
        # IO binding by default only where it saves copies: on the CPU provider numpy feeds are
        # already zero-copy, and binding measured no faster (7.53 vs 7.45 ms/token on a 60M model).
        # The fused layout always binds: its cache buffers are the decoder's outputs too.
        self.io_binding = self.kv_device == "cuda" if io_binding is None else io_binding
        self.graph_slots: GraphSlots | None = None
        self._run_options: dict[int, Any] = {}
        if self.layout == "fused":
            self.io_binding = True
            art = bundle.artifact(FUSED_GRAPH, "onnx", precision)
            self.max_context = art["max_context"]  # checked by the manifest's validator
            self.hidden_size, self.vocab_size = self._fused_sizes(bundle.path(art))
        if self.gpu.cuda_graph:
            self._check_cuda_graph()
            self.graph_slots = GraphSlots(self, min(self.gpu.cuda_graph_context, self.max_context))

    def _fused_sizes(self, path) -> tuple[int, int]:
        """(hidden, vocab) of the fused decoder, whose inputs and outputs the step buffers bind by name
        and size: checked here, so a graph that differs is a BundleError naming it, not an error from
        inside ONNX Runtime at the first step."""
        sess = self.sessions["decoder"]
        ins, outs = sess.get_inputs(), sess.get_outputs()
        names = [i.name for i in ins[:FUSED_FIRST_PAST]]
        embeds, logits = ins[0].shape, outs[0].shape
        if names != ["inputs_embeds", "seqlens_k", "total_sequence_length", "last_index"] or outs[0].name != "logits" \
                or len(embeds) != 3 or len(logits) != 2 or not isinstance(embeds[2], int) \
                or not isinstance(logits[1], int):
            raise BundleError(f"the fused decoder takes {names} and gives {outs[0].name} {logits} (inputs_embeds "
                              f"{embeds}): edgelmm's takes inputs_embeds [batch, seq, hidden], seqlens_k, "
                              "total_sequence_length and last_index, and gives logits [batch, vocab] first, with "
                              "fixed hidden and vocabulary sizes", path=str(path))
        return embeds[2], logits[1]

    def _check_cuda_graph(self) -> None:
        """What a captured decode step needs, said before the first prompt: the CUDA provider running
        the fused decoder, in fp16 (ONNX Runtime's CUDA GroupQueryAttention takes fp16 and bf16 only;
        an fp32 graph would put it on the CPU, and a graph with CPU nodes cannot be captured)."""
        if self.providers[0] != "CUDAExecutionProvider":
            raise BackendUnavailable(f"cuda_graph needs the CUDA provider but the decoder runs on {self.providers}: "
                                     "install onnxruntime-gpu with a matching CUDA and check the GPU driver")
        if self.kv_dtype != np.float16:
            raise BackendUnavailable(f"cuda_graph needs the fused fp16 decoder (ONNX Runtime's CUDA GroupQueryAttention "
                                     f"takes fp16) and precision {self.precision!r} has a float32 one: load "
                                     "precision='fp16' (export with --precision fp16 if the bundle has none)")

    def run_options(self, graph_id: int = -1):
        """RunOptions for a decoder run: under cuda_graph, the graph this run replays (one id per
        batch size) or -1: run uncaptured (a prompt, a cache that left its slot); else None."""
        if self.graph_slots is None:
            return None
        if graph_id not in self._run_options:
            opts = self.ort.RunOptions()
            opts.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._run_options[graph_id] = opts
        return self._run_options[graph_id]

    @staticmethod
    def _pick_layout(bundle: Bundle, precision: str, layout: str, provider: str, cuda_graph: bool = False) -> str:
        """The decoder layout: "fused" (GroupQueryAttention, in-place KV cache) where the bundle has it
        for this precision and the decoder runs on the CPU provider or is captured as a CUDA graph,
        else "plain"; a layout asked for by name must be there. On GPU providers auto stays plain
        until the fused graph has been measured there (ORT's CUDA GroupQueryAttention takes fp16
        only; TensorRT's parser has no contrib ops)."""
        if layout not in ("auto", "plain", "fused"):
            raise BackendUnavailable(f"unknown decoder layout {layout!r}; choose from auto, plain, fused")
        has_fused = bool(bundle.artifacts(graph=FUSED_GRAPH, format="onnx", precision=precision))
        if cuda_graph:  # the plain graph's cache grows by Concat: no step of it has fixed shapes to capture
            if layout == "plain":
                raise BackendUnavailable("cuda_graph captures the fused decoder's step; layout 'plain' cannot be "
                                         "captured (its KV cache changes shape every step)")
            layout = "fused"
        if layout == "fused" and not has_fused:
            raise BundleError(f"this bundle has no fused {precision} decoder: the exporter writes one for Llama-style "
                              "text models with 1-D rotary positions (not M-RoPE), and only since it learnt to; "
                              "use layout 'plain', or export again", path=str(bundle.root))
        if layout == "auto":
            on_cpu = provider == "cpu" or (provider == "auto" and not nvidia_gpu_present())
            return "fused" if has_fused and on_cpu else "plain"
        return layout

    def vision_feeds(self, pixel_values, pixel_attention_mask=None) -> dict[str, np.ndarray]:
        """The vision graph's inputs, as ONNX Runtime takes them (calibration records these)."""
        if np.ndim(pixel_values) != self.pixel_rank:  # Qwen2-VL graphs before videos took [N, 3, H, W]
            raise BundleError(f"the vision graph takes pixel values of rank {self.pixel_rank} and this model's "
                              f"preprocessing gives rank {np.ndim(pixel_values)} (Qwen2-VL: frame pairs "
                              "[N, 2, 3, H, W]): the bundle was exported by an older edgelmm; export it again",
                              path=str(self.bundle.path(self.bundle.artifact("vision", "onnx", self.precision))))
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, self.pixel_dtype)}
        if "pixel_attention_mask" in self.vision_inputs:
            if pixel_attention_mask is None:
                pixel_attention_mask = np.ones((pixel_values.shape[0],) + pixel_values.shape[2:], np.int64)
            feeds["pixel_attention_mask"] = pixel_attention_mask.astype(np.int64)
        return feeds

    def prefill_feeds(self, inputs_embeds, position_ids=None) -> dict[str, np.ndarray]:
        """The decoder's inputs for a batch-1 prefill with an empty cache (calibration records these)."""
        n = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = np.arange(n, dtype=np.int64)[None]
        feeds = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, self.kv_dtype),
                 "attention_mask": np.ones((1, n), np.int64), "position_ids": self._positions(position_ids)}
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        feeds.update((name, empty) for name in self.past_names)
        return feeds

    def _positions(self, position_ids) -> np.ndarray:
        position_ids = np.asarray(position_ids, np.int64)
        if self.position_rank == 3 and position_ids.ndim == 2:
            position_ids = np.broadcast_to(position_ids[None], (3,) + position_ids.shape)
        return np.ascontiguousarray(position_ids)

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

    def new_cache(self, batch_size: int = 1):
        if self.layout == "fused":
            return FusedCache(self, batch_size)
        empty = np.zeros((batch_size, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        if self.io_binding:
            empty = self.ort.OrtValue.ortvalue_from_numpy(empty, self.kv_device, 0)
        return OrtCache([empty] * (2 * self.num_layers))

    def decode(self, inputs_embeds, attention_mask, position_ids, cache: OrtCache):
        """A long prefill runs through the KV cache in chunks of `prefill_chunk` positions: each
        chunk's attention scores against the past, not the whole prompt's against itself at once (a
        three-image Mantis-1B prompt of 2187 tokens: 612 MB per score tensor, and several of them)."""
        if self.layout == "fused":
            return self._decode_fused(inputs_embeds, attention_mask, position_ids, cache)
        n, chunk = inputs_embeds.shape[1], self.prefill_chunk
        past = attention_mask.shape[1] - n
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = self._decode_once(inputs_embeds[:, start:end], attention_mask[:, :past + end],
                                       position_ids[..., start:end], cache)
        return logits

    def _decode_once(self, inputs_embeds, attention_mask, position_ids, cache: OrtCache):
        feeds = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, self.kv_dtype),
                 "attention_mask": np.ascontiguousarray(attention_mask, np.int64),
                 "position_ids": self._positions(position_ids)}
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

    def decode_greedy(self, inputs_embeds, attention_mask, position_ids, cache) -> np.ndarray:
        """decode, then each row's greedy choice: token ids [B]. In the fused layout a decode step's
        argmax is the graph's own (next_token), so on a GPU one id per row crosses to the host
        instead of the vocabulary's logits."""
        if self.layout == "fused":
            return self._decode_fused(inputs_embeds, attention_mask, position_ids, cache, greedy=True)
        return np.argmax(self.decode(inputs_embeds, attention_mask, position_ids, cache), axis=-1)

    # ---- the fused layout (export/fused_decoder.py, runtimes/ort_fused.py) ----
    def _decode_fused(self, inputs_embeds, attention_mask, position_ids, cache: FusedCache, greedy: bool = False):
        """The same contract as the plain graph's (left-padded rows, a mask, positions), on buffers
        that hold each row's keys/values from position 0 with no padding: a row's new tokens are its
        unmasked ones, and their positions must continue the row. A step of one token per row runs
        batched on the cache's bound step buffers (replayed as a CUDA graph under cuda_graph); a
        prompt runs row by row in chunks of `prefill_chunk` into that row's slice of the buffers
        (GroupQueryAttention takes a continued prompt at batch 1 only), or, where the buffers are on
        a GPU, all rows at once right-padded. Logits [B, V], or with `greedy` token ids [B]."""
        embeds = np.asarray(inputs_embeds)
        B, S, _ = embeds.shape
        if B != cache.batch_size:
            raise PromptError(f"a batch of {B} rows on a cache made for {cache.batch_size}")
        new = np.asarray(attention_mask)[:, -S:] != 0
        counts = new.sum(1)
        if (counts == 0).any():
            raise PromptError("a batch row has no unmasked token to decode")
        rows = [embeds[b, new[b]] for b in range(B)]
        for b in range(B):
            want = cache.lengths[b] + np.arange(counts[b])
            if not np.array_equal(np.asarray(position_ids)[b, -S:][new[b]], want):
                raise PromptError(f"row {b}: the fused decoder takes positions {int(want[0])}.. in order "
                                  "(its rotary embedding follows the cache); use layout 'plain' for others")
        cache.reserve(int((cache.lengths + counts).max()))
        if (counts == 1).all():  # a decode step
            step = cache.step_buffers()
            step.load(np.stack(rows), cache.lengths)
            self._run_bound(step.binding, cache.graph_id)
            cache.lengths = cache.lengths + 1
            if greedy and self.has_next_token:
                return step.next_tokens()
            logits = step.logits()
            return np.argmax(logits, axis=-1) if greedy else logits
        if B == 1 or cache.host_arrays is not None:
            per_row = []
            for b in range(B):
                values = cache.row_values(b) if B > 1 else cache.values
                done = int(cache.lengths[b])
                for start in range(0, int(counts[b]), self.prefill_chunk):
                    piece = rows[b][start:start + self.prefill_chunk]
                    done += len(piece)
                    last = self._run_fused(piece[None], np.array([done]), np.array([len(piece) - 1]), values)[0]
                per_row.append(last)
            logits = np.stack(per_row)
        elif not cache.lengths.any():  # a first prompt on GPU buffers: right-padded, one run
            padded = np.zeros((B, int(counts.max()), embeds.shape[2]), embeds.dtype)
            for b in range(B):
                padded[b, :counts[b]] = rows[b]
            logits = self._run_fused(padded, counts, counts - 1, cache.values)
        else:
            raise PromptError("a batch continuing its prompt with several tokens per row runs on CPU buffers only")
        cache.lengths = cache.lengths + counts
        return np.argmax(logits, axis=-1) if greedy else logits

    def _run_fused(self, embeds: np.ndarray, totals: np.ndarray, last_index: np.ndarray, values: list) -> np.ndarray:
        """One fused decoder run over a prompt (or a piece of one): rows of `embeds` end at total
        lengths `totals` (GroupQueryAttention's seqlens_k is each row's total - 1); keys/values written
        in place into `values`. Never captured: a prompt's shapes change from run to run."""
        binding = self.sessions["decoder"].io_binding()
        binding.bind_output("logits", "cpu")
        if self.has_next_token:
            binding.bind_output("next_token", "cpu")
        for past, present, value in zip(self.past_names, self.present_names, values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, self.kv_dtype))
        binding.bind_cpu_input("seqlens_k", (np.asarray(totals) - 1).astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(int(np.max(totals)), np.int32))
        binding.bind_cpu_input("last_index", np.asarray(last_index, np.int64))
        self._run_bound(binding, -1)
        return binding.get_outputs()[0].numpy().astype(np.float32, copy=False)

    def _run_bound(self, binding, graph_id: int) -> None:
        try:
            if self.graph_slots is None:
                self.sessions["decoder"].run_with_iobinding(binding)
                return
            with self.graph_slots.lock:  # captured and uncaptured runs of one session, one at a time
                self.sessions["decoder"].run_with_iobinding(binding, self.run_options(graph_id))
        except Exception as exc:  # ORT's pybind types, as in _run
            path = self.bundle.path(self.bundle.artifact(FUSED_GRAPH, "onnx", self.precision))
            raise BundleError(f"onnxruntime failed to run this graph ({type(exc).__name__}: {str(exc)[:500]})",
                              path=str(path)) from None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self.providers, "requested_provider": self.requested,
                "decoder_layout": self.layout,
                "precision": self.precision, "threads": self.threads or "default",
                "io_binding": self.io_binding, "kv_device": self.kv_device if self.io_binding else "host",
                "cuda_graph": self.graph_slots.describe() if self.graph_slots is not None else False,
                "prepacked_weights": self.prepacked,
                "provider_options": (self.sessions["decoder"].get_provider_options().get(self.providers[0], {})
                                     if self.kv_device == "cuda" else {}),
                "onnxruntime": self.ort.__version__}


# ONNX Runtime's CUDA provider: fp16, then the INT4 decoder (MatMulNBits has CUDA kernels), never the
# INT8 QDQ vision graph, which it runs as extra Quantize/Dequantize kernels (H100: 2.0 ms/image vs
# 1.15 in fp32). The TensorRT provider fuses QDQ, so it keeps the CPU order (registry) after fp16.
CUDA_PREFERENCE = ("fp16", "int4", "fp32")


def auto_onnx_precision(bundle: Bundle, provider: str) -> tuple[str, str]:
    """precision="auto" and the reason describe() gives: fp16 where a GPU provider will run it; else
    on the CUDA provider the gated INT4 decoder, on the CPU the smallest calibrated precision that
    passed its quality gate; else fp32 (on CPU fp16 is slower, and less exact)."""
    from .registry import BACKENDS

    have = bundle.precisions("onnx")
    gpu = provider != "cpu" and nvidia_gpu_present()
    cpu_order = BACKENDS["onnxruntime"].preference
    order = CUDA_PREFERENCE if gpu and provider in ("cuda", "auto") else (("fp16",) if gpu else ()) + cpu_order
    quality = bundle.manifest.get("quality", {})
    where = "a GPU provider" if gpu else "the CPU"
    failed = [p for p in order if p in have and p not in ("fp32", "fp16") and not quality.get(p, {}).get("passed")]
    for p in order:
        if p in have and (p in ("fp32", "fp16") or quality.get(p, {}).get("passed")):
            why = f"auto: the first of {', '.join(order)} that this bundle has for {where}"
            if p not in ("fp32", "fp16"):
                why += " and that passed its quality gate"
            if failed:
                why += f" ({', '.join(failed)} failed the gate)"
            return p, why
    return have[0], f"auto: the only precision this bundle has ({have[0]})" if len(have) == 1 else \
        f"auto: none of {', '.join(order)} is usable here; took {have[0]}"


def open_bundle_backend(bundle: Bundle, family, files, request) -> tuple["OnnxRuntimeBackend", str, str]:
    """The registry's opener (runtimes/registry.py): the backend over the bundle's ONNX set."""
    from ..memory import check_load_budget

    precision, why = (request.precision, "asked for") if request.precision != "auto" else \
        auto_onnx_precision(bundle, request.provider)
    if request.provider == "cpu" or not nvidia_gpu_present():
        check_load_budget(bundle, "onnx", precision, request.max_memory)
    runtime = OnnxRuntimeBackend(bundle, provider=request.provider, threads=request.threads, precision=precision,
                                 gpu=request.gpu_options, layout=request.layout,
                                 vision_chunk=vision_chunk_for(family.config.get("vision_config") or {}))
    return runtime, precision, why
