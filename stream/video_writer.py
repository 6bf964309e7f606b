"""The one place that writes video files (PyAV). Everything else hands it RGB frames.

Codec choice, by container:
- `.avi`: "libx264" (the default) is swapped for MJPEG (yuvj420p). H.264 in AVI has no way to store
  B-frame reordering, so muxers warn and some decoders mis-time frames; every frame of MJPEG is a key
  frame with pts == dts, which is what frame-exact readers (and the STC layout's training videos) want.
- anything else: libx264 with `crf`, falling back to "mpeg4" when this FFmpeg build lacks libx264.

Frame timing is exact: the encoder's time base is 1/fps and frame n gets pts n, so frame n decodes
with time n / fps. MP4 and AVI keep that exactly (the MP4 muxer rescales to a finer time base);
Matroska stores milliseconds, so there times are n / fps rounded to 1 ms.

Sizes: 4:2:0 / 4:2:2 pixel formats need even dimensions. Odd widths/heights are padded by one
replicated row/column (never resized), so the decoded video is the padded size and the original
pixels sit unchanged at its top-left; `size` reports what is actually encoded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from typing import cast

import numpy as np

FpsLike = int | float | Fraction

# Pixel formats whose chroma is subsampled horizontally (w) and/or vertically (h).
_SUBSAMPLED = {
    "yuv420p": (True, True),
    "yuvj420p": (True, True),
    "nv12": (True, True),
    "yuv422p": (True, False),
    "yuvj422p": (True, False),
}


def _as_fraction(fps: FpsLike) -> Fraction:
    if isinstance(fps, Fraction):
        rate = fps
    else:
        # 1001 keeps NTSC rates exact (30000/1001) and the time-base denominator far below MPEG-4's
        # 16-bit limit.
        rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return rate


def _codec_available(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception:  # UnknownCodecError, or a decoder-only build
        return False
    return True


def _resolve_codec(path: str, codec: str, pix_fmt: str) -> tuple[str, str]:
    """(codec, pix_fmt) actually used for `path`; see the module docstring for the rules."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".avi" and codec in ("libx264", "h264"):
        return "mjpeg", "yuvj420p"
    if codec in ("libx264", "h264") and not _codec_available(codec):
        return "mpeg4", "yuv420p"
    if codec == "mjpeg" and pix_fmt == "yuv420p":
        # FFmpeg's MJPEG encoder refuses limited-range yuv420p; yuvj420p is the same layout, full range.
        return "mjpeg", "yuvj420p"
    return codec, pix_fmt


def _codec_options(codec: str, crf: int) -> dict[str, str]:
    if codec in ("libx264", "h264"):
        return {"crf": str(int(crf))}
    if codec in ("mjpeg", "mpeg4"):
        # These have no CRF; pin the quantiser instead (2 = best, 31 = worst). crf / 6 maps the
        # x264 default 23 to 4, i.e. visually close to x264 at that setting, and crf <= 12 to 2.
        q = str(int(min(31, max(2, round(crf / 6)))))
        return {"qmin": q, "qmax": q}
    return {}


class VideoWriter:
    """Encode RGB uint8 frames (H x W x 3) into a video file at a constant frame rate.

    Use as a context manager, or call `close()` yourself: closing flushes the encoder's delayed
    frames and always releases the container, even when flushing fails. PyAV creates the file when
    the first packet is muxed, so a writer closed before any `write()` leaves no file behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: FpsLike,
        codec: str = "libx264",
        crf: int = 23,
        pix_fmt: str = "yuv420p",
        options: dict[str, str] | None = None,
    ) -> None:
        import av

        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        self.path = os.fspath(path)
        self.width = int(width)
        self.height = int(height)
        self.fps = _as_fraction(fps)
        self.codec, self.pix_fmt = _resolve_codec(self.path, codec, pix_fmt)
        pad_w, pad_h = _SUBSAMPLED.get(self.pix_fmt, (False, False))
        self._pad_x = int(pad_w and self.width % 2)
        self._pad_y = int(pad_h and self.height % 2)
        self.frames_written = 0
        self._closed = False

        opts = _codec_options(self.codec, crf)
        opts.update(options or {})
        self._container = av.open(self.path, mode="w")
        try:
            stream = cast(av.VideoStream, self._container.add_stream(self.codec, rate=self.fps, options=opts))
            stream.width = self.width + self._pad_x
            stream.height = self.height + self._pad_y
            stream.pix_fmt = self.pix_fmt
            stream.time_base = 1 / self.fps
            stream.codec_context.time_base = 1 / self.fps
        except BaseException:
            self._container.close()
            self._closed = True
            raise
        self._stream = stream

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as encoded, i.e. after padding to even dimensions if that was needed."""
        return (self.width + self._pad_x, self.height + self._pad_y)

    def write(self, rgb: np.ndarray) -> None:
        import av

        if self._closed:
            raise ValueError("write() on a closed VideoWriter")
        if rgb.dtype != np.uint8 or rgb.shape != (self.height, self.width, 3):
            raise ValueError(
                f"expected uint8 frame of shape {(self.height, self.width, 3)}, got {rgb.dtype} {rgb.shape}"
            )
        if self._pad_x or self._pad_y:
            rgb = np.pad(rgb, ((0, self._pad_y), (0, self._pad_x), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames_written
        frame.time_base = self._stream.codec_context.time_base
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and close the file. Safe to call more than once."""
        self._finish(flush=True)

    def _finish(self, flush: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if flush:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Keep what was written playable, but never let a flush error mask the original exception.
        try:
            self._finish(flush=True)
        except Exception:
            pass

    def __del__(self) -> None:
        # Last resort for writers that were never closed: release the container without flushing.
        if not getattr(self, "_closed", True):
            try:
                self._finish(flush=False)
            except Exception:
                pass


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: FpsLike, **kw) -> int:
    """Write every RGB frame of `frames` to `path`; the size comes from the first frame.

    Returns the number of frames written. An empty iterable writes nothing and creates no file.
    """
    it = iter(frames)
    first = next(it, None)
    if first is None:
        return 0
    h, w = first.shape[:2]
    with VideoWriter(path, w, h, fps, **kw) as writer:
        writer.write(first)
        for rgb in it:
            writer.write(rgb)
        return writer.frames_written
