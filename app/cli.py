"""Every command of the spade-stream command line: fit a memory bank, evaluate offline, verify a bank,
run the live pipeline, the demo and the synthetic data set. `run_stream.py` (and the `spade-stream`
script) call `main`.

Bad input (a missing file, a bad config field, an unreadable video) ends with one `error:` line on stderr
per problem naming the file, field or variable, and exit code 2. `run` exits 3 when no camera delivered a
frame.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from configs.errors import UserError

os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:timm")

log = logging.getLogger(__name__)

EXIT_USAGE = 2  # bad input: a file, config field, variable or argument
EXIT_NO_FRAMES = 3  # `run` ended without any camera delivering a frame (all unreachable, say)

DESCRIPTION = "spade-stream command line: fit a memory bank, evaluate offline, run the live pipeline, demo."


def _parse_source(spec: str):
    from pydantic import ValidationError

    from configs.schema import SourceConfig

    if "=" not in spec:
        raise UserError(f"--source {spec!r}: expected NAME=URL (e.g. cam1=rtsp://host/stream)")
    name, url = spec.split("=", 1)
    try:
        return SourceConfig(name=name, url=url)
    except ValidationError as err:
        from configs import format_validation_error

        raise UserError(format_validation_error(err, f"--source {name}")) from None


def _add_live_commands(sub, common) -> None:
    p = sub.add_parser("run", help="run the live pipeline on cameras and files")
    common(p)
    p.add_argument(
        "--bank", default=None, help="memory bank directory (from `fit`) of every camera without a bank of its own"
    )
    p.add_argument(
        "--camera-bank",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="camera NAME's own bank (repeatable; sets sources[].bank)",
    )
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="add a camera or file (repeatable); adds to the config's sources",
    )
    p.add_argument("--redis", default=None, metavar="URL", help="publish to Redis (redis:// or rediss://)")
    p.add_argument("--video-out", default=None, metavar="DIR", help="write annotated video per camera")
    p.add_argument(
        "--out", default="runs/latest", metavar="DIR", help="where events.jsonl and snapshots go (default runs/latest)"
    )
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics and /healthz on this port (0: any free port)",
    )
    p.add_argument(
        "--secrets-file",
        default=None,
        metavar="FILE",
        help="NAME=value lines (chmod 600) that *_env config fields may name",
    )
    p.add_argument("--no-progress", action="store_true", help="no live terminal display")
    p.add_argument(
        "--cluster",
        default=None,
        metavar="ADDRESS",
        help="spread the cameras over Ray workers: a Ray address (auto, ray://host:10001, host:6379) "
        "or local (Ray in this process); needs a Redis URL (app/cluster.py)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        metavar="N",
        help="with --cluster and no GPUs: one camera worker per N CPUs (default 1)",
    )

    p = sub.add_parser("synth", help="write the synthetic STC-layout data set (tests, demos, benchmarks)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0, help="activity seed")
    p.add_argument(
        "--camera",
        type=int,
        default=0,
        help="scene (layout and background) seed; its STC scene number, camera + 1, prefixes the names, "
        "so runs with other --camera values into one --out make a multi-scene set",
    )
    p.add_argument("--size", default="320x240", help="WIDTHxHEIGHT (even numbers)")
    p.add_argument("--train-videos", type=int, default=2)
    p.add_argument("--train-frames", type=int, default=240)
    p.add_argument("--test-videos", type=int, default=3)
    p.add_argument("--test-frames", type=int, default=120)

    p = sub.add_parser("demo", help="self-contained demo on generated footage (no setup needed)")
    common(p)
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out)")
    p.add_argument("--redis", default=None, metavar="URL", help="also publish to Redis")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomaly", choices=["vehicle", "offpath", "object"], default="object")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the streamed clip")

    p = sub.add_parser("console", help="operator web console: cameras, live previews, alerts (reads Redis only)")
    p.add_argument("--redis", required=True, metavar="URL", help="the Redis the pipeline(s) publish to")
    p.add_argument("--prefix", default="spade", help="key prefix (sinks.redis.prefix; default spade)")
    p.add_argument(
        "--bind",
        default="127.0.0.1",
        metavar="ADDR",
        help="interface to listen on (default 127.0.0.1; any other needs --token-env)",
    )
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--token-env",
        default=None,
        metavar="NAME",
        help="environment variable (or --secrets-file name) holding the access token",
    )
    p.add_argument("--secrets-file", default=None, metavar="FILE", help="NAME=value lines (chmod 600)")
    p.add_argument(
        "--redis-password-env", default=None, metavar="NAME", help="environment variable holding the Redis password"
    )
    p.add_argument(
        "--snapshots-root",
        default=None,
        metavar="DIR",
        help="serve alert snapshots found under DIR (default: serve none)",
    )
    p.add_argument(
        "--video-root",
        default=None,
        metavar="DIR",
        help="link alerts to the video sink's recordings under DIR (default: none)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def apply_cli_overrides(cfg, args):
    from pydantic import ValidationError

    try:
        return _apply_cli_overrides(cfg, args)
    except ValidationError as err:  # validate_assignment: a bad --metrics-port, --redis, ...
        from configs import format_validation_error

        raise UserError(format_validation_error(err, "command line: pipeline/sinks")) from None


def _apply_cli_overrides(cfg, args):
    for spec in args.source:
        sc = _parse_source(spec)
        if any(s.name == sc.name for s in cfg.sources):
            raise UserError(f"--source {sc.name}: a source with this name is already in the config")
        cfg.sources.append(sc)
    for spec in getattr(args, "camera_bank", []):
        name, sep, path = spec.partition("=")
        src = next((s for s in cfg.sources if s.name == name), None)
        if not sep or not path:
            raise UserError(f"--camera-bank {spec!r}: expected NAME=DIR (e.g. gate=banks/gate)")
        if src is None:
            raise UserError(
                f"--camera-bank {name}: no source of that name (sources: "
                f"{', '.join(s.name for s in cfg.sources) or 'none'})"
            )
        src.bank = path
    if getattr(args, "redis", None):
        cfg.sinks.redis.url = args.redis
    if getattr(args, "video_out", None):
        cfg.sinks.video.dir = args.video_out
    if getattr(args, "metrics_port", None) is not None:
        cfg.pipeline.metrics_port = args.metrics_port
    if getattr(args, "secrets_file", None):
        cfg.pipeline.secrets_file = args.secrets_file
    return cfg


def check_sources(cfg) -> None:
    """At least one source, and no two with one name (UserError naming them)."""
    if not cfg.sources:
        raise UserError("sources: no camera or file configured (add `sources:` to the config or --source NAME=URL)")
    names = [s.name for s in cfg.sources]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UserError(f"sources: duplicate camera name(s) {sorted(dupes)}")


def run_pipeline(cfg, bank: Path | None, out_dir: Path, duration=None, progress=True, on_pipeline=None):
    """Run the live pipeline on cfg.sources, each camera scored against its own bank (sources[].bank)
    or `bank`. `on_pipeline(pipe)`, when given, is called with the Pipeline just before it runs (app.cluster
    uses it to stop the run from another thread and to read its state)."""
    from app.pipeline import Pipeline
    from detector.cameras import BankRouter
    from sinks import build_sinks
    from stream.sources import check_recorded

    check_sources(cfg)
    if cfg.pipeline.secrets_file:
        import configs

        names = configs.load_secrets(cfg.pipeline.secrets_file)
        log.info("secrets file %s: %d name(s) loaded", cfg.pipeline.secrets_file, len(names))
    check_recorded(cfg.sources)  # a missing or undecodable file is reported before the model loads
    det = BankRouter.for_cameras(cfg, bank)
    det.warm_up(cfg.pipeline.max_batch)
    out_dir.mkdir(parents=True, exist_ok=True)
    sinks = build_sinks(cfg.sinks, cfg.alerts, out_dir, fps_hint=det.source_fps)
    metrics = None
    try:
        pipe = Pipeline(cfg, det, sinks)
        if cfg.pipeline.metrics_port is not None:
            from app.prometheus import MetricsServer

            metrics = MetricsServer(pipe, cfg.pipeline.metrics_port, host=cfg.pipeline.metrics_host)
            metrics.start()
    except BaseException:
        sinks.close(reason="shutdown")  # a config error must not leave a Redis worker or open files
        raise
    if on_pipeline is not None:
        try:
            on_pipeline(pipe)
        except BaseException:
            sinks.close(reason="shutdown")
            if metrics is not None:
                metrics.stop()
            raise
    try:
        summary = pipe.run(duration_s=duration, progress=progress)
    finally:
        if metrics is not None:
            metrics.stop()
    return summary


def _summary_json(summary) -> dict:
    return {
        "reason": summary.reason,
        "frames": summary.frames,
        "elapsed_s": round(summary.elapsed_s, 2),
        "fps": round(summary.fps, 2),
        "cameras": summary.cameras,
        "stage_ms_per_frame": {k: round(v, 2) for k, v in summary.stage_ms.items()},
        "sink_errors": summary.sink_errors,
    }


def cmd_run(args) -> int:
    """Exit codes: 0 when the run ended (duration, signal, end of input) with frames from some camera;
    2 for bad input (nothing starts; or every source failed); 3 when no camera ever delivered a frame."""
    import configs
    from configs import jsonsafe

    cfg = apply_cli_overrides(configs.load(args.config), args)
    if getattr(args, "cluster", None):  # many machines: app/cluster.py
        from app.cluster import cmd_run_cluster

        return cmd_run_cluster(cfg, args)
    summary = run_pipeline(
        cfg,
        Path(args.bank) if args.bank else None,
        Path(args.out),
        args.duration,
        progress=cfg.pipeline.progress and not args.no_progress and not args.quiet,
    )
    print(jsonsafe.dumps(_summary_json(summary), indent=1))
    failed = [n for n, c in summary.cameras.items() if c.get("error")]
    for n in failed:  # one line each, naming the camera and the (redacted) file or URL
        print(f"error: {n}: {summary.cameras[n]['error']}", file=sys.stderr)
    if failed and len(failed) == len(summary.cameras):
        return 2
    if summary.frames == 0:
        print(
            "error: no camera delivered a frame during the run (states: "
            + ", ".join(f"{n} {c['state']}" for n, c in summary.cameras.items())
            + ")",
            file=sys.stderr,
        )
        return EXIT_NO_FRAMES
    return 0


def _demo_bank(cfg, out: Path, seed: int, quiet: bool) -> tuple[Path, bool]:
    """The demo's bank: fitted once on generated normal footage and reused while the config's detector
    and bank settings and the seed stay the same (`<out>/bank/demo.json` records them). The footage is
    deleted after the fit; only the bank stays. Returns (bank directory, reused)."""
    import hashlib
    import shutil

    from configs import jsonsafe
    from detector.fit import fit_bank
    from stream.synthetic import generate_stc

    bank = out / "bank"
    key = {"seed": seed, "detector": cfg.detector.model_dump(mode="json"), "bank": cfg.bank.model_dump(mode="json")}
    digest = hashlib.sha256(jsonsafe.dumps(key, sort_keys=True).encode()).hexdigest()
    stamp = bank / "demo.json"
    try:
        if json.loads(stamp.read_text()).get("digest") == digest and (bank / "meta.json").is_file():
            print(f"[1/3] reusing the memory bank in {bank} (same config and seed)", flush=True)
            return bank, True
    except (OSError, ValueError):
        pass
    footage = out / "footage.tmp"
    shutil.rmtree(footage, ignore_errors=True)
    shutil.rmtree(bank, ignore_errors=True)
    # Neighbouring frames of a fixed camera at 24 fps are near-duplicates: every 4th keeps the bank at
    # ~40 MB instead of ~160 MB, with the same alerts on the demo's clips.
    fit_cfg = cfg.model_copy(deep=True)
    fit_cfg.bank.every = max(cfg.bank.every, DEMO_BANK_EVERY)
    print(
        f"[1/3] generating 20 s of normal footage and fitting a memory bank ({cfg.detector.backbone.name}, "
        f"every {fit_cfg.bank.every}th frame) in {bank}",
        flush=True,
    )
    try:
        generate_stc(footage, seed=seed, fps=DEMO_FPS, train_videos=2, train_frames=240, test_videos=0)
        fit_bank(fit_cfg, footage, bank, progress=not quiet)
    finally:
        shutil.rmtree(footage, ignore_errors=True)
    stamp.write_text(jsonsafe.dumps({"digest": digest, "seed": seed}) + "\n")
    return bank, False


def _new_run_dir(out: Path) -> Path:
    """`<out>/runs/<YYYYmmdd-HHMMSS>` (a suffix if two runs start in one second), and `<out>/latest`
    pointing at it: every run keeps its own events, video and snapshots."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run = out / "runs" / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            run.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    latest = out / "latest"
    tmp = out / ".latest.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run.relative_to(out), target_is_directory=True)
        tmp.replace(latest)
    except OSError as err:  # a file system without symlinks: the run folder is still printed
        log.debug("could not point %s at %s: %s", latest, run, err)
    return run


DEMO_FPS = 24
DEMO_BANK_EVERY = 4


def cmd_demo(args) -> int:
    import configs
    from configs import jsonsafe
    from configs.schema import SourceConfig
    from stream.synthetic import render_clip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = configs.load(args.config)
    t0 = time.monotonic()
    bank, reused = _demo_bank(cfg, out, args.seed, args.quiet)
    run = _new_run_dir(out)
    clip = run / f"clip_{args.anomaly}.mp4"
    n = max(DEMO_FPS, int(args.seconds * DEMO_FPS))
    print(f"[2/3] rendering a {args.seconds:.0f} s test clip with an anomaly ({args.anomaly}): {clip}", flush=True)
    render_clip(clip, seed=args.seed + 1000, fps=DEMO_FPS, frames=n, anomaly=args.anomaly)
    cfg.sources = [SourceConfig(name="demo_cam", url=str(clip))]
    cfg.sinks.video.dir = str(run / "video")
    cfg.alerts.snapshot_dir = str(run / "snapshots")
    cfg.sinks.jsonl.enabled = True
    cfg.sinks.jsonl.path = str(run / "events.jsonl")
    if args.redis:
        cfg.sinks.redis.url = args.redis
    print(f"[3/3] streaming the clip through the live pipeline; outputs in {run}", flush=True)
    summary = run_pipeline(cfg, bank, run, progress=not args.quiet)
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if x.strip()]
    alerts = [e for e in events if e.get("type") == "alert"]
    report = {
        "run": str(run),
        "bank": {"path": str(bank), "reused": reused},
        "annotated_video": sorted(str(p) for p in (run / "video").glob("*.mp4")),
        "events": str(run / "events.jsonl"),
        "snapshots": sorted(str(p) for p in (run / "snapshots").rglob("*.jpg")),
        "alerts": [
            {
                k: a.get(k)
                for k in (
                    "event",
                    "alert_id",
                    "start_ts",
                    "end_ts",
                    "start_media_ts",
                    "end_media_ts",
                    "peak_score",
                    "snapshot",
                )
            }
            for a in alerts
        ],
        "pipeline": _summary_json(summary),
        "total_s": round(time.monotonic() - t0, 1),
    }
    print(jsonsafe.dumps(report, indent=1))
    return 0


def cmd_synth(args) -> int:
    from stream.synthetic import generate_stc

    try:
        w, h = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 320x240") from None
    try:
        summary = generate_stc(
            args.out,
            seed=args.seed,
            camera=args.camera,
            size=(w, h),
            train_videos=args.train_videos,
            train_frames=args.train_frames,
            test_videos=args.test_videos,
            test_frames=args.test_frames,
        )
    except ValueError as err:
        raise UserError(f"synth: {err}") from None
    from configs import jsonsafe

    print(jsonsafe.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, indent=1))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config path or built-in name (default, stc_paper)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="run_stream.py", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="build a memory bank from normal footage")
    _common(p)
    p.add_argument("--data", required=True, help="STC root, folder of videos, or folder of images")
    p.add_argument("--bank", required=True, help="output bank directory")

    p = sub.add_parser("eval", help="evaluate on an STC-layout test set")
    _common(p)
    p.add_argument("--data", required=True, help="STC root with testing/frames and testing/test_*_mask")
    p.add_argument("--bank", required=True)
    p.add_argument("--out", required=True, help="output directory for metrics.json and plots")
    p.add_argument("--every", type=int, default=1, help="evaluate every N-th test frame (paper: 5)")
    p.add_argument(
        "--smooth",
        choices=["none", "causal", "centred"],
        default="none",
        help="temporal smoothing of frame scores (causal is what live alerts see)",
    )
    p.add_argument("--window", type=int, default=9, help="smoothing window in frames")
    p.add_argument(
        "--cluster",
        default=None,
        metavar="ADDRESS",
        help="score the test videos on Ray tasks: a Ray address or local (app/cluster.py); data and "
        "bank must be at the same path on every node",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="N", help="with --cluster: CPUs per task")

    p = sub.add_parser("verify-bank", help="check a bank's arrays against the checksums in its metadata")
    p.add_argument("--bank", required=True)
    p.add_argument("-v", "--verbose", action="store_true")

    _add_live_commands(sub, _common)
    return ap


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="timm")


def cmd_fit(args) -> int:
    import configs
    from configs import jsonsafe
    from detector.fit import fit_bank

    cfg = configs.load(args.config)
    meta = fit_bank(cfg, args.data, args.bank, progress=not args.quiet)

    def summary(m: dict) -> dict:
        cal = m.get("calibration") or {}
        return {
            "n_frames": m["n_frames"],
            "backbone": m["backbone"],
            "holdout": cal.get("n_holdout", 0),
            "pixel_threshold": cal.get("pixel_threshold"),
            "count_warnings": m.get("count_warnings", []),
        }

    if "scenes" in meta:
        out = {"bank": str(args.bank), "scenes": {s: summary(m) for s, m in meta["scenes"].items()}}
    else:
        out = {"bank": str(args.bank)} | summary(meta)
    print(jsonsafe.dumps(out, indent=1))
    return 0


def cmd_eval(args) -> int:
    import configs
    from configs import jsonsafe
    from configs.errors import UserError
    from evaluation.run import evaluate

    if args.every < 1:
        raise UserError(f"--every: expected a positive integer, got {args.every}")
    cfg = configs.load(args.config)
    options = dict(
        every=args.every,
        smoothing=args.smooth,
        window=args.window if args.smooth != "none" else 1,
        progress=not args.quiet,
    )
    if getattr(args, "cluster", None):  # many machines: app/cluster.py
        from app.cluster import evaluate_cluster

        m = evaluate_cluster(
            cfg, args.data, args.bank, args.out, address=args.cluster, cpus_per_task=args.cpus_per_worker, **options
        )
    else:
        m = evaluate(cfg, args.data, args.bank, args.out, **options)
    keys = ("frame_auroc_micro", "frame_auroc_macro", "pixel_auroc", "n_frames", "frame_score")
    print(jsonsafe.dumps({k: m[k] for k in keys} | {"metrics": str(Path(args.out) / "metrics.json")}, indent=1))
    return 0


def cmd_verify(args) -> int:
    from detector.bank import open_bank
    from detector.scenes import read_index

    scenes = read_index(args.bank)
    for directory in scenes.values() if scenes is not None else [Path(args.bank)]:
        bank = open_bank(directory)
        bank.verify()
        print(f"{directory}: OK ({bank.n_frames} frames)")
    return 0


def cmd_console(args) -> int:
    try:
        from app.console import serve, settings_from_args
    except ImportError as err:
        raise UserError(f"console: {err.name or err} is not installed: pip install 'spade-stream[console]'") from None
    serve(settings_from_args(args), log_level="debug" if args.verbose else "warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    from configs.errors import UserError

    ap = build_parser()
    args = ap.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    handlers = {
        "fit": cmd_fit,
        "eval": cmd_eval,
        "verify-bank": cmd_verify,
        "run": cmd_run,
        "demo": cmd_demo,
        "synth": cmd_synth,
        "console": cmd_console,
    }
    try:
        return handlers[args.command](args)
    except UserError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
