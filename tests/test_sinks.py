"""`edgelmm watch`'s event sinks against a real Mosquitto broker on a loopback port (Debian's
`mosquitto`; the tests skip with the reason where it is not installed) and a real HTTP endpoint:
every event arrives once, in order, with the JSON-lines file's content; the status topic says
online, then offline (also through the last will after a kill); a broker that goes away for 5
seconds loses nothing within the buffer, and the drop counter is exact beyond it."""

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from edgelmm.apps.sinks import MqttSink, WebhookSink, parse_mqtt_url
from edgelmm.errors import OptionError
from edgelmm.synthetic_video import VideoSpec, write_video

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is in the watch extra")
pytest.importorskip("cv2")
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
needs_broker = pytest.mark.skipif(MOSQUITTO is None, reason="Debian's mosquitto is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A Mosquitto on a loopback port that can be stopped and started again on the same port, its
    sessions kept on disk across the restart (as a real deployment's would be)."""

    def __init__(self, folder):
        self.port = free_port()
        self.folder = folder
        (folder / "mosquitto.conf").write_text(
            # `user`: started as root, mosquitto would drop to a user that cannot write its sessions here
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\nuser {getpass.getuser()}\n"
            f"persistence_location {folder}/\nautosave_interval 1\n")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.folder / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)

    @property
    def url(self):
        return f"mqtt://127.0.0.1:{self.port}/site"


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    b.start()
    yield b
    if b.proc.poll() is None:
        b.stop()


class Subscriber:
    """Everything published under site/#, in arrival order, over a persistent QoS 1 session."""

    def __init__(self, port, name="watcher-test"):
        self.messages = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=False)
        c.on_connect = lambda client, *a: client.subscribe("site/#", qos=1)
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(0.2, 1)
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert self.subscribed.wait(10)
        self.client = c

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload.decode(), msg.retain))

    def on(self, topic):
        with self.lock:
            return [(p, r) for t, p, r in self.messages if t == topic]

    def wait_for(self, topic, predicate, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.on(topic)):
                return self.on(topic)
            time.sleep(0.02)
        raise AssertionError(f"{topic}: {self.on(topic)[-5:]}")

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_url_and_names_are_checked():
    assert parse_mqtt_url("mqtt://broker.local/plant/line1") == ("broker.local", 1883, False, "plant/line1")
    assert parse_mqtt_url("mqtts://b:8884") == ("b", 8884, True, "edgelmm")
    for bad, words in [("http://b/x", "mqtt://host"), ("mqtt://u:p@b/x", "EDGELMM_MQTT_USERNAME"),
                       ("mqtt://b:99999/x", "port"), ("mqtt://b/a/+/c", "may not contain")]:
        with pytest.raises(OptionError, match=words):
            parse_mqtt_url(bad)
    with pytest.raises(OptionError, match="camera name"):
        MqttSink("mqtt://127.0.0.1:1/x", camera="a/b")


@needs_broker
def test_a_two_camera_run_arrives_once_in_order_as_in_the_events_file(broker, reference_bundle, tmp_path):
    """`edgelmm watch --config cameras.yaml --mqtt`: two cameras in one process, one topic each."""
    from tests.test_bad_options import cli

    sub = Subscriber(broker.port)
    for camera, seed, at in (("cam1", 0, 120), ("cam2", 1, 150)):
        write_video(tmp_path / f"{camera}.avi", VideoSpec(seed=seed, anomaly="appear", anomaly_frame=at, frames=200))
    (tmp_path / "cameras.yaml").write_text("cameras:\n  - {name: cam1, source: cam1.avi}\n"
                                           "  - {name: cam2, source: cam2.avi}\n")
    code, out = cli("watch", "--config", tmp_path / "cameras.yaml", "--bundle", reference_bundle, "--mqtt", broker.url,
                    "--events", tmp_path / "events.jsonl", "--threads", "1", "--quiet", "--json")
    assert code == 0, out
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    for camera in ("cam1", "cam2"):
        written = [r for r in lines if r["type"] == "anomaly" and r["camera"] == camera]
        summary = next(r for r in lines if r["type"] == "summary" and r["camera"] == camera)
        assert written and len(written) == summary["events"]
        got = sub.wait_for(f"site/{camera}/events", lambda m: len(m) >= len(written))
        assert [json.loads(p) for p, _ in got] == written   # once, in order, the file's content
        status = sub.wait_for(f"site/{camera}/status", lambda m: m and m[-1][0] == "offline")
        assert [p for p, _ in status] == ["online", "offline"]
        mqtt_sink = next(s for s in summary["sinks"] if s["sink"] == "mqtt")
        assert mqtt_sink["published"] == len(written) and mqtt_sink["dropped"] == 0
        got_summary = json.loads(sub.wait_for(f"site/{camera}/summary", bool)[-1][0])
        assert got_summary["processed"] == summary["processed"] and got_summary["camera"] == camera
    assert [s["camera"] for s in json.loads(out)["cameras"]] == ["cam1", "cam2"]
    sub.close()
    # A late subscriber sees the retained status and summary.
    late = Subscriber(broker.port, "late")
    assert late.wait_for("site/cam1/status", bool)[-1] == ("offline", True)
    late.close()


@needs_broker
def test_a_killed_watcher_goes_offline_through_its_last_will(broker):
    sub = Subscriber(broker.port)
    code = (f"from edgelmm.apps.sinks import MqttSink; import time; s = MqttSink({broker.url!r}, 'cam9'); "
            "assert s.connected.wait(10); s.event({'id': 1}); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    sub.wait_for("site/cam9/status", lambda m: m and m[-1][0] == "online")
    proc.kill()
    proc.wait()
    assert [p for p, _ in sub.wait_for("site/cam9/status", lambda m: m[-1][0] == "offline")] == ["online", "offline"]
    sub.close()


def _publish_through_an_outage(broker, buffer, before=10, during=20, after=10):
    """Events 1..N at a steady pace; the broker is stopped for 5 s after `before` of them (once the
    sink has had them acknowledged) and started again. Returns (sink, received ids, outage ids)."""
    sub = Subscriber(broker.port)
    sink = MqttSink(broker.url, "cam1", buffer=buffer)
    assert sink.connected.wait(10)
    seq = 0

    def send(n):
        nonlocal seq
        for _ in range(n):
            seq += 1
            sink.event({"id": seq})
            time.sleep(0.02)

    send(before)
    while sink.pending():
        time.sleep(0.02)
    sub.client.disconnect()   # the subscriber's session stays on the broker (clean_session=False)
    sub.client.loop_stop()
    broker.stop()
    outage = list(range(seq + 1, seq + during + 1))
    t0 = time.monotonic()
    send(during)
    time.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))
    broker.start()
    assert sink.connected.wait(60)
    while sink.pending():   # the buffer is resent and acknowledged before the next events come
        time.sleep(0.02)
    send(after)
    sink.close()
    first = [json.loads(p)["id"] for p, _ in sub.on("site/cam1/events")]
    sub = Subscriber(broker.port)   # the same session: what was queued for it comes now
    expected = set(range(1, seq + 1)) - set(outage[buffer:])
    got = sub.wait_for("site/cam1/events", lambda m: set(first) | {json.loads(p)["id"] for p, _ in m} >= expected)
    sub.close()
    return sink, first + [json.loads(p)["id"] for p, _ in got], outage, seq


@needs_broker
def test_a_five_second_outage_loses_nothing_within_the_buffer(broker):
    sink, ids, outage, last = _publish_through_an_outage(broker, buffer=1000)
    assert set(ids) == set(range(1, last + 1)) and sink.dropped == 0
    assert sink.published == last


@needs_broker
def test_the_drop_counter_is_exact_when_the_buffer_is_smaller_than_the_outage(broker):
    sink, ids, outage, last = _publish_through_an_outage(broker, buffer=5)
    kept = outage[:5]
    assert sink.dropped == len(outage) - 5
    assert set(ids) == set(range(1, last + 1)) - set(outage[5:]) and set(kept) <= set(ids)


def test_webhook_posts_each_record_and_retries(tmp_path):
    import http.server

    got, fail_first = [], [2]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if fail_first[0] > 0:      # the endpoint is down for the first two attempts
                fail_first[0] -= 1
                self.send_response(503)
            else:
                got.append(body)
                self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sink = WebhookSink(f"http://127.0.0.1:{server.server_port}/hook", backoff_s=0.05)
    for i in range(5):
        sink.event({"id": i})
    sink.summary({"type": "summary"})
    sink.close()
    server.shutdown()
    assert [r.get("id", r.get("type")) for r in got] == [0, 1, 2, 3, 4, "summary"]
    assert sink.describe() | {"url": None} == {"sink": "webhook", "url": None, "sent": 6, "dropped": 0,
                                               "rejected": 0, "failed": 0}
    with pytest.raises(OptionError, match="--webhook"):
        WebhookSink("ftp://x/y")


def test_watch_cli_mqtt_flags_are_checked_before_the_bundle_loads(tmp_path):
    from tests.test_bad_options import cli_json_error

    for flags, words in [(["--mqtt", "http://b/x"], "mqtt://host"), (["--mqtt", "mqtt://b/x", "--camera", "a/b"],
                                                                      "camera name"),
                         (["--mqtt-buffer", "0"], "mqtt_buffer"), (["--webhook", "ftp://x"], "--webhook")]:
        err = cli_json_error("watch", "0", "--bundle", tmp_path / "no-bundle", *flags)
        assert err["error"] == "OptionError" and words in err["message"], (flags, err)


@needs_broker
def test_watch_cli_publishes_to_the_broker(broker, reference_bundle, tmp_path):
    from tests.test_bad_options import cli

    sub = Subscriber(broker.port)
    video = write_video(tmp_path / "v.avi", VideoSpec(seed=2, anomaly="appear", anomaly_frame=120, frames=170))
    code, out = cli("watch", video["path"], "--bundle", reference_bundle, "--mqtt", broker.url, "--camera", "gate",
                    "--events", tmp_path / "e.jsonl", "--threads", "1", "--quiet", "--json")
    assert code == 0, out
    written = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()][:-1]
    got = sub.wait_for("site/gate/events", lambda m: len(m) >= len(written))
    assert written and [json.loads(p) for p, _ in got] == [dict(e, camera="gate") for e in written]
    assert json.loads(out)["sinks"][1] | {"url": None} == {"sink": "mqtt", "url": None, "topic": "site/gate/events",
                                                            "published": len(written), "dropped": 0, "connected": True}
    sub.close()
