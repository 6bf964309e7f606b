"""Frame scores: region scores, held-out normalisation, calibration from held-out frames only, smoothing,
and the realised false-alarm rate reported by eval."""

import numpy as np
import pytest

import configs
from detector import framescore
from evaluation.run import false_alarm_rate


def test_region_score_is_size_times_excess():
    maps = np.zeros((3, 64, 64), np.float32)
    maps[1, 10:14, 10:14] = 2.0  # 16 px at excess 1
    maps[2, 10:14, 10:14] = 2.0
    maps[2, 40:48, 40:48] = 1.5  # 64 px at excess 0.5 = 32: the larger evidence wins
    r = framescore.region_scores(maps, 1.0, stride=1)
    assert r[0] == 0 and r[1] == pytest.approx(16) and r[2] == pytest.approx(32)


def test_combined_uses_held_out_stats_only():
    stats = {"a": {"mean": 10.0, "std": 2.0}, "b": {"mean": 0.0, "std": 0.5}}
    comps = {"a": np.array([10.0, 14.0]), "b": np.array([0.0, 0.5])}
    z = framescore.combine(comps, ["a", "b"], stats)
    assert z == pytest.approx([0.0, (2.0 + 1.0) / 2])
    # the result of a frame does not depend on the other test frames scored with it
    z1 = framescore.combine({k: v[1:] for k, v in comps.items()}, ["a", "b"], stats)
    assert z1[0] == pytest.approx(z[1])
    # a component constant on normal footage (std 0) gets a floor instead of exploding
    zc = framescore.combine({"c": np.array([1.0])}, ["c"], {"c": {"mean": 0.0, "std": 1e-12}})
    assert zc[0] == pytest.approx(1000.0)
    with pytest.raises(KeyError):
        framescore.combine(comps, ["a", "missing"], stats)


def test_causal_smoothing_per_camera_and_per_item():
    sm = framescore.CausalSmoother(3)
    assert [sm("A", v) for v in (3, 6, 9, 12)] == [3, 4.5, 6, 9]
    assert sm("B", 100) == 100  # another camera has its own window
    x = framescore.causal_mean(np.array([1.0, 3.0, 10.0, 20.0]), 2, groups=np.array([0, 0, 1, 1]))
    assert x.tolist() == [1.0, 2.0, 10.0, 15.0]  # restarts with each held-out item


def test_false_alarm_rate_counts_rising_edges_in_normal_stretches():
    s = np.array([0, 5, 5, 0, 5, 0, 9, 9, 0, 5], float)
    lab = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 0])
    fa = false_alarm_rate([s], [lab], thr=1.0, fps=10.0)
    # normal stretches [0..5] (edges at 1 and 4) and [8..9] (edge at 9); anomalous frames do not count
    assert fa["false_alarms"] == 3
    assert fa["normal_hours"] == pytest.approx(8 / 10 / 3600)
    assert fa["false_alarms_per_hour"] == pytest.approx(3 / (8 / 10 / 3600))
    # as alarms (runs of frames above, runs within `run` frames of each other counting once): the edges at
    # 1 and 4 are 2 frames apart, one alarm with run=2, two with run=1
    assert fa["alarms"] == 3
    assert false_alarm_rate([s], [lab], thr=1.0, fps=10.0, run=2)["alarms"] == 2


def test_threshold_follows_frame_score_and_smoothing(tmp_path):
    """The calibrated threshold is computed from the stored held-out sequences for the configured score."""
    from detector.thresholds import Thresholds

    class FakeBank:
        directory = tmp_path
        rng = np.random.default_rng(0)
        calibration = {
            "fps": 25.0,
            "target_false_alarms_per_hour": 1.0,
            "holdout_items": [0] * 200,
            "holdout_components": {"map_max": list(rng.normal(10, 1, 200)), "topq": list(rng.normal(5, 0.5, 200))},
        }

    def thr(**det):
        cfg = configs.parse({"detector": {"smooth_window": 1, **det}})
        return Thresholds(cfg, FakeBank()).frame

    t_max = thr(frame_score="map_max")
    assert 13 < t_max < 16  # mean 10, std 1, z ~ 4.3
    t_comb = thr(frame_score="combined", combine=["map_max", "topq"])
    assert 2.5 < t_comb < 5  # z-score units
    # smoothing averages the noise away: a lower threshold for the smoothed score
    assert thr(frame_score="map_max", smooth_window=9) < t_max - 1.5
    # a score that was never calibrated is refused rather than given a wrong threshold
    from configs.errors import UserError

    with pytest.raises(UserError):
        thr(frame_score="regions")
