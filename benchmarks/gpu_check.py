#!/usr/bin/env python3
"""GPU scores against the CPU path on the same frames; exits non-zero when they disagree.

One bank (fitted on the CPU, cached under --workdir, the same generated scene as bench_pipeline) is
loaded twice, by a CPU detector and a CUDA detector; the same decoded and resized frames go through
`features` + `score_offline` on both. Checks:

  maps:       per frame, relative L2 error ||gpu - cpu|| / ||cpu|| of the final anomaly map; the worst
              frame must be below --tol (default 1e-2). The max-abs relative error is reported too.
  neighbours: the top-1 bank neighbour (SPADE's nearest frame) agrees on >= --min-agree of frames
              (default 0.99).

The CUDA path runs the backbone under bf16 autocast (detector/backbone.py, FeatureExtractor.forward),
the CPU path in float32: this check is what tells whether that is close enough.

Without a CUDA device it prints a message and exits 0 (nothing to check); --require-cuda makes that 3.

Usage:
  python benchmarks/gpu_check.py [--config default] [--backbone wide_resnet50_2 --weights random] \
      [--frames 64] [--json benchmarks/gpu/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--config", default=None)
    ap.add_argument("--backbone", default=None, choices=["efficientnet_lite0", "resnet18", "wide_resnet50_2"])
    ap.add_argument("--weights", default=None, help="'random', 'pretrained' or a state-dict path")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--grid", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--device", default="cuda", help="the GPU device (default cuda)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--clip-frames", type=int, default=2000, help="length of the generated clip")
    ap.add_argument("--train-frames", type=int, default=240, help="per training video, 2 videos (as bench_pipeline)")
    ap.add_argument("--size", default="856x480")
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--min-agree", type=float, default=0.99)
    ap.add_argument("--workdir", default=str(bu.DEFAULT_WORKDIR))
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument(
        "--precision",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16"],
        help="backbone precision of both paths; one comparison (and one bank) each",
    )
    ap.add_argument("--require-cuda", action="store_true", help="exit 3 (not 0) when there is no CUDA device")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():  # --device cpu: a self-check of this script
        print("gpu_check: no CUDA device on this machine: nothing to check (run it on a machine with a GPU)")
        return 3 if args.require_cuda else 0
    workdir = Path(args.workdir)
    size = bu.parse_size(args.size)
    # the pipeline benchmark's clip (already there when both run): its first --frames frames
    clip = bu.ensure_clip(workdir, size, args.fps, args.clip_frames, args.seed, "vehicle")
    footage = bu.ensure_footage(workdir, size, args.fps, 2, args.train_frames, args.seed)
    from bench_pipeline import decode_file  # the pipeline benchmark's reader (stream.avio.VideoInput)

    images = decode_file(clip)[0][: args.frames]  # stream.picture.Picture, as the sources decode them
    results, failed = [], []
    for precision in args.precision:
        res = compare(args, precision, images, footage, workdir)
        results.append(res)
        print(json.dumps(res, indent=1))
        if not res["passed"]:
            failed.append(f"{precision}: " + "; ".join(res["why"]))
    if args.json:
        p = Path(args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(results, indent=1))
    if failed:
        print("gpu_check: FAILED: " + " | ".join(failed), file=sys.stderr)
        return 1
    print("gpu_check: passed")
    return 0


def compare(args, precision: str, images, footage: Path, workdir: Path) -> dict:
    """Both paths at the same backbone precision, on one bank fitted on the CPU at that precision."""
    import numpy as np
    import torch

    from detector.detector import Detector

    gpu_device = args.device
    args.device = "cpu"
    cfg_cpu = bu.load_config(args)
    args.device = gpu_device
    cfg_gpu = bu.load_config(args)
    for c in (cfg_cpu, cfg_gpu):
        c.detector.precision = precision
        # the reference ranks gallery candidates in float32 and runs the eager trunk, as the GPU does (on a
        # CPU 'auto' ranks in bf16 and the trunk is frozen, a different bf16 computation)
        c.detector.rank_precision = "fp32"
        c.detector.backbone.freeze = False
    cfg_gpu.detector.pixel_bank = "memory"  # the GPU default (auto) on any bank that fits
    d = cfg_cpu.detector
    bank, _ = bu.ensure_bank(cfg_cpu, footage, workdir)  # fitted on the CPU
    n = len(images)
    det_c = Detector.load(cfg_cpu, bank)
    det_g = Detector.load(cfg_gpu, bank)
    bs = cfg_cpu.pipeline.max_batch
    rel_l2, rel_max, img_rel, top1_c, top1_g, gaps = [], [], [], [], [], []
    t_c = t_g = 0.0
    for b0 in range(0, n, bs):
        small = np.stack([p.scaled(d.input_size) for p in images[b0 : b0 + bs]])
        t0 = time.perf_counter()
        pyr_c, glob_c = det_c.features(small)
        oc, _ = det_c.score_offline(small, features=(pyr_c, glob_c))
        t_c += time.perf_counter() - t0
        # how close the CPU's second-nearest bank frame is to its nearest: a flipped top-1 neighbour
        # between near-tied frames is rounding, between well-separated ones it is a bug
        d_top2 = det_c.scorer.nearest_frames(glob_c, 2)[0].double().numpy()
        gaps += list((d_top2[:, 1] - d_top2[:, 0]) / np.maximum(d_top2[:, 0], 1e-12))
        t0 = time.perf_counter()
        og, _ = det_g.score_offline(small)
        if det_g.device.type == "cuda":
            torch.cuda.synchronize()
        t_g += time.perf_counter() - t0
        mc = oc.maps.float().numpy().reshape(len(small), -1).astype(np.float64)
        mg = og.maps.float().cpu().numpy().reshape(len(small), -1).astype(np.float64)
        rel_l2 += list(np.linalg.norm(mg - mc, axis=1) / np.maximum(np.linalg.norm(mc, axis=1), 1e-12))
        rel_max += list(np.abs(mg - mc).max(axis=1) / np.maximum(np.abs(mc).max(axis=1), 1e-12))
        sc, sg = oc.image_scores.double().numpy(), og.image_scores.double().cpu().numpy()
        img_rel += list(np.abs(sg - sc) / np.maximum(np.abs(sc), 1e-12))
        top1_c += list(oc.neighbours[:, 0].numpy())
        top1_g += list(og.neighbours[:, 0].cpu().numpy())
    same = np.asarray(top1_c) == np.asarray(top1_g)
    agree = float(np.mean(same))
    gaps, rel = np.asarray(gaps), np.asarray(rel_l2)
    res = {
        "frames": n,
        "backbone": d.backbone.name,
        "weights": d.backbone.weights or "pretrained",
        "input_size": d.input_size,
        "grid": d.grid,
        "gpu": torch.cuda.get_device_name() if det_g.device.type == "cuda" else "none (cpu self-check)",
        "map_rel_l2_max": float(np.max(rel_l2)),
        "map_rel_l2_median": float(np.median(rel_l2)),
        # the maps of frames whose nearest bank frame is the same on both sides
        "map_rel_l2_max_same_neighbour": float(rel[same].max()) if same.any() else None,
        # (d2 - d1) / d1 on the CPU for the frames whose top-1 neighbour differs, and over all frames
        "flipped_top2_gaps": [round(float(x), 6) for x in gaps[~same]],
        "top2_gap_median": float(np.median(gaps)),
        "map_rel_maxabs_max": float(np.max(rel_max)),
        "image_score_rel_max": float(np.max(img_rel)),
        "top1_agreement": agree,
        "tol": args.tol,
        "min_agree": args.min_agree,
        "cpu_s": round(t_c, 3),
        "gpu_s": round(t_g, 3),
        "precision": precision,
        "gpu_pixel_bank": det_g.scorer.pixel_bank,
    }
    why = []
    if res["map_rel_l2_max"] >= args.tol:
        why.append(f"map relative L2 error {res['map_rel_l2_max']:.3g} >= {args.tol:g}")
    if agree < args.min_agree:
        why.append(f"top-1 neighbour agreement {agree:.3f} < {args.min_agree:g}")
    res["passed"], res["why"] = not why, why
    return res


if __name__ == "__main__":
    sys.exit(main())
