"""The anomaly map's resampling: SPADE's grid of cell distances, bilinearly upsampled to the input size and
Gaussian-smoothed (sigma 4, reflected borders as scipy.ndimage's default), both done by one precomputed
separable matrix (`upsample_blur_operator`, applied by SpadeScorer.upsample as A @ dist @ A^T)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))  # scipy.ndimage's default truncate=4
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def upsample_blur_operator(g: int, size: int, sigma: float, device) -> torch.Tensor:
    """[size, g]: the 1-D bilinear upsampling (align_corners=False) followed by the 1-D Gaussian with
    reflected borders, i.e. one axis of F.interpolate + a Gaussian blur
    (tests/reference.py: gaussian_blur), as a matrix."""
    eye = torch.eye(g, dtype=torch.float64, device=device)
    up = F.interpolate(eye.view(g, 1, 1, g), size=(1, size), mode="bilinear", align_corners=False).view(g, size)
    if sigma > 0:
        k = gaussian_kernel1d(sigma, device, torch.float64)
        r = (k.numel() - 1) // 2
        mode = "reflect" if r < size else "replicate"
        up = F.conv1d(F.pad(up.unsqueeze(1), (r, r), mode=mode), k.view(1, 1, -1)).squeeze(1)
    return up.T.contiguous().float()
