#!/usr/bin/env python3
"""spade-stream command line: fit a memory bank, evaluate offline, run the live pipeline, demo.

Bad input (a missing file, a bad config field, an unreadable video) ends with one line on stderr
naming the file or field, and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:timm")

EXIT_USAGE = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config path or built-in name (default, stc_paper)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="run_stream.py", description=__doc__.splitlines()[0])
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
    p.add_argument("--smooth", choices=["none", "causal", "centred"], default="none",
                   help="temporal smoothing of frame scores (causal is what live alerts see)")
    p.add_argument("--window", type=int, default=9, help="smoothing window in frames")

    p = sub.add_parser("verify-bank", help="check a bank's arrays against the checksums in its metadata")
    p.add_argument("--bank", required=True)
    p.add_argument("-v", "--verbose", action="store_true")

    from stream.cli import add_live_commands  # the live pipeline's commands live beside it

    add_live_commands(sub, _common)
    return ap


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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
        return {"n_frames": m["n_frames"], "backbone": m["backbone"], "holdout": cal.get("n_holdout", 0),
                "pixel_threshold": cal.get("pixel_threshold"), "count_warnings": m.get("count_warnings", [])}

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
    m = evaluate(cfg, args.data, args.bank, args.out, every=args.every, smoothing=args.smooth,
                 window=args.window if args.smooth != "none" else 1, progress=not args.quiet)
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


def main(argv: list[str] | None = None) -> int:
    from configs.errors import UserError

    ap = build_parser()
    args = ap.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    handlers = {"fit": cmd_fit, "eval": cmd_eval, "verify-bank": cmd_verify}
    from stream.cli import LIVE_HANDLERS

    handlers.update(LIVE_HANDLERS)
    try:
        return handlers[args.command](args)
    except UserError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
