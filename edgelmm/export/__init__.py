"""Exporters: a HF checkpoint -> a bundle directory. Workstation side (needs the export extra)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from rich.console import Console

from ..bundle import (FORMAT_VERSION, build_versions, checkpoint_fingerprint, file_entry, open_bundle,
                      staging_dir, write_manifest)
from ..errors import ExportError
from ..modelfiles import PROMPT_FILES

FORMATS = ("onnx",)


def export(model_dir: str | Path, out_dir: str | Path, formats: Sequence[str] = ("onnx",), *,
           verify: bool = True, overwrite: bool = False, prompt_style: str | None = None,
           quiet: bool = False) -> Path:
    """Export `model_dir` into a bundle at `out_dir` and (by default) verify it against the PyTorch
    reference, storing the report in the manifest. Raises ExportError when parity fails."""
    from ..api import load, pipeline_for_bundle
    from ..export.onnx import example_vision_inputs, export_onnx_graphs, text_dims
    from ..verify import verify as run_verify

    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"unknown format(s) {unknown or formats}; available: {', '.join(FORMATS)}")
    console = Console(stderr=True, quiet=quiet)
    model_dir = Path(model_dir)
    with console.status(f"loading {model_dir.name}"):
        reference = load(model_dir, backend="torch", prompt_style=prompt_style)
    files, family = reference.files, reference.family
    with staging_dir(Path(out_dir), overwrite=overwrite) as stage:
        copied = []
        for name in PROMPT_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, stage / name)
                copied.append(name)
        artifacts = []
        if "onnx" in formats:
            with console.status("exporting ONNX graphs (vision, embed, decoder)"):
                artifacts += export_onnx_graphs(family, reference.backend.model, stage, example_vision_inputs(family))
        for art in artifacts:
            art["files"] = [file_entry(stage, f) for f in art["files"]]
            art["sha256"] = art["files"][0]["sha256"]
        manifest = {
            "format_version": FORMAT_VERSION, "family": family.name, "model_type": files.config.get("model_type"),
            "prompt_style": family.prompt_style,
            "source": {"path": str(model_dir.resolve()), "fingerprint": checkpoint_fingerprint(model_dir)},
            "text": text_dims(files.config),
            "files": [file_entry(stage, n) for n in copied],
            "artifacts": artifacts, "built_with": build_versions(), "verify": None,
        }
        write_manifest(stage, manifest)
        if verify:
            with console.status("verifying the bundle against the PyTorch reference"):
                # The files were hashed a moment ago; hashing them again would cost minutes on an 8B model.
                report = run_verify(pipeline_for_bundle(open_bundle(stage, verify_checksums=False)), reference)
            manifest["verify"] = {k: report[k] for k in ("precision", "backend", "summary", "passed", "failures")}
            write_manifest(stage, manifest)
            if not report["passed"]:
                raise ExportError("the exported bundle failed parity with the PyTorch reference: "
                                  + "; ".join(report["failures"]))
    console.print(f"[green]bundle written[/]: {out_dir}")
    return Path(out_dir)
