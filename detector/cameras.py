"""One router from streams to memory banks over one shared backbone: live cameras with banks of their own
(`sources[].bank`) and eval's test videos scored against their scene's bank (detector/scenes.py).

Each fixed camera's normal footage is its own normal model: pooled into one bank, cameras share the
coreset's budget and one set of thresholds, and a real camera pooled with others lost frame AUROC
(docs/history.md, section 4e). One process still serves them all: the detectors share one backbone, each
live batch from the batcher is scored per bank, and the results come back in the batch's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configs.errors import UserError
from configs.schema import AppConfig
from detector.contract import ScoredFrames
from detector.detector import Detector
from detector.motion import FlowTracker
from detector.result import FrameResult
from stream.frame import Frame
from stream.picture import Picture


class RoutedBatch:
    """A batch scored bank by bank; `results()` (on the sink thread) in the frames' order."""

    def __init__(self, parts: list[tuple[list[int], ScoredFrames]], n: int):
        self.parts, self.n = parts, n

    def results(self) -> list[FrameResult]:
        out: list[FrameResult | None] = [None] * self.n
        for rows, scored in self.parts:
            for i, r in zip(rows, scored.results()):
                out[i] = r
        return out  # type: ignore[return-value]


@dataclass(frozen=True)
class BankThresholds:
    """What a loaded bank's detector alerts at, and its footage's frame rate (eval's report)."""

    frame: float
    pixel: float
    fps: float
    predicted_alarms_per_hour: float | None = None  # at `frame`, from the held-out tail (detector/evt.py)


class BankRouter:
    """Routes each stream (a camera id, or an eval test video's name) to the detector of its bank; every
    detector runs the backbone of the first one loaded. Implements detector.contract.LiveDetector.

    Two lifetimes, one class:
      hold_one=False (live): every distinct bank is loaded now, in stream order, and kept: the batcher
                     mixes cameras in one batch, so all banks must stay ready;
      hold_one=True  (eval): a bank is loaded when a stream of it is first asked for (`detector_for`) and
                     only one is held at a time: eval scores test videos one after another in name order,
                     so a scene's videos are consecutive and one bank at a time bounds memory. Use it
                     stream by stream, not with mixed live batches (each switch reloads a bank).
    `stream_kind` (e.g. "camera") prefixes a load error with the stream that asked for the bank.
    """

    def __init__(
        self, cfg: AppConfig, banks: Mapping[str, str | Path], *, hold_one: bool = False, stream_kind: str | None = None
    ):
        if not banks:
            raise ValueError("no streams")
        self.cfg, self.banks, self.hold_one, self.stream_kind = (
            cfg,
            {k: Path(v) for k, v in banks.items()},
            hold_one,
            stream_kind,
        )
        self._loaded: dict[Path, Detector] = {}  # in load order; at most one with hold_one
        self.thresholds: dict[Path, BankThresholds] = {}  # of every bank loaded so far, in load order
        if not hold_one:
            for name in self.banks:
                self.detector_for(name)

    @classmethod
    def for_cameras(cls, cfg: AppConfig, default_bank: str | Path | None) -> BankRouter:
        """One detector per distinct bank of `cfg.sources` (a source without `bank` takes `default_bank`)."""
        missing = [s.name for s in cfg.sources if s.bank is None and default_bank is None]
        if missing:
            raise UserError(
                f"sources: camera(s) {', '.join(missing)} have no memory bank "
                "(set sources[].bank, or give --bank for every camera without one)"
            )
        banks = {
            s.name: Path(s.bank if s.bank is not None else default_bank).resolve()  # type: ignore[arg-type]
            for s in cfg.sources
        }
        return cls(cfg, banks, stream_kind="camera")

    def detector_for(self, stream: str) -> Detector:
        path = self.banks.get(stream)
        if path is None:
            raise KeyError(f"{self.stream_kind or 'stream'} {stream!r} has no detector (not in sources)")
        det = self._loaded.get(path)
        if det is None:
            det = self._load(stream, path)
            if self.hold_one:
                self._loaded.clear()
            self._loaded[path] = det
        return det

    def _load(self, stream: str, path: Path) -> Detector:
        share = next(iter(self._loaded.values()), None)  # its backbone serves every bank
        try:
            det = Detector.load(self.cfg, path, share=share)
        except UserError as err:
            if self.stream_kind is None:
                raise
            raise UserError(f"{self.stream_kind} {stream}: {err}") from None
        self.thresholds[path] = BankThresholds(
            det.thresholds.frame, det.thresholds.pixel, det.source_fps, det.thresholds.predicted_alarms_per_hour
        )
        return det

    @property
    def detectors(self) -> list[Detector]:
        """The detectors held now, one per distinct bank."""
        return list(self._loaded.values())

    @property
    def first(self) -> Detector:
        if not self._loaded:
            self.detector_for(next(iter(self.banks)))
        return next(iter(self._loaded.values()))

    # detector.contract.LiveDetector -------------------------------------------------------------
    @property
    def source_fps(self) -> float:
        """The first bank's footage frame rate: the annotated video's default rate."""
        return self.first.source_fps

    def prepare(self, picture: Picture) -> np.ndarray:
        return self.first.prepare(picture)  # one config: every detector makes the same model input

    def flow_tracker(self) -> FlowTracker | None:
        return self.first.flow_tracker()

    def warm_up(self, batch: int) -> None:
        self.first.warm_up(batch)  # the backbone is shared

    def score_batch(self, frames: Sequence[Frame], all_components: bool = False) -> ScoredFrames:
        if len(self._loaded) == 1:
            return self.first.score_batch(frames, all_components=all_components)
        groups: dict[int, tuple[Detector, list[int]]] = {}
        for i, f in enumerate(frames):
            det = self.detector_for(f.camera_id)
            groups.setdefault(id(det), (det, []))[1].append(i)
        # One backbone pass for the whole batch (the banks share the backbone), then each bank scores its
        # cameras' rows: splitting the batch would run the backbone on smaller, slower batches.
        model_input = self.first.model_inputs(frames)
        pyramid, global_features = self.first.features(model_input)
        parts: list[tuple[list[int], ScoredFrames]] = []
        for det, rows in groups.values():
            index = torch.as_tensor(rows, device=pyramid.device)
            # Indexing keeps the pyramid channels-last (index_select would not): the scorer reads its
            # [cells, C] rows as a view.
            parts.append(
                (
                    rows,
                    det.score_batch(
                        [frames[i] for i in rows],
                        all_components=all_components,
                        model_input=model_input[rows],
                        features=(pyramid[index], global_features[index]),
                    ),
                )
            )
        return RoutedBatch(parts, len(frames))
