"""The public entry points: `load` a bundle or a checkpoint into a Pipeline, `info`. The top of the
stack: nothing under runtimes/, export/ or calib/ imports it (they open things through loading.py)."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle, is_bundle, open_bundle
from .errors import BackendUnavailable, OptionError
from .families import detect
from .loading import LAYOUTS, bundle_backend, checkpoint_pipeline, onnx_layouts, pipeline_for_bundle
from .modelfiles import ModelFiles, check_checkpoint_dir, check_model_dir
from .options import check_choice, check_int, check_threads
from .pipeline import Pipeline
from .runtimes.registry import BACKENDS as REGISTRY

BACKENDS = ("auto", "torch", *REGISTRY)   # torch runs checkpoints; the registry's backends run bundles
BACKEND_FORMAT = {name: spec.format for name, spec in REGISTRY.items()}
# Kept by name for callers of earlier versions; the preferences live with their backends.
GGUF_PREFERENCE = REGISTRY["llamacpp"].preference
TRT_PREFERENCE = REGISTRY["tensorrt"].preference
ORT_CPU_PREFERENCE = REGISTRY["onnxruntime"].preference


def bundle_precisions(bundle: Bundle, fmt: str = "onnx") -> list[str]:
    return bundle.precisions(fmt)


def bundle_formats(bundle: Bundle) -> list[str]:
    return bundle.formats()


def pick_precision(bundle: Bundle, provider: str) -> str:
    """The ONNX precision "auto" takes for `provider` (runtimes.onnxruntime.auto_onnx_precision)."""
    return _auto_onnx_precision(bundle, provider)[0]


def _auto_onnx_precision(bundle: Bundle, provider: str) -> tuple[str, str]:
    from .runtimes.onnxruntime import auto_onnx_precision

    return auto_onnx_precision(bundle, provider)


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
    Runtime's GPU providers: device id, fp16, the TensorRT provider's engine cache directory, and
    cuda_graph (provider "cuda", the fused fp16 decoder: the decode step captured once as a CUDA
    graph and replayed, over buffers of cuda_graph_context positions per batch size).
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
    return checkpoint_pipeline(path, files, family, threads=threads, trust_remote_code=trust_remote_code,
                               device=device, max_memory=max_memory)


def info(path: str | Path, prompt_style: str | None = None, sizes=((224, 224), (480, 640), (1080, 1920))) -> dict:
    """What edgelmm knows about a checkpoint without loading weights: family, prompt style, and
    how many tokens images (and, where the model reads videos, pairs of video frames) of a few
    sizes become."""
    files = ModelFiles.open(path)
    family = detect(files, prompt_style=prompt_style)
    out = {
        **family.describe(),
        "architecture": family.hf_model_class,
        "context_length": files.context_length,
        "image_token": family.image_token,
        "chat_template": files.chat_template is not None,
        "image_tokens": [{"height": h, "width": w, "tokens": family.num_image_tokens(h, w)} for h, w in sizes],
        "reads_videos": family.reads_videos,
    }
    if family.reads_videos:
        out["video_token"] = family.video_token
        out["video_tokens_per_frame_pair"] = [{"height": h, "width": w, "tokens": family.num_video_tokens(h, w)}
                                              for h, w in sizes]
    return out


__all__ = ["BACKENDS", "BACKEND_FORMAT", "LAYOUTS", "bundle_backend", "bundle_formats", "bundle_precisions",
           "info", "load", "onnx_layouts", "pick_precision", "pipeline_for_bundle"]
