"""What the importance matrix buys Q4_K_M on the trained reference model: the same model exported
to GGUF f32 (the reference), q4_k_m quantized plainly, and q4_k_m with an importance matrix from 64
synthetic calibration prompts. Reports, on held-out prompts never calibrated on: the importance-
weighted weight error per tensor, next-token KL vs f32 and top-1 agreement, and held-out accuracy.

    .venv/bin/python benchmarks/imatrix.py [--workdir /tmp/edgelmm-imatrix] [--samples 900] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import edgelmm  # noqa: E402
from edgelmm import synthetic  # noqa: E402
from edgelmm.evaluate import evaluate  # noqa: E402
from edgelmm.export import export  # noqa: E402
from edgelmm.models import reference_model  # noqa: E402


def weighted_errors(f32: Path, q4: Path, bundle: Path) -> float:
    """Sum over tensors of sum_ij importance_j * (w_ij - q_ij)^2, with the bundle's importance matrix."""
    import gguf

    from edgelmm.calib.sources import collect
    from edgelmm.export.imatrix import compute_imatrix

    pipe = edgelmm.load(reference_model(), backend="torch")
    imx = compute_imatrix(pipe.family, pipe.backend.model, collect("synthetic", 64, 0).samples, "synthetic")
    ref = {t.name: t for t in gguf.GGUFReader(str(f32)).tensors}
    got = {t.name: t for t in gguf.GGUFReader(str(q4)).tensors}
    total = 0.0
    for name, imp in imx.values.items():
        if name in ref and name in got:
            w = np.asarray(ref[name].data, np.float32).reshape(-1, imp.size)
            q = gguf.quants.dequantize(got[name].data, got[name].tensor_type).reshape(-1, imp.size)
            total += float((((q - w) ** 2) * imp).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/edgelmm-imatrix")
    ap.add_argument("--samples", type=int, default=900)
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts for KL and top-1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    bundles = {}
    for name, imatrix in (("plain", False), ("imatrix", True)):
        bundles[name] = work / name
        if not (bundles[name] / "edgelmm.json").exists():
            export(reference_model(), bundles[name], ["gguf"], gguf_types=["f32", "q4_k_m"], verify=False,
                   overwrite=True, quiet=True, gguf_imatrix=imatrix)
    f32 = edgelmm.load(bundles["plain"], backend="llamacpp", precision="f32", threads=1)
    rows = {}
    for name, path in bundles.items():
        q4 = edgelmm.load(path, backend="llamacpp", precision="q4_k_m", threads=1)
        kls, agree = [], 0
        for i in range(args.prompts):
            s = synthetic.make_sample("test", 100_000 + i)  # held out: not among the eval samples either
            messages = s.messages[:-1] if s.messages[-1]["role"] == "assistant" else s.messages
            logits = []
            for pipe in (f32, q4):
                prep = pipe.prepare(messages, s.images)
                embeds = pipe.merged_embeddings(prep)
                n = embeds.shape[1]
                logits.append(pipe.backend.decode(embeds, np.ones((1, n), np.int64), np.arange(n)[None],
                                                  pipe.backend.new_cache(1))[0].astype(np.float64))
            lp, lq = (x - np.logaddexp.reduce(x) for x in logits)
            kls.append(float((np.exp(lp) * (lp - lq)).sum()))
            agree += int(lp.argmax() == lq.argmax())
        report = evaluate(q4, samples=args.samples)
        rows[name] = {"kl_mean": float(np.mean(kls)), "kl_p95": float(np.percentile(kls, 95)),
                      "top1_agreement": agree / args.prompts, "accuracy": report.accuracy,
                      "weighted_weight_error": weighted_errors(path / "gguf" / "model.f32.gguf",
                                                               path / "gguf" / "model.q4_k_m.gguf", path)}
        del q4
    rows["f32"] = {"accuracy": evaluate(f32, samples=args.samples).accuracy}
    if args.json:
        print(json.dumps(rows))
        return
    print("| GGUF | held-out accuracy | KL vs f32 (mean / p95) | top-1 vs f32 | importance-weighted weight error |")
    print("|---|---|---|---|---|")
    print(f"| f32 | {rows['f32']['accuracy']:.1%} | - | - | - |")
    for name in ("plain", "imatrix"):
        r = rows[name]
        print(f"| q4_k_m {name} | {r['accuracy']:.1%} | {r['kl_mean']:.2e} / {r['kl_p95']:.2e} | "
              f"{r['top1_agreement']:.1%} | {r['weighted_weight_error']:.3f} |")


if __name__ == "__main__":
    main()
