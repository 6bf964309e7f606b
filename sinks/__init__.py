"""Everything downstream of the detector: the alert lifecycle, snapshots, and the sinks that publish.

`SinkSet` is what the pipeline talks to; `build_sinks` assembles one from the config.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

from configs.errors import UserError
from configs.schema import AlertsConfig, SinksConfig
from detector.result import FrameResult
from sinks.alerts import AlertTracker
from sinks.base import AlertEvent, Sink
from sinks.snapshots import SnapshotWriter
from stream.frame import Frame

log = logging.getLogger(__name__)


def _sink_name(sink) -> str:
    return type(sink).__name__


class SinkSet:
    """Runs the alert tracker and fans every frame, alert and status out to the sinks.

    Sinks are isolated from one another: an exception from one is logged (the first few times, then
    every 100th) and counted in `errors[<sink class>]`, and never keeps the others from their data.
    Thread-safe: sources may report camera status from their own threads while the pipeline publishes.
    """

    def __init__(
        self, sinks: list[Sink], tracker: AlertTracker | None = None, snapshots: SnapshotWriter | None = None
    ) -> None:
        self.sinks = list(sinks)
        self.tracker = tracker or AlertTracker()
        self.snapshots = snapshots
        self.errors: Counter = Counter()
        self._snap_paths: dict[str, str] = {}  # alert_id -> path, stable for the alert's life
        self._snap_version: dict[str, int] = {}  # alert_id -> peak version the file shows
        self._lock = threading.RLock()
        self._closed = False

    def _call(self, sink, method: str, *args) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception:
            name = _sink_name(sink)
            self.errors[name] += 1
            n = self.errors[name]
            if n <= 3 or n % 100 == 0:
                log.exception("%s.%s failed (%d errors so far)", name, method, n)

    def _attach_snapshot(self, ev: AlertEvent) -> None:
        """Save the peak frame at "new", re-save (same path) whenever the peak moved since."""
        if self.snapshots is None:
            return
        peak = self.tracker.peak(ev.alert_id)
        if peak is not None and self._snap_version.get(ev.alert_id) != peak.version:
            try:
                self._snap_paths[ev.alert_id] = self.snapshots.save(ev.camera, ev.alert_id, peak.frame, peak.result)
                self._snap_version[ev.alert_id] = peak.version
            except Exception:
                self.errors["SnapshotWriter"] += 1
                log.exception("snapshot for alert %s failed", ev.alert_id)
        ev.snapshot = self._snap_paths.get(ev.alert_id)
        if ev.type == "end":
            self._snap_paths.pop(ev.alert_id, None)
            self._snap_version.pop(ev.alert_id, None)

    def _emit(self, events: list[AlertEvent]) -> None:
        for ev in events:
            self._attach_snapshot(ev)
            for sink in self.sinks:
                self._call(sink, "alert", ev)

    def publish(self, result: FrameResult, frame: Frame) -> list[AlertEvent]:
        """One scored frame: track alerts, write the frame to every sink, then the alert events."""
        with self._lock:
            if self._closed:
                return []
            try:
                events = self.tracker.update(result, frame)
            except Exception:
                self.errors["AlertTracker"] += 1
                log.exception("alert tracking failed on %s #%d", result.camera_id, result.frame_index)
                events = []
            for sink in self.sinks:
                self._call(sink, "write", result, frame)
            self._emit(events)
            return events

    def camera_status(self, camera: str, state: str, detail: str = "") -> None:
        with self._lock:
            if self._closed:
                return
            for sink in self.sinks:
                self._call(sink, "camera_status", camera, state, detail)

    def end_camera(self, camera: str, reason: str = "source_ended") -> list[AlertEvent]:
        """A source finished (end of file) while others run on: end its open alert now."""
        with self._lock:
            if self._closed:
                return []
            events = self.tracker.close(reason, camera=camera)
            self._emit(events)
            return events

    def close(self, reason: str = "shutdown") -> list[AlertEvent]:
        """End every open alert with `reason`, then close every sink. Idempotent."""
        with self._lock:
            if self._closed:
                return []
            events = self.tracker.close(reason)
            self._emit(events)
            self._closed = True
            for sink in self.sinks:
                self._call(sink, "close")
            return events


def build_sinks(cfg: SinksConfig, alerts: AlertsConfig, out_dir: Path | str | None, fps_hint: float = 25.0) -> SinkSet:
    """Redis when `redis.url` is set; JSONL when enabled, or by default when there is no Redis URL
    (at `jsonl.path`, else `<out_dir>/events.jsonl`); video when `video.dir` is set. Snapshots go to
    `alerts.snapshot_dir`, else `<out_dir>/snapshots`; without either, alerts carry no snapshot."""
    out = Path(out_dir) if out_dir is not None else None
    sinks: list[Sink] = []
    try:
        jsonl_on = cfg.jsonl.enabled if cfg.jsonl.enabled is not None else not cfg.redis.url
        if jsonl_on:
            path: Path | None = Path(cfg.jsonl.path) if cfg.jsonl.path else (out / "events.jsonl" if out else None)
            if path is not None:
                from sinks.jsonl import JsonlSink

                sinks.append(JsonlSink(path))
            elif cfg.jsonl.enabled:
                raise UserError(
                    "sinks.jsonl.enabled is true but neither sinks.jsonl.path nor an output directory is given"
                )
            else:
                log.warning(
                    "no Redis URL, no JSONL path and no output directory: frame scores and "
                    "alerts are not published anywhere"
                )
        if cfg.redis.url:
            from sinks.redis_sink import RedisSink

            spool = cfg.redis.spool_dir or (out / "redis-spool" if out else None)
            sinks.append(RedisSink(cfg.redis, spool_dir=spool))
        preview_on = cfg.preview.enabled if cfg.preview.enabled is not None else bool(cfg.redis.url)
        if preview_on:  # the operator console's live picture (sinks/preview.py)
            if not cfg.redis.url:
                raise UserError("sinks.preview.enabled is true but sinks.redis.url is not set")
            from sinks.preview import PreviewSink

            sinks.append(PreviewSink(cfg.preview, cfg.redis, normal_regions=cfg.video.normal_regions))
        if cfg.video.dir:
            from sinks.video import VideoSink

            sinks.append(VideoSink(cfg.video, fps_hint=fps_hint))
    except BaseException:
        for s in sinks:  # don't leak a started Redis worker or an open file on a config error
            try:
                s.close()
            except Exception:
                pass
        raise
    snap_dir = alerts.snapshot_dir or (out / "snapshots" if out else None)
    snapshots = SnapshotWriter(snap_dir) if snap_dir else None
    return SinkSet(sinks, AlertTracker(alerts), snapshots)


__all__ = ["AlertEvent", "AlertTracker", "Sink", "SinkSet", "SnapshotWriter", "build_sinks"]
