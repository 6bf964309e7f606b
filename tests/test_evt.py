"""Peaks-over-threshold alarm rates (detector/evt.py) on synthetic scores whose tails are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import genpareto
from scipy.stats import t as student_t

from detector.evt import PotModel, StreamingPot, count_alarms, extremal_index, fit_gpd
from detector.framescore import tail_threshold

FPS = 25.0


def test_exponential_tail_quantile():
    x = np.random.default_rng(0).exponential(1.0, 20000)
    m = PotModel.fit(x, FPS, init_quantile=0.9)
    assert abs(m.xi) < 0.1
    for p in (1e-3, 1e-4, 1e-5):
        assert m.threshold_for_probability(p) == pytest.approx(-math.log(p), rel=0.08)
        assert m.exceedance(-math.log(p)) == pytest.approx(p, rel=0.5)


def test_heavy_gpd_tail_quantile():
    xi = 0.25
    x = genpareto.rvs(xi, size=40000, random_state=np.random.default_rng(1))
    m = PotModel.fit(x, FPS, init_quantile=0.9)
    assert m.xi == pytest.approx(xi, abs=0.08)
    for p in (1e-3, 1e-4):
        truth = ((p) ** (-xi) - 1) / xi
        assert m.threshold_for_probability(p) == pytest.approx(truth, rel=0.15)


def test_fit_gpd_few_excesses_is_exponential():
    xi, sigma = fit_gpd(np.array([1.0, 2.0, 3.0]))
    assert xi == 0.0 and sigma == pytest.approx(2.0)


def test_extremal_index_counts_clusters():
    exceed = np.zeros(100, bool)
    exceed[[10, 11, 12, 13, 50, 51, 90]] = True  # three clusters of 4, 2 and 1 frames
    assert extremal_index(exceed, run=1) == pytest.approx(3 / 7)
    assert extremal_index(exceed, run=50) == pytest.approx(1 / 7)  # a long run joins them all
    assert extremal_index(np.zeros(10, bool), run=1) == 1.0
    assert count_alarms(np.where(exceed, 2.0, 0.0), 1.0, run=1) == 3


def correlated(n, rng, width=10):
    """Normal scores as a video gives them: white noise smoothed over `width` frames (runs of
    exceedances), with a heavy (Student t, 4 d.o.f.) tail."""
    e = student_t.rvs(4, size=n + width, random_state=rng)
    return np.convolve(e, np.ones(width) / width, mode="valid")[:n]


def test_predicted_alarm_rate_matches_the_measured_one_on_a_correlated_stream():
    rng = np.random.default_rng(2)
    held_out = correlated(30000, rng)  # 20 minutes at 25 fps
    live = correlated(2_000_000, rng)  # 22 hours
    hours = len(live) / FPS / 3600
    run = int(FPS)
    pot = PotModel.fit(held_out, FPS, init_quantile=0.95, run=run)
    assert pot.theta < 0.5  # exceedances come in runs
    target = 2.0  # alarms per camera-hour
    thr = pot.threshold_for_rate(target)
    measured = count_alarms(live, thr, run) / hours
    assert target / 2 <= measured <= target * 2, (measured, pot)
    assert pot.predicted_rate(thr) == pytest.approx(target, rel=1e-6)
    # the normal fit of the same held-out scores, as calibration used to do, raises far more alarms
    normal = count_alarms(live, tail_threshold(held_out, target, FPS), run) / hours
    assert normal > 3 * measured, (normal, measured)


def test_streaming_update_follows_a_camera_noisier_than_its_held_out_frames():
    rng = np.random.default_rng(3)
    pot = PotModel.fit(rng.exponential(1.0, 5000), FPS, init_quantile=0.9, theta=1.0)
    target = 36.0  # per hour: p = 4e-4 per frame
    stream = StreamingPot(pot, target, refit_every=200)
    initial = stream.threshold
    live = rng.exponential(1.5, 400_000)  # the live camera's normal scores spread 1.5x wider
    for s in live[:200_000]:
        stream.update(s)
    test = live[200_000:]
    hours = len(test) / FPS / 3600
    before = np.count_nonzero(test > initial) / hours
    after = np.count_nonzero(test > stream.threshold) / hours
    assert stream.threshold > initial
    assert abs(math.log(after / target)) < abs(math.log(before / target)) / 2, (before, after)
    # Scores at or above the alarm threshold are never learnt from (they may be anomalies), so the tail is
    # seen censored and the update stays on the side of more alarms: within 2.5x here, from 13x before.
    assert target <= after <= 2.5 * target, after


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        PotModel.fit(np.array([1.0]), FPS)
    with pytest.raises(ValueError, match="init_quantile"):
        PotModel.fit(np.arange(10.0), FPS, init_quantile=1.0)
    constant = PotModel.fit(np.ones(100), FPS)
    assert constant.threshold_for_rate(1.0) >= 1.0


def test_a_bank_calibrated_by_its_tail_model(env):
    """bank.tail_model chooses the frame threshold from the same held-out scores at load time: 'pot' hits
    the target rate by its own prediction, 'normal' (the default) keeps the normal-fit threshold and
    reports what the tail predicts at it."""
    import configs
    from detector.detector import Detector
    from tests.helpers import base_cfg

    normal = Detector.load(base_cfg(), env / "bank").thresholds
    cfg = base_cfg()
    cfg.bank.tail_model = "pot"
    pot = Detector.load(cfg, env / "bank").thresholds
    target = normal.calibration["target_false_alarms_per_hour"]
    fc_normal, fc_pot = normal.frame_calibration(), pot.frame_calibration()
    assert fc_normal["tail_model"] == "normal" and fc_pot["tail_model"] == "pot"
    assert fc_pot["predicted_alarms_per_hour"] == pytest.approx(target, rel=1e-6)
    assert fc_normal["predicted_alarms_per_hour"] > 0 and math.isfinite(fc_normal["threshold"])
    assert pot.frame == fc_pot["threshold"] != normal.frame
    assert configs.parse({"bank": {"tail_model": "pot"}}).bank.tail_model == "pot"
    with pytest.raises(Exception, match="tail_model"):
        configs.parse({"bank": {"tail_model": "gumbel"}})
