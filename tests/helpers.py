"""Shared helpers of the pipeline-level tests: synthetic scenes, H.264 clips, a small config, a fitted
bank shared by every test module of a session, and `run` / `run_until` drivers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import av
import numpy as np

import configs
from app.pipeline import Pipeline
from detector.detector import Detector
from detector.fit import fit_bank
from sinks import build_sinks

W, H = 192, 128
ANOMALY = (24, 44)  # frames [a, b) carry the anomalous object


def scene(n, seed=0, anomaly=None, noise_seed=1, wrap=False):
    """A static textured scene with sensor noise; optionally a checkered square crossing it."""
    rng = np.random.default_rng(seed)
    base = rng.random((H // 8, W // 8, 3))
    import cv2

    bg = (cv2.resize(base, (W, H), interpolation=cv2.INTER_CUBIC) * 120 + 60).clip(0, 255)
    noise = np.random.default_rng(noise_seed)
    for i in range(n):
        img = bg * noise.uniform(0.97, 1.03) + noise.normal(0, 4.0, bg.shape)
        if anomaly and anomaly[0] <= i < anomaly[1]:
            x = 8 + (i - anomaly[0]) * 6
            if wrap:
                x = 8 + x % (W - 40)
            sq = np.indices((24, 24)).sum(0) // 4 % 2 * 255.0
            img[40:64, x : x + 24] = sq[..., None] * np.array([1.0, 0.2, 0.1])
        yield img.clip(0, 255).astype(np.uint8)


def write(path, frames, fps=24):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "18", "preset": "ultrafast"}
        n = 0
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
            n += 1
        for p in s.encode():
            c.mux(p)
    return n


def base_cfg(**pipeline):
    return configs.parse(
        {
            "detector": {
                "backbone": {"name": "efficientnet_lite0"},
                "input_size": 128,
                "grid": 16,
                "batch_size": 8,
                "frame_score": "map_max",
                "smooth_window": 1,
            },
            "bank": {"holdout": 0.25, "max_frames": None, "target_false_alarms_per_hour": 1.0},
            "regions": {"min_area": 16},
            "alerts": {"min_duration_s": 0.1, "exit_duration_s": 0.2},
            "pipeline": {"max_batch": 4, "max_wait_ms": 10, "progress": False, **pipeline},
        }
    )


class DetectorThreadOnly:
    """The real detector (a detector.contract.LiveDetector) that prepares nothing on the source threads:
    `prepare` gives None and there is no flow tracker, so the model inputs and the optical flow are made
    on the detector thread (in `score_batch`) instead. Every frame component is computed."""

    def __init__(self, det):
        self.det = det

    @property
    def source_fps(self) -> float:
        return self.det.source_fps

    def prepare(self, picture):
        return None

    def flow_tracker(self):
        return None

    def warm_up(self, batch):
        self.det.warm_up(batch)

    def score_batch(self, frames):
        return self.det.score_batch(frames, all_components=True)


def run(cfg, bank, out, sources, duration=None, detector=None):
    cfg.sources = sources
    det = detector or Detector.load(cfg, bank)
    sinks = build_sinks(cfg.sinks, cfg.alerts, out)
    pipe = Pipeline(cfg, det, sinks)
    return pipe, pipe.run(duration_s=duration, progress=False)


def run_until(cfg, bank, out, sources, done, timeout=90.0, detector=None):
    """Run until `done(pipe)` holds (or `timeout`): tests stay correct on a slow or loaded machine."""
    cfg.sources = sources
    det = detector or Detector.load(cfg, bank)
    pipe = Pipeline(cfg, det, build_sinks(cfg.sinks, cfg.alerts, out))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", pipe.run(duration_s=timeout, progress=False)))
    t.start()
    while t.is_alive() and not done(pipe):
        time.sleep(0.05)
    pipe.stop()
    t.join(timeout=30)
    return pipe, box["s"]


def records(path: Path, kind: str):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def wait_for(cond, timeout=60.0, interval=0.05, what="condition"):
    """Poll `cond()` until true; AssertionError naming `what` after `timeout` s (generous: loaded CI)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


_SHARED: dict = {}


def shared_env(tmp_path_factory):
    """Normal footage, test clips and a bank fitted with `base_cfg()`, built once per session:
    clip.mp4 (64 frames, one anomaly ANOMALY), plain.mp4 (30 normal frames), two.mp4 (130 frames,
    anomalies TWO_ANOMALIES), long_anomaly.mp4 (64 frames, object present from frame 8 to the end)."""
    if "env" not in _SHARED:
        d = tmp_path_factory.mktemp("shared_env")
        (d / "normal").mkdir()
        write(d / "normal" / "n.mp4", scene(80, seed=0))
        write(d / "clip.mp4", scene(64, seed=0, anomaly=ANOMALY, noise_seed=2))
        write(d / "plain.mp4", scene(30, seed=0, noise_seed=3))
        write(d / "two.mp4", scene2(130, TWO_ANOMALIES, noise_seed=4))
        write(d / "long_anomaly.mp4", scene(64, seed=0, anomaly=(8, 64), noise_seed=5, wrap=True))
        fit_bank(base_cfg(), d / "normal", d / "bank", progress=False)
        _SHARED["env"] = d
    return _SHARED["env"]


TWO_ANOMALIES = ((24, 44), (84, 104))


def scene2(n, anomalies, seed=0, noise_seed=1):
    """`scene` with several anomalous intervals."""
    frames = [list(scene(n, seed=seed, anomaly=a, noise_seed=noise_seed)) for a in anomalies]
    for i in range(n):
        k = next((j for j, a in enumerate(anomalies) if a[0] <= i < a[1]), 0)
        yield frames[k][i]
