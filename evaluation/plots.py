"""PNG plots for an evaluation run: ROC curves and per-video score-vs-label timelines."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.metrics import PixelAuroc, auroc, frame_curve  # noqa: E402


def write_plots(
    out_dir: Path,
    labels: np.ndarray,
    scores: np.ndarray,
    pix: PixelAuroc,
    videos: dict[str, dict],
    thresholds: dict[str, float],
) -> list[Path]:
    """roc.png and videos/<name>.png; `thresholds`: each video's frame threshold."""
    written = []
    fig, ax = plt.subplots(figsize=(5, 5))
    if labels.any() and not labels.all():
        fpr, tpr = frame_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"frame (micro) AUROC {auroc(labels, scores):.3f}")
    if pix.n:
        fpr, tpr = pix.curve()
        ax.plot(fpr, tpr, label=f"pixel AUROC {pix.value():.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    ax.set_title("ROC")
    fig.tight_layout()
    p = out_dir / "roc.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)
    vdir = out_dir / "videos"
    vdir.mkdir(exist_ok=True)
    for name, rec in videos.items():
        idx = np.asarray(rec["frame_indices"])
        s = np.asarray(rec["scores"], dtype=float)
        lab = np.asarray(rec["labels"])
        fig, ax = plt.subplots(figsize=(8, 2.6))
        if len(idx):
            top = np.nanmax(s) if np.isfinite(s).any() else 1.0
            ax.fill_between(
                idx,
                0,
                np.where(lab > 0, top, np.nan),
                step="mid",
                color="tab:red",
                alpha=0.15,
                label="anomalous (label)",
            )
            ax.plot(idx, s, color="tab:blue", lw=1.0, label="frame score")
            if math.isfinite(thresholds[name]):
                ax.axhline(thresholds[name], color="tab:orange", lw=0.8, ls="--", label="threshold")
        fa = rec["frame_auroc"]
        ax.set_title(f"{name}  frame AUROC {fa:.3f}" if fa == fa else f"{name}  (one class only)")
        ax.set_xlabel("frame")
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        p = vdir / f"{name}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        written.append(p)
    return written
