"""Cameras with banks of their own on one live pipeline (sources[].bank, detector/cameras.py)."""

from __future__ import annotations

import numpy as np
import pytest

from app.cli import _apply_cli_overrides, run_pipeline
from configs.errors import UserError
from configs.schema import SourceConfig
from detector.cameras import BankRouter
from detector.detector import Detector
from detector.fit import fit_bank
from stream.avio import VideoInput
from stream.frame import Frame
from stream.picture import Picture
from tests.helpers import base_cfg, records, scene, write


@pytest.fixture(scope="module")
def other_bank(env, tmp_path_factory):
    """A second camera: another scene (seed 1), its own normal footage and bank, and a clip of it."""
    d = tmp_path_factory.mktemp("other_camera")
    (d / "normal").mkdir()
    write(d / "normal" / "n.mp4", scene(80, seed=1))
    write(d / "clip.mp4", scene(24, seed=1, noise_seed=7))
    fit_bank(base_cfg(), d / "normal", d / "bank", progress=False)
    return d


def clip_frames(path, camera, prepare, n=8):
    with VideoInput(str(path), "file") as v:
        imgs = [img for img, _ in v.frames()][:n]
    return [Frame(camera, i, i / 24.0, img, prepare(Picture(img))) for i, img in enumerate(imgs)]


def cfg_with(sources):
    cfg = base_cfg()
    cfg.sources = sources
    return cfg


def test_each_camera_is_scored_against_its_own_bank(env, other_bank):
    cfg = cfg_with(
        [
            SourceConfig(name="a", url=str(env / "clip.mp4")),
            SourceConfig(name="b", url=str(other_bank / "clip.mp4"), bank=str(other_bank / "bank")),
        ]
    )
    dets = BankRouter.for_cameras(cfg, env / "bank")
    assert len(dets.detectors) == 2 and dets.detector_for("a").extractor is dets.detector_for("b").extractor
    a = clip_frames(env / "clip.mp4", "a", dets.prepare)
    b = clip_frames(other_bank / "clip.mp4", "b", dets.prepare)
    mixed = [f for pair in zip(a, b) for f in pair]  # one batch, cameras interleaved
    got = dets.score_batch(mixed).results()
    assert [(r.camera_id, r.frame_index) for r in got] == [(f.camera_id, f.index) for f in mixed]

    alone = {
        cam: Detector.load(base_cfg(), bank).score_batch(frames).results()
        for cam, bank, frames in (("a", env / "bank", a), ("b", other_bank / "bank", b))
    }
    thresholds = {cam: rs[0].pixel_threshold for cam, rs in alone.items()}
    assert thresholds["a"] != thresholds["b"]
    for r in got:
        ref = alone[r.camera_id][r.frame_index]
        assert r.pixel_threshold == thresholds[r.camera_id] and r.threshold == ref.threshold
        assert r.score == pytest.approx(ref.score, rel=1e-3)
        np.testing.assert_allclose(r.anomaly_map, ref.anomaly_map, rtol=1e-3, atol=1e-3 * ref.anomaly_map.max())
    # camera b's normal clip against camera a's bank (another scene) would look anomalous throughout
    wrong = Detector.load(base_cfg(), env / "bank").score_batch(b).results()
    assert min(r.score for r in wrong) > max(r.score for r in got if r.camera_id == "b")


def test_a_camera_without_a_bank_is_refused_by_name(env):
    cfg = cfg_with([SourceConfig(name="gate", url=str(env / "clip.mp4"))])
    with pytest.raises(UserError, match="gate.*no memory bank"):
        BankRouter.for_cameras(cfg, None)
    cfg.sources[0].bank = str(env / "missing_bank")
    with pytest.raises(UserError, match="camera gate: .*missing_bank"):
        BankRouter.for_cameras(cfg, None)


def test_camera_bank_option(env):
    class Args:
        source = [f"a={env / 'clip.mp4'}"]
        camera_bank = [f"a={env / 'bank'}"]

    cfg = _apply_cli_overrides(base_cfg(), Args())
    assert cfg.sources[0].bank == str(env / "bank")
    Args.camera_bank = ["nosuch=banks/x"]
    with pytest.raises(UserError, match="--camera-bank nosuch: no source of that name"):
        _apply_cli_overrides(base_cfg(), Args())
    Args.camera_bank = ["a"]
    with pytest.raises(UserError, match="expected NAME=DIR"):
        _apply_cli_overrides(base_cfg(), Args())


def test_run_with_a_bank_per_camera(env, other_bank, tmp_path):
    cfg = cfg_with(
        [
            SourceConfig(name="a", url=str(env / "clip.mp4"), bank=str(env / "bank")),
            SourceConfig(name="b", url=str(other_bank / "clip.mp4"), bank=str(other_bank / "bank")),
        ]
    )
    summary = run_pipeline(cfg, None, tmp_path, progress=False)
    assert summary.cameras["a"]["processed"] == 64 and summary.cameras["b"]["processed"] == 24
    frames = records(tmp_path / "events.jsonl", "frame")
    thr = {cam: {r["threshold"] for r in frames if r["camera"] == cam} for cam in ("a", "b")}
    assert len(thr["a"]) == len(thr["b"]) == 1 and thr["a"] != thr["b"]  # each camera's calibrated threshold
    assert not any(r["is_anomalous"] for r in frames if r["camera"] == "b")  # b's normal clip, its own bank
