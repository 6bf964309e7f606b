"""Position awareness: SPADE correspondences restricted to a spatial window around the same cell."""

from pathlib import Path

import numpy as np
import pytest
import torch

import configs
from detector.bank import MemoryBank
from detector.spade import SpadeScorer
from tests.reference import window_mask

G, C = 8, 4


def bank_with_pattern():
    """One bank frame: background feature 0 everywhere, a distinctive feature v only at cell (1, 1)."""
    pix = np.zeros((1, G * G, C), np.float16)
    pix[0, 1 * G + 1] = [3, 0, 0, 0]
    return MemoryBank(Path("."), {"n_frames": 1, "grid": G}, np.zeros((1, 2), np.float32), pix)


def scorer(window):
    return SpadeScorer(
        bank_with_pattern(),
        k_image=1,
        k_gallery=1,
        kappa=1,
        sigma=0.0,
        input_size=G,
        device=torch.device("cpu"),
        spatial_window=window,
    )


def query(cell):
    q = torch.zeros(1, C, G, G)
    q[0, 0, cell[0], cell[1]] = 3.0
    return q


def test_window_mask():
    m = window_mask(4, 1, "cpu")
    assert m.shape == (16, 16) and m[0, 5] and not m[0, 2] and m[5, 10] and not m[0, 15]
    assert window_mask(4, 0, "cpu").equal(torch.eye(16, dtype=torch.bool))


def test_normal_patch_in_never_seen_place_is_flagged_only_with_position():
    glob = torch.zeros(1, 2)
    seen = query((1, 1))
    unseen = query((6, 6))
    glob_map = scorer(None).pixel_distances(unseen, torch.zeros(1, 1, dtype=torch.long))
    assert float(glob_map.max()) == pytest.approx(0.0, abs=1e-3)  # global SPADE: seen somewhere, normal
    pos = scorer(1)
    assert float(pos.pixel_distances(seen, torch.zeros(1, 1, dtype=torch.long)).max()) == pytest.approx(0, abs=1e-3)
    d = pos.pixel_distances(unseen, torch.zeros(1, 1, dtype=torch.long))
    assert float(d[0, 6, 6]) == pytest.approx(3.0, rel=1e-3)  # never seen *here*
    assert float(d[0, 2, 2]) == pytest.approx(0.0, abs=1e-3)  # background cells stay normal
    out = pos.score(unseen, glob)
    assert out.maps.shape == (1, G, G)


def test_config_validation():
    configs.parse({"detector": {"gallery": "knn", "spatial_window": 2, "k_gallery": 2, "kappa": 3}})
    with pytest.raises(Exception, match="spatial_window needs gallery: knn"):
        configs.parse({"detector": {"spatial_window": 2}})  # the default gallery is the coreset
    with pytest.raises(Exception):
        configs.parse({"detector": {"gallery": "knn", "spatial_window": 0, "kappa": 2}})  # only one candidate per cell
    with pytest.raises(Exception):
        configs.parse({"detector": {"frame_score": "motion_max"}})  # motion is off
