#!/usr/bin/env python3
"""Trace a fit's memory once a second (RSS, USS, shared) to see which phase holds it.

python benchmarks/trace_fit_rss.py DATA_DIR [MAX_FRAMES|all] [--bank DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("max_frames", nargs="?", default="all")
    ap.add_argument("--bank", default="/tmp/trace_fit_rss_bank")
    args = ap.parse_args()
    import configs
    from detector.fit import fit_bank

    proc, samples = psutil.Process(), []

    def watch():
        while True:
            m = proc.memory_full_info()
            samples.append((time.time(), m.rss / 1e6, m.uss / 1e6, getattr(m, "shared", 0) / 1e6))
            time.sleep(1)

    threading.Thread(target=watch, daemon=True).start()
    cfg = configs.load("default")
    cfg.bank.max_frames = None if args.max_frames == "all" else int(args.max_frames)
    t0 = time.time()
    meta = fit_bank(cfg, args.data, args.bank, progress=False)
    for i in range(0, len(samples), max(1, len(samples) // 25)):
        t, rss, uss, sh = samples[i]
        print(f"{t - t0:6.0f}s rss {rss:7.0f} uss {uss:7.0f} shared {sh:7.0f}")
    print(
        f"frames {meta['n_frames']} + {meta['calibration'].get('n_holdout', 0)} held out, "
        f"{time.time() - t0:.0f} s; peak rss {max(s[1] for s in samples):.0f} MB, "
        f"peak uss {max(s[2] for s in samples):.0f} MB"
    )
    shutil.rmtree(args.bank, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
