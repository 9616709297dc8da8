"""`edgelmm watch`: detection on generated videos with the reference model, exact frame accounting
with a slow verifier, and the faults a camera stream brings (a file that ends early, a URL that
does not answer or goes away, corrupt frames, SIGTERM)."""

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edgelmm.apps.anomaly import AnomalyWatcher, WatchConfig, parse_answer
from edgelmm.apps.capture import CaptureConfig, parse_source
from edgelmm.apps.gate import FeatureReducer, GateConfig, NormalSceneGate
from edgelmm.errors import OptionError, PromptError, SourceError
from edgelmm.synthetic_video import VideoSpec, frames, write_video

pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def pipe(reference_bundle):
    import edgelmm

    return edgelmm.load(reference_bundle, threads=1)


def _video(tmp_path, name="v.avi", **kw):
    return write_video(tmp_path / name, VideoSpec(**kw))


def _accounts_add_up(stats):
    assert stats["read"] == stats["processed"] + stats["dropped"], stats
    assert stats["queued"] == 0


# ---------------------------------------------------------------- detection with the reference model

@pytest.mark.parametrize("anomaly", ["appear", "fall"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anomaly_is_reported_within_10_frames_and_verified(pipe, tmp_path, anomaly, seed):
    at = 120 + 20 * seed   # after the 90-frame warm-up
    meta = _video(tmp_path, seed=seed, anomaly=anomaly, anomaly_frame=at, frames=at + 40)
    report = AnomalyWatcher(pipe, WatchConfig(out_dir=tmp_path / "snaps")).run(meta["path"])
    assert report.stop_reason == "end of file"
    _accounts_add_up(report.stats)
    assert report.stats["read"] == meta["frames"] and report.stats["unreadable"] == 0
    assert {e.episode for e in report.events} == {1}, "one anomaly, one episode"
    first = report.events[0]
    assert at <= first.first_frame_index and first.frame_index - at < 10, "no event in the normal stretch"
    assert first.gate_score > first.threshold
    assert [e.verifier.answer for e in report.events][-1] == "yes"
    assert first.frames[0] == f"frame {first.first_frame_index - 1}" and len(first.frames) == 4
    assert [os.path.basename(p)[:8] for p in first.snapshot] == ["1-normal", "2-latest", "3-latest", "4-latest"]
    assert all(os.path.getsize(p) > 0 for p in first.snapshot)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_normal_video_yields_no_event(pipe, tmp_path, seed):
    meta = _video(tmp_path, seed=seed, anomaly="none", frames=300)
    report = AnomalyWatcher(pipe).run(meta["path"])
    assert report.events == [] and report.stats["gated"] == 300
    assert report.gate["threshold"] >= GateConfig().min_threshold


def test_a_change_of_light_is_caught_by_the_gate(pipe, tmp_path):
    """The gate flags it; the reference model's verifier (trained on intruders) may call it normal.
    The gate sees what the vision tower sees, and this tower learned shapes on varied backgrounds, so
    only some changes of light move its features (README: the watch survey); seed 1's does, by ~10x
    the threshold."""
    meta = _video(tmp_path, seed=1, anomaly="scene-change", anomaly_frame=120, frames=150)
    events = AnomalyWatcher(pipe).run(meta["path"]).events
    assert events and 120 <= events[0].first_frame_index and events[0].frame_index - 120 < 10
    assert events[0].verifier.status == "done" and events[0].verifier.answer in ("yes", "no")


class CountingBackend:
    """The real ONNX Runtime backend, counting vision calls (each frame must be encoded once);
    `before_decode` runs in the verifier's thread before each decode step (a test holds it there)."""

    def __init__(self, backend, before_decode=None):
        self._backend = backend
        self.vision_calls = 0
        self.before_decode = before_decode
        self.name = backend.name
        self.thread_safe = True

    def encode_images(self, pixel_values, mask=None):
        self.vision_calls += pixel_values.shape[0]
        return self._backend.encode_images(pixel_values, mask)

    def decode(self, *args):
        if self.before_decode:
            self.before_decode()
        return self._backend.decode(*args)

    def __getattr__(self, attr):
        return getattr(self._backend, attr)


def _wrapped(pipe, **kw):
    from edgelmm.pipeline import Pipeline

    backend = CountingBackend(pipe.backend, **kw)
    return Pipeline(pipe.files, pipe.family, backend), backend


def _wait_for(condition, what, seconds=300):
    """Poll until condition() holds. The limit only stops a broken run: these tests wait on events
    (frames counted, a decode step entered), never on how fast this machine is."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def test_each_frame_is_encoded_once_and_references_are_used(pipe, tmp_path):
    meta = _video(tmp_path, seed=1, anomaly="appear", anomaly_frame=40, frames=60)
    refs = list(frames(VideoSpec(seed=1, anomaly="none", frames=4)))
    counted, backend = _wrapped(pipe)
    config = WatchConfig(gate=GateConfig(warmup_frames=0))
    report = AnomalyWatcher(counted, config, references=refs).run(meta["path"])
    assert backend.vision_calls == 60 + len(refs), "the verifier re-encoded frames"
    assert report.gate["reference_frames"] == len(refs)
    assert report.events and report.events[0].first_frame_index >= 40
    assert report.events[-1].verifier.answer == "yes"


def test_a_gate_behind_the_camera_drops_frames_and_counts_each(pipe, tmp_path):
    """A file replayed as a camera (lossy queue of 2) while the gate is held at the first frame it
    gets from 30 on until the capture thread has dropped 100 more frames: every frame read is either
    processed or counted as dropped, and the gate goes on with the newest frames. Driven by counts,
    so load cannot change it (on a busy machine the gate also falls behind before the hold: drops
    start earlier, and frame 30 itself may be one of them)."""
    meta = _video(tmp_path, seed=2, anomaly="none", frames=400, fps=300)
    watcher = AnomalyWatcher(pipe, WatchConfig(capture=CaptureConfig(realtime=True, queue_size=2), verify=False))
    gate, gated, held = watcher._gate, [], []

    def held_gate(frame, verifier):
        if not held and frame.index >= 30:
            held.append(frame.index)
            before = watcher.live_stats()["dropped"]
            _wait_for(lambda: watcher.live_stats()["dropped"] >= before + 100, "100 more dropped frames")
        gate(frame, verifier)
        gated.append(frame.index)
    watcher._gate = held_gate
    report = watcher.run(meta["path"])
    s = report.stats
    _accounts_add_up(s)
    assert s["read"] == 400 and s["dropped"] >= 100 and s["processed"] == s["gated"] == len(gated)
    after = gated[gated.index(held[0]) + 1]
    assert gated == sorted(gated) and after - held[0] > 100, "frames after the hold were not dropped"
    assert watcher.live_stats() is None, "the counters of a finished run are in its report"


def test_the_gate_keeps_going_while_the_verifier_answers(pipe, tmp_path):
    """The verifier's first decode step is held until the gate has processed 60 more frames: if the
    gate waited for the verifier, that never happens and the test says so (no time is measured)."""
    meta = _video(tmp_path, seed=2, anomaly="appear", anomaly_frame=300, frames=600)
    watcher = None
    held = {}

    def hold_first_step():
        if not held:
            held["entered"] = watcher.stats.gated
            _wait_for(lambda: watcher.stats.gated >= held["entered"] + 60, "60 frames gated during an answer")
            held["released"] = watcher.stats.gated
    slow, _ = _wrapped(pipe, before_decode=hold_first_step)
    watcher = AnomalyWatcher(slow, WatchConfig(max_new_tokens=8))
    report = watcher.run(meta["path"])
    _accounts_add_up(report.stats)
    assert report.stats["read"] == report.stats["gated"] == 600 and report.stats["dropped"] == 0
    first = report.events[0]
    assert 300 <= first.first_frame_index and first.verifier.status == "done"
    assert held["released"] - held["entered"] >= 60
    assert first.frame_index < held["entered"], "the answer is about a frame the gate had already passed"


# ---------------------------------------------------------------- faults

def test_a_file_that_ends_mid_run_finishes_cleanly(pipe, tmp_path):
    meta = _video(tmp_path, seed=0, anomaly="none", frames=80)
    data = open(meta["path"], "rb").read()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: len(data) // 2])
    events = tmp_path / "events.jsonl"
    report = AnomalyWatcher(pipe, events=events).run(truncated)
    assert report.stop_reason.startswith("file ended early, at frame ") and report.stop_reason.endswith("of 80")
    assert 20 < report.stats["read"] < 80
    _accounts_add_up(report.stats)
    last = json.loads(events.read_text().splitlines()[-1])
    assert last["type"] == "summary" and last["read"] == report.stats["read"]


def test_corrupt_frames_are_counted_and_skipped(pipe, tmp_path):
    meta = _video(tmp_path, seed=0, anomaly="none", frames=60)
    data = bytearray(open(meta["path"], "rb").read())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]   # JPEG frame starts
    assert len(starts) == 60
    rng = np.random.default_rng(0)
    for k in (10, 11, 40):
        data[starts[k]:starts[k] + 300] = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    bad = tmp_path / "corrupt.avi"
    bad.write_bytes(bytes(data))
    report = AnomalyWatcher(pipe).run(bad)
    assert report.stop_reason == "end of file"
    assert report.stats["unreadable"] == 3 and report.stats["read"] == 57
    _accounts_add_up(report.stats)


def test_sources_are_parsed_and_bad_ones_are_typed_errors(pipe, tmp_path):
    assert parse_source("0").kind == "camera" and parse_source(2).kind == "camera"
    assert parse_source("rtsp://10.0.0.2/stream").live
    assert parse_source("videotestsrc ! videoconvert ! appsink").kind == "gstreamer"
    with pytest.raises(SourceError, match="missing.avi: no such video file"):
        parse_source(tmp_path / "missing.avi")
    not_video = tmp_path / "notes.avi"
    not_video.write_text("not a video")
    with pytest.raises(SourceError, match="notes.avi: OpenCV cannot open it"):
        AnomalyWatcher(pipe).run(not_video)
    config = WatchConfig(capture=CaptureConfig(reconnect_attempts=2, reconnect_backoff_s=0.01))
    said = []
    with pytest.raises(SourceError, match=r"http://127\.0\.0\.1:9/cam\.mjpg: no frames after 3 attempt\(s\) to open"):
        AnomalyWatcher(pipe, config, on_status=said.append).run("http://127.0.0.1:9/cam.mjpg")
    assert [m for m in said if m.startswith("opening")] == [
        f"opening url http://127.0.0.1:9/cam.mjpg (attempt {n} of 3)" for n in (1, 2, 3)], said
    assert "url http://127.0.0.1:9/cam.mjpg gave no frames; attempt 3 of 3 in 0.02 s" in said
    with pytest.raises(PromptError, match="2 <image> markers but asks about 4 images"):
        WatchConfig(prompt="<image><image>Anything odd?").validate()


@pytest.fixture
def flaky_http_camera(tmp_path):
    """An HTTP server that serves a video twice, then answers 404: a camera that goes away."""
    meta = _video(tmp_path / "srv", "cam.avi", seed=0, anomaly="none", frames=40)
    served = {"n": 0}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            served["n"] += 1
            if served["n"] > 2:
                return self.send_error(404)
            return super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=tmp_path / "srv"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cam.avi", meta, served
    server.shutdown()


def test_a_live_source_that_goes_away_reconnects_then_stops(pipe, flaky_http_camera):
    url, meta, served = flaky_http_camera
    config = WatchConfig(capture=CaptureConfig(reconnect_attempts=2, reconnect_backoff_s=0.01, max_failed_reads=2))
    report = AnomalyWatcher(pipe, config).run(url)
    assert report.source_lost and "no frames after 3 attempt(s) to reopen" in report.stop_reason
    assert report.stats["read"] == 2 * meta["frames"], "the second connection was read too"
    assert report.stats["reconnects"] >= 1 and served["n"] == 2 + 3
    _accounts_add_up(report.stats)


def test_sigterm_mid_run_leaves_a_complete_events_file(reference_bundle, tmp_path):
    # 10 fps: the file lasts 90 s in real time, so even a busy machine answers the event before it ends.
    meta = _video(tmp_path, seed=1, anomaly="appear", anomaly_frame=120, frames=900, fps=10)
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "edgelmm", "watch", meta["path"], "--bundle", str(reference_bundle),
                             "--events", str(events), "--realtime", "--quiet", "--threads", "1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (events.exists() and events.read_text().count("\n") >= 1):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 0, errs
    lines = [json.loads(line) for line in events.read_text().splitlines()]   # every line whole JSON
    assert lines[0]["type"] == "anomaly" and lines[0]["verifier"]["status"] == "done"
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["stop_reason"] == "signal SIGTERM"
    assert summary["read"] == summary["processed"] + summary["dropped"] < 900
    assert json.loads(out)["stop_reason"] == "signal SIGTERM"


# ---------------------------------------------------------------- the gate and the answer parser

def test_gate_hysteresis_on_real_numbers():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 16, 32)).astype(np.float32)
    gate = NormalSceneGate(GateConfig(warmup_frames=10, trigger_frames=3, clear_frames=4))

    def frame(change=0.0):
        f = base + 0.01 * rng.standard_normal(base.shape).astype(np.float32)
        f[0, 5] += change * rng.standard_normal(32).astype(np.float32)   # one cell changes
        return f
    decisions = [gate.observe(frame()) for _ in range(10)]
    assert all(d.score is None for d in decisions) and gate.threshold >= 0.01
    assert not gate.observe(frame(3.0)).started          # one noisy frame does not fire
    assert not any(gate.observe(frame()).over for _ in range(5))
    fired = [gate.observe(frame(3.0)) for _ in range(4)]
    assert [d.started for d in fired] == [False, False, True, False] and fired[-1].in_episode
    cleared = [gate.observe(frame()) for _ in range(4)]
    assert [d.in_episode for d in cleared] == [True, True, True, False]
    assert gate.observe(frame()).normal


def test_feature_reducer_pools_and_projects():
    reduce = FeatureReducer(max_positions=64, max_dims=256)
    assert reduce(np.ones((1, 576, 1024), np.float32)).shape == (64, 256)       # a 24x24 grid -> 8x8
    assert reduce(np.ones((5, 81, 64), np.float32)).shape == (5 * 9, 64)        # 5 tiles of 9x9 -> 3x3 each
    assert reduce(np.ones((1, 100, 8), np.float32)).shape == (64, 8)
    cells = reduce(np.random.default_rng(0).standard_normal((1, 16, 300)).astype(np.float32))
    assert np.allclose(np.linalg.norm(cells, axis=-1), 1.0, atol=1e-5)


def test_parse_answer():
    assert parse_answer("yes, a red circle appeared") == ("yes", "a red circle appeared")
    assert parse_answer("No.") == ("no", "")
    assert parse_answer("  Nothing unusual") == ("no", "unusual")
    assert parse_answer("maybe") == ("unclear", "maybe")
    assert parse_answer("") == ("unclear", "")


def test_demo_video_cli(tmp_path):
    from typer.testing import CliRunner

    from edgelmm.cli import app

    r = CliRunner().invoke(app, ["demo-video", str(tmp_path / "d.avi"), "--anomaly", "fall", "--at", "20",
                                 "--frames", "30", "--json"])
    assert r.exit_code == 0, r.output
    meta = json.loads(r.output)
    assert meta["anomaly_frame"] == 20 and meta["width"] == 128 and os.path.getsize(meta["path"]) > 0
    r = CliRunner().invoke(app, ["demo-video", str(tmp_path / "e.avi"), "--anomaly", "explode"])
    assert r.exit_code == 2 and "anomaly must be one of" in r.output


def test_a_tiling_family_watches_and_rejects_references_of_another_size(bundle, tmp_path):
    """Idefics3 splits a frame into tiles: the gate's cells span every tile; a reference image that
    tiles differently from the camera's frames is a typed error naming the frame."""
    import edgelmm
    from edgelmm.errors import ImageError

    pipe = edgelmm.load(bundle("idefics3"), threads=1)
    meta = _video(tmp_path, seed=0, anomaly="appear", anomaly_frame=40, frames=60)
    tiles = pipe.family.preprocess([next(frames(VideoSpec(seed=0)))]).pixel_values.shape[0]
    assert tiles > 1
    report = AnomalyWatcher(pipe, WatchConfig(max_new_tokens=4)).run(meta["path"])
    _accounts_add_up(report.stats)
    assert report.stats["gated"] == 60 and report.stop_reason == "end of file"
    assert all(e.verifier.status == "done" for e in report.events)    # a random tiny model: any answer
    wide = np.zeros((16, 64, 3), np.uint8)
    assert pipe.family.preprocess([wide]).pixel_values.shape[0] != tiles
    with pytest.raises(ImageError, match="'frame 0': a frame has .* feature cells"):
        AnomalyWatcher(pipe, WatchConfig(gate=GateConfig(warmup_frames=0)), references=[wide]).run(meta["path"])


def test_max_frames_duration_and_cli_errors(pipe, reference_bundle, tmp_path):
    from typer.testing import CliRunner

    from edgelmm.cli import app

    meta = _video(tmp_path, seed=0, anomaly="none", frames=300)
    report = AnomalyWatcher(pipe, WatchConfig(max_frames=50)).run(meta["path"])
    assert report.stop_reason == "max frames (50)" and report.stats["processed"] == 50
    _accounts_add_up(report.stats)
    report = AnomalyWatcher(pipe, WatchConfig(duration_s=0.5, capture=CaptureConfig(realtime=True))).run(meta["path"])
    # A file replayed as a camera is never read faster than its 30 fps (slower on a busy machine): of
    # its 300 frames, about 15 in 0.5 s (the capture starts a moment before the clock, hence the slack).
    assert report.stop_reason == "duration (0.5 s)"
    assert report.stats["read"] <= 30 * (report.stats["elapsed_s"] + 0.5) + 1
    _accounts_add_up(report.stats)
    r = CliRunner().invoke(app, ["watch", "http://127.0.0.1:9/cam.mjpg", "--bundle", str(reference_bundle),
                                 "--reconnect-attempts", "0", "--json"])
    assert r.exit_code == 2 and json.loads(r.output)["error"] == "SourceError"
    r = CliRunner().invoke(app, ["watch", meta["path"], "--bundle", str(reference_bundle), "--every", "0", "--json"])
    assert r.exit_code == 2 and json.loads(r.output)["error"] == "OptionError" and "must be >= 1" in r.output
    with pytest.raises(OptionError, match="anomaly_frame must be within 1..29, got 30"):
        VideoSpec(frames=30, anomaly_frame=30).validate()
