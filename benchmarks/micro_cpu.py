#!/usr/bin/env python3
"""CPU micro-benchmarks behind the optimisation suggestions in docs/history.md, section 2 (side by side,
medians).

Each case times variants of one stage alternately (A B A B ...) on the same inputs so machine load hits
them alike; the ratio to the first (current) variant is what counts. Needs the clip bench_pipeline
generates (benchmarks/out/inputs/...); --only picks cases.

Usage: python benchmarks/micro_cpu.py [--repeats 7] [--only backbone resize regions decode knn blur]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402


def timeit(fns: dict, repeats: int, inner: int = 1) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: bu.median(v) for k, v in times.items()}


def report(name: str, res: dict, per: int = 1, unit="ms/frame") -> dict:
    base = next(iter(res.values()))
    print(f"\n[{name}]")
    for k, v in res.items():
        print(f"  {k:<46} {v * 1000 / per:9.3f} {unit}   x{base / v:5.2f} vs current")
    return {k: v * 1000 / per for k, v in res.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=str(bu.DEFAULT_WORKDIR))
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import cv2
    import numpy as np
    import torch

    import configs
    from detector.backbone import build_extractor
    from detector.detector import resize_batch
    from detector.regions import find_regions
    from stream.avio import VideoInput

    want = lambda c: args.only is None or c in args.only  # noqa: E731
    clip = bu.ensure_clip(Path(args.workdir), bu.STC_SIZE, 24, 240, 0, "vehicle")
    images = []
    with VideoInput(str(clip), "file") as v:
        for img, _ in v.frames():
            images.append(img)
            if len(images) >= 64:
                break
    B = args.batch
    out = {"loadavg_before": bu.loadavg(), "torch_threads": torch.get_num_threads(), "batch": B}
    cfg = configs.load(None)

    if want("decode"):
        import av
        from av.video.reformatter import VideoReformatter

        from stream.picture import Picture

        def dec(fmt_fn, n=48):
            with av.open(str(clip)) as c:
                s = c.streams.video[0]
                s.thread_type = "AUTO"
                for i, f in enumerate(c.decode(s)):
                    fmt_fn(f)
                    if i + 1 >= n:
                        break

        res = timeit(
            {
                "rgb24 ndarray + ascontiguousarray (full frame, for drawing sinks)": lambda: dec(
                    lambda f: np.ascontiguousarray(f.to_ndarray(format="rgb24"))
                ),
                "decode only (no conversion)": lambda: dec(lambda f: None),
                "rgb24 + cv2 INTER_AREA to 256 (before stream.picture)": lambda: dec(
                    lambda f: resize_batch([np.ascontiguousarray(f.to_ndarray(format="rgb24"))], 256)
                ),
                "reformat to 256x256 rgb24 in swscale, new context per frame": lambda: dec(
                    lambda f: f.to_ndarray(width=256, height=256, format="rgb24", interpolation="AREA")
                ),
                "Picture.scaled(256): swscale, one reused context (current)": lambda: dec(
                    lambda f, r=VideoReformatter(): Picture(f, r).scaled(256)  # noqa: B008 (one reused context)
                ),
                "yuv420p planes only (gray for flow etc.)": lambda: dec(lambda f: f.to_ndarray()),
            },
            max(3, args.repeats // 2),
        )
        out["decode"] = report("decode 856x480 H.264, 48 frames", res, per=48)

    if want("resize"):
        batch = images[:B]
        res = timeit(
            {
                "cv2 INTER_AREA (image files; videos: see decode)": lambda: resize_batch(batch, 256),
                "cv2 INTER_LINEAR": lambda: [cv2.resize(x, (256, 256), interpolation=cv2.INTER_LINEAR) for x in batch],
                "cv2 INTER_NEAREST": lambda: [
                    cv2.resize(x, (256, 256), interpolation=cv2.INTER_NEAREST) for x in batch
                ],
            },
            args.repeats,
            inner=4,
        )
        out["resize"] = report(f"resize 856x480 -> 256 (batch {B})", res, per=B)

    if want("backbone"):
        ext = build_extractor(cfg.detector.backbone, cfg.detector.grid, torch.device("cpu"))
        small = torch.from_numpy(resize_batch(images[:B], 256))
        trunk = ext.trunk
        x_cl = ((small.permute(0, 3, 1, 2).float() - ext.mean) / ext.std).contiguous(memory_format=torch.channels_last)
        x_c = x_cl.contiguous()
        import copy

        trunk_c = copy.deepcopy(trunk).to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            traced = torch.jit.freeze(torch.jit.trace(trunk, x_cl, check_trace=False))
            for _ in range(3):
                traced(x_cl)

            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    trunk(x_cl)

            fns = {
                "channels_last fp32 eager (current)": lambda: trunk(x_cl),
                "contiguous (NCHW) fp32 eager": lambda: trunk_c(x_c),
                "channels_last jit.trace + freeze": lambda: traced(x_cl),
                "channels_last bf16 autocast": bf16,
            }
            for f in fns.values():
                f()
            res = timeit(fns, args.repeats)
        out["backbone"] = report(
            f"EfficientNet-Lite0 trunk @256 (batch {B}, {torch.get_num_threads()} threads)", res, per=B
        )
        with torch.inference_mode():
            fns = {}
            for bs in (8, 1, 4, 16):
                xb = torch.from_numpy(resize_batch((images * 4)[:bs], 256))
                fns[f"full extractor batch {bs}" + (" (current)" if bs == 8 else "")] = lambda xb=xb, bs=bs: (
                    ext(xb),
                    bs,
                )
            per = {}
            for f in fns.values():
                f()
            times = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    bs = f()[1]
                    times[k].append((time.perf_counter() - t0) / bs)
            per = {k: bu.median(v) for k, v in times.items()}
            out["batch"] = report("batch size (per frame)", per)
            thr = {}
            nt0 = torch.get_num_threads()
            xb = torch.from_numpy(resize_batch(images[:B], 256))
            tt = {1: [], 2: [], 3: []}
            for _ in range(max(3, args.repeats // 2)):
                for nt in tt:
                    torch.set_num_threads(nt)
                    t0 = time.perf_counter()
                    ext(xb)
                    tt[nt].append((time.perf_counter() - t0) / B)
            torch.set_num_threads(nt0)
            thr = {f"torch threads {nt}" + (" (current)" if nt == nt0 else ""): bu.median(v) for nt, v in tt.items()}
            out["threads"] = report("torch threads (full extractor, per frame)", thr)

    if want("knn") or want("blur"):
        import torch.nn.functional as F

        from detector.spade import squared_distances
        from tests.reference import gaussian_blur  # the plain blur the product's operator replaced

        g, c = 32, 176
        q = torch.randn(B, g * g, c)
        gal = torch.randn(B, g * g, c)
        gsq = gal.pow(2).sum(-1)
        gal16 = gal.half()
        if want("knn"):
            res = timeit(
                {
                    "squared_distances fp32 + amin (current)": lambda: squared_distances(q, gal, gsq).amin(-1),
                    "torch.cdist + amin": lambda: torch.cdist(q, gal).amin(-1),
                    "bf16 matmul + amin": lambda: squared_distances(q.bfloat16(), gal16.bfloat16(), gsq).amin(-1),
                    "gallery fp16->fp32 conversion alone": lambda: gal16.float(),
                },
                args.repeats,
                inner=3,
            )
            out["knn"] = report(f"pixel kNN (B={B}, 1024x1024x176)", res, per=B)
        if want("blur"):
            dist = torch.rand(B, g, g)

            def cur():
                m = F.interpolate(dist.unsqueeze(1), size=(256, 256), mode="bilinear", align_corners=False).squeeze(1)
                return gaussian_blur(m, 4.0)

            def cv():
                d = dist.numpy()
                return [
                    cv2.GaussianBlur(
                        cv2.resize(d[i], (256, 256), interpolation=cv2.INTER_LINEAR),
                        (0, 0),
                        4.0,
                        borderType=cv2.BORDER_REFLECT_101,
                    )
                    for i in range(B)
                ]

            def small_blur():  # blur at grid resolution (sigma/8), then upsample
                m = gaussian_blur(dist, 4.0 / 8)
                return F.interpolate(m.unsqueeze(1), size=(256, 256), mode="bilinear", align_corners=False)

            res = timeit(
                {
                    "upsample + separable conv2d blur (current)": cur,
                    "cv2 resize + GaussianBlur": cv,
                    "blur at grid res, then upsample (approx.)": small_blur,
                },
                args.repeats,
                inner=3,
            )
            out["post"] = report("map post-processing (upsample + blur)", res, per=B)

    if want("regions"):
        rng = np.random.default_rng(0)
        maps = [cv2.GaussianBlur(rng.random((256, 256), dtype=np.float32), (0, 0), 6) for _ in range(B)]
        thr = float(np.quantile(maps[0], 0.98))

        def fast(amap, threshold, frame_size, min_area=0):
            mask = (amap >= threshold).astype(np.uint8)
            if not mask.any():
                return []
            n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            if n <= 1:
                return []
            fl = labels.ravel()
            fa = amap.ravel()
            sel = fl > 0
            sums = np.bincount(fl[sel], weights=fa[sel], minlength=n)
            order = np.argsort(fl[sel], kind="stable")
            lab, val = fl[sel][order], fa[sel][order]
            starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
            peaks = np.maximum.reduceat(val, starts)
            return sums, peaks

        res = timeit(
            {
                "find_regions (current: float64 copy + np.maximum.at)": lambda: [
                    find_regions(m, thr, (856, 480), 64) for m in maps
                ],
                "labelled pixels only + maximum.reduceat": lambda: [fast(m, thr, (856, 480), 64) for m in maps],
            },
            args.repeats,
            inner=3,
        )
        out["regions"] = report("regions (2% of pixels above threshold)", res, per=B)
        thr_none = float(maps[0].max()) + 1
        res = timeit(
            {
                "find_regions, nothing above threshold": lambda: [
                    find_regions(m, thr_none, (856, 480), 64) for m in maps
                ]
            },
            args.repeats,
            inner=3,
        )
        report("regions (normal frame)", res, per=B)

    out["loadavg_after"] = bu.loadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nload {out['loadavg_before']} -> {out['loadavg_after']}")


if __name__ == "__main__":
    main()
