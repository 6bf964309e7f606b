"""PatchCore-style coreset gallery: greedy k-centre selection, coreset scoring, bank round trip, config."""

import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import configs
from configs.errors import UserError
from detector import coreset as cs
from detector import spade
from detector.bank import CORESET, PIXEL, BankWriter, open_bank, write_coreset
from detector.detector import Detector
from detector.fit import fit_bank
from detector.spade import SpadeScorer
from evaluation.run import score_video_batch
from tests.test_bank import small_cfg, write_video
from tests.test_spade import check_ranked


@pytest.mark.parametrize(
    "n,d,m,low_dims,start",
    [
        (600, 8, 60, 32, 0),  # d <= low_dims: the bound is the full distance
        (3000, 64, 400, 4, 17),  # a loose bound: many points need the full distance
        (4000, 128, 800, 32, 3999),
    ],
)
def test_greedy_matches_brute_force(n, d, m, low_dims, start):
    rng = np.random.default_rng(n)
    x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d)).astype(np.float32)  # unequal spreads
    got = cs.greedy_kcenter(torch.from_numpy(x.copy()), m, start, low_dims=low_dims).numpy()
    np.testing.assert_array_equal(got, cs.greedy_kcenter_reference(x, m, start))


def test_greedy_stops_when_every_point_is_a_centre():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(5, 6)).astype(np.float32)
    x = np.repeat(distinct, 7, axis=0)
    picks = cs.greedy_kcenter(torch.from_numpy(x.copy()), 20, 3).numpy()
    assert len(picks) == 5
    assert len({tuple(r) for r in x[picks]}) == 5


def test_greedy_rejects_half_precision():
    with pytest.raises(TypeError, match="float32"):
        cs.greedy_kcenter(torch.zeros(10, 4, dtype=torch.float16), 3, 0)


def random_bank(tmp_path, n=12, c=40, g=4, d=9, seed=0):
    rng = np.random.default_rng(seed)
    w = BankWriter(tmp_path / "bank", pixel_dim=c, grid=g, global_dim=d)
    w.append(
        rng.normal(size=(n, c, g, g)).astype(np.float32),
        rng.normal(size=(n, d)).astype(np.float32),
        [(0, i) for i in range(n)],
    )
    w.finish({"backbone": "test", "input_size": 16})
    return tmp_path / "bank", (n, g * g, c)


@pytest.mark.parametrize("projection_dim,max_features", [(8, None), (None, None), (16, 100)])
def test_build_coreset_keeps_original_features(tmp_path, projection_dim, max_features):
    bank_dir, shape = random_bank(tmp_path)
    feats, index, stats = cs.build_coreset(
        bank_dir / PIXEL,
        shape,
        fraction=0.2,
        max_size=None,
        projection_dim=projection_dim,
        max_features=max_features,
        seed=1,
        device=torch.device("cpu"),
    )
    total = shape[0] * shape[1]
    candidates = total if max_features is None else max_features
    assert stats["candidates"] == candidates
    assert len(feats) == stats["size"] == min(math.ceil(0.2 * total), candidates)
    pix = np.asarray(open_bank(bank_dir).pixel_features)
    np.testing.assert_array_equal(feats, pix[index[:, 0], index[:, 1]])  # unprojected, bit for bit
    assert len({tuple(r) for r in index}) == len(index)


def test_coreset_size_caps():
    assert cs.coreset_size(10_000, 0.01, 10_000) == 100
    assert cs.coreset_size(10_000, 0.01, 10_000, max_size=40) == 40
    assert cs.coreset_size(10_000, 0.5, 300) == 300
    assert cs.coreset_size(10, 0.001, 10) == 1
    # at least one frame's cells (the static scene), even above max_size; never more than the candidates
    assert cs.coreset_size(10_000, 0.01, 10_000, max_size=2048, min_size=256) == 256
    assert cs.coreset_size(100_000, 0.05, 100_000, max_size=40, min_size=256) == 256
    assert cs.coreset_size(10_000, 0.01, 200, min_size=256) == 200


def test_build_coreset_is_seeded(tmp_path):
    bank_dir, shape = random_bank(tmp_path)
    kw = dict(fraction=0.1, max_size=None, projection_dim=8, max_features=150, device=torch.device("cpu"))
    a = cs.build_coreset(bank_dir / PIXEL, shape, seed=3, **kw)[1]
    b = cs.build_coreset(bank_dir / PIXEL, shape, seed=3, **kw)[1]
    c = cs.build_coreset(bank_dir / PIXEL, shape, seed=4, **kw)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def coreset_bank(tmp_path, m=50, c=40):
    bank_dir, shape = random_bank(tmp_path, c=c)
    feats, index, stats = cs.build_coreset(
        bank_dir / PIXEL,
        shape,
        fraction=1.0,
        max_size=m,
        projection_dim=8,
        max_features=None,
        seed=0,
        device=torch.device("cpu"),
    )
    write_coreset(bank_dir, feats, index, {"fraction": 1.0}, stats)
    return open_bank(bank_dir)


@pytest.mark.parametrize("rank", [None, torch.bfloat16])
@pytest.mark.parametrize("kappa,block", [(1, spade.CORESET_BLOCK), (1, 64), (3, spade.CORESET_BLOCK), (3, 64)])
def test_coreset_distances_match_float64(tmp_path, monkeypatch, kappa, block, rank):
    monkeypatch.setattr(spade, "CORESET_BLOCK", block)  # 64: many blocks, so the running best is exercised
    bank = coreset_bank(tmp_path)
    assert bank.coreset.shape == (50, 40) and bank.coreset.dtype == np.float16
    rng = np.random.default_rng(5)
    q = rng.normal(size=(2, 40, 4, 4)).astype(np.float32)
    sc = SpadeScorer(
        bank,
        k_image=1,
        k_gallery=1,
        kappa=kappa,
        sigma=0,
        input_size=4,
        device=torch.device("cpu"),
        gallery="coreset",
        rank_dtype=rank,
    )
    got = sc.pixel_distances(torch.from_numpy(q), None).numpy()
    ref = bank.coreset.astype(np.float64)
    cells = q.astype(np.float64).reshape(2, 40, 16).transpose(0, 2, 1)  # [B, g*g, C]
    dist = np.sqrt(((cells[:, :, None, :] - ref[None, None]) ** 2).sum(-1))
    want = np.sort(dist, axis=-1)[..., :kappa].mean(-1).reshape(2, 4, 4)
    out = sc.score(torch.from_numpy(q), torch.from_numpy(rng.normal(size=(2, 9)).astype(np.float32)))
    if rank is None:
        np.testing.assert_allclose(got, want, rtol=1e-4)
        np.testing.assert_allclose(out.maps.numpy(), want, rtol=1e-4)  # input_size == grid, no blur
    else:  # ranked in bf16: winners measured exactly, near-ties may swap (blocks merged by ranking value)
        check_ranked(got, want)
        np.testing.assert_allclose(out.maps.numpy(), got, rtol=1e-6)
    assert out.neighbours.shape == (2, 1)  # only the image score's neighbours are looked up


def test_scorer_refuses_a_bank_without_coreset(tmp_path):
    bank_dir, _ = random_bank(tmp_path)
    with pytest.raises(UserError, match="detector.gallery is 'coreset' but this bank has no coreset"):
        SpadeScorer(
            open_bank(bank_dir),
            k_image=1,
            k_gallery=1,
            kappa=1,
            sigma=0,
            input_size=4,
            device=torch.device("cpu"),
            gallery="coreset",
        )


def coreset_cfg(**coreset):
    cfg = small_cfg(gallery="coreset")
    cfg.detector.coreset = cfg.detector.coreset.model_copy(update={"fraction": 0.05, "projection_dim": 16, **coreset})
    return cfg


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("normal")
    write_video(d / "a.mp4", 20, seed=0)
    write_video(d / "b.mp4", 12, seed=1)
    return d


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, videos):
    bank = tmp_path_factory.mktemp("coreset") / "bank"
    meta = fit_bank(coreset_cfg(), videos, bank, progress=False)
    return bank, meta


def test_fit_with_coreset_loads_and_scores(fitted, videos):
    bank_dir, meta = fitted
    n, cells = meta["n_frames"], meta["grid"] ** 2
    assert meta["format_version"] == 3
    assert meta["coreset"] == coreset_cfg().detector.coreset.model_dump(mode="json")
    assert meta["coreset_stats"]["size"] == math.ceil(0.05 * n * cells)
    assert meta["calibration"]["scoring"]["gallery"] == "coreset"
    bank = open_bank(bank_dir)
    bank.verify()  # the coreset files are checksummed too
    assert set(bank.meta["checksums"]) >= {CORESET, "coreset_index.npy"}
    np.testing.assert_array_equal(
        bank.coreset, np.asarray(bank.pixel_features)[bank.coreset_index[:, 0], bank.coreset_index[:, 1]]
    )
    det = Detector.load(coreset_cfg(), bank_dir)
    assert det.scorer.coreset is not None and np.isfinite(det.thresholds.pixel)
    # a bank frame: its cells in the coreset are at distance ~0 (fp16 rounding), the others are not
    f = int(bank.coreset_index[0, 0])
    pyr = torch.from_numpy(np.asarray(bank.pixel_features[f], dtype=np.float32).T.reshape(1, -1, 8, 8))
    dist = det.scorer.coreset_distances(pyr).numpy().reshape(-1)
    mine = bank.coreset_index[bank.coreset_index[:, 0] == f, 1]
    assert dist[mine].max() < 1e-2 * dist.max()
    assert np.delete(dist, mine).min() > 0
    # the whole path: images in, maps out
    import av

    with av.open(str(videos / "a.mp4")) as c:
        img = next(c.decode(video=0)).to_ndarray(format="rgb24")
    out, comps, scores = score_video_batch(det, "default", [img], None)
    assert out.maps.shape == (1, 64, 64) and np.isfinite(scores).all()


def test_knn_config_serves_a_coreset_bank(fitted, caplog):
    bank_dir, _ = fitted
    with caplog.at_level("WARNING"):
        det = Detector.load(small_cfg(gallery="knn"), bank_dir)
    assert det.scorer.coreset is None
    assert "calibrated with other scoring settings" in caplog.text and "gallery" in caplog.text


def test_coreset_config_against_knn_bank_is_refused(tmp_path, videos):
    fit_bank(small_cfg(gallery="knn"), videos, tmp_path / "bank", progress=False)
    with pytest.raises(
        UserError,
        match=r"detector\.gallery is 'coreset' but this bank has no coreset.*"
        r"detector\.gallery: knn",
    ):
        Detector.load(coreset_cfg(), tmp_path / "bank")


def test_coreset_settings_mismatch_is_refused(fitted):
    bank_dir, _ = fitted
    with pytest.raises(UserError, match=r"config gives detector\.coreset=.*'fraction': 0\.1"):
        Detector.load(coreset_cfg(fraction=0.1), bank_dir)


def test_truncated_coreset_is_refused(tmp_path, fitted):
    import shutil

    bank_dir = tmp_path / "copy"
    shutil.copytree(fitted[0], bank_dir)
    p = bank_dir / CORESET
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(UserError, match="coreset.f16: .* truncated"):
        open_bank(bank_dir)
    p.unlink()
    with pytest.raises(UserError, match="coreset.f16: missing"):
        open_bank(bank_dir)


def test_config_fields():
    cfg = configs.parse(
        {
            "detector": {
                "gallery": "coreset",
                "coreset": {"fraction": 0.03, "max_size": None, "projection_dim": None, "seed": 2},
            }
        }
    )
    assert cfg.detector.coreset.fraction == 0.03 and cfg.detector.coreset.max_features == 262_144
    default = configs.parse({}).detector
    assert default.gallery == "coreset" and default.coreset.max_size == 2048
    # kappa is bounded by the coreset size cap, not by k_gallery x grid^2
    assert configs.parse({"detector": {"gallery": "coreset", "grid": 4, "kappa": 20}}).detector.kappa == 20
    bad = [
        ({"gallery": "patchcore"}, "gallery"),
        ({"gallery": "coreset", "coreset": {"fraction": 0}}, "fraction"),
        ({"gallery": "coreset", "coreset": {"fraction": 1.5}}, "fraction"),
        ({"gallery": "coreset", "coreset": {"max_features": 0}}, "max_features"),
        ({"gallery": "coreset", "coreset": {"projection_dim": 0}}, "projection_dim"),
        ({"gallery": "coreset", "coreset": {"ratio": 0.1}}, "ratio"),
        ({"gallery": "coreset", "spatial_window": 2}, "spatial_window needs gallery: knn"),
        ({"gallery": "coreset", "kappa": 5, "coreset": {"max_size": 4}}, "kappa exceeds coreset.max_size"),
    ]
    for tree, needle in bad:
        with pytest.raises(UserError, match=needle):
            configs.parse({"detector": tree})
    with pytest.raises(ValidationError):
        cfg.detector.coreset.fraction = -1.0  # validate_assignment


def test_coreset_meta_is_json(fitted):
    meta = json.loads((fitted[0] / "meta.json").read_text())
    assert meta["coreset_stats"]["candidates"] == meta["n_frames"] * 64
