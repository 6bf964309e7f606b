"""Cameras with memory banks of their own on one live pipeline (`sources[].bank`).

Each fixed camera's normal footage is its own normal model: pooled into one bank, cameras share the
coreset's budget and one set of thresholds (benchmarks/RESULTS.md 4e: a real camera lost 0.07 frame AUROC
pooled with three others). One process still serves them all: the detectors share one backbone, each
batch from the batcher is scored per bank, and the results come back in the batch's order.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from configs.errors import UserError
from configs.schema import AppConfig
from detector.detector import Detector
from detector.result import FrameResult
from stream.frame import Frame
from stream.picture import Picture


class CameraBatch:
    """A batch scored bank by bank; `results()` (on the sink thread) in the frames' order."""

    def __init__(self, parts: list[tuple[list[int], object]], n: int):
        self.parts, self.n = parts, n

    def results(self) -> list[FrameResult]:
        out: list[FrameResult | None] = [None] * self.n
        for idx, scored in self.parts:
            for i, r in zip(idx, scored.results()):
                out[i] = r
        return out  # type: ignore[return-value]


class CameraDetectors:
    """Routes each camera's frames to the detector of its bank. Offers what the pipeline asks of a
    Detector (prepare, flow_tracker, score_batch, score_frames, warm_up, calibration)."""

    def __init__(self, by_camera: dict[str, Detector]):
        if not by_camera:
            raise ValueError("no cameras")
        self.by_camera = by_camera
        self.detectors = list({id(d): d for d in by_camera.values()}.values())
        self.first = self.detectors[0]

    @classmethod
    def load(cls, cfg: AppConfig, default_bank: str | Path | None) -> "CameraDetectors":
        """One detector per distinct bank of `cfg.sources` (a source without `bank` takes `default_bank`)."""
        missing = [s.name for s in cfg.sources if s.bank is None and default_bank is None]
        if missing:
            raise UserError(f"sources: camera(s) {', '.join(missing)} have no memory bank "
                            "(set sources[].bank, or give --bank for every camera without one)")
        loaded: dict[Path, Detector] = {}
        by_camera: dict[str, Detector] = {}
        for s in cfg.sources:
            path = Path(s.bank if s.bank is not None else default_bank).resolve()
            if path not in loaded:
                first = next(iter(loaded.values()), None)  # its backbone serves every bank
                try:
                    loaded[path] = Detector.load(cfg, path, share=first)
                except UserError as err:
                    raise UserError(f"camera {s.name}: {err}") from None
            by_camera[s.name] = loaded[path]
        return cls(by_camera)

    def detector_for(self, camera_id: str) -> Detector:
        det = self.by_camera.get(camera_id)
        if det is None:
            raise KeyError(f"camera {camera_id!r} has no detector (not in sources)")
        return det

    @property
    def source_fps(self) -> float:
        """The first bank's footage frame rate: the annotated video's default rate."""
        return self.first.source_fps

    def prepare(self, picture: Picture) -> np.ndarray:
        return self.first.prepare(picture)  # one config: every detector makes the same model input

    def flow_tracker(self):
        return self.first.flow_tracker()

    def warm_up(self, batch: int) -> None:
        self.first.warm_up(batch)  # the backbone is shared

    def score_batch(self, frames: Sequence[Frame], all_components: bool = False):
        if len(self.detectors) == 1:
            return self.first.score_batch(frames, all_components=all_components)
        groups: dict[int, tuple[Detector, list[int]]] = {}
        for i, f in enumerate(frames):
            det = self.detector_for(f.camera_id)
            groups.setdefault(id(det), (det, []))[1].append(i)
        # One backbone pass for the whole batch (the banks share the backbone), then each bank scores its
        # cameras' rows: splitting the batch would run the backbone on smaller, slower batches.
        small = self.first.model_inputs(frames)
        pyr, glob = self.first.features(small)
        parts = []
        for det, idx in groups.values():
            rows = torch.as_tensor(idx, device=pyr.device)
            # Indexing keeps the pyramid channels-last (index_select would not): the scorer reads its
            # [cells, C] rows as a view.
            parts.append((idx, det.score_batch([frames[i] for i in idx], all_components=all_components,
                                               small=small[idx], features=(pyr[rows], glob[rows]))))
        return CameraBatch(parts, len(frames))

    def score_frames(self, frames: Sequence[Frame]) -> list[FrameResult]:
        return self.score_batch(frames, all_components=True).results()
