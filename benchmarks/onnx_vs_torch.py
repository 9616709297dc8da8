"""ONNX Runtime (CPU) vs PyTorch eager on the same ~60M-parameter LLaVA-SigLIP checkpoint and the
same prompt, 1 thread each, in one run: vision ms/image, prefill ms, decode ms/token.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--workdir /tmp/edgelmm-bench] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import edgelmm  # noqa: E402
from edgelmm.testing.checkpoints import build_bench_bundle, sample_images  # noqa: E402



def measure(pipe, prompt, images, repeats: int, new_tokens: int) -> dict[str, float]:
    pipe.generate(prompt, images, max_new_tokens=4)  # warm-up
    vision, prefill, decode = [], [], []
    for _ in range(repeats):
        g = pipe.generate(prompt, images, max_new_tokens=new_tokens)
        vision.append(g.timings_ms["vision_ms"] / len(images))
        prefill.append(g.timings_ms["prefill_ms"])
        decode.append(g.timings_ms["decode_ms"] / max(1, len(g.token_ids) - 1))
    return {"vision_ms_per_image": statistics.median(vision), "prefill_ms": statistics.median(prefill),
            "decode_ms_per_token": statistics.median(decode), "prompt_tokens": g.prompt_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/edgelmm-bench")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ckpt, bundle = build_bench_bundle(args.workdir)
    torch_pipe = edgelmm.load(ckpt, backend="torch", threads=1)
    ort_pipe = edgelmm.load(bundle, threads=1)
    # The same graphs with the KV cache round-tripped through numpy each step (no IO binding).
    from edgelmm.bundle import open_bundle
    from edgelmm.pipeline import Pipeline
    from edgelmm.runtimes.onnxruntime import OnnxRuntimeBackend
    ort_plain = Pipeline(ort_pipe.files, ort_pipe.family, OnnxRuntimeBackend(open_bundle(bundle), threads=1,
                                                                            io_binding=False))
    params = sum(p.numel() for p in torch_pipe.backend.model.parameters())
    images = sample_images(2, seed=1, sizes=[(240, 320), (300, 300)])
    prompt = "Compare <image> with <image>. " + "Describe every difference in detail. " * 8
    results = {"params_millions": round(params / 1e6, 1), "threads": 1,
               "torch_eager_fp32": measure(torch_pipe, prompt, images, args.repeats, args.new_tokens),
               "onnxruntime_cpu_fp32": measure(ort_pipe, prompt, images, args.repeats, args.new_tokens),
               "onnxruntime_cpu_fp32_no_io_binding": measure(ort_plain, prompt, images, args.repeats, args.new_tokens)}
    t, o = results["torch_eager_fp32"], results["onnxruntime_cpu_fp32"]
    results["speedup_ort_over_torch"] = {k: round(t[k] / o[k], 2) for k in t if k.endswith(("ms", "ms_per_image", "ms_per_token"))}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{results['params_millions']}M params, 1 thread, {t['prompt_tokens']}-token prompt with 2 images")
    n = results["onnxruntime_cpu_fp32_no_io_binding"]
    print(f"{'':24}{'torch eager':>14}{'ORT CPU':>12}{'speedup':>10}{'ORT, no IO binding':>20}")
    for k in ("vision_ms_per_image", "prefill_ms", "decode_ms_per_token"):
        print(f"{k:24}{t[k]:14.2f}{o[k]:12.2f}{results['speedup_ort_over_torch'][k]:10.2f}x{n[k]:20.2f}")


if __name__ == "__main__":
    main()
