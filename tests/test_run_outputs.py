"""What a run prints and writes: strict JSON, exit codes, the progress line, one time base and ordered
messages (issue 16: items 6, 7, 9 and 10)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from app.pipeline import ProgressDisplay
from app.stats import PipelineStats
from configs.schema import SourceConfig
from tests.helpers import ANOMALY, base_cfg, run

ROOT = Path(__file__).resolve().parents[1]

# base_cfg() as YAML, for the command line (the shared bank was fitted with it)
CFG = """
detector:
  backbone: {name: efficientnet_lite0}
  input_size: 128
  grid: 16
  batch_size: 8
  frame_score: map_max
  smooth_window: 1
bank: {holdout: 0.25, max_frames: null, target_false_alarms_per_hour: 1.0}
regions: {min_area: 16}
alerts: {min_duration_s: 0.1, exit_duration_s: 0.2}
pipeline: {max_batch: 4, max_wait_ms: 10, progress: false}
"""


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as jq and JSON.parse do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "run_stream.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(CFG)
    return p


def test_run_without_any_frame_prints_strict_json_and_exits_3(env, tmp_path, cfg_file):
    r = cli(
        "run",
        "--config",
        cfg_file,
        "--bank",
        env / "bank",
        "--source",
        "cam=rtsp://127.0.0.1:1/none",
        "--duration",
        "3",
        "--no-progress",
        "--out",
        tmp_path / "out",
    )
    assert r.returncode == 3, r.stderr
    summary = strict_loads(r.stdout)
    cam = summary["cameras"]["cam"]
    assert cam["processed"] == 0 and cam["latency_p50_ms"] is None and cam["latency_p99_ms"] is None
    assert "error: no camera delivered a frame" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["missing", "undecodable"])
def test_bad_source_file_is_refused_before_the_model_loads(tmp_path, cfg_file, kind):
    path = tmp_path / "cam.mp4"
    if kind == "undecodable":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    # the bank does not exist either: naming the source proves it was checked first
    r = cli(
        "run",
        "--config",
        cfg_file,
        "--bank",
        tmp_path / "no_bank",
        "--source",
        f"cam={path}",
        "--no-progress",
        "--out",
        tmp_path / "out",
    )
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors and "sources.cam" in errors[0] and str(path) in errors[0], r.stderr
    assert "no_bank" not in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.strip() == ""  # a run that never started prints no summary


def test_progress_log_line_names_every_column_and_no_nan(caplog):
    stats = PipelineStats()
    src = SimpleNamespace(name="gate", state=SimpleNamespace(value="reconnecting"), dropped=0, reconnects=5)
    display = ProgressDisplay(SimpleNamespace(sources=[src], stats=stats), enabled=True)
    display.tty = False
    with caplog.at_level(logging.INFO, logger="app.pipeline"):
        display._render()
    line = caplog.records[-1].getMessage()
    assert line == (
        "camera=gate state=reconnecting fps=0.0 lat_p50=- lat_p99=- frames=0 dropped=0 reconnects=5 alerts=0"
    )
    assert "nan" not in " ".join(display.rows()).lower()
    stats.camera("gate").record(0.040, time.monotonic())
    assert "lat_p50=40ms" in " ".join(f"{k}={v}" for k, v in display.values()[0].items())


def test_file_messages_have_epoch_times_media_times_and_order(env, tmp_path):
    cfg = base_cfg()
    t0 = time.time()
    run(
        cfg,
        env / "bank",
        tmp_path,
        [
            SourceConfig(name="cam", url=str(env / "clip.mp4")),
            SourceConfig(name="long", url=str(env / "long_anomaly.mp4")),
        ],
    )
    t1 = time.time()
    path = tmp_path / "events.jsonl"
    lines = [strict_loads(x) for x in path.read_text().splitlines()]
    for camera in ("cam", "long"):
        mine = [x for x in lines if x["camera"] == camera]
        frames = [x for x in mine if x["type"] == "frame"]
        assert len(frames) == 64
        for f in frames:  # one time base: epoch seconds; the file's own clock in media_ts
            assert t0 <= f["ts"] <= t1
            assert f["media_ts"] == pytest.approx(f["frame_index"] / 24.0, abs=1e-3)
        alerts = [x for x in mine if x["type"] == "alert"]
        assert alerts and alerts[0]["event"] == "new" and alerts[-1]["event"] == "end"
        new, end = alerts[0], alerts[-1]
        assert t0 <= new["start_ts"] <= end["end_ts"] <= t1
        assert new["alert_id"].startswith(f"{camera}-{int(round(new['start_ts'] * 1000))}-")
        assert new["start_media_ts"] < end["end_media_ts"]
        by_index = {f["frame_index"]: f for f in frames}
        for a in alerts:  # each message's regions are those of the frame it names
            assert a["regions"] == by_index[a["frame_index"]]["regions"], a
            assert a["peak_regions"], a  # what the snapshot shows
        kinds = [(x["type"], x.get("event") or x.get("state")) for x in mine]
        assert kinds.count(("status", "offline")) == 1 and kinds[-1] == ("status", "offline"), kinds[-4:]
        if camera == "cam":  # recovered inside the clip: the ending frame shows nothing
            assert ANOMALY[0] / 24.0 - 0.2 <= new["start_media_ts"] <= ANOMALY[1] / 24.0
            assert end["reason"] == "recovered" and end["regions"] == []
        else:  # the input ended during the alert: last frame, then the alert's end, then offline
            assert end["reason"] == "source_ended" and end["frame_index"] == 63
            assert kinds[-3:] == [("frame", None), ("alert", "end"), ("status", "offline")]
