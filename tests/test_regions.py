import numpy as np

from detector.regions import find_regions


def test_regions_boxes_in_frame_pixels_with_stats():
    a = np.zeros((64, 64), np.float32)
    a[10:20, 5:15] = 2.0
    a[12, 7] = 3.0
    a[40:50, 40:44] = 1.5
    r = find_regions(a, 1.0, (128, 64), 0)
    assert [(x.x1, x.y1, x.x2, x.y2) for x in r] == [(10, 10, 30, 20), (80, 40, 88, 50)]
    assert r[0].peak == 3.0 and abs(r[0].mean - 2.01) < 1e-6 and r[0].area == 200
    assert r[1].area == 80


def test_min_area_and_cap():
    a = np.zeros((64, 64), np.float32)
    a[10:20, 5:15] = 2.0
    a[40:42, 40:42] = 5.0
    assert [x.area for x in find_regions(a, 1.0, (64, 64), min_area=10)] == [100]
    noise = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    got = find_regions(noise, 0.9, (128, 128), 0, max_regions=5)
    assert len(got) == 5
    assert all(got[i].peak >= got[i + 1].peak for i in range(4))


def test_nothing_above_threshold():
    assert find_regions(np.zeros((8, 8), np.float32), 0.5, (8, 8)) == []


def test_peaks_and_means_equal_whole_map_reference():
    """Interleaved components whose boxes overlap: each statistic must count its own label only."""
    import cv2
    from scipy import ndimage
    from scipy.ndimage import gaussian_filter

    amap = gaussian_filter(np.random.default_rng(1).random((128, 128)), 3).astype(np.float32)
    thr = float(np.quantile(amap, 0.8))
    got = find_regions(amap, thr, (128, 128), 0, max_regions=1000)
    n, labels, _, _ = cv2.connectedComponentsWithStats((amap >= thr).astype(np.uint8), connectivity=8)
    assert len(got) == n - 1 > 5
    lab = np.arange(1, n)
    want = sorted(zip(ndimage.maximum(amap, labels, lab), ndimage.mean(amap, labels, lab)), reverse=True)
    np.testing.assert_allclose([(r.peak, r.mean) for r in got], want, rtol=1e-6)
