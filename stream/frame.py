"""A decoded frame as it travels from a source to the batcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from stream.picture import Picture


@dataclass(frozen=True, eq=False)
class Frame:
    camera_id: str
    index: int  # 0-based index among the frames the source decoded
    # The stream's clock, which alert durations and the video's segments follow: capture time (seconds
    # since the epoch, time.time()) for live and paced sources; media time (seconds from the first
    # frame) for recorded files read as fast as they decode, so a file alerts the same however fast.
    timestamp: float
    # As decoded: the full-size RGB image is made only if a sink draws (stream.picture). An RGB array
    # (uint8 [H, W, 3]) is accepted and wrapped.
    picture: Picture | np.ndarray
    small: np.ndarray | None = None  # the model input (uint8 [S, S, 3]) when the source prepared it
    # float32 [g, g, 3] optical-flow cell features against the source's previous decoded frame, when the
    # source computed them (detector.motion.FlowTracker); else the detector computes them from its state
    flow: np.ndarray | None = None
    # The source's connection (live) or pass (looped file) number. Frames of two sequences are not
    # consecutive, however close their indices: the detector neither computes flow nor smooths scores
    # across a change (a reconnect can follow minutes of outage).
    sequence: int = 0
    # Seconds since the epoch when a recorded file's frame was decoded; None when `timestamp` is already
    # epoch time (live and paced sources). Messages give every time in epoch seconds (FrameResult.epoch_ts).
    wall_ts: float | None = None

    def __post_init__(self):
        if isinstance(self.picture, np.ndarray):
            object.__setattr__(self, "picture", Picture(self.picture))

    @property
    def image(self) -> np.ndarray:
        """uint8 RGB [H, W, 3], C-contiguous (converted on first use)."""
        return self._picture.rgb()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the full frame, which region boxes refer to."""
        return self._picture.size

    @property
    def _picture(self) -> Picture:
        """`picture` after __post_init__ (an RGB array given to the constructor is wrapped there)."""
        return cast(Picture, self.picture)
