"""The benchmark suite: edgelmm's paths against PyTorch eager (and torch.compile), against llama.cpp
driven directly through llama-cpp-python, and against this machine's memory-bandwidth roofline, on
three model sizes and 1-8 image prompts. One run, 1 thread everywhere, the same model files and
prompts for every path.

Models (LLaVA: SigLIP vision + Llama text, hidden and FFN sizes multiples of 256):
  reference  the shipped trained reference model (6.4M parameters)
  60m        random, text hidden 512 x 6 layers, vocab 32000 (the ONNX/GGUF benchmarks' model)
  200m       random, text hidden 1024 x 12 layers, FFN 2816, vocab 32000
Each is exported once to a bundle with ONNX fp32 + int8-vision+int4 and GGUF f16 + q4_k_m.

    .venv/bin/python benchmarks/suite.py [--workdir /tmp/edgelmm-suite] [--models reference,60m,200m]
        [--repeats 3] [--new-tokens 32] [--no-compile] [--out benchmarks/results]

Writes OUT/suite.json (every number) and OUT/decode_vs_size.png, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from edgelmm.bench import BenchOptions, bench, measure_pipeline, memory_bandwidth, run_worker  # noqa: E402

def checkpoint(name: str, workdir: Path) -> Path:
    from edgelmm.models import reference_model
    from edgelmm.testing.checkpoints import build_bench_checkpoint

    return reference_model() if name == "reference" else build_bench_checkpoint(workdir, name)


def bundle(ckpt: Path, out: Path) -> Path:
    from edgelmm.calib import CalibrationOptions
    from edgelmm.export import export

    if not (out / "edgelmm.json").exists():
        # Parity is the tests' job; here only speed. Random models have no accuracy to gate on.
        export(ckpt, out, ["onnx", "gguf"], precisions=["fp32", "int8-vision+int4"], gguf_types=["f16", "q4_k_m"],
               verify=False, overwrite=True, quiet=True,
               calibration=CalibrationOptions(calib_samples=16, gate=False, eval_samples=0))
    return out


def parameters(ckpt: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            n += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    return n


def torch_rows(ckpt: Path, opts: BenchOptions, compile_too: bool) -> list[dict]:
    """PyTorch eager fp32 at the same contract; then with the decoder under torch.compile."""
    import dataclasses

    import torch

    import edgelmm

    torch.set_num_threads(opts.threads)
    pipe = edgelmm.load(ckpt, backend="torch", threads=opts.threads)
    rows = [{"backend": "pytorch-eager", "precision": "fp32", **measure_pipeline(pipe, opts)}]
    if compile_too:
        parts = pipe.backend.parts
        try:
            start = time.perf_counter()
            pipe.backend.parts = dataclasses.replace(parts, decoder=torch.compile(parts.decoder, dynamic=True))
            row = measure_pipeline(pipe, opts)  # its warm-up round compiles
            rows.append({"backend": "pytorch-compile", "precision": "fp32", **row,
                         "compile_and_measure_s": round(time.perf_counter() - start, 1)})
        except Exception as exc:  # inductor needs a compiler and may not support every op on CPU
            rows.append({"backend": "pytorch-compile", "precision": "fp32",
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        pipe.backend.parts = parts
    return rows


def raw_llamacpp(gguf_path: Path, prompt_tokens: int, opts: BenchOptions) -> dict:
    """The same GGUF through llama-cpp-python's C API without edgelmm: a text prompt of the same
    length (token ids, llama.cpp's own embedding lookup), then the same number of greedy steps."""
    import llama_cpp

    from edgelmm.runtimes.llamacpp import extra_buffer_types_safe, quiet_llamacpp

    quiet_llamacpp()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = extra_buffer_types_safe()  # as edgelmm's backend: AMX CPUs crash with them
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mp)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 4096, 512, 512
    cp.n_threads = cp.n_threads_batch = opts.threads
    cp.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cp)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    memory = llama_cpp.llama_get_memory(ctx)
    ids = [(100 + 7 * i) % (n_vocab - 10) + 5 for i in range(prompt_tokens)]
    # n_batch tokens per llama_decode call, as edgelmm's backend feeds a long prompt
    chunks = [(llama_cpp.llama_token * len(ids[i:i + 512]))(*ids[i:i + 512]) for i in range(0, len(ids), 512)]
    prefill, decode = [], []

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))

    try:
        for r in range(opts.repeats + 1):
            llama_cpp.llama_memory_clear(memory, True)
            t0 = time.perf_counter()
            for chunk in chunks:
                assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(chunk, len(chunk))) == 0
            token = argmax()
            t1 = time.perf_counter()
            one = (llama_cpp.llama_token * 1)()
            for _ in range(opts.new_tokens):
                one[0] = token
                assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
                token = argmax()
            t2 = time.perf_counter()
            if r:
                prefill.append(prompt_tokens / (t1 - t0))
                decode.append(opts.new_tokens / (t2 - t1))
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    med = float(np.median(decode))
    return {"backend": "llama.cpp-raw", "precision": gguf_path.name.split(".")[1], "prompt_tokens": prompt_tokens,
            "prefill_tokens_per_s": {"median": round(float(np.median(prefill)), 2)},
            "decode_tokens_per_s": {"median": round(med, 3), "spread": round((max(decode) - min(decode)) / med, 3)}}


def with_rooflines(raw: dict, rows: list[dict], report: dict) -> dict:
    """llama.cpp direct against both rooflines: it reads the same GGUF as edgelmm's llama.cpp row, so the
    same bytes per step; an engine edgelmm does not drive, to tell how far one thread can go."""
    ours = [r for r in rows if r["backend"] == "llamacpp" and r["precision"] == raw["precision"] and "error" not in r]
    if "error" in raw or not ours:
        return raw
    tok, step = raw["decode_tokens_per_s"]["median"], ours[0]["decode_bytes_per_token"]
    return {**raw, "decode_bytes_per_token": step,
            "roofline_fraction": round(tok * step / (report["memory_bandwidth_gb_s"] * 1e9), 3),
            "read_roofline_fraction": round(tok * step / (report["read_bandwidth_gb_s"] * 1e9), 3)}


def in_subprocess(job: dict, opts: BenchOptions) -> list[dict]:
    import dataclasses
    import subprocess
    import sys

    job = {**job, "options": {**dataclasses.asdict(opts), "image_size": list(opts.image_size)}}
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        name = "llama.cpp-raw" if job["kind"] == "raw-llamacpp" else "pytorch-eager"
        return [{"backend": name, "precision": "?", "error": (r.stderr or r.stdout).strip().splitlines()[-1]}]
    return json.loads(r.stdout.strip().splitlines()[-1])


def worker(job: dict) -> list[dict]:
    o = job["options"]
    opts = BenchOptions(**{**o, "image_size": tuple(o["image_size"])})
    if job["kind"] == "raw-llamacpp":
        return [raw_llamacpp(Path(job["gguf"]), job["prompt_tokens"], opts)]
    return torch_rows(Path(job["checkpoint"]), opts, compile_too=job["compile"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/edgelmm-suite")
    ap.add_argument("--models", default="reference,60m,200m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compiling per model)")
    ap.add_argument("--sweep-model", default="60m", help="the model whose prompt length goes 1, 2, 4, 8 images")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--replot", action="store_true", help="only redraw the plot and ratios from OUT/suite.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one measurement in a fresh process (JSON job)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    workdir, out = Path(args.workdir), Path(args.out)
    if args.replot:
        result = json.loads((out / "suite.json").read_text())
        plot(result, out / "decode_vs_size.png")
        print(json.dumps(ratios(result), indent=1))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    opts = BenchOptions(threads=1, repeats=args.repeats, new_tokens=args.new_tokens)
    result = {"threads": 1, "repeats": args.repeats, "new_tokens": args.new_tokens, "models": {}}
    for name in args.models.split(","):
        t = time.perf_counter()
        ckpt = checkpoint(name, workdir)
        path = bundle(ckpt, workdir / f"bundle-{name}")
        print(f"[{name}] bundle ready in {time.perf_counter() - t:.0f} s", flush=True)
        report = bench(path, opts)
        rows = report["results"]
        prompt_tokens = rows[0]["prompt_tokens"]
        # Every path in a fresh process of its own, as `bench` runs edgelmm's: the same heap, thread
        # pools and page cache state for all (in this process, torch and the exports are loaded).
        for gguf_type in ("f16", "q4_k_m"):
            raw = in_subprocess({"kind": "raw-llamacpp", "gguf": str(path / "gguf" / f"model.{gguf_type}.gguf"),
                                 "prompt_tokens": prompt_tokens}, opts)
            rows += [with_rooflines(r, rows, report) for r in raw]
        rows += in_subprocess({"kind": "torch", "checkpoint": str(ckpt), "compile": not args.no_compile}, opts)
        result["models"][name] = {"parameters": parameters(ckpt), "bundle": str(path),
                                  "memory_bandwidth_gb_s": report["memory_bandwidth_gb_s"],
                                  "read_bandwidth_gb_s": report["read_bandwidth_gb_s"],
                                  "last_level_cache_mib": report["last_level_cache_mib"], "rows": rows}
        print_model(name, result["models"][name])
        if name == args.sweep_model:
            result["sweep"] = sweep(ckpt, path, opts)
    result["memory_bandwidth_gb_s"] = round(memory_bandwidth(), 2)
    (out / "suite.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "decode_vs_size.png")
    print(json.dumps(ratios(result), indent=1))


def sweep(ckpt: Path, path: Path, opts: BenchOptions) -> list[dict]:
    """TTFT and decode tokens/s as the prompt grows from 1 to 8 images."""
    import dataclasses

    rows = []
    for k in (1, 2, 4, 8):
        o = dataclasses.replace(opts, prompt_images=k)
        for backend, precision in (("onnxruntime", "fp32"), ("onnxruntime", "int8-vision+int4"), ("llamacpp", "q4_k_m")):
            row = run_worker(str(path), backend, precision, o)
            rows.append({"images": k, **row})
        rows += [{"images": k, **r} for r in in_subprocess({"kind": "torch", "checkpoint": str(ckpt),
                                                            "compile": False}, o)]
        print(f"  sweep {k} image(s): " + ", ".join(
            f"{r['backend']} {r['precision']} TTFT {r['ttft_ms']['median']:.0f} ms decode "
            f"{r['decode_tokens_per_s']['median']:.1f} tok/s" for r in rows if r["images"] == k and "error" not in r),
            flush=True)
    return rows


def print_model(name: str, m: dict) -> None:
    print(f"\n{name}: {m['parameters'] / 1e6:.1f}M parameters, bandwidth {m.get('read_bandwidth_gb_s')} GB/s read, "
          f"{m['memory_bandwidth_gb_s']} GB/s copy")
    print("| path | precision | vision ms/img (1 / 4) | TTFT ms | prefill tok/s | decode tok/s | roofline read / copy |")
    print("|---|---|---|---|---|---|---|")
    for r in m["rows"]:
        if "error" in r:
            print(f"| {path_name(r)} | {r['precision']} | failed: {r['error']} |||||")
            continue
        vis = (f"{r['vision_ms_per_image_1']['median']:.2f} / {r['vision_ms_per_image_4']['median']:.2f}"
               if "vision_ms_per_image_1" in r else "-")
        ttft = f"{r['ttft_ms']['median']:.1f}" if "ttft_ms" in r else "-"
        roof = (f"{100 * r['read_roofline_fraction']:.0f}% / {100 * r['roofline_fraction']:.0f}%"
                if "read_roofline_fraction" in r else "-")
        print(f"| {path_name(r)} | {r['precision']} | {vis} | {ttft} | {r['prefill_tokens_per_s']['median']:.0f} | "
              f"{r['decode_tokens_per_s']['median']:.1f} | {roof} |", flush=True)


def path_name(r: dict) -> str:
    """A row's path: the backend, and for ONNX Runtime its decoder layout (plain or fused)."""
    return r["backend"] + (f" {r['layout']}" if r.get("layout") else "")


def _decode(rows, backend, precision=None, layout=None):
    for r in rows:
        if r["backend"] == backend and (precision is None or r["precision"] == precision) and "error" not in r \
                and (layout is None or r.get("layout") == layout):
            return r["decode_tokens_per_s"]["median"]
    return None


def ratios(result: dict) -> dict:
    """The issue's targets, per model."""
    out = {}
    for name, m in result["models"].items():
        rows = m["rows"]
        edgelmm_cpu = [r for r in rows if r["backend"] in ("onnxruntime", "llamacpp") and "error" not in r]
        fastest = max(edgelmm_cpu, key=lambda r: r["decode_tokens_per_s"]["median"])
        eager = _decode(rows, "pytorch-eager")
        vis = {r["precision"]: r["vision_ms_per_image_1"]["median"] for r in rows if r["backend"] == "onnxruntime"}
        vis4 = {r["precision"]: r["vision_ms_per_image_4"]["median"] for r in rows if r["backend"] == "onnxruntime"}
        out[name] = {
            "fastest_edgelmm_cpu": f"{path_name(fastest)} {fastest['precision']}",
            "fastest_vs_pytorch_eager": round(fastest["decode_tokens_per_s"]["median"] / eager, 2),
            "gguf_q4_k_m_vs_raw_llamacpp": round(_decode(rows, "llamacpp", "q4_k_m") /
                                                 _decode(rows, "llama.cpp-raw", "q4_k_m"), 3),
            "gguf_f16_vs_raw_llamacpp": round(_decode(rows, "llamacpp", "f16") / _decode(rows, "llama.cpp-raw", "f16"), 3),
            "roofline_fraction": {f"{path_name(r)} {r['precision']}": r["roofline_fraction"] for r in edgelmm_cpu},
            "read_roofline_fraction": {f"{path_name(r)} {r['precision']}": r["read_roofline_fraction"]
                                       for r in edgelmm_cpu if "read_roofline_fraction" in r},
            "step_2000_vs_100": {f"{path_name(r)} {r['precision']}": round(r["decode_ms_at_context"]["2000"] /
                                                                          r["decode_ms_at_context"]["100"], 3)
                                 for r in edgelmm_cpu if {"100", "2000"} <= set(r.get("decode_ms_at_context", {}))},
            "int8_vision_vs_fp32_1_image": round(vis["fp32"] / vis["int8-vision+int4"], 2),
            "int8_vision_vs_fp32_4_images": round(vis4["fp32"] / vis4["int8-vision+int4"], 2),
        }
        fused, plain = (_decode(rows, "onnxruntime", "int8-vision+int4", layout) for layout in ("fused", "plain"))
        if fused and plain:
            out[name]["int4_fused_vs_plain"] = round(fused / plain, 3)
        compiled = _decode(rows, "pytorch-compile")
        if compiled:
            out[name]["fastest_vs_pytorch_compile"] = round(fastest["decode_tokens_per_s"]["median"] / compiled, 2)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for m in result["models"].values():
        for r in m["rows"]:
            if "error" in r:
                continue
            ours = r["backend"] in ("tensorrt", "onnxruntime", "llamacpp")
            label = f"{'edgelmm ' if ours else ''}{path_name(r)} {r['precision']}"
            series.setdefault(label, []).append((m["parameters"] / 1e6, r["decode_tokens_per_s"]["median"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                linestyle="-" if label.startswith("edgelmm") else "--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters (millions, vision + text)")
    ax.set_ylabel("decode tokens/s (1 thread, median)")
    ax.set_title("edgelmm decode speed vs model size, CPU, 1 thread")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
