"""Motion evidence: flow cell features, the per-cell normal-flow model, per-camera previous-frame state."""

import numpy as np
import pytest
import torch

import configs
from detector.motion import FlowExtractor, MotionScorer, build_motion_model, kcenter, window_candidates
from evaluation.run import score_video_batch
from stream.frame import Frame

G = 8
SIZE = 64


def textured(seed=0, size=SIZE):
    rng = np.random.default_rng(seed)
    base = (rng.random((size // 4, size // 4)) * 255).astype(np.uint8)
    return np.kron(base, np.ones((4, 4), np.uint8))


def scene(x, y=24, seed=0, size=SIZE):
    """A textured static background with a bright textured 12x12 square at (x, y); RGB."""
    g = textured(seed, size).copy() // 2
    sq = textured(seed + 1, 12)[:12, :12] // 2 + 128
    g[y : y + 12, x : x + 12] = sq
    return np.repeat(g[:, :, None], 3, axis=2)


def test_flow_of_moving_square_vs_static():
    ext = FlowExtractor(SIZE, G, "medium")
    a, b = scene(20), scene(23)
    static = ext(ext.gray(a), ext.gray(a))
    moving = ext(ext.gray(a), ext.gray(b))
    assert np.abs(static).max() < 0.2
    cell = moving[3, 2:4]  # cells covering the square (rows 24..36, cols 20..35 at 8 px per cell)
    assert cell[..., 0].max() > 1.0, cell  # moves right: dx > 0
    assert np.abs(moving[0, :, :2]).max() < 0.3  # top row of the grid is background: no flow
    assert (ext(None, ext.gray(a)) == 0).all()  # no previous frame: zero flow


def test_window_candidates_and_kcenter():
    f = torch.zeros(2, G, G, 3)
    f[1, 4, 4] = torch.tensor([1.0, 0.0, 1.0])
    cand = window_candidates(f, 1)
    assert cand.shape == (G * G, 2 * 9, 3)
    assert (cand[4 * G + 5].abs().sum(-1) > 0).sum() == 1  # (4,5) sees the moving (4,4) in its window
    assert (cand[4 * G + 6].abs().sum(-1) > 0).sum() == 0  # (4,6) is two cells away: does not
    pts = torch.tensor([[[0.0, 0, 0], [5, 0, 5], [5.1, 0, 5.1], [0, -3, 3]]])
    cs = kcenter(pts, 3)
    assert torch.allclose(cs[0, 0], torch.zeros(3))  # zero first
    chosen = {tuple(round(float(v), 1) for v in c) for c in cs[0, 1:]}
    assert chosen == {(5.1, 0.0, 5.1), (0.0, -3.0, 3.0)}  # farthest first, then the other cluster


def test_motion_model_flags_unseen_direction_and_speed_here():
    # normal footage: cell (4,4) sees rightward motion of 2 px/frame, everything else static
    n = 20
    feats = np.zeros((n, G, G, 3), np.float32)
    feats[::2, 4, 4] = [2.0, 0.0, 2.0]
    model = build_motion_model(feats, window=0, centres=8)
    sc = MotionScorer(model, G, torch.device("cpu"))
    q = np.zeros((3, G, G, 3), np.float32)
    q[0, 4, 4] = [2.0, 0.0, 2.0]  # normal motion, normal place
    q[1, 4, 4] = [-2.0, 0.0, 2.0]  # wrong way, same place
    q[2, 1, 1] = [2.0, 0.0, 2.0]  # normal motion where nothing ever moves
    d = sc.score(q).numpy()
    assert d[0].max() < 1e-5
    assert d[1, 4, 4] > 2.5  # nearest normal vector is standing still: |(-2, 0, 2)| = 2.83
    assert d[2, 1, 1] > 2.5
    assert d[:, 0, 0].max() < 1e-6  # static is always normal


def small_cfg(**det):
    tree = {
        "detector": {
            "backbone": {"name": "resnet18", "weights": "random"},
            "input_size": 64,
            "grid": 8,
            "batch_size": 4,
            "motion": {"enabled": True, "flow_size": 64, "preset": "medium"},
            **det,
        },
        "bank": {"holdout": 0.25, "max_frames": None},
    }
    return configs.parse(tree)


@pytest.fixture
def motion_bank(tmp_path):
    """Normal footage: a square moving right at 3 px/frame along one row; fit with motion on."""
    import cv2

    d = tmp_path / "normal" / "cam"
    d.mkdir(parents=True)
    for i in range(24):
        img = scene(4 + 3 * (i % 14))
        cv2.imwrite(str(d / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    from detector.fit import fit_bank

    cfg = small_cfg()
    fit_bank(cfg, tmp_path / "normal", tmp_path / "bank", progress=False)
    return cfg, tmp_path / "bank"


def test_detector_keeps_previous_frame_per_camera(motion_bank):
    from detector.detector import Detector

    cfg, bank = motion_bank
    det = Detector.load(cfg, bank)
    assert det.bank.motion_model is not None and "motion_max" in det.thresholds.calibration["holdout_components"]
    right = [scene(10), scene(13)]  # normal direction and speed
    left = [scene(13), scene(10)]  # the same square walking the wrong way
    fr = lambda cam, i, img: Frame(cam, i, float(i), img)  # noqa: E731
    # interleaved cameras: each camera's flow must come from its own previous frame
    r = det.score_batch(
        [fr("A", 0, right[0]), fr("B", 0, left[0]), fr("A", 1, right[1]), fr("B", 1, left[1])], all_components=True
    ).results()
    a1, b1 = r[2].components["motion_max"], r[3].components["motion_max"]
    assert r[0].components["motion_max"] == pytest.approx(r[1].components["motion_max"])  # first: no flow
    assert b1 > 10 * a1 + 0.3, (a1, b1)  # map values are blurred: the peak is below the cell distance
    # explicit previous frames (offline eval with --every N) give the same evidence and leave state alone
    _, comps, _ = score_video_batch(det, "C", [left[1]], [left[0]])
    assert comps["motion_max"][0] == pytest.approx(b1, rel=1e-4)
    assert "C" not in det.camera_states.previous
