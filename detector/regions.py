"""Anomaly map -> threshold -> connected components -> regions in frame pixels."""
from __future__ import annotations

import cv2
import numpy as np

from detector.result import Region


def find_regions(amap: np.ndarray, threshold: float, frame_size: tuple[int, int], min_area: int = 0) -> list[Region]:
    """Regions of `amap` (float [S, S] at the model's input size) at or above `threshold`.

    Boxes and areas are scaled to `frame_size` (width, height); regions smaller than `min_area` frame
    pixels are dropped. Sorted by peak score, highest first.
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
    flat_labels = labels.ravel()
    flat = amap.ravel().astype(np.float64)
    sums = np.bincount(flat_labels, weights=flat, minlength=n)
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, flat_labels, flat)
    out = []
    for i in range(1, n):
        x, y, w, h, count = stats[i]
        area = int(round(count * sx * sy))
        if area < min_area:
            continue
        out.append(Region(
            x1=int(np.floor(x * sx)), y1=int(np.floor(y * sy)),
            x2=min(fw, int(np.ceil((x + w) * sx))), y2=min(fh, int(np.ceil((y + h) * sy))),
            peak=float(peaks[i]), mean=float(sums[i] / count), area=area,
        ))
    out.sort(key=lambda r: r.peak, reverse=True)
    return out
