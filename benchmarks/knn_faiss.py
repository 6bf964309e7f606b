#!/usr/bin/env python3
"""Exact nearest-neighbour search on the CPU: the detector's torch path against faiss IndexFlatL2.

Does faiss earn its place as a dependency? Two searches the product makes:

- pixel: the kappa nearest gallery features of each of a frame's 1024 cells (SPADE's 32x32 grid),
  C = 176 channels, against galleries of 2,048 features (the coreset default), 65,536 and 262,144 (all
  cells of 64 / 256 bank frames: the paper's all-frames kNN). torch runs exactly what the detector runs:
  `SpadeScorer.coreset_distances` (one fused |r|^2 - 2 q.r GEMM per block, ranked in float32 or in
  bf16 = the `rank_dtype` path, then the winners' distances taken exactly). faiss: `IndexFlatL2.search`
  for the winners, then the same exact distances, so both columns compute the same per-cell value and
  `same` says for how many cells it came out bit-identical to the float32 path.
- global: the k_image nearest bank frames of 8 frames, N = 5,000 x D = 320 (`SpadeScorer.nearest_frames`).

Variants are timed alternately (A B C A B C ...) on the same inputs, so load hits them alike; reported are
medians of --repeats, and the load average before and after (2 cores are shared on a dev box: read the
ratios, not the absolute times). Index construction (faiss `add`, torch's float copy) is not timed: both
would be done once, when the bank loads.

faiss is not a dependency of the project (this measurement is why): `pip install faiss-cpu` to run this.

Usage: python benchmarks/knn_faiss.py [--repeats 5] [--threads 1] [--kappa 1] [--json out.json]
Prints a table, then the summary as one strict-JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logging.getLogger("faiss").setLevel(logging.WARNING)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

try:
    import faiss  # noqa: E402
except ImportError:
    sys.exit("benchmarks/knn_faiss.py needs faiss, which the project does not install: pip install faiss-cpu")
import torch  # noqa: E402

from detector.bank import MemoryBank  # noqa: E402
from detector.spade import SpadeScorer  # noqa: E402

GRID, C = 32, 176
GALLERIES = (2048, 65536, 262144)
N_GLOBAL, D_GLOBAL, Q_GLOBAL = 5000, 320, 8


def fake_bank(coreset: np.ndarray | None, glob: np.ndarray) -> MemoryBank:
    """An in-memory bank holding only what the scorer reads for these searches."""
    n, d = glob.shape
    meta = {"n_frames": n, "grid": GRID, "pixel_dim": C, "global_dim": d}
    pixel = np.zeros((1, GRID * GRID, C), dtype=np.float16)  # never read: the coreset gallery reads no frame
    index = None if coreset is None else np.zeros((len(coreset), 2), dtype=np.int32)
    return MemoryBank(Path("/nonexistent"), meta, glob, pixel, coreset=coreset, coreset_index=index)


def timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds per call of each function, timed alternately; and each one's last result."""
    times: dict = {k: [] for k in fns}
    out: dict = {}
    for f in fns.values():
        f()  # warm-up: buffers, thread pools, page faults
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            out[k] = f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, out


def pixel_case(m: int, kappa: int, repeats: int, rng) -> dict:
    # Gallery: stored float16 like bank.coreset; queries: gallery rows plus noise (real cells have near
    # neighbours), so near-ties are as rare or common as in the product, not an artefact of random data.
    gal16 = rng.standard_normal((m, C), dtype=np.float32).astype(np.float16)
    pick = rng.integers(0, m, GRID * GRID)
    cells = gal16[pick].astype(np.float32) + 0.3 * rng.standard_normal((GRID * GRID, C), dtype=np.float32)
    pyramid = torch.from_numpy(np.ascontiguousarray(cells.T.reshape(1, C, GRID, GRID)))
    glob = np.zeros((1, D_GLOBAL), dtype=np.float32)
    cpu = torch.device("cpu")
    kw = dict(k_image=1, k_gallery=1, kappa=kappa, sigma=0.0, input_size=GRID, device=cpu, gallery="coreset")
    fp32 = SpadeScorer(fake_bank(gal16, glob), rank_dtype=None, **kw)
    bf16 = SpadeScorer(fake_bank(gal16, glob), rank_dtype=torch.bfloat16, **kw)
    index = faiss.IndexFlatL2(C)
    index.add(np.ascontiguousarray(fp32.coreset.numpy()))  # the very float32 values torch searches
    q = np.ascontiguousarray(cells)
    q_t = torch.from_numpy(q)

    def faiss_search():
        _, idx = index.search(q, kappa)
        rows = torch.from_numpy(idx.astype(np.int64))
        return SpadeScorer._exact_distances(q_t, fp32.coreset, rows).reshape(1, GRID, GRID)

    fns = {
        "torch fp32": lambda: fp32.coreset_distances(pyramid),
        "torch bf16 rank": lambda: bf16.coreset_distances(pyramid),
        "faiss IndexFlatL2": faiss_search,
    }
    med, out = timed(fns, repeats)
    ref = out["torch fp32"]
    return {
        "case": f"pixel {GRID * GRID}x{C} vs {m}",
        "queries": GRID * GRID,
        "dim": C,
        "gallery": m,
        "k": kappa,
        "ms": {k: v * 1e3 for k, v in med.items()},
        "same_as_fp32": {k: float((v == ref).float().mean()) for k, v in out.items()},
        "max_abs_diff": {k: float((v - ref).abs().max()) for k, v in out.items()},
    }


def global_case(k: int, repeats: int, rng) -> dict:
    glob = rng.standard_normal((N_GLOBAL, D_GLOBAL), dtype=np.float32)
    qs = glob[rng.integers(0, N_GLOBAL, Q_GLOBAL)] + 0.3 * rng.standard_normal((Q_GLOBAL, D_GLOBAL), dtype=np.float32)
    sc = SpadeScorer(
        fake_bank(None, glob),
        k_image=k,
        k_gallery=1,
        kappa=1,
        sigma=0.0,
        input_size=GRID,
        device=torch.device("cpu"),
        gallery="knn",
        pixel_bank="disk",
    )
    index = faiss.IndexFlatL2(D_GLOBAL)
    index.add(glob)
    q_t = torch.from_numpy(qs)

    fns = {
        "torch fp32": lambda: sc.nearest_frames(q_t, k)[1],
        "faiss IndexFlatL2": lambda: torch.from_numpy(index.search(qs, k)[1].astype(np.int64)),
    }
    med, out = timed(fns, repeats * 20)
    ref = out["torch fp32"]
    return {
        "case": f"global {Q_GLOBAL}x{D_GLOBAL} vs {N_GLOBAL}",
        "queries": Q_GLOBAL,
        "dim": D_GLOBAL,
        "gallery": N_GLOBAL,
        "k": k,
        "ms": {k_: v * 1e3 for k_, v in med.items()},
        "same_as_fp32": {k_: float((v == ref).float().mean()) for k_, v in out.items()},
        "max_abs_diff": None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    # 1 by default: on a shared box, OpenMP threads waiting for a preempted peer measure the scheduler
    # (8x320 vs 5,000 took 0.8 ms on 1 thread and 73 ms on 2 at load 4.5 on 2 cores), not the search.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kappa", type=int, default=1, help="neighbours per cell (detector.kappa; default 1)")
    ap.add_argument("--k-image", type=int, default=1, help="neighbour frames (detector.k_image; default 1)")
    ap.add_argument("--galleries", type=int, nargs="+", default=list(GALLERIES))
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    cases = [pixel_case(m, args.kappa, args.repeats, rng) for m in args.galleries]
    cases.append(global_case(args.k_image, args.repeats, rng))
    load_after = os.getloadavg()

    print(f"{'case':<28} {'variant':<18} {'median ms':>10} {'x vs fp32':>9} {'same':>7} {'max |diff|':>10}")
    for c in cases:
        base = c["ms"]["torch fp32"]
        for k, v in c["ms"].items():
            diff = "-" if c["max_abs_diff"] is None else f"{c['max_abs_diff'][k]:.2e}"
            print(f"{c['case']:<28} {k:<18} {v:10.2f} {base / v:9.2f} {c['same_as_fp32'][k]:7.2%} {diff:>10}")
    print(
        f"threads {args.threads}, repeats {args.repeats} (median), load average before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}, "
        f"{time.monotonic() - t0:.0f} s"
    )
    summary = {
        "benchmark": "knn_faiss",
        "threads": args.threads,
        "repeats": args.repeats,
        "kappa": args.kappa,
        "k_image": args.k_image,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "cases": cases,
    }
    line = json.dumps(summary, allow_nan=False)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
