"""The reference model on an NVIDIA GPU against the CPU, one run on one machine: held-out accuracy,
parity against the fp32 PyTorch reference, vision ms/image and decode ms/token for the PyTorch
reference (CPU, CUDA) and ONNX Runtime (CPU provider at 1 thread and at every core, CUDA provider)
at every ONNX precision the bundle has (fp32, fp16, the calibrated ones), and the fused fp16
decoder on the CUDA provider with and without its decode step captured as a CUDA graph.

    python benchmarks/gpu.py [--model reference|60m|200m] [--bundle DIR] [--samples 900] [--json OUT.json]

The 60m and 200m models are random-weight LLaVA checkpoints of benchmarks/suite.py: timings and
parity only (no held-out accuracy, no calibrated precisions).

Needs onnxruntime-gpu with the CUDA libraries it was built for, and a CUDA build of torch.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import edgelmm
from edgelmm.calib import CalibrationOptions, calibrate
from edgelmm.evaluate import evaluate
from edgelmm.export import export
from edgelmm.models import reference_model
from edgelmm.runtimes.onnxruntime import GpuOptions
from edgelmm.testing.checkpoints import build_bench_checkpoint
from edgelmm.verify import THRESHOLDS, verify

from precisions import timings

QUANTIZED = ["int8", "int4", "int8-vision+int4"]


def row(name, pipe, reference, precision, samples, thresholds=None):
    """One configuration: accuracy, parity, and the greedy decode step's ms/token."""
    t = time.perf_counter()
    acc = evaluate(pipe, samples=samples).accuracy if samples else None
    eval_s = time.perf_counter() - t
    parity = verify(pipe, reference, precision, thresholds=thresholds)
    vision_ms, decode_ms = timings(pipe, greedy=True)
    out = {"config": name, "precision": precision, "describe": pipe.describe(), "accuracy": acc,
           "eval_seconds": round(eval_s, 1), "vision_ms_per_image": vision_ms, "decode_ms_per_token": decode_ms,
           "parity_passed": parity["passed"], "parity": parity["summary"]}
    print(f"{name:34s} acc {acc if acc is None else f'{acc:.1%}'}  vision {vision_ms:7.3f} ms/image  decode {decode_ms:7.3f} ms/token  "
          f"parity {'ok' if parity['passed'] else parity['failures']}  ({eval_s:.0f} s eval)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="reference", choices=["reference", "60m", "200m"])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=900)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    trained = args.model == "reference"
    model = reference_model() if trained else build_bench_checkpoint(work, args.model)
    samples = args.samples if trained else 0
    quantized = QUANTIZED if trained else []
    root = args.bundle or work / "bundle"
    if not root.exists():
        # a random model's near-tied logits make fp16 token match meaningless: rows report parity instead
        export(model, root, precisions=("fp32", "fp16"), quiet=True, verify=trained)
        if quantized:
            calibrate(root, quantized, CalibrationOptions(calib_samples=64), progress=print)
    reference = edgelmm.load(model, backend="torch")
    rows = [row("torch cpu", reference, reference, "fp32", samples)]
    # cuDNN convolutions may take TF32 (torch's default): judged as fp16, as tests/test_gpu.py does.
    rows.append(row("torch cuda", edgelmm.load(model, backend="torch", device="cuda"), reference,
                    "fp32", samples, thresholds=THRESHOLDS["fp16"]))
    rows.append(row("onnxruntime cpu 1 thread fp32",
                    edgelmm.load(root, backend="onnxruntime", provider="cpu", threads=1, precision="fp32"),
                    reference, "fp32", samples))
    cores = os.cpu_count()
    rows.append(row(f"onnxruntime cpu {cores} threads fp32",
                    edgelmm.load(root, backend="onnxruntime", provider="cpu", threads=cores, precision="fp32"),
                    reference, "fp32", samples))
    for p in ["fp32", "fp16", *quantized]:
        pipe = edgelmm.load(root, backend="onnxruntime", provider="cuda", precision=p)
        rows.append(row(f"onnxruntime cuda {p}", pipe, reference, p, samples))
    # The fused fp16 decoder on the CUDA provider, its step run normally and captured as a CUDA graph.
    rows.append(row("onnxruntime cuda fp16 fused", edgelmm.load(root, backend="onnxruntime", provider="cuda",
                                                                precision="fp16", layout="fused"),
                    reference, "fp16", samples))
    rows.append(row("onnxruntime cuda fp16 fused cuda-graph",
                    edgelmm.load(root, backend="onnxruntime", provider="cuda", precision="fp16",
                                 gpu_options=GpuOptions(cuda_graph=True)), reference, "fp16", samples))
    auto = edgelmm.load(root)
    print("edgelmm.load(bundle) picks:", json.dumps(auto.describe().get("selection")), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "auto_selection": auto.describe().get("selection")},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
