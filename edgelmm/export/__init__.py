"""Exporters: a HF checkpoint -> a bundle directory. Workstation side (needs the export extra)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from rich.console import Console

from ..bundle import (FORMAT_VERSION, build_versions, checkpoint_fingerprint, file_entry, open_bundle,
                      staging_dir, write_manifest)
from ..errors import BundleError, ExportError
from ..memory import check_budget, checkpoint_parameters, export_steps, loading_overhead, release_memory
from ..modelfiles import PROMPT_FILES, check_checkpoint_dir
from ..progress import status

FORMATS = ("onnx", "gguf", "tensorrt")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """What staging_dir would refuse about `out_dir`, checked before any work: an existing bundle
    without overwrite, a path the OS cannot look up (a name over 255 characters)."""
    try:
        taken = out_dir.exists()
    except OSError as exc:
        raise BundleError(f"cannot use this output path ({exc.strerror})", path=str(out_dir)) from None
    if taken and not overwrite:
        raise BundleError("already exists (pass overwrite=True / --overwrite to replace it)", path=str(out_dir))


def export(model_dir: str | Path, out_dir: str | Path, formats: Sequence[str] = ("onnx",), *,
           precisions: Sequence[str] = ("fp32",), gguf_types: Sequence[str] = ("f16",), force: bool = False,
           verify: bool = True, overwrite: bool = False, prompt_style: str | None = None,
           calibration=None, quiet: bool = False, engine_precisions: Sequence[str] = ("fp16",),
           gguf_imatrix: bool = True, max_memory: int | None = None) -> Path:
    """Export `model_dir` into a bundle at `out_dir` and (by default) verify every precision against
    the fp32 PyTorch reference, storing the reports in the manifest (`verify[precision]`).
    Raises ExportError when parity fails. fp16 is for GPUs (CUDA/TensorRT providers).

    formats: "onnx" (graph precisions from `precisions`) and/or "gguf" (llama.cpp LLM + mmproj, one
    pair per type in `gguf_types`: f32, f16, q8_0, q4_k_m). `force` writes a GGUF llama.cpp is
    known to run wrongly (a CLIP tower) instead of refusing; its verify report shows the damage.

    Quantized precisions (int8, int4, int8-vision+int4) are calibrated from the fp32 graphs (exported
    too, as their source and fallback) with `calibration` (a calib.CalibrationOptions: sample source,
    methods, quality gate); a precision that fails the gate fails the export (QualityGateError).

    q4_k_m GGUFs are quantized with an importance matrix computed from the calibration prompts
    (`calibration.source`, default the synthetic generator) unless `gguf_imatrix` is False.

    `max_memory` (bytes; default what the machine has free) is checked against each step's estimated
    peak before any work: a step that cannot fit raises MemoryBudgetError naming it.

    "tensorrt" builds engines (`engine_precisions`) for this machine's GPU from the ONNX graphs (added
    to the formats) once they are verified, as `build-engines` does on a device."""
    from ..families import detect
    from ..loading import checkpoint_pipeline
    from ..modelfiles import ModelFiles
    from ..calib import QUANTIZED_PRECISIONS, CalibrationOptions, calibrate
    from ..export.gguf import GGUF_TYPES, export_gguf, finish_gguf, gguf_support
    from ..export.onnx import PRECISIONS, example_vision_inputs, export_onnx_graphs, text_dims
    from ..runtimes.torch import load_hf_model
    from ..verify import reference_run

    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"unknown format(s) {unknown or formats}; available: {', '.join(FORMATS)}")
    if "tensorrt" in formats:
        from ..runtimes.tensorrt import import_tensorrt

        import_tensorrt()  # refuse before minutes of export when TensorRT is not here
        formats = list(dict.fromkeys(["onnx", *formats]))
    bad = [p for p in precisions if p not in PRECISIONS and p not in QUANTIZED_PRECISIONS]
    if bad or not precisions:
        raise ExportError(f"unknown precision(s) {bad or precisions}; available: "
                          f"{', '.join([*PRECISIONS, *QUANTIZED_PRECISIONS])}")
    quantized = [p for p in precisions if p in QUANTIZED_PRECISIONS]
    if quantized and "onnx" not in formats:
        raise ExportError(f"precision(s) {quantized} are ONNX graph sets; add --format onnx (GGUF has --gguf-types)")
    # Quantization starts from the fp32 graphs, which stay in the bundle as the fallback.
    precisions = [p for p in dict.fromkeys(["fp32"] * bool(quantized) + list(precisions)) if p in PRECISIONS]
    bad = [t for t in gguf_types if t not in GGUF_TYPES]
    if "gguf" in formats and (bad or not gguf_types):
        raise ExportError(f"unknown GGUF type(s) {bad or gguf_types}; available: {', '.join(GGUF_TYPES)}")
    # The calibration options (quantized precisions, the q4_k_m importance matrix) and the output
    # folder are checked now, not after the weights have loaded (minutes on an 8B model).
    (calibration or CalibrationOptions()).validate()
    model_dir = check_checkpoint_dir(model_dir, "export")
    check_output_dir(Path(out_dir), overwrite)
    check_budget(export_steps(checkpoint_parameters(model_dir), formats=formats, precisions=precisions,
                              verify=verify, load_overhead=loading_overhead(model_dir)),
                 max_memory, f"exporting {model_dir.name}")
    console = Console(stderr=True, quiet=quiet)
    files = ModelFiles.open(model_dir)
    forced_gguf = False
    if "gguf" in formats:  # refuse before the weights load and any minutes go to other formats
        support = gguf_support(detect(files, prompt_style=prompt_style))
        if not support.supported and not (force and support.forceable):
            raise ExportError(f"{model_dir.name}: cannot export GGUF: {support.reason}")
        forced_gguf = not support.supported
    with status(console, f"loading {model_dir.name}"):
        reference = checkpoint_pipeline(model_dir, files, detect(files, prompt_style=prompt_style))
    files, family = reference.files, reference.family
    with staging_dir(Path(out_dir), overwrite=overwrite) as stage:
        copied = []
        for name in PROMPT_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, stage / name)
                copied.append(name)
        artifacts, pending_quantization = [], []
        if "onnx" in formats and "fp32" in precisions:
            with status(console, "exporting fp32 ONNX graphs (vision, embed, decoder)"):
                artifacts += export_onnx_graphs(family, reference.backend.model, stage, example_vision_inputs(family))
        if "gguf" in formats:
            imatrix = None
            if gguf_imatrix and "q4_k_m" in gguf_types:
                imatrix = _importance_matrix(console, family, reference.backend.model,
                                             calibration or CalibrationOptions())
            with status(console, "writing GGUF files") as update:
                artifacts += export_gguf(family, reference.backend.model, stage, gguf_types, force=force,
                                         progress=update, imatrix=imatrix, pending=pending_quantization)
        # Memory is bounded by the model, not a multiple of it: the reference's answers on the verify
        # prompts are kept and its weights released before anything else loads the same weights
        # again (an fp16 copy, an ONNX Runtime session, llama.cpp).
        reference_answers = None
        if verify:
            with status(console, "running the PyTorch reference on the verify prompts"):
                reference_answers = reference_run(reference)
        del reference
        release_memory()
        if pending_quantization:  # file to file: after the model is gone
            with status(console, "quantizing GGUF files with llama.cpp") as update:
                finish_gguf(pending_quantization, progress=update)
        if "onnx" in formats and "fp16" in precisions:
            with status(console, "exporting fp16 ONNX graphs (vision, embed, decoder)"):
                half = load_hf_model(family, "float16")
                artifacts += export_onnx_graphs(family, half, stage, example_vision_inputs(family), "fp16")
                del half
                release_memory()
        _hash_artifacts(stage, artifacts)
        manifest = {
            "format_version": FORMAT_VERSION, "family": family.name, "model_type": files.config.get("model_type"),
            "prompt_style": family.prompt_style,
            "source": {"path": str(model_dir.resolve()), "fingerprint": checkpoint_fingerprint(model_dir)},
            "text": text_dims(files.config),
            "files": [file_entry(stage, n) for n in copied],
            "artifacts": artifacts, "built_with": build_versions(), "verify": {},
        }
        write_manifest(stage, manifest)
        if verify:
            checks = [("onnxruntime", p) for p in precisions if "onnx" in formats]
            checks += [("llamacpp", t) for t in gguf_types if "gguf" in formats]
            _verify_artifacts(console, stage, manifest, checks, reference_answers, forced_gguf)
        if quantized:
            with status(console, "calibrating") as update:
                calibrate(stage, quantized, calibration or CalibrationOptions(), progress=update,
                          verify_checksums=False)
        if "tensorrt" in formats:
            from .tensorrt import EngineOptions, build_engines

            with status(console, "building TensorRT engines") as update:
                build_engines(stage, EngineOptions(precisions=tuple(engine_precisions), verify=verify),
                              progress=update)
    console.print(f"[green]bundle written[/]: {out_dir}")
    return Path(out_dir)


def _importance_matrix(console, family, model, options):
    """llama.cpp's importance matrix for q4_k_m, from the calibration prompts through the model."""
    from ..calib.sources import collect
    from .imatrix import IMATRIX_TILES, compute_imatrix

    with status(console, "importance matrix for q4_k_m") as update:
        samples = collect(options.source, options.calib_samples, options.seed, image_root=options.image_root)
        return compute_imatrix(family, model, samples.samples, options.source, progress=update,
                               max_tiles=min(options.calib_tiles, IMATRIX_TILES))


def _hash_artifacts(stage: Path, artifacts: list[dict]) -> None:
    """Each artifact's file entries (size, sha256); an mmproj shared by several GGUF types is hashed once."""
    hashed: dict[str, dict] = {}
    for art in artifacts:
        art["files"] = [hashed.setdefault(f, file_entry(stage, f)) for f in art["files"]]
        art["sha256"] = art["files"][0]["sha256"]


def _verify_artifacts(console, stage: Path, manifest: dict, checks: list[tuple[str, str]], reference_answers,
                      forced_gguf: bool) -> None:
    """Verify each (backend, precision) of the staged bundle against the reference's answers, every
    ONNX precision in each decoder layout it has (the fused one's report nested under "fused"); the
    reports go into the manifest as they come. Raises ExportError at the first failure, except for
    a forced GGUF, known to be wrong: its report records the damage."""
    from ..loading import onnx_layouts, pipeline_for_bundle
    from ..verify import verify as run_verify

    # The files were hashed a moment ago; hashing them again would cost minutes on an 8B model.
    bundle = open_bundle(stage, verify_checksums=False)
    runs = [(backend, precision, layout) for backend, precision in checks
            for layout in (onnx_layouts(bundle, precision) if backend == "onnxruntime" else [None])]
    for backend, precision, layout in runs:
        what = f"{precision} {backend}" + (" (fused decoder)" if layout == "fused" else "")
        with status(console, f"verifying the {what} artifacts against the PyTorch reference"):
            # The CPU provider: the graphs are checked in true fp32 wherever the export runs; a
            # GPU's own kernels (TF32, fp16) are checked on the device by `edgelmm verify`.
            provider = "cpu" if backend == "onnxruntime" else "auto"
            candidate = pipeline_for_bundle(bundle, backend=backend, provider=provider, precision=precision,
                                            **({"layout": layout} if layout else {}))
            report = run_verify(candidate, reference_answers, precision)
            del candidate  # one runtime's weights in memory at a time
            release_memory()
        record = {k: report[k] for k in ("precision", "backend", "thresholds", "summary", "passed", "failures")}
        if layout == "fused":
            manifest["verify"][precision]["fused"] = record
        else:
            manifest["verify"][precision] = record
        write_manifest(stage, manifest)
        if not report["passed"] and not (backend == "llamacpp" and forced_gguf):
            raise ExportError(f"the exported {what} artifacts failed parity with the PyTorch "
                              "reference: " + "; ".join(report["failures"]))
