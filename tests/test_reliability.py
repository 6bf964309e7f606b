"""Unattended operation: Redis outages through the whole pipeline, cameras that fail in different ways,
and bad input through the command line. Real components throughout (PyAV, the detector, redis-server)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import run_stream
from app.pipeline import Pipeline
from configs.schema import SourceConfig
from sinks import build_sinks
from tests.helpers import DetectorThreadOnly, base_cfg, records, wait_for
from tests.servers import RedisServer, SilentTcpServer, redis_available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


class GatedDetector(DetectorThreadOnly):
    """The real detector; before scoring a batch that reaches frame `hold_at` it waits for `release`
    (the test decides when the file may go on: no reliance on the machine's speed)."""

    def __init__(self, det, hold_at=None):
        super().__init__(det)
        self.hold_at = hold_at
        self.release = threading.Event()
        self.holding = threading.Event()

    def score_batch(self, frames):
        if self.hold_at is not None and max(f.index for f in frames) >= self.hold_at:
            self.holding.set()
            assert self.release.wait(120), "test never released the detector"
        return super().score_batch(frames)


# ------------------------------------------------------------------------------------------------
# Redis outage through the pipeline
# ------------------------------------------------------------------------------------------------


def _redis_run(env, detector, out: Path, outage: bool):
    """two.mp4 (two anomalies) through the pipeline into a persistent redis-server (AOF, fsync always,
    so what it acknowledged survives `kill -9`). With `outage`, Redis is killed once the first alert
    opened and restarted after the second alert ended (while the detector is held at frame 118)."""
    srv = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        cfg = base_cfg()
        cfg.sinks.redis.url = srv.url
        cfg.sinks.redis.spool_dir = str(out / "spool")
        cfg.sinks.jsonl.enabled = True
        cfg.sources = [SourceConfig(name="cam", url=str(env / "two.mp4"))]
        det = GatedDetector(detector, hold_at=118 if outage else None)
        sinks = build_sinks(cfg.sinks, cfg.alerts, out)
        redis_sink = next(s for s in sinks.sinks if type(s).__name__ == "RedisSink")
        pipe = Pipeline(cfg, det, sinks)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("s", pipe.run(duration_s=240, progress=False)))
        t.start()
        try:
            if outage:
                cam = pipe.stats.camera("cam")
                wait_for(lambda: cam.alerts_opened >= 1, timeout=150, what="the first alert")
                srv.kill()
                at_kill = cam.processed
                # the pipeline goes on without Redis: the rest of the first alert and all of the second
                wait_for(det.holding.is_set, timeout=150, what="processing to reach frame 118 with Redis down")
                assert cam.processed >= at_kill + 40 and cam.alerts_opened >= 2
                assert redis_sink.spool.pending_bytes > 0 and not redis_sink.connected
                srv.restart()
                wait_for(
                    lambda: redis_sink.connected and redis_sink.spool.pending_bytes == 0,
                    timeout=60,
                    what="the spool to drain after the restart",
                )
                det.release.set()
            t.join(timeout=200)
            assert not t.is_alive()
        finally:
            det.release.set()
            pipe.stop()
            t.join(timeout=30)
        client = srv.client(decode_responses=True)
        alerts = [json.loads(f["data"]) for _, f in client.xrange("spade:alerts")]
        n_frames = client.xlen("spade:cam:frames")
        return box["s"], alerts, n_frames, redis_sink
    finally:
        srv.close()


@pytest.mark.skipif(not redis_available(), reason="redis-server not installed")
def test_redis_outage_loses_no_alert_and_never_stalls(env, detector, tmp_path):
    base, base_alerts, base_frames, base_sink = _redis_run(env, detector, tmp_path / "a", outage=False)
    out, alerts, n_frames, sink = _redis_run(env, detector, tmp_path / "b", outage=True)

    def key(m):
        return m["type"], m["frame_index"], m.get("reason")

    assert base.cameras["cam"]["processed"] == out.cameras["cam"]["processed"] == 130
    assert base_frames == 130 and base_sink.dropped_frames == 0
    kinds = [m["type"] for m in base_alerts]
    assert kinds.count("new") == 2 and kinds.count("end") == 2, kinds  # two separate anomalies
    # the same alerts, in the same order, none duplicated, despite the outage
    assert [key(m) for m in alerts] == [key(m) for m in base_alerts]
    ids = [(m["alert_id"], m["type"], m["frame_index"]) for m in alerts]
    assert len(ids) == len(set(ids))
    # ... and exactly what the JSONL log (written without any outage) recorded for this run
    jsonl = records(tmp_path / "b" / "events.jsonl", "alert")
    assert [(a["alert_id"], a["event"], a["frame_index"]) for a in jsonl] == ids
    # frame records were dropped during the outage, and counted
    assert sink.dropped_frames > 0 and n_frames < 130
    assert sink.spool_overflows == 0 and sink.spool.pending_bytes == 0
    assert out.sink_errors == {}


# ------------------------------------------------------------------------------------------------
# cameras failing
# ------------------------------------------------------------------------------------------------


def test_silent_camera_does_not_hang_the_pipeline(env, detector, tmp_path):
    """A server that accepts the TCP connection and never answers: the other camera keeps processing,
    the silent one is retried, and shutdown completes promptly."""
    with SilentTcpServer() as silent:
        cfg = base_cfg()
        cfg.sources = [
            SourceConfig(
                name="silent",
                url=silent.url,
                open_timeout_s=2,
                read_timeout_s=2,
                reconnect_base_s=0.2,
                reconnect_max_s=0.5,
            ),
            SourceConfig(name="ok", url=str(env / "plain.mp4"), fps=24, loop=True),
        ]
        pipe = Pipeline(cfg, detector, build_sinks(cfg.sinks, cfg.alerts, tmp_path))
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("s", pipe.run(duration_s=240, progress=False)))
        t.start()
        try:
            wait_for(
                lambda: pipe.stats.camera("ok").processed >= 40 and pipe.sources[0].reconnects >= 2,
                timeout=150,
                what="40 frames of the good camera and 2 retries of the silent one",
            )
            # stop while the silent camera is (most likely) blocked inside a connection attempt
            wait_for(lambda: pipe.sources[0].state.value == "connecting" or silent.accepted >= 3, timeout=30)
        finally:
            t0 = time.monotonic()
            pipe.stop()
            t.join(timeout=60)
            stop_s = time.monotonic() - t0
    assert not t.is_alive()
    # bounded by the 2 s open timeout plus closing the sinks, never by the silent server
    assert stop_s < 30, stop_s
    cams = box["s"].cameras
    assert cams["ok"]["processed"] >= 40 and cams["ok"]["error"] is None
    assert cams["silent"]["processed"] == 0 and cams["silent"]["reconnects"] >= 2
    assert silent.accepted >= 2
    status = {r["camera"]: r["state"] for r in records(tmp_path / "events.jsonl", "status")}
    assert status["silent"] == "offline"


def test_duration_ends_the_run_while_no_camera_delivers(env, detector, tmp_path):
    """One file ended, the other camera is down: `duration_s` still ends the run, and the ended file's
    camera is announced (status offline) while the dead one keeps being retried."""
    from tests.servers import free_port

    cfg = base_cfg()
    cfg.sources = [
        SourceConfig(
            name="dead",
            url=f"rtsp://127.0.0.1:{free_port()}/x",
            open_timeout_s=1,
            read_timeout_s=1,
            reconnect_base_s=0.2,
            reconnect_max_s=0.5,
        ),
        SourceConfig(name="file", url=str(env / "plain.mp4")),
    ]
    pipe = Pipeline(cfg, detector, build_sinks(cfg.sinks, cfg.alerts, tmp_path))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", pipe.run(duration_s=8, progress=False)))
    t.start()
    t.join(timeout=120)
    if t.is_alive():
        pipe.stop()
        t.join(timeout=30)
        pytest.fail("duration_s did not end the run")
    s = box["s"]
    assert s.reason == "duration"
    assert s.cameras["file"]["processed"] == 30 and s.cameras["dead"]["reconnects"] >= 1
    status = [(r["camera"], r["state"]) for r in records(tmp_path / "events.jsonl", "status")]
    assert ("file", "offline") in status


# ------------------------------------------------------------------------------------------------
# bad input through the command line
# ------------------------------------------------------------------------------------------------

TINY = """
detector:
  backbone: {name: resnet18, weights: random}
  input_size: 64
  grid: 8
  batch_size: 4
bank: {holdout: 0.0}
pipeline: {progress: false}
"""


def make_video(path, n=6, size=(64, 48), codec="libx264", pix_fmt="yuv420p", rate=25, fmt=None, pts=None):
    """A brightness ramp; `pts` (ms) gives a variable frame rate."""
    w, h = size
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (20 * i) % 256
            img[..., 1] = 90
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts[i], Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _truncated(d):
    data = make_video(d / "full.mp4", n=12).read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return d / "truncated.mp4"


def _random(d):
    (d / "random.mp4").write_bytes(random.Random(1).randbytes(30000))
    return d / "random.mp4"


def _empty(d):
    (d / "empty.mp4").write_bytes(b"")
    return d / "empty.mp4"


def _missing(d):
    return d / "missing.mp4"


def _folder_without_images(d):
    (d / "noimg").mkdir()
    (d / "noimg" / "readme.txt").write_text("x")
    return d / "noimg"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A config and a bank fitted through the CLI (random-weight resnet18: scores do not matter here)."""
    d = tmp_path_factory.mktemp("tiny")
    (d / "c.yaml").write_text(TINY)
    (d / "normal").mkdir()
    make_video(d / "normal" / "n.mp4", n=10)
    assert (
        run_stream.main(
            ["fit", "--config", str(d / "c.yaml"), "--data", str(d / "normal"), "--bank", str(d / "bank"), "--quiet"]
        )
        == 0
    )
    return d


def cli(capsys, *args):
    """run_stream.main in-process (the CLI's own parser and handlers, without a new interpreter)."""
    capsys.readouterr()
    rc = run_stream.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err):
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize(
    "make,expect",
    [
        (_truncated, "not a decodable video"),
        (_random, "not a decodable video"),
        (_empty, "empty"),
        (_missing, "no such file"),
        (_folder_without_images, "no images"),
    ],
)
def test_run_bad_file_exits_2_naming_it(tiny, tmp_path, capsys, make, expect):
    path = make(tmp_path)
    rc, out, err = cli(
        capsys,
        "run",
        "--config",
        tiny / "c.yaml",
        "--bank",
        tiny / "bank",
        "--source",
        f"cam={path}",
        "--out",
        tmp_path / "out",
        "--no-progress",
    )
    assert rc == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and path.name in lines[0] and expect in lines[0], err
    assert "Traceback" not in err


def _vfr(d):
    pts = [0, 40, 80, 200, 240, 600, 640, 680]  # gaps of 40..360 ms
    return make_video(d / "vfr.mkv", n=len(pts), fmt="matroska", pts=pts), len(pts)


def _image_folder(d):
    f = d / "frames"
    f.mkdir()
    for i in range(5):
        cv2.imwrite(str(f / f"{i:03d}.png"), np.full((40, 56, 3), 30 * i, np.uint8))
    (f / "notes.txt").write_text("not an image")
    (f / "005.jpg").write_bytes(b"not a jpeg either")
    return f, 5


@pytest.mark.parametrize("name", ["1x1", "4k", "gray", "yuv444", "10bit", "vfr", "images"])
def test_run_odd_but_valid_input_is_processed(tiny, tmp_path, capsys, name):
    makers = {
        "1x1": lambda d: (make_video(d / "one.mp4", n=1, size=(1, 1), pix_fmt="yuv444p"), 1),
        "4k": lambda d: (make_video(d / "4k.avi", n=2, size=(3840, 2160), codec="mjpeg", pix_fmt="yuvj420p"), 2),
        "gray": lambda d: (make_video(d / "gray.mkv", codec="ffv1", pix_fmt="gray"), 6),
        "yuv444": lambda d: (make_video(d / "444.mp4", pix_fmt="yuv444p"), 6),
        "10bit": lambda d: (make_video(d / "10bit.mp4", pix_fmt="yuv420p10le"), 6),
        "vfr": _vfr,
        "images": _image_folder,
    }
    try:
        path, n = makers[name](tmp_path)
    except (av.error.FFmpegError, ValueError) as e:
        pytest.skip(f"this FFmpeg cannot write {name}: {e}")
    out = tmp_path / "out"
    rc, stdout, err = cli(
        capsys,
        "run",
        "--config",
        tiny / "c.yaml",
        "--bank",
        tiny / "bank",
        "--source",
        f"cam={path}",
        "--out",
        out,
        "--video-out",
        out / "video",
        "--no-progress",
    )
    assert rc == 0, err
    assert not error_lines(err) and "Traceback" not in err
    summary = json.loads(stdout)
    assert summary["cameras"]["cam"]["processed"] == n and summary["sink_errors"] == {}
    frames = records(out / "events.jsonl", "frame")
    assert [f["frame_index"] for f in frames] == list(range(n))
    ts = [f["media_ts"] for f in frames]
    assert ts == sorted(ts)
    if name == "vfr":  # media time is kept, not a constant rate
        assert ts[-1] - ts[0] == pytest.approx(0.68, abs=0.01)
    with av.open(str(out / "video" / "cam.mp4")) as c:  # annotated video finalised
        assert sum(1 for _ in c.decode(video=0)) == n


@pytest.mark.parametrize(
    "yaml_text,args,fields",
    [
        ("sources:\n  - {name: cam, url: x.mp4, colour: red}\n", [], ["sources.0.colour"]),
        ("pipeline: {max_batch: many, metrics_port: -1}\n", [], ["pipeline.max_batch", "pipeline.metrics_port"]),
        ("sinks:\n  redis: {url: 5, spool_max_mb: 0}\n", [], ["sinks.redis.url", "sinks.redis.spool_max_mb"]),
        ("detector: [1, 2]\n", [], ["detector"]),
        ("", ["--metrics-port", "70000"], ["metrics_port"]),
        ("", ["--source", "bad name=x.mp4"], ["--source bad name"]),
    ],
)
def test_run_bad_config_names_each_field(tiny, tmp_path, capsys, yaml_text, args, fields):
    p = tmp_path / "bad.yaml"
    p.write_text(TINY + yaml_text if not yaml_text.startswith("detector") else yaml_text)
    rc, _, err = cli(capsys, "run", "--config", p, "--bank", tiny / "bank", "--out", tmp_path / "o", *args)
    assert rc == 2, err
    lines = error_lines(err)
    for f in fields:
        assert sum(f in ln for ln in lines) == 1, (f, lines)
    assert "Traceback" not in err


def test_run_bad_bank(tiny, tmp_path, capsys):
    (tmp_path / "empty_bank").mkdir()
    good = make_video(tmp_path / "ok.mp4")
    rc, _, err = cli(
        capsys,
        "run",
        "--config",
        tiny / "c.yaml",
        "--bank",
        tmp_path / "empty_bank",
        "--source",
        f"cam={good}",
        "--out",
        tmp_path / "o",
    )
    assert rc == 2 and "empty_bank" in error_lines(err)[0], err
    mismatched = tmp_path / "grid4.yaml"
    mismatched.write_text(TINY.replace("grid: 8", "grid: 4"))
    rc, _, err = cli(
        capsys,
        "run",
        "--config",
        mismatched,
        "--bank",
        tiny / "bank",
        "--source",
        f"cam={good}",
        "--out",
        tmp_path / "o",
    )
    lines = error_lines(err)
    assert rc == 2 and str(tiny / "bank") in lines[0] and "grid" in lines[0], err
    # a bank cut short on disk
    import shutil

    cut = tmp_path / "cut_bank"
    shutil.copytree(tiny / "bank", cut)
    victim = max((p for p in cut.iterdir() if p.suffix in (".npy", ".bin", ".f16")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    rc, _, err = cli(
        capsys, "run", "--config", tiny / "c.yaml", "--bank", cut, "--source", f"cam={good}", "--out", tmp_path / "o"
    )
    assert rc == 2 and "cut_bank" in error_lines(err)[0] and "Traceback" not in err, err


def test_fit_with_a_bad_file_among_good_ones(tiny, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    make_video(d / "a.mp4", n=6)
    (d / "b.mp4").write_bytes(b"")
    rc, _, err = cli(capsys, "fit", "--config", tiny / "c.yaml", "--data", d, "--bank", tmp_path / "bank", "--quiet")
    assert rc == 2 and "b.mp4" in error_lines(err)[0] and "Traceback" not in err, err
    assert not (tmp_path / "bank" / "meta.json").exists()


def test_cli_bad_source_among_good_ones_is_refused_before_anything_starts(tiny, tmp_path):
    """A real `run_stream.py run` process: a file that cannot be decoded is bad input, refused up front
    (exit 2, one line naming the camera and its file) before the model loads, like `fit` refuses a bad
    file among good ones; nothing is started, so nothing is half-written."""
    good = make_video(tmp_path / "good.mp4", n=20)
    bad = _random(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_stream.py"),
            "run",
            "--config",
            str(tiny / "c.yaml"),
            "--bank",
            str(tiny / "bank"),
            "--source",
            f"good={good}",
            "--source",
            f"bad={bad}",
            "--out",
            str(out),
            "--video-out",
            str(out / "video"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "sources.bad" in lines[0] and "random.mp4" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout.strip() == ""
    assert not (out / "events.jsonl").exists() and not (out / "video").exists()


def test_a_source_failing_mid_run_leaves_everything_of_the_good_one(tiny, tmp_path):
    """A source that fails after the run started (here: the pipeline is given one the start-up check
    never saw) fails alone: the good camera is processed completely and its annotated video finalised."""
    import configs
    from configs.schema import SourceConfig
    from tests.helpers import run as run_pipeline

    good = make_video(tmp_path / "good.mp4", n=20)
    bad = _random(tmp_path)
    out = tmp_path / "out"
    cfg = configs.load(str(tiny / "c.yaml"))
    cfg.sinks.video.dir = str(out / "video")
    _, summary = run_pipeline(
        cfg, tiny / "bank", out, [SourceConfig(name="good", url=str(good)), SourceConfig(name="bad", url=str(bad))]
    )
    frames = [f for f in records(out / "events.jsonl", "frame") if f["camera"] == "good"]
    assert [f["frame_index"] for f in frames] == list(range(20))
    with av.open(str(out / "video" / "good.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 20
    assert not (out / "video" / "bad.mp4").exists()
    assert summary.cameras["good"]["processed"] == 20 and summary.cameras["bad"]["state"] == "failed"
    assert "random.mp4" in summary.cameras["bad"]["error"]
