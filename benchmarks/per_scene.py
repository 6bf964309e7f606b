#!/usr/bin/env python3
"""One bank per camera against one pooled bank, on a multi-scene STC-layout set (docs/history.md, section 4e).

    python benchmarks/per_scene.py --out /tmp/per_scene --json benchmarks/cpu/per_scene.json

The set: the Avenue sample (`--avenue`, skipped when absent) as scene 01, then `--synthetic-scenes`
generated cameras (stream/synthetic.py) as the next scenes, linked into one STC root under `--out`. Both
modes fit on the same frames (bank.per_scene true / false, the rest `--config` or the default config) and
evaluate the whole test set; the table gives the pooled frame AUROC micro / macro and pixel AUROC, and the
frame AUROC micro / macro of each scene's own test videos.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.benchutil import git_info, log, short_hash, write_json  # noqa: E402

SUBDIRS = {"frames": "", "test_frame_mask": ".npy", "test_pixel_mask": ".npy"}


def link_scene(src: Path, dst: Path, scene: str, rename: dict[str, str] | None = None) -> None:
    """Link an STC root's training videos and test videos into `dst` as scene `scene`."""
    rename = rename or {}
    (dst / "training" / "videos").mkdir(parents=True, exist_ok=True)
    for v in sorted((src / "training" / "videos").iterdir()):
        name = rename.get(v.stem, v.stem)
        (dst / "training" / "videos" / f"{scene}_{name.split('_')[-1]}{v.suffix}").symlink_to(v.resolve())
    for sub, ext in SUBDIRS.items():
        (dst / "testing" / sub).mkdir(parents=True, exist_ok=True)
        for p in sorted((src / "testing" / sub).iterdir()):
            stem = p.name[: len(p.name) - len(ext)] if ext else p.name
            clip = stem.split("_")[-1].zfill(4)
            (dst / "testing" / sub / f"{scene}_{clip}{ext}").symlink_to(p.resolve())


def build_set(out: Path, avenue: Path | None, synthetic: int, **gen) -> tuple[Path, dict[str, str]]:
    from stream.synthetic import generate_stc

    # Named by what it holds, so another --avenue / scene count / footage length never reuses a stale set.
    root = out / f"set_{short_hash([str(avenue), synthetic, gen])}"
    if (root / "testing").exists():
        return root, json.loads((root / "scenes.txt").read_text())
    names, n = {}, 1
    if avenue is not None:
        link_scene(avenue, root, f"{n:02d}")
        names[f"{n:02d}"] = f"Avenue sample ({avenue})"
        n += 1
    for camera in range(synthetic):
        where = out / f"synthetic_{camera}_{short_hash(gen)}"
        if not (where / "testing").exists():
            generate_stc(where, seed=camera, camera=camera, **gen)
        link_scene(where, root, f"{n:02d}")
        names[f"{n:02d}"] = f"synthetic camera {camera} (seed {camera})"
        n += 1
    (root / "scenes.txt").write_text(json.dumps(names))
    return root, names


def scene_aurocs(metrics: dict) -> dict[str, dict]:
    from evaluation.metrics import auroc

    out: dict[str, dict] = {}
    for scene in sorted({name.split("_")[0] for name in metrics["per_video"]}):
        vids = [v for k, v in metrics["per_video"].items() if k.split("_")[0] == scene]
        labels = np.concatenate([v["labels"] for v in vids])
        scores = np.concatenate([v["scores"] for v in vids])
        macro = [v["frame_auroc"] for v in vids if v["frame_auroc"] is not None and np.isfinite(v["frame_auroc"])]
        out[scene] = {"micro": auroc(labels, scores), "macro": float(np.mean(macro)) if macro else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avenue", default=str(ROOT.parent / "shared" / "data" / "avenue_stc"))
    ap.add_argument("--synthetic-scenes", type=int, default=3)
    ap.add_argument("--train-frames", type=int, default=240, help="per generated training video (2 a scene)")
    ap.add_argument("--test-frames", type=int, default=120, help="per generated test video (3 a scene)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", default="/tmp/per_scene")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import configs
    from detector.fit import fit_bank
    from evaluation.run import evaluate

    out = Path(args.out)
    avenue = Path(args.avenue)
    if not (avenue / "testing").is_dir():
        log(f"{avenue}: absent, the set is synthetic scenes only")
        avenue = None
    data, names = build_set(
        out, avenue, args.synthetic_scenes, train_frames=args.train_frames, test_frames=args.test_frames
    )
    if len(names) < 2:
        raise SystemExit("per_scene.py: needs two scenes or more (--synthetic-scenes)")
    rows = []
    for mode in (True, False):
        cfg = configs.load(args.config, environ=dict(os.environ) | {"SPADE__BANK__PER_SCENE": str(mode).lower()})
        tag = "per_scene" if mode else "pooled"
        log(f"{tag}: fit")
        fit_bank(cfg, data, out / f"bank_{tag}", progress=False)
        log(f"{tag}: eval")
        m = evaluate(cfg, data, out / f"bank_{tag}", out / f"eval_{tag}", progress=False, plots=False)
        rows.append(
            {
                "mode": tag,
                "frame_auroc_micro": m["frame_auroc_micro"],
                "frame_auroc_macro": m["frame_auroc_macro"],
                "pixel_auroc": m["pixel_auroc"],
                "scenes": scene_aurocs(m),
            }
        )
    print(
        "| bank | frame micro | frame macro | pixel | " + " | ".join(f"scene {s} micro / macro" for s in names) + " |"
    )
    print("|---" * (4 + len(names)) + "|")
    for r in rows:
        cells = [f"{r['scenes'][s]['micro']:.3f} / {r['scenes'][s]['macro']:.3f}" for s in names]
        print(
            f"| {r['mode']} | {r['frame_auroc_micro']:.4f} | {r['frame_auroc_macro']:.4f} | {r['pixel_auroc']:.4f} | "
            + " | ".join(cells)
            + " |"
        )
    if args.json:
        write_json(args.json, {"scenes": names, "rows": rows, "git": git_info()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
