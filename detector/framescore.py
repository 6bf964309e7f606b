"""Frame scores from the evidence, normalised by held-out normal footage, and causal smoothing.

Components (each [B], higher = more anomalous):
  image_knn    SPADE's image score (kNN over global features)
  map_max      maximum of the appearance map
  topq         mean of the top `topq` fraction of the appearance map
  regions      the largest connected region of the final pixel map above the pixel threshold, scored
               as its size x mean excess over the threshold (0 when nothing exceeds it)
  motion_max   maximum of the motion map (distance to normal flow here)
  motion_topq  mean of the top `topq` fraction of the motion map
  moving_max   maximum of the appearance map weighted by where things move (configs.schema.MovingConfig)

'combined' is the mean of the configured components, each as a z-score against the same camera's
held-out normal frames (the contiguous tail of the normal footage that fit keeps out of the bank).
Test statistics are never used.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from statistics import NormalDist

import cv2
import numpy as np
import torch

REGION_STRIDE = 4  # regions are found on the map subsampled by this factor (64x64 for 256 input)


def topq_mean(maps: torch.Tensor, q: float) -> torch.Tensor:
    flat = maps.flatten(1)
    k = max(1, int(round(q * flat.shape[1])))
    return torch.topk(flat, k, dim=1).values.mean(dim=1)


def region_scores(maps: np.ndarray, threshold: float, stride: int = REGION_STRIDE) -> np.ndarray:
    """[B, S, S] -> [B]: max over connected regions above `threshold` of sum(map - threshold).

    The sum is size x mean excess, in map units x (subsampled) pixels; normalised later by holdout stats.
    """
    out = np.zeros(len(maps), dtype=np.float64)
    if not np.isfinite(threshold):
        return out
    for i, m in enumerate(maps):
        m = m[::stride, ::stride]
        excess = m - threshold
        mask = (excess > 0).astype(np.uint8)
        if not mask.any():
            continue
        n, labels = cv2.connectedComponents(mask, connectivity=8)
        sums = np.bincount(labels.ravel(), weights=np.where(mask, excess, 0).ravel(), minlength=n)
        out[i] = sums[1:].max()
    return out


# Components that cost a sort or a connected-components pass per frame; the others are one reduction.
COSTLY = frozenset({"topq", "motion_topq", "regions"})


def components(
    image_scores: torch.Tensor,
    app_maps: torch.Tensor,
    final_maps: torch.Tensor,
    motion_maps: torch.Tensor | None,
    topq: float,
    pixel_threshold: float,
    costly: Collection[str] = COSTLY,
    moving_weights: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Every component (motion ones only with motion maps, moving_max only with moving weights); of the
    COSTLY ones only those in `costly`."""
    comps = {"image_knn": image_scores, "map_max": app_maps.flatten(1).amax(dim=1)}
    if moving_weights is not None:
        comps["moving_max"] = (app_maps * moving_weights).flatten(1).amax(dim=1)
    if "topq" in costly:
        comps["topq"] = topq_mean(app_maps, topq)
    if motion_maps is not None:
        comps["motion_max"] = motion_maps.flatten(1).amax(dim=1)
        if "motion_topq" in costly:
            comps["motion_topq"] = topq_mean(motion_maps, topq)
    out = {k: v.float().cpu().numpy() for k, v in comps.items()}
    if "regions" in costly:
        out["regions"] = region_scores(final_maps.float().cpu().numpy(), pixel_threshold).astype(np.float32)
    return out


def stats_of(v: np.ndarray) -> dict:
    v = np.asarray(v, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(max(v.std(), 1e-12)),
        "max": float(v.max()),
        "q99": float(np.quantile(v, 0.99)),
    }


def combine(comps: dict[str, np.ndarray], names: list[str], stats: dict[str, dict]) -> np.ndarray:
    """Mean z-score of the named components against held-out normal statistics."""
    missing = [k for k in names if k not in stats or k not in comps]
    if missing:
        raise KeyError(missing)
    # A component that never varied on normal footage (e.g. regions: always 0) gets a floor on its std
    # of 1% of its normal mean magnitude or 1e-3, so one small excursion is not a z of millions.
    parts = []
    for k in names:
        s = stats[k]
        sd = max(s["std"], 0.01 * abs(s["mean"]), 1e-3)
        parts.append((np.asarray(comps[k], dtype=np.float64) - s["mean"]) / sd)
    return np.mean(parts, axis=0)


def causal_mean(x: np.ndarray, window: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Trailing mean over `window` values, restarting at every change of `groups` (e.g. video id)."""
    x = np.asarray(x, dtype=np.float64)
    if window <= 1 or len(x) == 0:
        return x
    out = np.empty_like(x)
    sm = CausalSmoother(window)
    prev = None
    for i, v in enumerate(x):
        g = None if groups is None else groups[i]
        if g != prev:
            sm.reset("k")
            prev = g
        out[i] = sm("k", v)
    return out


def tail_threshold(values: np.ndarray, alarms_per_hour: float, fps: float) -> float:
    """Frame threshold for a target false-alarm rate, from held-out normal scores.

    A few hundred held-out frames cannot show a 1-in-100,000 event, so the tail is extrapolated with a
    normal fit: threshold = mean + z * std with P(Z > z) = alarms_per_hour / frames_per_hour. Consecutive
    frames are correlated and one alert spans many frames, so this errs towards fewer alarms.
    """
    p = min(0.5, alarms_per_hour / (3600.0 * max(fps, 1e-6)))
    z = NormalDist().inv_cdf(1.0 - p)
    mu, sd = float(np.mean(values)), float(np.std(values))
    return mu + z * max(sd, 1e-12)


class CausalSmoother:
    """Per-key (camera id) trailing mean of the last `window` scores; the live path's smoothing."""

    def __init__(self, window: int):
        self.window = window
        self._buf: dict[str, deque] = {}

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self._buf.clear()
        else:
            self._buf.pop(key, None)

    def __call__(self, key: str, value: float) -> float:
        if self.window <= 1:
            return float(value)
        b = self._buf.setdefault(key, deque(maxlen=self.window))
        b.append(float(value))
        return float(sum(b) / len(b))
