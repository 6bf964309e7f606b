"""Deterministic synthetic fixed-camera surveillance footage, in the ShanghaiTech Campus (STC) layout.

The scene is a campus seen from a fixed, raised camera: a building wall along the top, a lawn with
trees, benches and a lamp post, and a paved walkway crossing the frame. Normal activity is people
walking along the walkway in both directions (perspective-scaled, swinging legs and arms, varied
clothing), entering and leaving at the sides. The camera adds sensor noise and a slight flicker.
Test clips add one anomaly each, with an exact pixel mask (the pixels of the anomalous object left
visible after occlusion; its shadow is not part of it):

- "vehicle": a car driving along the walkway at ~6.5x walking speed;
- "offpath": a group of two or three people hurrying onto the foreground lawn, where nobody walks,
  and back out; nearer the camera, they are also larger than anyone on the walkway;
- "object": a large, brightly patterned crate or barrel lying on the walkway (left, later removed).

Everything is drawn with OpenCV primitives on a background rendered once per `Scene`, so the default
data set takes a few seconds. The same seeds give identical frames and masks, byte for byte: all
randomness comes from numpy Generators seeded explicitly, and there is no module-level state.

Units: geometry is relative to the frame (fractions of W and H) and sizes are in `u = H / 240` pixels,
so any frame size gives the same scene. Speeds are per second and converted with the clip's fps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

AnomalyKind = str | None  # "vehicle" | "offpath" | "object" | None
ANOMALIES = ("vehicle", "offpath", "object")
SeedLike = int | Sequence[int]

_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel positions keep slow walkers from moving in jerks
_ONE = 1 << _SHIFT

# Walking speed and person height at scale 1 (u pixels); vehicle speed in walking speeds.
_WALK_PX_S = 29.0  # ~1.2 px per frame at 24 fps, ~1.4 m/s for a 1.7 m person of 30 px
_PERSON_H = 30.0
_VEHICLE_SPEEDUP = 6.5
_MEAN_PEOPLE = 5.0  # people on the walkway at any time, on average

_SHIRTS = (
    (30, 40, 80),
    (25, 25, 30),
    (225, 225, 220),
    (120, 120, 125),
    (160, 40, 45),
    (90, 30, 40),
    (50, 90, 160),
    (130, 170, 200),
    (50, 100, 60),
    (110, 110, 60),
    (190, 170, 130),
    (200, 180, 90),
    (200, 130, 150),
    (80, 60, 50),
)
_TROUSERS = ((30, 35, 60), (25, 25, 28), (70, 70, 75), (60, 80, 120), (120, 100, 80), (150, 150, 150))
_SKIN = ((235, 195, 165), (210, 165, 130), (170, 120, 90), (120, 80, 60))
_HAIR = ((20, 15, 10), (60, 40, 25), (110, 80, 50), (30, 30, 30))
_CAR_COLOURS = ((200, 30, 30), (240, 200, 20), (30, 70, 200), (240, 240, 240), (20, 150, 160))


def _rngs(seed: SeedLike, n: int) -> list[np.random.Generator]:
    entropy = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    return [np.random.default_rng(s) for s in np.random.SeedSequence(entropy).spawn(n)]


def _fx(v: float) -> int:
    return int(round(v * _ONE))


def _pts(points) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


class _Painter:
    """Draws every primitive twice: into the RGB frame and, with the current label, into the mask.

    Later objects overwrite both, so the mask is exactly the set of pixels that the labelled object
    left visible. Anti-aliasing is off (LINE_8) because a blended edge pixel has no exact label.
    """

    def __init__(self, rgb: np.ndarray, mask: np.ndarray | None):
        self.rgb = rgb
        self.mask = mask
        self.label = 0

    def poly(self, points, color) -> None:
        p = _pts(points)
        cv2.fillConvexPoly(self.rgb, p, color, cv2.LINE_8, _SHIFT)
        if self.mask is not None:
            cv2.fillConvexPoly(self.mask, p, self.label, cv2.LINE_8, _SHIFT)

    def rect(self, x1, y1, x2, y2, color) -> None:
        self.poly([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], color)

    def ellipse(self, c, axes, color, angle=0.0, start=0, end=360) -> None:
        args = ((_fx(c[0]), _fx(c[1])), (max(_fx(axes[0]), 1), max(_fx(axes[1]), 1)), angle, start, end)
        cv2.ellipse(self.rgb, *args, color, -1, cv2.LINE_8, _SHIFT)
        if self.mask is not None:
            cv2.ellipse(self.mask, *args, self.label, -1, cv2.LINE_8, _SHIFT)

    def circle(self, c, r, color) -> None:
        self.ellipse(c, (r, r), color)

    def pattern(self, points, inside, color) -> None:
        """Recolour the pixels of convex polygon `points` where inside(x, y) holds (a texture).

        Only pixels of that polygon change, so the mask (already set when the polygon was drawn with
        the same points) stays exact."""
        p = _pts(points)
        x0, y0 = np.maximum(p.min(axis=0) >> _SHIFT, 0)
        x1, y1 = p.max(axis=0) >> _SHIFT
        x1, y1 = min(x1 + 2, self.rgb.shape[1]), min(y1 + 2, self.rgb.shape[0])
        if x1 <= x0 or y1 <= y0:
            return
        local = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(local, p - np.array([x0 << _SHIFT, y0 << _SHIFT], np.int32), 1, cv2.LINE_8, _SHIFT)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        sel = local.astype(bool) & inside(xx, yy)
        self.rgb[y0:y1, x0:x1][sel] = color
        if self.mask is not None:
            self.mask[y0:y1, x0:x1][sel] = self.label

    def line(self, p1, p2, color, thickness) -> None:
        a, b, t = (_fx(p1[0]), _fx(p1[1])), (_fx(p2[0]), _fx(p2[1])), max(1, int(round(thickness)))
        cv2.line(self.rgb, a, b, color, t, cv2.LINE_8, _SHIFT)
        if self.mask is not None:
            cv2.line(self.mask, a, b, self.label, t, cv2.LINE_8, _SHIFT)


@dataclass(frozen=True)
class _Layout:
    """Where things are: walkway centre line and width, perspective, fixed props."""

    w: int
    h: int
    y0: float  # walkway centre at x=0, fraction of H
    tilt: float  # centre rise across the frame, fraction of H
    bow: float  # sag in the middle, fraction of H

    @property
    def u(self) -> float:
        return self.h / 240.0

    def scale(self, y):
        # Perspective: things at the bottom of the frame are ~1.7x those on the walkway's centre line.
        return 0.2 + 1.8 * y / self.h

    def centre(self, x):
        t = np.asarray(x, dtype=np.float64) / self.w
        y = self.h * (self.y0 + self.tilt * t + self.bow * np.sin(np.pi * t))
        return float(y) if np.ndim(y) == 0 else y

    def half_width(self, x):
        return 0.085 * self.h * self.scale(self.centre(x))

    def walkway_y(self, x: float, lane: float) -> float:
        # Feet stay inside the band: lane in [-1, 1] spans 75 % of the half width.
        return self.centre(x) + 0.75 * lane * self.half_width(x)


def _noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth zero-mean noise with roughly `cells` blobs across the width (cubic upsampling)."""
    gh, gw = max(2, int(round(cells * h / w))), max(2, cells)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _render_background(lay: _Layout, rng: np.random.Generator) -> np.ndarray:
    w, h, u = lay.w, lay.h, lay.u
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Grass: fractal noise for patches, per-pixel grain for blades, a yellower tint in places.
    fbm = sum(_noise(rng, h, w, c) * a for c, a in ((4, 1.0), (12, 0.5), (40, 0.25)))
    grain = rng.standard_normal((h, w)).astype(np.float32)
    tint = _noise(rng, h, w, 3)
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 78 + 10 * fbm + 8 * tint + 7 * grain
    img[..., 1] = 116 + 14 * fbm + 3 * tint + 9 * grain
    img[..., 2] = 52 + 6 * fbm - 4 * tint + 5 * grain

    # Walkway: paving slabs (joints along and across the path) with a little wear texture.
    c, hw = lay.centre(xx[0]), lay.half_width(xx[0])
    v = (yy - c[None, :]) / hw[None, :]
    on_path = np.abs(v) <= 1.0
    slab = 15.0 * lay.scale(c)[None, :] * u
    joints = ((xx % slab) < 1.0) | (np.abs(((v + 1.0) * 1.5) % 1.0 - 0.5) > 0.46)
    pave = 168 + 6 * _noise(rng, h, w, 30) + 4 * rng.standard_normal((h, w)).astype(np.float32)
    pave = np.where(joints, pave - 28, pave)
    for ch, off in enumerate((4, 0, -12)):
        img[..., ch] = np.where(on_path, pave + off, img[..., ch])
    curb = on_path & (np.abs(v) > 0.93)
    img[curb] = (205, 202, 195)

    # Building along the top: concrete wall, two rows of windows, a hedge at its foot.
    wall_h = 0.17 * h
    wall = yy < wall_h
    img[wall] = 0
    img[..., 0][wall] = 176 + 4 * grain[wall]
    img[..., 1][wall] = 170 + 4 * grain[wall]
    img[..., 2][wall] = 160 + 4 * grain[wall]
    out = np.clip(img, 0, 255).astype(np.uint8)
    pw = _Painter(out, None)
    win_w, gap = 22 * u, 12 * u
    x = 6 * u + rng.uniform(0, gap)
    while x + win_w < w:
        for top in (0.02 * h, 0.09 * h):
            pw.rect(x - u, top - u, x + win_w + u, top + 0.05 * h + u, (120, 118, 112))
            shade = int(rng.integers(55, 85))
            pw.rect(x, top, x + win_w, top + 0.05 * h, (shade, shade + 10, shade + 25))
        x += win_w + gap
    pw.rect(0, wall_h - 2 * u, w, wall_h, (105, 100, 95))
    pw.rect(0, wall_h, w, wall_h + 6 * u, (45, 80, 40))

    # Trees, benches and a lamp post beyond the walkway: anything that moves passes in front of them.
    # (Props nearer the camera than some walker are `_Prop`s, drawn per frame in depth order.)
    for tx in np.sort(rng.uniform(0.05, 0.95, size=4)) * w:
        top_y = lay.centre(tx) - lay.half_width(tx) - 6 * u
        base = min(top_y, wall_h + 0.25 * h)
        s = lay.scale(base)
        pw.ellipse((tx + 6 * u * s, base), (16 * u * s, 4 * u * s), (45, 70, 35))
        pw.rect(tx - 2 * u * s, base - 16 * u * s, tx + 2 * u * s, base, (85, 60, 40))
        for _ in range(6):
            dx, dy = rng.uniform(-9, 9) * u * s, rng.uniform(-8, 4) * u * s
            g = int(rng.integers(60, 95))
            pw.circle((tx + dx, base - 24 * u * s + dy), rng.uniform(7, 11) * u * s, (30, g, 30))
    for bx in (0.3 * w + rng.uniform(-20, 20) * u, 0.72 * w + rng.uniform(-20, 20) * u):
        by = lay.centre(bx) - lay.half_width(bx) - 3 * u
        s = lay.scale(by)
        pw.rect(bx - 14 * u * s, by - 9 * u * s, bx + 14 * u * s, by - 7 * u * s, (110, 75, 45))
        pw.rect(bx - 14 * u * s, by - 5 * u * s, bx + 14 * u * s, by - 3 * u * s, (125, 85, 50))
        for lx in (-12, 12):
            pw.rect(bx + (lx - 1) * u * s, by - 3 * u * s, bx + (lx + 1) * u * s, by, (50, 50, 50))
    lx = 0.55 * w + rng.uniform(-30, 30) * u
    ly = lay.centre(lx) - lay.half_width(lx) - 2 * u  # far edge: whatever passes is in front of it
    s = lay.scale(ly)
    pw.rect(lx - 1.2 * u * s, ly - 48 * u * s, lx + 1.2 * u * s, ly, (60, 62, 66))
    pw.rect(lx - 4 * u * s, ly - 51 * u * s, lx + 4 * u * s, ly - 47 * u * s, (230, 225, 200))

    # A lens: slight softness and vignetting.
    out = cv2.GaussianBlur(out, (3, 3), 0.6)
    r2 = ((xx - w / 2) / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.8 * h)) ** 2
    out = np.clip(out.astype(np.float32) * (1.0 - 0.25 * r2)[..., None], 0, 255)
    return out.astype(np.uint8)


def _near_props(lay: _Layout, rng: np.random.Generator) -> list[_Prop]:
    """A litter bin at the walkway's near edge and a bench on the foreground lawn."""
    w, h, u = lay.w, lay.h, lay.u
    bx = 0.12 * w
    by = lay.centre(bx) + lay.half_width(bx) + 4 * u
    s = lay.scale(by) * u
    bin_ = _Prop(y=by, rects=((bx - 4 * s, by - 10 * s, bx + 4 * s, by, (35, 75, 50)),))
    fx, fy = 0.08 * w + rng.uniform(0, 20) * u, 0.9 * h
    s = lay.scale(fy) * u
    bench = _Prop(
        y=fy,
        rects=(
            (fx, fy - 10 * s, fx + 32 * s, fy - 8 * s, (120, 82, 48)),
            (fx, fy - 6 * s, fx + 32 * s, fy - 4 * s, (135, 92, 55)),
            (fx + 2 * s, fy - 4 * s, fx + 4 * s, fy, (50, 50, 50)),
            (fx + 29 * s, fy - 4 * s, fx + 31 * s, fy, (50, 50, 50)),
        ),
    )
    return [bin_, bench]


# ---------------------------------------------------------------------------------------------
# Agents. Each has a foot point (x, y) for depth order, `step()`, `draw()`, `shadow()` and `gone()`.


@dataclass(frozen=True)
class _Prop:
    """A static object that can hide whoever walks behind it: drawn every frame, in depth order."""

    y: float
    rects: tuple

    def step(self, lay: _Layout) -> None:
        pass

    def shadow(self, lay: _Layout, layer: np.ndarray) -> None:
        pass

    def draw(self, lay: _Layout, p: _Painter) -> None:
        p.label = 0
        for x1, y1, x2, y2, colour in self.rects:
            p.rect(x1, y1, x2, y2, colour)

    def gone(self, lay: _Layout) -> bool:
        return False


@dataclass
class _Person:
    x: float
    y: float
    speed: float  # px per frame at scale 1
    height: float  # px at scale 1
    shirt: tuple
    trousers: tuple
    skin: tuple
    hair: tuple
    bag: bool
    phase: float
    lane: float | None = None  # on the walkway when set (walking along x by `heading`) ...
    waypoints: tuple = ()  # ... else straight to each of these in turn, gone after the last one
    heading: tuple = (1.0, 0.0)
    label: int = 0

    def step(self, lay: _Layout) -> None:
        ds = self.speed * lay.scale(self.y)
        if self.lane is not None:
            self.x += self.heading[0] * ds
            self.y = lay.walkway_y(self.x, self.lane)
        elif self.waypoints:
            tx, ty = self.waypoints[0]
            dist = math.hypot(tx - self.x, ty - self.y)
            if dist <= ds:
                self.x, self.y, self.waypoints = tx, ty, self.waypoints[1:]
            else:
                self.heading = ((tx - self.x) / dist, (ty - self.y) / dist)
                self.x += self.heading[0] * ds
                self.y += self.heading[1] * ds
        self.phase += 2 * math.pi * ds / (0.55 * self.height * lay.scale(self.y))

    def size(self, lay: _Layout) -> float:
        return self.height * lay.scale(self.y)

    def bbox(self, lay: _Layout) -> tuple[float, float, float, float]:
        h = self.size(lay)
        return (self.x - 0.3 * h, self.y - h, self.x + 0.3 * h, self.y + 0.1 * h)

    def shadow(self, lay: _Layout, layer: np.ndarray) -> None:
        h = self.size(lay)
        _Painter(layer, None).ellipse((self.x + 0.08 * h, self.y), (0.22 * h, 0.06 * h), 1)

    def draw(self, lay: _Layout, p: _Painter) -> None:
        h = self.size(lay)
        x, y, d = self.x, self.y, 1.0 if self.heading[0] >= 0 else -1.0
        sw = math.sin(self.phase)
        p.label = self.label
        hip = (x, y - 0.47 * h)
        leg_t = max(2.0, 0.09 * h)
        p.line(hip, (x + 0.16 * h * sw, y), self.trousers, leg_t)
        p.line(hip, (x - 0.16 * h * sw, y), self.trousers, leg_t)
        if self.bag:
            p.rect(x - d * 0.2 * h, y - 0.8 * h, x - d * 0.08 * h, y - 0.55 * h, (45, 45, 50))
        p.poly(
            [
                (x - 0.13 * h, y - 0.84 * h),
                (x + 0.13 * h, y - 0.84 * h),
                (x + 0.1 * h, y - 0.45 * h),
                (x - 0.1 * h, y - 0.45 * h),
            ],
            self.shirt,
        )
        sleeve = tuple(int(c * 0.8) for c in self.shirt)
        hand = (x - d * 0.14 * h * sw, y - 0.5 * h)
        p.line((x, y - 0.8 * h), hand, sleeve, max(1.5, 0.07 * h))
        p.circle(hand, max(1.0, 0.035 * h), self.skin)
        head = (x, y - 0.91 * h)
        r = 0.085 * h
        p.circle(head, r, self.skin)
        p.ellipse(head, (r, r), self.hair, start=180, end=360)

    def gone(self, lay: _Layout) -> bool:
        if self.lane is None:
            return not self.waypoints
        x1, _, x2, _ = self.bbox(lay)
        return (self.heading[0] > 0 and x1 > lay.w) or (self.heading[0] < 0 and x2 < 0)


def _random_person(rng: np.random.Generator, fps: float, u: float, **kw) -> _Person:
    return _Person(
        speed=_WALK_PX_S * u / fps * rng.uniform(0.85, 1.15),
        height=_PERSON_H * u * rng.uniform(0.9, 1.1),
        shirt=_SHIRTS[rng.integers(len(_SHIRTS))],
        trousers=_TROUSERS[rng.integers(len(_TROUSERS))],
        skin=_SKIN[rng.integers(len(_SKIN))],
        hair=_HAIR[rng.integers(len(_HAIR))],
        bag=bool(rng.random() < 0.25),
        phase=rng.uniform(0, 2 * math.pi),
        **kw,
    )


@dataclass
class _Vehicle:
    """A small car-like vehicle seen side-on: body, cabin with windows, two wheels with spokes."""

    x: float  # centre
    lane: float
    direction: float
    speed: float
    colour: tuple
    y: float = 0.0
    angle: float = 0.0
    label: int = 1

    def dims(self, lay: _Layout) -> tuple[float, float]:
        s = _PERSON_H * lay.u * lay.scale(self.y)
        return 2.6 * s, s  # length, reference height

    def step(self, lay: _Layout) -> None:
        _, s = self.dims(lay)
        dx = self.speed * lay.scale(self.y)
        self.x += self.direction * dx
        self.y = lay.walkway_y(self.x, self.lane)
        self.angle += dx / (0.17 * s)

    def shadow(self, lay: _Layout, layer: np.ndarray) -> None:
        length, s = self.dims(lay)
        _Painter(layer, None).ellipse((self.x, self.y), (0.55 * length, 0.1 * s), 1)

    def draw(self, lay: _Layout, p: _Painter) -> None:
        length, s = self.dims(lay)
        x, y, d = self.x, self.y, self.direction
        p.label = self.label
        r = 0.17 * s
        body_top, body_bot = y - r - 0.42 * s, y - 0.6 * r
        p.rect(x - length / 2, body_top, x + length / 2, body_bot, self.colour)
        cab_b, cab_t = body_top, body_top - 0.38 * s
        cab_x1, cab_x2 = x - 0.3 * length, x + 0.22 * length
        if d < 0:
            cab_x1, cab_x2 = x - 0.22 * length, x + 0.3 * length
        p.poly(
            [
                (cab_x1, cab_b),
                (cab_x2, cab_b),
                (cab_x2 - d * 0.08 * length, cab_t),
                (cab_x1 + d * 0.04 * length, cab_t),
            ],
            self.colour,
        )
        glass = (150, 190, 215)
        mid = (cab_x1 + cab_x2) / 2
        p.poly(
            [
                (cab_x1 + 0.03 * length, cab_b - 0.04 * s),
                (mid - 0.02 * length, cab_b - 0.04 * s),
                (mid - 0.02 * length, cab_t + 0.06 * s),
                (cab_x1 + 0.06 * length, cab_t + 0.06 * s),
            ],
            glass,
        )
        p.poly(
            [
                (mid + 0.02 * length, cab_b - 0.04 * s),
                (cab_x2 - 0.03 * length, cab_b - 0.04 * s),
                (cab_x2 - 0.08 * length, cab_t + 0.06 * s),
                (mid + 0.02 * length, cab_t + 0.06 * s),
            ],
            glass,
        )
        p.rect(x - length / 2, body_bot - 0.08 * s, x + length / 2, body_bot, (40, 40, 45))
        front = x + d * length / 2
        p.rect(
            min(front, front - d * 0.06 * length),
            body_top + 0.06 * s,
            max(front, front - d * 0.06 * length),
            body_top + 0.16 * s,
            (255, 240, 150),
        )
        back = x - d * length / 2
        p.rect(
            min(back, back + d * 0.04 * length),
            body_top + 0.06 * s,
            max(back, back + d * 0.04 * length),
            body_top + 0.16 * s,
            (220, 20, 20),
        )
        for wx in (x - 0.3 * length, x + 0.3 * length):
            p.circle((wx, y - r), r, (20, 20, 22))
            p.circle((wx, y - r), 0.5 * r, (170, 170, 175))
            a = self.angle
            p.line(
                (wx - 0.5 * r * math.cos(a), y - r - 0.5 * r * math.sin(a)),
                (wx + 0.5 * r * math.cos(a), y - r + 0.5 * r * math.sin(a)),
                (60, 60, 60),
                1,
            )

    def bbox(self, lay: _Layout) -> tuple[float, float, float, float]:
        length, s = self.dims(lay)
        return (self.x - length / 2, self.y - 1.0 * s, self.x + length / 2, self.y)

    def gone(self, lay: _Layout) -> bool:
        x1, _, x2, _ = self.bbox(lay)
        return (self.direction > 0 and x1 > lay.w) or (self.direction < 0 and x2 < 0)


@dataclass
class _Crate:
    """A large object lying on the walkway between frames `start` and `end` (exclusive)."""

    x: float
    y: float
    design: int  # 0: hazard-striped crate, 1: red/white checkered box, 2: orange barrel
    start: int
    end: int
    t: int = 0
    label: int = 1

    @property
    def visible(self) -> bool:
        return self.start <= self.t < self.end

    def step(self, lay: _Layout) -> None:
        self.t += 1

    def dims(self, lay: _Layout) -> tuple[float, float]:
        s = lay.scale(self.y) * lay.u
        return 46 * s, 32 * s

    def shadow(self, lay: _Layout, layer: np.ndarray) -> None:
        if self.visible:
            w, h = self.dims(lay)
            _Painter(layer, None).ellipse((self.x + 0.1 * w, self.y), (0.6 * w, 0.12 * h), 1)

    def draw(self, lay: _Layout, p: _Painter) -> None:
        if not self.visible:
            return
        w, h = self.dims(lay)
        x1, x2, y2 = self.x - w / 2, self.x + w / 2, self.y
        y1 = y2 - h
        p.label = self.label
        if self.design == 2:
            body, band = (245, 110, 20), (250, 250, 245)
            p.rect(x1 + 0.15 * w, y1, x2 - 0.15 * w, y2, body)
            for f in (0.25, 0.55):
                p.rect(x1 + 0.15 * w, y1 + f * h, x2 - 0.15 * w, y1 + (f + 0.12) * h, band)
            p.ellipse((self.x, y1), (0.35 * w, 0.1 * h), (200, 85, 15))
            return
        top = 0.3 * h
        p.poly(
            [(x1, y1), (x2, y1), (x2 - 0.12 * w, y1 - top), (x1 + 0.12 * w, y1 - top)],
            (235, 225, 140) if self.design == 0 else (240, 240, 240),
        )
        if self.design == 0:
            p.rect(x1, y1, x2, y2, (250, 200, 0))
            period = 0.22 * w
            p.pattern(
                [(x1, y1), (x2, y1), (x2, y2), (x1, y2)],
                lambda xx, yy: ((xx + yy) % period) < 0.5 * period,
                (20, 20, 20),
            )
        else:
            n = 4
            cw, ch = w / n, h / 3
            for i in range(n):
                for j in range(3):
                    col = (220, 20, 40) if (i + j) % 2 == 0 else (245, 245, 245)
                    p.rect(x1 + i * cw, y1 + j * ch, x1 + (i + 1) * cw, y1 + (j + 1) * ch, col)

    def bbox(self, lay: _Layout) -> tuple[float, float, float, float]:
        w, h = self.dims(lay)
        return (self.x - w / 2, self.y - 1.3 * h, self.x + w / 2, self.y)

    def gone(self, lay: _Layout) -> bool:
        return self.t >= self.end


# ---------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """One fixed camera: `camera` fixes the layout and the background, the clip seed the activity.

    `clip()` yields (frame_rgb uint8 [H, W, 3], mask uint8 [H, W], 1 = anomalous) per frame.
    Training and test footage of one data set come from the same camera, with different clip seeds.
    """

    size: tuple[int, int] = (320, 240)
    camera: int = 0
    _layout: _Layout = field(init=False, repr=False)
    _background: np.ndarray = field(init=False, repr=False)
    _props: list = field(init=False, repr=False)

    def __post_init__(self) -> None:
        w, h = int(self.size[0]), int(self.size[1])
        if w < 16 or h < 16:
            raise ValueError(f"size too small: {self.size}")
        rng = _rngs(self.camera, 1)[0]
        self._layout = _Layout(
            w, h, y0=0.5 + rng.uniform(-0.02, 0.02), tilt=rng.uniform(0.04, 0.08), bow=rng.uniform(0.02, 0.05)
        )
        self._background = _render_background(self._layout, rng)
        self._props = _near_props(self._layout, rng)

    @property
    def background(self) -> np.ndarray:
        """The empty scene without camera noise (a copy)."""
        out = self._background.copy()
        painter = _Painter(out, None)
        for prop in self._props:
            prop.draw(self._layout, painter)
        return out

    def clip(
        self, frames: int, *, seed: SeedLike = 0, fps: float = 24.0, anomaly: AnomalyKind = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield `frames` (rgb, mask) pairs. The same seed with `anomaly=None` gives the same people,
        lighting and noise, so only the anomalous object (and its shadow) differs between the two."""
        if anomaly not in (None, *ANOMALIES):
            raise ValueError(f"anomaly must be one of {ANOMALIES} or None, got {anomaly!r}")
        lay = self._layout
        rng_people, rng_cam, rng_anom = _rngs(seed, 3)
        # People arrive at each end about every `gap` frames (+-50 %), not as a Poisson stream: a
        # crossing lasts ~10 s, so Poisson counts drift between an empty walkway and a crowd for many
        # seconds, and a short training video would never show the test videos' crowd levels.
        v_ref = _WALK_PX_S * lay.u / fps * lay.scale(lay.centre(lay.w / 2))
        gap = (lay.w + 24 * lay.u) / v_ref / (_MEAN_PEOPLE / 2)
        people, next_arrival = self._warm_start(rng_people, fps, gap, v_ref)
        pending = self._anomaly(rng_anom, anomaly, frames, fps) if anomaly else None
        special: list = []
        flicker_phase = rng_cam.uniform(0, 2 * math.pi)
        # Sensor noise: drawing fresh Gaussian noise every frame would cost more than all the drawing;
        # a random window into one pool of twice a frame's size looks the same and is nearly free.
        n_px = self._background.size
        pool = rng_cam.standard_normal(2 * n_px, dtype=np.float32) * 2.0
        for t in range(frames):
            for k, side in enumerate((-1.0, 1.0)):
                if t >= next_arrival[k]:
                    people.append(self._entering(rng_people, fps, side))
                    next_arrival[k] = t + gap * rng_people.uniform(0.5, 1.5)
            if pending is not None and t == pending[0]:
                special.extend(pending[1])
                pending = None
            movers = people + special
            rgb = self._background.copy()
            mask = np.zeros(rgb.shape[:2], np.uint8)
            shadow = np.zeros(rgb.shape[:2], np.uint8)
            for a in movers:
                a.shadow(lay, shadow)
            dark = shadow.astype(bool)
            rgb[dark] = (rgb[dark] * 0.7).astype(np.uint8)
            painter = _Painter(rgb, mask if special else None)
            for a in sorted(movers + self._props, key=lambda a: a.y):
                a.draw(lay, painter)
            gain = 1.0 + 0.02 * math.sin(2 * math.pi * t / (2.3 * fps) + flicker_phase)
            gain += 0.005 * rng_cam.standard_normal()
            noisy = rgb.astype(np.float32)
            noisy *= gain
            off = int(rng_cam.integers(0, n_px + 1))
            noisy += pool[off : off + n_px].reshape(rgb.shape)
            np.clip(noisy, 0, 255, out=noisy)
            yield noisy.astype(np.uint8), mask
            for a in movers:
                a.step(lay)
            people = [a for a in people if not a.gone(lay)]
            special = [a for a in special if not a.gone(lay)]

    # -- normal activity ------------------------------------------------------------------------

    def _warm_start(self, rng: np.random.Generator, fps: float, gap: float, v_ref: float) -> tuple[list, list]:
        """People already on the walkway at frame 0, spaced as if they had arrived every ~`gap`
        frames at ~`v_ref` px per frame, and the frame at which the next enters at each end."""
        lay = self._layout
        spacing = gap * v_ref
        people, next_arrival = [], []
        for side in (-1.0, 1.0):  # enters on the left (side -1) walking right
            d = -side
            walked = nearest = rng.uniform(0.0, spacing)  # distance from the entry point
            while walked < lay.w + 24 * lay.u:
                x = walked - 12 * lay.u if d > 0 else lay.w + 12 * lay.u - walked
                lane = self._lane(rng, d)
                people.append(
                    _random_person(rng, fps, lay.u, x=x, y=lay.walkway_y(x, lane), lane=lane, heading=(d, 0.0))
                )
                walked += spacing * rng.uniform(0.5, 1.5)
            next_arrival.append(max(0.0, spacing * rng.uniform(0.5, 1.5) - nearest) / v_ref)
        return people, next_arrival

    def _entering(self, rng: np.random.Generator, fps: float, side: float) -> _Person:
        lay = self._layout
        d = -side  # enters on the left (side -1) walking right
        x = -12 * lay.u if side < 0 else lay.w + 12 * lay.u
        lane = self._lane(rng, d)
        return _random_person(rng, fps, lay.u, x=x, y=lay.walkway_y(x, lane), lane=lane, heading=(d, 0.0))

    @staticmethod
    def _lane(rng: np.random.Generator, direction: float) -> float:
        # People mostly keep to one side per direction, as on real paths, with overlap.
        return float(np.clip(rng.normal(0.35 * direction, 0.35), -1.0, 1.0))

    # -- anomalies ------------------------------------------------------------------------------

    def _anomaly(self, rng: np.random.Generator, kind: str, frames: int, fps: float):
        """(first frame, agents) for one anomaly, timed to leave normal frames before and after."""
        lay = self._layout
        start = max(1, int(round(frames * rng.uniform(0.12, 0.2))))
        if kind == "vehicle":
            d = 1.0 if rng.random() < 0.5 else -1.0
            v = _Vehicle(
                x=0.0,
                lane=float(rng.uniform(-0.3, 0.3)),
                direction=d,
                speed=_VEHICLE_SPEEDUP * _WALK_PX_S * lay.u / fps * rng.uniform(0.9, 1.1),
                colour=_CAR_COLOURS[rng.integers(len(_CAR_COLOURS))],
            )
            v.y = lay.walkway_y(0.0 if d > 0 else lay.w, v.lane)  # its size there, to start just out of view
            half = v.dims(lay)[0] / 2
            v.x = -half if d > 0 else lay.w + half
            v.y = lay.walkway_y(v.x, v.lane)
            return start, [v]
        if kind == "offpath":
            return start, self._offpath_group(rng, fps, budget=max(10, int(0.7 * frames)))
        x = lay.w * rng.uniform(0.3, 0.7)
        y = lay.walkway_y(x, float(rng.uniform(-0.4, 0.4)))
        dur = max(1, int(round(frames * rng.uniform(0.45, 0.55))))
        # The crate's own clock starts when it is added, at frame `start`.
        return start, [_Crate(x=x, y=y, design=int(rng.integers(3)), start=0, end=dur)]

    def _offpath_group(self, rng: np.random.Generator, fps: float, budget: int) -> list[_Person]:
        """Two or three people wandering onto the foreground lawn from a side edge and back out.

        In and out by a side (not the bottom edge) keeps the frames where only a sliver of them shows
        few; a group rather than one person because one figure is ~1 % of the frame, too little for
        a frame-level feature comparison to notice reliably. The excursion is shortened until it takes
        at most `budget` frames (if it can)."""
        lay = self._layout
        side = -1.0 if rng.random() < 0.5 else 1.0
        out = -side  # unit x pointing into the frame from the entry edge
        n = int(rng.integers(2, 4))
        members = [_random_person(rng, fps, lay.u, x=0.0, y=0.0) for _ in range(n)]
        speed = members[0].speed * rng.uniform(1.2, 1.4)  # hurrying: a short test clip has room for it
        for m in members:
            m.speed = speed  # a group keeps together
        h = _PERSON_H * lay.u * lay.scale(0.9 * lay.h)  # a member's height on the lawn
        # A close group: each ~0.35 h behind the one before, alternately nearer and farther.
        offsets = [(-0.35 * h * k, (0.15 * h if k % 2 else -0.12 * h) * (k > 0)) for k in range(n)]
        y_in, y_turn, y_out = (lay.h * rng.uniform(a, b) for a, b in ((0.76, 0.8), (0.88, 0.92), (0.82, 0.86)))
        edge = -0.5 * h if side < 0 else lay.w + 0.5 * h  # beyond the edge: fully out of view
        for reach in np.linspace(0.45, 0.1, 8):
            x_turn = lay.w * reach if side < 0 else lay.w * (1 - reach)
            group = []
            for m, (back, dy) in zip(members, offsets):
                start = (edge + out * back, y_in + dy)
                route = ((x_turn + out * back, y_turn + dy), (edge + out * back, y_out + dy))
                group.append(_Person(**{**m.__dict__, "x": start[0], "y": start[1], "label": 1, "waypoints": route}))
            probes = [_Person(**g.__dict__) for g in group]
            steps = 0
            while not all(p.gone(lay) for p in probes) and steps <= budget:
                for p in probes:
                    p.step(lay)
                steps += 1
            if steps <= budget:
                break
        return group


# ---------------------------------------------------------------------------------------------
# Files.


def _check_even(size: tuple[int, int]) -> tuple[int, int]:
    w, h = int(size[0]), int(size[1])
    if w % 2 or h % 2:
        # The video codecs pad odd sizes, which would make training videos and test frames differ.
        raise ValueError(f"size must be even in both dimensions, got {w}x{h}")
    return w, h


def render_clip(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    fps: float = 24,
    frames: int = 240,
    anomaly: AnomalyKind = None,
    camera: int = 0,
    **writer_kw,
) -> np.ndarray:
    """Write one clip seen by `camera` to a video file (codec by extension, see VideoWriter).

    `seed` drives the activity only: a clip of camera 0 is a plausible test clip for a bank fitted
    on `generate_stc(..., camera=0)` footage, whatever the two seeds. Returns the per-frame masks,
    uint8 [T, H, W], 1 = anomalous.
    """
    from stream.video_writer import VideoWriter

    w, h = _check_even(size)
    scene = Scene((w, h), camera=camera)
    masks = np.zeros((frames, h, w), np.uint8)
    with VideoWriter(path, w, h, fps, **writer_kw) as writer:
        for t, (rgb, mask) in enumerate(scene.clip(frames, seed=[seed, 3], fps=fps, anomaly=anomaly)):
            writer.write(rgb)
            masks[t] = mask
    return masks


def generate_stc(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    fps: float = 24,
    train_videos: int = 2,
    train_frames: int = 240,
    test_videos: int = 3,
    test_frames: int = 120,
    camera: int = 0,
) -> dict:
    """Write a small data set in the STC layout under `root` and return a summary of it.

    root/training/videos/01_NNN.avi                 normal footage (MJPEG, frame-exact)
    root/testing/frames/01_NNNN/NNN.jpg             test frames, JPEG quality 95
    root/testing/test_frame_mask/01_NNNN.npy        uint8 (T,), 1 = anomalous frame (= mask.any())
    root/testing/test_pixel_mask/01_NNNN.npy        uint8 (T, H, W), 1 = anomalous pixel

    Test video i holds anomaly ANOMALIES[i % 3] and normal frames before and after it (given enough
    frames: from 120 at 24 fps). `camera` fixes the scene and its STC scene number in the names (camera + 1;
    the 01 above is camera 0), so sets of several cameras written to one root form a multi-scene set.
    `seed` fixes the activity in every video.
    """
    from stream.video_writer import VideoWriter

    w, h = _check_even(size)
    root = os.fspath(root)
    scene = Scene((w, h), camera=camera)
    train_dir = os.path.join(root, "training", "videos")
    frames_root = os.path.join(root, "testing", "frames")
    fmask_dir = os.path.join(root, "testing", "test_frame_mask")
    pmask_dir = os.path.join(root, "testing", "test_pixel_mask")
    for d in (train_dir, frames_root, fmask_dir, pmask_dir):
        os.makedirs(d, exist_ok=True)

    train = []
    for i in range(train_videos):
        name = f"{camera + 1:02d}_{i + 1:03d}"
        path = os.path.join(train_dir, name + ".avi")
        # crf 12 pins MJPEG's quantiser at 2, close to the test frames' JPEG quality 95.
        with VideoWriter(path, w, h, fps, crf=12) as writer:
            for rgb, _ in scene.clip(train_frames, seed=[seed, 1, i], fps=fps):
                writer.write(rgb)
        train.append({"name": name, "path": path, "frames": train_frames})

    test = []
    digits = max(3, len(str(test_frames - 1)))
    for i in range(test_videos):
        name = f"{camera + 1:02d}_{14 + i:04d}"
        kind = ANOMALIES[i % len(ANOMALIES)]
        vdir = os.path.join(frames_root, name)
        os.makedirs(vdir, exist_ok=True)
        masks = np.zeros((test_frames, h, w), np.uint8)
        for t, (rgb, mask) in enumerate(scene.clip(test_frames, seed=[seed, 2, i], fps=fps, anomaly=kind)):
            bgr = np.ascontiguousarray(rgb[..., ::-1])  # OpenCV writes BGR
            cv2.imwrite(os.path.join(vdir, f"{t:0{digits}d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            masks[t] = mask
        labels = masks.any(axis=(1, 2)).astype(np.uint8)
        np.save(os.path.join(fmask_dir, name + ".npy"), labels)
        np.save(os.path.join(pmask_dir, name + ".npy"), masks)
        test.append(
            {
                "name": name,
                "anomaly": kind,
                "frames_dir": vdir,
                "frames": test_frames,
                "frame_mask": os.path.join(fmask_dir, name + ".npy"),
                "pixel_mask": os.path.join(pmask_dir, name + ".npy"),
                "anomalous_frames": int(labels.sum()),
            }
        )

    return {
        "root": root,
        "seed": seed,
        "camera": camera,
        "size": (w, h),
        "fps": fps,
        "train": train,
        "test": test,
        "train_frames_total": train_videos * train_frames,
        "test_frames_total": test_videos * test_frames,
        "anomalous_frames_total": sum(t["anomalous_frames"] for t in test),
    }
