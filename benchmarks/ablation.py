#!/usr/bin/env python3
"""Ablation of the detector's frame-score, motion, position and gallery options: fit + eval per variant.

    python benchmarks/ablation.py                               # Avenue sample + synthetic STC set
    python benchmarks/ablation.py --data ../shared/data/avenue_stc \
        --variants spade_map_max,coreset_2048+moving_max+smooth5
    python benchmarks/ablation.py --no-synthetic --out /tmp/ablation

Each variant is a set of config overrides applied on top of the plain-SPADE base below (not on top of
configs/default.yaml, so rows stay comparable when the default changes). Variants whose fit-relevant
settings agree share one memory bank. Prints and writes (<out>/ABLATION.md) a markdown table: variant,
frame AUROC micro / macro, pixel AUROC, eval fps, bank size, fit time of its bank (in this process, the
first variant's includes loading the backbone), and the realised false alarms per hour of
normal footage and recall at the calibrated threshold. An STC root that is absent is skipped with a
message; the synthetic set is used when stream/synthetic.py provides generate_stc.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Plain SPADE (Cohen & Hoshen 2020) as shipped before issue 6.
BASE = {
    "detector": {
        "frame_score": "map_max",
        "spatial_window": None,
        "smooth_window": 1,
        "motion": {"enabled": False},
        "gallery": "knn",
    }
}
# The coreset rows of sections 4 and 4c, measured before max_size / max_features got today's defaults.
CORESET_1PCT = {"fraction": 0.01, "max_size": 10000, "max_features": 1_000_000}
MOTION = {"enabled": True}

VARIANTS: dict[str, dict] = {
    "spade_image_knn": {"detector": {"frame_score": "image_knn"}},
    "spade_map_max": {"detector": {"frame_score": "map_max"}},
    "spade_topq": {"detector": {"frame_score": "topq"}},
    "spade_regions": {"detector": {"frame_score": "regions"}},
    "spade_combined": {"detector": {"frame_score": "combined", "combine": ["map_max", "topq"]}},
    "position_w2": {"detector": {"frame_score": "map_max", "spatial_window": 2}},
    "motion_only": {"detector": {"frame_score": "motion_max", "motion": MOTION}},
    "motion+map_max": {"detector": {"frame_score": "combined", "combine": ["map_max", "motion_max"], "motion": MOTION}},
    "motion+position_w2": {
        "detector": {
            "frame_score": "combined",
            "combine": ["map_max", "motion_max"],
            "spatial_window": 2,
            "motion": MOTION,
        }
    },
    "motion+position_w2+smooth9": {
        "detector": {
            "frame_score": "combined",
            "combine": ["map_max", "motion_max"],
            "spatial_window": 2,
            "motion": MOTION,
            "smooth_window": 9,
        }
    },
    # PatchCore-style gallery (configs/ablation/coreset_*.yaml): a greedy coreset of all bank patch features
    "coreset_1pct": {"detector": {"frame_score": "map_max", "gallery": "coreset", "coreset": CORESET_1PCT}},
    "coreset_3pct": {
        "detector": {
            "frame_score": "map_max",
            "gallery": "coreset",
            "coreset": {"fraction": 0.03, "max_size": None, "max_features": 1_000_000},
        }
    },
    # appearance weighted by where things move (configs.schema.MovingConfig)
    "moving_max": {"detector": {"frame_score": "moving_max"}},
    "moving_max_static0": {"detector": {"frame_score": "moving_max", "moving": {"static_weight": 0.0}}},
    "map_max+smooth5": {"detector": {"frame_score": "map_max", "smooth_window": 5}},
    "moving_max+smooth5": {"detector": {"frame_score": "moving_max", "smooth_window": 5}},  # section 4c's default (knn)
    "moving_max+smooth5+kgallery3": {"detector": {"frame_score": "moving_max", "smooth_window": 5, "k_gallery": 3}},
    "coreset_1pct+moving_max": {
        "detector": {"frame_score": "moving_max", "gallery": "coreset", "coreset": CORESET_1PCT}
    },
    "coreset_1pct+moving_max+smooth5": {
        "detector": {"frame_score": "moving_max", "gallery": "coreset", "coreset": CORESET_1PCT, "smooth_window": 5}
    },
    # the default since section 4d: at most 2,048 coreset features selected from 262,144 candidates
    "coreset_2048+moving_max+smooth5": {
        "detector": {
            "frame_score": "moving_max",
            "gallery": "coreset",
            "smooth_window": 5,
            "coreset": {"fraction": 0.01, "max_size": 2048, "max_features": 262_144},
        }
    },
}
DEFAULT_SET = list(VARIANTS)


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def variant_config(name: str, extra: dict | None = None):
    import yaml

    import configs

    tree = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()) or {}
    tree = merge(merge(merge(tree, BASE), VARIANTS[name]), extra or {})
    return configs.parse(tree, f"ablation:{name}")


def fit_key(cfg) -> str:
    d = cfg.detector
    return json.dumps(
        {
            "backbone": d.backbone.model_dump(),
            "input_size": d.input_size,
            "grid": d.grid,
            "motion": d.motion.model_dump() if d.motion.enabled else None,
            "moving": d.moving.model_dump() if "moving_max" in d.components_used() else None,
            "coreset": d.coreset.model_dump() if d.gallery == "coreset" else None,
            "combine": d.combine,
            "bank": cfg.bank.model_dump(),
            # thresholds are calibrated under the scoring settings: a bank per setting
            "scoring": [d.k_image, d.k_gallery, d.kappa, d.sigma, d.topq, d.spatial_window, d.motion.weight],
        },
        sort_keys=True,
    )


def dir_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


def run_set(label: str, data: Path, names: list[str], out: Path, every: int, extra: dict | None) -> list[dict]:
    from detector.fit import fit_bank
    from evaluation.run import evaluate

    banks: dict[str, Path] = {}
    fit_s: dict[str, float] = {}
    rows = []
    for name in names:
        cfg = variant_config(name, extra)
        key = fit_key(cfg)
        if key not in banks:
            banks[key] = out / label / f"bank{len(banks)}"
            t0 = time.perf_counter()
            fit_bank(cfg, data, banks[key], progress=False)
            fit_s[key] = time.perf_counter() - t0
            print(f"[{label}] fitted {banks[key].name} for {name} in {fit_s[key]:.0f}s", flush=True)
        m = evaluate(cfg, data, banks[key], out / label / name, every=every, progress=False, plots=False)
        at = m["at_threshold"]
        row = {
            "set": label,
            "variant": name,
            "frame_micro": m["frame_auroc_micro"],
            "frame_macro": m["frame_auroc_macro"],
            "pixel": m["pixel_auroc"],
            "fps": m["fps"],
            "bank_mb": dir_mb(banks[key]),
            "fa_per_hour": at.get("false_alarms_per_hour"),
            "recall": at.get("recall"),
            "components": m["component_auroc_micro"],
            "fit_s": fit_s[key],
            "coreset": json.loads((banks[key] / "meta.json").read_text()).get("coreset_stats"),
        }
        rows.append(row)
        print(
            f"[{label}] {name}: micro {row['frame_micro']:.3f} macro {row['frame_macro']:.3f} "
            f"pixel {row['pixel']:.3f} fps {row['fps']:.1f}",
            flush=True,
        )
    return rows


def table(rows: list[dict]) -> str:
    f = lambda x, d=3: "n/a" if x is None or x != x else f"{x:.{d}f}"  # noqa: E731
    lines = [
        "| set | variant | frame micro | frame macro | pixel AUROC | eval fps | bank MB | fit s | FA/h @thr | "
        "recall @thr |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['variant']} | {f(r['frame_micro'])} | {f(r['frame_macro'])} | "
            f"{f(r['pixel'])} | {f(r['fps'], 1)} | {f(r['bank_mb'], 1)} | {f(r['fit_s'], 0)} | "
            f"{f(r['fa_per_hour'], 1)} | {f(r['recall'], 3)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "avenue_stc"), help="STC root")
    ap.add_argument("--variants", default=",".join(DEFAULT_SET), help="comma-separated; known: " + ", ".join(VARIANTS))
    ap.add_argument("--out", default="/tmp/spade-ablation")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--synthetic-train-frames", type=int, default=240, help="frames per synthetic training video")
    ap.add_argument("--synthetic-test-frames", type=int, default=120, help="frames per synthetic test video")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    extra = {"detector": {"threads": args.threads}} if args.threads else None
    out = Path(args.out)
    rows: list[dict] = []
    data = Path(args.data)
    if (data / "testing" / "frames").is_dir():
        rows += run_set(data.name, data, names, out, args.every, extra)
    else:
        print(f"skipping {data}: not found (expected an STC root with testing/frames)", flush=True)
    if not args.no_synthetic:
        try:
            from stream.synthetic import generate_stc
        except ImportError:
            print("skipping the synthetic set: stream.synthetic.generate_stc is not available", flush=True)
        else:
            syn = out / "synthetic_stc"
            if not (syn / "testing" / "frames").is_dir():
                generate_stc(
                    syn, seed=0, train_frames=args.synthetic_train_frames, test_frames=args.synthetic_test_frames
                )
            rows += run_set("synthetic", syn, names, out, args.every, extra)
    if not rows:
        print("nothing was evaluated")
        return 0
    md = table(rows)
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ABLATION.md").write_text(md + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
