"""The TensorRT backend over a bundle's engines (built on this device by `edgelmm build-engines`).

Written against the TensorRT 10 Python API (name-based tensors, `execute_async_v3`). Device memory
and streams come from the CUDA driver through ctypes (runtimes/cuda.py): no PyTorch, no cuda-python.

The KV cache stays on the GPU: each layer's keys and values live in two preallocated buffers of the
engine's largest context; a step reads `past` from one and writes `present` into the other, and
they swap. Nothing of the cache crosses to the host.

TensorRT's optimization profiles do not reliably take zero-length dimensions, so the cache starts
with one slot of zeros that the attention mask hides (as left padding is hidden). Position ids are
explicit, so the slot changes nothing; `length` reports the real positions.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailable, BundleError, ImageError, PromptError
from .cuda import CudaDriver, DeviceBuffer

GRAPHS = ("vision", "embed", "decoder")


class EngineMismatch(BackendUnavailable):
    """The bundle's engines were built for another GPU or TensorRT version: run `build-engines` here."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT is not installed ({exc}): on Jetson it comes with JetPack (python3-libnvinfer; make the venv "
            "with --system-site-packages), on a desktop `pip install tensorrt-cu12`. Or run the bundle's ONNX "
            "graphs with backend='onnxruntime'") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: edgelmm's engines need TensorRT 10 "
                                 "(JetPack >= 6.1); use backend='onnxruntime' with the CUDA provider instead")
    return trt


_LOGGERS: dict[str, Any] = {}


def trt_logger(trt):
    """One logger per process that keeps errors for our messages instead of printing them."""
    if "logger" not in _LOGGERS:
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors = (self.errors + [str(msg)])[-5:]

        _LOGGERS["logger"] = Logger()
    return _LOGGERS["logger"]


def run_probe_engine() -> tuple[bool, str]:
    """Build a one-layer engine (y = x + x), run it on the GPU, check the answer (for `doctor`)."""
    trt = import_tensorrt()
    cuda = CudaDriver.get()
    cuda.use_device(0)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    x = network.add_input("x", trt.float32, (-1, 4))
    network.mark_output(network.add_elementwise(x, x, trt.ElementWiseOperation.SUM).get_output(0))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 4), (2, 4), (8, 4))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        return False, "engine build failed: " + " | ".join(logger.errors)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    runner = EngineRunner(trt, engine, cuda, cuda.stream(), "probe")
    host = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = runner.run({"x": host})["y" if "y" in runner.outputs else runner.outputs[0]]
    ok = np.array_equal(y, 2 * host)
    return ok, f"built and ran a probe engine on {cuda.gpu(0).name}" + ("" if ok else " (wrong answer)")


class EngineRunner:
    """One engine, its execution context, and a grow-only device buffer per I/O tensor."""

    def __init__(self, trt, engine, cuda: CudaDriver, stream: int, label: str):
        self.trt, self.engine, self.cuda, self.stream, self.label = trt, engine, cuda, stream, label
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.profile = {n: [tuple(s) for s in engine.get_tensor_profile_shape(n, 0)] for n in self.inputs}
        self.buffers = {n: DeviceBuffer(cuda) for n in names}

    def bounds(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lo, _opt, hi = self.profile[name]
        return lo, hi

    def fits(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, hi = self.bounds(name)
        return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    def _set_input(self, name: str, shape: tuple[int, ...], ptr: int) -> None:
        if not self.fits(name, shape):
            lo, hi = self.bounds(name)
            raise PromptError(f"{self.label} engine: input {name} of shape {list(shape)} is outside the engine's "
                              f"profile ({list(lo)} .. {list(hi)}); rebuild with `edgelmm build-engines` and larger "
                              "--max-images / --max-context")
        if not self.context.set_input_shape(name, shape):
            raise BundleError(f"TensorRT refused shape {list(shape)} for {name}", path=self.label)
        self.context.set_tensor_address(name, ptr)

    def run(self, host_inputs: dict[str, np.ndarray], device_inputs: dict[str, tuple[int, tuple]] | None = None,
            device_outputs: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Host inputs are copied in; device inputs/outputs are (pointer, shape)/pointer the caller owns.
        Returns every output not in `device_outputs`, on the host."""
        device_outputs = device_outputs or {}
        for name, array in host_inputs.items():
            array = np.ascontiguousarray(array, self.dtypes[name])
            ptr = self.buffers[name].reserve(array.nbytes)
            self.cuda.to_device(ptr, array, self.stream)
            self._set_input(name, array.shape, ptr)
        for name, (ptr, shape) in (device_inputs or {}).items():
            self._set_input(name, tuple(shape), ptr)
        host_out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if name in device_outputs:
                self.context.set_tensor_address(name, device_outputs[name])
                continue
            host_out[name] = np.empty(shape, self.dtypes[name])
            self.context.set_tensor_address(name, self.buffers[name].reserve(host_out[name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise BackendUnavailable(f"TensorRT failed to run the {self.label} engine: "
                                     + " | ".join(trt_logger(self.trt).errors))
        for name, array in host_out.items():
            self.cuda.to_host(array, self.buffers[name].ptr, self.stream)
        self.cuda.synchronize(self.stream)
        return host_out

    def release(self) -> None:
        for buf in self.buffers.values():
            buf.release()


class TrtCache:
    """Per layer, keys and values in two device buffers each (read one, write the other, swap)."""

    def __init__(self, backend: "TensorRTBackend", batch_size: int):
        self.backend, self.batch_size = backend, batch_size
        b = backend
        self.capacity = b.max_slots
        per_slot = batch_size * b.kv_heads * b.head_dim * b.kv_dtype.itemsize
        self.buffers = [[b.cuda.alloc(per_slot * self.capacity) for _ in range(2 * b.num_layers)] for _ in range(2)]
        for ptr in self.buffers[0]:
            b.cuda.zero(ptr, per_slot, b.stream)  # the hidden first slot: zeros, never NaN garbage
        self.current = 0
        self.slots = 1

    @property
    def length(self) -> int:
        return self.slots - 1

    def release(self) -> None:
        for side in self.buffers:
            for ptr in side:
                self.backend.cuda.free(ptr)
        self.buffers = [[], []]

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: the driver may be gone already
            pass


class TensorRTBackend:
    name = "tensorrt"
    thread_safe = False  # one execution context per engine; `watch` serialises calls

    def __init__(self, bundle: Bundle, precision: str = "fp16", device_index: int = 0,
                 max_context: int | None = None):
        from .select import current_engine_target, engine_incompatibility

        trt = import_tensorrt()
        self.trt, self.bundle, self.precision, self.device_index = trt, bundle, precision, device_index
        self.cuda = CudaDriver.get()
        self.cuda.use_device(device_index)
        here = current_engine_target(device_index)
        self.target = here
        self.runners: dict[str, EngineRunner] = {}
        self.stream = self.cuda.stream()
        runtime = trt.Runtime(trt_logger(trt))
        for graph in GRAPHS:
            art = bundle.artifact(graph, "tensorrt", precision)
            why = engine_incompatibility(art["engine"]["target"], here)
            if why:
                raise EngineMismatch(f"{bundle.path(art)}: {why}. Engines are tied to the GPU and the TensorRT "
                                     f"version: run `edgelmm build-engines {bundle.root}` on this machine")
            engine = runtime.deserialize_cuda_engine(bundle.path(art).read_bytes())
            if engine is None:
                raise BundleError("TensorRT could not deserialize this engine: "
                                  + " | ".join(trt_logger(trt).errors), path=str(bundle.path(art)))
            self.runners[graph] = EngineRunner(trt, engine, self.cuda, self.stream, f"{graph} ({precision})")
        dims = bundle.manifest["text"]
        self.num_layers, self.kv_heads, self.head_dim = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"]
        dec = self.runners["decoder"]
        self.past_names = [n for n in dec.inputs if n.startswith("past_key_values.")]
        self.present_names = [n for n in dec.outputs if n.startswith("present.")]
        self.kv_dtype = dec.dtypes[self.past_names[0]]
        profile_slots = dec.bounds(self.past_names[0])[1][2]
        self.max_slots = min(profile_slots, max_context + 1) if max_context else profile_slots

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        self.cuda.use_device(self.device_index)
        runner = self.runners["vision"]
        feeds = {"pixel_values": pixel_values}
        if "pixel_attention_mask" in runner.inputs:
            if pixel_attention_mask is None:
                pixel_attention_mask = np.ones((pixel_values.shape[0],) + pixel_values.shape[2:], np.int64)
            feeds["pixel_attention_mask"] = pixel_attention_mask
        if not runner.fits("pixel_values", tuple(pixel_values.shape)):
            lo, hi = runner.bounds("pixel_values")
            raise ImageError(f"{pixel_values.shape[0]} tile(s) of {list(pixel_values.shape[2:])} pixels are outside "
                             f"the vision engine's profile ({list(lo)} .. {list(hi)}); rebuild the engines with "
                             "`edgelmm build-engines --max-images N`")
        return runner.run(feeds)["image_features"].astype(np.float32, copy=False)

    def embed_tokens(self, input_ids):
        self.cuda.use_device(self.device_index)
        return self.runners["embed"].run({"input_ids": input_ids.astype(np.int64)})["inputs_embeds"].astype(
            np.float32, copy=False)

    def new_cache(self, batch_size: int = 1) -> TrtCache:
        self.cuda.use_device(self.device_index)
        return TrtCache(self, batch_size)

    def decode(self, inputs_embeds, attention_mask, position_ids, cache: TrtCache):
        self.cuda.use_device(self.device_index)
        batch, seq = inputs_embeds.shape[:2]
        if cache.slots + seq > cache.capacity:
            raise PromptError(f"the prompt needs {cache.length + seq} positions but the TensorRT engines were built "
                              f"for {cache.capacity - 1}; rebuild with `edgelmm build-engines --max-context N`")
        hidden = np.zeros((batch, 1), np.int64)  # the hidden first slot
        mask = np.concatenate([hidden, np.asarray(attention_mask, np.int64)], axis=1)
        past_shape = (batch, self.kv_heads, cache.slots, self.head_dim)
        src, dst = cache.buffers[cache.current], cache.buffers[1 - cache.current]
        out = self.runners["decoder"].run(
            {"inputs_embeds": inputs_embeds, "attention_mask": mask, "position_ids": position_ids},
            device_inputs={name: (ptr, past_shape) for name, ptr in zip(self.past_names, src)},
            device_outputs=dict(zip(self.present_names, dst)))
        cache.current, cache.slots = 1 - cache.current, cache.slots + seq
        return out["logits"].astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        engines = {g: self.bundle.artifact(g, "tensorrt", self.precision)["engine"] for g in GRAPHS}
        return {"backend": self.name, "precision": self.precision, "device": self.target["gpu"],
                "compute_capability": self.target["compute_capability"], "tensorrt": self.target["tensorrt"],
                "kv_device": "cuda", "kv_dtype": str(self.kv_dtype), "max_context": self.max_slots - 1,
                "engine_flags": {g: e.get("flags") for g, e in engines.items()}}


def engine_layer_report(engine_info_json: str, wanted: str) -> dict[str, Any]:
    """From the engine inspector's JSON (ProfilingVerbosity.DETAILED), count layers by the data type of
    their outputs and list the compute layers that run in a wider type than `wanted` (fp16 or int8):
    the layers that fell back to higher precision."""
    info = json.loads(engine_info_json)
    layers = [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]
    by_type: dict[str, int] = {}
    fell_back = []
    rank = {"int4": 0, "int8": 1, "fp8": 1, "fp16": 2, "bf16": 2, "fp32": 3}
    compute = ("convolution", "matrixmultiply", "gemm", "myelin", "fully", "conv")
    for layer in layers:
        fmt = " ".join(str(o.get("Format/Datatype", "")) for o in layer.get("Outputs", []))
        kind = _dtype_of(fmt)
        by_type[kind] = by_type.get(kind, 0) + 1
        ltype = str(layer.get("LayerType", "")).lower()
        if any(c in ltype for c in compute) and kind in rank and rank[kind] > rank.get(wanted, 3):
            fell_back.append({"layer": layer.get("Name", "?"), "type": layer.get("LayerType"), "runs_in": kind})
    return {"layers": len(layers), "by_output_type": by_type, "wanted": wanted, "fell_back": fell_back}


def _dtype_of(fmt: str) -> str:
    f = fmt.lower()
    for key, name in (("int4", "int4"), ("int8", "int8"), ("fp8", "fp8"), ("bf16", "bf16"), ("half", "fp16"),
                      ("fp16", "fp16"), ("fp32", "fp32"), ("float", "fp32"), ("int64", "int64"), ("int32", "int32"),
                      ("bool", "bool")):
        if key in f:
            return name
    return "unknown"
