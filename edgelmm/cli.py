"""The `edgelmm` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import List, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from .errors import BackendUnavailable, EdgeLMMError, OptionError

try:  # typer >= 0.2x runs on its own copy of click, whose exceptions are not click's
    from typer._click.exceptions import ClickException, UsageError
except ImportError:
    from click.exceptions import ClickException, UsageError

_ARGV = "edgelmm.argv"


class _Commands(TyperGroup):
    """The `edgelmm` group. With --json on the command line, a usage error (a missing argument, a
    value of the wrong type, an unknown option or command) is one JSON object on stdout, through
    _fail like every other error, and exit status 2; without --json click prints its usage message."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)  # parsing consumes `args`
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            _usage_error(exc, argv)
        ctx.meta[_ARGV] = argv
        return ctx

    def invoke(self, ctx):
        try:  # the subcommand's own arguments are parsed in here
            return super().invoke(ctx)
        except UsageError as exc:
            _usage_error(exc, ctx.meta.get(_ARGV, ()))


def _usage_error(exc: UsageError, argv) -> NoReturn:
    if "--json" in argv:
        _fail(exc, True, name="UsageError")
    raise exc


app = typer.Typer(
    cls=_Commands, add_completion=False, no_args_is_help=True,
    help="Run multi-image vision-language models on edge devices: export a checkpoint to a bundle, "
         "verify it against PyTorch, and answer interleaved multi-image prompts. Each command has --help.",
)
err = Console(stderr=True)


_MAX_MEMORY = typer.Option(None, "--max-memory", help="Memory this command may use, e.g. 12G or 800M (default: what "
                                                          "the machine has free). A step that would not fit is "
                                                          "refused before it starts, with what would fit.")


# One --precision for every command that runs a bundle (run, eval, watch); `describe()` and --json say which
# precision ran and why ("precision_reason").
_PRECISION = typer.Option("auto", "--precision", help="Which of a bundle's artifact sets runs: ONNX fp32/fp16/int8/"
                                                      "int4/int8-vision+int4, GGUF f32/f16/q8_0/q4_k_m (with "
                                                      "--backend llamacpp), TensorRT engines. auto: on the CPU the "
                                                      "smallest that passed its quality gate, on a GPU fp16.")


@contextmanager
def _progress(label: str, quiet: bool):
    """A live status line on stderr for a long step (off with --json). Yields update(message,
    done=None, total=None): a spinner until a total is given, then a bar with a count."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not quiet and not err.is_terminal:  # a log or a pipe: a line per step (a live bar prints nothing there)
        from .progress import line_progress

        update = line_progress(err)
        update(label)
        yield update
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, disable=quiet, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda msg, done=None, total=None: bar.update(task, description=msg, completed=done, total=total)


def _run_step(label: str, as_json: bool, step):
    """Run step(update) under a progress line; a typed error ends the command (exit 2); with --json
    the result is printed as JSON. Returns the result."""
    try:
        with _progress(label, as_json) as update:
            result = step(update)
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(result))
    return result


def _fail(exc: Exception, as_json: bool, name: str | None = None) -> NoReturn:
    """The one error printer: `name: message` on stderr, or with --json one JSON object on stdout
    (with the error's report, when it carries one: a QualityGateError's quality table); exit status
    2. `name` defaults to the error's class (UsageError for click's usage errors)."""
    name = name or type(exc).__name__
    message = exc.format_message() if isinstance(exc, ClickException) else str(exc)
    if as_json:
        print(json.dumps({"error": name, "message": message, **(getattr(exc, "report", None) or {})}))
    else:
        err.print(f"[bold red]{name}[/]: {escape(message)}")  # escaped: "[1, 8]" in a message is text
    raise typer.Exit(2)


@app.command()
def run(
    model: Path = typer.Argument(..., help="A bundle from `edgelmm export`, or a Hugging Face checkpoint directory."),
    prompt: str = typer.Option(..., "--prompt", "-p",
                               help="The question. Put one <image> marker where each image goes, e.g. "
                                    "'What changed between <image> and <image>?'."),
    image: List[Path] = typer.Option([], "--image", "-i", help="An image file; repeat once per <image> marker, in order."),
    video: List[Path] = typer.Option([], "--video", help="Models that read videos (Qwen2-VL): a video file (needs "
                                                         "OpenCV) or a directory of frames; repeat once per <video> "
                                                         "marker, in order."),
    fps: Optional[float] = typer.Option(None, help="With --video: the rate to sample a video file at (default 2 "
                                                   "frames a second), or the rate a directory's frames were taken at."),
    max_new_tokens: int = typer.Option(64, help="Stop after this many new tokens."),
    temperature: float = typer.Option(0.0, help="0 answers greedily; higher samples more freely."),
    top_p: float = typer.Option(1.0, help="Sample only from the smallest set of tokens with this much probability."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling, for repeatable answers."),
    backend: str = typer.Option("auto", help="Which runtime answers: auto (the best this machine runs; see "
                                             "`edgelmm doctor`), tensorrt, onnxruntime or llamacpp (bundles), torch "
                                             "(the PyTorch reference, checkpoints)."),
    provider: str = typer.Option("auto", help="ONNX Runtime provider for bundles: auto, tensorrt, cuda or cpu."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    device: str = typer.Option("cpu", help="torch backend only: cpu or cuda."),
    gpu_layers: Optional[int] = typer.Option(None, help="llamacpp only: layers to offload to the GPU (default: all "
                                                        "when llama.cpp was built with CUDA and a GPU is here)."),
    max_context: Optional[int] = typer.Option(None, help="llamacpp and tensorrt: most positions (prompt + answer) "
                                                         "the KV cache holds; it is allocated up front (llamacpp "
                                                         "default: the model's limit or 8192, the smaller)."),
    raw: bool = typer.Option(False, help="Send the prompt as-is, without the model's chat template."),
    prompt_style: Optional[str] = typer.Option(None, help="llava only: 'mantis' numbers images in the text, "
                                                          "'plain' does not. Default: from the checkpoint name."),
    precision: str = _PRECISION,
    layout: str = typer.Option("auto", help="onnxruntime only: the decoder graph, fused (KV cache written in "
                                            "place: the step does not slow down as the answer grows), plain (the "
                                            "traced graph), or auto (fused where the bundle has it and the "
                                            "decoder runs on the CPU)."),
    max_memory: Optional[str] = _MAX_MEMORY,
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="onnxruntime on an NVIDIA GPU: capture the decode step "
                                                                "once as a CUDA graph and replay it for every token "
                                                                "(one launch instead of hundreds). Needs the CUDA "
                                                                "provider and the bundle's fused fp16 decoder "
                                                                "(--precision fp16)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (answer, tokens, timings) instead of streaming."),
):
    """Answer a prompt about one or more images (or videos), streaming the answer as it is generated."""
    from . import api
    from .memory import parse_size
    from .pipeline import SamplingParams

    try:
        SamplingParams(max_new_tokens, temperature, top_p, seed).validate()  # before the model loads
        gpu_options = None
        if cuda_graph:
            from .runtimes.onnxruntime import GpuOptions

            if backend not in ("auto", "onnxruntime") or provider not in ("auto", "cuda"):
                raise OptionError(f"--cuda-graph runs ONNX Runtime's CUDA provider, not --backend {backend} "
                                  f"--provider {provider}")
            backend, provider, gpu_options = "onnxruntime", "cuda", GpuOptions(cuda_graph=True)
        pipe = api.load(model, backend=backend, provider=provider, prompt_style=prompt_style, threads=threads,
                        device=device, gpu_layers=gpu_layers, max_context=max_context, precision=precision,
                        max_memory=parse_size(max_memory), layout=layout, gpu_options=gpu_options)
        kw = dict(chat=not raw, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        media = _media_in_marker_order(prompt, image, video, fps)
        if as_json:
            g = pipe.generate(prompt, media, **kw)
            print(json.dumps({"answer": g.text, "token_ids": g.token_ids, "prompt_tokens": g.prompt_tokens,
                              "finish_reason": g.finish_reason, "timings_ms": g.timings_ms,
                              "backend": pipe.describe()}))
            return
        for piece in pipe.stream(prompt, media, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except EdgeLMMError as exc:
        _fail(exc, as_json)


def _media_in_marker_order(prompt: str, images: List[Path], videos: List[Path], fps: Optional[float]) -> list:
    """--image and --video files merged in the order of the prompt's <image> and <video> markers (the
    pipeline names any count that does not fit)."""
    from .errors import PromptError
    from .options import check_number
    from .prompt import MARKERS, parse_prompt
    from .video import video_from_path

    if not videos:
        if fps is not None:
            raise OptionError("--fps: goes with --video")
        return [str(p) for p in images]
    kinds = parse_prompt(prompt).media_kinds
    if kinds.count("video") != len(videos) or kinds.count("image") != len(images):
        raise PromptError(f"the prompt has {kinds.count('image')} {MARKERS['image']} and {kinds.count('video')} "
                          f"{MARKERS['video']} marker(s) but {len(images)} --image and {len(videos)} --video were given")
    if fps is not None:
        check_number("--fps", fps, 0, lo_open=True)
    image_iter, video_iter = iter(images), iter(videos)
    return [str(next(image_iter)) if k == "image" else video_from_path(next(video_iter), fps) for k in kinds]


# Calibration options, shared by `export` (quantized precisions) and `calibrate`. One vocabulary: --calib is
# where the prompts come from; --calib-samples, --eval-samples (and eval's --samples) are counts.
_CALIB = typer.Option("synthetic", "--calib", help="Where the calibration prompts come from: a Mantis-Instruct "
                                                   "JSONL ({'images': [...], 'conversation': [...]} with <image> "
                                                   "markers), a MIMIC-IT instruction JSON, a folder of images "
                                                   "(grouped into multi-image sets), a video file (a frame a "
                                                   "second, four frames per prompt), or 'synthetic' (edgelmm's "
                                                   "generator). Prefix mantis:, mimicit:, folder: or video: to "
                                                   "force the kind.")
_CALIB_SAMPLES = typer.Option(64, "--calib-samples", help="How many multi-image prompts to draw from the source "
                                                          "(seeded, stratified by image count and size); about "
                                                          "one in eight is held out to measure quality.")
_VISION_METHOD = typer.Option("minmax", help="INT8 vision ranges: minmax, entropy or percentile.")
_INT4_ALGORITHM = typer.Option("rtn", help="INT4 decoder weights: rtn (round to nearest), hqq (needs torch) or "
                                          "gptq (calibrated on the sampled prompts' decoder inputs; slower).")
_BLOCK_SIZE = typer.Option(32, help="INT4 block size (weights per scale): 32, 64, 128 ...")
_ACCURACY_LEVEL = typer.Option(4, help="INT4 compute: 4 = int8 arithmetic (fastest on CPU), 0 = fp32.")
_LM_HEAD = typer.Option("int8", "--lm-head", help="INT4 decoders: the output projection (vocabulary x hidden, a third "
                                                   "of a 1B model's decoder) as int8 (near-lossless, a quarter of "
                                                   "fp32's memory), int4 (smallest, loses more) or fp32.")
_NO_GATE = typer.Option(False, "--no-quality-gate", help="Keep a precision even when it fails the quality gate "
                                                         "(the report still records the failure).")
_MAX_DROP = typer.Option(2.0, help="Quality gate: the most held-out accuracy (points) a precision may lose.")
_MIN_COSINE = typer.Option(0.99, help="Quality gate: the lowest vision feature cosine against fp32.")
_EVAL_SAMPLES = typer.Option(None, help="Held-out accuracy samples per precision. Default: all 900 when the model "
                                        "answers edgelmm's synthetic tasks (the reference model), else none.")
_SEED = typer.Option(0, help="Seed for sampling the calibration prompts.")
_CALIB_TILES = typer.Option(None, "--calib-tiles", help="The most image tiles run through the vision tower to "
                                                        "calibrate (INT8 ranges, GPTQ, the GGUF importance "
                                                        "matrix: at most 32 of them; default 256): each costs a "
                                                        "full vision pass, and a SmolVLM image is up to 17 tiles.")
_NO_SENSITIVITY = typer.Option(False, "--no-sensitivity", help="INT8 vision: when the quantized tower misses its "
                                                                "cosine target, do not search node by node for "
                                                                "the ones to keep in float (one quantization per "
                                                                "node: hours for a 27-layer SigLIP on a CPU).")
_ACTIVATIONS = typer.Option("u8", help="INT8 vision activations: u8 (fastest on CPU) or s8 (symmetric, what "
                                       "TensorRT takes: use it for bundles that will get INT8 engines).")


def _calibration_options(source, calib_samples, vision_method, int4_algorithm, block_size, accuracy_level, no_gate,
                         max_accuracy_drop, min_vision_cosine, eval_samples, seed, activations="u8", image_root=None,
                         calib_tiles=None, no_sensitivity=False, lm_head="int8"):
    """The options, checked (a CalibrationOptionError or CalibrationError) before any work starts."""
    from .calib import CalibrationOptions

    opts = CalibrationOptions(source=source, calib_samples=calib_samples, seed=seed, vision_method=vision_method,
                              int4_algorithm=int4_algorithm, int4_block_size=block_size,
                              int4_accuracy_level=accuracy_level, lm_head=lm_head, gate=not no_gate,
                              max_accuracy_drop=max_accuracy_drop, min_vision_cosine=min_vision_cosine,
                              eval_samples=eval_samples, activations=activations,
                              image_root=str(image_root) if image_root else None)
    if calib_tiles is not None:
        opts.calib_tiles = calib_tiles
    opts.sensitivity = not no_sensitivity
    opts.validate()
    return opts


@app.command()
def export(
    model: Path = typer.Argument(..., help="A Hugging Face checkpoint directory to export."),
    out: Path = typer.Argument(..., help="The bundle directory to create (it appears only when complete)."),
    format: str = typer.Option("onnx", "--format", "-f", help="What to write, comma-separated: onnx (vision, embedding "
                                                              "and decoder graphs for ONNX Runtime), gguf (LLM + "
                                                              "mmproj files for llama.cpp), tensorrt (engines for "
                                                              "THIS machine's GPU, from the onnx graphs; for a "
                                                              "Jetson, export onnx here and run `edgelmm "
                                                              "build-engines` there)."),
    engine_precision: str = typer.Option("fp16", help="tensorrt: comma-separated engine precisions (see "
                                                      "`edgelmm build-engines --help`)."),
    precision: str = typer.Option("fp32", "--precision", help="ONNX: comma-separated graph precisions: fp32 (exact), "
                                                              "fp16 (half the size, for GPUs), int8 (INT8 vision + "
                                                              "dynamic INT8 decoder), int4 (INT4 decoder), "
                                                              "int8-vision+int4. Quantized ones are calibrated on "
                                                              "--calib and must pass the quality gate."),
    calib: str = _CALIB,
    calib_samples: int = _CALIB_SAMPLES, calib_tiles: Optional[int] = _CALIB_TILES,
    vision_method: str = _VISION_METHOD, int4_algorithm: str = _INT4_ALGORITHM,
    block_size: int = _BLOCK_SIZE, accuracy_level: int = _ACCURACY_LEVEL, lm_head: str = _LM_HEAD,
    no_quality_gate: bool = _NO_GATE, max_accuracy_drop: float = _MAX_DROP, min_vision_cosine: float = _MIN_COSINE,
    eval_samples: Optional[int] = _EVAL_SAMPLES, seed: int = _SEED, activations: str = _ACTIVATIONS,
    gguf_types: str = typer.Option("f16", "--gguf-types", help="GGUF: comma-separated types: f32 (exact), f16, q8_0, "
                                                              "q4_k_m (smallest; llama.cpp's k-quants)."),
    no_imatrix: bool = typer.Option(False, "--no-imatrix", help="GGUF q4_k_m: quantize without an importance "
                                                                "matrix (by default one is computed from the --calib "
                                                                "prompts, so the columns that matter keep precision)."),
    force: bool = typer.Option(False, help="Write a GGUF that llama.cpp is known to run wrongly (a CLIP tower) "
                                           "instead of refusing; verify's report records the damage."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check against the PyTorch reference."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle at OUT."),
    prompt_style: Optional[str] = typer.Option(None, help="llava only: 'mantis' or 'plain' (stored in the bundle)."),
    max_memory: Optional[str] = _MAX_MEMORY,
    as_json: bool = typer.Option(False, "--json", help="Print the bundle's manifest as JSON when done."),
):
    """Turn a checkpoint into a deployable bundle and check it against the PyTorch reference."""
    from .bundle import MANIFEST
    from .export import export as run_export
    from .memory import parse_size

    try:
        path = run_export(model, out, [f.strip() for f in format.split(",")],
                          precisions=[p.strip() for p in precision.split(",")],
                          gguf_types=[t.strip() for t in gguf_types.split(",")], force=force, verify=not no_verify,
                          overwrite=overwrite, prompt_style=prompt_style, quiet=as_json,
                          engine_precisions=[p.strip() for p in engine_precision.split(",")],
                          gguf_imatrix=not no_imatrix, max_memory=parse_size(max_memory),
                          calibration=_calibration_options(calib, calib_samples, vision_method, int4_algorithm,
                                                           block_size, accuracy_level, no_quality_gate,
                                                           max_accuracy_drop, min_vision_cosine, eval_samples, seed,
                                                           activations, calib_tiles=calib_tiles, lm_head=lm_head))
        manifest = json.loads((path / MANIFEST).read_text())  # just written and hashed by export
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(manifest))
    else:
        _print_export(manifest)


def _print_export(manifest: dict) -> None:
    """What export made: each precision's verify summary, then where the calibration prompts came
    from (with the records skipped) and the quality table of the quantized precisions."""
    for prec, report in manifest["verify"].items():
        Console().print({"precision": prec, "verify": report["summary"], "passed": report["passed"]})
    if manifest.get("quality"):
        # One calibration set serves every quantized precision of an export: its line once.
        for c in {json.dumps(c, sort_keys=True): c for c in manifest.get("calibration", {}).values()}.values():
            _print_calibration(c)
        _print_quality(manifest["quality"])


def _print_rows(title: str, columns, rows, names: int = 1) -> None:
    """A table when it fits the terminal (80 columns when output is not one); otherwise one block
    per row, its first `names` cells on one line and then `column: value` lines, so no backend or
    precision name is ever cut short. Cells may carry rich markup."""
    from rich.table import Table

    out = Console()
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    if out.measure(table, options=out.options.update(width=10_000)).maximum <= out.width:  # its unwrapped width
        out.print(table)
        return
    out.print(f"[bold]{escape(title)}[/]")
    for row in rows:
        out.print("[bold]" + " ".join(c for c in row[:names] if c) + "[/]")   # cells are markup already
        for column, cell in zip(columns[names:], row[names:]):
            if cell:
                out.print(f"  {escape(column)}: {cell}")


def _print_calibration(c: dict) -> None:
    err.print(f"{c['samples']} prompts from {c['source']} ({c['kind']}): {c['calibrated_on']} calibrated on, "
              f"{c['held_out']} held out; {c['skipped']} record(s) skipped {c['skip_reasons'] or ''}".rstrip(),
              markup=False, highlight=False, soft_wrap=True)   # one line, in a log too


def _print_quality(quality: dict) -> None:
    rows = []
    for prec, q in quality.items():
        acc = "n/a" if q.get("accuracy") is None else f"{q['accuracy']:.1%} ({q['accuracy_fp32']:.1%})"
        rows.append([escape(prec), f"{q['vision_cosine_min']:.4f}", f"{q['decoder_kl_max']:.2e}",
                     f"{q['logits_kl_max']:.2e}", f"{q['token_match_mean']:.3f}", acc, f"{q['size_bytes'] / 1e6:.1f}",
                     "[green]pass[/]" if q["passed"] else "[red]FAIL[/]: " + escape("; ".join(q["failures"]))])
    _print_rows("quality against the fp32 graphs (held-out prompts)",
                ("precision", "vision cos", "decoder KL", "e2e KL", "tokens", "accuracy (fp32)", "MB", "gate"), rows)


@app.command()
def calibrate(
    bundle: Path = typer.Argument(..., help="A bundle with fp32 ONNX graphs (from `edgelmm export`)."),
    calib: str = _CALIB,
    old_samples: Optional[str] = typer.Option(None, "--samples", "-s", hidden=True),
    precision: str = typer.Option("int8-vision+int4", "--precision",
                                  help="Comma-separated: int8, int4, int8-vision+int4."),
    calib_samples: int = _CALIB_SAMPLES, calib_tiles: Optional[int] = _CALIB_TILES,
    vision_method: str = _VISION_METHOD, int4_algorithm: str = _INT4_ALGORITHM,
    block_size: int = _BLOCK_SIZE, accuracy_level: int = _ACCURACY_LEVEL, lm_head: str = _LM_HEAD,
    no_quality_gate: bool = _NO_GATE, no_sensitivity: bool = _NO_SENSITIVITY, max_accuracy_drop: float = _MAX_DROP, min_vision_cosine: float = _MIN_COSINE,
    eval_samples: Optional[int] = _EVAL_SAMPLES, seed: int = _SEED, activations: str = _ACTIVATIONS,
    image_root: Optional[Path] = typer.Option(None, help="Where relative image paths in a JSONL/JSON source point "
                                                         "(default: the file's folder)."),
    overwrite: bool = typer.Option(False, help="Recalibrate precisions the bundle already has."),
    max_memory: Optional[str] = _MAX_MEMORY,
    as_json: bool = typer.Option(False, "--json", help="Print the quality report and calibration summary as JSON."),
):
    """Quantize a bundle's fp32 ONNX graphs on your own multi-image data (INT8 vision tower, INT4 or
    INT8 decoder), measure each precision against fp32 on held-out prompts, and add the ones that
    pass the quality gate to the bundle. Needs onnxruntime and onnx, not torch."""
    from .calib import calibrate as run_calibrate
    from .memory import parse_size

    try:
        if old_samples is not None:
            raise OptionError(f"calibrate --samples {old_samples} is now --calib {old_samples} (the calibration "
                              "source, as in export); --calib-samples and --eval-samples are counts")
        opts = _calibration_options(calib, calib_samples, vision_method, int4_algorithm, block_size,
                                    accuracy_level, no_quality_gate, max_accuracy_drop, min_vision_cosine,
                                    eval_samples, seed, activations, image_root, calib_tiles=calib_tiles,
                                    no_sensitivity=no_sensitivity, lm_head=lm_head)
        with _progress("calibrating", as_json) as update:
            result = run_calibrate(bundle, [p.strip() for p in precision.split(",")], opts, overwrite=overwrite,
                                   progress=update, max_memory=parse_size(max_memory))
    except EdgeLMMError as exc:
        report = getattr(exc, "report", None)
        if report and not as_json:
            _print_quality(report["quality"])
        _fail(exc, as_json)
    if as_json:
        print(json.dumps({"bundle": str(result.bundle), "passed": result.passed, "failures": result.failures,
                          "quality": result.quality, "calibration": result.calibration}))
        return
    _print_calibration(result.calibration)
    _print_quality(result.quality)


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="A bundle directory made by `edgelmm export`."),
    reference: Path = typer.Option(..., "--reference", "-r", help="The checkpoint the bundle was exported from."),
    backend: Optional[str] = typer.Option(None, help="onnxruntime (ONNX graphs), llamacpp (GGUF files) or tensorrt "
                                                     "(engines). Default: every backend the bundle has artifacts for."),
    provider: str = typer.Option("auto", help="ONNX Runtime provider: auto, tensorrt, cuda or cpu."),
    precision: Optional[str] = typer.Option(None, help="Which precision to check (ONNX fp32/fp16, GGUF f32/f16/"
                                                       "q8_0/q4_k_m). Default: every one the bundle has."),
    max_new_tokens: int = typer.Option(16, help="Greedy tokens compared per prompt."),
    max_memory: Optional[str] = _MAX_MEMORY,
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
):
    """Measure a bundle against the PyTorch reference on fixed multi-image prompts; exit 1 if a
    threshold (feature/logit difference, KL, token match) is broken."""
    from . import api
    from .bundle import open_bundle
    from .memory import check_budget, checkpoint_parameters, loading_overhead, parse_size, release_memory, verify_steps
    from .modelfiles import check_checkpoint_dir
    from .options import check_int
    from .verify import reference_run
    from .verify import verify as run_verify

    try:
        check_int("--max-new-tokens", max_new_tokens, 1)  # before the bundle's checksums or any model
        check_checkpoint_dir(reference, "verify --reference")
        opened = open_bundle(bundle)
        backends = [backend] if backend else [b for b, f in api.BACKEND_FORMAT.items() if f in api.bundle_formats(opened)]
        checks = [(b, p, layout) for b in backends for p in api.bundle_precisions(opened, api.BACKEND_FORMAT.get(b, b))
                  if precision in (None, p)
                  for layout in (api.onnx_layouts(opened, p) if b == "onnxruntime" else [None])]
        if not checks:
            have = "; ".join(f"{b}: {', '.join(api.bundle_precisions(opened, api.BACKEND_FORMAT.get(b, b))) or 'none'}"
                             for b in backends)
            raise BackendUnavailable(f"nothing to verify: the bundle has no {backend or ''} {precision or ''} artifacts "
                                     f"(it has {have or 'no artifacts'}); --precision takes one of those")
        budget = parse_size(max_memory)
        check_budget(verify_steps(checkpoint_parameters(reference), opened, sorted({(b, p) for b, p, _ in checks}),
                                  loading_overhead(reference)), budget,
                     f"verifying {bundle.name}")
        with _progress(f"running the PyTorch reference ({reference.name})", as_json) as update:
            # The reference runs first and only its answers are kept: one model's weights in memory at a time.
            answers = reference_run(api.load(reference, backend="torch"), max_new_tokens)
            release_memory()
            reports = []
            for n, (b, p, layout) in enumerate(checks):
                update(f"checking {b} {p}{f' ({layout} decoder)' if layout else ''}", n, len(checks))
                # Each runtime is judged by its own limits (verify.thresholds_for): TensorRT's TF32/fp16 as fp16.
                reports.append(run_verify(api.pipeline_for_bundle(opened, backend=b, provider=provider, precision=p,
                                                                  **({"layout": layout} if layout else {})),
                                          answers, p, max_new_tokens=max_new_tokens))
                release_memory()
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
                                f"{report['backend'].get('providers', '')} "
                                f"{report['backend'].get('decoder_layout', '')}".rstrip())
            for c in report["cases"]:
                table.add_row(c["case"], f"{c['vision_max_abs']:.2e}", f"{c['vision_cosine_min']:.6f}",
                              f"{c['logits_max_abs']:.2e}", f"{c['logits_kl']:.2e}", f"{c['token_match']:.3f}")
            out.print(table)
            for c in report.get("skipped_cases", []):
                out.print(f"case {c['case']} left out ({c['reason']})")
            out.print(f"decoder alone (same input embeddings) logit max|d|: "
                      f"{report['summary']['decoder_logits_max_abs']:.2e}; batch-2 logits max|d|: "
                      f"{report['summary']['batch2_logits_max_abs']:.2e}")
            if "backend_tokenizer_match" in report["summary"]:
                out.print(f"llama.cpp's own tokenizer agrees with the HF tokenizer on "
                          f"{report['summary']['backend_tokenizer_match']:.0%} of the prompts (not gated)")
                if "backend_tokenizer_note" in report["summary"]:
                    out.print(escape(report["summary"]["backend_tokenizer_note"]))
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
    precision: str = _PRECISION,
    as_json: bool = typer.Option(False, "--json", help="Print the report (per task, per skill, mistakes) as JSON."),
):
    """Score a model on edgelmm's held-out multi-image questions (co-reference, comparison, counting
    across images, temporal change, anomaly, in-context) and print accuracy per skill next to chance.
    Meant for models trained on edgelmm.synthetic, first of all the shipped reference model."""
    from . import api
    from .evaluate import check_samples, evaluate, format_table
    from .models import reference_model

    try:
        check_samples(samples, "--samples")  # before the model loads
        pipe = api.load(model or reference_model(), backend=backend, provider=provider, threads=threads,
                        precision=precision)
        with _progress("answering held-out samples", as_json) as update:
            report = evaluate(pipe, samples,
                              on_progress=lambda done, total: update("answering held-out samples", done, total))
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps({**report.as_dict(), "backend": pipe.describe()}))
        return
    from rich.markdown import Markdown

    out = Console()
    out.print(Markdown(format_table(report)))
    d = pipe.describe()
    out.print(f"{report.samples} samples in {report.seconds:.1f} s on {d['backend']} {d.get('precision', '')} "
              f"({d.get('precision_reason', '')})")


@app.command(name="build-engines")
def build_engines(
    bundle: Path = typer.Argument(..., help="A bundle with fp32 ONNX graphs (from `edgelmm export`), on the device "
                                            "that will run it: engines only run on the GPU model and TensorRT "
                                            "version that built them."),
    precision: str = typer.Option("fp16", "--precision", help="Comma-separated engine precisions: fp16 (the usual "
                                                              "choice), fp32, int8-vision (INT8 vision tower from the "
                                                              "calibrated graph, calibrate with --activations s8 "
                                                              "first), int4 (INT4 weight-only decoder), "
                                                              "int8-vision+int4."),
    max_images: int = typer.Option(8, help="Most images one prompt may hold (sets the vision engine's profile)."),
    max_context: int = typer.Option(4096, help="Most positions (prompt + answer) the decoder engine holds; the KV "
                                               "cache is preallocated for this many."),
    workspace_mib: int = typer.Option(2048, help="TensorRT builder workspace. Lower it on small Jetsons."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file, reused across builds on this GPU "
                                                           "(default ~/.cache/edgelmm/tensorrt/)."),
    int4_block_size: int = typer.Option(32, help="int4: weights per scale."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the check of each engine set against the fp32 "
                                                              "ONNX graphs (run on ONNX Runtime's CPU provider)."),
    overwrite: bool = typer.Option(False, help="Rebuild engine precisions the bundle already has."),
    as_json: bool = typer.Option(False, "--json", help="Print what was built (engines, GPU, layer report) as JSON."),
):
    """Build TensorRT engines for this machine's GPU into a bundle, with a report of the layers that
    run in a wider type than their graph asks for, and check them against the bundle's fp32 graphs.
    Engines are strongly typed (the precision is the graph's: fp16 with fp32 norms and softmax, the
    calibrated INT8 vision graph, blocked INT4 weights), so one path serves TensorRT 10.3+ (JetPack
    6.1/6.2, 7.x) and 11 (desktop). The bundle is only changed when every engine built and passed."""
    from .export.tensorrt import EngineOptions
    from .export.tensorrt import build_engines as run_build

    opts = EngineOptions(precisions=[p.strip() for p in precision.split(",")], max_images=max_images,
                         max_context=max_context, workspace_mib=workspace_mib,
                         timing_cache=str(timing_cache) if timing_cache else None, int4_block_size=int4_block_size,
                         verify=not no_verify, overwrite=overwrite)
    result = _run_step("building engines", as_json, lambda update: run_build(bundle, opts, progress=update))
    if as_json:
        return
    from rich.table import Table

    t = result["target"]
    from .runtimes.tensorrt import describe_tensorrt

    table = Table(title=f"{describe_tensorrt(t['tensorrt'])}\nengines for {t['gpu']} (compute {t['compute_capability']})")
    for col in ("precision", "graph", "file", "build s", "layers", "fell back"):
        table.add_column(col)
    for art in result["engines"]:
        e = art["engine"]
        table.add_row(art["precision"], art["graph"], art["file"], str(e["build_seconds"]), str(e["layers"]["layers"]),
                      ", ".join(f"{x['layer']} ({x['runs_in']})" for x in e["layers"]["fell_back"][:4]) or "none")
    Console().print(table)
    for p, report in result["verify"].items():
        err.print(f"{p}: parity with the fp32 ONNX graphs {'passed' if report['passed'] else 'FAILED'}")


@app.command()
def bench(
    bundle: Path = typer.Argument(..., help="A bundle from `edgelmm export` (every backend and precision it has is "
                                            "measured)."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated subset: tensorrt, onnxruntime, llamacpp. "
                                                      "Default: every one the bundle has artifacts for and that runs "
                                                      "here."),
    threads: int = typer.Option(1, help="CPU threads per backend. 1 gives repeatable numbers on a busy machine."),
    repeats: int = typer.Option(5, help="Measured rounds per backend (after one warm-up); the median is reported."),
    new_tokens: int = typer.Option(32, help="Greedy decode steps per round (EOS ignored)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report (medians, spreads, roofline) as JSON."),
):
    """Measure every backend x precision of a bundle in one run: vision ms/image (1 and 4 images),
    time to first token of a 2-image prompt, prefill and decode tokens/s, peak memory and size, and
    decode against this machine's memory-bandwidth roofline. Each runs in its own process."""
    from .bench import TABLE_COLUMNS, BenchOptions, table_rows
    from .bench import bench as run_bench

    # Only a missing --backends means every backend: '' (an empty list) or 'onnxruntime,' is refused by validate().
    chosen = None if backends is None else [b.strip() for b in backends.split(",")] if backends.strip() else []
    opts = BenchOptions(backends=chosen, threads=threads, repeats=repeats, new_tokens=new_tokens)

    def step(update):
        opts.validate()  # before the bundle opens (bench() checks again, for Python callers)
        return run_bench(bundle, opts, progress=update)
    report = _run_step("benchmarking", as_json, step)
    if as_json:
        return
    m = report["machine"]
    out = Console()
    _print_rows("speed and memory, per backend and precision", TABLE_COLUMNS,
                [[escape(c) for c in row] for row in table_rows(report)], names=2)
    out.print(f"{m['cpu']} ({m['cores']} cores), {report['threads']} thread(s), median of {report['repeats']}; "
              f"memory bandwidth {report['read_bandwidth_gb_s']} GB/s read, {report['memory_bandwidth_gb_s']} GB/s "
              f"copy (one thread, streaming), last-level cache "
              f"{report['last_level_cache_mib']} MiB")
    for why in report["skipped"]:
        err.print(f"skipped {why}")


@app.command()
def doctor(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Also show which backend would run this "
                                                                       "bundle here, and why."),
    as_json: bool = typer.Option(False, "--json", help="Print the platform, the probes and the plan as JSON."),
):
    """What this machine is (Jetson with its JetPack, desktop NVIDIA GPU, or CPU) and which backends
    really run here: each is imported AND runs a tiny model (a listed ONNX Runtime provider may
    still fall back to the CPU). Says what to install for what is missing."""
    from .runtimes.select import probe_all

    platform, probes = probe_all()
    data: dict = {"platform": platform.as_dict(), "probes": [p.as_dict() for p in probes]}
    if bundle is not None:
        from .bundle import open_bundle
        from .runtimes.select import plan

        try:
            chain = plan(open_bundle(bundle))
        except EdgeLMMError as exc:
            _fail(exc, as_json)
        data["bundle"] = str(bundle)
        data["plan"] = [{"candidate": c.label(), "usable": c.usable, "reason": c.reason} for c in chain]
        data["chosen"] = next((c.label() for c in chain if c.usable), None)
    if as_json:
        print(json.dumps(data))
        return
    from rich.table import Table

    out = Console()
    p = platform
    where = {"jetson": f"Jetson: {p.jetson_model}, L4T {p.l4t or '?'}, JetPack {p.jetpack or '?'}",
             "nvidia-gpu": f"desktop NVIDIA GPU, driver {p.driver or '?'}", "cpu": "CPU only (no NVIDIA GPU)"}[p.kind]
    out.print(f"[bold]platform[/]: {where}; {p.machine}, {p.cpu}, {p.cpu_count} cores, "
              f"{p.memory_mib or '?'} MiB")
    for gpu in p.gpus:
        out.print(f"  GPU: {gpu}")
    for note in p.notes:
        out.print(f"  note: {note}")
    table = Table(title="backends (imported, then run on a tiny model)")
    for col in ("backend", "version", "runs here", "detail", "to fix"):
        table.add_column(col, overflow="fold")
    for probe in probes:
        table.add_row(probe.name.replace("ExecutionProvider", ""), probe.version or "-", "[green]yes[/]" if probe.runs else "[red]no[/]",
                      probe.detail, probe.hint or "")
    out.print(table)
    if bundle is not None:
        out.print(f"[bold]{bundle}[/] would run on: [green]{data['chosen'] or 'nothing'}[/]")
        for c in data["plan"]:
            out.print(f"  {'+' if c['usable'] else '-'} {c['candidate']}: {c['reason']}")


@app.command()
def info(
    model: Path = typer.Argument(..., help="A Hugging Face checkpoint directory."),
    prompt_style: Optional[str] = typer.Option(None, help="llava only: 'mantis' or 'plain'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Show the model family, prompt style and how many tokens images (and video frames, for models that read
    videos) of common sizes become."""
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
    table = Table("image (HxW)", "tokens", *(["tokens per pair of video frames"] if data["reads_videos"] else []))
    pairs = data.get("video_tokens_per_frame_pair") or [None] * len(data["image_tokens"])
    for row, pair in zip(data["image_tokens"], pairs):
        table.add_row(f"{row['height']}x{row['width']}", str(row["tokens"]), *([str(pair["tokens"])] if pair else []))
    out.print(table)


@app.command()
def watch(
    source: Optional[str] = typer.Argument(None, help="What to watch: a camera index (0 = /dev/video0), a video "
                                                      "file, an rtsp:// or http:// URL, or a GStreamer pipeline (it "
                                                      "contains '!'; e.g. 'nvarguscamerasrc ! nvvidconv ! "
                                                      "video/x-raw,format=BGRx ! videoconvert ! appsink' for a Jetson "
                                                      "CSI camera). Several cameras: --config instead."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Watch several cameras in one process: a YAML "
                                                                      "file listing them (name, source, references, "
                                                                      "own gate settings; see the README). One "
                                                                      "verifier serves them all, in turn."),
    view: Optional[str] = typer.Option(None, help="Serve a live page at HOST:PORT, or :PORT for this machine "
                                                  "only (e.g. :8080; 0.0.0.0:8080 for the network): each camera's "
                                                  "latest frame with the gate's heat-map, its score against the "
                                                  "threshold, and the events with the verifier's answers. "
                                                  "Read-only, no internet needed."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="The bundle (from `edgelmm export`) that embeds the "
                                                            "frames and answers the verifier's question."),
    events: Optional[Path] = typer.Option(None, help="Append events as JSON lines to this file (default: stdout). "
                                                     "The last line is a summary."),
    out: Optional[Path] = typer.Option(None, help="Save the frames each event was about (normal + latest) here."),
    reference: List[Path] = typer.Option([], "--reference", "-r",
                                         help="An image of the normal scene, remembered for good; repeatable."),
    every: int = typer.Option(1, help="Gate every Nth frame (1 = every frame)."),
    warmup: int = typer.Option(90, help="Frames learned as normal before scoring starts (0 with --reference); "
                                        "make it cover a whole cycle of the scene's normal motion."),
    trigger: int = typer.Option(3, help="Consecutive unusual frames that make an event (hysteresis)."),
    clear: int = typer.Option(15, help="Consecutive normal frames that end an event, so the next one can fire."),
    margin: float = typer.Option(3.0, help="Threshold = margin x the 99th percentile of normal frames' scores."),
    min_threshold: float = typer.Option(0.01, help="The threshold never goes below this (cosine distance)."),
    threshold: Optional[float] = typer.Option(None, help="A fixed threshold instead of the adaptive one."),
    latest: int = typer.Option(3, help="Latest frames shown to the verifier after the normal frame."),
    prompt: Optional[str] = typer.Option(None, help="The verifier's question; {last} is the last image's number, "
                                                    "{latest} the number of latest frames ({{ and }} for literal "
                                                    "braces). Default: 'Image 1 shows the normal scene; images "
                                                    "2-{last} are the latest frames. Is anything abnormal? ...'"),
    no_verify: bool = typer.Option(False, "--no-verify", help="Report the gate's events without asking the LMM."),
    max_new_tokens: int = typer.Option(24, help="Length limit of the verifier's answer."),
    max_frames: Optional[int] = typer.Option(None, help="Stop after processing this many frames."),
    duration: Optional[float] = typer.Option(None, help="Stop after this many seconds."),
    realtime: bool = typer.Option(False, help="Replay a video file at its own frame rate, dropping frames when "
                                              "behind, as a camera would (files are otherwise read losslessly)."),
    queue_size: int = typer.Option(8, help="Frames buffered between capture and the gate."),
    reconnect_attempts: int = typer.Option(5, help="Live sources: reopen this many times when frames stop coming."),
    reconnect_backoff: float = typer.Option(0.5, help="Seconds before the first reconnect; doubles each time."),
    backend: str = typer.Option("auto", help="Runtime: auto, onnxruntime or llamacpp."),
    provider: str = typer.Option("auto", help="ONNX Runtime provider: auto, tensorrt, cuda or cpu."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    precision: str = _PRECISION,
    mqtt: Optional[str] = typer.Option(None, help="Also publish events to an MQTT broker: mqtt://host[:port]/prefix "
                                                  "(mqtts:// for TLS). Events go to <prefix>/<camera>/events at QoS 1, "
                                                  "a retained <prefix>/<camera>/status says online/offline (offline "
                                                  "also when the process dies), the summary to .../summary. "
                                                  "Username and password from EDGELMM_MQTT_USERNAME / _PASSWORD."),
    camera: str = typer.Option("camera", help="This camera's name in MQTT topics and the view (--config names "
                                              "each camera)."),
    mqtt_buffer: int = typer.Option(1000, help="Events kept while the broker is away (resent when it is back); "
                                               "beyond that each is dropped and counted in the summary."),
    mqtt_thumbnails: bool = typer.Option(False, help="Put a small JPEG of the latest frame in each MQTT event."),
    webhook: Optional[str] = typer.Option(None, help="Also POST each event and the summary as JSON to this "
                                                     "http(s) URL (retried with backoff)."),
    quiet: bool = typer.Option(False, help="No live status line on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as one JSON object on stdout (with "
                                                        "--events; on stdout it is already the last event line) "
                                                        "and errors as JSON."),
):
    """Watch a camera or video for anomalies. Each frame is embedded once by the bundle's vision graph
    and compared with a memory of the normal scene (learned during a warm-up); when frames stay
    unusual, the LMM is asked, in the background, whether the latest frames show anything abnormal
    next to a normal one. Events are JSON lines; Ctrl-C or SIGTERM stops cleanly (a second Ctrl-C
    also cancels an answer in progress). Exit status 3 means a source was lost."""
    import signal

    from rich.live import Live
    from rich.text import Text

    from .apps.anomaly import Camera, CaptureConfig, GateConfig, WatchConfig, load_for_watch, summary_line
    from .apps.runner import WatchOutputs, WatchRun

    try:
        config = WatchConfig(
            gate=GateConfig(warmup_frames=warmup, trigger_frames=trigger, clear_frames=clear, margin=margin,
                            min_threshold=min_threshold, threshold=threshold),
            capture=CaptureConfig(queue_size=queue_size, realtime=realtime, reconnect_attempts=reconnect_attempts,
                                  reconnect_backoff_s=reconnect_backoff),
            every=every, latest_frames=latest, verify=not no_verify, max_new_tokens=max_new_tokens,
            max_frames=max_frames, duration_s=duration, out_dir=out)
        if prompt is not None:
            config.prompt = prompt
        config.validate()      # the prompt's placeholders (with --no-verify too) and the --out folder included
        if (source is None) == (config_file is None):
            raise OptionError("give what to watch: a SOURCE, or --config cameras.yaml for several cameras (not both)")
        if config_file is not None:
            from .apps.cameras import load_cameras

            if reference:
                raise OptionError("--reference: with --config each camera lists its own 'references'")
            if camera != "camera":
                raise OptionError("--camera: with --config each camera has its 'name'")
            cameras = load_cameras(config_file, config)
        else:
            cameras = [Camera(camera, source, [str(r) for r in reference])]
        outputs = WatchOutputs(events=events if events is not None else sys.stdout, mqtt=mqtt, mqtt_buffer=mqtt_buffer,
                               mqtt_thumbnails=mqtt_thumbnails, webhook=webhook, view=view)
        # every option checked and the view listening before the bundle loads and a source opens
        run = WatchRun(cameras, config, outputs, several=config_file is not None)
    except EdgeLMMError as exc:   # OptionError for an option out of range or a path, PromptError for the prompt
        _fail(exc, as_json)
    live = Live(Text("starting"), console=err, transient=True, auto_refresh=False)
    if quiet or as_json:   # --json: stdout and stderr carry data and errors only, as for every command
        status = None
    elif err.is_terminal:
        def status(message):
            live.update(Text(message), refresh=True)
    else:  # a log: the live line would print nothing, and opening a camera can take seconds per attempt
        from .progress import line_progress

        status = line_progress(err)
    lines = {}

    def show(name, stats):
        lines[name] = summary_line(stats) if len(cameras) == 1 else f"{name:>12}  {summary_line(stats)}"
        live.update(Text("\n".join(lines.values())), refresh=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: run.stop(f"signal {signal.Signals(signum).name}"))
    if run.view is not None and not as_json:
        err.print(f"live view: {run.view.url}")
    try:
        pipe = load_for_watch(bundle, backend=backend, provider=provider, threads=threads, precision=precision)
        with live if not quiet else nullcontext():
            reports = run.run(pipe, on_summary=None if quiet else show, on_status=status)
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    finally:
        run.close()
    summaries = [r.as_dict() for r in reports.values()]
    if as_json:
        if events is not None:
            print(json.dumps(summaries[0] if config_file is None else {"cameras": summaries}))
    else:
        for name, report in reports.items():
            prefix = f"{name}: " if config_file is not None else ""
            err.print(f"{prefix}[bold]stopped[/]: {escape(report.stop_reason)}\n{summary_line(report.as_dict())}"
                      if report.stats else f"{prefix}[bold]stopped[/]: {escape(report.stop_reason)}")
    if any(r.source_lost for r in reports.values()):
        raise typer.Exit(3)


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="The bundle (from `edgelmm export`) to answer with."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. The default takes requests from this machine "
                                               "only; 0.0.0.0 takes them from the network (set --api-key)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port; the ready line says which)."),
    backend: str = typer.Option("auto", help="Runtime: auto, onnxruntime, llamacpp or tensorrt."),
    provider: str = typer.Option("auto", help="ONNX Runtime provider: auto, tensorrt, cuda or cpu."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    precision: str = _PRECISION,
    max_context: Optional[int] = typer.Option(None, help="llamacpp and tensorrt: most positions the KV cache holds."),
    max_batch: int = typer.Option(4, help="Requests decoded together (one batch, a decode step for all at once)."),
    max_queue: int = typer.Option(64, help="Requests that may wait for a batch; more are answered 429 (busy)."),
    api_key: Optional[str] = typer.Option(None, envvar="EDGELMM_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (or set EDGELMM_API_KEY)."),
    model_name: Optional[str] = typer.Option(None, help="The model id /v1/models lists (default: the bundle's "
                                                        "folder name)."),
    max_images: int = typer.Option(16, help="Most images in one request."),
    max_image_mb: float = typer.Option(20.0, help="Most bytes of one image (its file, not its pixels), in MB."),
    max_image_pixels: int = typer.Option(4096 * 4096, help="Most pixels of one image (width x height); larger ones "
                                                           "are refused before they are decoded."),
    max_videos: int = typer.Option(1, help="Most video_url parts in one request (models that read videos: a clip "
                                           "file, decoded with OpenCV)."),
    max_video_mb: float = typer.Option(64.0, help="Most bytes of one video file, in MB."),
    max_video_frames: int = typer.Option(32, help="Most frames taken from one video, after sampling at --video-fps; "
                                                  "a longer clip is refused (413)."),
    video_fps: float = typer.Option(2.0, help="The rate videos are sampled at, in frames a second."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Most tokens one answer may ask for (max_tokens)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Most prompt tokens, image tokens included "
                                                               "(default: the model's context window)."),
    allow_files: Optional[Path] = typer.Option(None, help="Take file:// image URLs under this folder (and nowhere "
                                                          "else). Off by default."),
    allow_remote_images: bool = typer.Option(False, help="Fetch http(s):// image URLs. Off by default: a server "
                                                         "that fetches what a client names can be made to reach "
                                                         "hosts the client cannot."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line when ready (url, backend, precision) "
                                                        "and errors as JSON."),
):
    """Serve a bundle over HTTP with OpenAI's chat-completions API: POST /v1/chat/completions (text
    and image_url parts, several images per request, streaming; video_url parts for models that read
    videos), GET /v1/models, GET /health and
    GET /metrics (Prometheus). Concurrent requests are decoded together in batches. Ctrl-C or
    SIGTERM finishes the requests in flight, then stops."""
    from . import api
    from .options import check_int
    from .serve import Limits, Server, ServerOptions

    try:
        check_int("port", port, 0, 65535)
        limits = Limits(max_image_bytes=int(max_image_mb * 2**20), max_image_pixels=max_image_pixels,
                        max_images=max_images, max_output_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                        allow_files=str(allow_files) if allow_files else None, allow_remote=allow_remote_images,
                        max_videos=max_videos, max_video_bytes=int(max_video_mb * 2**20),
                        max_video_frames=max_video_frames, video_fps=video_fps)
        if allow_files is not None and not allow_files.is_dir():
            raise OptionError(f"--allow-files: {allow_files} is not a folder")
        options = ServerOptions(max_batch=max_batch, max_queue=max_queue, api_key=api_key, model_name=model_name,
                                limits=limits).validate()
        pipe = api.load(bundle, backend=backend, provider=provider, threads=threads, precision=precision,
                        max_context=max_context, max_batch=max_batch)
        server = Server(pipe, options, host=host, port=port)
    except EdgeLMMError as exc:
        _fail(exc, as_json)
    info = pipe.describe()
    ready = {"url": server.url, "model": pipe.files.root.name if model_name is None else model_name,
             "backend": info.get("backend"), "precision": info.get("precision"), "max_batch": max_batch}
    if as_json:
        print(json.dumps(ready), flush=True)
    else:
        err.print(f"[bold]serving[/] {escape(ready['model'])} ({ready['backend']}, {ready['precision']}) at "
                  f"{ready['url']}" + ("" if api_key or host in ("127.0.0.1", "::1", "localhost") else
                                       "  [yellow]no --api-key: anyone who reaches this port can use it[/]"))
    server.run()


@app.command(name="demo-video")
def demo_video(
    out: Path = typer.Argument(..., help="The video file to write (Motion-JPEG AVI)."),
    anomaly: str = typer.Option("appear", help="appear (an object appears), fall (an object falls in), "
                                               "scene-change (the light changes) or none."),
    at: int = typer.Option(150, help="The first frame that shows the anomaly (watch learns the first 90 as normal)."),
    frames: int = typer.Option(210, help="Length of the video in frames."),
    seed: int = typer.Option(0, help="Which scene (every seed draws another)."),
    fps: float = typer.Option(30.0, help="Frame rate written into the file."),
    scale: int = typer.Option(2, help="Frame size is 64 x scale pixels square."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Write a test video for `edgelmm watch`: a normal scene of the reference model's world, with
    sway, flicker and sensor noise, then an anomaly at a known frame."""
    from .synthetic_video import VideoSpec, write_video

    try:
        meta = write_video(out, VideoSpec(seed=seed, frames=frames, anomaly=anomaly, anomaly_frame=at, fps=fps,
                                          scale=scale))
    except (EdgeLMMError, OSError) as exc:  # OptionError for a setting; OSError: the file cannot be written
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(meta))
    else:
        Console().print(meta)


@app.command(name="demo-images")
def demo_images(
    out: Path = typer.Argument(..., help="The folder to write the images into (created if missing)."),
    round_: int = typer.Option(0, "--round", help="Which held-out round: each writes another question of each kind."),
    as_json: bool = typer.Option(False, "--json", help="Print the questions (prompt, messages, images, expected "
                                                       "answer) as JSON."),
):
    """Write one held-out question of each of the nine kinds the shipped reference model answers
    (colour or shape in image k, which image has more, same or not, counting across images, what
    changed, which frame is abnormal, the anomaly question, in-context examples), with the
    `edgelmm run` line that asks it and the expected answer. The model knows only these forms,
    on 64x64 pictures of coloured shapes; other prompts or photos get meaningless answers."""
    from .synthetic import write_samples

    try:
        samples = write_samples(out, round_=round_)
    except (EdgeLMMError, OSError) as exc:  # OptionError for --round; OSError: the folder cannot be written
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(samples))
        return
    import shlex

    out_console = Console()
    for s in samples:
        out_console.print(f"[bold]{s['task']}[/] ({s['skill']}), expected answer: [green]{escape(s['answer'])}[/]")
        if s["turns"] == 1:
            out_console.print("  edgelmm run MODEL -p " + shlex.quote(s["prompt"]) + " "
                              + " ".join(f"-i {shlex.quote(p)}" for p in s["images"]), markup=False, highlight=False,
                              soft_wrap=True)
        else:
            out_console.print(f"  {s['turns']} turns (solved examples, then the question): in Python, "
                              "pipe.generate(messages, images) with the messages of --json", markup=False)
    out_console.print("MODEL: the reference model (edgelmm/models/edgelmm-ref-siglip-llama) or a bundle of it, "
                      "e.g. demo-out/bundle from `make demo`.", markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
