"""The bad-input fuzz campaign: seeded damage to bundle manifests, GGUF headers, ONNX graphs, images,
videos, prompts and options, each case in its own process under a timeout and a memory limit, classified
as typed / accepted / unnamed / untyped / crash / hang / wrong (see edgelmm/testing/fuzz.py).

    python benchmarks/fuzz.py --cases 2000 --seed 0 [--jobs 2] [--kinds manifest,gguf,...]
    python benchmarks/fuzz.py --replay gguf/kv-value:123456 --keep all     # one case, in full
    python benchmarks/fuzz.py --list                                       # the mutator table

Prints counts per outcome, per kind and per mutator, every failing case with its seed and a
one-line reason, and one reproducing seed per distinct failure; writes the JSON report
(benchmarks/results/fuzz.json). Exits 1 when any case crashed, hung, was untyped, unnamed or wrong.
The fixtures (the reference model exported to ONNX + GGUF, ~40 s) are built once per run in a
temporary folder, or once for good with --fixtures DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelmm.testing import fuzz  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fuzz.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", type=int, default=300, help="how many cases (the controls included; default 300)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed: the same seed gives the same cases")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--kinds", default=",".join(fuzz.KINDS), help=f"comma-separated subset of {','.join(fuzz.KINDS)}")
    p.add_argument("--timeout", type=float, default=60, help="seconds per case before it counts as a hang (60)")
    p.add_argument("--mem-gib", type=float, default=4, help="memory limit per case, GiB (RLIMIT_DATA; 0 = none)")
    p.add_argument("--fixtures", help="build the fixtures here once and reuse them on later runs")
    p.add_argument("--work", help="where case folders go (default: a temporary folder)")
    p.add_argument("--keep", choices=("none", "failing", "all"), default="none",
                   help="keep the folders of failing (or all) cases, to look at them")
    p.add_argument("--no-slow", action="store_true", help="leave out the cases that load torch (export)")
    p.add_argument("--no-controls", action="store_true", help="leave out the control cases")
    p.add_argument("--replay", action="append", default=[], metavar="KIND/NAME:SEED",
                   help="run just this case (repeatable) and print everything about it")
    p.add_argument("--out", default=str(RESULTS), help="the JSON report (default benchmarks/results/fuzz.json)")
    p.add_argument("--all-cases", action="store_true",
                   help="put every case's result in the report (default: counts and the failing cases only)")
    p.add_argument("--list", action="store_true", help="print the mutator table and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def list_mutators() -> None:
    print(f"{'id':<42}{'expect':<13}{'weight':>7}  slow  culprit")
    for m in fuzz.MUTATORS:
        slow = "yes " if m.slow else "    "
        print(f"{m.id:<42}{m.expect:<13}{m.weight:>7.1f}  {slow}  {m.culprit or '(per variant)'}")


def print_report(report: dict, replay: bool) -> None:
    print()
    print(fuzz.format_counts(report))
    if not replay:
        print("\nper mutator (non-zero outcomes):")
        for mid, row in sorted(report["by_mutator"].items()):
            print(f"  {mid:<42} " + ", ".join(f"{o} {n}" for o, n in sorted(row.items())))
    if report["failures"]:
        print(f"\n{len(report['failures'])} failing case(s):")
        for f in report["failures"]:
            notes = "; ".join(f.get("notes") or [])
            print(f"  [{f['outcome']:>7}] {f['mutator']}:{f['seed']}  ({notes[:110]})\n            {f['reason'][:300]}")
        print(f"\n{len(report['distinct_failures'])} distinct failure(s), one reproducing seed each:")
        for d in report["distinct_failures"]:
            print(f"  {d['count']:>4} x {d['signature'][:120]}\n         python benchmarks/fuzz.py {d['replay']}")
    if replay:
        for r in report["results"]:
            print(f"\n== {r['mutator']}:{r['seed']}  outcome {r['outcome']}  expect {r.get('expect')}  "
                  f"culprit /{r.get('culprit')}/  {r.get('seconds')} s")
            print(f"notes:  {'; '.join(r.get('notes') or [])}\naction: {r.get('action')}\nreason: {r.get('reason')}")
            for key in ("message", "traceback", "stderr_tail", "work"):
                if r.get(key):
                    print(f"{key}:\n{r[key]}")
    if not report.get("base_intact", True):
        print("\nWARNING: the base bundle was modified by a case; results after that point are suspect")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_mutators()
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in fuzz.KINDS]
    if unknown:
        sys.exit(f"unknown kind(s) {unknown}; choose from {', '.join(fuzz.KINDS)}")
    only = []
    for spec in args.replay:
        mid, _, seed = spec.rpartition(":")
        if mid not in fuzz.BY_ID or not seed.isdigit():
            sys.exit(f"--replay takes KIND/NAME:SEED with a known mutator id (see --list), got {spec!r}")
        only.append((mid, int(seed)))
    started, done = time.time(), [0]
    planned = len(only) or max(args.cases, len(fuzz.CONTROL_MUTATORS) if not args.no_controls else 0)

    def progress(r: dict) -> None:
        done[0] += 1
        if r["outcome"] in fuzz.FAILING + ("harness",) and not only:
            print(f"  [{r['outcome']:>7}] {r['mutator']}:{r['seed']}  {r.get('reason', '')[:150]}", flush=True)
        if not args.quiet and (done[0] % 25 == 0 or done[0] == planned):
            rate = (time.time() - started) / done[0]
            print(f"  ... {done[0]}/{planned} cases, {rate:.2f} s/case", flush=True)

    report = fuzz.campaign(cases=args.cases, seed=args.seed, jobs=args.jobs, kinds=kinds, timeout=args.timeout,
                           mem_gib=args.mem_gib, fixtures=args.fixtures, work=args.work, keep=args.keep,
                           include_slow=not args.no_slow, controls=not args.no_controls, only=only or None,
                           on_result=progress)
    report["command"] = " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    print_report(report, replay=bool(only))
    out = Path(args.out)
    if not only:
        out.parent.mkdir(parents=True, exist_ok=True)
        saved = report if args.all_cases else {k: v for k, v in report.items() if k != "results"}
        out.write_text(json.dumps(saved, indent=1, default=str))
        print(f"\nreport: {out}  ({report['cases']} cases in {report['elapsed']:.0f} s)")
    return 0 if report["ok"] and report.get("base_intact", True) else 1


if __name__ == "__main__":
    sys.exit(main())
