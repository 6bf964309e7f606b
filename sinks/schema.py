"""Message schema v1: the one place every message and field the sinks publish is defined and encoded.

The Redis sink (sinks/redis_sink.py) and the JSON-lines log (sinks/jsonl.py) send what these functions
build, unchanged; nothing else builds a message. A change here is a change of the wire format: keep
SCHEMA_VERSION, and every consumer, in step.

Common to every message
    v              int, SCHEMA_VERSION (1).
    camera         the camera's name (sources[].name).
    Numbers are JSON numbers; a non-finite one (NaN, Infinity: JSON has neither) goes out as null, so
    every message parses with a strict JSON parser.

One time base
    Every `ts`, `start_ts` and `end_ts` is seconds since the epoch: a live camera's capture time, or for a
    recorded file the time its frame was decoded. Frames of a recorded file also carry `media_ts`
    (seconds into the file) and its alerts `start_media_ts` / `end_media_ts`; these are null for live
    cameras. Alert timing (alerts.min_duration_s, exit_duration_s) follows the camera's own clock, media
    time for files, so a file alerts the same however fast it is decoded.

Regions
    `[x1, y1, x2, y2, peak, area]`: box corners in frame pixels (of the original frame), x2/y2 exclusive;
    `peak` the region's highest anomaly-map value rounded to 4 decimals (null if not finite); `area` the
    frame pixels above the region threshold. A message's `regions` are those of the frame it names
    (`frame_index`): an alert "end" after recovery names the frame that completed the exit duration and
    usually has none. `peak_regions` are those of the alert's highest-scoring frame so far, which its
    snapshot shows.

Frame record (`frame_message`), one per scored frame
    v, camera, frame_index (int), ts, media_ts (null for live cameras), score (the frame score used for
    alerting), threshold (the frame-score threshold in force), is_anomalous (bool: score >= threshold),
    regions. In that key order.
    Redis: an entry of the stream `<prefix>:<camera>:frames` (XADD ... MAXLEN ~ sinks.redis.frames_maxlen)
    whose fields (`frame_fields`) are strings: v, camera, frame_index, ts, score, threshold ("nan" for
    null), is_anomalous ("1" / "0"), regions (compact JSON of the list), and media_ts only for frames of
    a recorded file.
    JSON lines: `{"type": "frame", ...the record}`.

Alert message (`alert_message`), one per lifecycle step
    v, type ("new" | "update" | "end"), alert_id (`<camera>-<start_ms>-<6 hex>`, the same in every
    message of one alert), camera, start_ts, end_ts (null until "end"), start_media_ts, end_media_ts (null
    for live cameras, end_media_ts null until "end"), peak_score (the highest frame score so far),
    regions, peak_regions, snapshot (path of the peak frame's image, or null), reason (null; for "end":
    "recovered" | "shutdown" | "source_ended"), frame_index (the frame this message describes). In that
    key order.
    "new": the frame score stayed >= the enter threshold for alerts.min_duration_s; "update": regions
    changed (IoU) or the peak rose (rate-limited); "end": the score stayed below the exit threshold for
    alerts.exit_duration_s, or the input ended, or the run stopped.
    Redis: published on the channels `<prefix>:alerts` and `<prefix>:<camera>:alerts` and added to the
    stream `<prefix>:alerts` (field `data`), as compact JSON. Delivery is idempotent per
    (alert_id, type, frame_index); where the Redis user may not run scripts it is at-least-once, and
    consumers that replay dedupe on that key.
    JSON lines: `{"type": "alert", "event": <the message's type>, ...every other field}`.

Camera status (`status_message`)
    v, camera, state ("online" | "offline"), ts (when the sink was told), detail (human-readable, never
    credentials). Redis: the key `<prefix>:<camera>:status` (state, not history: the latest only, re-sent
    after every reconnect) and a message on the channel of the same name.
    JSON lines: `{"type": "status", ...the message}`.

Order, per camera
    Frames in capture order; an alert's "new", "update"s and "end" in order, each after the frame it
    names; when a camera's input ends or the run stops, its last frame, then its open alert's "end"
    ("source_ended" / "shutdown"), then its "offline" status, the camera's last message. A live camera
    that loses its connection goes "offline" at once; its open alert stays open through the outage and
    ends by the usual rule once frames return. Across cameras there is no order.
"""

from __future__ import annotations

import json
import math

from detector.result import FrameResult, Region
from sinks.base import AlertEvent

SCHEMA_VERSION = 1

FRAME_KEYS = ("v", "camera", "frame_index", "ts", "media_ts", "score", "threshold", "is_anomalous", "regions")
ALERT_KEYS = (
    "v",
    "type",
    "alert_id",
    "camera",
    "start_ts",
    "end_ts",
    "start_media_ts",
    "end_media_ts",
    "peak_score",
    "regions",
    "peak_regions",
    "snapshot",
    "reason",
    "frame_index",
)
STATUS_KEYS = ("v", "camera", "state", "ts", "detail")


def finite(x) -> float | None:
    """JSON has no NaN/Infinity; a non-finite number goes out as null."""
    x = float(x)
    return x if math.isfinite(x) else None


def _optional(x) -> float | None:
    return None if x is None else finite(x)


def regions(rs: list[Region]) -> list[list]:
    """The wire form of regions: [[x1, y1, x2, y2, peak, area], ...]."""
    return [[r.x1, r.y1, r.x2, r.y2, finite(round(r.peak, 4)), r.area] for r in rs]


def frame_message(result: FrameResult) -> dict:
    return {
        "v": SCHEMA_VERSION,
        "camera": result.camera_id,
        "frame_index": int(result.frame_index),
        "ts": finite(result.epoch_ts),
        "media_ts": _optional(result.media_ts),
        "score": finite(result.score),
        "threshold": finite(result.threshold),
        "is_anomalous": result.is_anomalous,
        "regions": regions(result.regions),
    }


def frame_fields(msg: dict) -> dict[str, str]:
    """The Redis stream fields of a frame record (`frame_message`): every value a string."""

    def num(x):
        return "nan" if x is None else repr(float(x))

    fields = {
        "v": str(msg["v"]),
        "camera": msg["camera"],
        "frame_index": str(msg["frame_index"]),
        "ts": num(msg["ts"]),
        "score": num(msg["score"]),
        "threshold": num(msg["threshold"]),
        "is_anomalous": "1" if msg["is_anomalous"] else "0",
        "regions": json.dumps(msg["regions"], separators=(",", ":")),
    }
    if msg.get("media_ts") is not None:  # recorded files only
        fields["media_ts"] = num(msg["media_ts"])
    return fields


def alert_message(ev: AlertEvent) -> dict:
    return {
        "v": SCHEMA_VERSION,
        "type": ev.type,
        "alert_id": ev.alert_id,
        "camera": ev.camera,
        "start_ts": finite(ev.start_ts),
        "end_ts": _optional(ev.end_ts),
        "start_media_ts": _optional(ev.start_media_ts),
        "end_media_ts": _optional(ev.end_media_ts),
        "peak_score": finite(ev.peak_score),
        "regions": regions(ev.regions),
        "peak_regions": regions(ev.peak_regions),
        "snapshot": ev.snapshot,
        "reason": ev.reason,
        "frame_index": int(ev.frame_index),
    }


def status_message(camera: str, state: str, ts: float, detail: str = "") -> dict:
    return {"v": SCHEMA_VERSION, "camera": camera, "state": state, "ts": finite(ts), "detail": detail}
