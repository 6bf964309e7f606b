"""A decoded picture, converted only as far as someone asks.

The detector needs a small square RGB image (e.g. 256x256); only drawing sinks (annotated video,
snapshots) need the full-size RGB frame. Converting every 856x480 YUV frame to full-size RGB and then
shrinking it cost more CPU than decoding; swscale scales and converts in one pass straight from the
decoder's planes at a fraction of that (docs/results.md, "One camera, end to end and by stage"). So a
video frame stays the decoder's `av.VideoFrame` until a consumer asks for `.scaled(size)` or `.rgb()`.

Both paths shrink by area averaging. From YUV, swscale's AREA filter scales the chroma planes at their
own resolution; from an RGB array (image files, tests) OpenCV's INTER_AREA, which swscale's AREA filter
on RGB input matches to a fraction of a grey level (tests/test_picture.py). The two paths differ by about
one level on average and more on sharp colour edges, as two decoders' chroma upsampling would.
"""

from __future__ import annotations

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

# Names how frames become model inputs; a bank records it (detector.bank_signature) and refuses another.
METHOD = "area-from-decoder"


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [S, S, 3] from an RGB array. INTER_AREA averages the source pixels under each target pixel
    (no aliasing when shrinking)."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


class Picture:
    """One decoded frame: an `av.VideoFrame` (any pixel format) or a uint8 RGB array [H, W, 3].

    `reformatter` is the swscale context `scaled()` reuses; building one per frame costs more than the
    scaling itself. A reformatter is not thread-safe: give each decoding thread its own.
    """

    __slots__ = ("_frame", "_rgb", "_reformatter", "width", "height")

    def __init__(self, source: av.VideoFrame | np.ndarray, reformatter: VideoReformatter | None = None):
        if isinstance(source, np.ndarray):
            if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
                raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {source.dtype} {source.shape}")
            self._frame: av.VideoFrame | None = None
            self._rgb: np.ndarray | None = source
            self.height, self.width = source.shape[:2]
        else:
            self._frame, self._rgb = source, None
            self.width, self.height = source.width, source.height
        self._reformatter = reformatter

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return (self.width, self.height)

    def rgb(self) -> np.ndarray:
        """uint8 RGB [H, W, 3], C-contiguous; converted once, on first use."""
        if self._rgb is None:
            assert self._frame is not None  # one of the two is always set
            # to_ndarray returns a strided view when FFmpeg pads lines; downstream wants contiguous.
            self._rgb = np.ascontiguousarray(self._frame.to_ndarray(format="rgb24"))
        return self._rgb

    def scaled(self, size: int) -> np.ndarray:
        """uint8 RGB [size, size, 3]: the model input."""
        if self._frame is None:
            return resize_rgb(self.rgb(), size)
        shrink = self.width >= size and self.height >= size
        ref = self._reformatter or VideoReformatter()
        out = ref.reformat(self._frame, size, size, "rgb24", interpolation="AREA" if shrink else "BILINEAR")
        return np.ascontiguousarray(out.to_ndarray())
