"""A decoded frame as it travels from a source to the batcher."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Frame:
    camera_id: str
    index: int  # 0-based index among the frames the source decoded
    timestamp: float  # wall-clock capture time (time.time()) for live sources, media time for files
    image: np.ndarray  # uint8 RGB [H, W, 3], C-contiguous
    small: Optional[np.ndarray] = None  # the model input (uint8 [S, S, 3]) when the source prepared it

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.image.shape[:2]
        return (w, h)
