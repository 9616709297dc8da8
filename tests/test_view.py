"""Several cameras in one process (`watch_cameras`, `edgelmm watch --config`) and the live view
(`--view`): each camera's events come from its own anomaly only, the shared verifier takes the
cameras in turn, the view's stream carries frames and events while the run goes on, and the page,
loaded in a real headless Chromium, draws the frame, the heat-map cell over the object and one event
row per event with its verdict."""

import http.client
import io
import json
import threading
import time
import types
import urllib.request

import numpy as np
import pytest

from edgelmm.apps.anomaly import Camera, Verifier, VerifyJob, WatchConfig, watch_cameras
from edgelmm.apps.capture import CaptureConfig
from edgelmm.apps.view import LiveView, parse_view_address
from edgelmm.errors import OptionError
from edgelmm.synthetic_video import VideoSpec, write_video
from tests.browser import CHROMIUM, Browser

pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def pipe(reference_bundle):
    import edgelmm

    return edgelmm.load(reference_bundle, threads=1)


def _get(view, path, method="GET"):
    c = http.client.HTTPConnection(view.host, view.port, timeout=30)
    c.request(method, path)
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, r.getheader("Content-Type"), body


def _cameras(tmp_path, realtime=False, frames=200):
    """Two generated videos, each with one object appearing at its own frame."""
    specs = {"dock": VideoSpec(seed=0, anomaly="appear", anomaly_frame=120, frames=frames),
             "gate": VideoSpec(seed=2, anomaly="appear", anomaly_frame=165, frames=frames)}
    metas = {name: write_video(tmp_path / f"{name}.avi", spec) for name, spec in specs.items()}
    config = WatchConfig(capture=CaptureConfig(realtime=realtime))
    return [Camera(name, meta["path"]) for name, meta in metas.items()], metas, config


# ---------------------------------------------------------------- the shared verifier

def test_the_verifier_takes_the_cameras_in_turn():
    """A camera with a full lane cannot starve another: take() goes round the lanes."""
    verifier = Verifier()   # not started: the test is its worker
    busy, quiet, third = (types.SimpleNamespace(config=WatchConfig(verifier_queue=q)) for q in (4, 4, 1))
    for w in (busy, quiet, third):
        verifier.open_lane(w)

    def job(watcher, n):
        return VerifyJob(types.SimpleNamespace(n=n), None, [], 0.0, watcher)
    assert all(verifier.submit(job(busy, f"b{i}")) for i in range(4))
    assert not verifier.submit(job(busy, "b4")), "the busy camera's lane holds 4"
    assert verifier.submit(job(quiet, "q0")) and verifier.submit(job(third, "t0"))
    assert not verifier.submit(job(third, "t1")), "each camera has its own bound"
    order = [verifier.take().event.n for _ in range(4)]
    assert order == ["b0", "q0", "t0", "b1"]
    assert verifier.submit(job(quiet, "q1"))   # a camera that speaks up again gets the next turn after busy's
    order = [verifier.take().event.n for _ in range(3)]
    assert order == ["q1", "b2", "b3"]


# ---------------------------------------------------------------- two cameras, one process

def test_two_cameras_each_report_their_own_anomaly_and_the_stream_is_live(pipe, tmp_path):
    cameras, metas, config = _cameras(tmp_path, realtime=True, frames=240)
    view = LiveView(":0").start()
    assert view.host == "127.0.0.1", "the view binds to this machine unless told otherwise"
    messages, lines = [], []
    reports = {}
    run = threading.Thread(target=lambda: reports.update(
        watch_cameras(pipe, cameras, config, events=tmp_path / "events.jsonl", view=view)))
    run.start()
    try:
        # The stream, read while the cameras run: frames with the gate's numbers, then the events.
        conn = http.client.HTTPConnection(view.host, view.port, timeout=60)
        conn.request("GET", "/stream")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        kind = None
        while sum(m[0] == "anomaly" for m in messages) < 2 or run.is_alive() and len(messages) < 60:
            line = response.fp.readline().decode()
            assert line, "the stream ended while the run was going on"
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                messages.append((kind, json.loads(line[6:]), run.is_alive()))
            lines.append(line)
        conn.close()
    finally:
        run.join(300)
        state = json.loads(_get(view, "/api/state")[2])
        view.close()
    assert not run.is_alive()
    for name, meta in metas.items():
        report = reports[name]
        at = meta["anomaly_frame"]
        assert report.stop_reason == "end of file" and report.camera == name
        assert report.events and {e.camera for e in report.events} == {name}
        first = report.events[0]
        assert at <= first.first_frame_index and first.frame_index - at < 10, (name, first.frame_index, at)
        assert all(e.frame_index >= at for e in report.events), "no event from the other camera's anomaly"
        assert first.verifier.answer == "yes"
        frames_seen = [d["index"] for k, d, _ in messages if k == "frame" and d["camera"] == name]
        assert frames_seen == sorted(frames_seen) and len(set(frames_seen)) == len(frames_seen)
        live = [d for k, d, alive in messages if k == "anomaly" and d["camera"] == name and alive]
        assert live and live[0]["verifier"]["answer"] == "yes", "the event reached the stream during the run"
        cam = next(c for c in state["cameras"] if c["name"] == name)
        assert [e["frame_index"] for e in cam["events"]] == [e.frame_index for e in report.events]
        assert cam["running"] is False and cam["summary"]["stop_reason"] == "end of file"
        over = [d for k, d, _ in messages if k == "frame" and d["camera"] == name and d["cells"]]
        assert over and len(over[-1]["cells"]) == over[-1]["layout"]["rows"] * over[-1]["layout"]["cols"]
    # One events file for both: each camera's records carry its name, and each has its own summary.
    records = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sorted(r["camera"] for r in records if r["type"] == "summary") == ["dock", "gate"]
    for name in metas:
        assert len([r for r in records if r["type"] == "anomaly" and r["camera"] == name]) == len(reports[name].events)


def test_a_camera_that_cannot_open_does_not_stop_the_others(pipe, tmp_path):
    cameras, metas, config = _cameras(tmp_path, frames=180)
    cameras[1] = Camera("gate", str(tmp_path / "missing.avi"))
    reports = watch_cameras(pipe, cameras, config)
    assert reports["dock"].stop_reason == "end of file" and reports["dock"].events
    assert reports["gate"].source_lost and "missing.avi" in reports["gate"].stop_reason
    with pytest.raises(OptionError, match="distinct names"):
        watch_cameras(pipe, [Camera("a", "x.avi"), Camera("a", "y.avi")])


# ---------------------------------------------------------------- the view's server

def test_view_address_paths_and_methods(tmp_path):
    assert parse_view_address(":8080") == ("127.0.0.1", 8080)
    assert parse_view_address("0.0.0.0:9000") == ("0.0.0.0", 9000)
    for bad in ("8080", "host:", ":99999", ":http", ""):
        with pytest.raises(OptionError, match="--view"):
            parse_view_address(bad)
    view = LiveView(":0").start()
    try:
        with pytest.raises(OptionError, match="cannot listen"):
            LiveView(f":{view.port}").start()
        status, kind, page = _get(view, "/")
        assert status == 200 and kind.startswith("text/html")
        assert b"src=\"http" not in page and b"<link" not in page and b"@import" not in page, "no external assets"
        part = view.camera("dock")
        with pytest.raises(OptionError, match="already has"):
            view.camera("dock")
        with pytest.raises(OptionError, match="camera name"):
            view.camera("a/b")
        for path in ("/../../etc/passwd", "/frame/dock.jpg", "/frame/../x.jpg", "/thumb/dock/0.jpg",
                     "/thumb/dock/-1.jpg", "/thumb/nope/0.jpg", "/api", "/static/x.js"):
            assert _get(view, path)[0] == 404, path
        assert _get(view, "/api/state", "POST")[0] == 405
        # A frame over the threshold, then the event that names it: its thumbnail is served.
        image = np.zeros((48, 64, 3), np.uint8)
        image[:, 32:] = 200
        decision = types.SimpleNamespace(over=True, score=0.5, threshold=0.1, in_episode=True,
                                         cells=np.array([0.05, 0.5, 0.05, 0.2]), layout={"tiles": 1, "rows": 2, "cols": 2})
        part.frame(types.SimpleNamespace(frame=types.SimpleNamespace(index=7, image=image)), decision)
        part.event({"frame_index": 7, "episode": 1, "check": 1, "gate_score": 0.5, "threshold": 0.1,
                    "verifier": {"status": "done", "answer": "yes", "text": "<script>alert(1)</script>"}})
        status, kind, body = _get(view, "/frame/dock.jpg")
        from PIL import Image

        assert status == 200 and kind == "image/jpeg" and Image.open(io.BytesIO(body)).size == (64, 48)
        assert _get(view, "/thumb/dock/0.jpg")[0] == 200
        state = json.loads(_get(view, "/api/state")[2])
        assert state["cameras"][0]["events"][0]["cells"] == [0.05, 0.5, 0.05, 0.2]
        assert state["cameras"][0]["latest"]["index"] == 7
    finally:
        view.close()


def test_the_view_keeps_a_bounded_event_list():
    view = LiveView(":0", max_events=3)
    part = view.camera("cam")
    for i in range(5):
        part.event({"frame_index": i, "gate_score": 1.0, "threshold": 0.1})
    state = view.state()["cameras"][0]
    assert [e["frame_index"] for e in state["events"]] == [2, 3, 4] and state["events_total"] == 5


# ---------------------------------------------------------------- the page in a real browser

def _tint(shot, raw, box):
    """Mean (red gain - green gain) of the screenshot over the raw frame inside box: the heat-map's red."""
    x0, y0, x1, y1 = box
    s = shot[y0:y1, x0:x1].astype(np.float64)
    r = raw[y0:y1, x0:x1].astype(np.float64)
    return float(((s[..., 0] - r[..., 0]) - (s[..., 1] - r[..., 1])).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (the live view's browser test)")
def test_the_page_in_headless_chromium_shows_frames_heat_map_and_events(pipe, tmp_path):
    from PIL import Image

    cameras, metas, config = _cameras(tmp_path, realtime=True, frames=280)
    view = LiveView(":0").start()
    reports = {}
    run = threading.Thread(target=lambda: reports.update(watch_cameras(pipe, cameras, config, view=view)))
    try:
        with Browser(1100, 1300) as browser:
            browser.open(view.url)     # before the cameras start: the page must follow them live
            browser.wait_for("document.getElementById('status').textContent === 'live'")
            run.start()
            rows = "n => document.querySelectorAll(`section[data-camera='${n}'] tr.event`).length"
            browser.wait_for(f"({rows})('dock') >= 1 && ({rows})('gate') >= 1", timeout=120)
            assert run.is_alive(), "the rows came over the stream while the cameras were running"
            run.join(300)
            for name in metas:
                expected = len(reports[name].events)
                browser.wait_for(f"({rows})('{name}') === {expected} && document.querySelector("
                                 f"`section[data-camera='{name}'] .state`).textContent.startsWith('ended')")
            time.sleep(0.5)   # the last frame drawn
            png = browser.screenshot(tmp_path / "view.png")
            layout = browser.evaluate("""JSON.stringify([...document.querySelectorAll('section.camera')].map(s => {
                const r = s.querySelector('canvas.frame').getBoundingClientRect();
                return {name: s.dataset.camera, x: r.x, y: r.y, w: r.width, h: r.height,
                        verdicts: [...s.querySelectorAll('tr.event .verdict')].map(v => v.textContent)};
            }))""")
        shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        for cam in json.loads(layout):
            name, report = cam["name"], reports[cam["name"]]
            # one row per event, newest first, each with the verifier's answer
            assert cam["verdicts"] == [e.verifier.answer for e in reversed(report.events)]
            # the frame: the screenshot's canvas against the served JPEG, cell by cell
            x, y, w, h = (round(cam[k]) for k in ("x", "y", "w", "h"))
            raw_jpeg = urllib.request.urlopen(view.url + f"frame/{name}.jpg").read()
            raw = np.asarray(Image.open(io.BytesIO(raw_jpeg)).convert("RGB").resize((w, h), Image.BILINEAR))
            region = shot[y:y + h, x:x + w]
            latest = next(c for c in view.state()["cameras"] if c["name"] == name)["latest"]
            rows_, cols = latest["layout"]["rows"], latest["layout"]["cols"]
            tints = np.array([[_tint(region, raw, (j * w // cols, i * h // rows_, (j + 1) * w // cols,
                                                   (i + 1) * h // rows_)) for j in range(cols)] for i in range(rows_)])
            i, j = np.unravel_index(tints.argmax(), tints.shape)
            # the reddest cell lies on the object that appeared (its box in frame pixels, scaled to the canvas)
            meta = metas[name]
            bx0, by0, bx1, by1 = meta["anomaly_box"]
            sx, sy = w / meta["width"], h / meta["height"]
            assert (bx0 * sx < (j + 1) * w / cols and bx1 * sx > j * w / cols
                    and by0 * sy < (i + 1) * h / rows_ and by1 * sy > i * h / rows_), (name, (i, j), tints.round(1))
            assert tints[i, j] > 40 and tints[i, j] > 3 * np.median(np.abs(tints)) + 5, tints.round(1)
            # and the rest of the frame is the frame (not a blank or stale canvas)
            assert np.abs(region.astype(int) - raw.astype(int)).mean() < 60
    finally:
        if run.is_alive():
            run.join(300)
        view.close()


# ---------------------------------------------------------------- the command line

def test_watch_cli_config_errors_name_the_file_and_the_camera(tmp_path):
    from tests.test_bad_options import cli_json_error

    def error(text, *extra):
        path = tmp_path / "cameras.yaml"
        path.write_text(text)
        err = cli_json_error("watch", "--config", path, "--bundle", tmp_path / "no-bundle", *extra)
        assert err["error"] == "OptionError", err
        return err["message"]
    good = "cameras:\n  - {name: dock, source: dock.avi}\n"
    for text, words in [
            ("cameras: [", "not valid YAML at line 1"),
            ("- a\n- b\n", "want one key, 'cameras'"),
            ("cameras: []\n", "at least one camera"),
            ("cameras:\n  - {name: dock}\n", "camera 1 ('dock'): 'source' is missing"),
            ("cameras:\n  - {name: dock, source: a.avi}\n  - {name: dock, source: b.avi}\n", "['dock'] appear more"),
            ("cameras:\n  - {name: a/b, source: a.avi}\n", "camera 1 ('a/b'): camera name"),
            ("cameras:\n  - {name: dock, source: a.avi, every: 0}\n", "camera 1 ('dock'): every must be >= 1"),
            ("cameras:\n  - {name: dock, source: a.avi, threshold: yes}\n", "'threshold' must be int or float"),
            ("cameras:\n  - {name: dock, source: a.avi, fps: 3}\n", "unknown key(s) ['fps']"),
            ("cameras:\n  - {name: dock, source: [1]}\n", "'source' must be"),
            ("cameras:\n  - 7\n", "camera 1: want a mapping")]:
        message = error(text)
        assert "cameras.yaml" in message and words in message, (text, message)
    assert "not both" in error(good, "extra-source.avi")
    assert "each camera lists its own 'references'" in error(good, "--reference", "x.jpg")
    assert "--view" in error(good, "--view", "8080")
    (tmp_path / "big.yaml").write_bytes(b"#" * (2 << 20))
    err = cli_json_error("watch", "--config", tmp_path / "big.yaml", "--bundle", tmp_path / "b")
    assert "larger than 1 MiB" in err["message"]
    err = cli_json_error("watch", "--bundle", tmp_path / "b")
    assert "give what to watch" in err["message"]


def test_camera_config_resolves_paths_and_settings(tmp_path):
    from edgelmm.apps.cameras import load_cameras

    (tmp_path / "site").mkdir()
    path = tmp_path / "site" / "cameras.yaml"
    path.write_text("cameras:\n"
                    "  - {name: dock, source: videos/dock.avi, references: [normal.jpg], every: 2, warmup: 0,\n"
                    "     threshold: 0.2, realtime: true}\n"
                    "  - {name: gate, source: 'rtsp://10.0.0.7/s1'}\n"
                    "  - {name: csi, source: 'nvarguscamerasrc ! appsink'}\n"
                    "  - {name: usb, source: 0}\n")
    dock, gate, csi, usb = load_cameras(path, WatchConfig(max_new_tokens=10))
    assert dock.source == str(tmp_path / "site" / "videos" / "dock.avi")
    assert dock.references == [str(tmp_path / "site" / "normal.jpg")]
    assert (dock.config.every, dock.config.gate.warmup_frames, dock.config.gate.threshold,
            dock.config.capture.realtime, dock.config.max_new_tokens) == (2, 0, 0.2, True, 10)
    assert gate.source == "rtsp://10.0.0.7/s1" and csi.source == "nvarguscamerasrc ! appsink" and usb.source == 0
    assert gate.config is None, "a camera without its own settings takes the command line's"


def test_watch_cli_two_cameras_with_the_view(reference_bundle, tmp_path):
    from tests.test_bad_options import cli

    _cameras(tmp_path, frames=180)
    (tmp_path / "cameras.yaml").write_text("cameras:\n  - {name: dock, source: dock.avi}\n"
                                           "  - {name: gate, source: gate.avi}\n")
    code, out = cli("watch", "--config", tmp_path / "cameras.yaml", "--bundle", reference_bundle, "--view", ":0",
                    "--events", tmp_path / "e.jsonl", "--threads", "1", "--quiet", "--json")
    assert code == 0, out
    summaries = json.loads(out)["cameras"]
    assert [s["camera"] for s in summaries] == ["dock", "gate"]
    for s in summaries:
        assert s["stop_reason"] == "end of file" and s["events"] >= 1
        assert s["sinks"][-1]["sink"] == "view" and s["sinks"][-1]["events"] == s["events"]


def test_sigterm_stops_every_camera_of_a_config_run(reference_bundle, tmp_path):
    import signal
    import subprocess
    import sys

    for name, seed in (("dock", 0), ("gate", 2)):   # 10 fps, 90 s long in real time: the signal comes first
        write_video(tmp_path / f"{name}.avi", VideoSpec(seed=seed, anomaly="appear", anomaly_frame=120, frames=900,
                                                        fps=10))
    (tmp_path / "cameras.yaml").write_text("cameras:\n  - {name: dock, source: dock.avi}\n"
                                           "  - {name: gate, source: gate.avi}\n")
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "edgelmm", "watch", "--config", str(tmp_path / "cameras.yaml"),
                             "--bundle", str(reference_bundle), "--events", str(events), "--realtime", "--quiet",
                             "--threads", "1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (events.exists() and events.read_text().count("\n") >= 2):
        time.sleep(0.1)   # both cameras' first events (frame 120, 12 s in)
    proc.send_signal(signal.SIGTERM)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 0, errs
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    summaries = {r["camera"]: r for r in lines if r["type"] == "summary"}
    assert set(summaries) == {"dock", "gate"}
    for s in summaries.values():
        assert s["stop_reason"] == "signal SIGTERM" and s["read"] == s["processed"] + s["dropped"] < 900
    assert {r["camera"] for r in lines if r["type"] == "anomaly"} == {"dock", "gate"}
    assert [s["stop_reason"] for s in json.loads(out)["cameras"]] == ["signal SIGTERM"] * 2


def test_idle_connections_cannot_hold_the_view():
    """Idle sockets (a slowloris, a stuck browser) are dropped after the idle timeout, connections
    beyond the cap are closed at once, and the view answers again: one thread per connection, bounded."""
    import socket

    view = LiveView(":0", max_connections=8, idle_timeout_s=0.5).start()
    try:
        idle = [socket.create_connection((view.host, view.port)) for _ in range(20)]
        time.sleep(0.2)
        assert threading.active_count() < 8 + 10, "no thread per connection beyond the cap"
        time.sleep(1.0)   # past the idle timeout: their slots are free again
        status, _, body = _get(view, "/api/state")
        assert status == 200 and json.loads(body)["cameras"] == []
        for s in idle:
            s.close()
    finally:
        view.close()


def test_the_turn_survives_a_camera_leaving():
    verifier = Verifier()
    a, b, c = (types.SimpleNamespace(config=WatchConfig(verifier_queue=4)) for _ in range(3))
    for w in (a, b, c):
        verifier.open_lane(w)

    def job(watcher, n):
        return VerifyJob(types.SimpleNamespace(n=n), None, [], 0.0, watcher)
    for w, name in ((a, "a"), (b, "b"), (c, "c")):
        verifier.submit(job(w, f"{name}0"))
        verifier.submit(job(w, f"{name}1"))
    assert [verifier.take().event.n for _ in range(2)] == ["a0", "b0"]   # c's turn next
    verifier._busy = None
    verifier._lanes[id(a)].clear()
    verifier.finish_lane(a)                                             # a leaves
    assert [verifier.take().event.n for _ in range(3)] == ["c0", "b1", "c1"]
