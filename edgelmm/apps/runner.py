"""One `edgelmm watch` process: its cameras (one SOURCE, or several from cameras.yaml), the sinks
each camera writes to (the events stream, MQTT, a webhook), the live view, and stopping them all
(a signal). The CLI is a thin layer over this; Python users can use it the same way.

    run = WatchRun(cameras, config, WatchOutputs(events="events.jsonl", mqtt="mqtt://broker/site"))
    reports = run.run(edgelmm.load("bundle"))          # until every source ends or run.stop()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from ..errors import EdgeLMMError
from ..options import check_int
from ..pipeline import Pipeline
from .anomaly import AnomalyWatcher, Camera, WatchConfig, WatchReport, check_events, watch_cameras
from .sinks import MqttSink, Sink, WebhookSink, check_camera_name, parse_mqtt_url


@dataclass
class WatchOutputs:
    """Where a run's records go (`events`: a JSON-lines file or stream, shared by every camera) and
    the live view's address (`view`, e.g. ":8080")."""
    events: str | Path | TextIO
    mqtt: str | None = None
    mqtt_buffer: int = 1000
    mqtt_thumbnails: bool = False
    webhook: str | None = None
    view: str | None = None

    def check(self, cameras: Sequence[Camera]) -> None:
        """Every option's OptionError, before a bundle loads or a source opens."""
        check_events(self.events)
        for c in cameras:
            check_camera_name(c.name)
        check_int("mqtt_buffer", self.mqtt_buffer, 1)
        if self.mqtt:
            parse_mqtt_url(self.mqtt)
        if self.webhook:
            WebhookSink.check_url(self.webhook)


class WatchRun:
    """`several`: cameras from a config file (events carry their camera's name and each summary is
    the camera's); otherwise one camera, whose events look as they always have."""

    def __init__(self, cameras: Sequence[Camera], config: WatchConfig, outputs: WatchOutputs, *, several: bool):
        outputs.check(cameras)
        self.cameras, self.config, self.outputs, self.several = list(cameras), config, outputs, several
        self.sinks: list[Sink] = []          # every MQTT and webhook sink made so far
        self.watchers: dict[str, AnomalyWatcher] = {}
        self.view = None
        if outputs.view is not None:
            from .view import LiveView

            self.view = LiveView(outputs.view).start()   # a port in use is an OptionError here, before loading

    def _sinks_for(self, name: str) -> list[Sink]:
        o = self.outputs
        made = ([WebhookSink(o.webhook)] if o.webhook else []) + (
            [MqttSink(o.mqtt, name, buffer=o.mqtt_buffer, thumbnails=o.mqtt_thumbnails)] if o.mqtt else [])
        self.sinks.extend(made)
        return made

    def run(self, pipeline: Pipeline, *, on_summary: Callable[[str, dict[str, Any]], None] | None = None,
            on_status: Callable[[str], None] | None = None) -> dict[str, WatchReport]:
        """Watch until every source ends or stop(); the reports by camera name. A single camera's
        source that cannot be opened raises its SourceError (several cameras: that camera's report)."""
        try:
            if self.several:
                return watch_cameras(pipeline, self.cameras, self.config, events=self.outputs.events,
                                     sinks_for=self._sinks_for, on_summary=on_summary,
                                     on_watchers=self.watchers.update, view=self.view)
            c = self.cameras[0]
            part = self.view.camera(c.name) if self.view is not None else None
            watcher = AnomalyWatcher(pipeline, self.config, references=c.references, events=self.outputs.events,
                                     on_summary=(lambda stats: on_summary(c.name, stats)) if on_summary else None,
                                     on_status=on_status, sinks=self._sinks_for(c.name) + ([part] if part else []),
                                     on_frame=part.frame if part else None)
            self.watchers[c.name] = watcher
            return {c.name: watcher.run(c.source)}
        except EdgeLMMError:
            self._close_sinks()    # a run that never started: the MQTT status goes back to offline
            raise

    def stop(self, reason: str) -> None:
        """Stop every camera cleanly; a second stop also cancels the answers in progress."""
        for w in self.watchers.values():
            if w.stopping.is_set():
                w.abort(f"{reason} (twice)")
            else:
                w.stop(reason)

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            sink.close()

    def close(self) -> None:
        """The view goes down (the sinks were closed by their watchers at the end of their runs)."""
        if self.view is not None:
            self.view.close()
            self.view = None
