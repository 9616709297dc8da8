"""Calibrated precisions of the reference model on ONNX Runtime CPU, 1 thread: held-out accuracy,
size on disk, vision ms/image and decode ms/token, against fp32. One run, same machine. Then the
ceiling of any weight quantization on this decoder: the step time with its weight matmuls made free.

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


def timings(pipe, repeats=5, steps=48, greedy=False):
    """Median vision ms/image and decode ms/token; with `greedy`, the step a greedy generation runs
    (decode_greedy where the backend has it: ids, not logits, back to the host)."""
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
        run = pipe.backend.decode_greedy if greedy and hasattr(pipe.backend, "decode_greedy") else pipe.backend.decode
        for k in range(steps):
            run(step, np.ones((1, n + k + 1), np.int64), np.array([[n + k]]), cache)
        decode.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(vision), statistics.median(decode)


def free_matmul_decoder(src: Path, dst: Path) -> int:
    """A copy of the decoder graph whose weight MatMuls/Gemms cost next to nothing: each becomes a
    Slice or Pad to its output width. The answers are meaningless; the time of everything else in a
    decode step is not. fp32 time / this time bounds what any weight quantization can gain."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes, extra, replaced = [], [], 0
    for n in model.graph.node:
        dims = weights.get(n.input[1]) if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 else None
        if not dims or len(dims) != 2:
            nodes.append(n)
            continue
        k, width = dims
        if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
            k, width = width, k
        consts = {"axes": [-1], "a": [0] if width <= k else [0, width - k], "b": [width]}
        names = {key: f"{n.name}_free_{key}" for key in consts}
        extra += [numpy_helper.from_array(np.array(v, np.int64), names[key]) for key, v in consts.items()]
        if width <= k:
            nodes.append(helper.make_node("Slice", [n.input[0], names["a"], names["b"], names["axes"]], [n.output[0]]))
        else:
            nodes.append(helper.make_node("Pad", [n.input[0], names["a"], "", names["axes"]], [n.output[0]]))
        replaced += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(extra)
    onnx.save(model, str(dst))
    return replaced


def raw_step_ms(path: Path, prompt: int = 120, steps: int = 48, repeats: int = 5) -> float:
    """Median ms per one-token decode step after a `prompt`-token prefill, on a bare 1-thread session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    past = [i for i in sess.get_inputs() if i.name.startswith("past")]
    hidden = sess.get_inputs()[0].shape[2]
    embeds = np.random.default_rng(0).standard_normal((1, prompt, hidden)).astype(np.float32) * 0.02
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, prompt), np.int64),
             "position_ids": np.arange(prompt)[None]}
    feeds.update((p.name, np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32)) for p in past)
    prefilled = sess.run(None, feeds)[1:]
    times = []
    for _ in range(repeats + 1):
        cache = prefilled
        t = time.perf_counter()
        for k in range(steps):
            step = {"inputs_embeds": embeds[:, -1:], "attention_mask": np.ones((1, prompt + k + 1), np.int64),
                    "position_ids": np.array([[prompt + k]])}
            step.update(zip([p.name for p in past], cache))
            cache = sess.run(None, step)[1:]
        times.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(times[1:])


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
    # How much any weight quantization could gain here: the same step with free weight matmuls.
    onnx_dir = Path(root) / "onnx"
    with tempfile.TemporaryDirectory() as tmp:
        free = Path(tmp) / "decoder.free.onnx"
        replaced = free_matmul_decoder(onnx_dir / "decoder.onnx", free)
        fp32, int4, floor = (raw_step_ms(p) for p in (onnx_dir / "decoder.onnx", onnx_dir / "decoder.int4.onnx", free))
    print(f"\nDecode step on bare sessions (120-token context): fp32 {fp32:.3f} ms, int4 {int4:.3f} ms "
          f"({fp32 / int4:.2f}x); with all {replaced} weight matmuls free {floor:.3f} ms: no weight "
          f"quantization can make this decoder more than {fp32 / floor:.2f}x faster than fp32.")


if __name__ == "__main__":
    main()
