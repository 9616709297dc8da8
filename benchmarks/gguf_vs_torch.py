"""llama.cpp (GGUF F32 / F16 / Q8_0 / Q4_K_M) vs PyTorch eager fp32 on the same ~60M-parameter
LLaVA-SigLIP checkpoint (text hidden 512, FFN 1536: multiples of 256, so k-quants apply without
fallback), the same 2-image prompt, 1 thread each, in one run.

Timed at the backend contract, identically for every backend: vision ms/image, prompt tokens/s
(one prefill of the merged prompt) and decode tokens/s (fixed greedy steps, EOS ignored, so every
backend decodes the same number of tokens).

    .venv/bin/python benchmarks/gguf_vs_torch.py [--workdir /tmp/edgelmm-bench-gguf] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import edgelmm  # noqa: E402
from edgelmm.testing.checkpoints import build_bench_bundle, sample_images  # noqa: E402

TYPES = ("f32", "f16", "q8_0", "q4_k_m")


def measure(pipe, prompt, images, repeats: int, new_tokens: int) -> dict[str, float]:
    backend = pipe.backend
    prep = pipe.prepare(prompt, images)
    n = len(prep.input_ids)
    vision, prompt_tps, decode_tps = [], [], []
    for r in range(repeats + 1):  # the first round is a warm-up
        t0 = time.perf_counter()
        feats = pipe.image_features(prep.vision)
        t1 = time.perf_counter()
        embeds = pipe.merged_embeddings(prep, feats)
        cache = backend.new_cache(1)
        t2 = time.perf_counter()
        logits = backend.decode(embeds, np.ones((1, n), np.int64), np.arange(n)[None], cache)
        t3 = time.perf_counter()
        for i in range(new_tokens):
            token = int(np.argmax(logits[0]))
            logits = backend.decode(backend.embed_tokens(np.array([[token]])), np.ones((1, n + i + 1), np.int64),
                                    np.array([[n + i]]), cache)
        t4 = time.perf_counter()
        if r:
            vision.append((t1 - t0) * 1e3 / len(images))
            prompt_tps.append(n / (t3 - t2))
            decode_tps.append(new_tokens / (t4 - t3))
    return {"vision_ms_per_image": statistics.median(vision), "prompt_tokens_per_s": statistics.median(prompt_tps),
            "decode_tokens_per_s": statistics.median(decode_tps),
            "decode_spread": round((max(decode_tps) - min(decode_tps)) / statistics.median(decode_tps), 3),
            "prompt_tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/edgelmm-bench-gguf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ckpt, bundle = build_bench_bundle(args.workdir, formats=["gguf"], gguf_types=list(TYPES))
    images = sample_images(2, seed=1, sizes=[(240, 320), (300, 300)])
    prompt = "Compare <image> with <image>. " + "Describe every difference in detail. " * 8
    torch_pipe = edgelmm.load(ckpt, backend="torch", threads=1)
    results = {"params_millions": round(sum(p.numel() for p in torch_pipe.backend.model.parameters()) / 1e6, 1),
               "threads": 1, "new_tokens": args.new_tokens,
               "torch_eager_fp32": measure(torch_pipe, prompt, images, args.repeats, args.new_tokens)}
    del torch_pipe
    sizes = {a["precision"]: a["files"][0]["size"] for a in edgelmm.bundle.open_bundle(bundle).manifest["artifacts"]
             if a["graph"] == "llm"}
    for gtype in TYPES:
        pipe = edgelmm.load(bundle, backend="llamacpp", precision=gtype, threads=1)
        results[f"llamacpp_{gtype}"] = {**measure(pipe, prompt, images, args.repeats, args.new_tokens),
                                        "llm_file_mb": round(sizes[gtype] / 1e6, 1)}
        pipe.backend.close()
    base = results["torch_eager_fp32"]
    for gtype in TYPES:
        r = results[f"llamacpp_{gtype}"]
        r["decode_speedup_vs_torch"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
        r["prompt_speedup_vs_torch"] = round(r["prompt_tokens_per_s"] / base["prompt_tokens_per_s"], 2)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{results['params_millions']}M params, 1 thread, {base['prompt_tokens']}-token prompt with 2 images, "
          f"{args.new_tokens} decode steps")
    print(f"{'':18}{'vision ms/img':>14}{'prompt tok/s':>14}{'decode tok/s':>14}{'decode x':>10}{'LLM MB':>8}")
    print(f"{'torch eager fp32':18}{base['vision_ms_per_image']:14.1f}{base['prompt_tokens_per_s']:14.0f}"
          f"{base['decode_tokens_per_s']:14.1f}{1.0:10.2f}{'':>8}")
    for gtype in TYPES:
        r = results[f"llamacpp_{gtype}"]
        print(f"{'llama.cpp ' + gtype:18}{r['vision_ms_per_image']:14.1f}{r['prompt_tokens_per_s']:14.0f}"
              f"{r['decode_tokens_per_s']:14.1f}{r['decode_speedup_vs_torch']:10.2f}{r['llm_file_mb']:8.1f}")


if __name__ == "__main__":
    main()
