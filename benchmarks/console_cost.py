"""What the operator console costs the rest of the system, measured side by side in one run.

1. The pipeline: aggregate end-to-end fps of N file cameras publishing to Redis with the preview sink on
   (sinks.preview, 2 fps a camera) against off, alternated over --repeats, medians.
2. The inbox with a long history: --alerts alerts (new / update / end each) in the `spade:alerts` stream;
   the console's start-up (it indexes the stream) and the latency of paging /api/alerts through it.

    python benchmarks/console_cost.py [--cameras 16] [--frames 120] [--repeats 2] [--alerts 10000] [--json out.json]

A throw-away redis-server is started (tests/servers.py). The cameras are copies of one generated 320x240
clip; the bank is fitted once with the default config on generated normal footage of the same scene
(cached under --workdir).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(workdir: Path, frames: int) -> tuple[Path, Path]:
    import configs
    from detector.fit import fit_bank
    from stream.synthetic import generate_stc, render_clip

    clip, bank = workdir / f"clip_{frames}.mp4", workdir / "bank"
    if not clip.exists():
        render_clip(clip, seed=1000, fps=24, frames=frames, anomaly="object")
    if not (bank / "meta.json").exists():
        generate_stc(workdir / "footage", seed=0, fps=24, train_videos=2, train_frames=240, test_videos=0)
        fit_bank(configs.load("default"), workdir / "footage", bank, progress=False)
    return clip, bank


def pipeline_fps(clip: Path, bank: Path, cameras: int, redis_url: str, preview: bool, out: Path) -> float:
    import configs
    from app.cli import run_pipeline
    from configs.schema import SourceConfig

    cfg = configs.load("default")
    cfg.sources = [SourceConfig(name=f"cam{i:02d}", url=str(clip)) for i in range(cameras)]
    cfg.sinks.redis.url = redis_url
    cfg.sinks.preview.enabled = preview
    cfg.pipeline.progress = False
    summary = run_pipeline(cfg, bank, out, progress=False)
    return summary.frames / summary.elapsed_s


def fill_alerts(redis_url: str, n: int) -> None:
    import redis

    from sinks.base import AlertEvent
    from sinks.schema import alert_message

    r = redis.Redis.from_url(redis_url)
    pipe = r.pipeline(transaction=False)
    t0 = time.time() - n * 10
    for i in range(n):
        cam = f"cam{i % 16:02d}"
        for kind in ("new", "update", "end"):
            ev = AlertEvent(
                kind,
                f"{cam}-{i}",
                cam,
                t0 + 10 * i,
                None if kind != "end" else t0 + 10 * i + 5,
                3.0 + (i % 7),
                frame_index=i * 10,
            )
            pipe.xadd("spade:alerts", {"data": json.dumps(alert_message(ev))}, maxlen=100_000, approximate=True)
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def inbox_latency(redis_url: str, n_alerts: int) -> dict:
    port = 18000 + os.getpid() % 1000
    t0 = time.monotonic()
    console = subprocess.Popen(
        [sys.executable, str(ROOT / "run_stream.py"), "console", "--redis", redis_url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("GET", "/api/alerts?limit=50")
                first = json.loads(c.getresponse().read())
                break
            except OSError:
                if time.monotonic() - t0 > 120 or console.poll() is not None:
                    raise SystemExit("console did not start") from None
                time.sleep(0.1)
        startup = time.monotonic() - t0
        pages, lat, cursor = 0, [], None
        while pages < 40:
            path = "/api/alerts?limit=50" + (f"&before={cursor}" if cursor else "")
            t = time.perf_counter()
            c.request("GET", path)
            doc = json.loads(c.getresponse().read())
            lat.append((time.perf_counter() - t) * 1000)
            pages += 1
            cursor = doc.get("next_before")
            if not cursor or not doc.get("alerts"):
                break
        for cam in ("cam00", "cam07"):  # a filtered page
            t = time.perf_counter()
            c.request("GET", f"/api/alerts?limit=50&camera={cam}&state=ended")
            c.getresponse().read()
            lat.append((time.perf_counter() - t) * 1000)
        return {
            "alerts": n_alerts,
            "startup_s": round(startup, 2),
            "first_page_alerts": len(first.get("alerts", [])),
            "pages": pages,
            "page_ms_median": round(statistics.median(lat), 2),
            "page_ms_max": round(max(lat), 2),
        }
    finally:
        console.terminate()
        console.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=16)
    ap.add_argument("--frames", type=int, default=120, help="frames of each camera's clip")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--alerts", type=int, default=10_000)
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "console_cost"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from configs import jsonsafe
    from tests.servers import RedisServer

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    clip, bank = prepare(workdir, args.frames)
    load_start = os.getloadavg()
    runs: dict[str, list[float]] = {"preview_off": [], "preview_on": []}
    with RedisServer() as srv:
        for r in range(args.repeats):
            for key, on in (
                (("preview_off", False), ("preview_on", True))
                if r % 2 == 0
                else (("preview_on", True), ("preview_off", False))
            ):
                fps = pipeline_fps(clip, bank, args.cameras, srv.url, on, workdir / f"run_{key}_{r}")
                runs[key].append(fps)
                print(f"repeat {r + 1}: {key}: {fps:.1f} fps aggregate", flush=True)
        srv.client().flushall()
        fill_alerts(srv.url, args.alerts)
        inbox = inbox_latency(srv.url, args.alerts)
    off, on = statistics.median(runs["preview_off"]), statistics.median(runs["preview_on"])
    result = {
        "cameras": args.cameras,
        "frames_per_camera": args.frames,
        "repeats": args.repeats,
        "fps_preview_off": runs["preview_off"],
        "fps_preview_on": runs["preview_on"],
        "median_off": round(off, 2),
        "median_on": round(on, 2),
        "on_over_off": round(on / off, 4),
        "inbox": inbox,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    print(jsonsafe.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(jsonsafe.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
