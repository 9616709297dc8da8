"""The TensorRT backend over a bundle's engines (built on this device by `edgelmm build-engines`).

Written against the Python API that TensorRT 10.3 (JetPack 6.1/6.2) and 11.x (desktop pip) share:
name-based tensors, `execute_async_v3`, strongly typed networks, optimization profiles switched
with `set_optimization_profile_async`; nothing that 11 removed (tests/test_tensorrt_api.py reads
this code's syntax tree to keep it so). Device memory and streams come from the CUDA driver through
ctypes (runtimes/cuda.py): no PyTorch, no cuda-python.

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
from .base import Capabilities
from .cuda import CudaDriver, DeviceBuffer

GRAPHS = ("vision", "embed", "decoder")


# Engines are tied to a GPU (compute capability) and a TensorRT version.
def engine_target(trt_version: str, gpu: dict[str, Any]) -> dict[str, Any]:
    return {"gpu": gpu["name"], "compute_capability": gpu["compute_capability"], "tensorrt": trt_version}


def engine_incompatibility(built_for: dict[str, Any], here: dict[str, Any]) -> str | None:
    """Why an engine built for `built_for` cannot load `here` (None when it can). TensorRT engines
    need the same TensorRT version and the same compute capability (built without hardware
    compatibility); the same capability on another GPU model loads, possibly slower."""
    problems = []
    if built_for.get("tensorrt") != here.get("tensorrt"):
        problems.append(f"TensorRT {built_for.get('tensorrt')} built it, this machine has {here.get('tensorrt')}")
    if built_for.get("compute_capability") != here.get("compute_capability"):
        problems.append(f"built for {built_for.get('gpu')} (compute {built_for.get('compute_capability')}), this is "
                        f"{here.get('gpu')} (compute {here.get('compute_capability')})")
    return "; ".join(problems) or None


def current_engine_target(device_index: int = 0) -> dict[str, Any]:
    import tensorrt as trt

    return engine_target(trt.__version__, CudaDriver.get().gpu(device_index).as_dict())


class EngineMismatch(BackendUnavailable):
    """The bundle's engines were built for another GPU or TensorRT version: run `build-engines` here."""


MIN_TENSORRT = (10, 3)   # JetPack 6.1's; strongly typed networks and everything used here exist from it on

# TensorRT release line -> where it comes from (NVIDIA's JetPack tables and TensorRT install pages).
TENSORRT_SOURCES = {
    (10, 3): "JetPack 6.1 / 6.2 (CUDA 12.6), or the desktop wheel tensorrt-cu12==10.3",
    (10, 13): "JetPack 7.0 / 7.1 on Jetson Thor (CUDA 13.0), or the desktop wheels (tensorrt-cu12 / tensorrt-cu13)",
    (10, 16): "JetPack 7.2 (CUDA 13.2)",
    (11, 0): "the desktop wheels: `pip install tensorrt` (CUDA 13) or `tensorrt-cu12` (CUDA 12); on Jetson only "
             "from 11.4.1 on JetPack 7.2.2+ (AGX Orin, Thor)",
}


def tensorrt_version(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0"])[:2]
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def describe_tensorrt(version: str) -> str:
    """'TensorRT 10.3.0: JetPack 6.1 / 6.2 (CUDA 12.6), ...': which TensorRT this is and where it comes from."""
    major, minor = tensorrt_version(version)
    line = max((k for k in TENSORRT_SOURCES if k <= (major, minor)), default=None)
    if line is None or line[0] != major:
        return f"TensorRT {version}"
    return f"TensorRT {version}: {TENSORRT_SOURCES[line]}"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT is not installed ({exc}): on Jetson it comes with JetPack 6.1+ (python3-libnvinfer; make the "
            "venv with --system-site-packages); on a desktop `pip install tensorrt` (CUDA 13) or `pip install "
            "tensorrt-cu12` (CUDA 12). Or run the bundle's ONNX graphs with backend='onnxruntime'") from None
    if tensorrt_version(trt.__version__) < MIN_TENSORRT:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: edgelmm's engines need TensorRT 10.3 or "
                                 "newer (JetPack >= 6.1); use backend='onnxruntime' with the CUDA provider instead")
    return trt


def strongly_typed_network(trt, builder):
    """A network whose types come from the graph: TensorRT 11's only kind (the flag is kept there,
    ignored), asked for on 10.x. The flag's bit moved between versions (1 on 10.x, 0 on 11.x), so
    it is read from the enum, never written as a number."""
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


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
    network = strongly_typed_network(trt, builder)
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


def pick_profile(profiles: list[dict[str, list]], shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The first optimization profile whose [min, opt, max] ranges take every shape (None: none does)."""
    def takes(ranges, shape) -> bool:
        lo, _opt, hi = ranges
        return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
    return next((k for k, p in enumerate(profiles) if all(takes(p[n], s) for n, s in shapes.items())), None)


class EngineRunner:
    """One engine, its execution context, and a grow-only device buffer per I/O tensor."""

    def __init__(self, trt, engine, cuda: CudaDriver, stream: int, label: str):
        self.trt, self.engine, self.cuda, self.stream, self.label = trt, engine, cuda, stream, label
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        # One or more optimization profiles (the decoder: decode steps first, then prefill); a call
        # runs on the first whose ranges take all of its input shapes.
        self.profiles = [{n: [tuple(s) for s in engine.get_tensor_profile_shape(n, k)] for n in self.inputs}
                         for k in range(engine.num_optimization_profiles)]
        self.active = 0
        self.buffers = {n: DeviceBuffer(cuda) for n in names}

    def bounds(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The smallest and largest shape of `name` over all profiles."""
        los = [p[name][0] for p in self.profiles]
        his = [p[name][2] for p in self.profiles]
        return tuple(map(min, zip(*los))), tuple(map(max, zip(*his)))

    def fits(self, name: str, shape: tuple[int, ...]) -> bool:
        return pick_profile(self.profiles, {name: shape}) is not None

    def _choose_profile(self, shapes: dict[str, tuple[int, ...]]) -> None:
        k = pick_profile(self.profiles, shapes)
        if k is not None:
            if k != self.active:
                if not self.context.set_optimization_profile_async(k, self.stream):
                    raise BundleError(f"TensorRT refused optimization profile {k}", path=self.label)
                self.active = k
            return
        outside = [(n, s) for n, s in shapes.items() if not self.fits(n, s)]
        name, shape = outside[0] if outside else next(iter(shapes.items()))   # else: no one profile takes all
        lo, hi = self.bounds(name)
        raise PromptError(f"{self.label} engine: input {name} of shape {list(shape)} is outside the engine's "
                          f"profiles ({list(lo)} .. {list(hi)}); rebuild with `edgelmm build-engines` and larger "
                          "--max-images / --max-context")

    def _set_input(self, name: str, shape: tuple[int, ...], ptr: int) -> None:
        if not self.context.set_input_shape(name, shape):
            raise BundleError(f"TensorRT refused shape {list(shape)} for {name}", path=self.label)
        self.context.set_tensor_address(name, ptr)

    def run(self, host_inputs: dict[str, np.ndarray], device_inputs: dict[str, tuple[int, tuple]] | None = None,
            device_outputs: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Host inputs are copied in; device inputs/outputs are (pointer, shape)/pointer the caller owns.
        Returns every output not in `device_outputs`, on the host."""
        device_outputs = device_outputs or {}
        self._choose_profile({**{n: tuple(np.shape(a)) for n, a in host_inputs.items()},
                              **{n: tuple(shape) for n, (_ptr, shape) in (device_inputs or {}).items()}})
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
    capabilities = Capabilities(thread_safe=False)

    def __init__(self, bundle: Bundle, precision: str = "fp16", device_index: int = 0,
                 max_context: int | None = None):
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
            raise ImageError(f"{pixel_values.shape[0]} tile(s) of {list(pixel_values.shape[-2:])} pixels are outside "
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
                "engine_graphs": {g: e.get("source") for g, e in engines.items()},
                "decoder_profiles": len(self.runners["decoder"].profiles)}


def engine_layer_report(engine_info_json: str, wanted: str) -> dict[str, Any]:
    """From the engine inspector's JSON (ProfilingVerbosity.DETAILED), count layers by the data type of
    their outputs and list the compute layers that run in a wider type than `wanted` (fp32, fp16 or
    int8): the layers that fell back to higher precision. Reads both layouts: TensorRT 10's (a
    "Format/Datatype" string per tensor, "Bindings" a list of names) and 11's ("Format" and
    "Datatype" apart, "I/O Tensors" a list of objects with their DataType)."""
    info = json.loads(engine_info_json)
    layers = [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]
    by_type: dict[str, int] = {}
    fell_back = []
    rank = {"int4": 0, "int8": 1, "fp8": 1, "fp16": 2, "bf16": 2, "fp32": 3}
    compute = ("convolution", "matrixmultiply", "gemm", "myelin", "fully", "conv")
    for layer in layers:
        kind = _widest(_tensor_dtype(o) for o in layer.get("Outputs", []) if isinstance(o, dict))
        by_type[kind] = by_type.get(kind, 0) + 1
        ltype = str(layer.get("LayerType", "")).lower()
        if any(c in ltype for c in compute) and kind in rank and rank[kind] > rank.get(wanted, 3):
            fell_back.append({"layer": layer.get("Name", "?"), "type": layer.get("LayerType"), "runs_in": kind})
    if "I/O Tensors" in info:      # TensorRT 11
        io = [{"name": t.get("Name"), "mode": str(t.get("IOMode", "")).lower() or None,
               "dtype": _dtype_of(str(_key(t, "datatype") or ""))} for t in info["I/O Tensors"] if isinstance(t, dict)]
        layout = "11.x"
    else:                           # TensorRT 10: names only
        io = [{"name": n, "mode": None, "dtype": None} for n in info.get("Bindings", []) if isinstance(n, str)]
        layout = "10.x"
    return {"layers": len(layers), "by_output_type": by_type, "wanted": wanted, "fell_back": fell_back, "io": io,
            "inspector_layout": layout}


def _key(d: dict, name: str):
    """d's value for `name`, whatever the key's case ("Datatype" / "DataType")."""
    return next((v for k, v in d.items() if isinstance(k, str) and k.lower() == name), None)


def _tensor_dtype(tensor: dict) -> str:
    text = _key(tensor, "format/datatype") or _key(tensor, "datatype") or ""
    return _dtype_of(str(text))


def _widest(kinds) -> str:
    order = ["unknown", "bool", "int4", "int8", "fp8", "int32", "int64", "bf16", "fp16", "fp32"]
    kinds = list(kinds)
    return max(kinds, key=order.index) if kinds else "unknown"


def _dtype_of(fmt: str) -> str:
    f = fmt.lower()
    for key, name in (("int4", "int4"), ("int8", "int8"), ("fp8", "fp8"), ("bf16", "bf16"), ("bfloat", "bf16"),
                      ("half", "fp16"), ("fp16", "fp16"), ("fp32", "fp32"), ("float", "fp32"), ("int64", "int64"),
                      ("int32", "int32"), ("bool", "bool")):
        if key in f:
            return name
    return "unknown"


def open_bundle_backend(bundle: Bundle, family, files, request) -> tuple["TensorRTBackend", str, str]:
    """The registry's opener (runtimes/registry.py): the backend over the bundle's engines."""
    from .registry import BACKENDS, auto_precision

    precision, why = (request.precision, "asked for") if request.precision != "auto" else \
        auto_precision(bundle, "tensorrt", BACKENDS["tensorrt"].preference, "smallest engine precision")
    return TensorRTBackend(bundle, precision=precision, max_context=request.max_context), precision, why
