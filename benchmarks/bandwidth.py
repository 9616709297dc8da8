"""What one thread of this machine can read, against what it can copy: the two yardsticks of the
decode roofline (edgelmm/bench.py), and how close the fastest matrix-vector products come to them.

A decode step at batch 1 is a matrix-vector product over every weight: it only reads. One core
copies faster than it reads (a large copy's stores are non-temporal; they do not hold the core's
line-fill buffers as reads do), so a roofline taken from a copy's bandwidth is one a decode cannot
reach. This prints, on one thread, for large buffers (256 / 128 MiB by default: past the cache a
core gets on the machines here, though not past every LLC sysfs reports):
  - read: `edgelmm.bench.read_bandwidth` (numpy OR-reduction) and OpenBLAS's dot;
  - copy: `edgelmm.bench.memory_bandwidth` (numpy copy, bytes read + written);
  - GEMV: OpenBLAS (numpy, both orientations) and ONNX Runtime's MatMul (MLAS, pre-packed weights),
    fp32, 1 x K times K x N, as GB/s of weights read; and ONNX Runtime's 4-bit MatMulNBits (edgelmm's
    INT4 decoders) over as many bytes of packed weights, and over 2 MiB of them (in cache).

    .venv/bin/python benchmarks/bandwidth.py [--gemv-mib 128] [--json]
"""

from __future__ import annotations

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy loads OpenBLAS: one thread, as every decode row
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from edgelmm.bench import last_level_cache_bytes, memory_bandwidth, read_bandwidth  # noqa: E402


def best_gb_s(fn, nbytes: int, repeats: int = 8) -> float:
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def ort_matmul(weights: np.ndarray):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = weights.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # what this ONNX Runtime reads
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess


def streams(mib: int) -> dict:
    out = {"read_gb_s": round(read_bandwidth(mib), 2), "copy_gb_s": round(memory_bandwidth(mib), 2)}
    x = np.ones(mib << 18, np.float32)
    out["openblas_dot_gb_s"] = round(best_gb_s(lambda: np.dot(x, x), x.nbytes), 2)
    return out


def int4_gemv(mib: int, block: int = 32) -> float:
    """GB/s of packed weights ONNX Runtime's 4-bit MatMulNBits reads for one row (accuracy level 4,
    int8 arithmetic: edgelmm's INT4 decoders), `mib` MiB of packed weights and scales; its output
    checked against the weights dequantized here (zero point 8, low nibble first)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 1024
    blocks = k // block
    n = max(16, (mib << 20) // (k // 2 + 4 * blocks))   # packed bytes + a float scale per block, per column
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.02).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["a", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "gemv4", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((1, k), dtype=np.float32)
    y = sess.run(None, {"a": a})[0]
    nibbles = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, block).astype(np.float32) - 8
    want = (nibbles * scales.reshape(n, blocks, 1)).reshape(n, k) @ a[0]
    err = float(np.abs(y[0] - want).max())
    assert err < 0.05 * float(np.abs(want).max()), f"MatMulNBits is off by {err}"
    return best_gb_s(lambda: sess.run(None, {"a": a}), packed.nbytes + scales.nbytes)


def gemvs(mib: int) -> dict:
    k = 4096
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, (mib << 20) // (4 * k)), dtype=np.float32)
    a = rng.standard_normal((1, k), dtype=np.float32)
    wt = np.ascontiguousarray(w.T)
    sess = ort_matmul(w)
    y = sess.run(None, {"a": a})[0]
    err = float(np.abs(y - a @ w).max())
    assert err < 1e-2 * float(np.abs(y).max()), f"ONNX Runtime's MatMul is off by {err}"
    return {"gemv_weights_mib": round(w.nbytes / (1 << 20), 1),
            "openblas_gemv_x_w_gb_s": round(best_gb_s(lambda: a @ w, w.nbytes), 2),
            "openblas_gemv_wt_x_gb_s": round(best_gb_s(lambda: wt @ a[0], w.nbytes), 2),
            "onnxruntime_matmul_gb_s": round(best_gb_s(lambda: sess.run(None, {"a": a}), w.nbytes), 2),
            # the same bytes as 4-bit weights, from DRAM, and 2 MiB of them (from cache): the kernel's
            # arithmetic and its waits on memory add up instead of overlapping
            "onnxruntime_int4_gemv_gb_s": round(int4_gemv(mib), 2),
            "onnxruntime_int4_gemv_in_cache_gb_s": round(int4_gemv(2), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemv-mib", type=int, default=128, help="fp32 weights of the GEMV, MiB")
    ap.add_argument("--stream-mib", type=int, default=256, help="buffer of the read and copy streams, MiB")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    out = {"last_level_cache_mib": round((last_level_cache_bytes() or 0) / (1 << 20), 1),
           **streams(args.stream_mib), **gemvs(args.gemv_mib)}
    gemv = max(out["openblas_gemv_x_w_gb_s"], out["openblas_gemv_wt_x_gb_s"], out["onnxruntime_matmul_gb_s"])
    out["best_gemv_vs_read"] = round(gemv / out["read_gb_s"], 3)
    out["best_gemv_vs_copy"] = round(gemv / out["copy_gb_s"], 3)
    if args.json:
        print(json.dumps(out))
        return
    for key, value in out.items():
        print(f"{key:36s} {value}")


if __name__ == "__main__":
    main()
