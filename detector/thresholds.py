"""Calibration and thresholds of one bank: what fit measured on held-out normal frames, turned into the
frame and pixel thresholds, the configured frame score and the pixel map's normalisation.

Every value is read from the bank's `calibration` (meta.json) when asked for, so fit's calibration step
can score with an empty calibration and store the new one in the same bank object.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs.errors import UserError
from configs.schema import AppConfig
from detector import evt, framescore
from detector.bank import MemoryBank

log = logging.getLogger(__name__)

MOTION_FLOW_FLOOR = 0.25  # flow px/frame: the motion map's normaliser never goes below this


def scoring_settings(cfg: AppConfig) -> dict:
    """Detector settings that change held-out scores: thresholds calibrated under others do not apply."""
    d = cfg.detector
    out: dict[str, Any] = {
        "k_image": d.k_image,
        "k_gallery": d.k_gallery,
        "kappa": d.kappa,
        "sigma": d.sigma,
        "topq": d.topq,
        "spatial_window": d.spatial_window,
        "motion_weight": d.motion.weight if d.motion.enabled else None,
    }
    if "moving_max" in d.components_used():  # only then, so thresholds calibrated before it still match
        out["moving"] = d.moving.model_dump(mode="json") | {"flow_size": d.motion.flow_size, "preset": d.motion.preset}
    if d.gallery == "coreset":  # only then, so thresholds calibrated before the option existed still match
        out["gallery"] = "coreset"
        out["coreset"] = d.coreset.model_dump(mode="json")
    return out


def combine_maps(
    appearance: torch.Tensor, motion: torch.Tensor | None, pixel_norm: dict | None, motion_weight: float
) -> torch.Tensor:
    """The final pixel map: appearance, plus the motion map when both are normalised on held-out frames.

    Each map is scaled so that its held-out normal `pixel_quantile` is 1 (appearance also shifted by
    its held-out mean), then they are added with weight `motion_weight`.
    """
    if motion is None or motion_weight == 0 or not pixel_norm:
        return appearance
    a, m = pixel_norm["appearance"], pixel_norm["motion"]
    normalised = (appearance - a["mean"]) / max(a["q"] - a["mean"], 1e-6)
    return normalised + motion_weight * motion / max(m["q"], MOTION_FLOW_FLOOR)


class Thresholds:
    """The thresholds and frame score of one bank under one config (`bank` None: uncalibrated)."""

    def __init__(self, cfg: AppConfig, bank: MemoryBank | None):
        self.cfg, self.bank = cfg, bank
        self._frame_calibration: dict | None = None

    @property
    def calibration(self) -> dict:
        return self.bank.calibration if self.bank is not None else {}

    @property
    def source_fps(self) -> float:
        """The frame rate of the normal footage the bank was fitted on (25 when unknown): alarm rates per
        hour and the annotated video's default rate refer to it."""
        return float(self.calibration.get("fps", 25.0))

    @property
    def pixel(self) -> float:
        """The pixel threshold: the config's `regions.threshold`, else the calibrated one (inf: none)."""
        if self.cfg.regions.threshold is not None:
            return float(self.cfg.regions.threshold)
        return float(self.calibration.get("pixel_threshold", math.inf))

    @property
    def frame(self) -> float:
        """The frame threshold: the config's `alerts.enter_threshold`, else the calibrated one (inf: none)."""
        if self.cfg.alerts.enter_threshold is not None:
            return float(self.cfg.alerts.enter_threshold)
        if not self.calibration:
            return math.inf
        return float(self.frame_calibration().get("threshold", math.inf))

    def pixel_norm(self) -> dict | None:
        """The held-out normalisation of the appearance and motion maps (None: not calibrated)."""
        return self.calibration.get("pixel_norm")

    def component_stats(self) -> dict[str, dict]:
        """Held-out normal statistics of every component (from the stored sequences when present)."""
        cal = self.calibration
        sequences = cal.get("holdout_components")
        if sequences:
            return {k: framescore.stats_of(np.asarray(v)) for k, v in sequences.items() if len(v)}
        return dict(cal.get("frame", {}))

    def frame_calibration(self) -> dict:
        """Statistics and threshold of the configured frame score (after smoothing) on held-out frames.

        Computed from the held-out component sequences stored in the bank, so the threshold always
        belongs to the frame score, combination and smoothing in force now.
        """
        if self._frame_calibration is not None:
            return self._frame_calibration
        cal = self.calibration
        sequences = cal.get("holdout_components")
        detector_cfg = self.cfg.detector
        name = detector_cfg.frame_score
        if sequences:
            components = {k: np.asarray(v, dtype=np.float64) for k, v in sequences.items()}
            if name != "combined" and name not in components:
                assert self.bank is not None, "calibrated sequences come from a bank"
                raise UserError(
                    f"{self.bank.directory}: frame_score {name!r} was not calibrated in this bank "
                    "(fit it again with this config)"
                )
            raw = self.frame_scores(components)
            items = np.asarray(cal.get("holdout_items", [0] * len(raw)))
            smoothed = framescore.causal_mean(raw, detector_cfg.smooth_window, items)
            result = framescore.stats_of(smoothed) | self._tail_threshold(
                smoothed, float(cal["target_false_alarms_per_hour"]), float(cal["fps"])
            )
        else:  # version-1 bank: per-component statistics only
            if name == "combined":
                self.frame_scores({k: np.zeros(1) for k in detector_cfg.combine})  # raises if uncalibrated
            result = dict(cal.get("frame", {}).get(name, {}))
        self._frame_calibration = result
        return result

    def _tail_threshold(self, smoothed: np.ndarray, rate: float, fps: float) -> dict:
        """The frame threshold for `rate` alarms per hour by `bank.tail_model`, and the alarms per hour the
        peaks-over-threshold model predicts at it (None with fewer than two held-out frames). An alarm is a
        run of frames above the threshold; runs closer than the alerts' exit duration count as one."""
        model = self.cfg.bank.tail_model
        normal = framescore.tail_threshold(smoothed, rate, fps)
        pot = None
        if len(smoothed) >= 2:
            run = max(1, round(self.cfg.alerts.exit_duration_s * fps))
            pot = evt.PotModel.fit(smoothed, fps, run=run)
        threshold = pot.threshold_for_rate(rate) if model == "pot" and pot is not None else normal
        predicted = pot.predicted_rate(threshold) if pot is not None else None
        return {"threshold": threshold, "tail_model": model, "predicted_alarms_per_hour": predicted}

    @property
    def predicted_alarms_per_hour(self) -> float | None:
        """Alarms per hour of normal footage the held-out tail predicts at the frame threshold in force."""
        if not self.calibration or self.cfg.alerts.enter_threshold is not None:
            return None
        return self.frame_calibration().get("predicted_alarms_per_hour")

    def frame_scores(self, components: dict[str, np.ndarray]) -> np.ndarray:
        """The configured frame score (before smoothing); 'combined' is the mean held-out z-score of
        the components listed in detector.combine."""
        detector_cfg = self.cfg.detector
        name = detector_cfg.frame_score
        if name == "combined":
            try:
                return framescore.combine(components, list(detector_cfg.combine), self.component_stats())
            except KeyError as err:
                where = self.bank.directory if self.bank is not None else "detector"
                raise UserError(
                    f"{where}: frame_score 'combined' needs held-out statistics of {err.args[0]} "
                    "(fit the bank again with bank.holdout > 0 and this config)"
                ) from None
        return components[name]

    def warn_if_fitted_with_other_settings(self, bank_dir: str | Path) -> None:
        """A warning when the bank's thresholds were calibrated under other scoring settings."""
        fitted = self.calibration.get("scoring")
        now = scoring_settings(self.cfg)
        if fitted is not None and fitted != now:
            diff = {k: (fitted.get(k), now.get(k)) for k in {**fitted, **now} if fitted.get(k) != now.get(k)}
            log.warning(
                "%s: thresholds were calibrated with other scoring settings %s (fitted, now): "
                "fit the bank again with this config for calibrated thresholds",
                bank_dir,
                diff,
            )
