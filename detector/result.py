"""The one per-frame result type that flows from the detector to the evaluator and every sink."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Region:
    """A connected anomalous region. Box corners are in frame pixels, x2/y2 exclusive."""

    x1: int
    y1: int
    x2: int
    y2: int
    peak: float
    mean: float
    area: int  # frame pixels above the threshold


@dataclass
class FrameResult:
    """Everything known about one scored frame.

    `anomaly_map` is kept at the model's input resolution (square, e.g. 256x256): resizing it to every
    frame's size would cost more than the scoring itself, and sinks that draw need it only once.
    `frame_size` is (width, height) of the original frame, which region boxes refer to.
    """

    camera_id: str
    frame_index: int
    timestamp: float  # the stream's clock (Frame.timestamp): epoch capture time, or media time for files
    score: float  # the frame score used for alerting (see DetectorConfig.frame_score)
    threshold: float  # the frame-score threshold in force when this frame was scored
    anomaly_map: np.ndarray  # float32 [S, S]
    regions: list[Region] = field(default_factory=list)
    frame_size: tuple[int, int] = (0, 0)
    image_score: float = float("nan")  # SPADE's paper image score (kNN over global features)
    components: dict[str, float] = field(default_factory=dict)  # raw evidence behind `score`
    neighbours: np.ndarray | None = None  # bank indices of the k_image nearest frames
    # The region threshold (anomaly map units) of the bank that scored this frame; None: uncalibrated.
    # Each camera may have its own bank, so sinks read it here rather than holding one.
    pixel_threshold: float | None = None
    wall_ts: float | None = None  # Frame.wall_ts: epoch decode time when `timestamp` is media time

    @property
    def epoch_ts(self) -> float:
        """Seconds since the epoch: capture time, or decode time for a recorded file's frame."""
        return float(self.wall_ts) if self.wall_ts is not None else float(self.timestamp)

    @property
    def media_ts(self) -> float | None:
        """Seconds into a recorded file; None for live (and paced) sources."""
        return float(self.timestamp) if self.wall_ts is not None else None

    @property
    def is_anomalous(self) -> bool:
        return bool(self.score >= self.threshold)

    def map_at(self, size: tuple[int, int]) -> np.ndarray:
        """The anomaly map resized to (width, height)."""
        import cv2

        w, h = size
        if self.anomaly_map.shape == (h, w):
            return self.anomaly_map
        return cv2.resize(self.anomaly_map, (w, h), interpolation=cv2.INTER_LINEAR)
