"""`edgelmm bench`: every backend x precision a bundle has, measured the same way in one run, against
this machine's memory bandwidth (the decode roofline).

Each (backend, precision) runs in a subprocess of its own, so its peak RSS is its own and one
backend's allocator or thread pool does not slow the next. Inside it, the timings are taken at the
backend contract, identically for every backend:
  - vision ms/image, for 1 image and for 4 images at once;
  - time to first token of a 2-image prompt (`prompt_images`): preprocessing, vision, merge, prefill;
  - prefill tokens/s (that prompt in one decoder call) and decode tokens/s (fixed greedy steps,
    EOS ignored, so every backend decodes the same number of tokens);
  - peak RSS, and GPU memory where the backend runs on a GPU.
Each is the median of `repeats` rounds after a warm-up round, with the spread (max-min)/median.

The roofline: a decode step reads every decoder weight once (the embedding table only one row) and
the whole KV cache, so tokens/s <= bandwidth / (weight bytes + KV bytes). Two bandwidths, both
measured here on one thread:
  - read (`read_roofline_fraction`): a streaming read, the access a decode step makes. The bound
    a single-thread decode can reach.
  - copy (`roofline_fraction`, the yardstick of earlier results): a streaming copy, counting the
    bytes read and written. One core copies faster than it reads: a large copy's stores are
    non-temporal and do not wait in the core's line-fill buffers as its reads do. On a Xeon here:
    read 16-18 GB/s, copy 23-26 GB/s, and the fastest single-thread GEMVs (MLAS, OpenBLAS) over
    128 MiB of fp32 weights 13.8-16.6 GB/s, so no decode gets much past two thirds of the copy
    roofline there (benchmarks/bandwidth.py measures all of these).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .runtimes.registry import BACKENDS as REGISTRY
from .bundle import open_bundle
from .errors import BackendUnavailable, EdgeLMMError, OptionError
from .manifest import FUSED_DECODER

BACKEND_ORDER = tuple(REGISTRY)    # the registry's order: TensorRT, ONNX Runtime, llama.cpp


def prompt_for(images: int) -> str:
    """The timed prompt: `images` interleaved images and a question about them."""
    return " ".join(f"Image {i + 1} <image>." for i in range(images)) + " Which one is abnormal, and what changed?"


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache (Linux sysfs). A model whose decode bytes fit in it is not bound by DRAM
    bandwidth, so its roofline fraction can pass 100%."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def memory_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """GB/s of a streaming copy (read + write) of `mib` MiB on one thread: the best of `repeats`."""
    src = np.ones(mib << 18, np.float32)  # mib MiB
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def read_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """GB/s of a streaming read of `mib` MiB on one thread: the best of `repeats`."""
    return _read_gb_s(mib << 20, repeats)


def _read_gb_s(nbytes: int, repeats: int = 10) -> float:
    """An OR-reduction of 64-bit words: numpy runs it on one thread (BLAS's dot may not) and it is not
    compute bound (70 GB/s from the L2 cache of the machine above, four times its DRAM rate)."""
    words = np.ones(max(1, nbytes // 8), np.uint64)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        np.bitwise_or.reduce(words)
        best = max(best, words.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def reads_from_cache(nbytes: int, llc: int | None, dram_read: float) -> bool:
    """Whether a decode step's `nbytes` come from a cache rather than DRAM: they fit the last-level
    cache sysfs reports, and reading them again and again is clearly faster than `dram_read` (the
    bench's streaming read, 256 MiB by default: past the cache a core gets on the machines here,
    though not past every LLC sysfs reports). Size alone misleads on virtual machines, where sysfs
    reports the host's whole cache: 480 MiB on a 2-core VM here, on which 64 MiB already read at
    DRAM speed."""
    if not llc or nbytes >= llc:
        return False
    return _read_gb_s(max(nbytes, 1 << 20)) > 1.25 * dram_read


@dataclass
class BenchOptions:
    backends: Sequence[str] | None = None   # default: every backend the bundle has artifacts for and runs here
    threads: int = 1
    repeats: int = 5
    new_tokens: int = 32
    image_size: tuple[int, int] = (480, 640)  # a camera frame
    prompt_images: int = 2                  # images in the prompt timed for TTFT, prefill and decode
    bandwidth_mib: int = 256
    # Decode step time after this many positions of context (decoder only, random embeddings): a
    # step whose cache is copied or re-laid out every token grows with it; an in-place one barely.
    context_probe: Sequence[int] = (100, 2000)

    def validate(self) -> None:
        """Before the bundle opens: an OptionError naming the option (--backends, --threads, --repeats,
        --new-tokens); an unknown backend name is a BackendUnavailable, as everywhere a backend is named."""
        from .options import check_int, check_threads

        if self.backends is not None:
            if isinstance(self.backends, (str, bytes)) or not isinstance(self.backends, Sequence):
                raise OptionError(f"--backends must be a list of backend names, got {self.backends!r}")
            if not self.backends:
                raise OptionError(f"--backends is empty; give one or more of {', '.join(BACKEND_ORDER)} (or leave "
                                  "it out for every backend the bundle has)")
            for b in self.backends:
                if not isinstance(b, str) or not b.strip():
                    raise OptionError(f"--backends has an empty or non-text entry {b!r} in {list(self.backends)!r}; "
                                      f"choose from {', '.join(BACKEND_ORDER)}")
            unknown = [b for b in self.backends if b not in BACKEND_ORDER]
            if unknown:
                raise BackendUnavailable(f"unknown backend(s) {unknown} for bench (--backends); choose from "
                                         f"{', '.join(BACKEND_ORDER)}")
        check_threads(self.threads, "--threads")
        if self.threads is None:
            raise OptionError("--threads must be an integer, got None")
        for name, value in (("--repeats", self.repeats), ("--new-tokens", self.new_tokens)):
            if check_int(name, value) < 1:
                raise OptionError(f"bench: {name} must be at least 1, got {value}")
        check_int("prompt_images", self.prompt_images, 1)
        check_int("bandwidth_mib", self.bandwidth_mib, 1)
        if not (isinstance(self.image_size, Sequence) and len(self.image_size) == 2):
            raise OptionError(f"image_size must be (height, width), got {self.image_size!r}")
        for side in self.image_size:
            check_int("image_size", side, 1, 8192)
        for n in self.context_probe:
            check_int("context_probe", n, 1)


def _stats(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    return {"median": round(med, 4), "spread": round((max(values) - min(values)) / med, 3) if med else 0.0}


def bench_images(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    h, w = size
    # smooth random scenes (noise alone is not an image a camera gives)
    base = rng.integers(0, 255, (n, h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    return [np.kron(b, np.ones((16, 16, 1), np.uint8))[:h, :w] for b in base]


def decode_weight_bytes(bundle, backend: str, precision: str, layout: str | None = None) -> int:
    """Bytes of weights one decode step reads: the decoder (lm_head included), not the embedding
    table (one row of it per token), unless the output layer reuses it (tied embeddings)."""
    arts = bundle.artifacts(precision=precision)
    if backend == "llamacpp":
        import gguf

        llm = next(a for a in arts if a["format"] == "gguf" and a["graph"] == "llm")
        reader = gguf.GGUFReader(str(bundle.path(llm)))
        sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
        tied = "output.weight" not in sizes
        return sum(n for name, n in sizes.items() if name != "token_embd.weight" or tied)
    graph = FUSED_DECODER if layout == "fused" else "decoder"
    dec = next(a for a in arts if a["format"] == REGISTRY[backend].format and a["graph"] == graph)
    return sum(e["size"] for e in dec["files"])


def artifact_bytes(bundle, backend: str, precision: str) -> int:
    from .memory import artifact_set_bytes

    return artifact_set_bytes(bundle.manifest, REGISTRY[backend].format, precision)


def configs(bundle, options: BenchOptions) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(backend, precision, ONNX decoder layout or None) to run, and why others were left out."""
    from .loading import onnx_layouts
    from .runtimes.select import probe

    formats = bundle.formats()
    wanted = list(options.backends or BACKEND_ORDER)
    unknown = [b for b in wanted if b not in BACKEND_ORDER]
    if unknown:
        raise BackendUnavailable(f"unknown backend(s) {unknown} for bench; choose from {', '.join(BACKEND_ORDER)}")
    out, skipped = [], []
    for backend in wanted:
        fmt = REGISTRY[backend].format
        if fmt not in formats:
            if options.backends:
                skipped.append(f"{backend}: the bundle has no {fmt} artifacts")
            continue
        if backend != "onnxruntime" and not probe(backend).runs:  # ONNX Runtime always has its CPU provider
            skipped.append(f"{backend}: {probe(backend).detail}")
            continue
        for p in bundle.precisions(fmt):
            out += [(backend, p, layout) for layout in onnx_layouts(bundle, p)] if backend == "onnxruntime" \
                else [(backend, p, None)]
    return out, skipped


def measure(bundle_dir: str, backend: str, precision: str, options: BenchOptions,
            layout: str | None = None) -> dict[str, Any]:
    """One (backend, precision[, layout]) in this process (the worker side of `bench`)."""
    from .loading import pipeline_for_bundle

    bundle = open_bundle(bundle_dir)
    provider = "cpu" if backend == "onnxruntime" else "auto"
    gpu_before = _gpu_free()
    pipe = pipeline_for_bundle(bundle, backend=backend, provider=provider, threads=options.threads,
                               precision=precision, **({"layout": layout} if layout else {}))
    row = measure_pipeline(pipe, options)
    row["decode_ms_at_context"] = context_scaling(pipe.backend, options.context_probe, pipe.files.context_length,
                                                  position_dims=pipe.family.position_dims)
    describe = pipe.describe()
    kv_bytes = (4 if describe["kv_cache_type"] == "f32" else 2) if backend == "llamacpp" else \
        np.dtype(pipe.backend.kv_dtype).itemsize
    text = bundle.manifest["text"]
    kv_per_position = 2 * text["num_layers"] * text["num_kv_heads"] * text["head_dim"] * kv_bytes
    weight_bytes = decode_weight_bytes(bundle, backend, precision, layout)
    mean_ctx = row["prompt_tokens"] + options.new_tokens / 2
    gpu_after = _gpu_free()
    return {"backend": backend, "precision": precision, **({"layout": layout} if layout else {}), **row,
            "gpu_memory_mib": round((gpu_before - gpu_after) / (1 << 20), 1) if gpu_before and gpu_after else None,
            "size_mib": round(artifact_bytes(bundle, backend, precision) / (1 << 20), 2),
            "decode_bytes_per_token": int(weight_bytes + kv_per_position * mean_ctx),
            # what a step reads after each probed context: a step at the roofline takes time in proportion,
            # so their ratio is the least a step's time can grow with the context
            "decode_bytes_at_context": {n: int(weight_bytes + kv_per_position * int(n))
                                        for n in row["decode_ms_at_context"]}}


def measure_pipeline(pipe, options: BenchOptions) -> dict[str, Any]:
    """The timings of one Pipeline (any backend, the PyTorch reference included), at the backend
    contract: the same calls, prompts and token counts for every backend."""
    b = pipe.backend
    rounds = options.repeats + 1  # the first is a warm-up
    vision1, vision4, ttft, prefill, decode = [], [], [], [], []
    one = pipe.prepare(prompt_for(1), bench_images(1, options.image_size))
    four = pipe.prepare(prompt_for(4), bench_images(4, options.image_size))
    images = bench_images(options.prompt_images, options.image_size)
    for r in range(rounds):
        t0 = time.perf_counter()
        pipe.image_features(one.vision)
        t1 = time.perf_counter()
        pipe.image_features(four.vision)
        t2 = time.perf_counter()
        prep = pipe.prepare(prompt_for(options.prompt_images), images)
        embeds = pipe.merged_embeddings(prep)
        n = embeds.shape[1]
        cache = b.new_cache(1)
        t3 = time.perf_counter()
        positions = pipe.prompt_positions(prep)
        logits = b.decode(embeds, np.ones((1, n), np.int64), pipe.as_position_ids(positions[:, None]), cache)
        token = int(np.argmax(logits[0]))
        t4 = time.perf_counter()
        for i in range(options.new_tokens):  # as Pipeline.stream_tokens steps a greedy answer
            token = pipe.greedy_step(token, int(positions.max()) + 1 + i, cache)
        t5 = time.perf_counter()
        if r:
            vision1.append((t1 - t0) * 1e3)
            vision4.append((t2 - t1) * 1e3 / 4)
            ttft.append((t4 - t2) * 1e3)
            prefill.append(n / (t4 - t3))
            decode.append(options.new_tokens / (t5 - t4))
    describe = pipe.describe()
    return {"device": describe.get("device") or describe.get("providers", ["cpu"])[0], "threads": options.threads,
            "prompt_images": options.prompt_images, "prompt_tokens": n, "new_tokens": options.new_tokens,
            "vision_ms_per_image_1": _stats(vision1), "vision_ms_per_image_4": _stats(vision4), "ttft_ms": _stats(ttft),
            "prefill_tokens_per_s": _stats(prefill), "decode_tokens_per_s": _stats(decode),
            "peak_rss_mib": round(peak_rss_bytes() / (1 << 20), 1)}


def context_scaling(backend, contexts: Sequence[int], model_positions: int | None = None,
                    steps: int = 16, position_dims: int = 1) -> dict[str, float]:
    """Median decode step ms after each number of positions of context: a prefill of random
    embeddings (the decoder alone), then `steps` single-token steps. Contexts past what the model or
    the backend holds are left out. `position_dims` 3: M-RoPE positions (text: three equal ones)."""

    def positions(start: int, n: int) -> np.ndarray:
        pos = np.arange(start, start + n, dtype=np.int64)[None]
        return pos if position_dims == 1 else np.repeat(pos[None], position_dims, axis=0)

    limits = [n for n in (model_positions, getattr(backend, "n_ctx", None), getattr(backend, "max_context", None)) if n]
    limit = min(limits) if limits else None
    hidden = backend.hidden if hasattr(backend, "hidden") else None
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for n in contexts:
        if limit and n + steps > limit:
            continue
        cache = backend.new_cache(1)
        if hidden is None:
            hidden = backend.embed_tokens(np.zeros((1, 1), np.int64)).shape[-1]
        embeds = (rng.standard_normal((1, n + steps, hidden)) * 0.02).astype(np.float32)
        backend.decode(embeds[:, :n], np.ones((1, n), np.int64), positions(0, n), cache)
        times = []
        for i in range(n, n + steps):
            t = time.perf_counter()
            backend.decode(embeds[:, i:i + 1], np.ones((1, i + 1), np.int64), positions(i, 1), cache)
            times.append((time.perf_counter() - t) * 1e3)
        out[str(n)] = round(statistics.median(times), 3)
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage: after fork + exec, ru_maxrss keeps
    the parent's peak (a worker started by a parent holding the bandwidth buffers read 548 MiB for
    a 120 MiB run)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gpu_free() -> int | None:
    try:
        from .runtimes.cuda import CudaDriver
        from .runtimes.onnxruntime import nvidia_gpu_present

        if not nvidia_gpu_present():
            return None
        cuda = CudaDriver.get()
        cuda.use_device(0)
        return cuda.memory_info()[0]
    except EdgeLMMError:
        return None


def run_worker(bundle_dir: str, backend: str, precision: str, options: BenchOptions,
               layout: str | None = None) -> dict[str, Any]:
    """`measure` in a fresh Python process (its own peak RSS, its own thread pools); a failure is a row
    with the error, so one broken backend does not end the run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
    payload = json.dumps({"bundle": bundle_dir, "backend": backend, "precision": precision, "layout": layout,
                          "options": {**asdict(options), "image_size": list(options.image_size),
                                      "context_probe": list(options.context_probe)}})
    r = subprocess.run([sys.executable, "-m", "edgelmm.bench", payload], capture_output=True, text=True, env=env)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"backend": backend, "precision": precision, **({"layout": layout} if layout else {}),
                "error": " | ".join(tail) or f"exit {r.returncode}"}
    return json.loads(lines[-1])


def bench(bundle_dir: str | Path, options: BenchOptions | None = None, *,
          progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run every (backend, precision) of the bundle; returns the machine, the bandwidth and a row each."""
    from .runtimes.select import this_platform

    opts = options or BenchOptions()
    opts.validate()
    bundle = open_bundle(bundle_dir)
    todo, skipped = configs(bundle, opts)
    if not todo:
        raise BackendUnavailable("nothing to benchmark here: " + ("; ".join(skipped) or "the bundle has no artifacts"))
    say = progress or (lambda _msg, _i, _n: None)
    say("measuring memory bandwidth", 0, len(todo))
    bandwidth = memory_bandwidth(opts.bandwidth_mib)
    read = read_bandwidth(opts.bandwidth_mib)
    llc = last_level_cache_bytes()
    rows = []
    for i, (backend, precision, layout) in enumerate(todo):
        say(f"{backend} {precision}" + (f" ({layout} decoder)" if layout else ""), i, len(todo))
        row = run_worker(str(Path(bundle_dir).resolve()), backend, precision, opts, layout)
        if "error" not in row:
            roof = bandwidth * 1e9 / row["decode_bytes_per_token"]
            row["roofline_tokens_per_s"] = round(roof, 1)
            row["roofline_fraction"] = round(row["decode_tokens_per_s"]["median"] / roof, 3)
            read_roof = read * 1e9 / row["decode_bytes_per_token"]
            row["read_roofline_tokens_per_s"] = round(read_roof, 1)
            row["read_roofline_fraction"] = round(row["decode_tokens_per_s"]["median"] / read_roof, 3)
            row["fits_in_cache"] = reads_from_cache(row["decode_bytes_per_token"], llc, read)
        rows.append(row)
    say("done", len(todo), len(todo))
    plat = this_platform()
    return {"bundle": str(bundle_dir), "machine": {"kind": plat.kind, "cpu": plat.cpu, "cores": plat.cpu_count,
                                                   "memory_mib": plat.memory_mib, "gpus": plat.gpus},
            "threads": opts.threads, "repeats": opts.repeats, "memory_bandwidth_gb_s": round(bandwidth, 2),
            "read_bandwidth_gb_s": round(read, 2),
            "last_level_cache_mib": round(llc / (1 << 20), 1) if llc else None,
            "results": rows, "skipped": skipped}


TABLE_COLUMNS = ("backend", "precision", "vision ms/img (1 / 4)", "TTFT ms (2 img)", "prefill tok/s", "decode tok/s",
                 "roofline: read / copy", "step ms by context", "RSS MiB", "MiB on disk")


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row of TABLE_COLUMNS per backend x precision (a failed one: its error after the names)."""
    rows = []
    for r in report["results"]:
        name = r["backend"] + (f" ({r['layout']})" if r.get("layout") else "")
        if "error" in r:
            rows.append([name, r["precision"], f"failed: {r['error']}"] + [""] * (len(TABLE_COLUMNS) - 3))
            continue
        steps = ", ".join(f"{ms:.2f} @{n}" for n, ms in (r.get("decode_ms_at_context") or {}).items()) or "-"
        rows.append([
            name, r["precision"],
            f"{r['vision_ms_per_image_1']['median']:.2f} / {r['vision_ms_per_image_4']['median']:.2f}",
            f"{r['ttft_ms']['median']:.1f}", f"{r['prefill_tokens_per_s']['median']:.0f}",
            f"{r['decode_tokens_per_s']['median']:.1f} (±{100 * r['decode_tokens_per_s']['spread']:.0f}%)",
            f"{100 * r['read_roofline_fraction']:.0f}% of {r['read_roofline_tokens_per_s']:.0f} / "
            f"{100 * r['roofline_fraction']:.0f}% of {r['roofline_tokens_per_s']:.0f}"
            f"{' (in cache)' if r['fits_in_cache'] else ''}",
            steps, f"{r['peak_rss_mib']:.0f}", f"{r['size_mib']:.1f}"])
    return rows


def format_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (README, benchmarks/results)."""
    head = f"| {' | '.join(TABLE_COLUMNS)} |\n|{'---|' * len(TABLE_COLUMNS)}\n"
    return head + "\n".join(f"| {' | '.join(row)} |" for row in table_rows(report))


if __name__ == "__main__":  # the worker: one (backend, precision), JSON on the last stdout line
    job = json.loads(sys.argv[1])
    o = job["options"]
    o["image_size"], o["context_probe"] = tuple(o["image_size"]), tuple(o["context_probe"])
    print(json.dumps(measure(job["bundle"], job["backend"], job["precision"], BenchOptions(**o), job.get("layout"))))
