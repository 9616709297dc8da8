"""The `edgelmm` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import BackendUnavailable, EdgeLMMError

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Run multi-image vision-language models on edge devices: export a checkpoint to a bundle, "
         "verify it against PyTorch, and answer interleaved multi-image prompts. Each command has --help.",
)
err = Console(stderr=True)


def _fail(exc: EdgeLMMError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    else:
        err.print(f"[bold red]{type(exc).__name__}[/]: {exc}")
    raise typer.Exit(2)


@app.command()
def run(
    model: Path = typer.Argument(..., help="A bundle from `edgelmm export`, or a Hugging Face checkpoint directory."),
    prompt: str = typer.Option(..., "--prompt", "-p",
                               help="The question. Put one <image> marker where each image goes, e.g. "
                                    "'What changed between <image> and <image>?'."),
    image: List[Path] = typer.Option([], "--image", "-i", help="An image file; repeat once per <image> marker, in order."),
    max_new_tokens: int = typer.Option(64, help="Stop after this many new tokens."),
    temperature: float = typer.Option(0.0, help="0 answers greedily; higher samples more freely."),
    top_p: float = typer.Option(1.0, help="Sample only from the smallest set of tokens with this much probability."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling, for repeatable answers."),
    backend: str = typer.Option("auto", help="Which runtime answers: auto, onnxruntime or llamacpp (bundles), torch "
                                             "(the PyTorch reference, checkpoints)."),
    provider: str = typer.Option("auto", help="ONNX Runtime provider for bundles: auto, tensorrt, cuda or cpu."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    raw: bool = typer.Option(False, help="Send the prompt as-is, without the model's chat template."),
    prompt_style: Optional[str] = typer.Option(None, help="llava only: 'mantis' numbers images in the text, "
                                                          "'plain' does not. Default: from the checkpoint name."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (answer, tokens, timings) instead of streaming."),
):
    """Answer a prompt about one or more images, streaming the answer as it is generated."""
    from . import api

    try:
        pipe = api.load(model, backend=backend, provider=provider, prompt_style=prompt_style, threads=threads)
        kw = dict(chat=not raw, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if as_json:
            g = pipe.generate(prompt, [str(p) for p in image], **kw)
            print(json.dumps({"answer": g.text, "token_ids": g.token_ids, "prompt_tokens": g.prompt_tokens,
                              "finish_reason": g.finish_reason, "timings_ms": g.timings_ms,
                              "backend": pipe.backend.describe()}))
            return
        for piece in pipe.stream(prompt, [str(p) for p in image], **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except EdgeLMMError as exc:
        _fail(exc, as_json)


@app.command()
def export(
    model: Path = typer.Argument(..., help="A Hugging Face checkpoint directory to export."),
    out: Path = typer.Argument(..., help="The bundle directory to create (it appears only when complete)."),
    format: str = typer.Option("onnx", "--format", "-f", help="What to write, comma-separated: onnx (vision, embedding "
                                                              "and decoder graphs for ONNX Runtime), gguf (LLM + "
                                                              "mmproj files for llama.cpp)."),
    precision: str = typer.Option("fp32", "--precision", help="ONNX: comma-separated graph precisions: fp32 (exact, "
                                                              "best on CPU), fp16 (half the size, for GPUs)."),
    gguf_types: str = typer.Option("f16", "--gguf-types", help="GGUF: comma-separated types: f32 (exact), f16, q8_0, "
                                                              "q4_k_m (smallest; llama.cpp's k-quants)."),
    force: bool = typer.Option(False, help="Write a GGUF that llama.cpp is known to run wrongly (a CLIP tower) "
                                           "instead of refusing; verify's report records the damage."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check against the PyTorch reference."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle at OUT."),
    prompt_style: Optional[str] = typer.Option(None, help="llava only: 'mantis' or 'plain' (stored in the bundle)."),
    as_json: bool = typer.Option(False, "--json", help="Print the bundle's manifest as JSON when done."),
):
    """Turn a checkpoint into a deployable bundle and check it against the PyTorch reference."""
    from .bundle import MANIFEST
    from .export import export as run_export

    try:
        path = run_export(model, out, [f.strip() for f in format.split(",")],
                          precisions=[p.strip() for p in precision.split(",")],
                          gguf_types=[t.strip() for t in gguf_types.split(",")], force=force, verify=not no_verify,
                          overwrite=overwrite, prompt_style=prompt_style, quiet=as_json)
        manifest = json.loads((path / MANIFEST).read_text())  # just written and hashed by export
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(manifest))
    else:
        for prec, report in manifest["verify"].items():
            Console().print({"precision": prec, "verify": report["summary"], "passed": report["passed"]})


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="A bundle directory made by `edgelmm export`."),
    reference: Path = typer.Option(..., "--reference", "-r", help="The checkpoint the bundle was exported from."),
    backend: Optional[str] = typer.Option(None, help="onnxruntime (ONNX graphs) or llamacpp (GGUF files). "
                                                     "Default: every backend the bundle has artifacts for."),
    provider: str = typer.Option("auto", help="ONNX Runtime provider: auto, tensorrt, cuda or cpu."),
    precision: Optional[str] = typer.Option(None, help="Which precision to check (ONNX fp32/fp16, GGUF f32/f16/"
                                                       "q8_0/q4_k_m). Default: every one the bundle has."),
    max_new_tokens: int = typer.Option(16, help="Greedy tokens compared per prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
):
    """Measure a bundle against the PyTorch reference on fixed multi-image prompts; exit 1 if a
    threshold (feature/logit difference, KL, token match) is broken."""
    from . import api
    from .bundle import open_bundle
    from .verify import verify as run_verify

    try:
        opened = open_bundle(bundle)
        backends = [backend] if backend else [b for b, f in api.BACKEND_FORMAT.items() if f in api.bundle_formats(opened)]
        checks = [(b, p) for b in backends for p in api.bundle_precisions(opened, api.BACKEND_FORMAT.get(b, b))
                  if precision in (None, p)]
        if not checks:
            raise BackendUnavailable(f"nothing to verify: the bundle has no {backend or ''} {precision or ''} artifacts "
                                     f"(formats {api.bundle_formats(opened)})")
        ref = api.load(reference, backend="torch")
        reports = [run_verify(api.pipeline_for_bundle(opened, backend=b, provider=provider, precision=p), ref, p,
                              max_new_tokens=max_new_tokens) for b, p in checks]
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"reports": reports,
                                                                "passed": all(r["passed"] for r in reports)}))
    else:
        from rich.table import Table

        out = Console()
        for report in reports:
            table = Table("case", "vision max|d|", "vision cos", "logit max|d|", "KL", "token match",
                          title=f"{report['precision']} on {report['backend']['backend']} "
                                f"{report['backend'].get('providers', '')}")
            for c in report["cases"]:
                table.add_row(c["case"], f"{c['vision_max_abs']:.2e}", f"{c['vision_cosine_min']:.6f}",
                              f"{c['logits_max_abs']:.2e}", f"{c['logits_kl']:.2e}", f"{c['token_match']:.3f}")
            out.print(table)
            out.print(f"decoder alone (same input embeddings) logit max|d|: "
                      f"{report['summary']['decoder_logits_max_abs']:.2e}; batch-2 logits max|d|: "
                      f"{report['summary']['batch2_logits_max_abs']:.2e}")
            if "backend_tokenizer_match" in report["summary"]:
                out.print(f"llama.cpp's own tokenizer agrees with the HF tokenizer on "
                          f"{report['summary']['backend_tokenizer_match']:.0%} of the prompts")
            out.print("[green]PASSED[/]" if report["passed"] else "[red]FAILED[/]: " + "; ".join(report["failures"]))
    if not all(r["passed"] for r in reports):
        raise typer.Exit(1)


@app.command(name="eval")
def eval_(
    model: Optional[Path] = typer.Argument(None, help="A bundle or checkpoint directory. Default: the shipped "
                                                      "reference model (edgelmm/models/edgelmm-ref-siglip-llama)."),
    samples: int = typer.Option(900, help="How many held-out samples (tasks take turns: 9 tasks, so 900 = 100 each)."),
    backend: str = typer.Option("auto", help="Which runtime answers: auto, onnxruntime or llamacpp (bundles), torch (checkpoints)."),
    provider: str = typer.Option("auto", help="ONNX Runtime provider for bundles: auto, tensorrt, cuda or cpu."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    as_json: bool = typer.Option(False, "--json", help="Print the report (per task, per skill, mistakes) as JSON."),
):
    """Score a model on edgelmm's held-out multi-image questions (co-reference, comparison, counting
    across images, temporal change, anomaly, in-context) and print accuracy per skill next to chance.
    Meant for models trained on edgelmm.synthetic, first of all the shipped reference model."""
    from rich.progress import Progress

    from . import api
    from .evaluate import evaluate, format_table
    from .models import reference_model

    try:
        pipe = api.load(model or reference_model(), backend=backend, provider=provider, threads=threads)
        with Progress(console=err, disable=as_json, transient=True) as progress:
            task = progress.add_task("answering held-out samples", total=samples)
            report = evaluate(pipe, samples, on_progress=lambda done, total: progress.update(task, completed=done))
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps({**report.as_dict(), "backend": pipe.backend.describe()}))
        return
    from rich.markdown import Markdown

    out = Console()
    out.print(Markdown(format_table(report)))
    out.print(f"{report.samples} samples in {report.seconds:.1f} s on {pipe.backend.describe()}")


@app.command()
def info(
    model: Path = typer.Argument(..., help="A Hugging Face checkpoint directory."),
    prompt_style: Optional[str] = typer.Option(None, help="llava only: 'mantis' or 'plain'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Show the model family, prompt style and how many tokens images of common sizes become."""
    from . import api

    try:
        data = api.info(model, prompt_style=prompt_style)
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(data))
        return
    from rich.table import Table

    out = Console()
    for key in ("family", "architecture", "model_type", "prompt_style", "context_length", "image_token", "chat_template"):
        out.print(f"[bold]{key}[/]: {data[key]}")
    table = Table("image (HxW)", "tokens")
    for row in data["image_tokens"]:
        table.add_row(f"{row['height']}x{row['width']}", str(row["tokens"]))
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
