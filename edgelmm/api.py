"""The public entry points: `load` a checkpoint (or, later, a bundle) into a Pipeline."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle, is_bundle, open_bundle
from .errors import BackendUnavailable, OptionError
from .manifest import FUSED_DECODER
from .families import detect
from .memory import (PROCESS_BASE, Step, artifact_set_bytes, check_budget, checkpoint_parameters, gib, loading_overhead,
                     kv_cache_bytes, session_step)
from .modelfiles import ModelFiles, check_checkpoint_dir, check_model_dir
from .options import check_choice, check_int, check_threads
from .pipeline import Pipeline
from .runtimes.onnxruntime import nvidia_gpu_present

BACKENDS = ("auto", "torch", "tensorrt", "onnxruntime", "llamacpp")
BACKEND_FORMAT = {"tensorrt": "tensorrt", "onnxruntime": "onnx", "llamacpp": "gguf"}
# llama.cpp's precision="auto" takes the smallest type the bundle has: the user exported it to run it.
GGUF_PREFERENCE = ("q4_k_m", "q8_0", "f16", "f32")


def bundle_precisions(bundle: Bundle, fmt: str = "onnx") -> list[str]:
    return sorted({a["precision"] for a in bundle.manifest["artifacts"] if a["format"] == fmt})


def bundle_formats(bundle: Bundle) -> list[str]:
    return sorted({a["format"] for a in bundle.manifest["artifacts"]})


# ONNX Runtime on CPU: the calibrated precisions first (the user calibrated them to run them), then fp32.
ORT_CPU_PREFERENCE = ("int8-vision+int4", "int4", "int8", "fp32")
# ONNX Runtime's CUDA provider: fp16, then the INT4 decoder (MatMulNBits has CUDA kernels), never the
# INT8 QDQ vision graph, which it runs as extra Quantize/Dequantize kernels (H100: 2.0 ms/image vs
# 1.15 in fp32). The TensorRT provider fuses QDQ, so it keeps the CPU order after fp16.
ORT_CUDA_PREFERENCE = ("fp16", "int4", "fp32")


LAYOUTS = ("auto", "plain", "fused")


def onnx_layouts(bundle: Bundle, precision: str) -> list[str]:
    """The ONNX decoder layouts the bundle has for a precision: plain, and fused where exported."""
    graphs = {a["graph"] for a in bundle.manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == precision}
    return [layout for layout, graph in (("plain", "decoder"), ("fused", FUSED_DECODER)) if graph in graphs]


def pick_precision(bundle: Bundle, provider: str) -> str:
    """fp16 where a GPU provider will run it; else on the CUDA provider the gated INT4 decoder, on
    CPU the smallest calibrated precision that passed its quality gate; else fp32 (on CPU fp16 is
    slower, and less exact)."""
    return _auto_onnx_precision(bundle, provider)[0]


def _auto_onnx_precision(bundle: Bundle, provider: str) -> tuple[str, str]:
    """pick_precision, with the reason describe() gives."""
    from .runtimes.onnxruntime import nvidia_gpu_present

    have = bundle_precisions(bundle)
    gpu = provider != "cpu" and nvidia_gpu_present()
    order = ORT_CUDA_PREFERENCE if gpu and provider in ("cuda", "auto") else \
        (("fp16",) if gpu else ()) + ORT_CPU_PREFERENCE
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


def _auto_precision(bundle: Bundle, fmt: str, order: tuple[str, ...], what: str) -> tuple[str, str]:
    have = bundle_precisions(bundle, fmt)
    chosen = next(p for p in order if p in have)
    return chosen, f"auto: the {what} of {', '.join(p for p in order if p in have)} that this bundle has"


# TensorRT engines: the smallest built precision (the user built them to run them).
TRT_PREFERENCE = ("int8-vision+int4", "int4", "int8-vision", "fp16", "fp32")


def bundle_backend(bundle: Bundle, backend: str) -> str:
    """The backend that will run this bundle: the requested one if the bundle has its artifacts."""
    formats = bundle_formats(bundle)
    if backend not in BACKEND_FORMAT:
        raise BackendUnavailable(f"backend {backend!r} cannot run a bundle (it has {formats} artifacts); choose from "
                                 f"{', '.join(BACKEND_FORMAT)}, or load the source checkpoint for 'torch'")
    if BACKEND_FORMAT[backend] not in formats:
        how = ("build them on this device with `edgelmm build-engines BUNDLE`" if backend == "tensorrt" else
               f"export them with `edgelmm export --format {BACKEND_FORMAT[backend]}`")
        raise BackendUnavailable(f"backend {backend!r} needs {BACKEND_FORMAT[backend]} artifacts but this bundle has "
                                 f"{formats}; {how}")
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
    why = "asked for"
    if precision != "auto":
        have = bundle_precisions(bundle, BACKEND_FORMAT[backend])
        if precision not in have:
            raise OptionError(f"precision {precision!r} is not in this bundle for backend {backend!r}; it has "
                              f"{', '.join(have)} (or 'auto')")
    files = ModelFiles.open(bundle.root)
    family = detect(files, prompt_style=bundle.manifest.get("prompt_style"))
    if backend == "llamacpp":
        from .runtimes.llamacpp import DEFAULT_CONTEXT, LlamaCppBackend

        if precision == "auto":
            precision, why = _auto_precision(bundle, "gguf", GGUF_PREFERENCE, "smallest GGUF type")
        if gpu_layers == 0 or not nvidia_gpu_present():  # on a GPU its own memory is the limit
            # An out-of-range max_context is the backend's OptionError to raise, not a budget question.
            positions = min(max_context or DEFAULT_CONTEXT, files.context_length)
            _check_load_budget(bundle, "gguf", precision, max_memory,
                               kv_cache_bytes(bundle.manifest["text"], positions))
        runtime = LlamaCppBackend(bundle, precision=precision, threads=threads, gpu_layers=gpu_layers,
                                  context_length=max_context, **({"max_batch": max_batch} if max_batch else {}))
    elif backend == "tensorrt":
        from .runtimes.tensorrt import TensorRTBackend

        if precision == "auto":
            precision, why = _auto_precision(bundle, "tensorrt", TRT_PREFERENCE, "smallest engine precision")
        runtime = TensorRTBackend(bundle, precision=precision, max_context=max_context)
    else:
        from .runtimes.onnxruntime import OnnxRuntimeBackend, vision_chunk_for

        if precision == "auto":
            precision, why = _auto_onnx_precision(bundle, provider)
        if provider == "cpu" or not nvidia_gpu_present():
            _check_load_budget(bundle, "onnx", precision, max_memory)
        runtime = OnnxRuntimeBackend(bundle, provider=provider, threads=threads, precision=precision, gpu=gpu_options,
                                     vision_chunk=vision_chunk_for(family.config.get("vision_config") or {}),
                                     layout=layout)
    return Pipeline(files, family, runtime, selection=selection, precision_reason=why)


def _check_load_budget(bundle: Bundle, fmt: str, precision: str, budget: int | None, extra: int = 0) -> None:
    """Refuse artifacts that cannot fit, naming the bundle's smaller sets that would."""
    def need(f: str, p: str, more: int = 0) -> int:
        return session_step("", artifact_set_bytes(bundle.manifest, f, p), more).need

    wanted = need(fmt, precision, extra)
    smaller = [f"{f} {p} (~{gib(need(f, p))})" for f in ("onnx", "gguf") for p in bundle_precisions(bundle, f)
               if (f, p) != (fmt, precision) and need(f, p) < wanted]
    hint = (f"Smaller sets in this bundle: {', '.join(smaller)}." if smaller else
            "Calibrate a smaller precision (edgelmm calibrate --precision int4) or export a q4_k_m GGUF.")
    check_budget([Step(f"the {precision} {fmt} artifact set", wanted, hint)], budget, f"loading {bundle.root.name}")


def load(path: str | Path, backend: str = "auto", *, provider: str = "auto", prompt_style: str | None = None,
         threads: int | None = None, precision: str = "auto", trust_remote_code: bool = False,
         device: str = "cpu", gpu_layers: int | None = None, max_context: int | None = None,
         gpu_options=None, max_memory: int | None = None, layout: str = "auto",
         max_batch: int | None = None) -> Pipeline:
    """Open a bundle (exported by `edgelmm export`) or a HF checkpoint directory and return a
    Pipeline over the chosen backend.

    backend: "auto" picks the best this machine can run (TensorRT engines, ONNX Runtime on the GPU,
    llama.cpp offloaded to the GPU, then the CPU; `pipe.describe()["selection"]` says why);
    "tensorrt" runs engines built by `edgelmm build-engines` (precision "fp16" | "int8-vision" |
    "int4" | "int8-vision+int4" | "fp32"; max_context caps the KV cache); "onnxruntime" runs a
    bundle's ONNX graphs (provider "auto" | "tensorrt" | "cuda" | "cpu"); "llamacpp" runs its GGUF
    pair (precision "f32" | "f16" | "q8_0" | "q4_k_m"; gpu_layers to offload, default all when
    llama.cpp was built with CUDA and a GPU is here; max_context sizes its context, whose KV cache
    is allocated up front: default the model's limit or 8192, the smaller); "torch" is the PyTorch reference
    (checkpoints; device "cpu" or "cuda"). gpu_options (runtimes.onnxruntime.GpuOptions) sets ONNX
    Runtime's GPU providers: device id, fp16, the TensorRT provider's engine cache directory.
    A bundle is checked against its manifest's checksums before any session is created.
    prompt_style: llava family only, "mantis" (numbered images) or "plain"; default from the checkpoint name.
    layout: ONNX Runtime's decoder, "fused" (GroupQueryAttention, KV cache written in place: the
    decode step grows far less with the context), "plain" (the traced graph), or "auto" (fused where
    the bundle has it for the precision and the decoder runs on the CPU provider; not yet measured
    on a GPU, so GPU providers take plain unless asked).
    max_batch: llamacpp only, the sequences its one context holds at once (batched generation, the
    server's batches; default 4): larger batches are answered row by row.
    """
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    check_threads(threads)  # before a bundle's checksums are hashed or any weights load
    check_choice("decoder layout (--layout)", layout, LAYOUTS)
    if max_batch is not None:
        check_int("max_batch", max_batch, 1, 256)
    check_model_dir(path)   # a typed error for a path the OS cannot even look up (is_bundle would raise)
    if backend == "torch":
        check_checkpoint_dir(path, "the PyTorch reference (backend 'torch')")
    if is_bundle(path):
        return pipeline_for_bundle(open_bundle(path), backend, provider, threads, precision,
                                   gpu_layers=gpu_layers, max_context=max_context, gpu_options=gpu_options,
                                   max_memory=max_memory, layout=layout, max_batch=max_batch)
    files = ModelFiles.open(path)
    family = detect(files, prompt_style=prompt_style)
    if backend not in ("auto", "torch"):
        raise BackendUnavailable(f"backend {backend!r} needs a bundle; export one with `edgelmm export` "
                                 f"(a checkpoint runs on 'torch'; backends: {', '.join(BACKENDS)})")
    if layout != "auto":
        raise OptionError(f"a decoder layout (--layout {layout}) is ONNX Runtime's: a checkpoint runs on PyTorch")
    if precision not in ("auto", "fp32"):
        raise OptionError(f"precision {precision!r} is one of a bundle's artifact sets; a checkpoint runs on the "
                          "PyTorch reference in fp32 (export and calibrate a bundle for other precisions)")
    from .runtimes.torch import TorchBackend

    if device == "cpu":
        need = PROCESS_BASE + 4 * checkpoint_parameters(path) + loading_overhead(path)
        check_budget([Step("the fp32 PyTorch model", need, "Export a bundle and run its int4 or q4_k_m artifacts "
                                                           "instead.")],
                     max_memory, f"loading {Path(path).name}")
    return Pipeline(files, family, TorchBackend(family, threads=threads, trust_remote_code=trust_remote_code,
                                                device=device),
                    precision_reason="a checkpoint: the PyTorch reference runs its weights in fp32")


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
