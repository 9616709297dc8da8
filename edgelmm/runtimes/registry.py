"""The backends that run a bundle, one spec each, in one table.

Adding a backend: its module under runtimes/ (the backend class behind the numpy contract of
runtimes/base.py, `open_bundle_backend(bundle, family, files, request)` and a probe function), and
one `BackendSpec` in BACKENDS below. Loading, `load(backend=...)`'s choices, `bench --backends`, the
verify limits, `doctor`'s probes, `backend="auto"`'s fallback chain and the "this bundle has no ...
artifacts" messages all read this table. ADDING.md has the checklist.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import BackendUnavailable

# TensorRT computes in TF32 or fp16 whatever the graph's precision (engines, and ONNX Runtime's
# TensorRT provider with fp16 allowed), so it is judged as fp16; its quantized engines on the vision
# cosine. (Keys of verify.THRESHOLDS.)
TENSORRT_LIMITS = {"fp32": "fp16", "fp16": "fp16", "int8-vision": "int8", "int4": "int8", "int8-vision+int4": "int8"}


@dataclass(frozen=True)
class LoadRequest:
    """What `load()` was asked for, handed to a backend's opener (each reads what applies to it)."""
    provider: str = "auto"
    threads: int | None = None
    precision: str = "auto"
    gpu_layers: int | None = None
    max_context: int | None = None
    gpu_options: Any = None
    max_memory: int | None = None
    layout: str = "auto"
    max_batch: int | None = None


@dataclass(frozen=True)
class PlanStep:
    """One candidate of `backend="auto"`'s fallback chain (runtimes.select.iter_plan): every backend's
    GPU steps come first, in BACKENDS order, then every backend's CPU steps."""
    provider: str | None              # what `load(provider=...)` takes for it (None: the backend has one)
    needs_gpu: bool
    probe: str                        # the probe (by name) that says whether it runs here


@dataclass(frozen=True)
class BackendSpec:
    name: str
    format: str                       # the bundle artifacts it runs ("onnx", "gguf", "tensorrt")
    artifacts: str                    # what they are called in messages ("ONNX graphs")
    module: str                       # its module, imported only when it is opened
    preference: tuple[str, ...]       # precision="auto": the first of these the bundle has
    how_to_get: str                   # how a bundle gets this backend's artifacts
    limits: Callable[[dict[str, Any], str], str]   # (describe(), precision) -> the verify.THRESHOLDS key
    probes: str                       # "module:function" of its probes: (Platform) -> list[Probe] (doctor)
    plan: tuple[PlanStep, ...]        # its candidates for backend="auto"

    def open(self, bundle, family, files, request: LoadRequest):
        """(runtime backend, precision, why that precision) for `bundle`."""
        return importlib.import_module(self.module).open_bundle_backend(bundle, family, files, request)


def _judged_as_precision(_about: dict[str, Any], precision: str) -> str:
    return precision


def _onnxruntime_limits(about: dict[str, Any], precision: str) -> str:
    trt = about.get("providers", [""])[0] == "TensorrtExecutionProvider" and \
        str(about.get("provider_options", {}).get("trt_fp16_enable", "0")).lower() in ("1", "true")
    return TENSORRT_LIMITS.get(precision, precision) if trt else precision


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("tensorrt", "tensorrt", "TensorRT engines", "edgelmm.runtimes.tensorrt",
                # the smallest built precision: the user built them to run them
                ("int8-vision+int4", "int4", "int8-vision", "fp16", "fp32"),
                "build them on this device with `edgelmm build-engines BUNDLE`",
                lambda _about, precision: TENSORRT_LIMITS[precision],
                "edgelmm.runtimes.select:probe_tensorrt", (PlanStep(None, True, "tensorrt"),)),
    BackendSpec("onnxruntime", "onnx", "ONNX graphs", "edgelmm.runtimes.onnxruntime",
                # the CPU order; the GPU providers' is runtimes.onnxruntime.CUDA_PREFERENCE
                ("int8-vision+int4", "int4", "int8", "fp32"),
                "export them with `edgelmm export --format onnx`", _onnxruntime_limits,
                "edgelmm.runtimes.select:probe_onnxruntime",
                (PlanStep("tensorrt", True, "onnxruntime:TensorrtExecutionProvider"),
                 PlanStep("cuda", True, "onnxruntime:CUDAExecutionProvider"),
                 # on the CPU ONNX Runtime comes before llama.cpp: its calibrated precisions measured fastest
                 PlanStep("cpu", False, "onnxruntime:CPUExecutionProvider"))),
    BackendSpec("llamacpp", "gguf", "GGUF files", "edgelmm.runtimes.llamacpp",
                # the smallest GGUF type the bundle has: the user exported it to run it
                ("q4_k_m", "q8_0", "f16", "f32"),
                "export them with `edgelmm export --format gguf`", _judged_as_precision,
                "edgelmm.runtimes.select:probe_llamacpp",
                (PlanStep("gpu", True, "llamacpp:gpu-offload"), PlanStep("cpu", False, "llamacpp"))),
)}


def run_probes(spec_: BackendSpec, platform) -> list:
    """The backend's probes on this platform (its `probes` function, imported when first asked for)."""
    module, function = spec_.probes.split(":")
    return list(getattr(importlib.import_module(module), function)(platform))


def spec(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None


def auto_precision(bundle, fmt: str, order: tuple[str, ...], what: str) -> tuple[str, str]:
    """The first of `order` that the bundle has in `fmt`, and the reason describe() gives."""
    have = bundle.precisions(fmt)
    chosen = next((p for p in order if p in have), have[0] if have else None)
    if chosen is None:
        raise BackendUnavailable(f"the bundle has no {fmt} artifacts")
    if chosen not in order:
        return chosen, f"auto: none of {', '.join(order)} is in this bundle; took {chosen}"
    return chosen, f"auto: the {what} of {', '.join(p for p in order if p in have)} that this bundle has"
