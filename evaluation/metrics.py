"""AUROC helpers. Pixel AUROC streams: one histogram per class over float16 values, exact for them."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _order_key(h: np.ndarray) -> np.ndarray:
    """float16 bit patterns -> keys whose integer order is the numeric order."""
    h = h.astype(np.int32)
    return np.where(h & 0x8000, 0xFFFF - h, h | 0x8000)


class PixelAuroc:
    """Pooled AUROC over billions of pixels in bounded memory.

    Scores are rounded to float16 (3 significant digits) and counted per value and class; the ROC over
    those counts is exact for the rounded scores, ties counted half, as the trapezoid rule does.
    """

    def __init__(self):
        self.pos = np.zeros(1 << 16, dtype=np.int64)
        self.neg = np.zeros(1 << 16, dtype=np.int64)

    def update(self, scores: np.ndarray, mask: np.ndarray) -> None:
        keys = _order_key(np.asarray(scores, dtype=np.float16).view(np.uint16).ravel())
        m = np.asarray(mask).ravel().astype(bool)
        self.pos += np.bincount(keys[m], minlength=1 << 16)
        self.neg += np.bincount(keys[~m], minlength=1 << 16)

    @property
    def n(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) from the highest threshold down."""
        p, n = self.pos[::-1].cumsum(), self.neg[::-1].cumsum()
        tp, fp = p[-1], n[-1]
        return np.concatenate([[0.0], n / max(fp, 1)]), np.concatenate([[0.0], p / max(tp, 1)])

    def value(self) -> float:
        if self.pos.sum() == 0 or self.neg.sum() == 0:
            return float("nan")
        fpr, tpr = self.curve()
        return float(np.trapezoid(tpr, fpr))


def frame_curve(labels: np.ndarray, scores: np.ndarray):
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(bool), scores)
    return fpr, tpr
