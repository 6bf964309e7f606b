"""AlertTracker: hysteresis, minimum durations, update rules, shutdown — on synthetic score sequences."""

from __future__ import annotations

import numpy as np
import pytest

from configs.schema import AlertsConfig
from detector.result import FrameResult, Region
from sinks.alerts import AlertTracker, regions_changed, thresholds
from sinks.schema import alert_message
from stream.frame import Frame

DT = 0.125  # exact in binary: durations compare without rounding surprises
IMG = np.zeros((48, 64, 3), np.uint8)
BOX = Region(10, 10, 30, 30, 2.0, 1.5, 300)


def make(camera, i, score, threshold=1.0, regions=None, t0=1000.0):
    ts = t0 + i * DT
    res = FrameResult(
        camera, i, ts, float(score), threshold, np.zeros((8, 8), np.float32), list(regions or []), (64, 48)
    )
    return res, Frame(camera, i, ts, IMG)


def run(tracker, scores, camera="cam", regions=None, start=0):
    events = []
    for k, s in enumerate(scores):
        regs = regions(k) if callable(regions) else regions
        events += tracker.update(*make(camera, start + k, s, regions=regs))
    return events


CFG = AlertsConfig(min_duration_s=0.5, exit_duration_s=1.0, update_interval_s=0.5)


def test_lifecycle_new_update_end_with_hysteresis():
    tr = AlertTracker(CFG)
    scores = (
        [0.2] * 10  # calm
        + [1.5] * 8  # 1 s above enter (1.0): opens after 0.5 s
        + [1.5, 1.8, 2.2, 2.6, 3.0, 3.0, 3.0, 3.0]  # rising peak: updates, rate limited
        + [0.95] * 16  # between exit (0.9) and enter: stays open (hysteresis)
        + [0.5] * 12  # below exit for 1.5 s: ends after 1.0 s
        + [0.2] * 4
    )
    events = run(tr, scores, regions=[BOX])
    types = [e.type for e in events]
    assert types[0] == "new" and types[-1] == "end"
    assert set(types[1:-1]) == {"update"} and len(types) >= 3
    assert len({e.alert_id for e in events}) == 1

    new, end = events[0], events[-1]
    assert new.start_ts == 1000.0 + 10 * DT  # first frame of the run above enter
    assert new.frame_index == 14  # 0.5 s (4 frames) later
    assert end.reason == "recovered"
    assert end.end_ts == 1000.0 + 42 * DT  # first frame below exit
    assert end.frame_index == 50  # 1.0 s (8 frames) after that
    assert end.peak_score == 3.0 and end.start_ts == new.start_ts
    # the peak only grows, and updates are at least update_interval_s apart
    peaks = [e.peak_score for e in events]
    assert peaks == sorted(peaks)
    upd_idx = [e.frame_index for e in events if e.type != "end"]
    assert all((b - a) * DT >= 0.5 for a, b in zip(upd_idx, upd_idx[1:]))
    assert tr.open_alerts() == {}


def test_short_spike_never_alerts():
    tr = AlertTracker(CFG)
    # 3 frames (0.375 s < 0.5 s) above enter, twice, separated by a dip
    events = run(tr, [0.1] * 5 + [5.0] * 3 + [0.1] + [5.0] * 3 + [0.1] * 10)
    assert events == []


def test_dip_below_exit_shorter_than_exit_duration_keeps_alert_open():
    tr = AlertTracker(CFG)
    events = run(tr, [2.0] * 8 + [0.1] * 4 + [2.0] * 8 + [0.1] * 9)
    assert [e.type for e in events] == ["new", "end"]


def test_zero_durations_open_and_close_immediately():
    tr = AlertTracker(AlertsConfig(min_duration_s=0, exit_duration_s=0))
    events = run(tr, [0.1, 2.0, 0.1])
    assert [(e.type, e.frame_index) for e in events] == [("new", 1), ("end", 2)]


def test_shutdown_and_source_ended_close_open_alerts():
    tr = AlertTracker(CFG)
    run(tr, [2.0] * 10, camera="a")
    run(tr, [2.0] * 10, camera="b")
    assert set(tr.open_alerts()) == {"a", "b"}

    ended = tr.close("source_ended", camera="a")
    assert [(e.camera, e.type, e.reason) for e in ended] == [("a", "end", "source_ended")]
    assert ended[0].end_ts == 1000.0 + 9 * DT  # last frame seen
    assert tr.peak(ended[0].alert_id) is not None  # still available for the final snapshot

    ended = tr.close("shutdown")
    assert [(e.camera, e.reason) for e in ended] == [("b", "shutdown")]
    assert tr.close("shutdown") == []


def test_region_change_triggers_update_same_regions_do_not():
    tr = AlertTracker(CFG)
    steady = run(tr, [2.0] * 30, regions=[BOX])
    assert [e.type for e in steady] == ["new"]

    tr = AlertTracker(CFG)
    moved = Region(40, 20, 60, 40, 2.0, 1.5, 300)
    events = run(tr, [2.0] * 30, regions=lambda k: [BOX] if k < 12 else [BOX, moved])
    assert [e.type for e in events] == ["new", "update"]
    assert events[1].frame_index == 12 and len(events[1].regions) == 2


def test_small_box_jitter_is_not_material():
    a = Region(10, 10, 50, 50, 2.0, 1.0, 1600)
    b = Region(11, 12, 51, 50, 2.1, 1.0, 1600)
    assert not regions_changed([a], [b], 0.5)
    assert regions_changed([a], [], 0.5)
    assert regions_changed([a], [Region(60, 60, 90, 90, 2.0, 1.0, 900)], 0.5)


def test_update_rate_limit_coalesces_but_does_not_lose_the_rise():
    tr = AlertTracker(CFG)
    events = run(tr, [2.0] * 4 + [2.0, 5.0] + [5.0] * 8)
    # new at frame 4 (0.5 s); the jump at frame 5 is inside the quiet interval -> reported at frame 8
    assert [(e.type, e.frame_index) for e in events] == [("new", 4), ("update", 8)]
    assert events[1].peak_score == 5.0


def test_thresholds_defaults_and_clamp():
    res, _ = make("c", 0, 0.0, threshold=2.0)
    assert thresholds(AlertsConfig(), res) == (2.0, pytest.approx(1.8))
    res, _ = make("c", 0, 0.0, threshold=-1.0)  # normalised scores: exit still below enter
    enter, exit_ = thresholds(AlertsConfig(), res)
    assert enter == -1.0 and exit_ == pytest.approx(-1.1)
    assert thresholds(AlertsConfig(enter_threshold=3.0, exit_threshold=2.5), res) == (3.0, 2.5)
    assert thresholds(AlertsConfig(exit_threshold=5.0), res) == (-1.0, -1.0)  # clamped to enter
    with pytest.raises(ValueError):
        AlertsConfig(enter_threshold=1.0, exit_threshold=2.0)


def test_config_thresholds_override_the_frame_threshold():
    tr = AlertTracker(AlertsConfig(enter_threshold=10.0, min_duration_s=0, exit_duration_s=0))
    assert run(tr, [5.0] * 5) == []  # above the frame threshold (1.0) but below the configured one
    assert [e.type for e in run(tr, [11.0], start=5)] == ["new"]


def test_peak_frame_is_kept_for_the_snapshot():
    tr = AlertTracker(CFG)
    events = run(tr, [1.5, 1.6, 4.0, 1.7, 1.5, 1.5])
    assert [e.type for e in events] == ["new"]
    peak = tr.peak(events[0].alert_id)
    assert peak.result.frame_index == 2 and peak.score == 4.0 and peak.frame.index == 2
    v = peak.version
    run(tr, [9.0], start=6)
    assert tr.peak(events[0].alert_id).version > v


def test_alert_ids_unique_and_message_form():
    a, b = AlertTracker(CFG), AlertTracker(CFG)
    ea = run(a, [2.0] * 6)[0]
    eb = run(b, [2.0] * 6)[0]
    assert ea.alert_id != eb.alert_id  # same camera and start time, other run
    assert ea.alert_id.startswith("cam-1000000-")
    msg = alert_message(ea)
    assert msg == {
        "v": 1,
        "type": "new",
        "alert_id": ea.alert_id,
        "camera": "cam",
        "start_ts": 1000.0,
        "end_ts": None,
        "start_media_ts": None,
        "end_media_ts": None,
        "peak_score": 2.0,
        "regions": [],
        "peak_regions": [],
        "snapshot": None,
        "reason": None,
        "frame_index": 4,
    }


def test_timestamps_going_backwards_do_not_wedge_the_tracker():
    tr = AlertTracker(CFG)
    events = run(tr, [2.0] * 6)  # opens
    events += run(tr, [0.1] * 12, start=-100)  # looped file: time jumps back, then recovers
    assert [e.type for e in events] == ["new", "end"]
    events = run(tr, [2.0] * 6, start=500)
    assert [e.type for e in events] == ["new"]


def test_nan_score_counts_as_normal():
    tr = AlertTracker(AlertsConfig(min_duration_s=0, exit_duration_s=0))
    assert run(tr, [float("nan")] * 3) == []
