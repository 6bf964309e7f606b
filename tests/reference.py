"""Plain reference implementations the product does not use, kept for tests and benchmarks: the Gaussian
blur and the spatial-window mask that detector/anomaly_map.py and SpadeScorer.windowed_distances replace
with faster equivalents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detector.anomaly_map import gaussian_kernel1d


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian on [B, H, W] with reflected borders (scipy.ndimage.gaussian_filter's mode)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = (k.numel() - 1) // 2
    x = maps.unsqueeze(1)
    h, w = x.shape[-2:]
    if r < h and r < w:
        x = F.pad(x, (r, r, 0, 0), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, r, r), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, -1, 1))
    else:  # tiny maps: replicate padding is always defined
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def window_mask(grid: int, radius: int, device) -> torch.Tensor:
    """bool [g*g, g*g]: True where two cells are at most `radius` cells apart (Chebyshev distance)."""
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    y, x = yy.reshape(-1), xx.reshape(-1)
    near = ((y[:, None] - y[None, :]).abs() <= radius) & ((x[:, None] - x[None, :]).abs() <= radius)
    return near.to(device)
