"""Memory bank: fit round trip, refusal of mismatched or truncated banks, bounded decoding."""

import json

import av
import numpy as np
import pytest

import configs
from configs.errors import UserError
from detector.bank import PIXEL, open_bank
from detector.detector import Detector
from detector.fit import fit_bank, split_holdout
from stream.footage import select_indices
from stream.frame import Frame
from stream.picture import Picture


def write_video(path, n=20, size=(96, 64), seed=0):
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            img = (rng.random((size[1], size[0], 3)) * 60 + i * 5).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def small_cfg(**det):
    tree = {
        "detector": {
            "backbone": {"name": "resnet18", "weights": "random"},
            "input_size": 64,
            "grid": 8,
            "batch_size": 4,
            **det,
        },
        "bank": {"holdout": 0.2, "max_frames": None},
    }
    return configs.parse(tree)


@pytest.fixture
def videos(tmp_path):
    d = tmp_path / "normal"
    d.mkdir()
    write_video(d / "a.mp4", 20, seed=0)
    write_video(d / "b.mp4", 12, seed=1)
    return d


def test_fit_round_trip(tmp_path, videos):
    cfg = small_cfg(gallery="knn")  # a bank frame's own cells are its gallery only with SPADE's knn gallery
    meta = fit_bank(cfg, videos, tmp_path / "bank", progress=False)
    assert meta["n_frames"] == 32 - meta["calibration"]["n_holdout"]
    bank = open_bank(tmp_path / "bank")
    bank.verify()
    assert not list((tmp_path / "bank").glob("*.tmp")) and not list((tmp_path / "bank").glob("*.part"))
    assert bank.pixel_features.dtype == np.float16
    assert bank.pixel_features.shape == (meta["n_frames"], 64, meta["pixel_dim"])
    assert bank.global_features.shape == (meta["n_frames"], 512)
    cal = meta["calibration"]
    assert np.isfinite(cal["pixel_threshold"]) and cal["frame"]["image_knn"]["threshold"] > 0
    assert {s["path"].split("/")[-1] for s in meta["sources"]} == {"a.mp4", "b.mp4"}
    # a bank frame scored against its own bank is at distance ~0 (fp16 rounding of the pixel features)
    det = Detector.load(cfg, tmp_path / "bank")
    with av.open(str(videos / "a.mp4")) as c:
        # shrunk as fit shrank it: straight from the decoder's planes
        res = det.score_batch([Frame("cam", 0, 0.0, Picture(next(c.decode(video=0))))], all_components=True).results()[
            0
        ]
    assert res.components["image_knn"] < 1e-3 * cal["frame"]["image_knn"]["mean"]
    assert float(res.anomaly_map.max()) < 0.05 * cal["pixel_threshold"] + 1e-3


def test_bank_of_an_older_version_with_its_faiss_index(tmp_path, videos):
    """Banks fitted when faiss was a dependency also hold global.faiss: no fit writes it any more, an old
    bank with it still opens, verifies and scores, and fitting again into its directory removes it."""
    cfg = small_cfg()
    fit_bank(cfg, videos, tmp_path / "bank", progress=False)
    legacy = tmp_path / "bank" / "global.faiss"
    assert not legacy.exists()
    legacy.write_bytes(b"IxF2 an exact L2 index nobody reads")
    bank = open_bank(tmp_path / "bank")
    bank.verify()
    assert "global.faiss" not in bank.meta["checksums"]
    det = Detector.load(cfg, tmp_path / "bank")
    with av.open(str(videos / "a.mp4")) as c:
        res = det.score_batch([Frame("cam", 0, 0.0, Picture(next(c.decode(video=0))))], all_components=True).results()[
            0
        ]
    assert np.isfinite(res.score)
    fit_bank(cfg, videos, tmp_path / "bank", progress=False)
    assert not legacy.exists()


def test_fit_with_every_and_max_frames(tmp_path, videos):
    cfg = small_cfg()
    cfg.bank.every = 2
    cfg.bank.max_frames = 9
    cfg.bank.holdout = 0.0
    meta = fit_bank(cfg, videos, tmp_path / "bank", progress=False)
    assert meta["n_frames"] == 9
    frames = [tuple(x) for x in meta["frame_origins"]]
    assert all(f % 2 == 0 for _, f in frames)


def test_gather_reads_rows_from_disk(tmp_path, videos):
    fit_bank(small_cfg(), videos, tmp_path / "bank", progress=False)
    bank = open_bank(tmp_path / "bank")
    idx = np.array([5, 0, 5, 3])
    np.testing.assert_array_equal(bank.gather(idx), np.asarray(bank.pixel_features)[idx])


def test_select_indices_even_and_bounded():
    sel = select_indices([100, 50], every=1, max_frames=30)
    assert sum(map(len, sel)) == 30
    assert len(sel[0]) == 20 and len(sel[1]) == 10
    assert select_indices([10], every=3, max_frames=None) == [[0, 3, 6, 9]]


def test_holdout_is_a_contiguous_tail():
    bank, hold = split_holdout([list(range(20)), list(range(10))], 0.2)
    assert hold == [[16, 17, 18, 19], [8, 9]]
    assert bank[0] == list(range(16))


def test_mismatched_config_is_refused(tmp_path, videos):
    fit_bank(small_cfg(), videos, tmp_path / "bank", progress=False)
    with pytest.raises(UserError, match=r"grid=8 but the config gives grid=4"):
        Detector.load(small_cfg(grid=4), tmp_path / "bank")
    other = small_cfg()
    other.detector.input_size = 96
    with pytest.raises(UserError, match="input_size=64 but the config gives input_size=96"):
        Detector.load(other, tmp_path / "bank")


def test_truncated_bank_is_refused(tmp_path, videos):
    fit_bank(small_cfg(), videos, tmp_path / "bank", progress=False)
    p = tmp_path / "bank" / PIXEL
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match="truncated"):
        open_bank(tmp_path / "bank")


def test_corrupt_bank_fails_verification(tmp_path, videos):
    fit_bank(small_cfg(), videos, tmp_path / "bank", progress=False)
    p = tmp_path / "bank" / PIXEL
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        open_bank(tmp_path / "bank").verify()


def test_missing_or_foreign_bank(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_bank(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="meta.json: missing"):
        open_bank(tmp_path / "empty")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(UserError, match="format_version is 99"):
        open_bank(tmp_path / "old")


def test_precision_mismatch_is_refused(tmp_path, videos):
    fit_bank(small_cfg(precision="fp32"), videos, tmp_path / "bank", progress=False)
    with pytest.raises(UserError, match="precision='fp32' but the config gives precision='bf16'"):
        Detector.load(small_cfg(precision="bf16"), tmp_path / "bank")
    meta = json.loads((tmp_path / "bank" / "meta.json").read_text())
    del meta["precision"]  # a bank written before the field existed was fp32
    (tmp_path / "bank" / "meta.json").write_text(json.dumps(meta))
    Detector.load(small_cfg(precision="fp32"), tmp_path / "bank")


def test_bank_shrunk_by_the_older_method_is_refused(tmp_path, videos):
    fit_bank(small_cfg(), videos, tmp_path / "bank", progress=False)
    meta = json.loads((tmp_path / "bank" / "meta.json").read_text())
    assert meta["resize"] == "area-from-decoder"
    del meta["resize"]  # banks written before the key existed shrank full RGB frames with OpenCV
    (tmp_path / "bank" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"shrunk to the model input by another method \('area-from-rgb'.*fit the bank again"
    ):
        Detector.load(small_cfg(), tmp_path / "bank")


def test_bf16_bank_records_its_trunk_and_refuses_the_other(tmp_path, videos):
    eager = small_cfg(precision="bf16")
    eager.detector.backbone.freeze = False
    fit_bank(eager, videos, tmp_path / "bank", progress=False)
    meta = json.loads((tmp_path / "bank" / "meta.json").read_text())
    assert meta["bf16_trunk"] == "eager"
    with pytest.raises(
        UserError,
        match=r"came from the eager backbone trunk and this detector runs the frozen one.*"
        r"set detector.backbone.freeze: false",
    ):
        Detector.load(small_cfg(precision="bf16"), tmp_path / "bank")
    Detector.load(eager, tmp_path / "bank")
    del meta["bf16_trunk"]  # bf16 banks written before the key existed came from the eager trunk
    (tmp_path / "bank" / "meta.json").write_text(json.dumps(meta))
    Detector.load(eager, tmp_path / "bank")
    with pytest.raises(UserError, match="came from the eager backbone trunk"):
        Detector.load(small_cfg(precision="bf16"), tmp_path / "bank")


def test_fp32_banks_serve_both_trunks(tmp_path, videos):
    fit_bank(small_cfg(precision="fp32"), videos, tmp_path / "bank", progress=False)
    assert "bf16_trunk" not in json.loads((tmp_path / "bank" / "meta.json").read_text())
    eager = small_cfg(precision="fp32")
    eager.detector.backbone.freeze = False
    # fp32's frozen and eager trunks agree up to rounding (docs/results.md, "Precision and the frozen trunk")
    Detector.load(eager, tmp_path / "bank")
