"""Calibrated precisions of the reference model on ONNX Runtime CPU, 1 thread: held-out accuracy,
size on disk, vision ms/image and decode ms/token, against fp32. One run, same machine.

    .venv/bin/python benchmarks/precisions.py [--bundle DIR] [--samples 900]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import edgelmm
from edgelmm import synthetic
from edgelmm.calib import CalibrationOptions, calibrate, precision_size
from edgelmm.evaluate import evaluate
from edgelmm.export import export
from edgelmm.models import reference_model

PRECISIONS = ["int8", "int4", "int8-vision+int4"]


def timings(pipe, repeats=5, steps=48):
    s = synthetic.make_sample("test", 3)
    prep = pipe.prepare(s.messages, s.images)
    px = prep.vision.pixel_values[:1]
    vision = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(50):
            pipe.backend.encode_images(px)
        vision.append((time.perf_counter() - t) / 50 * 1e3)
    feats = pipe.image_features(prep.vision)
    embeds = pipe.merged_embeddings(prep, feats)
    n = embeds.shape[1]
    decode = []
    for _ in range(repeats):
        cache = pipe.backend.new_cache(1)
        pipe.backend.decode(embeds, np.ones((1, n), np.int64), np.arange(n)[None], cache)
        step = embeds[:, -1:]
        t = time.perf_counter()
        for k in range(steps):
            pipe.backend.decode(step, np.ones((1, n + k + 1), np.int64), np.array([[n + k]]), cache)
        decode.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(vision), statistics.median(decode)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=900)
    args = ap.parse_args()
    root = args.bundle or Path(tempfile.mkdtemp()) / "ref"
    if not root.exists():
        export(reference_model(), root, quiet=True)
        calibrate(root, PRECISIONS, CalibrationOptions(calib_samples=64), progress=print)
    manifest = edgelmm.bundle.open_bundle(root).manifest
    rows = []
    for p in ["fp32", *PRECISIONS]:
        pipe = edgelmm.load(root, backend="onnxruntime", provider="cpu", threads=1, precision=p)
        acc = evaluate(pipe, samples=args.samples).accuracy
        v, d = timings(pipe)
        size = precision_size(manifest, p)
        cos = manifest.get("quality", {}).get(p, {}).get("vision_cosine_min", 1.0)
        rows.append((p, acc, size, v, d, cos))
    base = rows[0]
    print("| precision | accuracy | drop (pts) | vision cos | MB | vision ms/image | vs fp32 | decode ms/token | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, acc, size, v, d, cos in rows:
        print(f"| {p} | {acc:.1%} | {100 * (base[1] - acc):.1f} | {cos:.4f} | {size / 1e6:.1f} | {v:.3f} | "
              f"{base[3] / v:.2f}x | {d:.3f} | {base[4] / d:.2f}x |")


if __name__ == "__main__":
    main()
