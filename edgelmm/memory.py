"""Memory as a budget the tool knows before it starts.

Devices share 8-64 GB between CPU and GPU, and a 1-3B model's fp32 weights alone take 5-15 GB, so
a step that cannot fit must be refused before minutes of work, naming the step, what it needs and
what would fit. The estimates below are what each step holds at its peak (measured with
`/usr/bin/time -v` by benchmarks/scale.py), from the checkpoint's parameter count read from the
safetensors headers: no weights are loaded to know them.
"""

from __future__ import annotations

import gc
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CheckpointError, MemoryBudgetError, OptionError
from .hostmem import GiB, available_bytes, gib  # noqa: F401  (GiB, gib: part of this module's API)
from .bundle import select_artifacts
from .manifest import FUSED_DECODER

# What a process holds before any model: with torch and transformers imported (export, verify,
# the torch backend; measured 0.4 GB), and the device side with onnxruntime alone (55 MB).
PROCESS_BASE = int(0.5 * GiB)
RUNTIME_BASE = int(0.15 * GiB)
# The PyTorch exporter's working memory on top of the model: its traced program and the graph being
# written are one graph's activations and metadata, not a copy of the weights (Mantis-1B: 6.62 GB
# loaded, 6.80 GB at the end of the ONNX graphs: 0.03x; estimated at 0.05x).
EXPORT_WORKING = 0.05
# A runtime's sessions hold about their weights (ONNX Runtime maps large graphs' external data and
# runs from it, runtimes.onnxruntime.PREPACK_LIMIT; llama.cpp maps its GGUF) plus activations.
ORT_SESSION = 1.15  # Mantis-1B fp32 run: 7.19 GB measured for 7.09 GB on disk (8.13 before chunked prefill)
SAFETENSORS_HEADER_MAX = 100 * 1024 * 1024


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2,
          "g": GiB, "gb": 1000 ** 3, "gib": GiB, "t": 1024 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}


def parse_size(text: str | int | None, option: str = "--max-memory") -> int | None:
    """'12G', '12GiB', '12 GB', '800M', '123456' (bytes) -> bytes; None and 'auto' -> None (the default)."""
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text <= 0:
            raise OptionError(f"{option} must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if str(text).strip().lower() == "auto":
        return None
    if not m or m.group(2).lower() not in _UNITS:
        raise OptionError(f"{option} must be a size such as 12G, 800M or 16GiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 0 < value < 2 ** 60:
        raise OptionError(f"{option} must be positive and below 1 EiB, got {text!r}")
    return int(value)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise, and RSS with it),
    so the next step's weights take the place of the last one's."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the allocator keeps what it keeps


def _safetensors_headers(model_dir: str | Path) -> Iterator[tuple[Path, dict]]:
    """(file, header) of each *.safetensors file in a checkpoint, read without its weights."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > SAFETENSORS_HEADER_MAX:
                    raise ValueError(f"header of {length} bytes")
                header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        yield path, {k: v for k, v in header.items() if k != "__metadata__"}


def checkpoint_parameters(model_dir: str | Path) -> int:
    """Number of weights in a checkpoint's *.safetensors files, from their headers only."""
    total = 0
    for path, header in _safetensors_headers(model_dir):
        try:
            for entry in header.values():
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += count
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return total


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def checkpoint_float_dtype(model_dir: str | Path) -> str | None:
    """The safetensors dtype ("BF16", "F16", "F32") every floating tensor of the checkpoint is stored
    in, or None when they are mixed (or there are none)."""
    kinds = {entry.get("dtype") for _path, header in _safetensors_headers(model_dir) for entry in header.values()
             if isinstance(entry, dict) and entry.get("dtype") in FLOAT_DTYPES}
    return kinds.pop() if len(kinds) == 1 else None


def loading_overhead(model_dir: str | Path) -> int:
    """What loading holds beside the fp32 model at its peak. A checkpoint stored in one 16-bit type
    loads mapped and is upcast tensor by tensor, each tensor's file pages let go once converted
    (runtimes.torch.load_hf_model): about nothing. Otherwise transformers converts while the whole
    file stays mapped: its size (a bf16 Mantis-1B: 9.7 GB measured against 6.2 + 3.1 + 0.5)."""
    if checkpoint_float_dtype(model_dir) in ("BF16", "F16"):
        return 0
    return checkpoint_bytes(model_dir)


@dataclass
class Step:
    name: str
    need: int        # bytes at the step's peak
    hint: str = ""   # what would fit instead


def check_budget(steps: Iterable[Step], budget: int | None, what: str) -> int:
    """Raise MemoryBudgetError naming the first step over `budget` (None: what is free now); return
    the budget used. A budget of 0 means it could not be read: nothing is refused."""
    explicit = budget is not None
    budget = budget if explicit else available_bytes()
    if not budget:
        return 0
    for step in steps:
        if step.need > budget:
            source = "--max-memory" if explicit else "free memory on this machine"
            raise MemoryBudgetError(f"{what}: {step.name} needs ~{gib(step.need)} but the budget is {gib(budget)} "
                                    f"({source}). {step.hint}".rstrip())
    return budget


def checkpoint_bytes(model_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def export_steps(params: int, *, formats: Iterable[str], precisions: Iterable[str], verify: bool,
                 load_overhead: int = 0) -> list[Step]:
    """The peaks of `edgelmm export` for a checkpoint of `params` weights, whose loading holds
    `load_overhead` bytes beside the model (loading_overhead). The fp32 PyTorch model is the floor:
    export, GGUF writing and the reference's verify pass all run it, one at a time."""
    formats, precisions = set(formats), set(precisions)
    fp32 = params * 4
    model = PROCESS_BASE + fp32
    steps = [Step("loading the fp32 PyTorch model", model + load_overhead,
                  "Every export starts from the fp32 model; free memory or export on a larger machine "
                  "(the bundle it writes runs in far less: see `edgelmm info` there).")]
    if "onnx" in formats:
        steps.append(Step("the ONNX export", int(model + EXPORT_WORKING * fp32),
                          "Export on a larger machine, or --format gguf alone."))
        if "fp16" in precisions:
            steps.append(Step("the fp16 ONNX export", PROCESS_BASE + int((2 + EXPORT_WORKING * 2) * params),
                              "Leave fp16 out of --precision."))
    if verify and "onnx" in formats:
        # The graphs hold a tied embedding twice (embed and lm_head) and verify prefills three images.
        steps.append(Step("verify on ONNX Runtime (fp32)", PROCESS_BASE + int(1.3 * fp32),
                          "Pass --no-verify and run `edgelmm verify` later on a larger machine."))
    return steps


def session_step(label: str, weight_bytes: int, extra: int = 0, hint: str = "", base: int = RUNTIME_BASE) -> Step:
    """Loading runtime artifacts of `weight_bytes` on disk (plus `extra`: a KV cache, activations)."""
    return Step(label, base + int(ORT_SESSION * weight_bytes) + extra, hint)


def verify_steps(params: int, bundle, checks: Iterable[tuple[str, str]], load_overhead: int = 0) -> list[Step]:
    """`edgelmm verify`: the fp32 reference first, then each candidate runtime alone."""
    steps = [Step("the fp32 PyTorch reference", PROCESS_BASE + params * 4 + load_overhead,
                  "Verify on a larger machine; the export's own verify report is in the manifest.")]
    for backend, precision in checks:
        fmt = {"onnxruntime": "onnx", "llamacpp": "gguf"}.get(backend, backend)
        steps.append(session_step(f"the {precision} {backend} artifact set",
                                  artifact_set_bytes(bundle.manifest, fmt, precision), base=PROCESS_BASE))
    return steps


# The quantizers' working copies, as multiples of the fp32 graph they read (onnx holds the graph
# with its weights; the INT4 writer adds the packed blocks, INT8 calibration runs an augmented copy
# of the vision graph in its own session). Checked against benchmarks/scale.py's calibrate runs.
INT4_QUANTIZER = 1.4
INT8_VISION_QUANTIZER = 2.5
INT8_DECODER_QUANTIZER = 1.5


def calibrate_steps(manifest: dict, precisions: Iterable[str], graphs: dict[str, dict[str, str]]) -> list[Step]:
    """`edgelmm calibrate`: the fp32 sessions that make the held-out answers, then each quantizer
    alone on its graph, then each new precision's sessions alone. `graphs` maps a precision to the
    variant of each graph it uses (calib.QUANTIZED_PRECISIONS)."""
    def graph_bytes(graph: str) -> int:
        return sum(f["size"] for art in select_artifacts(manifest, graph=graph, format="onnx", precision="fp32")
                   for f in art["files"])

    fp32 = artifact_set_bytes(manifest, "onnx", "fp32")
    steps = [session_step("the fp32 ONNX Runtime reference", fp32, hint="Calibrate on a larger machine (or on the "
                          "workstation that exported the bundle) and copy the bundle back.")]
    variants = {(g, v) for p in precisions for g, v in graphs[p].items() if v != "fp32"}
    factors = {("vision", "int8"): INT8_VISION_QUANTIZER, ("decoder", "int4"): INT4_QUANTIZER,
               ("decoder", "int8"): INT8_DECODER_QUANTIZER}
    for graph, variant in sorted(variants):
        steps.append(Step(f"the {variant.upper()} {graph} quantizer",
                          RUNTIME_BASE + int(factors[graph, variant] * graph_bytes(graph)),
                          f"Leave {variant} out of --precision, or calibrate on a larger machine."))
    for p in precisions:
        # a quantized set is smaller than fp32 on disk; its sessions are estimated from fp32 sizes of
        # the graphs it keeps and the quantized graph at a quarter (INT8) or a sixth (INT4) of fp32
        shrink = {"fp32": 1.0, "int8": 0.25, "int4": 0.17}
        size = sum(int(shrink[v] * graph_bytes(g)) for g, v in graphs[p].items())
        steps.append(session_step(f"measuring {p} against fp32", size,
                                  hint=f"Leave {p} out of --precision."))
    return steps


def kv_cache_bytes(text: dict, positions: int, bytes_per_value: int = 2) -> int:
    """A KV cache of `positions` for the manifest's text dims (llama.cpp's is f16: 2 bytes)."""
    return 2 * text["num_layers"] * text["num_kv_heads"] * text["head_dim"] * positions * bytes_per_value


def artifact_set_bytes(manifest: dict, fmt: str, precision: str) -> int:
    """Bytes on disk of one artifact set as a runtime loads it (an mmproj shared by several GGUF
    types counted once; of a plain and a fused ONNX decoder, one: a session loads one layout)."""
    arts = select_artifacts(manifest, format=fmt, precision=precision)
    if {"decoder", FUSED_DECODER} <= {a["graph"] for a in arts}:
        arts = [a for a in arts if a["graph"] != FUSED_DECODER]
    files = {f["file"]: f["size"] for art in arts for f in art["files"]}
    return sum(files.values())


def check_load_budget(bundle, fmt: str, precision: str, budget: int | None, extra: int = 0) -> None:
    """Refuse an artifact set that cannot fit in `budget` (bytes; default what is free), naming the
    bundle's smaller sets that would. `extra`: memory the backend adds (a llama.cpp KV cache)."""
    def need(f: str, p: str, more: int = 0) -> int:
        return session_step("", artifact_set_bytes(bundle.manifest, f, p), more).need

    wanted = need(fmt, precision, extra)
    smaller = [f"{f} {p} (~{gib(need(f, p))})" for f in ("onnx", "gguf") for p in bundle.precisions(f)
               if (f, p) != (fmt, precision) and need(f, p) < wanted]
    hint = (f"Smaller sets in this bundle: {', '.join(smaller)}." if smaller else
            "Calibrate a smaller precision (edgelmm calibrate --precision int4) or export a q4_k_m GGUF.")
    check_budget([Step(f"the {precision} {fmt} artifact set", wanted, hint)], budget, f"loading {bundle.root.name}")
