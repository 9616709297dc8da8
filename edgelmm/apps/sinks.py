"""Where `edgelmm watch` sends its records (events, then one summary at the end), behind one small
interface: `event(record)`, `summary(record)`, `close()` and `describe()` (counters). A watcher
writes to several at once.

  JsonLinesSink  a file (appended, one flushed line per record) or a text stream
  MqttSink       an MQTT broker (paho-mqtt): events at QoS 1 on `<prefix>/<camera>/events`, a retained
                 `<prefix>/<camera>/status` ("online", and "offline" at the end or, through the last
                 will, when the process dies), the summary retained on `<prefix>/<camera>/summary`.
                 While the broker is away, paho keeps up to `buffer` unacknowledged events and
                 resends them on reconnect (backoff 1 s doubling to 30 s); beyond that each event is
                 dropped and counted (`dropped`). Right after a reconnect the buffer still holds the
                 resent events until the broker acknowledges them.
  WebhookSink    an HTTP endpoint: each record POSTed as JSON from a background thread, retried with
                 backoff; a bounded queue, and the records dropped when it overflows counted.

The MQTT username and password come from EDGELMM_MQTT_USERNAME / EDGELMM_MQTT_PASSWORD (not the
command line, where `ps` shows them); mqtts:// uses TLS with the system's CA certificates."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol, TextIO

from ..errors import OptionError

log = logging.getLogger("edgelmm.watch")

MQTT_USER_ENV, MQTT_PASSWORD_ENV = "EDGELMM_MQTT_USERNAME", "EDGELMM_MQTT_PASSWORD"
_TOPIC_PART = re.compile(r"^[^#+/\x00]+$")


class Sink(Protocol):
    def event(self, record: dict[str, Any]) -> None: ...

    def summary(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class JsonLinesSink:
    """A JSON-lines file (appended, one flushed line per record, so a stop at any moment leaves
    only whole lines) or a text stream (not closed here)."""

    def __init__(self, target: str | Path | TextIO, name: str = "events"):
        self._lock = threading.Lock()
        self._owned = not hasattr(target, "write")
        if self._owned:
            try:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                self._stream: TextIO = open(target, "a", encoding="utf-8")
            except OSError as exc:
                raise OptionError(f"{name} {str(target)!r}: cannot be written "
                                  f"({exc.strerror or type(exc).__name__})") from None
        else:
            self._stream = target
        self.written = 0

    def event(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._stream.write(json.dumps(record) + "\n")
            self._stream.flush()
            self.written += 1

    summary = event

    def close(self) -> None:
        if self._owned:
            self._stream.close()

    def describe(self) -> dict[str, Any]:
        return {"sink": "jsonl", "written": self.written}


def parse_mqtt_url(url: str) -> tuple[str, int, bool, str]:
    """mqtt://host[:port]/prefix or mqtts://... -> (host, port, tls, prefix). OptionError names --mqtt."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise OptionError(f"--mqtt {url!r}: want mqtt://host[:port]/prefix (or mqtts:// for TLS)")
    if parts.username or parts.password:
        raise OptionError(f"--mqtt: put the username and password in {MQTT_USER_ENV} and {MQTT_PASSWORD_ENV}, "
                          "not in the URL (a command line is visible to every user of the machine)")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise OptionError(f"--mqtt {url!r}: the port is not a number in 1-65535") from None
    prefix = parts.path.strip("/") or "edgelmm"
    if not all(_TOPIC_PART.match(p) for p in prefix.split("/")):
        raise OptionError(f"--mqtt {url!r}: the topic prefix {prefix!r} may not contain '+', '#' or empty levels")
    return parts.hostname, port, parts.scheme == "mqtts", prefix


def check_camera_name(name: str) -> str:
    if not _TOPIC_PART.match(name or ""):
        raise OptionError(f"camera name {name!r}: one MQTT topic level (no '/', '+', '#'), not empty")
    return name


class MqttSink:
    def __init__(self, url: str, camera: str = "camera", buffer: int = 1000, thumbnails: bool = False,
                 client_id: str | None = None, connect_timeout_s: float = 10.0):
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise OptionError(f"--mqtt needs paho-mqtt: pip install 'edgelmm[watch]' ({exc})") from None
        host, port, tls, prefix = parse_mqtt_url(url)
        check_camera_name(camera)
        if buffer < 1:
            raise OptionError(f"the MQTT buffer must hold at least 1 event, got {buffer}")
        self.mqtt = mqtt
        self.url, self.camera, self.thumbnails = url, camera, thumbnails
        base = f"{prefix}/{camera}"
        self.topics = {"events": f"{base}/events", "status": f"{base}/status", "summary": f"{base}/summary"}
        self.published = self.dropped = 0
        self.connected = threading.Event()
        self._lock = threading.Lock()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"edgelmm-{camera}-{os.getpid()}",
                             clean_session=True)
        user = os.environ.get(MQTT_USER_ENV)
        if user:
            client.username_pw_set(user, os.environ.get(MQTT_PASSWORD_ENV))
        if tls:
            client.tls_set()
        # The broker says "offline" for us if the connection dies without a goodbye (a kill, a cut cable).
        client.will_set(self.topics["status"], "offline", qos=1, retain=True)
        client.max_queued_messages_set(buffer)
        client.max_inflight_messages_set(20)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self.client = client
        try:
            client.connect_async(host, port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise OptionError(f"--mqtt {url!r}: {exc}") from None
        client.loop_start()
        if not self.connected.wait(connect_timeout_s):
            log.warning("MQTT broker %s not reachable yet; events are kept (up to %d) until it is", url, buffer)

    def _on_connect(self, client, userdata, flags, reason, properties=None):
        if not reason.is_failure:
            client.publish(self.topics["status"], "online", qos=1, retain=True)
            self.connected.set()
        else:
            log.warning("MQTT broker refused the connection: %s", reason)

    def _on_disconnect(self, client, userdata, flags, reason, properties=None):
        self.connected.clear()

    def _publish(self, topic: str, payload: str, retain: bool = False) -> bool:
        """Hand a message to paho (sent now, or kept for the reconnect); False when its buffer is full."""
        with self._lock:
            return self.client.publish(topic, payload, qos=1, retain=retain).rc != self.mqtt.MQTT_ERR_QUEUE_SIZE

    def event(self, record: dict[str, Any]) -> None:
        out = dict(record, camera=self.camera)
        if self.thumbnails and record.get("snapshot"):
            out["thumbnail_jpeg_base64"] = _thumbnail(record["snapshot"][-1])
        if self._publish(self.topics["events"], json.dumps(out)):
            self.published += 1   # events only: the counters say what happened to the events
        else:
            self.dropped += 1

    def summary(self, record: dict[str, Any]) -> None:
        self._publish(self.topics["summary"], json.dumps(dict(record, camera=self.camera)), retain=True)

    def pending(self) -> int:
        """Messages paho still holds (queued, or sent and not acknowledged)."""
        with self._lock:
            return len(getattr(self.client, "_out_messages", {}))

    def close(self, flush_timeout_s: float = 10.0) -> None:
        """Say "offline", wait (a while) for what is queued to be acknowledged, disconnect."""
        self._publish(self.topics["status"], "offline", retain=True)
        deadline = time.monotonic() + flush_timeout_s
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.client.disconnect()
        self.client.loop_stop()

    def describe(self) -> dict[str, Any]:
        return {"sink": "mqtt", "url": self.url, "topic": self.topics["events"], "published": self.published,
                "dropped": self.dropped, "connected": self.connected.is_set()}


def _thumbnail(path: str, side: int = 160) -> str | None:
    import base64
    import io

    from PIL import Image

    try:
        with Image.open(path) as img:
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=80)
        return base64.b64encode(buf.getvalue()).decode()
    except OSError:
        return None


class WebhookSink:
    """POSTs each record as JSON to `url` from a background thread, retrying a failed POST (a
    connection error or a 5xx answer) with backoff; a 4xx answer is not retried (the record is
    counted as rejected)."""

    def __init__(self, url: str, retries: int = 5, backoff_s: float = 0.5, buffer: int = 1000,
                 timeout_s: float = 10.0):
        self.check_url(url)
        self.url, self.retries, self.backoff_s, self.timeout_s = url, retries, backoff_s, timeout_s
        self.sent = self.dropped = self.rejected = self.failed = 0
        self._queue: queue.Queue = queue.Queue(buffer)
        self._thread = threading.Thread(target=self._run, name="edgelmm-webhook", daemon=True)
        self._thread.start()

    @staticmethod
    def check_url(url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OptionError(f"--webhook {url!r}: want an http:// or https:// URL")

    def event(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    summary = event

    def _post(self, record: dict[str, Any]) -> None:
        data = json.dumps(record).encode()
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    r.read()
                self.sent += 1
                return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    self.rejected += 1
                    log.warning("webhook %s rejected a record: HTTP %d", self.url, exc.code)
                    return
            except (OSError, ValueError):
                pass
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        self.failed += 1
        log.warning("webhook %s: a record was not delivered after %d attempts", self.url, self.retries + 1)

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            self._post(record)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def describe(self) -> dict[str, Any]:
        return {"sink": "webhook", "url": self.url, "sent": self.sent, "dropped": self.dropped,
                "rejected": self.rejected, "failed": self.failed}
