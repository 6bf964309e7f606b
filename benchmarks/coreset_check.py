#!/usr/bin/env python3
"""Coreset selection and scoring on one device: agreement with the CPU / float64 paths, and speed at scale.

  1. greedy k-centre picks on --device equal the CPU's on the same points (and a float64 brute force on
     a small case);
  2. coreset distances on --device match float64 brute force;
  3. time of greedy selection for --points candidates (default 5,120,000 = 5,000 frames x 32x32 cells)
     and each --sizes coreset size, and of coreset scoring per frame for those sizes.

The points of step 3 are random with a decaying spectrum like real patch features projected to 128-d
(real features concentrate their variance on the leading principal axes, which the lower bound relies on:
docs/method.md, "PatchCore-style coreset gallery"), so the time of the principal-axes lower bound is
realistic; real features can still differ. Exits 1 when a check fails.

Usage:
  python benchmarks/coreset_check.py --device cuda --json benchmarks/gpu/coreset_check.json
  python benchmarks/coreset_check.py --device cpu --points 200000 --sizes 1000   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spectrum_points(n: int, d: int, seed: int, device):
    """float32 [n, d] with variances ~ 1 / (i + 4): the leading 32 of 128 axes hold ~80 % of the variance."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    scale = (1.0 / (torch.arange(d, dtype=torch.float32) + 4.0)).sqrt() * 20.0
    rot = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]  # not axis-aligned: the rotation must find it
    out = torch.empty(n, d, dtype=torch.float32, device=device)
    for s in range(0, n, 1 << 20):
        k = min(n, s + (1 << 20)) - s
        out[s : s + k] = ((torch.randn(k, d, generator=gen) * scale) @ rot).to(device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--points", type=int, default=5_120_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 51_200])
    ap.add_argument("--channels", type=int, default=176, help="feature channels for the scoring timing")
    ap.add_argument("--batch", type=int, default=32, help="frames per scoring batch (grid 32)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from detector.bank import MemoryBank
    from detector.coreset import greedy_kcenter, greedy_kcenter_reference
    from detector.spade import SpadeScorer

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    res: dict = {"device": str(dev), "torch": torch.__version__, "points": args.points, "dim": args.dim}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    ok = True

    # 1. picks: device vs CPU vs float64
    small = spectrum_points(3000, 64, 1, "cpu")
    want = greedy_kcenter_reference(small.numpy(), 300, 5)
    got_cpu = greedy_kcenter(small.clone(), 300, 5).numpy()
    got_dev = greedy_kcenter(small.clone().to(dev), 300, 5).cpu().numpy()
    res["picks_equal_brute"] = bool((got_cpu == want).all() and (got_dev == want).all())
    mid = spectrum_points(200_000, args.dim, 2, "cpu")
    a = greedy_kcenter(mid.clone(), 2000, 0).numpy()
    b = greedy_kcenter(mid.clone().to(dev), 2000, 0).cpu().numpy()
    res["picks_equal_cpu_200k"] = float((a == b).mean())  # fraction of equal picks, in order
    ok &= res["picks_equal_brute"] and res["picks_equal_cpu_200k"] == 1.0
    del mid

    # 2. coreset distances vs float64
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(700, args.channels)).astype(np.float16)
    bank = MemoryBank(
        Path("."),
        {"n_frames": 1, "grid": 4},
        np.zeros((1, 3), np.float32),
        np.zeros((1, 16, args.channels), np.float16),
        coreset=feats,
    )
    q = rng.normal(size=(2, args.channels, 4, 4)).astype(np.float32)
    sc = SpadeScorer(bank, k_image=1, k_gallery=1, kappa=3, sigma=0, input_size=4, device=dev, gallery="coreset")
    got = sc.coreset_distances(torch.from_numpy(q).to(dev)).cpu().numpy()
    cells = q.astype(np.float64).reshape(2, args.channels, 16).transpose(0, 2, 1)
    d = np.sqrt(((cells[:, :, None] - feats.astype(np.float64)[None, None]) ** 2).sum(-1))
    ref = np.sort(d, -1)[..., :3].mean(-1).reshape(2, 4, 4)
    res["distance_max_rel_err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    ok &= res["distance_max_rel_err"] < 1e-4

    # 3. speed at scale
    pts = spectrum_points(args.points, args.dim, 3, dev)
    res["select_s"], res["score_ms_per_frame"] = {}, {}
    for m in args.sizes:
        x = pts.clone() if m != args.sizes[-1] else pts  # greedy_kcenter rotates its input in place
        sync()
        t0 = time.perf_counter()
        picks = greedy_kcenter(x, m, 0)
        sync()
        res["select_s"][m] = round(time.perf_counter() - t0, 2)
        print(f"greedy: {len(picks)} of {args.points} points in {res['select_s'][m]} s", flush=True)
        del x
        bank = MemoryBank(
            Path("."),
            {"n_frames": 1, "grid": 32},
            np.zeros((1, 3), np.float32),
            np.zeros((1, 1024, args.channels), np.float16),
            coreset=rng.normal(size=(m, args.channels)).astype(np.float16),
        )
        sc = SpadeScorer(bank, k_image=1, k_gallery=1, kappa=1, sigma=4, input_size=256, device=dev, gallery="coreset")
        qb = torch.randn(args.batch, args.channels, 32, 32, device=dev)
        for _ in range(2):
            sc.coreset_distances(qb)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            sc.coreset_distances(qb)
        sync()
        res["score_ms_per_frame"][m] = round((time.perf_counter() - t0) / 5 / args.batch * 1e3, 3)
        print(f"scoring: {res['score_ms_per_frame'][m]} ms/frame against {m} coreset features", flush=True)
    res["ok"] = bool(ok)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
