from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from stream.synthetic import ANOMALIES, Scene, generate_stc, render_clip

SIZE = (320, 240)


@pytest.fixture(scope="module")
def scene():
    return Scene(SIZE, camera=0)


@pytest.fixture(scope="module")
def clips(scene):
    """120-frame clips per anomaly kind, each with its anomaly-free twin (same clip seed)."""
    out = {}
    for i, kind in enumerate(ANOMALIES):
        seed = [7, i]
        out[kind] = (list(scene.clip(120, seed=seed, anomaly=kind)), list(scene.clip(120, seed=seed)))
    return out


def test_clip_frames_and_masks(scene):
    pairs = list(scene.clip(5, seed=1))
    assert len(pairs) == 5
    for rgb, mask in pairs:
        assert rgb.dtype == np.uint8 and rgb.shape == (240, 320, 3) and rgb.flags.c_contiguous
        assert mask.dtype == np.uint8 and mask.shape == (240, 320)
        assert not mask.any()  # no anomaly asked for
    # A live camera: consecutive frames differ (people move, sensor noise), the scene stays.
    a, b = pairs[0][0].astype(int), pairs[1][0].astype(int)
    assert 0 < np.abs(a - b).mean() < 10


def test_same_seed_same_pixels_different_seed_differs():
    a = list(Scene(SIZE, camera=3).clip(8, seed=5, anomaly="vehicle"))
    b = list(Scene(SIZE, camera=3).clip(8, seed=5, anomaly="vehicle"))
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    c = list(Scene(SIZE, camera=3).clip(8, seed=6, anomaly="vehicle"))
    assert not np.array_equal(a[3][0], c[3][0])
    assert not np.array_equal(Scene(SIZE, camera=3).background, Scene(SIZE, camera=4).background)


@pytest.mark.parametrize("kind", ANOMALIES)
def test_anomaly_has_normal_frames_before_and_after(clips, kind):
    labels = np.array([m.any() for _, m in clips[kind][0]])
    present = np.flatnonzero(labels)
    assert present.size >= 20
    assert present[0] >= 10 and present[-1] <= 110  # normal stretches on both sides
    assert labels[present[0] : present[-1] + 1].all()  # one contiguous event
    assert max(m.mean() for _, m in clips[kind][0]) > 0.008  # large enough to be seen


@pytest.mark.parametrize("kind", ANOMALIES)
def test_mask_is_exactly_where_the_anomaly_changed_the_frame(clips, kind):
    """The same clip seed without the anomaly renders the same people, light and noise. Outside the
    mask the two frames may differ only by the anomalous object's shadow (darker, never brighter);
    inside it the object's pixels replace what would be there."""
    with_anomaly, twin = clips[kind]
    rgb = np.stack([f for f, _ in with_anomaly]).astype(np.int16)
    ref = np.stack([f for f, _ in twin]).astype(np.int16)
    on = np.stack([m for _, m in with_anomaly]).astype(bool)
    assert not any(m.any() for _, m in twin)
    assert ((rgb <= ref) | on[..., None]).all()
    area = on.sum(axis=(1, 2))
    shadow = ((rgb < ref).any(axis=3) & ~on).sum(axis=(1, 2))
    assert (shadow <= 0.6 * area + 150).all()
    change = (np.abs(rgb - ref).mean(axis=3) * on).sum(axis=(1, 2)) / np.maximum(area, 1)
    big = area >= 200
    assert big.sum() >= 10
    assert (change[big] > 25).all()


def test_normal_people_look_alike_in_training_and_test(scene):
    """Normal activity is the same process with or without an anomaly: the twin clips prove it
    pixel-wise above; here the amount of activity is comparable across seeds."""
    bg = scene.background.astype(int)
    activity = []
    for seed in ([1, 1, 0], [1, 2, 0]):
        frames = [rgb for rgb, _ in scene.clip(48, seed=seed)]
        activity.append(np.mean([(np.abs(f.astype(int) - bg).max(axis=2) > 40).mean() for f in frames]))
    assert all(0.002 < a < 0.05 for a in activity)


def test_unknown_anomaly_rejected(scene):
    with pytest.raises(ValueError):
        next(scene.clip(3, anomaly="meteor"))


def _small_set(root: Path, seed: int = 0) -> dict:
    return generate_stc(root, seed=seed, train_videos=2, train_frames=10, test_videos=3, test_frames=40)


def test_generate_stc_layout(tmp_path):
    summary = _small_set(tmp_path)
    assert sorted(p.name for p in (tmp_path / "training" / "videos").iterdir()) == ["01_001.avi", "01_002.avi"]
    names = ["01_0014", "01_0015", "01_0016"]
    assert sorted(p.name for p in (tmp_path / "testing" / "frames").iterdir()) == names
    assert [t["name"] for t in summary["test"]] == names
    assert [t["anomaly"] for t in summary["test"]] == list(ANOMALIES)
    assert summary["train_frames_total"] == 20 and summary["test_frames_total"] == 120

    for video in (tmp_path / "training" / "videos").iterdir():
        with av.open(str(video)) as c:
            frames = [f for f in c.decode(video=0)]
        assert len(frames) == 10 and (frames[0].width, frames[0].height) == SIZE

    for t in summary["test"]:
        name = t["name"]
        jpgs = sorted(p.name for p in (tmp_path / "testing" / "frames" / name).iterdir())
        assert jpgs == [f"{i:03d}.jpg" for i in range(40)]
        labels = np.load(tmp_path / "testing" / "test_frame_mask" / f"{name}.npy")
        masks = np.load(tmp_path / "testing" / "test_pixel_mask" / f"{name}.npy")
        assert labels.dtype == np.uint8 and labels.shape == (40,)
        assert masks.dtype == np.uint8 and masks.shape == (40, 240, 320)
        assert set(np.unique(masks)) <= {0, 1}
        assert np.array_equal(labels, masks.any(axis=(1, 2)).astype(np.uint8))
        assert 0 < labels.sum() < 40, f"{name} must hold both classes"
        assert t["anomalous_frames"] == int(labels.sum())


def test_generated_jpegs_show_the_masked_object(tmp_path):
    summary = _small_set(tmp_path)
    bg = Scene(SIZE, camera=0).background.astype(int)
    for t in summary["test"]:
        masks = np.load(t["pixel_mask"])
        i = int(np.argmax(masks.reshape(len(masks), -1).sum(1)))
        bgr = cv2.imread(str(Path(t["frames_dir"]) / f"{i:03d}.jpg"))
        assert bgr.shape == (240, 320, 3)
        rgb = bgr[..., ::-1].astype(int)
        on = masks[i].astype(bool)
        # Channel order matters: the frame must match the background (RGB) away from activity.
        assert np.median(np.abs(rgb - bg).max(axis=2)[~on]) < 12
        assert np.abs(rgb[on] - bg[on]).max(axis=1).mean() > 30


def test_generate_stc_is_byte_identical_per_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_stc(tmp_path / name, seed=seed, train_videos=1, train_frames=3, test_videos=3, test_frames=12)
    testing = Path("testing")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / testing).rglob("*") if p.is_file())
    assert len(files) == 3 * 12 + 6
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert any((tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes() for rel in files)


def test_generate_stc_rejects_odd_size(tmp_path):
    with pytest.raises(ValueError):
        generate_stc(tmp_path, size=(321, 240), train_videos=1, train_frames=2, test_videos=1, test_frames=2)


def test_render_clip_writes_video_and_returns_masks(tmp_path):
    path = tmp_path / "clip.mp4"
    masks = render_clip(path, seed=2, size=(160, 120), fps=12, frames=36, anomaly="object")
    assert masks.dtype == np.uint8 and masks.shape == (36, 120, 160)
    labels = masks.any(axis=(1, 2))
    assert labels.any() and not labels.all()
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(stream))
        assert stream.average_rate == 12
    assert len(frames) == 36 and (frames[0].width, frames[0].height) == (160, 120)
    # Same camera as the default data set, so a clip is a valid test input for a bank fitted on it.
    first = frames[0].to_ndarray(format="rgb24").astype(int)
    assert np.median(np.abs(first - Scene((160, 120), camera=0).background.astype(int))) < 12
