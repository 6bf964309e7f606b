"""SIGTERM to a real `run_stream.py run` process while an alert is open: exit code 0, every sink
flushed, the annotated video finalised and decodable, the open alert ended with reason "shutdown".
The same process serves /metrics and /healthz (the CLI's --metrics-port wiring)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import av
import pytest
import yaml

from tests.helpers import base_cfg, records, shared_env, wait_for
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(400)


def _alerts(path: Path):
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line being written
            continue
        if r.get("type") == "alert":
            out.append(r)
    return out


def test_sigterm_mid_run_finalises_everything(tmp_path_factory, tmp_path):
    env = shared_env(tmp_path_factory)
    cfg = base_cfg()
    cfg.alerts.exit_duration_s = 2.0  # the clip's 8 normal frames per loop never end the alert
    tree = cfg.model_dump(mode="json")
    # the object is in view from frame 8 to the end of the clip; looped and paced: runs until signalled
    tree["sources"] = [{"name": "cam", "url": str(env / "long_anomaly.mp4"), "fps": 24, "loop": True}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    out, port = tmp_path / "out", free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run_stream.py"),
            "run",
            "--config",
            str(tmp_path / "c.yaml"),
            "--bank",
            str(env / "bank"),
            "--out",
            str(out),
            "--video-out",
            str(out / "video"),
            "--metrics-port",
            str(port),
            "--no-progress",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        events = out / "events.jsonl"
        wait_for(
            lambda: any(a["event"] == "new" for a in _alerts(events)) or proc.poll() is not None,
            timeout=240,
            interval=0.2,
            what="an alert to open",
        )
        assert proc.poll() is None, proc.communicate()[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'spade_alerts_opened_total{camera="cam"} 1.0' in text
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["reason"] == "shutdown"
    processed = summary["cameras"]["cam"]["processed"]
    assert processed > 0 and summary["sink_errors"] == {}
    # JSONL: every published frame, and the open alert ended because of the shutdown
    frames = records(events, "frame")
    assert len(frames) == processed
    alerts = records(events, "alert")
    assert [a["event"] for a in alerts].count("new") == 1
    assert alerts[-1]["event"] == "end" and alerts[-1]["reason"] == "shutdown"
    assert alerts[-1]["alert_id"] == alerts[0]["alert_id"]
    status = [r for r in records(events, "status") if r["camera"] == "cam"]
    assert status[-1]["state"] == "offline"
    # the annotated video is finalised: PyAV decodes every frame that was published
    with av.open(str(out / "video" / "cam.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == processed
    # the snapshot of the alert exists
    assert alerts[-1]["snapshot"] and Path(alerts[-1]["snapshot"]).is_file()
    # the metrics port is closed again
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert os.path.getsize(events) > 0
