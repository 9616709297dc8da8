"""The ONNX Runtime decode step in its two decoder layouts (plain: the traced graph, KV cache by
Concat; fused: GroupQueryAttention writing the KV cache in place), measured in one run on 1 thread:

  - decode tokens/s and its fraction of this machine's memory-bandwidth roofline (a streaming read's
    and a streaming copy's bandwidth, one thread; see edgelmm/bench.py), fp32 and INT4;
  - INT4 fused against INT4 plain (the same weights, the same prompts);
  - decode step ms after 100 and after 2000 positions of context, and their ratio, beside the ratio
    of the bytes those two steps read (what the ratio would be for steps at the roofline: the KV
    cache a step reads grows with the context, so no step can stay flat).

Models: the suite's random LLaVA-SigLIP checkpoints, 60m (65M parameters, text hidden 512 x 6 layers)
and 200m (221M, hidden 1024 x 12), each exported once (ONNX fp32 with both decoder layouts) and
calibrated once (int8-vision+int4, RTN, no quality gate: random weights answer nothing).
Every ratio comes from rows measured in the same round; the whole measurement runs `--rounds`
times and each ratio is reported as min / median / max over the rounds (machines here differ 3-4x in
absolute speed, and ratios move between runs).

    .venv/bin/python benchmarks/decode_layouts.py [--models 60m,200m] [--rounds 3] [--workdir /tmp/edgelmm-layouts]
        [--out benchmarks/results/decode_layouts.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgelmm.bench import BenchOptions, memory_bandwidth, read_bandwidth, run_worker  # noqa: E402

CONFIGS = [("fp32", "plain"), ("fp32", "fused"), ("int8-vision+int4", "plain"), ("int8-vision+int4", "fused")]


def bundle_for(name: str, workdir: Path) -> Path:
    from edgelmm.calib import CalibrationOptions, calibrate
    from edgelmm.export import export
    from edgelmm.testing.checkpoints import build_bench_checkpoint

    out = workdir / f"bundle-{name}"
    if not (out / "edgelmm.json").exists():
        ckpt = build_bench_checkpoint(workdir, name)
        export(ckpt, out, ["onnx"], precisions=["fp32"], verify=False, overwrite=True, quiet=True)
        calibrate(out, ["int8-vision+int4"], CalibrationOptions(calib_samples=8, eval_samples=0, gate=False,
                                                                 sensitivity=False))
    return out


def one_round(path: Path, opts: BenchOptions, bandwidth: float, read: float) -> dict:
    rows = {}
    for precision, layout in CONFIGS:
        row = run_worker(str(path), "onnxruntime", precision, opts, layout)
        if "error" in row:
            raise SystemExit(f"{path.name} {precision} {layout}: {row['error']}")
        row["roofline_fraction"] = row["decode_tokens_per_s"]["median"] / (bandwidth * 1e9 / row["decode_bytes_per_token"])
        row["read_roofline_fraction"] = row["decode_tokens_per_s"]["median"] / (read * 1e9 / row["decode_bytes_per_token"])
        rows[f"{precision} {layout}"] = row
    tok = {k: r["decode_tokens_per_s"]["median"] for k, r in rows.items()}
    steps = {k: r["decode_ms_at_context"] for k, r in rows.items()}
    return {
        "decode_tokens_per_s": tok,
        "roofline_fraction": {k: round(r["roofline_fraction"], 3) for k, r in rows.items()},
        "read_roofline_fraction": {k: round(r["read_roofline_fraction"], 3) for k, r in rows.items()},
        "int4_fused_vs_plain": round(tok["int8-vision+int4 fused"] / tok["int8-vision+int4 plain"], 3),
        "fp32_fused_vs_plain": round(tok["fp32 fused"] / tok["fp32 plain"], 3),
        "step_ms_at_context": steps,
        "step_2000_vs_100": {k: round(s["2000"] / s["100"], 3) for k, s in steps.items() if "2000" in s and "100" in s},
        # the same ratio for a step at the roofline: the bytes it reads after 2000 over after 100 positions
        "step_2000_vs_100_at_roofline": {k: round(r["decode_bytes_at_context"]["2000"] /
                                                  r["decode_bytes_at_context"]["100"], 3)
                                         for k, r in rows.items() if {"100", "2000"} <= set(r["decode_bytes_at_context"])},
        "peak_rss_mib": {k: r["peak_rss_mib"] for k, r in rows.items()},
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def summarise(rounds: list[dict]) -> dict:
    out = {}
    for key in ("roofline_fraction", "read_roofline_fraction", "step_2000_vs_100", "decode_tokens_per_s",
                "step_2000_vs_100_at_roofline"):
        out[key] = {k: spread([r[key][k] for r in rounds]) for k in rounds[0][key]}
    for key in ("int4_fused_vs_plain", "fp32_fused_vs_plain"):
        out[key] = spread([r[key] for r in rounds])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="60m,200m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="measured repeats inside each row (median taken)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/edgelmm-layouts")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "decode_layouts.json"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    opts = BenchOptions(threads=1, repeats=args.repeats, new_tokens=args.new_tokens, prompt_images=1,
                        context_probe=(100, 2000))
    result = {"threads": 1, "rounds": args.rounds, "repeats": args.repeats, "models": {}}
    for name in args.models.split(","):
        t = time.perf_counter()
        path = bundle_for(name, workdir)
        print(f"[{name}] bundle ready in {time.perf_counter() - t:.0f} s", flush=True)
        rounds = []
        for i in range(args.rounds):
            bandwidth, read = memory_bandwidth(), read_bandwidth()
            rounds.append({"memory_bandwidth_gb_s": round(bandwidth, 2), "read_bandwidth_gb_s": round(read, 2),
                           **one_round(path, opts, bandwidth, read)})
            r = rounds[-1]
            print(f"[{name}] round {i + 1}: bandwidth {read:.1f} GB/s read, {bandwidth:.1f} copy; roofline read/copy "
                  + ", ".join(f"{k} {v:.0%}/{r['roofline_fraction'][k]:.0%}"
                              for k, v in r["read_roofline_fraction"].items())
                  + f"; INT4 fused/plain {r['int4_fused_vs_plain']:.2f}x; step 2000/100 (at the roofline) "
                  + ", ".join(f"{k} {v:.2f} ({r['step_2000_vs_100_at_roofline'][k]:.2f})"
                              for k, v in r["step_2000_vs_100"].items()), flush=True)
        result["models"][name] = {"rounds": rounds, "summary": summarise(rounds),
                                  "options": dataclasses.asdict(opts)}
        Path(args.out).write_text(json.dumps(result, indent=1, default=list) + "\n")
    print(json.dumps({k: m["summary"] for k, m in result["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
