"""Message schema v1 (sinks/schema.py): every message parses with a strict JSON parser, has exactly the
documented keys in the documented order, and is byte-for-byte what v1 has always sent."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import sinks.schema as schema
from detector.result import FrameResult, Region
from sinks.base import AlertEvent
from sinks.schema import ALERT_KEYS, FRAME_KEYS, STATUS_KEYS, alert_message, frame_fields, frame_message, status_message

NAN, INF = float("nan"), float("inf")
BOXES = [
    Region(1, 2, 30, 40, 0.123456789, 0.1, 77),
    Region(5, 6, 7, 8, NAN, 0.0, 3),
    Region(0, 0, 1, 1, np.float32(2.5), 1.0, 1),
]
MAP = np.zeros((4, 4), np.float32)


def strict(msg: dict) -> dict:
    """Serialise as the sinks do and parse back, refusing NaN / Infinity anywhere."""

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    text = json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return json.loads(text, parse_constant=refuse)


FRAMES = [
    FrameResult("cam", 3, 1700000000.25, 0.5, 0.4, MAP, BOXES[:1]),  # live
    FrameResult("cam", np.int64(4), 12.5, NAN, 0.4, MAP, BOXES, wall_ts=1700000001.0),  # recorded file
    FrameResult("c2", 0, INF, np.float32(0.3), np.float64(0.3), MAP, []),
    FrameResult("c3", 1, 0.0, -INF, NAN, MAP, BOXES[2:], wall_ts=NAN),
]
EVENTS = [
    AlertEvent("new", "cam-1500-abcdef", "cam", 1.5, None, 3.0, BOXES[:2], None, None, 7, BOXES[2:]),
    AlertEvent("update", "cam-1500-abcdef", "cam", 1.5, None, 3.5, BOXES, "s.jpg", None, 8, BOXES, 4.0),
    AlertEvent(
        "end",
        "cam-1500-abcdef",
        "cam",
        NAN,
        2.5,
        np.float32(3.25),
        [],
        "s.jpg",
        "recovered",
        np.int64(9),
        BOXES,
        10.0,
        INF,
    ),
]


@pytest.mark.parametrize("result", FRAMES)
def test_frame_message_is_strict_with_the_documented_keys(result):
    msg = strict(frame_message(result))
    assert tuple(msg) == FRAME_KEYS and msg["v"] == schema.SCHEMA_VERSION
    assert isinstance(msg["is_anomalous"], bool) and isinstance(msg["frame_index"], int)
    assert (msg["media_ts"] is None) == (result.wall_ts is None)  # media time only for recorded files
    for r in msg["regions"]:
        assert len(r) == 6 and all(isinstance(v, int) for v in r[:4] + [r[5]])
    fields = frame_fields(frame_message(result))
    assert all(isinstance(v, str) for v in fields.values())
    assert set(fields) == set(FRAME_KEYS) - ({"media_ts"} if msg["media_ts"] is None else set())
    assert json.loads(fields["regions"]) == msg["regions"]


@pytest.mark.parametrize("event", EVENTS)
def test_alert_message_is_strict_with_the_documented_keys(event):
    msg = strict(alert_message(event))
    assert tuple(msg) == ALERT_KEYS and msg["type"] == event.type and msg["v"] == schema.SCHEMA_VERSION


def test_status_message_is_strict_with_the_documented_keys():
    for ts in (1.25, NAN):
        msg = strict(status_message("cam", "online", ts, "up"))
        assert tuple(msg) == STATUS_KEYS and msg["ts"] == (None if math.isnan(ts) else ts)


def test_every_key_is_documented():
    doc = schema.__doc__
    for key in FRAME_KEYS + ALERT_KEYS + STATUS_KEYS:
        assert key in doc, key


def test_bytes_are_those_v1_always_sent():
    """Pinned: the wire format of v1 does not change (these are the bytes before sinks/schema.py existed)."""
    line = json.dumps(frame_message(FRAMES[1]), separators=(",", ":"))
    assert line == (
        '{"v":1,"camera":"cam","frame_index":4,"ts":1700000001.0,"media_ts":12.5,"score":null,'
        '"threshold":0.4,"is_anomalous":false,"regions":[[1,2,30,40,0.1235,77],[5,6,7,8,null,3],'
        "[0,0,1,1,2.5,1]]}"
    )
    assert frame_fields(frame_message(FRAMES[1])) == {
        "v": "1",
        "camera": "cam",
        "frame_index": "4",
        "ts": "1700000001.0",
        "score": "nan",
        "threshold": "0.4",
        "is_anomalous": "0",
        "regions": "[[1,2,30,40,0.1235,77],[5,6,7,8,null,3],[0,0,1,1,2.5,1]]",
        "media_ts": "12.5",
    }
    assert json.dumps(alert_message(EVENTS[2]), separators=(",", ":")) == (
        '{"v":1,"type":"end","alert_id":"cam-1500-abcdef","camera":"cam","start_ts":null,"end_ts":2.5,'
        '"start_media_ts":10.0,"end_media_ts":null,"peak_score":3.25,"regions":[],"peak_regions":'
        '[[1,2,30,40,0.1235,77],[5,6,7,8,null,3],[0,0,1,1,2.5,1]],"snapshot":"s.jpg","reason":"recovered",'
        '"frame_index":9}'
    )
    assert json.dumps(status_message("cam", "offline", NAN), separators=(",", ":")) == (
        '{"v":1,"camera":"cam","state":"offline","ts":null,"detail":""}'
    )
