"""Anomaly map -> threshold -> connected components -> regions in frame pixels."""

from __future__ import annotations

import cv2
import numpy as np

from detector.result import Region


def _in_boxes(amap: np.ndarray, labels: np.ndarray, stats: np.ndarray, keep: np.ndarray):
    """(peaks, means) of the kept components, each read inside its bounding box only: scipy.ndimage's
    maximum and mean scan the whole map per call and cost more than everything else here."""
    peaks = np.empty(len(keep), dtype=np.float64)
    means = np.empty(len(keep), dtype=np.float64)
    for j, lab in enumerate(keep):
        x, y, w, h, area = stats[lab]
        box, inside = amap[y : y + h, x : x + w], labels[y : y + h, x : x + w] == lab
        peaks[j] = box.max(where=inside, initial=-np.inf)
        means[j] = box.sum(where=inside, dtype=np.float64) / area
    return peaks, means


def find_regions(
    amap: np.ndarray, threshold: float, frame_size: tuple[int, int], min_area: int = 0, max_regions: int = 32
) -> list[Region]:
    """Regions of `amap` (float [S, S] at the model's input size) at or above `threshold`.

    Boxes and areas are scaled to `frame_size` (width, height); regions smaller than `min_area` frame
    pixels are dropped. Sorted by peak score, highest first; at most `max_regions` are kept (a noisy
    map can hold thousands of specks, and nobody acts on the 33rd box).
    """
    mask = (amap >= threshold).astype(np.uint8)
    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return []
    mh, mw = amap.shape
    fw, fh = frame_size
    sx, sy = fw / mw, fh / mh
    areas = np.rint(stats[1:, cv2.CC_STAT_AREA] * sx * sy).astype(np.int64)
    keep = np.flatnonzero(areas >= min_area) + 1  # component labels that survive the area filter
    if keep.size == 0:
        return []
    peaks, means = _in_boxes(amap, labels, stats, keep)
    if keep.size > max_regions:
        top = np.argpartition(-peaks, max_regions - 1)[:max_regions]
        keep, peaks, means = keep[top], peaks[top], means[top]
    out = []
    for lab, peak, mean in zip(keep, peaks, means):
        x, y, w, h, _ = stats[lab]
        out.append(
            Region(
                x1=int(np.floor(x * sx)),
                y1=int(np.floor(y * sy)),
                x2=min(fw, int(np.ceil((x + w) * sx))),
                y2=min(fh, int(np.ceil((y + h) * sy))),
                peak=float(peak),
                mean=float(mean),
                area=int(areas[lab - 1]),
            )
        )
    out.sort(key=lambda r: r.peak, reverse=True)
    return out
