from fractions import Fraction

import av
import numpy as np
import pytest

from stream import video_writer
from stream.video_writer import VideoWriter, write_video


def _frames(n: int, w: int, h: int) -> list[np.ndarray]:
    """Smooth frames that differ from each other (codecs keep smooth content close to the input)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = (xx * 255 // max(w - 1, 1) + 10 * i) % 256
        img[..., 1] = yy * 255 // max(h - 1, 1)
        img[..., 2] = 128
        out.append(img)
    return out


def _decode(path) -> tuple[list[np.ndarray], list[float], str]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames, times = [], []
        for f in c.decode(stream):
            frames.append(f.to_ndarray(format="rgb24"))
            times.append(float(f.pts * f.time_base))
        return frames, times, stream.codec_context.name


@pytest.mark.parametrize("name", ["clip.mp4", "clip.avi", "clip.mkv"])
def test_round_trip_count_size_content(tmp_path, name):
    src = _frames(12, 64, 48)
    path = tmp_path / name
    assert write_video(path, src, fps=24) == 12
    frames, times, _ = _decode(path)
    assert len(frames) == 12
    assert all(f.shape == (48, 64, 3) for f in frames)
    for a, b in zip(src, frames):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 6
    # pts = frame number at time base 1/fps (Matroska rounds to milliseconds).
    assert times == pytest.approx([i / 24 for i in range(12)], abs=1e-3)


def test_avi_is_mjpeg_and_mp4_is_h264(tmp_path):
    write_video(tmp_path / "a.avi", _frames(3, 32, 32), fps=10)
    write_video(tmp_path / "b.mp4", _frames(3, 32, 32), fps=10)
    assert _decode(tmp_path / "a.avi")[2] == "mjpeg"
    assert _decode(tmp_path / "b.mp4")[2] == "h264"


def test_exact_timestamps_at_ntsc_rate(tmp_path):
    path = tmp_path / "ntsc.avi"
    write_video(path, _frames(5, 32, 32), fps=Fraction(30000, 1001))
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == Fraction(30000, 1001)
        assert [f.pts * f.time_base for f in c.decode(stream)] == [Fraction(1001 * i, 30000) for i in range(5)]


def test_odd_size_is_padded_not_resized(tmp_path):
    src = _frames(4, 33, 17)
    path = tmp_path / "odd.mp4"
    with VideoWriter(path, 33, 17, 24) as w:
        assert w.size == (34, 18)
        for f in src:
            w.write(f)
    frames, _, _ = _decode(path)
    assert len(frames) == 4 and frames[0].shape == (18, 34, 3)
    # The original pixels sit at the top-left, unscaled.
    assert np.abs(frames[0][:17, :33].astype(int) - src[0].astype(int)).mean() < 8


def test_close_is_idempotent_and_write_after_close_fails(tmp_path):
    w = VideoWriter(tmp_path / "c.mp4", 32, 32, 24)
    for f in _frames(3, 32, 32):
        w.write(f)
    w.close()
    w.close()
    assert w.frames_written == 3
    with pytest.raises(ValueError):
        w.write(_frames(1, 32, 32)[0])
    assert len(_decode(tmp_path / "c.mp4")[0]) == 3


def test_error_inside_context_still_closes_and_keeps_frames(tmp_path):
    path = tmp_path / "err.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(path, 32, 32, 24) as w:
            for f in _frames(5, 32, 32):
                w.write(f)
            raise RuntimeError("boom")
    assert w._closed
    assert len(_decode(path)[0]) == 5


@pytest.mark.parametrize(
    "bad", [np.zeros((32, 31, 3), np.uint8), np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32)]
)
def test_rejects_wrong_frames(tmp_path, bad):
    with VideoWriter(tmp_path / "bad.mp4", 32, 32, 24) as w:
        with pytest.raises(ValueError):
            w.write(bad)


def test_non_contiguous_input(tmp_path):
    src = _frames(2, 64, 32)
    with VideoWriter(tmp_path / "nc.mp4", 32, 32, 24) as w:
        for f in src:
            w.write(f[:, ::2])  # a strided view
    assert len(_decode(tmp_path / "nc.mp4")[0]) == 2


def test_write_video_empty_writes_nothing(tmp_path):
    path = tmp_path / "none.mp4"
    assert write_video(path, iter([]), fps=24) == 0
    assert not path.exists()


def test_falls_back_to_mpeg4_without_libx264(tmp_path, monkeypatch):
    monkeypatch.setattr(video_writer, "_codec_available", lambda name: False)
    path = tmp_path / "fb.mp4"
    with VideoWriter(path, 32, 32, 24) as w:
        assert w.codec == "mpeg4"
        for f in _frames(3, 32, 32):
            w.write(f)
    frames, _, codec = _decode(path)
    assert codec == "mpeg4" and len(frames) == 3


def test_bad_arguments():
    with pytest.raises(ValueError):
        VideoWriter("/nonexistent/never.mp4", 0, 32, 24)
    with pytest.raises(ValueError):
        VideoWriter("/nonexistent/never.mp4", 32, 32, 0)
