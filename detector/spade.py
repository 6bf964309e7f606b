"""SPADE scoring (Cohen & Hoshen 2020), batched and device-agnostic.

Image score: mean squared L2 distance from a frame's global feature to its `k_image` nearest bank frames.
Pixel map: for every grid cell, the mean L2 distance to the `kappa` nearest features among all grid
cells of the `k_gallery` nearest bank frames; upsampled to the input size and Gaussian-smoothed.
With gallery "coreset" (PatchCore-style) the candidates are the bank's coreset instead: one fixed set
of patch features drawn from every bank frame (detector/coreset.py), resident on the device.

All distances are taken over the channel axis of [N, C] matrices. (The popular reference code calls
torch.pairwise_distance on 4-D tensors, which on current PyTorch reduces over the last spatial axis.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from configs.errors import UserError
from detector.anomaly_map import upsample_blur_operator
from detector.bank import MemoryBank

# Elements of one [query cells x coreset features] block of the coreset search (64 MB in float32).
CORESET_BLOCK = 1 << 24
# Elements of the reused [cells x candidates] product of the frame gallery (16 MB in float32): four
# frames of SPADE's 32x32 grid per GEMM.
PRODUCT_BLOCK = 1 << 22


def squared_distances(q: torch.Tensor, ref: torch.Tensor, ref_sqnorm: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 distances [..., M, N] between rows of q [..., M, C] and ref [..., N, C].

    Expanded as |q|^2 + |r|^2 - 2 q.r so the work is one matrix product; clamped at 0 against rounding.
    """
    if ref_sqnorm is None:
        ref_sqnorm = ref.pow(2).sum(-1)
    d = q.pow(2).sum(-1, keepdim=True) + ref_sqnorm.unsqueeze(-2) - 2.0 * (q @ ref.transpose(-1, -2))
    return d.clamp_min_(0.0)


@dataclass
class SpadeOutput:
    image_scores: torch.Tensor  # [B] mean squared distance to the k_image nearest frames
    neighbours: torch.Tensor  # [B, max(k_image, k_gallery)] bank indices, nearest first
    maps: torch.Tensor  # [B, S, S] float32 anomaly maps at the input resolution (the final pixel map)
    appearance_maps: torch.Tensor | None = None  # [B, S, S] SPADE's map when `maps` also holds motion
    motion_maps: torch.Tensor | None = None  # [B, S, S] distance to normal flow here (flow px / frame)


# `auto` keeps the pixel bank on the device only when it takes at most this share of the GPU's free
# memory: the rest is left to the backbone's activations, which grow with the batch.
RESIDENT_GPU_SHARE = 0.5
RESIDENT_CHUNK_FRAMES = 64  # frames copied per step while loading a resident bank (bounds host RAM)


def pixel_bank_bytes(bank: MemoryBank) -> int:
    g = int(bank.meta["grid"])
    return bank.n_frames * g * g * int(bank.meta["pixel_dim"]) * 2  # fp16


def resolve_pixel_bank(mode: str, bank: MemoryBank, device: torch.device) -> str:
    """'disk' (rows read per batch, RAM stays flat however large the bank) or 'memory' (the whole
    pixel bank resident on the scoring device). `auto`: memory on a GPU where it fits, else disk: on
    a GPU the per-batch reads and host-to-device copies would dominate scoring, while a CPU host is
    exactly where a large bank must not be loaded whole."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "disk"
    free, _total = torch.cuda.mem_get_info(device)
    return "memory" if pixel_bank_bytes(bank) <= RESIDENT_GPU_SHARE * free else "disk"


def load_resident(bank: MemoryBank, device: torch.device) -> torch.Tensor:
    """float16 [N, g*g, C] on `device`, copied in chunks so host memory never holds the whole bank."""
    g, c, n = int(bank.meta["grid"]), int(bank.meta["pixel_dim"]), bank.n_frames
    out = torch.empty((n, g * g, c), dtype=torch.float16, device=device)
    for i in range(0, n, RESIDENT_CHUNK_FRAMES):
        rows = bank.gather(np.arange(i, min(n, i + RESIDENT_CHUNK_FRAMES)))
        out[i : i + len(rows)].copy_(torch.from_numpy(rows))
    return out


class SpadeScorer:
    """Holds the bank's global features on the device; pixel features stay memory-mapped on disk."""

    def __init__(
        self,
        bank: MemoryBank,
        *,
        k_image: int,
        k_gallery: int,
        kappa: int,
        sigma: float,
        input_size: int,
        device: torch.device,
        spatial_window: int | None = None,
        pixel_bank: str = "disk",
        gallery: str = "knn",
        rank_dtype: torch.dtype | None = None,
    ):
        n = bank.n_frames
        self.bank = bank
        self.k_image = min(k_image, n)
        self.k_gallery = min(k_gallery, n)
        self.kappa = kappa
        self.sigma = sigma
        self.input_size = input_size
        self.device = device
        self.grid = int(bank.meta["grid"])
        self.global_feats = torch.from_numpy(bank.global_features).to(device)
        self.global_sqnorm = self.global_feats.pow(2).sum(-1)
        # Position awareness for fixed cameras: a cell may only match gallery cells near its own position.
        self.spatial_window = spatial_window
        self.gallery_kind = gallery
        # None: candidates ranked in float32. A low-precision dtype (bf16 on CPUs with native bf16, where
        # the backbone's features already carry bf16 rounding): the [cells x candidates] product is ranked
        # in that dtype and only the winners' distances are computed exactly (see `pixel_distances`).
        self.rank_dtype = rank_dtype
        self._local = threading.local()  # per-thread product buffers (`_workspace`)
        self.coreset: torch.Tensor | None = None
        self.coreset_sqnorm: torch.Tensor | None = None
        self.coreset_ranked: tuple[torch.Tensor, torch.Tensor] | None = None
        if gallery == "coreset":
            if bank.coreset is None:
                raise UserError(
                    f"{bank.directory}: detector.gallery is 'coreset' but this bank has no coreset "
                    "(fit it again with this config)"
                )
            # float32 on every device: the |r|^2 - 2 q.r expansion loses too much to cancellation in fp16
            self.coreset = torch.from_numpy(np.asarray(bank.coreset)).to(device).float()
            self.coreset_sqnorm = self.coreset.pow(2).sum(-1)
            if rank_dtype is not None:
                self.coreset_ranked = (self.coreset.to(rank_dtype), self.coreset_sqnorm.to(rank_dtype))
            self.kappa = min(kappa, self.coreset.shape[0])
            self.k_gallery = 0  # no gallery frames are read
        # A coreset gallery reads no bank frame's pixels, so they are never loaded then.
        self.pixel_bank = "disk" if gallery == "coreset" else resolve_pixel_bank(pixel_bank, bank, device)
        self.resident = load_resident(bank, device) if self.pixel_bank == "memory" else None

    def nearest_frames(self, glob: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distances [B, k], indices [B, k]) of the k nearest bank frames, nearest first."""
        d = squared_distances(glob.float(), self.global_feats, self.global_sqnorm)
        vals, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
        return vals, idx

    def gallery(self, neighbours: torch.Tensor, as_float: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel features of the union of all neighbour frames of a batch, read once, on the device,
        and each neighbour's row in it ([B, k_gallery]). `as_float=False` keeps the stored float16."""
        if self.resident is not None:  # no host round trip: the union is taken on the device
            uniq, inverse = torch.unique(neighbours[:, : self.k_gallery], return_inverse=True)
            feats = self.resident[uniq]
        else:
            idx = neighbours[:, : self.k_gallery].cpu().numpy()
            uniq, inverse = np.unique(idx, return_inverse=True)
            feats = torch.from_numpy(self.bank.gather(uniq)).to(self.device, non_blocking=True)
            inverse = torch.from_numpy(inverse.reshape(idx.shape)).to(self.device)
        return (feats.float() if as_float else feats), inverse

    def pixel_distances(self, pyramid: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """[B, grid, grid]: mean L2 distance of each cell to its kappa nearest gallery features.

        Candidates are ranked on |r|^2 - 2 q.r alone (|q|^2 is the same for every candidate of a cell): one
        GEMM with the norms as bias, formed a few frames at a time in a reused buffer (`_products`). In
        float32, |q|^2 is then added to the kappa winners' values. With `rank_dtype` (bf16 on CPUs with
        native bf16) the ranking is rounded, which can only swap near-ties: on a real bank the winner
        changed for few cells and the map moved far less than the bf16 backbone itself changes it
        (docs/results.md, "Precision and the frozen trunk"). The winners' distances are then taken exactly,
        never from the product.
        """
        if self.coreset is not None:
            return self.coreset_distances(pyramid)
        if self.spatial_window is not None:
            return self.windowed_distances(pyramid, neighbours)
        b, c, g, _ = pyramid.shape
        gg, k = g * g, self.kappa
        q = pyramid.float().flatten(2).transpose(1, 2).contiguous()  # [B, g*g, C]
        feats, inverse = self.gallery(neighbours, as_float=self.rank_dtype is None)  # [U, g*g, C]
        n = inverse.shape[1] * gg  # candidates per cell: every cell of the k_gallery frames
        sqn = torch.linalg.vector_norm(feats, dim=-1, dtype=torch.float32).pow_(2)  # [U, g*g]
        bias = sqn[inverse].reshape(b, n)
        if self.rank_dtype is None:
            gal = feats[inverse].reshape(b, n, c)
            out = [
                self._distances(
                    prod.amin(dim=-1) if k == 1 else torch.topk(prod, k, dim=-1, largest=False).values, q[s:e]
                )
                for s, e, prod in self._products(q, gal, bias)
            ]
        else:
            rd = self.rank_dtype
            gal = feats.float().to(rd)[inverse].reshape(b, n, c)  # float16 -> bf16 directly is much slower
            flat = feats.reshape(-1, c)
            out = []
            for s, e, prod in self._products(q.to(rd), gal, bias.to(rd)):
                if k == 1:
                    idx = prod.min(dim=-1, keepdim=True).indices  # min(dim) beats argmin and topk on the CPU
                else:
                    idx = torch.topk(prod, k, dim=-1, largest=False, sorted=False).indices
                # candidate j of frame i is cell j % gg of gallery frame inverse[i, j // gg] in `feats`
                frames = inverse[s:e].gather(1, (idx // gg).flatten(1)).view_as(idx)
                out.append(self._exact_distances(q[s:e], flat, frames * gg + idx % gg))
        return (torch.cat(out) if len(out) > 1 else out[0]).reshape(b, g, g)

    def _products(self, q: torch.Tensor, gal: torch.Tensor, bias: torch.Tensor):
        """Yields (start, end, |r|^2 - 2 q.r [end - start, M, N]) over chunks of the batch's frames, each
        in the same buffer: a fresh product for the whole batch (tens of MB) cost more in page faults (glibc
        maps and unmaps buffers that large) than the GEMM itself (docs/history.md, section 2e). Each product
        is overwritten by the next."""
        b, m, n = q.shape[0], q.shape[1], gal.shape[1]
        step = max(1, PRODUCT_BLOCK // (m * n))
        buf = self._workspace(min(b, step) * m * n, q.dtype)
        for s in range(0, b, step):
            e = min(b, s + step)
            prod = buf[: (e - s) * m * n].view(e - s, m, n)
            torch.baddbmm(bias[s:e].unsqueeze(1), q[s:e], gal[s:e].transpose(1, 2), alpha=-2.0, out=prod)
            yield s, e, prod

    def _workspace(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer of at least `numel` elements, kept per thread and dtype between batches."""
        bufs = self._local.__dict__.setdefault("buffers", {})
        buf = bufs.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = bufs[dtype] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    @staticmethod
    def _exact_distances(q: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[..., M]: mean over the last axis of rows [..., M, kappa] of |q - ref[row]|, each difference
        taken directly (no |q|^2 + |r|^2 - 2 q.r cancellation); q: [..., M, C], ref: [R, C]."""
        win = ref.index_select(0, rows.reshape(-1)).view(*rows.shape, ref.shape[-1]).float()
        # in place: the out-of-place difference was several times slower (docs/history.md, section 2e)
        return torch.linalg.vector_norm(win.sub_(q.unsqueeze(-2)), dim=-1).mean(-1)

    def _distances(self, best: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Mean L2 distance of each query row to its kappa winners, from their |r|^2 - 2 q.r values
        (`best`: [..., M] for kappa 1, else [..., M, kappa]); q: [..., M, C]."""
        qn = q.pow(2).sum(-1)
        d2 = (best + (qn if self.kappa == 1 else qn.unsqueeze(-1))).clamp_min_(0.0)
        return d2.sqrt() if self.kappa == 1 else d2.sqrt().mean(-1)

    def coreset_distances(self, pyramid: torch.Tensor) -> torch.Tensor:
        """[B, grid, grid]: mean L2 distance of each cell to its kappa nearest coreset features.

        The same fused |r|^2 - 2 q.r product as the frame gallery, over blocks of the coreset so the
        [cells x features] matrix stays bounded whatever the coreset size, ranked in `rank_dtype` (or float32)
        with a running kappa-best of row indices; the winners' distances are then taken exactly.
        """
        coreset = self.coreset
        assert coreset is not None, "gallery 'coreset' only"
        b, c, g, _ = pyramid.shape
        q = pyramid.float().flatten(2).transpose(1, 2).reshape(b * g * g, c)
        step = max(self.kappa, CORESET_BLOCK // max(q.shape[0], 1))
        return self._exact_distances(q, coreset, self._rank_coreset(q, step)).reshape(b, g, g)

    def _rank_coreset(self, q: torch.Tensor, step: int) -> torch.Tensor:
        """[M, kappa] coreset rows of each query's kappa nearest features, ranked block by block in
        `rank_dtype` (float32 when None), the running best kept by its ranking value."""
        k = self.kappa
        if self.rank_dtype is None:
            ref, sqn, q_r = self.coreset, self.coreset_sqnorm, q
        else:
            assert self.coreset_ranked is not None, "set with rank_dtype"
            (ref, sqn), q_r = self.coreset_ranked, q.to(self.rank_dtype)
        assert ref is not None and sqn is not None, "gallery 'coreset' only"
        vals: torch.Tensor | None = None
        idx: torch.Tensor | None = None
        for s, partial in self._coreset_products(q_r, ref, sqn, step):
            if k == 1:
                cur_v, cur_i = partial.min(dim=1, keepdim=True)
            else:
                cur_v, cur_i = torch.topk(partial, min(k, partial.shape[1]), dim=1, largest=False, sorted=False)
            cur_i = cur_i + s
            if vals is None or idx is None:  # set together: both None only before the first block
                vals, idx = cur_v, cur_i
            else:
                both_v, both_i = torch.cat([vals, cur_v], 1), torch.cat([idx, cur_i], 1)
                pick = (
                    both_v.argmin(1, keepdim=True)
                    if k == 1
                    else torch.topk(both_v, k, dim=1, largest=False, sorted=False).indices
                )
                vals, idx = both_v.gather(1, pick), both_i.gather(1, pick)
        assert idx is not None, "a coreset has at least one feature"
        return idx

    def _coreset_products(self, q: torch.Tensor, ref: torch.Tensor, sqn: torch.Tensor, step: int):
        """Yields (start, |r|^2 - 2 q.r [M, width]) over blocks of `step` coreset features, each in the
        same reused buffer (see `_products`); each block is overwritten by the next."""
        m, n = q.shape[0], ref.shape[0]
        buf = self._workspace(m * min(step, n), q.dtype)
        for s in range(0, n, step):
            w = min(step, n - s)
            prod = buf[: m * w].view(m, w)
            torch.addmm(sqn[s : s + w].unsqueeze(0), q, ref[s : s + w].T, alpha=-2.0, out=prod)
            yield s, prod

    def windowed_distances(self, pyramid: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """Position-aware SPADE: each cell only matches gallery cells within `spatial_window` cells of
        its own position. One shifted copy of the gallery per offset: (2r+1)^2 * k_gallery candidates per
        cell instead of k_gallery * grid^2, so it is also far cheaper than the global correspondence."""
        b, c, g, _ = pyramid.shape
        r = self.spatial_window
        assert r is not None, "called only with a spatial window"
        q = pyramid.float().permute(0, 2, 3, 1).contiguous()  # [B, g, g, C]: reductions over contiguous C
        feats, inverse = self.gallery(neighbours)  # [U, g*g, C]
        u = feats.shape[0]
        gal = feats.reshape(u, g, g, c).permute(0, 3, 1, 2)
        gal = F.pad(gal, (r, r, r, r), value=1e4).permute(0, 2, 3, 1).contiguous()  # outside: never nearest
        gal_sqn = gal.pow(2).sum(-1)  # [U, g+2r, g+2r]
        inv = inverse  # [B, k_gallery]
        cands = []
        for j in range(inv.shape[1]):
            gj, nj = gal[inv[:, j]], gal_sqn[inv[:, j]]
            for dy in range(2 * r + 1):
                for dx in range(2 * r + 1):
                    dot = torch.einsum("bhwc,bhwc->bhw", q, gj[:, dy : dy + g, dx : dx + g])
                    cands.append(nj[:, dy : dy + g, dx : dx + g] - 2.0 * dot)
        d2 = (torch.stack(cands, dim=1) + q.pow(2).sum(-1).unsqueeze(1)).clamp_min_(0.0)  # [B, K*(2r+1)^2, g, g]
        if self.kappa == 1:
            return d2.amin(dim=1).sqrt()
        return torch.topk(d2, self.kappa, dim=1, largest=False).values.sqrt().mean(1)

    def upsample(self, dist: torch.Tensor) -> torch.Tensor:
        """Bilinear upsampling to the input size, then the Gaussian: both linear and separable, so the
        pair is one precomputed [S, g] matrix A applied as A @ dist @ A^T (two small matmuls instead of
        an interpolation and two 33-tap convolutions over the full map)."""
        a = self._upsample_operator(dist.shape[-1], dist.device)
        return a @ dist.float() @ a.T

    def _upsample_operator(self, g: int, device) -> torch.Tensor:
        key = (g, str(device))
        op = getattr(self, "_ops", {}).get(key)
        if op is None:
            op = upsample_blur_operator(g, self.input_size, self.sigma, device)
            self._ops = {**getattr(self, "_ops", {}), key: op}
        return op

    def score(self, pyramid: torch.Tensor, glob: torch.Tensor) -> SpadeOutput:
        k = max(self.k_image, self.k_gallery)
        d2, idx = self.nearest_frames(glob, k)
        image_scores = d2[:, : self.k_image].mean(dim=1)
        maps = self.upsample(self.pixel_distances(pyramid, idx))
        return SpadeOutput(image_scores, idx, maps)
