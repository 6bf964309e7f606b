#!/usr/bin/env python3
"""RSS of one `fit_bank` over time, with the C heap left alone or managed: what docs/history.md, section 3's
6,000-frame table measured.

  default   glibc as configured (note: `fit` itself now trims every 2 s; `default` disables that)
  trim      malloc_trim(0) every 2 s from a side thread
  mallopt   a fixed 1 MiB mmap threshold (large buffers always mmapped and returned at free)

Usage: python benchmarks/heap_growth.py MODE DATA [--bank DIR]   (prints JSON: peak RSS, a trace every 15 s)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["default", "trim", "mallopt"])
    ap.add_argument("data", help="normal footage (a folder of videos or an STC root)")
    ap.add_argument("--bank", default=None, help="bank dir (default /tmp/heap_growth_<mode>, deleted first)")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    import psutil

    import configs
    from detector import fit
    from stream import allocator

    libc = ctypes.CDLL("libc.so.6")
    if args.mode == "mallopt":
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    if args.mode != "trim":  # fit's own trimming off, so only the mode under test acts
        fit.HeapTrimmer = lambda: type("NoTrim", (), {"maybe": lambda self: None})()
    else:
        fit.HeapTrimmer = allocator.HeapTrimmer
    proc, trace, done = psutil.Process(), [], threading.Event()

    def poll():
        t0 = time.time()
        while not done.is_set():
            trace.append((round(time.time() - t0, 1), proc.memory_info().rss >> 20))
            done.wait(1.0)

    threading.Thread(target=poll, daemon=True).start()
    bank = Path(args.bank or f"/tmp/heap_growth_{args.mode}")
    shutil.rmtree(bank, ignore_errors=True)
    t0 = time.time()
    fit.fit_bank(configs.load(None), args.data, bank, progress=False)
    done.set()
    print(
        json.dumps(
            {
                "mode": args.mode,
                "wall_s": round(time.time() - t0, 1),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
                "trace_every_15s": trace[::15],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
