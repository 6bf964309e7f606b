"""PatchCore-style pixel gallery (Roth et al. 2022): a greedy k-centre coreset of all bank patch features.

SPADE compares a cell only with the cells of its K nearest bank frames, so a normal pattern that those
frames happen not to show looks anomalous. A coreset spread over the patch features of every bank frame
covers them all at a bounded cost per query.

Selection, after pass 1 of `fit` has written pixel.f16:

1. candidates: every patch feature of the bank, or a uniform random subsample of `max_features` of them
   (the projected candidates live in RAM, and neighbouring video frames are near-duplicates anyway);
2. a random Gaussian projection to `projection_dim` dimensions (Johnson-Lindenstrauss: distances are
   preserved to a few percent), streamed over the file in chunks and kept as float32 (`max_features`
   bounds that array: 1,000,000 x 128 x 4 B = 512 MB);
3. greedy k-centre (Gonzalez): from a random start, repeatedly add the candidate farthest from the
   centres chosen so far. The result covers the candidates within twice the optimal radius.

The bank stores the selected *original* (unprojected) features; scoring never sees the projection.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

# Rows per chunk when rotating or taking norms: bounds the float32 temporaries (65,536 x 128 x 4 B = 32 MB).
POINT_CHUNK = 1 << 16
# Bank frames read per chunk of the projection pass.
FRAME_CHUNK = 32
# Leading principal coordinates used for the lower bound that decides which points need a full distance:
# with 32 of the default 128 projected dimensions only a small share of the points pass the bound after
# the first few hundred steps, and fewer coordinates let more through (docs/history.md, section 4,
# "Coreset gallery").
LOW_DIMS = 32
# mind is kept as blocks of this many points with their maxima, so finding the farthest point reads the
# block maxima and one block instead of all N values.
BLOCK = 1024
# Squared distances below this times (|a|^2 + |b|^2) are rounding residue of the expansion: the rows coincide.
DUPLICATE_RTOL = 64 * float(np.finfo(np.float32).eps)


def principal_rotation(points: torch.Tensor) -> None:
    """Rotate `points` [N, d] (float32, in place) onto their principal axes, largest variance first.

    An orthogonal rotation leaves every distance unchanged; afterwards the leading coordinates carry most
    of the spread, so the distance over them alone is a tight lower bound of the full distance.
    """
    n, d = points.shape
    acc = torch.zeros(d, d, dtype=torch.float64, device=points.device)
    tot = torch.zeros(d, dtype=torch.float64, device=points.device)
    for s in range(0, n, POINT_CHUNK):
        x = points[s : s + POINT_CHUNK].double()
        acc += x.T @ x
        tot += x.sum(0)
    mean = tot / max(n, 1)
    cov = acc / max(n, 1) - torch.outer(mean, mean)
    basis = torch.linalg.eigh(cov)[1].flip(1).float()  # eigenvalues ascending -> largest first
    for s in range(0, n, POINT_CHUNK):
        points[s : s + POINT_CHUNK] = points[s : s + POINT_CHUNK] @ basis


def _sqnorms(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], POINT_CHUNK):
        out[s : s + POINT_CHUNK] = x[s : s + POINT_CHUNK].pow(2).sum(-1)
    return out


def greedy_kcenter(points: torch.Tensor, m: int, start: int, low_dims: int = LOW_DIMS) -> torch.Tensor:
    """Indices (int64, in selection order) of the greedy k-centre selection of `m` rows of `points` [N, d].

    The textbook loop: start with row `start`, then repeatedly add the row farthest from its nearest
    chosen centre, keeping every row's squared distance to its nearest centre (`mind`). Each step of
    that loop reads all N x d values, which is what made it take an hour on a CPU. Here `points`
    (float32, overwritten) is first rotated onto its principal axes; each step then computes the
    distance over the leading `low_dims` coordinates only, a lower bound of the full distance, and
    finishes the distance only for rows whose bound is below their current `mind` (the only rows whose
    `mind` can change). The picks are those of the textbook loop, ties going to the lowest index.

    Stops early, returning fewer indices, once every row coincides with a chosen centre.
    Runs on `points.device`.
    """
    n, d = points.shape
    m = min(int(m), n)
    dev = points.device
    if m <= 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    if points.dtype != torch.float32:
        raise TypeError(f"greedy_kcenter needs float32 points, got {points.dtype}")
    principal_rotation(points)
    k = min(low_dims, d)
    lo = points[:, :k].contiguous()  # contiguous: the per-step pass streams it
    hi = points[:, k:]  # only rows that pass the bound are read
    sq_lo, sq_hi = _sqnorms(lo), _sqnorms(hi)
    # The expansion |a|^2 + |b|^2 - 2ab leaves a rounding residue of a few float32 epsilons times
    # |a|^2 + |b|^2 where a row equals the centre; without this, duplicates of a centre (identical cells
    # of static footage) looked farther than 0 on some CPUs and were picked as new centres.
    tol = (sq_lo + sq_hi).mul_(DUPLICATE_RTOL)
    nb = -(-n // BLOCK)
    mind = torch.full((nb * BLOCK,), math.inf, dtype=torch.float32, device=dev)
    mind[n:] = -math.inf  # padding: never the farthest
    blocks = mind.view(nb, BLOCK)
    bmax = blocks.amax(1)
    picks = torch.empty(m, dtype=torch.long, device=dev)
    c = int(start)
    for t in range(m):
        picks[t] = c
        cl, ch = lo[c], hi[c]
        dl = torch.addmv(sq_lo, lo, cl, alpha=-2.0).add_(sq_lo[c])
        live = mind[:n]
        cand = torch.nonzero(dl < live).flatten()
        if len(cand) > n // 4:  # early steps: nearly every row is affected, stream hi as well
            d2 = dl.add_(torch.addmv(sq_hi, hi, ch, alpha=-2.0)).add_(sq_hi[c]).clamp_min_(0.0)
            d2.masked_fill_(d2 <= tol + tol[c], 0.0)
            torch.minimum(live, d2, out=live)
            mind[c] = 0.0
            bmax = blocks.amax(1)
        else:
            d2 = torch.addmv(sq_hi[cand], hi.index_select(0, cand), ch, alpha=-2.0)
            d2.add_(dl[cand]).add_(sq_hi[c]).clamp_min_(0.0)
            d2.masked_fill_(d2 <= tol[cand] + tol[c], 0.0)
            mind[cand] = torch.minimum(mind[cand], d2)
            mind[c] = 0.0  # the centre itself, whatever the rounding of the expansion
            touched = torch.unique(torch.cat([cand, cand.new_tensor([c])]) // BLOCK)
            bmax[touched] = blocks[touched].amax(1)
        if t + 1 < m:
            b = int(torch.argmax(bmax))
            if float(bmax[b]) <= 0.0:
                return picks[: t + 1]
            c = b * BLOCK + int(torch.argmax(blocks[b]))
    return picks


def greedy_kcenter_reference(x: np.ndarray, m: int, start: int) -> np.ndarray:
    """The textbook greedy loop in float64, every step over every point: what `greedy_kcenter` must pick
    (tests and benchmarks/coreset_check.py compare against it)."""
    x = x.astype(np.float64)
    mind = np.full(len(x), np.inf)
    picks, c = [], start
    for _ in range(m):
        picks.append(c)
        mind = np.minimum(mind, ((x - x[c]) ** 2).sum(1))
        c = int(np.argmax(mind))
    return np.array(picks)


def coreset_size(total: int, fraction: float, candidates: int, max_size: int | None = None, min_size: int = 1) -> int:
    """`fraction` of the `total` patch features, at most `max_size`, but never below `min_size`; at most
    `candidates` in any case.

    `build_coreset` passes one frame's cells (grid^2) as `min_size`: a fixed camera's normal view alone has
    that many distinct patches, so a smaller coreset (1 % of a short bank, or a `max_size` below grid^2 at a
    fine grid) cannot even cover the static scene, and every normal frame would look anomalous where the
    coreset has no feature of its background. `max_size` bounds the scoring cost; the floor is correctness.
    """
    m = int(math.ceil(fraction * total))
    if max_size is not None:
        m = min(m, max_size)
    return max(1, min(candidates, max(m, int(min_size))))


def candidate_indices(total: int, max_features: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices (frame * cells + cell) of the selection candidates."""
    if max_features is None or total <= max_features:
        return np.arange(total, dtype=np.int64)
    return np.sort(rng.choice(total, size=max_features, replace=False)).astype(np.int64)


def project_candidates(
    pixel_path: Path,
    shape: tuple[int, int, int],
    flat: np.ndarray,
    projection: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """float32 [len(flat), d] on `device`: the candidates' features times `projection` [C, d].

    float32 rather than float16 although it is twice the memory: on a CPU, converting float16 rows to
    float32 at every greedy step costed several times the step's own arithmetic (measured).

    Reads pixel.f16 sequentially, FRAME_CHUNK frames at a time, with plain reads into fresh buffers:
    mapped pages would count towards the fit's RSS.
    """
    n, cells, c = shape
    d = c if projection is None else projection.shape[1]
    out = torch.empty(len(flat), d, dtype=torch.float32, device=device)
    proj = None if projection is None else projection.to(device)
    row_bytes = cells * c * 2
    for f0 in range(0, n, FRAME_CHUNK):
        f1 = min(n, f0 + FRAME_CHUNK)
        lo, hi = np.searchsorted(flat, [f0 * cells, f1 * cells])
        if lo == hi:
            continue
        block = np.fromfile(pixel_path, dtype=np.float16, count=(f1 - f0) * cells * c, offset=f0 * row_bytes)
        rows = torch.from_numpy(block.reshape(-1, c)[flat[lo:hi] - f0 * cells]).to(device)
        out[lo:hi] = rows.float() @ proj if proj is not None else rows.float()
    return out


def read_rows(pixel_path: Path, shape: tuple[int, int, int], flat: np.ndarray) -> np.ndarray:
    """float16 [len(flat), C]: single patch features, by flat index, with positioned reads."""
    _, _, c = shape
    out = np.empty((len(flat), c), dtype=np.float16)
    row = c * 2
    fd = os.open(pixel_path, os.O_RDONLY)
    try:
        for j in np.argsort(flat, kind="stable"):
            buf = os.pread(fd, row, int(flat[j]) * row)
            if len(buf) != row:
                raise OSError(f"{pixel_path}: short read at feature {int(flat[j])}")
            out[j] = np.frombuffer(buf, dtype=np.float16)
    finally:
        os.close(fd)
    return out


def build_coreset(
    pixel_path: Path,
    shape: tuple[int, int, int],
    *,
    fraction: float,
    max_size: int | None,
    projection_dim: int | None,
    max_features: int | None,
    seed: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Select the coreset of a bank's pixel.f16 [N, cells, C].

    Returns (float16 [M, C] original features, int32 [M, 2] (bank frame, cell) of each, statistics).
    """
    n, cells, c = shape
    total = n * cells
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    flat = candidate_indices(total, max_features, rng)
    projection = None
    if projection_dim is not None and projection_dim < c:
        gen = torch.Generator().manual_seed(seed)
        projection = torch.randn(c, projection_dim, generator=gen) / math.sqrt(projection_dim)
    points = project_candidates(Path(pixel_path), shape, flat, projection, device)
    t1 = time.perf_counter()
    m = coreset_size(total, fraction, len(flat), max_size, min_size=cells)
    start = int(rng.integers(len(flat)))
    picks = greedy_kcenter(points, m, start).cpu().numpy()
    del points
    t2 = time.perf_counter()
    chosen = flat[picks]
    feats = read_rows(Path(pixel_path), shape, chosen)
    index = np.stack([chosen // cells, chosen % cells], axis=1).astype(np.int32)
    stats = {
        "size": int(len(chosen)),
        "candidates": int(len(flat)),
        "features": int(total),
        "projected_dim": int(projection.shape[1]) if projection is not None else int(c),
        "device": str(device),
        "project_s": round(t1 - t0, 2),
        "select_s": round(t2 - t1, 2),
        "total_s": round(time.perf_counter() - t0, 2),
    }
    return feats, index, stats
