"""Prometheus `/metrics` and a `/healthz` probe for a running `Pipeline`.

    server = MetricsServer(pipeline, port=9100)   # port 0: any free port, see `.port`
    server.start(); pipeline.run(); server.stop()

Everything lives in the server's own `CollectorRegistry` (no process-global state, so tests and
several pipelines in one process never collide). Counters and gauges are read from the pipeline at
scrape time (a custom collector); the end-to-end latency histogram is fed by a pipeline observer
on every published frame.

Labels are camera names (validated `[A-Za-z0-9_.-]+` by the config) and sink class names, never
URLs, hosts or credentials.

Series (all prefixed `spade_`):
    camera_fps{camera}                      frames published per second over the last 5 s
    camera_up{camera}                       1 while the source is streaming
    camera_healthy{camera}                  what /healthz says about it (1/0)
    frames_decoded_total{camera}            frames the source decoded
    frames_processed_total{camera}          frames scored and published
    frames_dropped_total{camera}            frames a live/paced source discarded (consumer too slow)
    reconnects_total{camera}                reconnect attempts
    alerts_opened_total{camera}             alerts that reached "new"
    source_queue_depth{camera}              frames waiting in the source's buffer
    sink_queue_depth                        batches waiting for the sink thread
    sink_errors_total{sink}                 exceptions raised by a sink (and the alert tracker/snapshots)
    latency_seconds{camera}                 histogram: capture (or arrival, for unpaced files) to publish
    pipeline_frames_total, detector_errors_total
    redis_connected, redis_dropped_frames_total, redis_delivered_alerts_total,
    redis_spool_pending_bytes, redis_spool_overflows_total   (only with a Redis sink)

`/healthz`: 200 `{"status": "ok", "cameras": {...}}`, or 503 with `"status": "unhealthy"` when a camera
failed or produced no frame for longer than its health timeout (see `Source.health`). A file that
ended normally is healthy.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from configs import jsonsafe
from configs.errors import UserError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _sink_name(sink) -> str:
    return type(sink).__name__


def camera_health(pipeline) -> dict:
    """Per-camera health dicts as served by /healthz (see `Source.health`)."""
    cams = {}
    for s in pipeline.sources:
        health = getattr(s, "health", None)
        cams[s.name] = health() if health is not None else {"healthy": True, "state": s.state.value}
    return cams


class _PipelineCollector:
    """Reads the pipeline's counters at scrape time."""

    def __init__(self, pipeline) -> None:
        self.p = pipeline

    def collect(self):
        p = self.p
        now = time.monotonic()
        cam = ["camera"]
        fps = GaugeMetricFamily("spade_camera_fps", "Frames published per second (5 s window)", labels=cam)
        up = GaugeMetricFamily("spade_camera_up", "1 while the camera/file is streaming", labels=cam)
        healthy = GaugeMetricFamily("spade_camera_healthy", "1 when /healthz considers the camera healthy", labels=cam)
        decoded = CounterMetricFamily("spade_frames_decoded", "Frames decoded by the source", labels=cam)
        processed = CounterMetricFamily("spade_frames_processed", "Frames scored and published", labels=cam)
        dropped = CounterMetricFamily(
            "spade_frames_dropped",
            "Frames the source buffer discarded because the consumer was slower than the camera",
            labels=cam,
        )
        reconnects = CounterMetricFamily("spade_reconnects", "Reconnect attempts", labels=cam)
        alerts = CounterMetricFamily("spade_alerts_opened", "Alerts opened", labels=cam)
        depth = GaugeMetricFamily("spade_source_queue_depth", "Frames waiting in the source buffer", labels=cam)
        health = camera_health(p)
        for s in p.sources:
            st = p.stats.camera(s.name)
            name = [s.name]
            fps.add_metric(name, st.fps(now))
            up.add_metric(name, 1.0 if s.state.value == "streaming" else 0.0)
            healthy.add_metric(name, 1.0 if health.get(s.name, {}).get("healthy", True) else 0.0)
            decoded.add_metric(name, float(s.decoded))
            processed.add_metric(name, float(st.processed))
            dropped.add_metric(name, float(s.dropped))
            reconnects.add_metric(name, float(s.reconnects))
            alerts.add_metric(name, float(st.alerts_opened))
            depth.add_metric(name, float(getattr(s, "queue_depth", 0)))
        yield from (fps, up, healthy, decoded, processed, dropped, reconnects, alerts, depth)

        sq = GaugeMetricFamily("spade_sink_queue_depth", "Batches waiting for the sink thread")
        sq.add_metric([], float(p.sink_queue_depth))
        yield sq
        errs = CounterMetricFamily("spade_sink_errors", "Exceptions raised by a sink", labels=["sink"])
        counts = dict(p.sinks.errors)
        for sink in p.sinks.sinks:
            counts.setdefault(_sink_name(sink), 0)
        for name, n in sorted(counts.items()):
            errs.add_metric([name], float(n))
        yield errs
        frames = CounterMetricFamily("spade_pipeline_frames", "Frames scored by the detector, all cameras")
        frames.add_metric([], float(p.stats.frames))
        yield frames
        det = CounterMetricFamily("spade_detector_errors", "Detector batches that raised")
        det.add_metric([], float(p.detector_errors))
        yield det

        for sink in p.sinks.sinks:
            if _sink_name(sink) != "RedisSink":
                continue
            g = GaugeMetricFamily("spade_redis_connected", "1 while Redis is reachable")
            g.add_metric([], 1.0 if sink.connected else 0.0)
            yield g
            for metric, attr, text in (
                ("spade_redis_dropped_frames", "dropped_frames", "Frame records not delivered (Redis down or slow)"),
                ("spade_redis_delivered_alerts", "delivered_alerts", "Alert messages delivered to Redis"),
                ("spade_redis_spool_overflows", "spool_overflows", "Alert messages lost to a full spool"),
            ):
                c = CounterMetricFamily(metric, text)
                c.add_metric([], float(getattr(sink, attr)))
                yield c
            g = GaugeMetricFamily("spade_redis_spool_pending_bytes", "Alert bytes spooled, not yet delivered")
            g.add_metric([], float(sink.spool.pending_bytes))
            yield g
            break


class MetricsServer:
    """Serves `/metrics` (Prometheus text format) and `/healthz` (JSON) for `pipeline` from a daemon
    thread. `port=0` picks a free port; `.port` is the one bound after `start()`."""

    def __init__(self, pipeline, port: int = 0, host: str = "127.0.0.1") -> None:
        self.pipeline = pipeline
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PipelineCollector(pipeline))
        self.latency = Histogram(
            "spade_latency_seconds",
            "Capture (live/paced) or arrival (files) to publish",
            ["camera"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        for s in pipeline.sources:  # every camera has its series from the first scrape
            self.latency.labels(s.name)
        pipeline.add_observer(self._observe)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _observe(self, camera: str, latency_s: float, events) -> None:
        self.latency.labels(camera).observe(latency_s)

    # -- responses ----------------------------------------------------------------------------
    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def health(self) -> tuple[int, dict]:
        cams = camera_health(self.pipeline)
        ok = all(c.get("healthy", True) for c in cams.values())
        return (200 if ok else 503), {"status": "ok" if ok else "unhealthy", "cameras": cams}

    # -- server -------------------------------------------------------------------------------
    def start(self) -> MetricsServer:
        if self._httpd is not None:
            return self
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        body, ctype, code = server.metrics_text(), CONTENT_TYPE_LATEST, 200
                    elif path in ("/healthz", "/health"):
                        code, doc = server.health()
                        body, ctype = (jsonsafe.dumps(doc) + "\n").encode(), "application/json"
                    else:
                        body, ctype, code = b"not found: try /metrics or /healthz\n", "text/plain", 404
                except Exception:
                    log.exception("metrics: %s failed", path)
                    body, ctype, code = b"internal error\n", "text/plain", 500
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # scrapes every few seconds: keep them out of the log
                log.debug("metrics %s: " + fmt, self.address_string(), *args)

        try:
            httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as err:
            raise UserError(
                f"pipeline.metrics_port: cannot listen on {self.host}:{self.port} ({err.strerror or err})"
            ) from None
        httpd.daemon_threads = True
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics and /healthz", self.host, self.port)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
