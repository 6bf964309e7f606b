"""Alert lifecycle per camera (hysteresis + minimum durations). The messages are sinks/schema.py's.

State machine per camera, driven only by each frame's stream clock (`FrameResult.timestamp`: capture
time for live cameras, media time for recorded files; never the wall clock, so offline files and replays
alert exactly like live streams):

    idle --score >= enter--> pending --held for min_duration_s--> OPEN  (emit "new")
    pending --score < enter--> idle                                   (a short spike never alerts)
    OPEN --score < exit--> closing --held for exit_duration_s--> idle (emit "end", reason "recovered")
    closing --score >= exit--> OPEN

While OPEN, "update" is emitted when the peak score rose materially or the regions changed, at most once
per `update_interval_s`. A change that arrives inside the quiet interval is not lost: the next frame after
the interval compares against what was last *emitted*, so it goes out then if it still holds.

An event's start / end times (epoch and, for a recorded file, media) are those of the frame where the
alert started and of the one where its score first dropped below exit (on shutdown or end of input: the
camera's last frame); its `regions` are those of the frame it names by `frame_index`, `peak_regions` those
of the peak frame. How events go on the wire: sinks/schema.py.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from configs.schema import AlertsConfig
from detector.result import FrameResult, Region
from sinks.base import AlertEvent
from stream.frame import Frame


@dataclass
class Peak:
    """The highest-scoring frame of an alert so far. `version` increases whenever it changes, so a
    snapshot writer can tell whether the image it saved is still the peak."""

    frame: Frame
    result: FrameResult
    version: int = 0

    @property
    def score(self) -> float:
        return float(self.result.score)


@dataclass(frozen=True)
class _When:
    """One instant on both clocks: the stream's (alert timing) and the epoch (messages)."""

    stream: float
    epoch: float
    media: float | None

    @staticmethod
    def of(result: FrameResult) -> _When:
        return _When(float(result.timestamp), result.epoch_ts, result.media_ts)


@dataclass
class _Open:
    alert_id: str
    start: _When
    peak: Peak
    last_event_ts: float
    emitted_peak: float
    emitted_regions: list[Region]
    below_since: float | None = None
    below_when: _When | None = None  # the frame where the score first dropped below exit


@dataclass
class _Camera:
    last: FrameResult | None = None  # the latest frame: its time, and where a shutdown ends the alert
    above_since: float | None = None  # pending: first frame of the current run >= enter
    above_when: _When | None = None
    pending_peak: Peak | None = None
    open: _Open | None = None


def thresholds(cfg: AlertsConfig, result: FrameResult) -> tuple[float, float]:
    """(enter, exit) in force for this frame. See AlertsConfig for the defaults."""
    enter = float(cfg.enter_threshold) if cfg.enter_threshold is not None else float(result.threshold)
    if cfg.exit_threshold is not None:
        # Clamped: with enter taken from the frame, a fixed exit could otherwise sit above it and make
        # an alert end and restart on every frame.
        exit_ = min(float(cfg.exit_threshold), enter)
    else:
        exit_ = enter - 0.1 * abs(enter)
    return enter, exit_


def box_iou(a: Region, b: Region) -> float:
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def regions_changed(old: list[Region], new: list[Region], min_iou: float) -> bool:
    """True when a region appeared, disappeared or moved: some box in either set has no partner in
    the other with IoU >= min_iou (greedy one-to-one matching; region counts are small)."""
    if len(old) != len(new):
        return True
    free = list(new)
    for a in old:
        best, best_iou = None, min_iou
        for b in free:
            iou = box_iou(a, b)
            if iou >= best_iou:
                best, best_iou = b, iou
        if best is None:
            return True
        free.remove(best)
    return False


def new_alert_id(camera: str, start_ts: float) -> str:
    """`<camera>-<start_ms>-<6 hex>`: readable, sortable per camera, and unique across restarts (media
    timestamps of an offline file repeat from run to run, so the random part is what keeps ids apart).
    Generated once per alert and reused by every message, so redelivery is recognisable."""
    start_ms = int(round(start_ts * 1000)) if math.isfinite(start_ts) else 0
    return f"{camera}-{start_ms}-{secrets.token_hex(3)}"


class AlertTracker:
    """Turns the per-frame scores of every camera into new / update / end events."""

    def __init__(self, cfg: AlertsConfig | None = None) -> None:
        self.cfg = cfg or AlertsConfig()
        self._cams: dict[str, _Camera] = {}
        # Peaks of alerts ended by the latest update()/close() call, so the caller can still write
        # the final snapshot for the "end" events it was just handed.
        self._ended: dict[str, Peak] = {}

    # -- queries -------------------------------------------------------------------------------------
    def peak(self, alert_id: str) -> Peak | None:
        """Peak frame of an open alert, or of one ended by the latest update()/close() call."""
        if alert_id in self._ended:
            return self._ended[alert_id]
        for cam in self._cams.values():
            if cam.open is not None and cam.open.alert_id == alert_id:
                return cam.open.peak
        return None

    def open_alerts(self) -> dict[str, str]:
        """camera -> alert_id of every open alert."""
        return {c: s.open.alert_id for c, s in self._cams.items() if s.open is not None}

    # -- driving -------------------------------------------------------------------------------------
    def update(self, result: FrameResult, frame: Frame) -> list[AlertEvent]:
        self._ended = {}
        cam = self._cams.setdefault(result.camera_id, _Camera())
        ts = float(result.timestamp)
        if cam.last is not None and ts < float(cam.last.timestamp):
            # Time went backwards (file looped, camera clock reset): restart the running timers here
            # rather than let negative durations hold an alert open or block one forever.
            if cam.above_since is not None:
                cam.above_since = ts
            if cam.open is not None:
                cam.open.last_event_ts = min(cam.open.last_event_ts, ts)
                if cam.open.below_since is not None:
                    cam.open.below_since = ts
        cam.last = result
        enter, exit_ = thresholds(self.cfg, result)
        score = float(result.score)  # NaN compares False everywhere: treated as "not anomalous"
        if cam.open is None:
            return self._idle_step(cam, result, frame, ts, score, enter)
        return self._open_step(cam, result, frame, ts, score, enter, exit_)

    def _idle_step(self, cam: _Camera, result, frame, ts, score, enter) -> list[AlertEvent]:
        if not score >= enter:
            cam.above_since, cam.above_when, cam.pending_peak = None, None, None
            return []
        if cam.above_since is None:
            cam.above_since, cam.above_when = ts, _When.of(result)
        if cam.pending_peak is None or score > cam.pending_peak.score:
            cam.pending_peak = Peak(frame, result)
        if ts - cam.above_since < self.cfg.min_duration_s:
            return []
        peak = cam.pending_peak
        start = cam.above_when or _When.of(result)
        cam.open = _Open(
            alert_id=new_alert_id(result.camera_id, start.epoch),
            start=start,
            peak=peak,
            last_event_ts=ts,
            emitted_peak=peak.score,
            emitted_regions=list(result.regions),
        )
        cam.above_since, cam.above_when, cam.pending_peak = None, None, None
        return [self._event("new", cam.open, result)]

    def _open_step(self, cam: _Camera, result, frame, ts, score, enter, exit_) -> list[AlertEvent]:
        op = cam.open
        assert op is not None
        if score > op.peak.score:
            op.peak = Peak(frame, result, op.peak.version + 1)
        if not score >= exit_:
            if op.below_since is None:
                op.below_since, op.below_when = ts, _When.of(result)
            if ts - op.below_since >= self.cfg.exit_duration_s:
                return [self._end(cam, "recovered", result)]
            return []  # fading out: region churn while the score decays is noise, not news
        op.below_since, op.below_when = None, None
        if ts - op.last_event_ts < self.cfg.update_interval_s:
            return []
        # Relative to the last emitted peak; the |enter| floor keeps scores normalised around zero
        # from turning every tiny rise into an update.
        rise_needed = self.cfg.update_peak_rise * max(abs(op.emitted_peak), abs(enter), 1e-9)
        peak_rose = op.peak.score - op.emitted_peak >= rise_needed
        moved = regions_changed(op.emitted_regions, list(result.regions), self.cfg.update_region_iou)
        if not (peak_rose or moved):
            return []
        op.last_event_ts = ts
        op.emitted_peak = op.peak.score
        op.emitted_regions = list(result.regions)
        return [self._event("update", op, result)]

    def close(self, reason: str = "shutdown", camera: str | None = None) -> list[AlertEvent]:
        """End every open alert (or only `camera`'s) with `reason` ("shutdown" | "source_ended")."""
        self._ended = {}
        events = []
        for name, cam in self._cams.items():
            if camera is not None and name != camera:
                continue
            cam.above_since, cam.above_when, cam.pending_peak = None, None, None
            if cam.open is not None and cam.last is not None:
                events.append(self._end(cam, reason, cam.last))
        return events

    def _end(self, cam: _Camera, reason: str, result: FrameResult) -> AlertEvent:
        """End the open alert at `result` (the frame that ended it: the one that completed the exit
        duration, or on shutdown / end of input the camera's last frame)."""
        op = cam.open
        assert op is not None
        # The anomaly ended when the score first dropped below exit; on shutdown, at the last frame.
        end = op.below_when if op.below_when is not None else _When.of(result)
        cam.open = None
        self._ended[op.alert_id] = op.peak
        ev = self._event("end", op, result)
        ev.end_ts, ev.end_media_ts, ev.reason = end.epoch, end.media, reason
        return ev

    @staticmethod
    def _event(kind: str, op: _Open, result: FrameResult) -> AlertEvent:
        return AlertEvent(
            type=kind,
            alert_id=op.alert_id,
            camera=result.camera_id,
            start_ts=op.start.epoch,
            end_ts=None,
            peak_score=op.peak.score,
            regions=list(result.regions),
            frame_index=int(result.frame_index),
            peak_regions=list(op.peak.result.regions),
            start_media_ts=op.start.media,
        )
