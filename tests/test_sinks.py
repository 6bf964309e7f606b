"""Sinks with real components: JSONL file, H.264 files decoded back with PyAV, JPEG snapshots, overlay."""

from __future__ import annotations

import json
import math

import av
import cv2
import numpy as np
import pytest

from configs.schema import AlertsConfig, JsonlSinkConfig, SinksConfig, VideoSinkConfig
from detector.result import FrameResult, Region
from sinks import SinkSet, build_sinks
from sinks.alerts import AlertTracker
from sinks.annotate import Annotator, annotate_frame
from sinks.jsonl import JsonlSink
from sinks.snapshots import SnapshotWriter
from sinks.video import VideoSink
from stream.frame import Frame

W, H = 96, 64
BOX = Region(20, 10, 50, 40, 0.9, 0.6, 600)
ALERTS = AlertsConfig(min_duration_s=0.2, exit_duration_s=0.2, update_interval_s=0.2)


def make(i, score, camera="cam", fps=10.0, size=(W, H), threshold=1.0, seed=None, pixel_threshold=None):
    rng = np.random.default_rng(i if seed is None else seed)
    w, h = size
    ts = 500.0 + i / fps
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    amap = rng.random((256, 256), dtype=np.float32)
    regions = [BOX] if score >= threshold else []
    res = FrameResult(camera, i, ts, float(score), threshold, amap, regions, (w, h), pixel_threshold=pixel_threshold)
    return res, Frame(camera, i, ts, img)


def scores_with_one_alert(n=30):
    return [0.3] * 8 + [1.5, 2.0, 2.5, 3.0, 2.5, 2.0] + [0.2] * (n - 14)


def decode(path):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return frames


# -- JSONL -----------------------------------------------------------------------------------------
def test_jsonl_frames_alerts_status_and_snapshots(tmp_path):
    path = tmp_path / "out" / "events.jsonl"
    ss = SinkSet([JsonlSink(path)], AlertTracker(ALERTS), SnapshotWriter(tmp_path / "snaps"))
    ss.camera_status("cam", "online", "opened")
    scores = scores_with_one_alert()
    for i, s in enumerate(scores):
        ss.publish(*make(i, s))
    ss.close()

    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert all(l["v"] == 1 for l in lines)
    assert lines[0]["type"] == "status" and lines[0]["state"] == "online" and lines[0]["camera"] == "cam"
    frames = [l for l in lines if l["type"] == "frame"]
    assert [f["frame_index"] for f in frames] == list(range(len(scores)))
    f9 = frames[9]
    assert f9 == {
        "type": "frame",
        "v": 1,
        "camera": "cam",
        "frame_index": 9,
        "ts": 500.9,
        "score": 2.0,
        "threshold": 1.0,
        "is_anomalous": True,
        "regions": [[20, 10, 50, 40, 0.9, 600]],
        "media_ts": None,
    }

    alerts = [l for l in lines if l["type"] == "alert"]
    assert [a["event"] for a in alerts][0] == "new" and alerts[-1]["event"] == "end"
    assert {a["event"] for a in alerts} <= {"new", "update", "end"}
    assert len({a["alert_id"] for a in alerts}) == 1
    end = alerts[-1]
    assert end["reason"] == "recovered" and end["peak_score"] == 3.0 and end["end_ts"] is not None
    # one stable snapshot path for the whole alert, written, and showing the peak by the end
    snaps = {a["snapshot"] for a in alerts}
    assert len(snaps) == 1
    snap = cv2.imread(snaps.pop())
    assert snap is not None and snap.shape == (H, W, 3)
    # every frame line precedes the alert lines it caused
    idx_new = next(k for k, l in enumerate(lines) if l["type"] == "alert")
    assert lines[idx_new - 1]["type"] == "frame" and lines[idx_new - 1]["frame_index"] == alerts[0]["frame_index"]


def test_jsonl_appends_and_writes_valid_json_for_nan(tmp_path):
    path = tmp_path / "e.jsonl"
    s = JsonlSink(path)
    s.write(*make(0, 0.5))
    s.close()
    s.close()  # idempotent
    s = JsonlSink(path)
    s.write(*make(1, float("nan")))
    s.close()
    lines = [json.loads(l) for l in path.read_text().splitlines()]  # strict JSON: no NaN tokens
    assert [l["frame_index"] for l in lines] == [0, 1]
    assert lines[1]["score"] is None


# -- video -----------------------------------------------------------------------------------------
def test_video_sink_decodes_to_right_count_and_size(tmp_path):
    sink = VideoSink(VideoSinkConfig(dir=str(tmp_path / "vid")), fps_hint=10)
    for i in range(25):
        sink.write(*make(i, 0.5 + i / 10))
        sink.write(*make(i, 0.2, camera="other", size=(80, 48)))
    sink.close()
    sink.close()
    frames = decode(tmp_path / "vid" / "cam.mp4")
    assert len(frames) == 25 and frames[0].shape == (H, W, 3)
    other = decode(tmp_path / "vid" / "other.mp4")
    assert len(other) == 25 and other[0].shape == (48, 80, 3)
    with av.open(str(tmp_path / "vid" / "cam.mp4")) as c:
        assert c.streams.video[0].codec_context.name in ("h264", "libx264", "mpeg4")


def test_video_sink_segments_on_frame_time(tmp_path):
    cfg = VideoSinkConfig(dir=str(tmp_path), segment_s=1.0)
    sink = VideoSink(cfg, fps_hint=10)
    for i in range(25):  # 2.5 s of frame time -> 1.0 + 1.0 + 0.5 s
        sink.write(*make(i, 0.5))
    sink.close()
    files = sorted(tmp_path.glob("cam_*.mp4"))
    assert [f.name for f in files] == ["cam_0.mp4", "cam_1.mp4", "cam_2.mp4"]
    assert [len(decode(f)) for f in files] == [10, 10, 5]
    # a restarted run continues the numbering instead of overwriting earlier recordings
    sink = VideoSink(cfg, fps_hint=10)
    sink.write(*make(0, 0.5))
    sink.close()
    assert (tmp_path / "cam_3.mp4").exists() and len(decode(tmp_path / "cam_3.mp4")) == 1


def test_video_sink_resizes_frames_after_a_resolution_change(tmp_path):
    sink = VideoSink(VideoSinkConfig(dir=str(tmp_path)), fps_hint=25)
    sink.write(*make(0, 0.5))
    sink.write(*make(1, 0.5, size=(128, 96)))
    sink.close()
    frames = decode(tmp_path / "cam.mp4")
    assert len(frames) == 2 and all(f.shape == (H, W, 3) for f in frames)


# -- snapshots and overlay -------------------------------------------------------------------------
def test_snapshot_written_atomically_with_stable_path(tmp_path):
    sw = SnapshotWriter(tmp_path)
    p1 = sw.save("cam", "cam-1-abc", *reversed(make(3, 2.0, pixel_threshold=0.5)))
    p2 = sw.save("cam", "cam-1-abc", *reversed(make(4, 3.0, pixel_threshold=0.5)))
    assert p1 == p2 == str(tmp_path / "cam" / "cam-1-abc.jpg")
    img = cv2.imread(p1)
    assert img is not None and img.shape == (H, W, 3)
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["cam-1-abc.jpg"]  # no temp files left


@pytest.mark.parametrize("pixel_threshold", [None, 0.5])
def test_annotate_returns_same_size_rgb(pixel_threshold):
    ann = Annotator(timeline_s=2.0)
    for i in range(30):
        res, frame = make(i, 0.5 + i / 20, pixel_threshold=pixel_threshold)
        out = ann.annotate(frame, res)
        assert out.shape == frame.image.shape and out.dtype == np.uint8
        assert out is not frame.image and not np.shares_memory(out, frame.image)
    assert not np.array_equal(out, frame.image)


def test_calm_map_leaves_the_picture_untouched_below_the_bars():
    res, frame = make(0, 0.1)
    img = np.full((240, 320, 3), 128, np.uint8)
    frame = Frame("cam", 0, res.timestamp, img)
    res.anomaly_map = np.full((256, 256), 0.1, np.float32)  # far below the pixel threshold
    res.frame_size = (320, 240)
    res.pixel_threshold = 1.0
    out = annotate_frame(frame.image, res)
    assert np.array_equal(out[40:200], img[40:200])
    res.pixel_threshold = 0.05  # the same map from a camera whose bank calls 0.1 anomalous: tinted
    assert not np.array_equal(annotate_frame(frame.image, res)[40:200], img[40:200])
    res.pixel_threshold = 1.0
    hot = res.anomaly_map.copy()
    hot[100:160, 100:160] = 3.0
    res.anomaly_map = hot
    out = annotate_frame(frame.image, res)
    assert not np.array_equal(out[40:200], img[40:200])
    res.anomaly_map = np.full((256, 256), math.nan, np.float32)
    assert annotate_frame(frame.image, res).shape == img.shape  # garbage in: still a picture out


# -- SinkSet / build_sinks -------------------------------------------------------------------------
class Broken:
    def __init__(self):
        self.closed = False

    def write(self, result, frame):
        raise RuntimeError("disk full")

    def alert(self, event):
        raise RuntimeError("disk full")

    def camera_status(self, camera, state, detail=""):
        raise RuntimeError("disk full")

    def close(self):
        self.closed = True
        raise RuntimeError("disk full")


def test_one_failing_sink_never_stops_the_others(tmp_path):
    broken = Broken()
    good = JsonlSink(tmp_path / "e.jsonl")
    ss = SinkSet([broken, good], AlertTracker(ALERTS))
    ss.camera_status("cam", "online")
    for i, s in enumerate([2.0] * 5):
        ss.publish(*make(i, s))
    events = ss.close("shutdown")
    assert [e.reason for e in events] == ["shutdown"]
    assert broken.closed and ss.errors["Broken"] >= 8
    kinds = [json.loads(l)["type"] for l in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert kinds.count("frame") == 5 and kinds.count("alert") == 2 and kinds[0] == "status"
    assert ss.publish(*make(9, 2.0)) == []  # closed: ignored


def test_build_sinks_defaults(tmp_path):
    ss = build_sinks(SinksConfig(video=VideoSinkConfig(dir=str(tmp_path / "v"))), ALERTS, tmp_path, fps_hint=10)
    assert sorted(type(s).__name__ for s in ss.sinks) == ["JsonlSink", "VideoSink"]
    for i, s in enumerate([2.0] * 5):
        ss.publish(*make(i, s))
    ss.close("source_ended")
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 5 + 2
    assert json.loads(lines[-1])["reason"] == "source_ended"
    assert len(list((tmp_path / "snapshots" / "cam").glob("*.jpg"))) == 1
    assert len(decode(tmp_path / "v" / "cam.mp4")) == 5

    off = build_sinks(SinksConfig(jsonl=JsonlSinkConfig(enabled=False)), ALERTS, None)
    assert off.sinks == [] and off.snapshots is None
    off.close()


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1), (2, 2)])
def test_overlay_on_tiny_frames(size):
    """OpenCV takes a 1x1 array for a scalar in min/max: a 1x1 frame once failed in the video sink."""
    w, h = size
    res, _ = make(0, 2.0, size=size)
    res.anomaly_map = np.full((256, 256), 3.0, np.float32)
    out = annotate_frame(np.zeros((h, w, 3), np.uint8), res)  # no pixel threshold: the frame's own scale
    assert out.shape == (h, w, 3) and out.any()
