#!/usr/bin/env python3
"""EfficientNet-Lite0 feature extractor variants on CPU, side by side: speed (thread CPU time and wall) and
how far their features are from the current float32 eager path. Usage: python benchmarks/micro_backbone.py"""

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

warnings.filterwarnings("ignore")
import torch  # noqa: E402

import configs  # noqa: E402
from detector.backbone import build_extractor  # noqa: E402
from detector.detector import resize_batch  # noqa: E402
from stream.avio import VideoInput  # noqa: E402

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
torch.set_num_threads(threads)
cfg = configs.load(None)
clip = bu.ensure_clip(bu.DEFAULT_WORKDIR, bu.STC_SIZE, 24, 240, 0, "vehicle")
imgs = []
with VideoInput(str(clip), "file") as v:
    for im, _ in v.frames():
        imgs.append(im)
        if len(imgs) == 8:
            break
small = torch.from_numpy(resize_batch(imgs, 256))
ext = build_extractor(cfg.detector.backbone, cfg.detector.grid, torch.device("cpu"))
trunk = ext.trunk
with torch.inference_mode():
    x = ((small.permute(0, 3, 1, 2).float() - ext.mean) / ext.std).contiguous(memory_format=torch.channels_last)
    frozen = torch.jit.freeze(torch.jit.trace(trunk, x, check_trace=False))

    def bf16(m):
        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)

        return f

    with torch.autocast("cpu", dtype=torch.bfloat16):
        frozen_bf = torch.jit.freeze(torch.jit.trace(trunk, x, check_trace=False))
    fns = {
        "eager fp32 (current)": lambda: trunk(x),
        "jit trace+freeze fp32 (BN folded)": lambda: frozen(x),
        "eager bf16 autocast": bf16(trunk),
        "jit trace+freeze bf16": bf16(frozen_bf),
    }
    ref = trunk(x)
    for k, f in fns.items():
        for _ in range(2):
            o = f()
        taps, last = o
        err = max(
            float((a.float() - b).norm() / b.norm()) for a, b in zip(list(taps) + [last], list(ref[0]) + [ref[1]])
        )
        print(f"{k:<36} feature rel. L2 error vs current: {err:.2e}")
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            f()
            cpu[k].append((time.thread_time() - c0) / 8 * 1000)
            wall[k].append((time.perf_counter() - t0) / 8 * 1000)
base = bu.median(cpu["eager fp32 (current)"])
print(f"\nthreads={threads}, batch 8, 256x256, median of {reps}; load {bu.loadavg()}")
for k in fns:
    c = bu.median(cpu[k])
    print(f"{k:<36} {c:8.1f} ms/frame main-thread CPU  ({bu.median(wall[k]):8.1f} wall)  x{base / c:4.2f}")
