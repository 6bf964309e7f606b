#!/usr/bin/env python3
"""Speed and memory of `fit` (detector.fit.fit_bank) for banks of 1,000 and 20,000 frames.

Footage: normal 856x480 footage of the synthetic scene (stream.synthetic.generate_stc, MJPEG .avi as
the STC layout has it), generated once and cached under --workdir. To reach 20,000 bank frames without
rendering 22,000 unique frames, a fit folder holds N / --per-video links to a few (--unique-videos)
base videos; each base video has exactly --per-video bank frames after the hold-out stretch
(bank.holdout of the config) is taken off its end. Every link is decoded, featurised and written, so
the bank really holds N rows (content repeats, which changes nothing for speed or memory).
bank.max_frames is lifted (None) so nothing is subsampled.

Each fit runs in a fresh subprocess, so its peak RSS is its own (getrusage(RUSAGE_SELF) at the end
of the child, plus the parent's psutil polling of the child's RSS every 0.2 s as a cross-check).

Reported per N: fit seconds (fit_bank only, imports and model build excluded; wall incl. them too),
frames/s over all processed frames (bank + hold-out; hold-out frames are featurised and scored for
calibration), bank frames/s, peak RSS MB, bank size on disk MB and KB per frame.
Banks are deleted afterwards unless --keep (a 20,000-frame bank takes several GB with EfficientNet-Lite0
at grid 32: docs/results.md, "Fit speed and memory").

Targets (issue 4): CPU fit >= 40 frames/s; 20,000 frames with peak RSS < 3 GB.

Usage:
  python benchmarks/bench_fit.py --frames 1000 --json benchmarks/out/bench_fit_1000.json
  python benchmarks/bench_fit.py                      # 1000 and 20000 (long on CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--frames", type=int, nargs="+", default=[1000, 20000], help="bank sizes (default 1000 20000)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--backbone", default=None, choices=["efficientnet_lite0", "resnet18", "wide_resnet50_2"])
    ap.add_argument("--weights", default=None, help="'random', 'pretrained' or a state-dict path")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--grid", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="detector.batch_size (fit batches)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size", default="856x480")
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-video", type=int, default=1000, help="bank frames per base video (default 1000)")
    ap.add_argument("--unique-videos", type=int, default=2, help="distinct base videos rendered (default 2)")
    ap.add_argument("--workdir", default=str(bu.DEFAULT_WORKDIR))
    ap.add_argument("--keep", action="store_true", help="keep the banks")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per fit before it is killed")
    ap.add_argument("--child-fit", nargs=3, metavar=("CONFIG", "DATA", "BANK"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child_fit(cfg_path: str, data: str, bank: str) -> int:
    """Runs in the subprocess: one fit_bank, then its own numbers as JSON on stdout."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    t_import = time.perf_counter()
    import torch  # noqa: F401

    import configs
    from detector.fit import fit_bank

    cfg = configs.load(cfg_path)
    t0 = time.perf_counter()
    meta = fit_bank(cfg, data, bank, progress=False)
    fit_s = time.perf_counter() - t0
    cal = meta.get("calibration") or {}
    import torch as _t

    print(
        json.dumps(
            {
                "fit_s": fit_s,
                "import_s": t0 - t_import,
                "n_frames": meta["n_frames"],
                "n_holdout": cal.get("n_holdout", 0),
                "peak_rss_mb": bu.maxrss_mb(),
                "torch_threads": _t.get_num_threads(),
                "device": str(cfg.detector.device),
            }
        )
    )
    return 0


def base_length(per_video: int, holdout: float) -> int:
    """Frames L of a video whose bank part (L minus fit.split_holdout's stretch) is exactly per_video."""
    for length in range(per_video, int(per_video / max(1e-9, 1 - holdout)) + 10):
        k = int(round(length * holdout)) if length >= 4 else 0
        if length - k == per_video:
            return length
    raise ValueError(f"no video length gives {per_video} bank frames at holdout {holdout}")


def fit_folder(workdir: Path, base: Path, n: int, per_video: int, unique: int) -> Path:
    videos = sorted((base / "training" / "videos").glob("*.avi"))[:unique]
    items = math.ceil(n / per_video)
    folder = workdir / "fit_data" / f"{base.name}_{items}items"
    if not folder.is_dir() or len(list(folder.iterdir())) != items:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for j in range(items):
            os.symlink(videos[j % len(videos)].resolve(), folder / f"item_{j + 1:04d}.avi")
    return folder


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_one(cfg, data: Path, bank: Path, timeout) -> dict:
    import psutil

    cfg_path = bank.parent / (bank.name + ".config.yaml")
    bank.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(bu.config_yaml(cfg))
    shutil.rmtree(bank, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-fit", str(cfg_path), str(data), str(bank)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=bu.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bu.child_env()
    )
    peak = [0]
    done = threading.Event()

    def poll():
        try:
            p = psutil.Process(proc.pid)
            while not done.is_set():
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak[0] = max(peak[0], rss)
                time.sleep(0.2)
        except psutil.Error:
            pass

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"fit of {data} timed out after {timeout} s") from None
    finally:
        done.set()
        th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fit failed ({proc.returncode}):\n{err[-4000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["wall_s"] = wall
    res["peak_rss_mb_polled"] = peak[0] / 2**20
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_fit:
        return child_fit(*args.child_fit)
    load_before = bu.loadavg()
    cfg = bu.load_config(args)
    cfg.bank.max_frames = None
    cfg.bank.every = 1
    workdir = Path(args.workdir)
    size = bu.parse_size(args.size)
    per_video = min(args.per_video, min(args.frames))
    length = base_length(per_video, cfg.bank.holdout)
    unique = max(1, min(args.unique_videos, math.ceil(max(args.frames) / per_video)))
    base = bu.ensure_footage(workdir, size, args.fps, unique, length, args.seed)
    d = cfg.detector
    rows = []
    for n in args.frames:
        if n % per_video:
            bu.log(
                f"note: {n} is not a multiple of --per-video {per_video}; the bank gets "
                f"{math.ceil(n / per_video) * per_video} frames"
            )
        data = fit_folder(workdir, base, n, per_video, unique)
        bank = workdir / "fit_banks" / f"{d.backbone.name}_{d.input_size}_g{d.grid}_{n}"
        pix_bytes = n * d.grid * d.grid * 2 * 2000  # generous upper bound on fp16 pixel features
        free = shutil.disk_usage(workdir).free
        if free < pix_bytes * 0.5:
            bu.log(f"skipping {n}: {free / 2**30:.1f} GiB free on {workdir}")
            continue
        bu.log(f"fit {n} frames ({data.name}) ...")
        res = run_one(cfg, data, bank, args.timeout)
        size_b = dir_size(bank)
        processed = res["n_frames"] + res["n_holdout"]
        row = {
            "frames": n,
            "bank_frames": res["n_frames"],
            "holdout_frames": res["n_holdout"],
            "fit_s": round(res["fit_s"], 2),
            "wall_s": round(res["wall_s"], 2),
            "fps": round(processed / res["fit_s"], 2),
            "bank_fps": round(res["n_frames"] / res["fit_s"], 2),
            "peak_rss_mb": round(res["peak_rss_mb"], 1),
            "peak_rss_mb_polled": round(res["peak_rss_mb_polled"], 1),
            "bank_mb": round(size_b / 2**20, 1),
            "bank_kb_per_frame": round(size_b / 1024 / res["n_frames"], 1),
            "torch_threads": res["torch_threads"],
        }
        rows.append(row)
        bu.log(f"  {row}")
        if not args.keep:
            shutil.rmtree(bank, ignore_errors=True)
    import torch

    from detector.backbone import resolve_device

    result = {
        "config": str(args.config or "default"),
        "backbone": d.backbone.name,
        "weights": d.backbone.weights or "pretrained",
        "input_size": d.input_size,
        "grid": d.grid,
        "batch": d.batch_size,
        "holdout": cfg.bank.holdout,
        "frame_size": list(size),
        "footage": str(base),
        "per_video": per_video,
        "unique_videos": unique,
        "runs": rows,
        "targets": {"fps": 40, "peak_rss_mb_20000": 3072},
        "loadavg_before": load_before,
        "loadavg_after": bu.loadavg(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        **bu.machine_info(resolve_device(d.device)),
        **{"git_" + k: v for k, v in bu.git_info().items()},
    }
    del torch
    print(
        f"\nbench_fit: {result['config']} {d.backbone.name} input {d.input_size} grid {d.grid} batch {d.batch_size}, "
        f"{size[0]}x{size[1]} MJPEG, load {load_before} -> {result['loadavg_after']}"
    )
    print(
        f"{'frames':>8} {'bank':>7} {'holdout':>7} {'fit s':>8} {'fps':>7} {'bank fps':>8} {'peak RSS MB':>11} "
        f"{'bank MB':>9} {'KB/frame':>8}"
    )
    for r in rows:
        print(
            f"{r['frames']:8d} {r['bank_frames']:7d} {r['holdout_frames']:7d} {r['fit_s']:8.1f} {r['fps']:7.1f} "
            f"{r['bank_fps']:8.1f} {r['peak_rss_mb']:11.0f} {r['bank_mb']:9.0f} {r['bank_kb_per_frame']:8.0f}"
        )
    if args.json:
        bu.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
