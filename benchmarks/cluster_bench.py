#!/usr/bin/env python3
"""Ray scale-out (app/cluster.py) on one machine: aggregate fps of the single-process pipeline against
1 and 2 Ray workers on the same files, and the time to recover after a worker dies.

Input: N copies (--cameras, default 2) of one generated H.264 clip (benchmarks/benchutil.ensure_clip; STC
frame size 856x480 unless --size, 24 fps, --frames), a bank fitted on normal footage of the same scene,
both cached under --workdir; every mode publishes to the same kind of sink, a real redis-server
(tests/servers.py) with its own key prefix.

  single     app.cli.run_pipeline, all cameras in this process (what `run` does without --cluster), torch's
             default threads (one per core)
  single_t1  the same with one torch thread (detector.threads: 1)
  ray_1      ClusterRunner, one worker (--cpus-per-worker 1: one torch thread) with every camera; against
             single_t1 (same code, same threads, but in an actor) the per-worker overhead
  ray_2      ClusterRunner, two workers (cameras split), each with half the CPUs
  recovery   two workers on looped, paced copies of the clip; one actor killed with ray.kill; time from the
             kill until the driver noticed (detect_s) and until its cameras' frames resumed in Redis
             (resume_s, a replacement actor: a new process loads torch and the model)

Aggregate fps = frames in Redis / (last frame's XADD time - first frame's), over all cameras: model loading
and Ray start-up are left out of every mode alike. overhead = 1 - ray_1 / single_t1 (target <= 5 %).

Usage:
  python benchmarks/cluster_bench.py --json benchmarks/cpu/cluster_<date>.json [--frames 240] [--cameras 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--config", default=None)
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--size", default="856x480")
    ap.add_argument("--workdir", default="benchmarks/out/cluster")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs Ray may use (default: all)")
    ap.add_argument("--recovery-fps", type=float, default=4.0, help="pace of the looped cameras of `recovery`")
    ap.add_argument("--skip", nargs="*", default=[], choices=["single", "single_t1", "ray_1", "ray_2", "recovery"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the fps modes; medians")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def MODES(args):  # noqa: N802
    """(mode, workers (None: no Ray), CPUs per worker, torch threads of the single process)."""
    return (
        ("single", None, None, None),
        ("single_t1", None, None, 1),
        ("ray_1", 1, 1.0, None),
        ("ray_2", 2, args.cpus / 2, None),
    )


def _fps_from_redis(client, prefix: str, cameras: list[str]) -> dict:
    first, last, n = None, None, 0
    for cam in cameras:
        entries = client.xrange(f"{prefix}:{cam}:frames")
        if not entries:
            continue
        n += len(entries)
        t0 = int(entries[0][0].split(b"-")[0]) / 1000.0
        t1 = int(entries[-1][0].split(b"-")[0]) / 1000.0
        first = t0 if first is None else min(first, t0)
        last = t1 if last is None else max(last, t1)
    span = (last - first) if first is not None else 0.0
    return {"frames": n, "span_s": round(span, 3), "fps": round(n / span, 2) if span > 0 else None}


def _cfg(base, redis_url, prefix, clip, n, loop=False, fps=None):
    from configs.schema import SourceConfig

    cfg = base.model_copy(deep=True)
    cfg.sinks.redis.url = redis_url
    cfg.sinks.redis.prefix = prefix
    cfg.sinks.preview.enabled = False
    cfg.sources = [SourceConfig(name=f"cam{i}", url=str(clip), loop=loop, fps=fps) for i in range(n)]
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    from app.cli import run_pipeline
    from app.cluster import ClusterRunner
    from tests.servers import RedisServer

    work = Path(args.workdir).resolve()
    size = bu.parse_size(args.size)
    base = bu.load_config(argparse.Namespace(config=args.config))
    clip = bu.ensure_clip(work, size, 24, args.frames, 0, None)
    footage = bu.ensure_footage(work, size, 24, 2, 120, 0)
    bank, _ = bu.ensure_bank(base, footage, work)
    cams = [f"cam{i}" for i in range(args.cameras)]
    result = {
        "machine": bu.machine_info(__import__("torch").device("cpu")),
        "git": bu.git_info(),
        "ray": ray.__version__,
        "input": {
            "clip": clip.name,
            "frames": args.frames,
            "cameras": args.cameras,
            "size": args.size,
            "cpus": args.cpus,
        },
        "loadavg_start": bu.loadavg(),
        "modes": {},
    }
    with RedisServer() as srv:
        client = srv.client()
        ray.init(
            num_cpus=args.cpus,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=100 * 1024 * 1024,
            configure_logging=False,
        )
        runs: dict[str, list] = {}
        try:
            for rep in range(args.repeats):  # interleaved, so that a neighbour's load hits every mode alike
                for mode, n_workers, cpw, threads in MODES(args):
                    if mode in args.skip:
                        continue
                    prefix = f"{mode}{rep}"
                    bu.log(f"{mode} (repeat {rep + 1}) ...")
                    cfg = _cfg(base, srv.url, prefix, clip, args.cameras)
                    t0 = time.monotonic()
                    if n_workers is None:
                        cfg.detector.threads = threads
                        c0 = time.process_time()
                        s = run_pipeline(cfg, bank, work / f"run_{prefix}", progress=False)
                        cpu = time.process_time() - c0
                        extra = {"pipeline_fps": round(s.fps, 2)}
                    else:
                        summ = ClusterRunner(
                            cfg,
                            bank,
                            work / f"run_{prefix}",
                            address=None,
                            cpus_per_worker=cpw,
                            max_workers=n_workers,
                            poll_s=0.5,
                        ).run()
                        cpu = sum(i.get("cpu_s") or 0.0 for i in summ["workers"].values())
                        extra = {"workers": {w: i["cameras"] for w, i in summ["workers"].items()}}
                    extra["cpu_ms_per_frame"] = round(1000 * cpu / max(1, args.cameras * args.frames), 2)
                    r = (
                        _fps_from_redis(client, prefix, cams)
                        | extra
                        | {"wall_s_with_startup": round(time.monotonic() - t0, 2)}
                    )
                    runs.setdefault(mode, []).append(r)
                    bu.log(f"  {r}")
            for mode, rs in runs.items():
                result["modes"][mode] = {
                    "fps": bu.median([r["fps"] for r in rs]),
                    "cpu_ms_per_frame": bu.median([r["cpu_ms_per_frame"] for r in rs]),
                    "runs": rs,
                }
            if "recovery" not in args.skip:
                result["modes"]["recovery"] = _recovery(args, base, srv, client, clip, bank, work)
                bu.log(f"  {result['modes']['recovery']}")
        finally:
            ray.shutdown()
    m = result["modes"]
    if m.get("single", {}).get("fps"):
        for mode in ("ray_1", "ray_2"):
            if m.get(mode, {}).get("fps"):
                m[mode]["vs_single"] = round(m[mode]["fps"] / m["single"]["fps"], 3)
    if m.get("single_t1", {}).get("fps") and m.get("ray_1", {}).get("fps"):  # one torch thread in both
        result["overhead_1_worker"] = round(1 - m["ray_1"]["fps"] / m["single_t1"]["fps"], 3)
        # CPU time per frame (model loading included in both alike): less sensitive to a neighbour's load
        result["cpu_overhead_1_worker"] = round(
            m["ray_1"]["cpu_ms_per_frame"] / m["single_t1"]["cpu_ms_per_frame"] - 1, 3
        )
    result["loadavg_end"] = bu.loadavg()
    print(json.dumps(result, indent=1))
    if args.json:
        bu.write_json(args.json, result)
    return 0


def _recovery(args, base, srv, client, clip, bank, work) -> dict:
    from app.cluster import ClusterRunner

    bu.log("recovery ...")
    prefix = "recovery"
    cfg = _cfg(base, srv.url, prefix, clip, 2, loop=True, fps=args.recovery_fps)
    runner = ClusterRunner(
        cfg, bank, work / "run_recovery", address=None, cpus_per_worker=args.cpus / 2, poll_s=0.5, deadline_s=10.0
    )
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", runner.run()), daemon=True)
    t.start()
    out = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(client.xlen(f"{prefix}:cam{i}:frames") > 3 for i in range(2)):
            time.sleep(0.2)
        victim = next(w for w in runner.workers.values())
        cams = list(victim.cameras)
        import ray

        t0 = time.monotonic()
        ray.kill(victim.handle, no_restart=True)
        time.sleep(0.3)  # SIGKILL: nothing of the victim's is published after this
        last = {c: client.xrevrange(f"{prefix}:{c}:frames", count=1)[0][0] for c in cams}
        detect = resume = None
        while time.monotonic() - t0 < 120:
            if detect is None and any(c in runner.moved for c in cams):
                detect = time.monotonic() - t0
            if all((client.xrevrange(f"{prefix}:{c}:frames", count=1) or [[b"0-0"]])[0][0] != last[c] for c in cams):
                resume = time.monotonic() - t0
                break
            time.sleep(0.05)
        out = {
            "killed": victim.id,
            "cameras": cams,
            "detect_s": None if detect is None else round(detect, 2),
            "resume_s": None if resume is None else round(resume, 2),
        }
    finally:
        runner.stop()
        t.join(60)
    out["restarts"] = box.get("s", {}).get("restarts")
    return out


if __name__ == "__main__":
    sys.exit(main())
