"""Pictures: the model input straight from the decoder's planes, the full RGB frame only on demand."""

import av
import numpy as np
import pytest
from av.video.reformatter import VideoReformatter

from stream.avio import VideoInput
from stream.picture import Picture, resize_rgb


def _clip(path, size=(320, 180), n=6, pix_fmt="yuv420p", codec="libx264"):
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = size[0], size[1], pix_fmt
        for i in range(n):
            img = np.zeros((size[1], size[0], 3), np.uint8)
            img[:, : size[0] // 2] = (200, 40, 40)  # a sharp colour edge: chroma subsampling shows there
            img[size[1] // 3 :, :, 1] = 180
            img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape) + i, 0, 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize("pix_fmt,codec", [("yuv420p", "libx264"), ("yuv444p", "libx264"), ("gray", "ffv1")])
def test_scaled_from_the_decoder_matches_scaling_the_rgb_frame(tmp_path, pix_fmt, codec):
    clip = _clip(tmp_path / f"c_{pix_fmt}.mkv", pix_fmt=pix_fmt, codec=codec)
    with VideoInput(str(clip), "file") as v:
        pics = [p for p, _ in v.pictures()]
    assert len(pics) == 6
    for p in pics:
        small = p.scaled(64)
        assert small.shape == (64, 64, 3) and small.dtype == np.uint8 and small.flags.c_contiguous
        assert p._rgb is None  # scaling did not make the full-size RGB frame
        ref = resize_rgb(p.rgb(), 64)
        diff = np.abs(small.astype(int) - ref)
        assert diff.mean() < 6.0, (pix_fmt, diff.mean())  # a swapped channel or range would give >> 10
        np.testing.assert_array_equal(p.scaled(64), small)  # the shared swscale context gives the same again
    assert pics[0].size == (320, 180) and pics[0].rgb().shape == (180, 320, 3)


def test_upscaling_a_small_frame(tmp_path):
    clip = _clip(tmp_path / "small.mp4", size=(48, 32))
    with VideoInput(str(clip), "file") as v:
        p = next(iter(v.pictures()))[0]
        small = p.scaled(64)
    assert small.shape == (64, 64, 3)
    assert np.abs(small.astype(int) - resize_rgb(p.rgb(), 64)).mean() < 4.0


def test_rgb_array_picture_is_opencv_area_and_needs_no_conversion():
    img = np.random.default_rng(1).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    p = Picture(img)
    assert p.rgb() is img and p.size == (200, 120)
    np.testing.assert_array_equal(p.scaled(64), resize_rgb(img, 64))
    with pytest.raises(ValueError, match="uint8 RGB image"):
        Picture(img[..., 0])


def test_pictures_without_a_shared_reformatter():
    vf = av.VideoFrame.from_ndarray(np.full((40, 60, 3), 77, np.uint8), format="rgb24").reformat(format="yuv420p")
    a = Picture(vf).scaled(16)
    b = Picture(vf, VideoReformatter()).scaled(16)
    np.testing.assert_array_equal(a, b)
    assert abs(int(a.mean()) - 77) <= 2
