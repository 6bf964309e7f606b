"""/metrics and /healthz of a running pipeline (real sources, detector and sinks), scraped over HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app.pipeline import Pipeline
from app.prometheus import MetricsServer
from configs.schema import SourceConfig
from sinks import build_sinks
from tests.helpers import base_cfg, wait_for
from tests.servers import free_port

pytestmark = pytest.mark.timeout(240)


def get(url, timeout=10.0):
    """(status, body) of a GET; 5xx answers are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def samples(text):
    """{(sample name, frozenset(labels)): value}"""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(smp, name, **labels):
    return smp[(name, frozenset(labels.items()))]


class Running:
    """A pipeline with a MetricsServer, run on a thread; stopped and joined on exit."""

    def __init__(self, sources, detector, out, **pipeline_kw):
        cfg = base_cfg(**pipeline_kw)
        cfg.sources = sources
        self.pipe = Pipeline(cfg, detector, build_sinks(cfg.sinks, cfg.alerts, out))
        self.metrics = MetricsServer(self.pipe, 0)

    def __enter__(self):
        self.metrics.start()
        self.box = {}
        self.t = threading.Thread(
            target=lambda: self.box.setdefault("s", self.pipe.run(duration_s=180, progress=False))
        )
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.pipe.stop()
        self.t.join(timeout=30)
        self.metrics.stop()
        assert not self.t.is_alive()


def test_metrics_series_and_values_during_a_run(env, detector, tmp_path):
    cam = SourceConfig(name="cam", url=str(env / "clip.mp4"), fps=24, loop=True)  # anomaly at 1-1.8 s
    short = SourceConfig(name="short", url=str(env / "plain.mp4"))  # ends after 30 frames
    with Running([cam, short], detector, tmp_path) as r:
        p = r.pipe
        wait_for(
            lambda: (
                p.stats.camera("cam").processed >= 48
                and p.stats.camera("cam").alerts_opened >= 1
                and p.sources[1].finished
            ),
            timeout=150,
            what="48 frames, an alert and the short file's end",
        )
        code, text = get(r.metrics.url + "/metrics")
        after = p.stats.camera("cam").processed
        code_h, health = get(r.metrics.url + "/healthz")
    assert code == 200
    smp = samples(text)
    processed = value(smp, "spade_frames_processed_total", camera="cam")
    assert 48 <= processed <= after
    assert value(smp, "spade_frames_decoded_total", camera="cam") >= processed
    assert value(smp, "spade_frames_processed_total", camera="short") == 30
    assert value(smp, "spade_frames_decoded_total", camera="short") == 30
    assert value(smp, "spade_frames_dropped_total", camera="short") == 0  # lossless file
    assert value(smp, "spade_frames_dropped_total", camera="cam") >= 0
    assert value(smp, "spade_alerts_opened_total", camera="cam") >= 1
    assert value(smp, "spade_reconnects_total", camera="cam") == 0
    assert value(smp, "spade_camera_fps", camera="cam") > 0
    assert value(smp, "spade_camera_up", camera="cam") == 1 and value(smp, "spade_camera_up", camera="short") == 0
    assert value(smp, "spade_camera_healthy", camera="short") == 1  # ended normally: not unhealthy
    assert value(smp, "spade_source_queue_depth", camera="cam") >= 0
    assert value(smp, "spade_sink_queue_depth") >= 0
    assert value(smp, "spade_sink_errors_total", sink="JsonlSink") == 0
    assert value(smp, "spade_pipeline_frames_total") >= processed + 30 - 8  # batches in the sink queue
    # the latency histogram saw every published frame, and its buckets are cumulative
    count = value(smp, "spade_latency_seconds_count", camera="cam")
    assert count == pytest.approx(processed, abs=8)
    buckets = sorted(
        (float(dict(k)["le"]), v)
        for (n, k), v in smp.items()
        if n == "spade_latency_seconds_bucket" and dict(k)["camera"] == "cam"
    )
    assert buckets[-1][0] == float("inf") and buckets[-1][1] == count
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert value(smp, "spade_latency_seconds_sum", camera="cam") > 0
    # labels are camera and sink names only: no paths or URLs
    assert str(env) not in text and "clip.mp4" not in text
    # own registry: nothing leaked into prometheus_client's global one
    assert REGISTRY.get_sample_value("spade_frames_processed_total", {"camera": "cam"}) is None

    assert code_h == 200, health
    doc = json.loads(health)
    assert doc["status"] == "ok"
    assert doc["cameras"]["short"]["healthy"] and doc["cameras"]["short"]["state"] == "stopped"
    assert doc["cameras"]["cam"]["healthy"] and doc["cameras"]["cam"]["state"] == "streaming"


def test_healthz_503_for_a_dead_camera_and_200_otherwise(env, detector, tmp_path):
    dead = SourceConfig(
        name="dead",
        url=f"rtsp://user:hunter2@127.0.0.1:{free_port()}/x",
        open_timeout_s=1,
        read_timeout_s=1,
        reconnect_base_s=0.2,
        reconnect_max_s=0.5,
        health_timeout_s=2.0,
    )
    ok = SourceConfig(name="ok", url=str(env / "plain.mp4"), fps=24, loop=True)
    with Running([dead, ok], detector, tmp_path) as r:
        p = r.pipe
        # healthy at first: the dead camera has not yet been without frames for its timeout
        code0, doc0 = get(r.metrics.url + "/healthz")
        wait_for(lambda: get(r.metrics.url + "/healthz")[0] == 503, timeout=60, what="/healthz 503")
        code, body = get(r.metrics.url + "/healthz")
        wait_for(lambda: p.stats.camera("ok").processed >= 10, timeout=120, what="ok camera frames")
        metrics = get(r.metrics.url + "/metrics")[1]
        # a 404 for anything else
        assert get(r.metrics.url + "/nope")[0] == 404
    assert code == 503
    doc = json.loads(body)
    assert doc["status"] == "unhealthy"
    assert doc["cameras"]["dead"]["healthy"] is False and "no frame" in doc["cameras"]["dead"]["reason"]
    assert doc["cameras"]["dead"]["timeout_s"] == 2.0
    assert doc["cameras"]["ok"]["healthy"] is True
    assert "hunter2" not in body and "rtsp://" not in body
    smp = samples(metrics)
    assert value(smp, "spade_camera_healthy", camera="dead") == 0
    assert value(smp, "spade_camera_healthy", camera="ok") == 1
    assert value(smp, "spade_reconnects_total", camera="dead") >= 1
    assert "hunter2" not in metrics and "rtsp://" not in metrics
    if code0 == 200:  # (on a very slow start the first probe may already be past the 2 s timeout)
        assert json.loads(doc0)["status"] == "ok"


def test_two_servers_do_not_share_state(env, detector, tmp_path):
    cfg = base_cfg()
    cfg.sources = [SourceConfig(name="a", url=str(env / "plain.mp4"))]
    pipe = Pipeline(cfg, detector, build_sinks(cfg.sinks, cfg.alerts, tmp_path))
    m1, m2 = MetricsServer(pipe, 0), MetricsServer(pipe, 0)  # the same metric names twice: no clash
    with m1, m2:
        assert m1.port != m2.port and m1.port > 0
        assert get(m1.url + "/metrics")[0] == 200 and get(m2.url + "/metrics")[0] == 200
    port = free_port()
    with MetricsServer(pipe, port):
        from configs.errors import UserError

        with pytest.raises(UserError, match="metrics_port"):
            MetricsServer(pipe, port).start()
    pipe.sinks.close()
