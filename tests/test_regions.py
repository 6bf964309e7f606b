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
