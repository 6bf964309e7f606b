"""The traced and frozen CPU trunk gives the eager trunk's features (fp32) or features as good (bf16),
whatever the batch size."""

import pytest
import torch

from configs.schema import BackboneConfig
from detector.backbone import build_extractor


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", None), ("resnet18", "random")])
def test_frozen_trunk_equals_eager(name, weights):
    frozen = build_extractor(BackboneConfig(name=name, weights=weights, freeze=True), 16, torch.device("cpu"))
    eager = build_extractor(BackboneConfig(name=name, weights=weights, freeze=False), 16, torch.device("cpu"))
    with torch.inference_mode():
        # traced at batch 4, then run at other batch sizes: the batch must not be baked into the graph
        for b in (4, 1, 3):
            x = _images(b, 128, seed=b)
            pf, gf = frozen(x)
            pe, ge = eager(x)
            assert pf.shape == pe.shape == (b, frozen.pixel_dim, 16, 16)
            assert ge.shape == (b, frozen.global_dim)
            assert _rel(pf, pe) < 1e-4 and _rel(gf, ge) < 1e-4
    assert len(frozen._frozen) == 1 and not eager._frozen


def test_each_input_size_gets_its_own_trace():
    ext = build_extractor(BackboneConfig(weights=None), 8, torch.device("cpu"))
    eager = build_extractor(BackboneConfig(weights=None, freeze=False), 8, torch.device("cpu"))
    with torch.inference_mode():
        for size in (96, 160):
            x = _images(2, size)
            pf, gf = ext(x)
            pe, ge = eager(x)
            assert _rel(pf, pe) < 1e-4 and _rel(gf, ge) < 1e-4
    assert sorted(ext._frozen) == [(96, 96), (160, 160)]


def test_bf16_frozen_trunk_is_batch_independent_and_close_to_eager():
    """In bf16 the frozen trunk rounds differently from the eager one (folded weights in bf16), but no more
    than bf16 itself does, and a frame's features must not depend on the batch it came in."""
    frozen = build_extractor(BackboneConfig(weights=None), 16, torch.device("cpu"), precision="bf16")
    eager = build_extractor(BackboneConfig(weights=None, freeze=False), 16, torch.device("cpu"), precision="bf16")
    fp32 = build_extractor(BackboneConfig(weights=None, freeze=False), 16, torch.device("cpu"), precision="fp32")
    assert (frozen.trunk_kind, eager.trunk_kind) == ("frozen", "eager")
    x = _images(4, 128)
    with torch.inference_mode():
        pf, gf = frozen(x)
        pe, ge = eager(x)
        p32, g32 = fp32(x)
        p1, g1 = frozen(x[:1])
    assert len(frozen._frozen) == 1 and not eager._frozen
    assert _rel(p1, pf[:1]) < 1e-3 and _rel(g1, gf[:1]) < 1e-3
    assert _rel(pf, pe) < 0.1 and _rel(gf, ge) < 0.1
    # a bf16 computation, somewhat farther from fp32 than eager bf16 (BatchNorm's scale is folded into weights
    # that are then rounded; how far: docs/results.md, "Precision and the frozen trunk"); garbage would be ~1
    assert _rel(pf, p32) < 3 * _rel(pe, p32) and _rel(gf, g32) < 3 * _rel(ge, g32)
    assert _rel(pf, p32) < 0.15 and _rel(gf, g32) < 0.15
