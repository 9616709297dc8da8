"""`edgelmm watch` on the reference model, ONNX Runtime CPU, 1 thread, on generated videos:

  realtime   a 30 fps camera (a file replayed at its own rate, dropping frames when behind):
             gate fps, dropped frames, gate latency p50/p95, anomaly-to-event latency (capture of
             the anomaly's first frame -> event) and the verifier's latency, over several anomalies
  headroom   the same video read losslessly as fast as the gate goes: the gate's own fps
  soak       10,000 frames with an anomaly every 400 frames, as fast as the gate goes: resident
             memory (RSS) after the first 1,000 frames and at the end
  cameras    (--cameras N) N cameras in one process (watch_cameras), each a 30 fps camera: one busy
             (an object every 60 frames) and the others quiet (one object each), one verifier for
             all: gate fps per camera, dropped frames, and the verifier's fairness (each camera's
             events answered, skipped, and the time from event to verdict)
  survey     (--survey N) N seeds of each kind of generated video, the anomaly at frame 150: how many
             are reported within 10 frames, with no event in the normal stretch, and verified yes

    .venv/bin/python benchmarks/watch.py [--bundle DIR] [--soak-frames 10000] [--cameras 4] [--survey 30] [--json]
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import edgelmm
from edgelmm.apps.anomaly import AnomalyWatcher, Camera, CaptureConfig, WatchConfig, percentiles, watch_cameras
from edgelmm.export import export
from edgelmm.models import reference_model
from edgelmm.synthetic_video import VideoSpec, write_video


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def anomaly_latency(report, starts):
    """Per anomaly: frames from its start to the event, and ms from its first frame's capture."""
    rows = []
    for start in starts:
        hits = [e for e in report.events if e.check == 1 and start <= e.first_frame_index < start + 60]
        if hits:
            e = hits[0]
            rows.append({"start": start, "event_frame": e.frame_index, "frames_late": e.frame_index - start,
                         "detect_ms": e.latency_ms["detect"], "verdict": e.verifier.answer if e.verifier else None,
                         "event_to_verdict_ms": e.latency_ms.get("event_to_verdict")})
        else:
            rows.append({"start": start, "event_frame": None})
    return rows


def run(pipe, video, **config):
    report = AnomalyWatcher(pipe, WatchConfig(**config)).run(video)
    s = report.stats
    assert s["read"] == s["processed"] + s["dropped"], s
    return report, {k: s[k] for k in ("read", "processed", "dropped", "gated", "episodes", "events", "elapsed_s",
                                      "mean_fps", "gate_ms", "verifier_ms", "detect_ms")}


def cameras(pipe, work, n, frames=600):
    """n realtime cameras in one process: camera 1 busy, the others quiet."""
    cams = []
    for i in range(n):
        spec = (VideoSpec(seed=10 + i, frames=frames, anomaly="appear", anomaly_frame=100, anomaly_length=30,
                          repeat_every=60) if i == 0 else
                VideoSpec(seed=10 + i, frames=frames, anomaly="appear", anomaly_frame=150 + 100 * i))
        cams.append(Camera(f"cam{i + 1}" + ("-busy" if i == 0 else ""), write_video(work / f"cam{i}.avi", spec)["path"]))
    reports = watch_cameras(pipe, cams, WatchConfig(capture=CaptureConfig(realtime=True)))
    out = {}
    for name, r in reports.items():
        s = r.stats
        waits = [e.latency_ms["event_to_verdict"] for e in r.events if "event_to_verdict" in e.latency_ms]
        out[name] = {"mean_fps": s["mean_fps"], "read": s["read"], "dropped": s["dropped"],
                     "gate_ms": s["gate_ms"], "episodes": s["episodes"], "events": s["events"],
                     "verified": s["verified"], "verifier_skipped": s["verifier_skipped"],
                     "yes": sum(e.verifier.answer == "yes" for e in r.events),
                     "event_to_verdict_ms": percentiles(waits)}
    return out


def survey(pipe, work, seeds):
    """Per kind of video: reported within 10 frames, videos with an event before the anomaly (or
    any event when there is none), episodes verified yes (on any check, on the first)."""
    out = {}
    for kind in ("appear", "fall", "scene-change", "none"):
        row = {"videos": seeds, "within_10_frames": 0, "false_alarm_videos": 0, "yes": 0, "yes_first_check": 0}
        for seed in range(seeds):
            spec = VideoSpec(seed=seed, anomaly=kind)
            video = write_video(work / "survey.avi", spec)
            events = AnomalyWatcher(pipe).run(video["path"]).events
            real = [e for e in events if kind != "none" and e.first_frame_index >= spec.anomaly_frame]
            row["false_alarm_videos"] += len(real) < len(events)
            if real:
                row["within_10_frames"] += real[0].frame_index - spec.anomaly_frame < 10
                row["yes"] += any(e.verifier.answer == "yes" for e in real)
                row["yes_first_check"] += real[0].verifier.answer == "yes"
        out[kind] = row
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="default: export the reference model to a temp dir")
    ap.add_argument("--soak-frames", type=int, default=10_000)
    ap.add_argument("--cameras", type=int, default=4, help="cameras in one process (0: skip)")
    ap.add_argument("--survey", type=int, default=0, help="seeds per kind of video (0: skip the survey)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgelmm-watch-bench-"))
    bundle = args.bundle or export(reference_model(), work / "bundle", quiet=True)
    pipe = edgelmm.load(bundle, threads=1)
    results = {"backend": pipe.backend.describe()}

    # realtime: 30 fps, 600 frames (20 s), an object appears for 60 frames every 150 frames
    spec = VideoSpec(seed=1, frames=600, anomaly="appear", anomaly_frame=120, anomaly_length=60, repeat_every=150)
    video = write_video(work / "realtime.avi", spec)["path"]
    report, stats = run(pipe, video, capture=CaptureConfig(realtime=True))
    results["realtime_30fps"] = {**stats, "anomalies": anomaly_latency(report, spec.anomaly_starts())}

    # headroom: the same video, lossless, as fast as the gate goes; no verifier, the gate alone
    report, stats = run(pipe, video, verify=False)
    results["headroom"] = stats

    # soak: RSS after 1,000 frames and at the end
    soak = VideoSpec(seed=2, frames=args.soak_frames, anomaly="fall", anomaly_frame=300, anomaly_length=100,
                     repeat_every=400)
    video = write_video(work / "soak.avi", soak)["path"]
    samples = []       # (frames processed, RSS) once a second, from the live summary
    watcher = AnomalyWatcher(pipe, WatchConfig(out_dir=work / "soak-snapshots"),
                             on_summary=lambda s: samples.append((s["processed"], rss_mib())))
    before = rss_mib()
    report = watcher.run(video)
    s = report.stats
    at_1000 = next((r for n, r in samples if n >= 1000), None)
    results["soak"] = {"frames": soak.frames, "processed": s["processed"], "dropped": s["dropped"],
                       "episodes": s["episodes"], "events": s["events"], "anomalies": len(soak.anomaly_starts()),
                       "yes": sum(e.verifier.answer == "yes" for e in report.events),
                       "rss_mib_start": round(before, 1), "rss_mib_at_1000": round(at_1000, 1) if at_1000 else None,
                       "rss_mib_end": round(rss_mib(), 1), "elapsed_s": s["elapsed_s"], "mean_fps": s["mean_fps"],
                       "gate_ms": s["gate_ms"]}
    if at_1000:
        results["soak"]["rss_growth_mib_after_1000"] = round(rss_mib() - at_1000, 1)
    if args.cameras:
        results["cameras"] = cameras(pipe, work, args.cameras)
    if args.survey:
        results["survey"] = survey(pipe, work, args.survey)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    rt, hr, sk = results["realtime_30fps"], results["headroom"], results["soak"]
    late = [a["frames_late"] for a in rt["anomalies"] if a.get("event_frame") is not None]
    detect = [a["detect_ms"] for a in rt["anomalies"] if a.get("event_frame") is not None]
    print(f"backend: {results['backend']}")
    print(f"realtime 30 fps input: {rt['mean_fps']:.1f} fps processed, {rt['dropped']} of {rt['read']} dropped, "
          f"gate p50/p95 {rt['gate_ms']['p50']}/{rt['gate_ms']['p95']} ms")
    print(f"  anomalies: {len(late)}/{len(rt['anomalies'])} reported, {np.mean(late):.1f} frames after the start "
          f"(max {max(late)}), capture->event {np.median(detect):.0f} ms median (max {max(detect):.0f} ms), "
          f"verifier p50/p95 {rt['verifier_ms']['p50']}/{rt['verifier_ms']['p95']} ms, verdicts "
          f"{[a.get('verdict') for a in rt['anomalies']]}")
    print(f"headroom (gate alone, lossless): {hr['mean_fps']:.0f} fps, gate p50/p95 {hr['gate_ms']['p50']}/"
          f"{hr['gate_ms']['p95']} ms")
    print(f"soak: {sk['processed']} frames in {sk['elapsed_s']:.0f} s ({sk['mean_fps']:.0f} fps), {sk['episodes']} "
          f"episodes for {sk['anomalies']} anomalies ({sk['yes']} verified yes); "
          f"RSS {sk['rss_mib_start']} MiB at start, "
          f"{sk['rss_mib_at_1000']} after 1,000 frames, {sk['rss_mib_end']} at the end")
    for name, row in results.get("cameras", {}).items():
        w = row["event_to_verdict_ms"]
        print(f"camera {name}: {row['mean_fps']:.1f} fps, {row['dropped']}/{row['read']} dropped, gate p50 "
              f"{row['gate_ms']['p50']} ms, {row['episodes']} episodes, {row['events']} events: {row['verified']} "
              f"verified ({row['yes']} yes), {row['verifier_skipped']} skipped (verifier busy), event->verdict "
              f"p50/p95 {w['p50']}/{w['p95']} ms")
    for kind, row in results.get("survey", {}).items():
        print(f"survey {kind}: {row}")


if __name__ == "__main__":
    main()
