"""The live path's division of work: model inputs prepared on the source threads, regions found on the
sink thread, the pixel bank read from disk or held in memory, and NVDEC decoding falling back to the CPU.
Each must give exactly what the plain, single-threaded path gives."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from configs.schema import SourceConfig
from detector.bank import open_bank
from detector.detector import Detector, resize_batch
from detector.fit import fit_bank
from detector.spade import SpadeScorer, resolve_pixel_bank
from stream.avio import VideoInput
from stream.frame import Frame
from stream.picture import Picture
from stream.sources import Source
from tests.helpers import DetectorThreadOnly, base_cfg, records, run


@pytest.fixture(scope="module")
def images(env):
    with VideoInput(str(env / "clip.mp4"), "file") as v:
        return [img for img, _ in v.frames()]


def frames_of(images, camera="cam", prepare=None):
    return [Frame(camera, i, i / 24.0, img, prepare(Picture(img)) if prepare else None) for i, img in enumerate(images)]


def test_live_batch_equals_all_components_batch_and_skips_unused_components(env, images):
    det = Detector.load(base_cfg(), env / "bank")
    ref = det.score_batch(frames_of(images[:16]), all_components=True).results()
    det.reset()
    batch = det.score_batch(frames_of(images[:16], prepare=det.prepare))
    live = batch.results()
    # map_max reads neither the regions nor the top-q component, so the live path skips both
    assert {"regions", "topq"} <= set(ref[0].components) and not {"regions", "topq"} & set(live[0].components)
    for a, b in zip(ref, live):
        assert a.score == b.score and a.regions == b.regions
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert {k: v for k, v in a.components.items() if k not in ("regions", "topq")} == b.components


def test_score_batch_keeps_costly_components_the_frame_score_reads(env, images):
    cfg = base_cfg()
    cfg.detector.frame_score = "combined"
    cfg.detector.combine = ["map_max", "regions"]
    det = Detector.load(cfg, env / "bank")
    assert {"regions"} == {"regions", "topq"} & set(det.score_batch(frames_of(images[:4])).results()[0].components)
    cfg.detector.combine = ["map_max", "topq"]
    det = Detector.load(cfg, env / "bank")
    assert {"topq"} == {"regions", "topq"} & set(det.score_batch(frames_of(images[:4])).results()[0].components)


def test_prepared_inputs_are_the_batch_resize(env, images):
    det = Detector.load(base_cfg(), env / "bank")
    fr = frames_of(images[:5], prepare=det.prepare)
    np.testing.assert_array_equal(det.model_inputs(fr), resize_batch(images[:5], det.detector_cfg.input_size))
    np.testing.assert_array_equal(det.model_inputs(frames_of(images[:5])), det.model_inputs(fr))


def test_source_prepares_model_inputs_on_its_thread(env):
    size = base_cfg().detector.input_size
    src = Source(SourceConfig(name="cam", url=str(env / "plain.mp4")), prepare=lambda p: p.scaled(size))
    src.start()
    got = []
    while True:
        f = src.read(timeout=10.0)
        if f is None:
            break
        got.append(f)
    src.stop()
    assert len(got) == 30
    assert all(f.small is not None and f.small.shape == (size, size, 3) for f in got)
    assert all(f.picture._rgb is None for f in got)  # no full-size RGB conversion unless someone asks
    # shrunk from the decoder's YUV planes: close to shrinking the RGB frame (they differ where chroma
    # subsampling does: ~1 grey level on the benchmark's scene, ~4 on this clip's saturated colour noise)
    diff = np.abs(got[3].small.astype(int) - resize_batch([got[3].image], size)[0])
    assert diff.mean() < 6.0


@pytest.mark.parametrize("frame_score", ["map_max", "moving_max"])
def test_pipeline_results_do_not_depend_on_where_inputs_are_prepared(env, tmp_path, frame_score):
    """Detector.prepare (and, for moving_max, the optical flow) on the source threads (pipeline default)
    vs a detector without them, whose inputs and flow are made on the detector thread."""
    cfg = base_cfg()
    bank = env / "bank"
    if frame_score != "map_max":
        cfg.detector.frame_score = frame_score
        bank = tmp_path / "bank"
        fit_bank(cfg, env / "normal", bank, progress=False)
    src = [SourceConfig(name="cam", url=str(env / "clip.mp4"))]
    run(cfg, bank, tmp_path / "a", src)
    run(cfg, bank, tmp_path / "b", src, detector=DetectorThreadOnly(Detector.load(cfg, bank)))
    a = records(tmp_path / "a" / "events.jsonl", "frame")
    b = records(tmp_path / "b" / "events.jsonl", "frame")
    assert len(a) == len(b) == 64
    assert max(r["score"] for r in a) > 2 * min(r["score"] for r in a[1:])  # the moving square stands out
    # Which frames share a batch depends on thread timing, and a frame's kNN GEMM runs against the union of
    # its batch's neighbours: the same frame scored in another batch differs in the last float bits.
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], rtol=1e-5)
    for ra, rb in zip(a, b):  # [x1, y1, x2, y2, peak, area]
        assert [g[:4] + g[5:] for g in ra["regions"]] == [g[:4] + g[5:] for g in rb["regions"]]
        assert [g[4] for g in ra["regions"]] == pytest.approx([g[4] for g in rb["regions"]], rel=1e-4)


def test_pixel_bank_in_memory_scores_like_disk(env, images):
    bank = open_bank(env / "bank")
    cfg = base_cfg()
    det = Detector.load(cfg, env / "bank")
    pyr, glob = det.features(resize_batch(images[:8], cfg.detector.input_size))
    d = cfg.detector
    kw = dict(k_image=1, k_gallery=3, kappa=1, sigma=d.sigma, input_size=d.input_size, device=torch.device("cpu"))
    disk = SpadeScorer(bank, pixel_bank="disk", **kw)
    mem = SpadeScorer(bank, pixel_bank="memory", **kw)
    assert disk.resident is None and mem.resident is not None
    assert mem.resident.dtype == torch.float16 and mem.resident.shape[0] == bank.n_frames
    a, b = disk.score(pyr, glob), mem.score(pyr, glob)
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=0)
    for sc in (disk, mem):
        sc.spatial_window = 1
    torch.testing.assert_close(disk.score(pyr, glob).maps, mem.score(pyr, glob).maps, rtol=0, atol=0)


def test_pixel_bank_auto_stays_on_disk_on_a_cpu(env):
    assert resolve_pixel_bank("auto", open_bank(env / "bank"), torch.device("cpu")) == "disk"


def test_hwaccel_without_a_usable_device_decodes_on_the_cpu(env, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: NVDEC may really be used")
    with VideoInput(str(env / "plain.mp4"), "file") as v:
        soft = [img for img, _ in v.frames()]
    with caplog.at_level(logging.WARNING, logger="stream.avio"):
        with VideoInput(str(env / "plain.mp4"), "file", hwaccel="cuda") as v:
            hard = [img for img, _ in v.frames()]
    assert any("hardware decoding (cuda) unavailable" in r.getMessage() for r in caplog.records)
    assert len(hard) == len(soft) == 30
    np.testing.assert_array_equal(hard[7], soft[7])


def test_hwaccel_does_not_hide_a_missing_file(tmp_path):
    from stream.avio import InputError

    with pytest.raises(InputError, match="missing.mp4"):
        VideoInput(str(tmp_path / "missing.mp4"), "file", hwaccel="cuda")
