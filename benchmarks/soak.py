#!/usr/bin/env python3
"""Soak test: a looping RTSP camera through the live pipeline for N minutes, with Redis and video on.

What runs (all real components, nothing mocked):
  * tests/servers.RtspServer serving a generated clip with an anomaly (stream.synthetic.render_clip) in a
    loop, in real time (the GStreamer server re-encodes it to H.264 live);
  * a private redis-server (tests/servers.RedisServer) receiving frame records, alerts and status;
  * the pipeline as `run_stream.py run` builds it (app.cli.run_pipeline's pieces) with the Redis sink
    and the annotated-video sink (segments of --segment-s seconds, so encoders are opened and closed
    all along the run), plus the metrics server;
  * optionally (--rtsp-outage-every S) the RTSP server is killed every S seconds and restarted 3 s
    later, so reconnects (and the open/close of decoders they imply) are part of the soak.

Reported: process RSS and open file descriptors at start, after the warm-up (the first window, at most
60 s) and at the end, and the growth after the warm-up (target < 5 %); per --window-min window: frames,
fps, end-to-end latency p50 / p99 / max (capture to publish), frames dropped, reconnects, alerts, RSS.
Writes JSON (--json) and prints a table.

Usage:
  python benchmarks/soak.py                               # 30 minutes, 5-minute windows
  python benchmarks/soak.py --minutes 3 --window-min 1    # a short proof run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
import numpy as np  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--minutes", type=float, default=30.0, help="soak duration (default 30)")
    ap.add_argument("--window-min", type=float, default=5.0, help="report window in minutes (default 5)")
    ap.add_argument("--fps", type=int, default=10, help="camera frame rate (default 10)")
    ap.add_argument("--size", default="320x240", help="camera frame size WxH (default 320x240)")
    ap.add_argument("--clip-s", type=float, default=20.0, help="length of the looped clip in seconds")
    ap.add_argument(
        "--config", default=None, help="YAML config (default: configs/default.yaml with the overrides below)"
    )
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="'pretrained' (default) / 'random' / a path")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--segment-s", type=float, default=60.0, help="video segment length (default 60 s)")
    ap.add_argument(
        "--rtsp-outage-every",
        type=float,
        default=0.0,
        metavar="S",
        help="kill the RTSP server every S seconds, restart it 3 s later (default off)",
    )
    ap.add_argument("--workdir", type=Path, default=bu.DEFAULT_WORKDIR)
    ap.add_argument(
        "--json", type=Path, default=None, help="write the report here (default <workdir>/soak/soak_<minutes>min.json)"
    )
    return ap.parse_args(argv)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def pct(xs, q):
    return float(np.quantile(np.asarray(xs, float), q) * 1000.0) if len(xs) else None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from tests.servers import RedisServer, RtspServer, redis_available, rtsp_available

    if not (redis_available() and rtsp_available()):
        bu.log("soak needs redis-server and the GStreamer RTSP server (see tests/servers.py)")
        return 2
    size = bu.parse_size(args.size)
    cfg = bu.load_config(args)
    cfg.pipeline.max_batch = args.batch
    cfg.pipeline.max_wait_ms = 50.0
    work = args.workdir
    footage = bu.ensure_footage(work, size, args.fps, videos=2, frames=max(120, 12 * args.fps), seed=0)
    bank, _ = bu.ensure_bank(cfg, footage, work)
    clip = bu.ensure_clip(work, size, args.fps, frames=int(args.clip_s * args.fps), seed=0, anomaly="vehicle")
    run_dir = work / "soak" / time.strftime("run_%Y%m%d_%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)

    from app.pipeline import Pipeline
    from app.prometheus import MetricsServer
    from configs.schema import SourceConfig
    from detector.detector import Detector
    from sinks import build_sinks

    duration = args.minutes * 60.0
    window_s = args.window_min * 60.0
    warmup_s = min(60.0, window_s)
    report: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": None,
        "loadavg_start": bu.loadavg(),
        "git": bu.git_info(),
    }

    with RedisServer() as redis_srv, RtspServer(clip, loop=True, width=size[0], height=size[1], fps=args.fps) as rtsp:
        cfg.sources = [
            SourceConfig(
                name="soak_cam",
                url=rtsp.url,
                open_timeout_s=5,
                read_timeout_s=3,
                reconnect_base_s=0.5,
                reconnect_max_s=4.0,
            )
        ]
        cfg.sinks.redis.url = redis_srv.url
        cfg.sinks.redis.spool_dir = str(run_dir / "spool")
        cfg.sinks.video.dir = str(run_dir / "video")
        cfg.sinks.video.segment_s = args.segment_s
        det = Detector.load(cfg, bank)
        report["machine"] = bu.machine_info(det.device)
        sinks = build_sinks(cfg.sinks, cfg.alerts, run_dir, fps_hint=float(args.fps))
        redis_sink = next(s for s in sinks.sinks if type(s).__name__ == "RedisSink")
        video_sink = next(s for s in sinks.sinks if type(s).__name__ == "VideoSink")
        pipe = Pipeline(cfg, det, sinks)
        metrics = MetricsServer(pipe, 0).start()

        lat_lock = threading.Lock()
        windows: list[dict] = []
        current: dict = {"lat": [], "alerts": 0}

        def observe(camera, latency_s, events):
            with lat_lock:
                current["lat"].append(latency_s)
                current["alerts"] += sum(1 for e in events if e.type == "new")

        pipe.add_observer(observe)
        box: dict = {}
        t = threading.Thread(
            target=lambda: box.setdefault("s", pipe.run(duration_s=duration, progress=False)), name="soak-pipeline"
        )
        t0 = time.monotonic()
        rss_start, fds_start = rss_mb(), open_fds()
        t.start()
        src = pipe.sources[0]
        st = pipe.stats.camera("soak_cam")
        prev = {"processed": 0, "dropped": 0, "reconnects": 0, "redis_dropped": 0}
        rss_warm = fds_warm = None
        next_outage = args.rtsp_outage_every if args.rtsp_outage_every > 0 else None
        outages = 0
        w_start = t0
        bu.log(f"soaking for {args.minutes:g} min (windows of {args.window_min:g} min), metrics at {metrics.url}")
        while t.is_alive():
            t.join(timeout=1.0)
            now = time.monotonic()
            if rss_warm is None and now - t0 >= warmup_s:
                rss_warm, fds_warm = rss_mb(), open_fds()
            if next_outage is not None and now - t0 >= next_outage and now - t0 < duration - 10:
                rtsp.kill()
                time.sleep(3.0)
                rtsp.restart()
                outages += 1
                next_outage += args.rtsp_outage_every
            if now - w_start >= window_s or not t.is_alive():
                with lat_lock:
                    lat, alerts = current["lat"], current["alerts"]
                    current["lat"], current["alerts"] = [], 0
                cur = {
                    "processed": st.processed,
                    "dropped": src.dropped,
                    "reconnects": src.reconnects,
                    "redis_dropped": redis_sink.dropped_frames,
                }
                w = {
                    "window": len(windows),
                    "t_start_s": round(w_start - t0, 1),
                    "t_end_s": round(now - t0, 1),
                    "partial": now - w_start < 0.9 * window_s,
                    "frames": cur["processed"] - prev["processed"],
                    "fps": round((cur["processed"] - prev["processed"]) / max(now - w_start, 1e-6), 2),
                    "latency_p50_ms": pct(lat, 0.5),
                    "latency_p99_ms": pct(lat, 0.99),
                    "latency_max_ms": (max(lat) * 1000.0) if lat else None,
                    "dropped": cur["dropped"] - prev["dropped"],
                    "reconnects": cur["reconnects"] - prev["reconnects"],
                    "redis_dropped": cur["redis_dropped"] - prev["redis_dropped"],
                    "alerts": alerts,
                    "rss_mb": round(rss_mb(), 1),
                    "open_fds": open_fds(),
                    "loadavg": bu.loadavg(),
                }
                windows.append(w)
                bu.log(
                    "window {window}: {frames} frames, {fps} fps, p50 {p50} ms, p99 {p99} ms, dropped {dropped}, "
                    "reconnects {reconnects}, RSS {rss_mb} MB".format(
                        p50=_f(w["latency_p50_ms"]), p99=_f(w["latency_p99_ms"]), **w
                    )
                )
                prev, w_start = cur, now
        summary = box.get("s")
        metrics_text = metrics.metrics_text().decode()
        metrics.stop()
        rss_end, fds_end = rss_mb(), open_fds()
        r = redis_srv.client(decode_responses=True)
        redis_state = {
            "frames_stream_len": r.xlen("spade:soak_cam:frames"),
            "alerts_stream_len": r.xlen("spade:alerts"),
            "delivered_alerts": redis_sink.delivered_alerts,
            "dropped_frames": redis_sink.dropped_frames,
            "spool_pending_bytes": redis_sink.spool.pending_bytes,
            "errors": redis_sink.errors,
        }

    if rss_warm is None:
        rss_warm, fds_warm = rss_start, fds_start
    growth = (rss_end - rss_warm) / rss_warm * 100.0
    report.update(
        {
            "duration_s": round(time.monotonic() - t0, 1),
            "rss_mb": {
                "start": round(rss_start, 1),
                "after_warmup": round(rss_warm, 1),
                "end": round(rss_end, 1),
                "growth_after_warmup_pct": round(growth, 2),
                "warmup_s": warmup_s,
            },
            "open_fds": {"start": fds_start, "after_warmup": fds_warm, "end": fds_end},
            "windows": windows,
            "totals": {
                "processed": summary.frames if summary else None,
                "decoded": src.decoded,
                "dropped": src.dropped,
                "reconnects": src.reconnects,
                "rtsp_outages_injected": outages,
                "alerts_opened": st.alerts_opened,
                "sink_errors": dict(pipe.sinks.errors),
                "video_files": len(video_sink.paths),
                "reason": summary.reason if summary else None,
            },
            "redis": redis_state,
            "loadavg_end": bu.loadavg(),
            "rss_growth_ok": growth < 5.0,
            "metrics_sample": [
                ln for ln in metrics_text.splitlines() if ln.startswith("spade_") and "bucket" not in ln
            ],
        }
    )
    out = args.json or (work / "soak" / f"soak_{args.minutes:g}min.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(table(report))
    print(f"\nJSON: {out}")
    return 0


def _f(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


def table(rep: dict) -> str:
    lines = [
        f"{'window':>6} {'t (s)':>13} {'frames':>7} {'fps':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'dropped':>7} {'reconn':>6} {'alerts':>6} {'RSS MB':>7} {'fds':>4}"
    ]
    for w in rep["windows"]:
        lines.append(
            f"{str(w['window']) + ('*' if w.get('partial') else ''):>6} "
            f"{w['t_start_s']:>6.0f}-{w['t_end_s']:<6.0f} {w['frames']:>7} {w['fps']:>6.2f} "
            f"{_f(w['latency_p50_ms']):>7} {_f(w['latency_p99_ms']):>7} {_f(w['latency_max_ms']):>7} "
            f"{w['dropped']:>7} {w['reconnects']:>6} {w['alerts']:>6} {w['rss_mb']:>7.1f} {w['open_fds']:>4}"
        )
    r = rep["rss_mb"]
    if any(w.get("partial") for w in rep["windows"]):
        lines.append("* partial window (the run's tail)")
    lines.append(
        f"RSS start {r['start']} MB, after {r['warmup_s']:.0f} s warm-up {r['after_warmup']} MB, end {r['end']} MB: "
        f"growth after warm-up {r['growth_after_warmup_pct']:+.2f} % ({'OK' if rep['rss_growth_ok'] else 'OVER'} "
        f"the 5 % target); open fds {rep['open_fds']}"
    )
    t = rep["totals"]
    lines.append(
        f"totals: processed {t['processed']}, decoded {t['decoded']}, dropped {t['dropped']}, reconnects "
        f"{t['reconnects']} (RTSP outages injected: {t['rtsp_outages_injected']}), alerts {t['alerts_opened']}, "
        f"video files {t['video_files']}, sink errors {t['sink_errors']}"
    )
    lines.append(f"redis: {rep['redis']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
