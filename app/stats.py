"""Per-camera counters and rates the pipeline keeps, read by the progress display and /metrics."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CameraStats:
    camera: str
    processed: int = 0
    alerts_opened: int = 0
    status: str = "connecting"
    last_publish: float = 0.0
    _times: deque = field(default_factory=lambda: deque(maxlen=256))
    _latency: deque = field(default_factory=lambda: deque(maxlen=2048))

    def record(self, latency_s: float, now: float) -> None:
        self.processed += 1
        self._times.append(now)
        self._latency.append(latency_s)
        self.last_publish = now

    def fps(self, now: float | None = None, window_s: float = 5.0) -> float:
        now = time.monotonic() if now is None else now
        ts = [t for t in self._times if now - t <= window_s]
        if len(ts) < 2:
            return 0.0
        return (len(ts) - 1) / max(ts[-1] - ts[0], 1e-6)

    def latency_ms(self, q: float = 0.5) -> float | None:
        """The q-quantile of the latest capture-to-publish latencies; None before the first frame."""
        if not self._latency:
            return None
        return float(np.quantile(np.fromiter(self._latency, float), q) * 1000.0)


class PipelineStats:
    """Thread-safe registry of CameraStats plus pipeline-wide stage timings."""

    def __init__(self):
        self._lock = threading.Lock()
        self.cameras: dict[str, CameraStats] = {}
        self.stage_s: dict[str, float] = {}
        self.batches = 0
        self.frames = 0
        self.started = time.monotonic()

    def camera(self, name: str) -> CameraStats:
        with self._lock:
            st = self.cameras.get(name)
            if st is None:
                st = self.cameras[name] = CameraStats(name)
            return st

    def add_stage(self, name: str, seconds: float) -> None:
        with self._lock:
            self.stage_s[name] = self.stage_s.get(name, 0.0) + seconds

    def stage_ms_per_frame(self) -> dict[str, float]:
        with self._lock:
            n = max(self.frames, 1)
            return {k: v * 1000.0 / n for k, v in self.stage_s.items()}
