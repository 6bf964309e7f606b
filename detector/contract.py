"""What the live pipeline (app/pipeline.py) needs of a detector, as a typed interface.

Implemented by `detector.detector.Detector` (one bank) and `detector.cameras.BankRouter` (a bank per
camera over one shared backbone); test doubles implement it explicitly. The pipeline calls `prepare`
and a `flow_tracker` of its own on each source's decode thread, `score_batch` on the detector thread and
the returned batch's `results()` on the sink thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from detector.result import FrameResult
from stream.frame import Frame
from stream.picture import Picture

if TYPE_CHECKING:
    from detector.motion import FlowTracker


class ScoredFrames(Protocol):
    """A batch scored on the detector thread; its per-frame results are built by `results()`, which the
    pipeline calls on its sink thread (regions and result objects), in the batch's frame order."""

    def results(self) -> list[FrameResult]: ...


class LiveDetector(Protocol):
    @property
    def source_fps(self) -> float:
        """The frame rate of the normal footage the bank was fitted on (the annotated video's default)."""
        ...

    def prepare(self, picture: Picture) -> np.ndarray | None:
        """The model input of one decoded frame, made on the source's decode thread (Frame.small); None
        leaves it to the detector thread (`score_batch` then makes it from the picture)."""
        ...

    def flow_tracker(self) -> FlowTracker | None:
        """A new per-source optical-flow state, run on that source's decode thread after `prepare`
        (Frame.flow); None when the frame score needs no flow or the detector makes it itself."""
        ...

    def warm_up(self, batch: int) -> None:
        """One pass on a blank batch before the cameras start (tracing, kernel selection)."""
        ...

    def score_batch(self, frames: Sequence[Frame]) -> ScoredFrames:
        """Score a batch of frames (any cameras, each camera's frames in capture order)."""
        ...
