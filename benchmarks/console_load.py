"""Load on the operator console (app/console.py): N cameras' previews and frame scores published into Redis
while a client polls and streams like the page does; the console process's CPU measured with psutil.

    python benchmarks/console_load.py [--cameras 16] [--preview-fps 2] [--frame-fps 25] [--seconds 60]
                                      [--clients 1] [--redis URL] [--json out.json]

Without --redis a throw-away redis-server is started (tests/servers.py). The console runs as its own process
(`run_stream.py console`), so its CPU is its own; the producer and the clients run in this process.
Each client does what app/console_static/app.js does: every 0.5 s one preview per camera, every 1 s
/api/cameras, every 3 s one score sparkline per camera, and one /api/events stream; alerts are raised every
10 s so the stream carries something.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def previews(n=8, w=480, h=320, max_kb=30):
    """A few ~max_kb JPEGs like the preview sink makes (textured noise + a box)."""
    out = []
    rng = np.random.default_rng(0)
    for k in range(n):
        img = cv2.resize(
            (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC
        )
        cv2.rectangle(img, (40 + 10 * k, 60), (160 + 10 * k, 200), (40, 40, 230), 2)
        for q in (80, 65, 50, 38):
            data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()
            if len(data) <= max_kb * 1024:
                break
        out.append(data)
    return out


def producer(url, cams, preview_fps, frame_fps, stop, stats):
    r = redis.Redis.from_url(url)
    jpgs = previews()
    for c in cams:
        r.set(
            f"spade:{c}:status",
            json.dumps({"v": 1, "camera": c, "state": "online", "ts": time.time(), "detail": "bench"}),
        )
    tick = 1.0 / frame_fps
    every = max(1, round(frame_fps / preview_fps))
    i, t_next, last_alert = 0, time.monotonic(), time.monotonic()
    while not stop.is_set():
        pipe = r.pipeline(transaction=False)
        now = time.time()
        for k, c in enumerate(cams):
            score = 0.5 + 0.1 * np.sin(i / 10 + k)
            pipe.xadd(
                f"spade:{c}:frames",
                {
                    "v": "1",
                    "camera": c,
                    "frame_index": str(i),
                    "ts": repr(now),
                    "score": repr(score),
                    "threshold": "1.0",
                    "is_anomalous": "0",
                    "regions": "[]",
                },
                maxlen=10000,
                approximate=True,
            )
            if i % every == k % every:
                pipe.set(f"spade:{c}:preview", jpgs[(i // every + k) % len(jpgs)], ex=10)
                stats["previews"] += 1
        if time.monotonic() - last_alert > 10:
            last_alert = time.monotonic()
            c = cams[i % len(cams)]
            aid = f"{c}-{int(now * 1000)}-abcdef"
            for typ in ("new", "end"):
                msg = json.dumps(
                    {
                        "v": 1,
                        "type": typ,
                        "alert_id": aid,
                        "camera": c,
                        "start_ts": now,
                        "end_ts": now + 1 if typ == "end" else None,
                        "start_media_ts": None,
                        "end_media_ts": None,
                        "peak_score": 2.0,
                        "regions": [],
                        "peak_regions": [],
                        "snapshot": None,
                        "reason": "recovered" if typ == "end" else None,
                        "frame_index": i,
                    }
                )
                pipe.xadd("spade:alerts", {"data": msg})
                pipe.publish("spade:alerts", msg)
        pipe.execute()
        stats["frames"] += len(cams)
        i += 1
        t_next += tick
        time.sleep(max(0.0, t_next - time.monotonic()))


class Client:
    def __init__(self, port, cams, stop, lat):
        self.port, self.cams, self.stop, self.lat = port, cams, stop, lat
        self.errors = 0
        self.error_kinds: dict[str, int] = {}

    def _loop(self, period, paths):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        t_next = time.monotonic()
        while not self.stop.is_set():
            for p in paths():
                t = time.perf_counter()
                try:
                    try:
                        conn.request("GET", p, headers={"Host": f"127.0.0.1:{self.port}"})
                        r = conn.getresponse()
                    except (
                        http.client.RemoteDisconnected
                    ):  # the server closed an idle keep-alive: as a browser, reconnect
                        conn.close()
                        conn.request("GET", p, headers={"Host": f"127.0.0.1:{self.port}"})
                        r = conn.getresponse()
                    r.read()
                    if r.status >= 500:
                        self.errors += 1
                        self.error_kinds[f"{r.status} {p.split('?')[0]}"] = (
                            self.error_kinds.get(f"{r.status} {p.split('?')[0]}", 0) + 1
                        )
                except (OSError, http.client.HTTPException) as err:
                    self.errors += 1
                    self.error_kinds[type(err).__name__] = self.error_kinds.get(type(err).__name__, 0) + 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.lat.append(time.perf_counter() - t)
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))

    def _events(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/api/events", headers={"Host": f"127.0.0.1:{self.port}"})
        r = conn.getresponse()
        while not self.stop.is_set():
            try:
                r.fp.readline()
            except OSError:
                break

    def start(self):
        half = len(self.cams) // 2  # a browser fetches on ~6 connections: two preview loops here
        loops = [
            (0.5, lambda: [f"/api/cameras/{c}/preview.jpg" for c in self.cams[:half]]),
            (0.5, lambda: [f"/api/cameras/{c}/preview.jpg" for c in self.cams[half:]]),
            (1.0, lambda: ["/api/cameras"]),
            (3.0, lambda: [f"/api/cameras/{c}/scores?seconds=300&points=150" for c in self.cams]),
            (10.0, lambda: ["/api/alerts?limit=30"]),
        ]
        for period, paths in loops:
            threading.Thread(target=self._loop, args=(period, paths), daemon=True).start()
        threading.Thread(target=self._events, daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=16)
    ap.add_argument("--preview-fps", type=float, default=2.0)
    ap.add_argument("--frame-fps", type=float, default=25.0, help="frame-score entries per camera per second")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--redis", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from tests.servers import RedisServer, free_port

    srv = None
    url = args.redis
    if url is None:
        srv = RedisServer().start()
        url = srv.url
    port = free_port()
    console = subprocess.Popen(
        [sys.executable, str(ROOT / "run_stream.py"), "console", "--redis", url, "--port", str(port)], cwd=ROOT
    )
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/api/health")
                break
            except OSError:
                if time.monotonic() > deadline or console.poll() is not None:
                    raise SystemExit("console did not start") from None
                time.sleep(0.2)
        cams = [f"cam{k:02d}" for k in range(args.cameras)]
        pstats = {"frames": 0, "previews": 0}
        threading.Thread(
            target=producer, args=(url, cams, args.preview_fps, args.frame_fps, stop, pstats), daemon=True
        ).start()
        time.sleep(2.0)
        lat: list[float] = []
        clients = [Client(port, cams, stop, lat) for _ in range(args.clients)]
        for c in clients:
            c.start()
        proc = psutil.Process(console.pid)
        proc.cpu_percent(None)
        samples = []
        t_end = time.monotonic() + args.seconds
        while time.monotonic() < t_end:
            samples.append(proc.cpu_percent(interval=1.0))
        load = os.getloadavg()
        rss = proc.memory_info().rss / 2**20
        stop.set()
        lat_ms = sorted(x * 1000 for x in lat)
        result = {
            "cameras": args.cameras,
            "preview_fps": args.preview_fps,
            "frame_fps": args.frame_fps,
            "clients": args.clients,
            "seconds": args.seconds,
            "cpu_count": psutil.cpu_count(),
            "console_cpu_percent": {
                "median": statistics.median(samples),
                "p90": sorted(samples)[int(0.9 * (len(samples) - 1))],
                "max": max(samples),
            },
            "console_rss_mb": round(rss, 1),
            "loadavg_1_5_15": [round(x, 2) for x in load],
            "requests": len(lat_ms),
            "request_errors": sum(c.errors for c in clients),
            "error_kinds": [c.error_kinds for c in clients],
            "latency_ms": {
                "median": round(statistics.median(lat_ms), 2) if lat_ms else None,
                "p95": round(lat_ms[int(0.95 * (len(lat_ms) - 1))], 2) if lat_ms else None,
            },
            "produced": pstats,
        }
        print(json.dumps(result, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        stop.set()
        console.terminate()
        try:
            console.wait(10)
        except subprocess.TimeoutExpired:
            console.kill()
        if srv is not None:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
