"""Where a decode step's time goes on ONNX Runtime (CPU, 1 thread): ORT's own profiler over fixed
greedy steps, summed per operator type, against the bytes each operator reads. Used to explain the
roofline fractions `edgelmm bench` and benchmarks/suite.py report.

    .venv/bin/python benchmarks/profile_decode.py BUNDLE [--precision fp32] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgelmm.bench import prompt_for
from edgelmm.bundle import open_bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()

    import onnxruntime as ort

    import edgelmm

    bundle = open_bundle(args.bundle)
    pipe = edgelmm.load(args.bundle, backend="onnxruntime", provider="cpu", threads=1, precision=args.precision)
    prep = pipe.prepare(prompt_for(2), [np.full((480, 640, 3), 90 + 40 * i, np.uint8) for i in range(2)])
    embeds = pipe.merged_embeddings(prep)
    n = embeds.shape[1]
    art = bundle.artifact("decoder", "onnx", args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "decode")
        sess = ort.InferenceSession(str(bundle.path(art)), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        t = bundle.manifest["text"]
        past = [np.zeros((1, t["num_kv_heads"], 0, t["head_dim"]), np.float32)] * (2 * t["num_layers"])
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None], **dict(zip(names[3:], past))}
        logits, *past = sess.run(None, feeds)
        for i in range(args.steps):
            token = int(np.argmax(logits[0]))
            feeds = {"inputs_embeds": pipe.backend.embed_tokens(np.array([[token]])),
                     "attention_mask": np.ones((1, n + i + 1), np.int64),
                     "position_ids": np.array([[n + i]], np.int64), **dict(zip(names[3:], past))}
            logits, *past = sess.run(None, feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the prefill
    start = decode_runs[0]["ts"] if decode_runs else 0
    by_op: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            by_op[e["args"]["op_name"]] += e["dur"]
    total_model = sum(r["dur"] for r in decode_runs)
    total_ops = sum(by_op.values())
    print(f"{args.precision}: {args.steps} decode steps, {total_model / args.steps / 1e3:.2f} ms/step in "
          f"InferenceSession.run, {total_ops / args.steps / 1e3:.2f} ms/step inside kernels "
          f"({100 * (1 - total_ops / total_model):.0f}% outside kernels: ORT's own per-run work)")
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {op:24s} {us / args.steps / 1e3:7.3f} ms/step  {100 * us / total_ops:5.1f}%")


if __name__ == "__main__":
    main()
