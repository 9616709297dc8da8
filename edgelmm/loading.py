"""Opening what `load()` is given, below the public API so that the exporter, the calibrator and
the engine builder can open bundles and checkpoints without importing `edgelmm.api`: a bundle's
artifact set on the backend the registry (runtimes/registry.py) names, or a checkpoint on the
PyTorch reference."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle
from .errors import BackendUnavailable, OptionError
from .families import detect
from .manifest import FUSED_DECODER
from .memory import PROCESS_BASE, Step, check_budget, checkpoint_parameters, loading_overhead
from .modelfiles import ModelFiles
from .options import check_threads
from .pipeline import Pipeline
from .runtimes.registry import BACKENDS as REGISTRY, LoadRequest

LAYOUTS = ("auto", "plain", "fused")


def onnx_layouts(bundle: Bundle, precision: str) -> list[str]:
    """The ONNX decoder layouts the bundle has for a precision: plain, and fused where exported."""
    graphs = {a["graph"] for a in bundle.artifacts(format="onnx", precision=precision)}
    return [layout for layout, graph in (("plain", "decoder"), ("fused", FUSED_DECODER)) if graph in graphs]


def bundle_backend(bundle: Bundle, backend: str) -> str:
    """The backend that will run this bundle: the requested one if the bundle has its artifacts."""
    formats = bundle.formats()
    if backend not in REGISTRY:
        raise BackendUnavailable(f"backend {backend!r} cannot run a bundle (it has {formats} artifacts); choose from "
                                 f"{', '.join(REGISTRY)}, or load the source checkpoint for 'torch'")
    spec = REGISTRY[backend]
    if spec.format not in formats:
        raise BackendUnavailable(f"backend {backend!r} needs {spec.format} artifacts but this bundle has "
                                 f"{formats}; {spec.how_to_get}")
    return backend


def pipeline_for_bundle(bundle: Bundle, backend: str = "auto", provider: str = "auto",
                        threads: int | None = None, precision: str = "auto", *,
                        gpu_layers: int | None = None, max_context: int | None = None, gpu_options=None,
                        max_memory: int | None = None, layout: str = "auto",
                        max_batch: int | None = None) -> Pipeline:
    """A Pipeline over one of the bundle's artifact sets. backend="auto" with provider="auto" takes
    the first usable candidate of `runtimes.select.plan` (TensorRT engines, ONNX Runtime on the GPU,
    llama.cpp offloaded, then the CPU) and records why in describe()["selection"]. Artifacts that run
    in this machine's memory (the CPU) are checked against `max_memory` (bytes; default what is free)
    before they load: MemoryBudgetError names what would fit."""
    check_threads(threads)
    selection = None
    if backend == "auto" and provider == "auto":
        from .runtimes.select import choose

        chosen, chain = choose(bundle)
        backend = chosen.backend
        if backend == "onnxruntime":
            provider = chosen.provider
        if backend == "llamacpp" and gpu_layers is None and chosen.provider == "cpu":
            gpu_layers = 0
        selection = {"chosen": chosen.label(), "reason": chosen.reason,
                     "passed_over": [f"{c.label()}: {c.reason}" for c in chain[:chain.index(chosen)]]}
    elif backend == "auto":
        backend = "onnxruntime"  # a provider was named: providers are ONNX Runtime's
    backend = bundle_backend(bundle, backend)
    if layout != "auto" and backend != "onnxruntime":
        raise OptionError(f"a decoder layout (--layout {layout}) is ONNX Runtime's; backend {backend!r} has one")
    spec = REGISTRY[backend]
    if precision != "auto":
        have = bundle.precisions(spec.format)
        if precision not in have:
            raise OptionError(f"precision {precision!r} is not in this bundle for backend {backend!r}; it has "
                              f"{', '.join(have)} (or 'auto')")
    files = ModelFiles.open(bundle.root)
    family = detect(files, prompt_style=bundle.manifest.get("prompt_style"))
    request = LoadRequest(provider=provider, threads=threads, precision=precision, gpu_layers=gpu_layers,
                          max_context=max_context, gpu_options=gpu_options, max_memory=max_memory, layout=layout,
                          max_batch=max_batch)
    runtime, precision, why = spec.open(bundle, family, files, request)
    return Pipeline(files, family, runtime, selection=selection, precision_reason=why)


def checkpoint_pipeline(path: str | Path, files: ModelFiles, family, *, threads: int | None = None,
                        trust_remote_code: bool = False, device: str = "cpu",
                        max_memory: int | None = None) -> Pipeline:
    """A checkpoint on the PyTorch reference (fp32), its memory checked first on the CPU."""
    from .runtimes.torch import TorchBackend

    if device == "cpu":
        need = PROCESS_BASE + 4 * checkpoint_parameters(path) + loading_overhead(path)
        check_budget([Step("the fp32 PyTorch model", need, "Export a bundle and run its int4 or q4_k_m artifacts "
                                                           "instead.")],
                     max_memory, f"loading {Path(path).name}")
    return Pipeline(files, family, TorchBackend(family, threads=threads, trust_remote_code=trust_remote_code,
                                                device=device),
                    precision_reason="a checkpoint: the PyTorch reference runs its weights in fp32")
