#!/usr/bin/env python3
"""Throughput of the live pipeline and of each of its stages, side by side on one input.

One generated 856x480 H.264 clip at 24 fps (the STC frame size; stream.synthetic.render_clip) and a
bank fitted on normal footage of the same synthetic scene (same seed, generate_stc) are cached under
--workdir. Each repeat then measures, on the same file and the same frames:

  decode     PyAV, the pipeline's own reader (stream.avio.VideoInput.pictures: thread_type AUTO), frames
             left as decoded (stream.picture), as the pipeline's sources do
  preprocess Detector.model_inputs: each picture shrunk to input_size^2 RGB straight from the decoder's
             planes (the sources' Detector.prepare)
  backbone   Detector.features on the resized frames, in batches of pipeline.max_batch
  scoring    features and flow given: Detector.score_batch (the live path) + ScoredBatch.results
             (broken down as knn = SPADE distances, post = upsample + blur, frame_score, to_host,
             regions = find_regions)
  sinks      SinkSet.publish of those results (JSONL + alert tracker + snapshots, as `run` builds them)
  e2e        app.cli.run_pipeline (what `run_stream.py run` calls) with a file source and a JSONL sink

and, once per camera count, the aggregate e2e fps with N copies of the file as N cameras plus the
aggregate decode fps of N decode threads. Reported numbers are medians over --repeats.

Usage:
  python benchmarks/bench_pipeline.py                         # configs/default.yaml, 240 frames, 3 repeats
  python benchmarks/bench_pipeline.py --quick                 # smoke run
  python benchmarks/bench_pipeline.py --backbone wide_resnet50_2 --weights random --batch 32 \
      --device cuda --frames 2000 --json benchmarks/gpu/wrn50_b32.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

STAGES = ("decode", "preprocess", "motion", "backbone", "knn", "post", "frame_score", "to_host", "regions", "sinks")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--config", default=None, help="YAML path or built-in name (default: configs/default.yaml)")
    ap.add_argument("--frames", type=int, default=None, help="frames in the clip (default 240; --quick 24)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats, medians reported (default 3; --quick 1)")
    ap.add_argument(
        "--multi-repeats", type=int, default=None, help="repeats of the 2/4-camera runs (default: --repeats)"
    )
    ap.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4], help="camera counts (default 1 2 4)")
    ap.add_argument("--device", default=None, help="override detector.device (cpu, cuda, cuda:N)")
    ap.add_argument("--batch", type=int, default=None, help="override pipeline.max_batch and detector.batch_size")
    ap.add_argument("--backbone", default=None, choices=["efficientnet_lite0", "resnet18", "wide_resnet50_2"])
    ap.add_argument("--weights", default=None, help="'random', 'pretrained' or a state-dict path")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--grid", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (detector.threads)")
    ap.add_argument("--size", default="856x480", help="frame size WxH of the generated clip (default 856x480)")
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0, help="scene seed (clip and bank footage share it)")
    ap.add_argument("--anomaly", default="vehicle", choices=["vehicle", "offpath", "object", "none"])
    ap.add_argument(
        "--train-frames", type=int, default=None, help="frames per training video, 2 videos (default 240; --quick 24)"
    )
    ap.add_argument("--workdir", default=str(bu.DEFAULT_WORKDIR), help="cache dir (default benchmarks/out)")
    ap.add_argument(
        "--hwaccel",
        default="none",
        choices=["none", "cuda"],
        help="source.hwaccel of the e2e cameras and the N-thread decode (default none); "
        "decode_fps is always software, decode_hw_fps NVDEC when --hwaccel cuda",
    )
    ap.add_argument("--video", action="store_true", help="also run the annotated-video sink in e2e")
    ap.add_argument(
        "--bank-per-camera",
        action="store_true",
        help="multi-camera runs give each camera its own copy of the bank (sources[].bank): "
        "the cost of scoring cameras against banks of their own",
    )
    ap.add_argument("--profile", action="store_true", help="torch-profile one backbone and scoring pass")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    ap.add_argument("--label", default=None, help="free text stored in the JSON")
    ap.add_argument("--quick", action="store_true", help="fewer frames and repeats (smoke run)")
    args = ap.parse_args(argv)
    args.frames = args.frames or (24 if args.quick else 240)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.multi_repeats = args.multi_repeats or args.repeats
    args.train_frames = args.train_frames or (24 if args.quick else 240)
    return args


class Timer:
    """Wall seconds per stage, plus process CPU seconds (all threads: torch's pool included) per stage."""

    def __init__(self, sync):
        self.sync = sync
        self.acc: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._c = time.process_time()

    def start(self) -> float:
        self._c = time.process_time()
        return time.perf_counter()

    def add(self, name: str, t0: float) -> float:
        self.sync()
        t1 = time.perf_counter()
        c1 = time.process_time()
        self.acc[name] = self.acc.get(name, 0.0) + (t1 - t0)
        self.cpu[name] = self.cpu.get(name, 0.0) + (c1 - self._c)
        self._c = c1
        return t1


def decode_file(clip: Path, keep: bool = True, hwaccel: str | None = None):
    from stream.avio import VideoInput

    frames, n = [], 0
    t0 = time.perf_counter()
    decode_file.cpu0 = time.process_time()
    with VideoInput(str(clip), "file", hwaccel=hwaccel) as v:
        for picture, _t in v.pictures():
            n += 1
            if keep:
                frames.append(picture)
    decode_file.cpu_s = time.process_time() - decode_file.cpu0
    return frames, n, time.perf_counter() - t0


def decode_parallel(clip: Path, n_threads: int, hwaccel: str | None = None) -> float:
    """Aggregate fps of n threads each decoding the whole file (as n file cameras do)."""
    counts = [0] * n_threads

    def work(i):
        counts[i] = decode_file(clip, keep=False, hwaccel=hwaccel)[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def make_sync(device):
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def isolated_pass(det, pictures, cfg, sinks, sync, camera="bench") -> dict:
    """Every stage in isolation on the same frames, batch by batch; seconds per stage + totals."""
    import torch

    from detector.detector import frame_components
    from detector.regions import find_regions
    from detector.spade import SpadeOutput
    from stream.frame import Frame

    d = cfg.detector
    bs = cfg.pipeline.max_batch
    frames = [Frame(camera, i, i / 24.0, p) for i, p in enumerate(pictures)]
    tm = Timer(sync)
    totals = {"backbone": 0.0, "scoring": 0.0, "scoring_cpu": 0.0}
    sc = det.scorer
    k = max(sc.k_image, sc.k_gallery)
    pix_t = det.thresholds.pixel
    det.reset()
    for b0 in range(0, len(frames), bs):
        fb = frames[b0 : b0 + bs]
        cams = [f.camera_id for f in fb]
        t = tm.start()
        small = det.model_inputs(fb)
        t = tm.add("preprocess", t)
        motion = None
        if det.flow_extractor is not None:
            motion = det.flow_features(small, cams, indices=[f.index for f in fb])
            fb = [dataclasses.replace(f, flow=motion[i]) for i, f in enumerate(fb)]  # as the sources give it
            t = tm.add("motion", t)
        pyr, glob = det.features(small)
        t1 = tm.add("backbone", t)
        totals["backbone"] += t1 - t
        # scoring as the detector does it (features given)
        t = time.perf_counter()
        c = time.process_time()
        results = det.score_batch(fb, model_input=small, features=(pyr, glob)).results()  # the live path
        sync()
        totals["scoring"] += time.perf_counter() - t
        totals["scoring_cpu"] += time.process_time() - c
        # the same, broken down (appearance path; motion maps are added by score_batch above)
        with torch.inference_mode():
            t = tm.start()
            d2, idx = sc.nearest_frames(glob, k)
            image_scores = d2[:, : sc.k_image].mean(dim=1)
            dist = sc.pixel_distances(pyr, idx)
            t = tm.add("knn", t)
            maps = sc.upsample(dist)
            t = tm.add("post", t)
            o2 = SpadeOutput(image_scores, idx, maps)
            c2 = frame_components(
                o2,
                d.topq,
                pix_t,
                costly=det.costly_components_read(),
                moving_weights=det.moving_weights(motion, len(fb)),
            )
            det.thresholds.frame_scores(c2)
            t = tm.add("frame_score", t)
            maps_np = maps.float().cpu().numpy()
            idx.cpu().numpy()
            t = tm.add("to_host", t)
            for i, f in enumerate(fb):
                find_regions(maps_np[i], pix_t, f.size, cfg.regions.min_area)
            t = tm.add("regions", t)
        t = tm.start()
        for res, f in zip(results, fb):
            sinks.publish(res, f)
        tm.add("sinks", t)
    n = len(frames)
    return {
        "n": n,
        "stage_s": tm.acc,
        "stage_cpu_s": tm.cpu,
        "backbone_fps": n / totals["backbone"],
        "scoring_fps": n / totals["scoring"],
        "preprocess_fps": n / tm.acc["preprocess"],
        "scoring_cpu_ms": totals["scoring_cpu"] * 1000.0 / n,
    }


def camera_banks(bank: Path, n: int) -> list[Path]:
    """n copies of the bank beside it, one per camera (distinct folders are distinct banks to `run`)."""
    out = []
    for i in range(n):
        copy = bank.parent / f"{bank.name}_cam{i}"
        if not (copy / "meta.json").is_file():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(bank, copy)
        out.append(copy)
    return out


def run_e2e(
    cfg, bank: Path, clip: Path, n_cams: int, out: Path, video: bool, hwaccel: str = "none", own_banks: bool = False
) -> dict:
    from app.cli import run_pipeline
    from configs.schema import SourceConfig

    c = cfg.model_copy(deep=True)
    banks = camera_banks(bank, n_cams) if own_banks else [None] * n_cams
    c.sources = [
        SourceConfig(name=f"cam{i}", url=str(clip), hwaccel=hwaccel, bank=str(b) if b else None)
        for i, b in enumerate(banks)
    ]
    shutil.rmtree(out, ignore_errors=True)
    c.sinks.jsonl.enabled = True
    c.sinks.jsonl.path = str(out / "events.jsonl")
    if video:
        c.sinks.video.dir = str(out / "video")
    t0 = time.perf_counter()
    c0 = time.process_time()
    summary = run_pipeline(c, bank, out, progress=False)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0  # includes Detector.load (model build), a fixed cost
    errors = {n: cam["error"] for n, cam in summary.cameras.items() if cam.get("error")}
    if errors:
        raise RuntimeError(f"pipeline sources failed: {errors}")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "fps": summary.fps,
        "frames": summary.frames,
        "elapsed_s": summary.elapsed_s,
        "wall_s": wall,
        "cpu_ms_per_frame": cpu * 1000.0 / max(summary.frames, 1),
        "stage_ms": dict(summary.stage_ms),
    }


def profile_pass(det, pictures, cfg, sync) -> dict:
    """torch.profiler tables (top ops by self CPU time) of one backbone batch and its scoring."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from stream.frame import Frame

    bs = cfg.pipeline.max_batch
    fb = [Frame("prof", i, i / 24.0, p) for i, p in enumerate(pictures[:bs])]
    small = det.model_inputs(fb)
    det.features(small)  # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if det.device.type == "cuda" else [])
    tables = {}
    with profile(activities=acts) as prof:
        pyr, glob = det.features(small)
        sync()
    tables["backbone"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    with profile(activities=acts) as prof:
        det.score_batch(fb, all_components=True, model_input=small, features=(pyr, glob)).results()
        sync()
    tables["scoring"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    del torch
    return tables


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)

    from detector.detector import Detector
    from sinks import build_sinks

    load_before = bu.loadavg()
    t_start = time.monotonic()
    cfg = bu.load_config(args)
    workdir = Path(args.workdir)
    size = bu.parse_size(args.size)
    anomaly = None if args.anomaly == "none" else args.anomaly
    clip = bu.ensure_clip(workdir, size, args.fps, args.frames, args.seed, anomaly)
    footage = bu.ensure_footage(workdir, size, args.fps, 2, args.train_frames, args.seed)
    d = cfg.detector
    bank, fit_info = bu.ensure_bank(cfg, footage, workdir)
    bank_frames = json.loads((bank / "meta.json").read_text())["n_frames"]

    rss_start = bu.maxrss_mb()
    runs_dir = workdir / "runs"
    reps: dict[str, list] = {
        k: []
        for k in (
            "decode_fps",
            "backbone_fps",
            "scoring_fps",
            "preprocess_fps",
            "e2e_fps",
            "e2e_wall_s",
            "e2e_cpu_ms",
            "scoring_cpu_ms",
            "decode_hw_fps",
        )
    }
    from stream.avio import resolve_hwaccel

    hw = resolve_hwaccel(args.hwaccel)  # what the e2e cameras decode with
    stage_reps: dict[str, list] = {}
    cpu_reps: dict[str, list] = {}
    pipe_stage_reps: dict[str, list] = {}
    images = None
    det = None
    rss_after_e2e = None
    for r in range(args.repeats):
        bu.log(f"repeat {r + 1}/{args.repeats}: e2e (1 camera) ...")
        e = run_e2e(cfg, bank, clip, 1, runs_dir / "e2e", args.video, args.hwaccel)
        if rss_after_e2e is None:
            rss_after_e2e = bu.maxrss_mb()
        reps["e2e_fps"].append(e["fps"])
        reps["e2e_wall_s"].append(e["wall_s"])
        reps["e2e_cpu_ms"].append(e["cpu_ms_per_frame"])
        for k, v in e["stage_ms"].items():
            pipe_stage_reps.setdefault(k, []).append(v)
        bu.log(f"  e2e {e['fps']:.1f} fps; decode ...")
        frames, n, dt = decode_file(clip, keep=images is None)
        if images is None:
            images = frames
        reps["decode_fps"].append(n / dt)
        if hw is not None:
            _, nh, dth = decode_file(clip, keep=False, hwaccel=hw)
            reps["decode_hw_fps"].append(nh / dth)
        stage_reps.setdefault("decode", []).append(dt / n)
        cpu_reps.setdefault("decode", []).append(decode_file.cpu_s / n)
        if det is None:
            c0 = time.process_time()
            det = Detector.load(cfg, bank)
            load_cpu_s = time.process_time() - c0
            sync = make_sync(det.device)
            det.warm_up(cfg.pipeline.max_batch)  # first calls trace the trunk, build oneDNN primitives
        sink_dir = runs_dir / "sinks"
        shutil.rmtree(sink_dir, ignore_errors=True)
        sinks = build_sinks(cfg.sinks, cfg.alerts, sink_dir, fps_hint=float(args.fps))
        bu.log("  isolated stages ...")
        iso = isolated_pass(det, images, cfg, sinks, sync)
        sinks.close(reason="shutdown")
        shutil.rmtree(sink_dir, ignore_errors=True)
        for k in ("backbone_fps", "scoring_fps", "preprocess_fps"):
            reps[k].append(iso[k])
        for k, v in iso["stage_s"].items():
            stage_reps.setdefault(k, []).append(v / iso["n"])
        for k, v in iso["stage_cpu_s"].items():
            cpu_reps.setdefault(k, []).append(v / iso["n"])
        reps["scoring_cpu_ms"].append(iso["scoring_cpu_ms"])
        bu.log(
            f"  decode {reps['decode_fps'][-1]:.1f} fps, backbone {iso['backbone_fps']:.1f} fps, "
            f"scoring {iso['scoring_fps']:.1f} fps"
        )

    multi: dict[int, float] = {}
    multi_detail: dict[int, dict] = {}
    decode_threads: dict[int, float] = {}
    for n in args.cameras:
        dec = [decode_parallel(clip, n, hw) for _ in range(args.multi_repeats)]
        decode_threads[n] = bu.median(dec)
        if n == 1:
            multi[1] = bu.median(reps["e2e_fps"])
            multi_detail[1] = {"fps": multi[1], "runs": reps["e2e_fps"], "decode_fps": decode_threads[n]}
            continue
        bu.log(f"multi-camera: {n} cameras ...")
        runs = [
            run_e2e(cfg, bank, clip, n, runs_dir / f"e2e_{n}cams", args.video, args.hwaccel, args.bank_per_camera)
            for _ in range(args.multi_repeats)
        ]
        multi[n] = bu.median([x["fps"] for x in runs])
        multi_detail[n] = {
            "fps": multi[n],
            "runs": [x["fps"] for x in runs],
            "decode_fps": decode_threads[n],
            "stage_ms": {k: bu.median([x["stage_ms"].get(k) for x in runs]) for k in runs[0]["stage_ms"]},
        }
        bu.log(f"  {n} cameras: {multi[n]:.1f} fps aggregate")

    tables = profile_pass(det, images, cfg, sync) if args.profile else None
    load_after = bu.loadavg()
    med = {k: bu.median(v) for k, v in reps.items() if v}
    stage_ms = {k: round(bu.median(v) * 1000.0, 3) for k, v in stage_reps.items()}
    result = {
        "config": str(args.config or "default"),
        "bank_per_camera": args.bank_per_camera,
        "label": args.label,
        "backbone": d.backbone.name,
        "weights": d.backbone.weights or "pretrained",
        "input_size": d.input_size,
        "grid": d.grid,
        "batch": cfg.pipeline.max_batch,
        "frames": len(images),
        "frame_size": list(size),
        "repeats": args.repeats,
        "bank_frames": bank_frames,
        "clip": str(clip),
        "bank": str(bank),
        "decode_fps": med["decode_fps"],
        "decode_hw_fps": med["decode_hw_fps"] if reps["decode_hw_fps"] else None,
        "hwaccel": hw or "none",
        "preprocess_fps": med["preprocess_fps"],
        "backbone_fps": med["backbone_fps"],
        "scoring_fps": med["scoring_fps"],
        "e2e_fps": med["e2e_fps"],
        "e2e_ratio": med["e2e_fps"] / min(med["decode_fps"], med["backbone_fps"]),
        # the same ratio taken within each repeat (side by side), then the median: robust to load drift
        "e2e_ratio_median_of_repeats": bu.median(
            [e / min(dc, bb) for e, dc, bb in zip(reps["e2e_fps"], reps["decode_fps"], reps["backbone_fps"])]
        ),
        "limiting": "decode" if med["decode_fps"] < med["backbone_fps"] else "backbone",
        "stage_ms": stage_ms,
        "stage_ms_sum": round(sum(stage_ms.values()), 3),
        # process CPU time (all threads) per frame: what the work costs regardless of machine load;
        # cores / cpu_ms is what an otherwise idle machine could reach if the stages overlapped perfectly
        "stage_cpu_ms": {k: round(bu.median(v) * 1000.0, 3) for k, v in cpu_reps.items()},
        "e2e_cpu_ms_per_frame": med["e2e_cpu_ms"] - load_cpu_s * 1000.0 / len(images),
        "detector_load_cpu_s": round(load_cpu_s, 2),
        "scoring_cpu_ms_per_frame": med["scoring_cpu_ms"],
        "pipeline_stage_ms": {k: round(bu.median(v), 3) for k, v in pipe_stage_reps.items()},
        "multi_camera": multi,
        "multi_camera_detail": multi_detail,
        "decode_threads_fps": decode_threads,
        # N cameras against what N decode threads and the backbone allow (the GPU target's ratio)
        "multi_camera_ratio": {n: multi[n] / min(decode_threads[n], med["backbone_fps"]) for n in multi},
        "peak_rss_mb": round(bu.maxrss_mb(), 1),
        "peak_rss_mb_after_e2e": round(rss_after_e2e, 1) if rss_after_e2e else None,
        "peak_rss_mb_before_runs": round(rss_start, 1),
        "peak_rss_children_mb": round(bu.maxrss_mb(bu.resource.RUSAGE_CHILDREN), 1),
        "raw": reps,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "fit": fit_info,
        "total_s": round(time.monotonic() - t_start, 1),
        "argv": sys.argv[1:] if argv is None else list(argv),
        **bu.machine_info(det.device),
        **{"git_" + k: v for k, v in bu.git_info().items()},
    }
    result["threads"] = result["torch_threads"]
    if tables:
        result["profile"] = tables
    print_table(result)
    if tables:
        for k, v in tables.items():
            print(f"\n--- torch profiler: {k} (one batch of {cfg.pipeline.max_batch}) ---\n{v}")
    if args.json:
        bu.write_json(args.json, result)
    return 0


def print_table(r: dict) -> None:
    print(
        f"\nbench_pipeline: {r['config']} {r['backbone']} ({r['weights']}) input {r['input_size']} grid {r['grid']} "
        f"batch {r['batch']}, {r['frames']} frames {r['frame_size'][0]}x{r['frame_size'][1]}, "
        f"device {r['device']}, torch threads {r['torch_threads']}, median of {r['repeats']}, "
        f"load {r['loadavg_before']} -> {r['loadavg_after']}"
    )
    print(f"{'measure':<28} {'fps':>10}")
    for k in ("decode_fps", "preprocess_fps", "backbone_fps", "scoring_fps", "e2e_fps"):
        print(f"{k:<28} {r[k]:10.1f}")
    print(f"{'e2e_ratio (e2e/min(dec,bb))':<28} {r['e2e_ratio']:10.3f}   limiting: {r['limiting']}")
    print(f"\n{'stage (isolated)':<28} {'ms/frame':>10} {'cpu ms/frame':>13}")
    for k in STAGES:
        if k in r["stage_ms"]:
            print(f"{k:<28} {r['stage_ms'][k]:10.2f} {r['stage_cpu_ms'].get(k, float('nan')):13.2f}")
    print(f"{'sum':<28} {r['stage_ms_sum']:10.2f}   (1000/sum = {1000.0 / r['stage_ms_sum']:.1f} fps serial)")
    print(f"pipeline stage_ms: {r['pipeline_stage_ms']}")
    print(
        f"e2e process CPU: {r['e2e_cpu_ms_per_frame']:.1f} ms/frame (all threads, model load subtracted) -> "
        f"{1000.0 * (r['affinity_cpus'] or 1) / r['e2e_cpu_ms_per_frame']:.1f} fps on {r['affinity_cpus']} idle cores "
        "at best"
    )
    print(f"\n{'cameras':<10} {'e2e fps (aggregate)':>20} {'decode fps (N threads)':>24}")
    for n, v in r["multi_camera"].items():
        print(f"{n:<10} {v:20.1f} {r['decode_threads_fps'][n]:24.1f}")
    print(
        f"\npeak RSS: {r['peak_rss_mb']} MB (after first e2e run: {r['peak_rss_mb_after_e2e']} MB; "
        f"fit subprocess: {r['peak_rss_children_mb']} MB)"
    )


if __name__ == "__main__":
    sys.exit(main())
