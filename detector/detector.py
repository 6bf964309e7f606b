"""The detector: frames in, `FrameResult`s out (backbone -> SPADE -> frame score -> regions)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from configs.errors import UserError
from configs.schema import AppConfig
from detector.backbone import FeatureExtractor, build_extractor, resolve_device
from detector.bank import MemoryBank, open_bank
from detector.regions import find_regions
from detector.result import FrameResult
from detector.spade import SpadeOutput, SpadeScorer
from stream.frame import Frame

log = logging.getLogger(__name__)


def resize_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 [B, S, S, 3]. Resizing on the host shrinks what crosses to the device ~6x for 856x480.

    INTER_AREA averages the source pixels under each target pixel (no aliasing when shrinking).
    """
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
        h, w = img.shape[:2]
        interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
        out[i] = cv2.resize(img, (size, size), interpolation=interp) if (h, w) != (size, size) else img
    return out


def bank_signature(cfg: AppConfig, extractor: FeatureExtractor) -> dict:
    """The metadata a bank must carry to be scored with this config."""
    d = cfg.detector
    return {
        "backbone": d.backbone.name,
        "weights_digest": extractor.weights_digest,
        "input_size": d.input_size,
        "grid": d.grid,
        "pixel_dim": extractor.pixel_dim,
    }


def frame_components(out: SpadeOutput, topq: float) -> dict[str, torch.Tensor]:
    """Every frame-level statistic the detector can alert on, each [B]."""
    maps = out.maps.flatten(1)
    k = max(1, int(round(topq * maps.shape[1])))
    return {
        "image_knn": out.image_scores,
        "map_max": maps.amax(dim=1),
        "topq": torch.topk(maps, k, dim=1).values.mean(dim=1),
    }


class Detector:
    def __init__(self, cfg: AppConfig, extractor: FeatureExtractor, bank: MemoryBank | None, device: torch.device):
        self.cfg = cfg
        self.dcfg = cfg.detector
        self.extractor = extractor
        self.device = device
        self.bank = bank
        self.scorer = None
        if bank is not None:
            d = self.dcfg
            self.scorer = SpadeScorer(bank, k_image=d.k_image, k_gallery=d.k_gallery, kappa=d.kappa,
                                      sigma=d.sigma, input_size=d.input_size, device=device)
        self._pin = device.type == "cuda"

    # construction -------------------------------------------------------------------------------
    @staticmethod
    def build_extractor(cfg: AppConfig) -> tuple[FeatureExtractor, torch.device]:
        device = resolve_device(cfg.detector.device)
        if cfg.detector.threads:
            torch.set_num_threads(cfg.detector.threads)
        return build_extractor(cfg.detector.backbone, cfg.detector.grid, device), device

    @classmethod
    def load(cls, cfg: AppConfig, bank_dir: str | Path) -> "Detector":
        extractor, device = cls.build_extractor(cfg)
        bank = open_bank(Path(bank_dir), expected=bank_signature(cfg, extractor))
        return cls(cfg, extractor, bank, device)

    # thresholds ---------------------------------------------------------------------------------
    @property
    def calibration(self) -> dict:
        return self.bank.calibration if self.bank is not None else {}

    @property
    def pixel_threshold(self) -> float:
        if self.cfg.regions.threshold is not None:
            return float(self.cfg.regions.threshold)
        return float(self.calibration.get("pixel_threshold", math.inf))

    @property
    def frame_threshold(self) -> float:
        if self.cfg.alerts.enter_threshold is not None:
            return float(self.cfg.alerts.enter_threshold)
        stats = self.calibration.get("frame", {}).get(self.dcfg.frame_score)
        return float(stats["threshold"]) if stats else math.inf

    # inference ----------------------------------------------------------------------------------
    def to_device(self, batch_u8: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(batch_u8)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def features(self, batch_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extractor(self.to_device(batch_u8))

    @torch.inference_mode()
    def score_tensors(self, pyramid: torch.Tensor, glob: torch.Tensor) -> tuple[SpadeOutput, dict[str, np.ndarray]]:
        if self.scorer is None:
            raise RuntimeError("detector has no memory bank")
        out = self.scorer.score(pyramid, glob)
        comps = {k: v.float().cpu().numpy() for k, v in frame_components(out, self.dcfg.topq).items()}
        return out, comps

    def frame_scores(self, comps: dict[str, np.ndarray]) -> np.ndarray:
        """The configured frame score; 'combined' averages the calibrated z-scores of the map statistics."""
        name = self.dcfg.frame_score
        if name == "combined":
            stats = self.calibration.get("frame", {})
            parts = [(comps[k] - stats[k]["mean"]) / stats[k]["std"] for k in ("map_max", "topq") if k in stats]
            if not parts:
                raise UserError(f"{self.bank.directory}: frame_score 'combined' needs a calibrated bank (bank.holdout > 0)")
            return np.mean(parts, axis=0)
        if name == "regions":
            raise UserError("detector.frame_score: 'regions' is not available in this version")
        return comps[name]

    def score_images(self, images: Sequence[np.ndarray]) -> tuple[SpadeOutput, dict[str, np.ndarray], np.ndarray]:
        pyr, glob = self.features(resize_batch(images, self.dcfg.input_size))
        out, comps = self.score_tensors(pyr, glob)
        return out, comps, self.frame_scores(comps)

    def score_frames(self, frames: Sequence[Frame]) -> list[FrameResult]:
        out, comps, scores = self.score_images([f.image for f in frames])
        return self.results(frames, out, comps, scores)

    def results(self, frames: Sequence[Frame], out: SpadeOutput, comps: dict[str, np.ndarray],
                scores: np.ndarray) -> list[FrameResult]:
        maps = out.maps.float().cpu().numpy()
        nbrs = out.neighbours.cpu().numpy()
        pix_t, frame_t = self.pixel_threshold, self.frame_threshold
        min_area = self.cfg.regions.min_area
        results = []
        for i, f in enumerate(frames):
            results.append(FrameResult(
                camera_id=f.camera_id, frame_index=f.index, timestamp=f.timestamp,
                score=float(scores[i]), threshold=frame_t, anomaly_map=maps[i],
                regions=find_regions(maps[i], pix_t, f.size, min_area),
                frame_size=f.size, image_score=float(comps["image_knn"][i]),
                components={k: float(v[i]) for k, v in comps.items()},
                neighbours=nbrs[i, : self.dcfg.k_image],
            ))
        return results
