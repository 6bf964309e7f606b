"""Motion evidence: dense optical flow pooled to the feature grid, matched against normal flow *here*.

Appearance alone cannot tell a cyclist from a pedestrian, or someone walking the wrong way from someone
walking the right way. For a fixed camera, what moves where, how fast and in which direction is itself a
normal model:

* flow: OpenCV DIS between the previous and the current frame, both resized to `flow_size^2` grayscale
  (the same square resampling as the backbone input, so cells line up with the feature grid);
* per-cell feature: mean flow (dx, dy) and mean flow magnitude over the cell, in flow pixels per frame;
* normal model: for every cell, the flow features of all bank frames at that cell and at cells within
  `window` cells (a person may walk a little to the side of where anyone walked before), reduced to a
  greedy k-centre coreset of `centres` vectors per cell (plus the zero vector: standing still is normal);
* score: distance from the test cell's flow to the nearest normal vector of its cell.

A frame whose camera has no previous frame yet gets zero flow (scored as static).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MOTION_DIM = 3
_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def to_gray(img_rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size] grayscale of an RGB uint8 image (any size)."""
    g = cv2.cvtColor(img_rgb, cv2.COLOR_RGB2GRAY)
    h, w = g.shape
    if (h, w) != (size, size):
        interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
        g = cv2.resize(g, (size, size), interpolation=interp)
    return np.ascontiguousarray(g)


class FlowExtractor:
    """Previous gray frame + current gray frame -> float32 [grid, grid, 3] cell features."""

    def __init__(self, flow_size: int, grid: int, preset: str = "fast"):
        self.flow_size, self.grid = flow_size, grid
        self.dis = cv2.DISOpticalFlow.create(_PRESETS[preset])  # = DISOpticalFlow_create, which the stubs lack

    def gray(self, img_rgb: np.ndarray) -> np.ndarray:
        return to_gray(img_rgb, self.flow_size)

    def flow(self, prev_gray: np.ndarray, gray: np.ndarray) -> np.ndarray:
        # OpenCV accepts None for the output flow (it allocates it); its stubs type that argument as a Mat
        return self.dis.calc(prev_gray, gray, None)  # type: ignore[call-overload]

    def cells(self, flow: np.ndarray) -> np.ndarray:
        mag = np.sqrt((flow**2).sum(-1, keepdims=True))
        stack = np.concatenate([flow, mag], axis=-1).astype(np.float32)
        g = self.grid
        interp = cv2.INTER_AREA if self.flow_size >= g else cv2.INTER_LINEAR
        return cv2.resize(stack, (g, g), interpolation=interp).reshape(g, g, MOTION_DIM)

    def __call__(self, prev_gray: np.ndarray | None, gray: np.ndarray) -> np.ndarray:
        if prev_gray is None:
            return np.zeros((self.grid, self.grid, MOTION_DIM), np.float32)
        return self.cells(self.flow(prev_gray, gray))


class FlowTracker:
    """Flow cell features of one source's frames, each against that source's previous decoded frame.

    Made per source (Detector.flow_tracker) and called on the source's decode thread: the flow then costs
    the detector thread nothing, runs in parallel across cameras, and always spans one decoded frame even
    when a live source later drops frames. Not thread-safe (one DIS instance and one previous frame).
    """

    def __init__(self, extractor: FlowExtractor):
        self.extractor = extractor
        self.prev: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the previous frame (a new connection or a new pass over a file: no flow across it)."""
        self.prev = None

    def __call__(self, small_rgb: np.ndarray) -> np.ndarray:
        """The model input of the next decoded frame -> float32 [g, g, 3] (zero for the first)."""
        gray = self.extractor.gray(small_rgb)
        cells = self.extractor(self.prev, gray)
        self.prev = gray
        return cells


def window_candidates(feats: torch.Tensor, window: int) -> torch.Tensor:
    """[N, g, g, D] -> [g*g, N * (2w+1)^2, D]: every cell's own and neighbouring cells' features.

    Cells outside the grid are replaced by the nearest border cell (replicate padding).
    """
    n, g, _, d = feats.shape
    k = 2 * window + 1
    x = feats.permute(0, 3, 1, 2)  # [N, D, g, g]
    if window > 0:
        x = F.pad(x, (window, window, window, window), mode="replicate")
    cols = F.unfold(x, kernel_size=k)  # [N, D*k*k, g*g]
    cols = cols.view(n, d, k * k, g * g).permute(3, 0, 2, 1)  # [g*g, N, k*k, D]
    return cols.reshape(g * g, n * k * k, d)


def kcenter(points: torch.Tensor, m: int, chunk: int = 64) -> torch.Tensor:
    """Greedy k-centre coreset per cell: [G, P, D] -> [G, m, D], the zero vector first.

    Each step adds the point farthest from the chosen centres, so the coreset covers the whole support
    of normal flow at the cell (covering radius at most twice the optimum).
    """
    g, p, d = points.shape
    out = torch.zeros(g, m, d, dtype=points.dtype)
    for s in range(0, g, chunk):
        x = points[s : s + chunk]
        mind = x.pow(2).sum(-1)  # distance to the zero centre
        rows = torch.arange(x.shape[0])
        for j in range(1, m):
            far = mind.argmax(dim=1)
            c = x[rows, far]  # [c, D]
            out[s : s + chunk, j] = c
            mind = torch.minimum(mind, (x - c[:, None, :]).pow(2).sum(-1))
    return out


def build_motion_model(feats: np.ndarray, window: int, centres: int) -> np.ndarray:
    """Normal flow features of the bank frames [N, g, g, D] -> per-cell coreset float32 [g*g, m, D]."""
    t = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    cand = window_candidates(t, window)
    m = min(centres + 1, cand.shape[1] + 1)
    return kcenter(cand, m).numpy()


class MotionScorer:
    """Distance of each cell's flow feature to the nearest normal flow vector of that cell."""

    def __init__(self, model: np.ndarray, grid: int, device: torch.device):
        self.grid = grid
        self.model = torch.from_numpy(np.ascontiguousarray(model, dtype=np.float32)).to(device)  # [G, m, D]
        self.device = device

    def score(self, feats: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, g, g, D] -> [B, g, g] distances (flow pixels per frame)."""
        q = torch.as_tensor(feats, dtype=torch.float32, device=self.device)
        b, g = q.shape[0], self.grid
        q = q.reshape(b, g * g, MOTION_DIM)
        m = self.model
        d2 = q.pow(2).sum(-1, keepdim=True) + m.pow(2).sum(-1).unsqueeze(0) - 2 * torch.einsum("bgd,gmd->bgm", q, m)
        return d2.amin(-1).clamp_min(0).sqrt().reshape(b, g, g)


FLOW_NOISE_FLOOR = 1e-3  # flow px/frame: a noiseless (e.g. rendered) camera's median cell flow can be 0


def frame_flow_medians(cells: np.ndarray, prev: Sequence | None = None) -> np.ndarray:
    """Each frame's median cell flow magnitude: [N, g, g, 3] cell features -> float32 [N]. With `prev` (each
    frame's predecessor, None where there was none), frames without one are left out: their flow is zero
    for want of a previous frame, not because the camera is still."""
    c = np.asarray(cells, dtype=np.float32)
    if prev is not None:
        c = c[np.array([p is not None for p in prev], dtype=bool)]
    return np.median(c[..., 2].reshape(len(c), -1), axis=1).astype(np.float32)


def flow_noise(frame_medians: np.ndarray) -> float:
    """A camera's flow noise floor: the median over normal frames of each frame's median cell flow
    magnitude. Most cells of a fixed camera are static in most frames, so this is what static cells show
    (sensor noise, compression, flicker), in the camera's own resolution and frame rate."""
    m = np.asarray(frame_medians, dtype=np.float32)
    if not m.size:
        return FLOW_NOISE_FLOOR
    med = np.median(m)
    # max(med, FLOW_NOISE_FLOOR) spelt out (the stubs type max's result too loosely for float()): the same
    # comparison, made by numpy in float32
    return FLOW_NOISE_FLOOR if FLOW_NOISE_FLOOR > med else float(med)


class MovingGate:
    """Flow cell features -> per-pixel weights in [static_weight, 1] for the moving_max frame score
    (configs.schema.MovingConfig): 1 where a cell, or one within `dilate` cells, moves faster than
    noise_factor x the camera's noise floor; static_weight where nothing moves; linear in between."""

    def __init__(
        self, noise: float, noise_factor: float, static_weight: float, dilate: int, size: int, device: torch.device
    ):
        self.moving = max(noise, FLOW_NOISE_FLOOR) * noise_factor
        self.static_weight, self.dilate, self.size, self.device = static_weight, dilate, size, device

    def __call__(self, cells: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, g, g, 3] flow cell features -> float32 [B, size, size] weights."""
        mag = torch.as_tensor(cells, dtype=torch.float32, device=self.device)[..., 2].unsqueeze(1)
        if self.dilate:
            k = 2 * self.dilate + 1
            mag = F.max_pool2d(mag, k, stride=1, padding=self.dilate)
        gate = (mag / self.moving).clamp_(max=1.0)
        w = self.static_weight + (1.0 - self.static_weight) * gate
        return F.interpolate(w, size=(self.size, self.size), mode="bilinear", align_corners=False).squeeze(1)
