"""The detector: frames in, `FrameResult`s out (backbone -> SPADE -> frame score -> regions).

Two ways in, one scoring core (`Detector._score`):
  live     `score_batch(frames)` -> `ScoredBatch`, whose `results()` the pipeline builds on its sink thread;
  offline  `score_offline(model_input, flow)` -> (SpadeOutput, every frame component): eval, fit's
           calibration and the benchmarks, which make model inputs (`resize_batch`) and flow
           (`flow_features`) themselves and smooth with `smoothed_frame_scores` where they need to.
Thresholds and the frame score live in detector/thresholds.py, per-camera state in detector/camera_state.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from configs.errors import UserError
from configs.schema import AppConfig
from detector import framescore
from detector.backbone import FeatureExtractor, build_extractor, resolve_device
from detector.bank import MemoryBank, open_bank
from detector.camera_state import CameraStates
from detector.motion import FlowExtractor, FlowTracker, MotionScorer, MovingGate
from detector.regions import find_regions
from detector.result import FrameResult
from detector.spade import SpadeOutput, SpadeScorer
from detector.thresholds import Thresholds, combine_maps
from stream.frame import Frame
from stream.picture import METHOD as RESIZE_METHOD
from stream.picture import Picture, resize_rgb

log = logging.getLogger(__name__)


def resize_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 [B, S, S, 3]. Resizing on the host shrinks what crosses to the device ~6x for 856x480."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = resize_rgb(img, size)
    return out


class ScoredBatch:
    """A scored batch whose per-frame results (regions, result objects) are built later, on another
    thread: the pipeline's detector thread goes on to the next batch while the sink thread finishes
    this one. Maps and neighbours are already on the host."""

    def __init__(
        self,
        frames: Sequence[Frame],
        maps: np.ndarray,
        neighbours: np.ndarray,
        components: dict[str, np.ndarray],
        scores: np.ndarray,
        *,
        frame_threshold: float,
        pixel_threshold: float,
        min_area: int,
        k_image: int,
    ):
        self.frames, self.maps, self.neighbours = frames, maps, neighbours
        self.components, self.scores = components, scores
        self.frame_threshold, self.pixel_threshold = frame_threshold, pixel_threshold
        self.min_area, self.k_image = min_area, k_image

    def results(self) -> list[FrameResult]:
        pixel_t = self.pixel_threshold
        out = []
        for i, f in enumerate(self.frames):
            out.append(
                FrameResult(
                    camera_id=f.camera_id,
                    frame_index=f.index,
                    timestamp=f.timestamp,
                    score=float(self.scores[i]),
                    threshold=self.frame_threshold,
                    anomaly_map=self.maps[i],
                    regions=find_regions(self.maps[i], pixel_t, f.size, self.min_area),
                    frame_size=f.size,
                    image_score=float(self.components["image_knn"][i]),
                    components={k: float(v[i]) for k, v in self.components.items()},
                    neighbours=self.neighbours[i, : self.k_image],
                    pixel_threshold=pixel_t if math.isfinite(pixel_t) else None,
                    wall_ts=f.wall_ts,
                )
            )
        return out


def bank_signature(cfg: AppConfig, extractor: FeatureExtractor) -> dict:
    """The metadata a bank must carry to be scored with this config."""
    d = cfg.detector
    sig = {
        "backbone": d.backbone.name,
        "weights_digest": extractor.weights_digest,
        "input_size": d.input_size,
        "grid": d.grid,
        "pixel_dim": extractor.pixel_dim,
        "precision": extractor.precision,
        # How frames are shrunk to the model input (stream.picture): from the decoder's planes by swscale.
        "resize": RESIZE_METHOD,
    }
    if extractor.precision == "bf16":  # only then: fp32's frozen and eager trunks agree up to rounding
        # (docs/results.md, "Precision and the frozen trunk")
        sig["bf16_trunk"] = extractor.trunk_kind
    if d.motion.enabled:  # only then, so banks without motion keep matching configs without it
        sig["motion"] = {
            "flow_size": d.motion.flow_size,
            "preset": d.motion.preset,
            "window": d.motion.window,
            "centres": d.motion.centres,
        }
    if d.gallery == "coreset":  # likewise: any bank serves gallery knn, only a matching coreset serves this
        sig["coreset"] = d.coreset.model_dump(mode="json")
    return sig


def frame_components(
    out: SpadeOutput,
    topq: float,
    pixel_threshold: float = math.inf,
    costly: Collection[str] = framescore.COSTLY,
    moving_weights: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Every frame-level statistic the detector can alert on, each [B] (see detector.framescore); of the
    costly ones (a sort or a connected-components pass per frame) only those named in `costly`."""
    app = out.appearance_maps if out.appearance_maps is not None else out.maps
    return framescore.components(
        out.image_scores,
        app,
        out.maps,
        out.motion_maps,
        topq,
        pixel_threshold,
        costly=costly,
        moving_weights=moving_weights,
    )


def rank_dtype(setting: str, backbone_precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype SpadeScorer ranks candidates in (None: float32). 'auto' ranks in bf16 only on the CPU
    with a bf16 backbone: there the bf16 product is much faster than float32 and the features are
    bf16-rounded anyway (docs/results.md, "Precision and the frozen trunk"). On a GPU float32 stays: it is
    not the bottleneck there and GPU-vs-CPU checks compare against it."""
    if setting == "auto":
        setting = "bf16" if backbone_precision == "bf16" and device.type == "cpu" else "fp32"
    return torch.bfloat16 if setting == "bf16" else None


def load_backbone(cfg: AppConfig) -> tuple[FeatureExtractor, torch.device]:
    """The configured backbone on the configured device (torch threads set from detector.threads)."""
    device = resolve_device(cfg.detector.device)
    if cfg.detector.threads:
        torch.set_num_threads(cfg.detector.threads)
    return build_extractor(cfg.detector.backbone, cfg.detector.grid, device, cfg.detector.precision), device


class Detector:
    """Scores frames against a memory bank (implements detector.contract.LiveDetector).

    Per-camera state (`camera_states`, keyed by camera id): the previous frame's grayscale for optical
    flow and the causal smoothing window of frame scores. Frames of one camera must arrive in capture order.
    """

    def __init__(self, cfg: AppConfig, extractor: FeatureExtractor, bank: MemoryBank | None, device: torch.device):
        self.cfg = cfg
        self.detector_cfg = d = cfg.detector
        self.extractor = extractor
        self.device = device
        self.bank = bank
        self.thresholds = Thresholds(cfg, bank)
        self.camera_states = CameraStates(d.smooth_window)
        self.scorer = None
        self.flow_extractor = FlowExtractor(d.motion.flow_size, d.grid, d.motion.preset) if d.needs_flow else None
        self.motion_scorer = None
        if bank is not None:
            self.scorer = SpadeScorer(
                bank,
                k_image=d.k_image,
                k_gallery=d.k_gallery,
                kappa=d.kappa,
                sigma=d.sigma,
                input_size=d.input_size,
                device=device,
                spatial_window=d.spatial_window,
                pixel_bank=d.pixel_bank,
                gallery=d.gallery,
                rank_dtype=rank_dtype(d.rank_precision, extractor.precision, device),
            )
            if d.motion.enabled:
                if bank.motion_model is None:
                    raise UserError(
                        f"{bank.directory}: detector.motion.enabled needs a bank fitted with motion "
                        "(fit it again with this config)"
                    )
                self.motion_scorer = MotionScorer(bank.motion_model, d.grid, device)
        self._pin = device.type == "cuda"
        self.moving_gate: MovingGate | None = None
        if bank is not None and "flow_noise" in bank.calibration:
            self.set_flow_noise(bank.calibration["flow_noise"])

    def set_flow_noise(self, noise: float) -> None:
        """Arm the moving_max gate with the camera's flow noise floor (fit measures it on the normal footage);
        only a frame score that reads moving_max arms it."""
        if "moving_max" not in self.detector_cfg.components_used():
            return
        m = self.detector_cfg.moving
        self.moving_gate = MovingGate(
            float(noise), m.noise_factor, m.static_weight, m.dilate, self.detector_cfg.input_size, self.device
        )

    # construction -------------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: AppConfig, bank_dir: str | Path, share: Detector | None = None) -> Detector:
        """The detector of the bank in `bank_dir`; with `share`, it runs that detector's backbone instead of
        building one (several banks scored in one process: scenes, cameras)."""
        extractor, device = (share.extractor, share.device) if share is not None else load_backbone(cfg)
        bank = open_bank(Path(bank_dir), expected=bank_signature(cfg, extractor))
        det = cls(cfg, extractor, bank, device)
        if "moving_max" in cfg.detector.components_used() and det.moving_gate is None:
            raise UserError(
                f"{bank_dir}: frame score 'moving_max' needs the flow noise floor of the normal footage, "
                "which this bank lacks: it was fitted without moving_max (fit it again with this config)"
            )
        det.thresholds.warn_if_fitted_with_other_settings(bank_dir)
        det.thresholds.frame_calibration()  # fail now, not on the first frame, if the frame score cannot be calibrated
        return det

    def warm_up(self, batch: int) -> None:
        """One backbone pass on a blank batch, so that the first camera frames do not wait for the trunk's
        trace (CPU: ~1 s) or for kernel selection."""
        s = self.detector_cfg.input_size
        with torch.inference_mode():
            self.features(np.zeros((max(1, batch), s, s, 3), dtype=np.uint8))

    def reset(self, camera_id: str | None = None) -> None:
        """Forget the previous frame and smoothing window of one camera (None: of all cameras)."""
        self.camera_states.reset(camera_id)

    @property
    def source_fps(self) -> float:
        return self.thresholds.source_fps

    # the steps ----------------------------------------------------------------------------------
    def _to_device(self, model_input: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(model_input)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def features(self, model_input: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel feature pyramid [B, C, g, g], global features [B, D]) of model inputs uint8 [B, S, S, 3]."""
        return self.extractor(self._to_device(model_input))

    def flow_features(
        self,
        model_input: np.ndarray,
        camera_ids: Sequence[str] | str = "default",
        previous: Sequence[np.ndarray | None] | None = None,
        indices: Sequence[int] | None = None,
        starts: Sequence[bool] | None = None,
    ) -> np.ndarray | None:
        """float32 [B, g, g, 3] flow cell features of model inputs; None when the frame score needs no flow.

        With `previous` (each frame's previous model input, None for "no previous frame") the camera state
        is neither read nor updated: offline readers that sample every N-th frame pass the true t-1.
        Otherwise each frame's previous frame is its camera's last frame seen (detector.camera_state).
        """
        if self.flow_extractor is None:
            return None
        if previous is None:
            cameras = [camera_ids] * len(model_input) if isinstance(camera_ids, str) else list(camera_ids)
            return self.camera_states.flow(
                self.flow_extractor, model_input, cameras, self.detector_cfg.grid, indices, starts
            )
        flow = self.flow_extractor
        out = np.empty((len(model_input), self.detector_cfg.grid, self.detector_cfg.grid, 3), np.float32)
        for i, before in enumerate(previous):
            out[i] = flow(None if before is None else flow.gray(before), flow.gray(model_input[i]))
        return out

    @torch.inference_mode()
    def _score(
        self, pyramid: torch.Tensor, global_features: torch.Tensor, flow: np.ndarray | None, costly: Collection[str]
    ) -> tuple[SpadeOutput, dict[str, np.ndarray]]:
        """The scoring core of both paths: SPADE maps (plus motion), then the frame components."""
        if self.scorer is None:
            raise RuntimeError("detector has no memory bank")
        out = self.scorer.score(pyramid, global_features)
        batch = pyramid.shape[0]
        if self.motion_scorer is not None:
            motion_maps = self.scorer.upsample(self.motion_scorer.score(self._flow_or_still(flow, batch)))
            final = combine_maps(out.maps, motion_maps, self.thresholds.pixel_norm(), self.detector_cfg.motion.weight)
            out = SpadeOutput(
                out.image_scores, out.neighbours, final, appearance_maps=out.maps, motion_maps=motion_maps
            )
        components = frame_components(
            out,
            self.detector_cfg.topq,
            self.thresholds.pixel,
            costly=costly,
            moving_weights=self.moving_weights(flow, batch),
        )
        return out, components

    def _flow_or_still(self, flow: np.ndarray | None, batch: int) -> np.ndarray:
        """The batch's flow cell features; zero flow when none is known (no previous frame: nothing moves)."""
        if flow is not None:
            return flow
        return np.zeros((batch, self.detector_cfg.grid, self.detector_cfg.grid, 3), np.float32)

    def moving_weights(self, flow: np.ndarray | None, batch: int) -> torch.Tensor | None:
        """moving_max's per-pixel weights [B, S, S] of a batch; None unless the frame score reads moving_max."""
        if self.moving_gate is None:
            return None
        return self.moving_gate(self._flow_or_still(flow, batch))

    def costly_components_read(self) -> set[str]:
        """The costly frame components (framescore.COSTLY) that the configured frame score reads: the
        only ones the live path computes."""
        used = self.detector_cfg.components_used()
        return {c for c in framescore.COSTLY if c in used}

    # the offline path ---------------------------------------------------------------------------
    def score_offline(
        self,
        model_input: np.ndarray,
        flow: np.ndarray | None = None,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[SpadeOutput, dict[str, np.ndarray]]:
        """Maps and every frame component of model inputs uint8 [B, S, S, 3] with their flow cell features
        (`flow_features`; None: no flow known). Reads and changes no camera state. `features`: the inputs'
        backbone features when already computed (benchmarks that keep them)."""
        pyramid, global_features = features if features is not None else self.features(model_input)
        return self._score(pyramid, global_features, flow, framescore.COSTLY)

    def smoothed_frame_scores(
        self, components: dict[str, np.ndarray], camera_ids: Sequence[str], starts: Sequence[bool] | None = None
    ) -> np.ndarray:
        """The configured frame score of a batch, smoothed in each camera's causal window."""
        return self.camera_states.smooth(camera_ids, self.thresholds.frame_scores(components), starts)

    # the live path (detector.contract.LiveDetector) ---------------------------------------------
    def prepare(self, picture: Picture) -> np.ndarray:
        """The model input of one decoded frame; sources call it on their own decode threads, so
        resizing runs in parallel across cameras instead of serially on the detector thread."""
        return picture.scaled(self.detector_cfg.input_size)

    def flow_tracker(self) -> FlowTracker | None:
        """A new per-source flow state for a source's decode thread (None: the frame score needs no flow)."""
        if self.flow_extractor is None:
            return None
        m = self.detector_cfg.motion
        return FlowTracker(FlowExtractor(m.flow_size, self.detector_cfg.grid, m.preset))

    def model_inputs(self, frames: Sequence[Frame]) -> np.ndarray:
        """uint8 [B, S, S, 3]: the frames' prepared model inputs, made here where a source did not."""
        s = self.detector_cfg.input_size
        out = np.empty((len(frames), s, s, 3), dtype=np.uint8)
        for i, f in enumerate(frames):
            prepared = f.small
            # Frame.__post_init__ wraps an RGB array given as `picture`, so it is always a Picture here
            out[i] = (
                prepared if prepared is not None and prepared.shape == (s, s, 3) else cast(Picture, f.picture).scaled(s)
            )
        return out

    def _batch_flow(
        self, frames: Sequence[Frame], model_input: np.ndarray, starts: Sequence[bool] | None = None
    ) -> np.ndarray | None:
        """Flow cell features [B, g, g, 3] of a batch: the sources' where they computed them, else from
        each camera's previous frame seen here, unless `starts` says a frame begins a new sequence (None
        when the frame score needs no flow)."""
        if self.flow_extractor is None:
            return None
        grid = self.detector_cfg.grid
        out = np.empty((len(frames), grid, grid, 3), np.float32)
        missing = []
        for i, f in enumerate(frames):
            if f.flow is None:
                missing.append(i)
            else:
                out[i] = f.flow
        if missing:
            out[missing] = self.flow_features(
                model_input[missing],
                [frames[i].camera_id for i in missing],
                indices=[frames[i].index for i in missing],
                starts=None if starts is None else [starts[i] for i in missing],
            )
        return out

    def score_batch(
        self,
        frames: Sequence[Frame],
        all_components: bool = False,
        model_input: np.ndarray | None = None,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ScoredBatch:
        """The live path: scores now, per-frame results later (`ScoredBatch.results`, on the sink
        thread); frame components the frame score does not read are skipped unless `all_components`.
        `model_input` / `features`: the frames' model inputs and backbone features when already computed
        (one backbone pass serves the cameras of several banks, detector/cameras.py)."""
        model_input = self.model_inputs(frames) if model_input is None else model_input
        starts = self.camera_states.sequence_starts(frames)
        flow = self._batch_flow(frames, model_input, starts)
        pyramid, global_features = features if features is not None else self.features(model_input)
        costly = framescore.COSTLY if all_components else self.costly_components_read()
        out, components = self._score(pyramid, global_features, flow, costly)
        scores = self.smoothed_frame_scores(components, [f.camera_id for f in frames], starts)
        return ScoredBatch(
            frames,
            out.maps.float().cpu().numpy(),
            out.neighbours.cpu().numpy(),
            components,
            scores,
            frame_threshold=self.thresholds.frame,
            pixel_threshold=self.thresholds.pixel,
            min_area=self.cfg.regions.min_area,
            k_image=self.detector_cfg.k_image,
        )
