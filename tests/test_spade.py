"""SPADE scoring against a brute-force float64 reference on random tensors."""

import numpy as np
import pytest
import torch

from detector.bank import BankWriter, open_bank
from detector.spade import SpadeScorer, squared_distances
from tests.reference import gaussian_blur


def make_bank(tmp_path, n=12, c=7, g=4, d=9, seed=0):
    rng = np.random.default_rng(seed)
    pyr = rng.normal(size=(n, c, g, g)).astype(np.float32)
    glob = rng.normal(size=(n, d)).astype(np.float32)
    w = BankWriter(tmp_path / "bank", pixel_dim=c, grid=g, global_dim=d)
    w.append(pyr[:5], glob[:5], [(0, i) for i in range(5)])
    w.append(pyr[5:], glob[5:], [(0, i) for i in range(5, n)])
    w.finish({"backbone": "test", "input_size": 16})
    return open_bank(tmp_path / "bank"), pyr, glob


def reference(bank_pixel_f16, glob_bank, q_pyr, q_glob, k_image, k_gallery, kappa):
    """Float64, loops, no tricks: the paper's algorithm written out."""
    bank_pix = bank_pixel_f16.astype(np.float64)  # [N, g*g, C] exactly as stored
    gb = glob_bank.astype(np.float64)
    out_img, out_pix = [], []
    for b in range(q_pyr.shape[0]):
        d2 = ((gb - q_glob[b].astype(np.float64)) ** 2).sum(1)
        order = np.argsort(d2, kind="stable")
        out_img.append(d2[order[:k_image]].mean())
        gallery = bank_pix[order[:k_gallery]].reshape(-1, bank_pix.shape[-1])
        q = q_pyr[b].astype(np.float64).reshape(q_pyr.shape[1], -1).T  # [g*g, C]
        dist = np.sqrt(((q[:, None, :] - gallery[None, :, :]) ** 2).sum(-1))
        dist.sort(axis=1)
        out_pix.append(dist[:, :kappa].mean(1))
    g = q_pyr.shape[-1]
    return np.array(out_img), np.array(out_pix).reshape(-1, g, g)


@pytest.mark.parametrize("k_image,k_gallery,kappa", [(1, 1, 1), (3, 1, 1), (1, 4, 1), (2, 5, 3)])
def test_scores_match_float64_reference(tmp_path, k_image, k_gallery, kappa):
    bank, _, glob_bank = make_bank(tmp_path)
    rng = np.random.default_rng(1)
    q_pyr = rng.normal(size=(3, 7, 4, 4)).astype(np.float32)
    q_glob = rng.normal(size=(3, 9)).astype(np.float32)
    sc = SpadeScorer(
        bank, k_image=k_image, k_gallery=k_gallery, kappa=kappa, sigma=0, input_size=4, device=torch.device("cpu")
    )
    _, idx = sc.nearest_frames(torch.from_numpy(q_glob), max(k_image, k_gallery))
    dist = sc.pixel_distances(torch.from_numpy(q_pyr), idx).numpy()
    out = sc.score(torch.from_numpy(q_pyr), torch.from_numpy(q_glob))
    ref_img, ref_pix = reference(np.asarray(bank.pixel_features), glob_bank, q_pyr, q_glob, k_image, k_gallery, kappa)
    np.testing.assert_allclose(out.image_scores.numpy(), ref_img, rtol=1e-4)
    np.testing.assert_allclose(dist, ref_pix, rtol=1e-4)
    # with input_size == grid and no smoothing the map is the distance grid itself
    np.testing.assert_allclose(out.maps.numpy(), ref_pix, rtol=1e-4)


def test_distances_are_over_channels_not_the_wrong_axis(tmp_path):
    """The reference code's torch.pairwise_distance on 4-D tensors reduces over the last spatial axis."""
    bank, pyr_bank, glob_bank = make_bank(tmp_path, n=1, c=5, g=4, d=3)
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 5, 4, 4)).astype(np.float32)
    sc = SpadeScorer(bank, k_image=1, k_gallery=1, kappa=1, sigma=0, input_size=4, device=torch.device("cpu"))
    dist = sc.pixel_distances(torch.from_numpy(q), torch.zeros(1, 1, dtype=torch.long)).numpy()[0]
    _, ref = reference(np.asarray(bank.pixel_features), glob_bank, q, rng.normal(size=(1, 3)), 1, 1, 1)
    np.testing.assert_allclose(dist, ref[0], rtol=1e-4)
    # what the buggy call computes: distances along the last (width) axis, per (channel, row)
    g = torch.from_numpy(np.asarray(bank.pixel_features, dtype=np.float32)[0].T.reshape(1, 5, 4, 4))
    wrong = torch.pairwise_distance(torch.from_numpy(q), g).numpy()
    assert wrong.shape != dist.shape or not np.allclose(wrong, dist, rtol=1e-2)
    assert not np.allclose(np.resize(wrong, dist.shape), dist, rtol=1e-2)


def test_squared_distances_batched_equal_cdist():
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(2, 10, 6, generator=rng)
    b = torch.randn(2, 13, 6, generator=rng)
    np.testing.assert_allclose(
        squared_distances(a, b).numpy(), (torch.cdist(a.double(), b.double()) ** 2).numpy(), rtol=1e-4, atol=1e-5
    )


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(x), 4.0).numpy()
    want = np.stack([gaussian_filter(m.astype(np.float64), 4.0, mode="mirror") for m in x])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gallery_reads_only_neighbour_rows(tmp_path, monkeypatch):
    bank, _, _ = make_bank(tmp_path)
    seen = []
    real = bank.gather
    monkeypatch.setattr(bank, "gather", lambda idx: (seen.append(np.asarray(idx).copy()), real(idx))[1])
    sc = SpadeScorer(bank, k_image=1, k_gallery=2, kappa=1, sigma=0, input_size=4, device=torch.device("cpu"))
    q_glob = torch.from_numpy(np.asarray(bank.global_features[[3, 3]]))
    sc.score(torch.randn(2, 7, 4, 4), q_glob)
    assert len(seen) == 1 and len(seen[0]) == 2  # the union of both frames' two neighbours, read once


@pytest.mark.parametrize("g,size,sigma", [(32, 256, 4.0), (8, 64, 4.0), (16, 128, 0.0), (4, 16, 2.0)])
def test_upsample_operator_equals_interpolate_then_blur(tmp_path, g, size, sigma):
    import torch.nn.functional as F

    bank, _, _ = make_bank(tmp_path, g=g)
    sc = SpadeScorer(bank, k_image=1, k_gallery=1, kappa=1, sigma=sigma, input_size=size, device=torch.device("cpu"))
    dist = torch.rand(3, g, g, generator=torch.Generator().manual_seed(0)) * 5
    want = F.interpolate(dist.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    want = gaussian_blur(want, sigma)
    np.testing.assert_allclose(sc.upsample(dist).numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


def check_ranked(got, want, agree=0.9):
    """A low-precision ranking may only swap near-ties: every distance is a real candidate's, so it is
    never below the exact kappa-nearest mean and at most slightly above it, and most cells are exact."""
    assert np.all(got >= want * (1 - 1e-5))
    assert np.all(got <= want * (1 + 2e-2))
    assert np.mean(np.isclose(got, want, rtol=1e-5)) >= agree


@pytest.mark.parametrize("k_gallery,kappa", [(1, 1), (4, 1), (5, 3)])
def test_bf16_ranking_measures_winners_exactly(tmp_path, k_gallery, kappa):
    bank, _, glob_bank = make_bank(tmp_path, n=12, c=24, g=8)
    rng = np.random.default_rng(1)
    q_pyr = rng.normal(size=(3, 24, 8, 8)).astype(np.float32)
    q_glob = rng.normal(size=(3, 9)).astype(np.float32)
    sc = SpadeScorer(
        bank,
        k_image=1,
        k_gallery=k_gallery,
        kappa=kappa,
        sigma=0,
        input_size=8,
        device=torch.device("cpu"),
        rank_dtype=torch.bfloat16,
    )
    _, idx = sc.nearest_frames(torch.from_numpy(q_glob), k_gallery)
    got = sc.pixel_distances(torch.from_numpy(q_pyr), idx).numpy()
    _, want = reference(np.asarray(bank.pixel_features), glob_bank, q_pyr, q_glob, 1, k_gallery, kappa)
    check_ranked(got, want)


def test_bf16_ranking_is_exact_without_near_ties(tmp_path):
    """Queries near one gallery feature each: the ranking cannot swap them, and the winner's distance is
    taken directly, so it matches float64 more closely than the float32 |q|^2 + |r|^2 - 2 q.r expansion."""
    bank, pyr_bank, glob_bank = make_bank(tmp_path, n=3, c=16, g=8)
    pix = np.asarray(bank.pixel_features, dtype=np.float32)  # [N, g*g, C]
    rng = np.random.default_rng(2)
    perm = rng.permutation(64)
    q = (pix[1][perm] + rng.normal(scale=1e-2, size=(64, 16))).astype(np.float32)
    q_pyr = q.T.reshape(1, 16, 8, 8)
    sc = SpadeScorer(
        bank,
        k_image=1,
        k_gallery=1,
        kappa=1,
        sigma=0,
        input_size=8,
        device=torch.device("cpu"),
        rank_dtype=torch.bfloat16,
    )
    got = sc.pixel_distances(torch.from_numpy(q_pyr), torch.ones(1, 1, dtype=torch.long)).numpy()
    want = np.linalg.norm(q.astype(np.float64) - pix[1][perm].astype(np.float64), axis=1).reshape(1, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    "setting,precision,device,want",
    [
        ("auto", "bf16", "cpu", torch.bfloat16),
        ("auto", "fp32", "cpu", None),
        ("auto", "bf16", "cuda", None),
        ("fp32", "bf16", "cpu", None),
        ("bf16", "fp32", "cpu", torch.bfloat16),
    ],
)
def test_rank_precision_resolution(setting, precision, device, want):
    from detector.detector import rank_dtype

    assert rank_dtype(setting, precision, torch.device(device)) == want
