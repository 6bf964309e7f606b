"""Drawing the detector's view onto frames. No I/O and no hidden state: the `draw_*` functions paint
onto the RGB canvas they are given (callers pass a copy) and return it; `Annotator` only remembers
the recent scores each camera's timeline needs.

Red means anomaly, and only that: region boxes are red, labelled with their peak against the region
threshold, on frames whose score reaches the frame threshold. On a normal frame (score below it) the
regions that pass the pixel threshold (ordinary pedestrians, mostly) are thin grey dashed boxes without a
label ('faint', the default) or not drawn at all ('hidden', which also leaves out the heat map).
"""

from __future__ import annotations

import math
from collections import deque

import cv2
import numpy as np

from detector.result import FrameResult, Region
from stream.frame import Frame

RED = (230, 40, 40)
WHITE = (255, 255, 255)
YELLOW = (255, 210, 0)
CYAN = (80, 220, 255)
GREY = (190, 190, 190)  # regions of a normal frame: neutral, never read as an alarm

NORMAL_REGIONS = ("faint", "hidden")


def _font_scale(h: int) -> float:
    return max(0.35, 0.6 * h / 720)


def _thickness(h: int) -> int:
    return max(1, round(h / 480))


def _darken(canvas: np.ndarray, x1: int, y1: int, x2: int, y2: int, keep: float = 0.45) -> None:
    """Dim a rectangle so text on it stays legible over any scene."""
    roi = canvas[max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)]
    if roi.size:
        roi[:] = (roi.astype(np.float32) * keep).astype(np.uint8)


def heat_range(map_max: float, pixel_threshold: float | None, floor: float) -> tuple[float, float]:
    """(lo, hi) of the map values the overlay spans: transparent at lo, full colour and opacity at hi.

    With a pixel threshold, lo = 0.8 x threshold and hi = 2 x threshold, and opacity grows with the
    square of the position, so below-threshold (normal) texture is nearly invisible (~3 % of full
    opacity at the threshold itself) and calm frames look calm. Without one, the frame's own maximum
    is the top of the scale, but never below `floor`: otherwise the faint noise of a normal frame
    would be stretched to full colour.
    """
    if pixel_threshold is not None and pixel_threshold > 0:
        return 0.8 * pixel_threshold, 2.0 * pixel_threshold
    hi = max(float(map_max), floor) if math.isfinite(map_max) else floor
    return 0.5 * hi, hi


def heatmap_overlay(
    canvas: np.ndarray, heat: np.ndarray, lo: float, hi: float, alpha: float = 0.6, colormap: int = cv2.COLORMAP_INFERNO
) -> np.ndarray:
    """Blend a colour-mapped `heat` (float, same H x W as canvas) over the RGB canvas.

    OpenCV primitives throughout: the numpy equivalent was markedly slower on a 1080p frame (measured when
    this was written; not in docs/results.md).
    """
    heat = heat.astype(np.float32, copy=False)
    if not np.isfinite(heat).all():
        heat = np.nan_to_num(heat, nan=lo, posinf=hi, neginf=lo)
    frac = (heat - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-12))
    # Clamp to [0, 1] in place with thresholds: cv2.min/max take a 1x1 array for a scalar, np.clip is slower.
    cv2.threshold(frac, 1.0, 1.0, cv2.THRESH_TRUNC, dst=frac)
    cv2.threshold(frac, 0.0, 0.0, cv2.THRESH_TOZERO, dst=frac)
    colour = cv2.cvtColor(cv2.applyColorMap(cv2.convertScaleAbs(frac, alpha=255), colormap), cv2.COLOR_BGR2RGB)
    a = cv2.multiply(frac, frac, scale=float(alpha))  # quadratic: faint values stay faint
    canvas[:] = cv2.blendLinear(canvas, colour, 1.0 - a, a)
    return canvas


def _dashed_rect(
    canvas: np.ndarray, p1: tuple[int, int], p2: tuple[int, int], color, thickness: int = 1, dash: int = 4
) -> None:
    """A rectangle outline of `dash`-pixel dashes and gaps; every corner is drawn."""
    (x1, y1), (x2, y2) = p1, p2
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        n = max(abs(bx - ax), abs(by - ay))
        for start in range(0, n + 1, 2 * dash):
            end = min(start + dash - 1, n)
            f0, f1 = start / n if n else 0.0, end / n if n else 0.0
            cv2.line(
                canvas,
                (round(ax + (bx - ax) * f0), round(ay + (by - ay) * f0)),
                (round(ax + (bx - ax) * f1), round(ay + (by - ay) * f1)),
                color,
                thickness,
            )


def draw_regions(
    canvas: np.ndarray,
    regions: list[Region],
    scale: tuple[float, float] = (1.0, 1.0),
    color=RED,
    threshold: float | None = None,
) -> np.ndarray:
    """Boxes labelled with their peak value (against `threshold`, the region threshold, when given).
    `scale` maps region coordinates (result.frame_size) to the canvas."""
    h = canvas.shape[0]
    fs, th = _font_scale(h), _thickness(h)
    sx, sy = scale
    for r in regions:
        x1, y1, x2, y2 = int(r.x1 * sx), int(r.y1 * sy), int(r.x2 * sx) - 1, int(r.y2 * sy) - 1
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, th)
        label = f"{r.peak:.2f}" if threshold is None else f"{r.peak:.2f} / thr {threshold:.2f}"
        (tw, tht), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, th)
        if threshold is not None and tw > canvas.shape[1] // 3:  # small frames: the peak alone
            label = f"{r.peak:.2f}"
            (tw, tht), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, th)
        ty = y1 - 3 if y1 - tht - base - 3 >= 0 else min(y2 + tht + 3, h - base)  # inside if no room
        cv2.rectangle(canvas, (x1, ty - tht - 2), (x1 + tw + 2, ty + base - 1), color, -1)
        cv2.putText(canvas, label, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, fs, WHITE, th, cv2.LINE_AA)
    return canvas


def draw_normal_regions(
    canvas: np.ndarray, regions: list[Region], scale: tuple[float, float] = (1.0, 1.0), color=GREY
) -> np.ndarray:
    """Regions of a frame under its frame threshold: thin dashed neutral boxes, no label."""
    sx, sy = scale
    for r in regions:
        _dashed_rect(canvas, (int(r.x1 * sx), int(r.y1 * sy)), (int(r.x2 * sx) - 1, int(r.y2 * sy) - 1), color)
    return canvas


def draw_status(canvas: np.ndarray, result: FrameResult) -> np.ndarray:
    """Top bar: camera, frame index, score / threshold; red with ANOMALY while the frame is anomalous."""
    h, w = canvas.shape[:2]
    fs, th = _font_scale(h), _thickness(h)
    text = f"{result.camera_id} #{result.frame_index}  score {result.score:.3f} / thr {result.threshold:.3f}"
    (tw, tht), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, th)
    bar_h = tht + base + 8
    room = w - 8  # the text shrinks to fit beside the ANOMALY tag rather than run under it
    if result.is_anomalous:
        canvas[:bar_h] = (canvas[:bar_h].astype(np.float32) * 0.35 + np.asarray(RED, np.float32) * 0.65).astype(
            np.uint8
        )
        (aw, _), _ = cv2.getTextSize("ANOMALY", cv2.FONT_HERSHEY_SIMPLEX, fs * 1.1, th + 1)
        cv2.putText(
            canvas,
            "ANOMALY",
            (max(0, w - aw - 6), bar_h - base - 3),
            cv2.FONT_HERSHEY_SIMPLEX,
            fs * 1.1,
            WHITE,
            th + 1,
            cv2.LINE_AA,
        )
        room -= aw + 8
    else:
        _darken(canvas, 0, 0, w, bar_h)
    text_fs = fs
    while tw > room and text_fs > 0.2:  # glyph widths do not scale exactly with the font scale
        text_fs *= max(0.5, min(0.95, room / tw))
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, text_fs, th)
    cv2.putText(canvas, text, (4, bar_h - base - 3), cv2.FONT_HERSHEY_SIMPLEX, text_fs, WHITE, th, cv2.LINE_AA)
    return canvas


def draw_timeline(canvas: np.ndarray, points, now: float, span_s: float, height: int | None = None) -> np.ndarray:
    """Strip along the bottom: score (cyan, red where >= threshold) and threshold (yellow) over the
    last `span_s` seconds. `points` are (ts, score, threshold), oldest first."""
    h, w = canvas.shape[:2]
    sh = height or max(16, h // 7)
    top = h - sh
    _darken(canvas, 0, top, w, h, keep=0.35)
    pts = [(t, s, thr) for t, s, thr in points if math.isfinite(s) and math.isfinite(thr)]
    if not pts:
        return canvas
    vals = [s for _, s, _ in pts] + [thr for _, _, thr in pts]
    vmin, vmax = min(vals), max(vals)
    pad = 0.1 * (vmax - vmin) or 0.1 * max(abs(vmax), 1.0)
    vmin, vmax = vmin - pad, vmax + pad

    def xy(t, v):
        x = (w - 1) * (1.0 - (now - t) / span_s)
        y = top + 1 + (sh - 3) * (vmax - v) / (vmax - vmin)
        return int(round(x)), int(round(y))

    th = _thickness(h)
    for (t0, s0, r0), (t1, s1, r1) in zip(pts, pts[1:]):
        cv2.line(canvas, xy(t0, r0), xy(t1, r1), YELLOW, th, cv2.LINE_AA)
        cv2.line(canvas, xy(t0, s0), xy(t1, s1), RED if s1 >= r1 else CYAN, th, cv2.LINE_AA)
    if len(pts) == 1:
        t, s, r = pts[0]
        cv2.circle(canvas, xy(t, s), th + 1, RED if s >= r else CYAN, -1)
    return canvas


def annotate_frame(
    image: np.ndarray,
    result: FrameResult,
    map_floor: float = 1.0,
    alpha: float = 0.6,
    colormap: int = cv2.COLORMAP_INFERNO,
    normal_regions: str = "faint",
) -> np.ndarray:
    """Heatmap + region boxes + status bar on a copy of `image` (RGB). Used as-is for snapshots. The
    heat scale follows the result's own pixel threshold (its camera's bank): transparent up to 0.8x it,
    full colour at 2x (`heat_range`).

    Region boxes are red (labelled peak / region threshold) only when the frame is anomalous (score >=
    frame threshold). On a normal frame `normal_regions` says how its regions show: 'faint' (thin grey
    dashed boxes, no label) or 'hidden' (no boxes and no heat map: a normal frame shows only the status bar)."""
    if normal_regions not in NORMAL_REGIONS:
        raise ValueError(f"normal_regions: expected one of {NORMAL_REGIONS}, got {normal_regions!r}")
    canvas = np.array(image, dtype=np.uint8, copy=True)
    h, w = canvas.shape[:2]
    anomalous = result.is_anomalous
    if anomalous or normal_regions == "faint":
        amap = result.anomaly_map
        finite = amap[np.isfinite(amap)] if amap is not None else np.empty(0)
        map_max = float(finite.max()) if finite.size else float("nan")
        lo, hi = heat_range(map_max, result.pixel_threshold, map_floor)
        if math.isfinite(map_max) and map_max > lo:  # nothing to tint: skip the full-size resize and blend
            heatmap_overlay(canvas, result.map_at((w, h)), lo, hi, alpha, colormap)
    fw, fh = result.frame_size
    scale = (w / fw, h / fh) if fw > 0 and fh > 0 else (1.0, 1.0)
    if anomalous:
        draw_regions(canvas, result.regions, scale, threshold=result.pixel_threshold)
    elif normal_regions == "faint":
        draw_normal_regions(canvas, result.regions, scale)
    draw_status(canvas, result)
    return canvas


class Annotator:
    """Full overlay for recorded video: `annotate_frame` plus each camera's scrolling score timeline."""

    def __init__(
        self,
        timeline_s: float = 10.0,
        map_floor: float = 1.0,
        alpha: float = 0.6,
        colormap: int = cv2.COLORMAP_INFERNO,
        normal_regions: str = "faint",
    ) -> None:
        if normal_regions not in NORMAL_REGIONS:
            raise ValueError(f"normal_regions: expected one of {NORMAL_REGIONS}, got {normal_regions!r}")
        self.normal_regions = normal_regions
        self.timeline_s = float(timeline_s)
        self.map_floor = map_floor
        self.alpha = alpha
        self.colormap = colormap
        self._history: dict[str, deque] = {}

    def annotate(self, frame: Frame, result: FrameResult) -> np.ndarray:
        hist = self._history.setdefault(frame.camera_id, deque())
        ts = float(result.timestamp)
        if hist and ts < hist[-1][0]:
            hist.clear()  # time went backwards (looped file): a timeline across the jump means nothing
        hist.append((ts, float(result.score), float(result.threshold)))
        while hist and hist[0][0] < ts - self.timeline_s:
            hist.popleft()
        canvas = annotate_frame(frame.image, result, self.map_floor, self.alpha, self.colormap, self.normal_regions)
        return draw_timeline(canvas, hist, ts, self.timeline_s)
