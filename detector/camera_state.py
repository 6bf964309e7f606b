"""Per-camera state of a detector on the live path (and of eval's one camera per test video): each
camera's previous frame for optical flow, its causal smoothing window of frame scores and the sequence
(Frame.sequence) of its latest frame. Frames of one camera must arrive in capture order.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from detector import framescore
from detector.motion import FlowExtractor
from stream.frame import Frame

MAX_FRAME_GAP = 8  # a camera's previous frame further back than this many frames is not used for flow


class CameraStates:
    """The state of every camera seen, keyed by camera id; safe to use from several threads."""

    def __init__(self, smooth_window: int):
        self.smooth_window = smooth_window
        self._lock = threading.Lock()
        self.previous: dict[str, tuple[int | None, np.ndarray]] = {}  # camera -> (frame index, flow gray)
        self._smoother = framescore.CausalSmoother(smooth_window)
        self._sequence: dict[str, int] = {}  # camera -> Frame.sequence of its latest frame scored live

    def reset(self, camera_id: str | None = None) -> None:
        """Forget the previous frame and smoothing window of one camera (None: of all cameras)."""
        with self._lock:
            if camera_id is None:
                self.previous.clear()
                self._sequence.clear()
            else:
                self.previous.pop(camera_id, None)
                self._sequence.pop(camera_id, None)
            self._smoother.reset(camera_id)

    def flow(
        self,
        extractor: FlowExtractor,
        model_input: np.ndarray,
        camera_ids: Sequence[str],
        grid: int,
        indices: Sequence[int] | None = None,
        starts: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """float32 [B, g, g, 3] flow cell features of each frame against its camera's last frame seen
        (then this frame becomes it). `indices` (frame indices) let a gap of a few dropped frames be
        bridged by scaling the flow; `starts` marks frames that begin a new sequence of their camera."""
        out = np.empty((len(model_input), grid, grid, 3), np.float32)
        for i in range(len(model_input)):
            gray = extractor.gray(model_input[i])
            index = None if indices is None else int(indices[i])
            with self._lock:
                prev = None if starts is not None and starts[i] else self.previous.get(camera_ids[i])
                self.previous[camera_ids[i]] = (index, gray)
            gap = 1
            if prev is not None and index is not None and prev[0] is not None:
                gap = index - prev[0]
                if gap < 1 or gap > MAX_FRAME_GAP:  # a restart or a long drop: no usable previous frame
                    prev = None
            out[i] = extractor(None if prev is None else prev[1], gray)
            if gap > 1:
                out[i] /= gap
        return out

    def smooth(self, camera_ids: Sequence[str], scores: np.ndarray, starts: Sequence[bool] | None = None) -> np.ndarray:
        """Each camera's causal mean, in order; `starts`: frames that begin a new sequence of their camera,
        whose window then restarts with them."""
        if self.smooth_window <= 1:
            return scores
        starts = starts if starts is not None else [False] * len(camera_ids)
        with self._lock:
            out = []
            for camera, value, start in zip(camera_ids, scores, starts):
                if start:
                    self._smoother.reset(camera)
                out.append(self._smoother(camera, value))
            return np.array(out)

    def sequence_starts(self, frames: Sequence[Frame]) -> list[bool]:
        """Which frames begin a new sequence (Frame.sequence) of their camera since the last one scored.
        A camera's first frame ever is not counted: its windows are empty anyway."""
        with self._lock:
            out = []
            for f in frames:
                last = self._sequence.get(f.camera_id)
                out.append(last is not None and last != f.sequence)
                self._sequence[f.camera_id] = f.sequence
            return out
