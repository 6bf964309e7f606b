"""The detector: frames in, `FrameResult`s out (backbone -> SPADE -> frame score -> regions)."""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from configs.errors import UserError
from configs.schema import AppConfig
from detector.backbone import FeatureExtractor, build_extractor, resolve_device
from detector.bank import MemoryBank, open_bank
from detector.regions import find_regions
from detector.result import FrameResult
from detector import framescore
from detector.motion import FlowExtractor, FlowTracker, MotionScorer, MovingGate
from detector.spade import SpadeOutput, SpadeScorer
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

    def __init__(self, detector: "Detector", frames: Sequence[Frame], maps: np.ndarray, neighbours: np.ndarray,
                 comps: dict[str, np.ndarray], scores: np.ndarray):
        self.detector, self.frames, self.maps, self.neighbours = detector, frames, maps, neighbours
        self.comps, self.scores = comps, scores

    def results(self) -> list[FrameResult]:
        det = self.detector
        pix_t, frame_t = det.pixel_threshold, det.frame_threshold
        min_area, k_image = det.cfg.regions.min_area, det.dcfg.k_image
        out = []
        for i, f in enumerate(self.frames):
            out.append(FrameResult(
                camera_id=f.camera_id, frame_index=f.index, timestamp=f.timestamp,
                score=float(self.scores[i]), threshold=frame_t, anomaly_map=self.maps[i],
                regions=find_regions(self.maps[i], pix_t, f.size, min_area),
                frame_size=f.size, image_score=float(self.comps["image_knn"][i]),
                components={k: float(v[i]) for k, v in self.comps.items()},
                neighbours=self.neighbours[i, :k_image],
                pixel_threshold=pix_t if math.isfinite(pix_t) else None, wall_ts=f.wall_ts,
            ))
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
    if extractor.precision == "bf16":  # only then: fp32's frozen and eager trunks agree to ~3e-6
        sig["bf16_trunk"] = extractor.trunk_kind
    if d.motion.enabled:  # only then, so banks without motion keep matching configs without it
        sig["motion"] = {"flow_size": d.motion.flow_size, "preset": d.motion.preset, "window": d.motion.window,
                         "centres": d.motion.centres}
    if d.gallery == "coreset":  # likewise: any bank serves gallery knn, only a matching coreset serves this
        sig["coreset"] = d.coreset.model_dump(mode="json")
    return sig


def frame_components(out: SpadeOutput, topq: float, pixel_threshold: float = math.inf,
                     costly: Collection[str] = framescore.COSTLY,
                     moving_weights: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Every frame-level statistic the detector can alert on, each [B] (see detector.framescore); of the
    costly ones (a sort or a connected-components pass per frame) only those named in `costly`."""
    app = out.appearance_maps if out.appearance_maps is not None else out.maps
    return framescore.components(out.image_scores, app, out.maps, out.motion_maps, topq, pixel_threshold,
                                 costly=costly, moving_weights=moving_weights)


def rank_dtype(setting: str, backbone_precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype SpadeScorer ranks candidates in (None: float32). 'auto' ranks in bf16 only on the CPU
    with a bf16 backbone: there a bf16 product is ~8x faster than float32 and the features are
    bf16-rounded anyway. On a GPU float32 stays: it is not the bottleneck there and GPU-vs-CPU checks
    compare against it."""
    if setting == "auto":
        setting = "bf16" if backbone_precision == "bf16" and device.type == "cpu" else "fp32"
    return torch.bfloat16 if setting == "bf16" else None


MOTION_FLOW_FLOOR = 0.25  # flow px/frame: the motion map's normaliser never goes below this
MAX_FRAME_GAP = 8  # a camera's previous frame further back than this many frames is not used for flow


class Detector:
    """Scores frames against a memory bank.

    Per-camera state (keyed by camera id): the previous frame's grayscale for optical flow and the
    causal smoothing window of frame scores. Frames of one camera must arrive in capture order.
    """

    def __init__(self, cfg: AppConfig, extractor: FeatureExtractor, bank: MemoryBank | None, device: torch.device):
        self.cfg = cfg
        self.dcfg = cfg.detector
        self.extractor = extractor
        self.device = device
        self.bank = bank
        self.scorer = None
        d = self.dcfg
        self.flow = FlowExtractor(d.motion.flow_size, d.grid, d.motion.preset) if d.needs_flow else None
        self.motion_scorer = None
        if bank is not None:
            self.scorer = SpadeScorer(bank, k_image=d.k_image, k_gallery=d.k_gallery, kappa=d.kappa,
                                      sigma=d.sigma, input_size=d.input_size, device=device,
                                      spatial_window=d.spatial_window, pixel_bank=d.pixel_bank,
                                      gallery=d.gallery,
                                      rank_dtype=rank_dtype(d.rank_precision, extractor.precision, device))
            if d.motion.enabled:
                if bank.motion_model is None:
                    raise UserError(f"{bank.directory}: detector.motion.enabled needs a bank fitted with motion "
                                    "(fit it again with this config)")
                self.motion_scorer = MotionScorer(bank.motion_model, d.grid, device)
        self._pin = device.type == "cuda"
        self._lock = threading.Lock()
        self._prev: dict[str, tuple[int, np.ndarray]] = {}  # camera -> (frame index, flow gray)
        self._smoother = framescore.CausalSmoother(d.smooth_window)
        self._sequence: dict[str, int] = {}  # camera -> Frame.sequence of its latest frame scored live
        self._frame_cal: dict | None = None
        self.moving_gate: MovingGate | None = None
        if bank is not None and "flow_noise" in bank.calibration:
            self.set_flow_noise(bank.calibration["flow_noise"])

    def set_flow_noise(self, noise: float) -> None:
        """Arm the moving_max gate with the camera's flow noise floor (fit measures it on the normal footage);
        only a frame score that reads moving_max arms it."""
        if not self.uses_component("moving_max"):
            return
        m = self.dcfg.moving
        self.moving_gate = MovingGate(float(noise), m.noise_factor, m.static_weight, m.dilate,
                                      self.dcfg.input_size, self.device)

    # construction -------------------------------------------------------------------------------
    @staticmethod
    def build_extractor(cfg: AppConfig) -> tuple[FeatureExtractor, torch.device]:
        device = resolve_device(cfg.detector.device)
        if cfg.detector.threads:
            torch.set_num_threads(cfg.detector.threads)
        return build_extractor(cfg.detector.backbone, cfg.detector.grid, device, cfg.detector.precision), device

    @classmethod
    def load(cls, cfg: AppConfig, bank_dir: str | Path, share: "Detector | None" = None) -> "Detector":
        """The detector of the bank in `bank_dir`; with `share`, it runs that detector's backbone instead of
        building one (several banks scored in one process: scenes, cameras)."""
        extractor, device = (share.extractor, share.device) if share is not None else cls.build_extractor(cfg)
        bank = open_bank(Path(bank_dir), expected=bank_signature(cfg, extractor))
        det = cls(cfg, extractor, bank, device)
        if det.uses_component("moving_max") and det.moving_gate is None:
            raise UserError(f"{bank_dir}: frame score 'moving_max' needs the flow noise floor of the normal footage, "
                            "which this bank lacks: it was fitted without moving_max (fit it again with this config)")
        from detector.fit import scoring_settings  # fit imports this module

        fitted = bank.calibration.get("scoring")
        if fitted is not None and fitted != scoring_settings(cfg):
            now = scoring_settings(cfg)
            diff = {k: (fitted.get(k), now.get(k)) for k in {**fitted, **now} if fitted.get(k) != now.get(k)}
            log.warning("%s: thresholds were calibrated with other scoring settings %s (fitted, now): "
                        "fit the bank again with this config for calibrated thresholds", bank_dir, diff)
        det.frame_calibration()  # fail now, not on the first frame, if the frame score cannot be calibrated
        return det

    def warm_up(self, batch: int) -> None:
        """One backbone pass on a blank batch, so that the first camera frames do not wait for the trunk's
        trace (CPU: ~1 s) or for kernel selection."""
        s = self.dcfg.input_size
        with torch.inference_mode():
            self.features(np.zeros((max(1, batch), s, s, 3), dtype=np.uint8))

    def reset(self, camera_id: str | None = None) -> None:
        """Forget the previous frame and smoothing window of one camera (None: of all cameras)."""
        with self._lock:
            if camera_id is None:
                self._prev.clear()
                self._sequence.clear()
            else:
                self._prev.pop(camera_id, None)
                self._sequence.pop(camera_id, None)
            self._smoother.reset(camera_id)

    # thresholds ---------------------------------------------------------------------------------
    @property
    def calibration(self) -> dict:
        return self.bank.calibration if self.bank is not None else {}

    @property
    def source_fps(self) -> float:
        """The frame rate of the normal footage the bank was fitted on (25 when unknown): alarm rates per
        hour and the annotated video's default rate refer to it."""
        return float(self.calibration.get("fps", 25.0))

    @property
    def pixel_threshold(self) -> float:
        if self.cfg.regions.threshold is not None:
            return float(self.cfg.regions.threshold)
        return float(self.calibration.get("pixel_threshold", math.inf))

    def component_stats(self) -> dict[str, dict]:
        """Held-out normal statistics of every component (from the stored sequences when present)."""
        cal = self.calibration
        seqs = cal.get("holdout_components")
        if seqs:
            return {k: framescore.stats_of(np.asarray(v)) for k, v in seqs.items() if len(v)}
        return dict(cal.get("frame", {}))

    def frame_calibration(self) -> dict:
        """Statistics and threshold of the configured frame score (after smoothing) on held-out frames.

        Computed from the held-out component sequences stored in the bank, so the threshold always
        belongs to the frame score, combination and smoothing in force now.
        """
        if self._frame_cal is not None:
            return self._frame_cal
        cal = self.calibration
        seqs = cal.get("holdout_components")
        name = self.dcfg.frame_score
        if seqs:
            comps = {k: np.asarray(v, dtype=np.float64) for k, v in seqs.items()}
            if name != "combined" and name not in comps:
                raise UserError(f"{self.bank.directory}: frame_score {name!r} was not calibrated in this bank "
                                "(fit it again with this config)")
            raw = self.frame_scores(comps)
            items = np.asarray(cal.get("holdout_items", [0] * len(raw)))
            seq = framescore.causal_mean(raw, self.dcfg.smooth_window, items)
            res = framescore.stats_of(seq)
            res["threshold"] = framescore.tail_threshold(seq, cal["target_false_alarms_per_hour"], cal["fps"])
        else:  # version-1 bank: per-component statistics only
            if name == "combined":
                self.frame_scores({k: np.zeros(1) for k in self.dcfg.combine})  # raises if uncalibrated
            res = dict(cal.get("frame", {}).get(name, {}))
        self._frame_cal = res
        return res

    @property
    def frame_threshold(self) -> float:
        if self.cfg.alerts.enter_threshold is not None:
            return float(self.cfg.alerts.enter_threshold)
        if not self.calibration:
            return math.inf
        return float(self.frame_calibration().get("threshold", math.inf))

    # inference ----------------------------------------------------------------------------------
    def to_device(self, batch_u8: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(batch_u8)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def features(self, batch_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extractor(self.to_device(batch_u8))

    def motion_features(self, batch_u8: np.ndarray, camera_ids: Sequence[str] | str = "default",
                        prev_u8: Sequence[np.ndarray | None] | None = None,
                        indices: Sequence[int] | None = None,
                        starts: Sequence[bool] | None = None) -> np.ndarray | None:
        """float32 [B, g, g, 3] flow cell features of resized frames; None when motion is off.

        With `prev_u8` (resized previous frames, None entries for "no previous frame") the camera state
        is neither read nor updated: offline readers that sample every N-th frame pass the true t-1.
        Otherwise each frame's previous frame is its camera's last frame seen (frames in capture order);
        `indices` (frame indices) let a gap of a few dropped frames be bridged by scaling the flow;
        `starts` marks frames that begin a new sequence of their camera (no flow from before it).
        """
        if self.flow is None:
            return None
        b = len(batch_u8)
        cams = [camera_ids] * b if isinstance(camera_ids, str) else list(camera_ids)
        out = np.empty((b, self.dcfg.grid, self.dcfg.grid, 3), np.float32)
        for i in range(b):
            gray = self.flow.gray(batch_u8[i])
            if prev_u8 is not None:
                p = prev_u8[i]
                out[i] = self.flow(None if p is None else self.flow.gray(p), gray)
                continue
            idx = None if indices is None else int(indices[i])
            with self._lock:
                prev = None if starts is not None and starts[i] else self._prev.get(cams[i])
                self._prev[cams[i]] = (idx, gray)
            gap = 1
            if prev is not None and idx is not None and prev[0] is not None:
                gap = idx - prev[0]
                if gap < 1 or gap > MAX_FRAME_GAP:  # a restart or a long drop: no usable previous frame
                    prev = None
            out[i] = self.flow(None if prev is None else prev[1], gray)
            if gap > 1:
                out[i] /= gap
        return out

    def combine_maps(self, app: torch.Tensor, motion: torch.Tensor | None) -> torch.Tensor:
        """The final pixel map: appearance, plus the motion map when both are normalised on held-out frames.

        Each map is scaled so that its held-out normal `pixel_quantile` is 1 (appearance also shifted by
        its held-out mean), then they are added with weight `motion.weight`.
        """
        norm = self.calibration.get("pixel_norm")
        w = self.dcfg.motion.weight
        if motion is None or w == 0 or not norm:
            return app
        a, m = norm["appearance"], norm["motion"]
        an = (app - a["mean"]) / max(a["q"] - a["mean"], 1e-6)
        return an + w * motion / max(m["q"], MOTION_FLOW_FLOOR)

    @torch.inference_mode()
    def score_tensors(self, pyramid: torch.Tensor, glob: torch.Tensor, motion: np.ndarray | None = None,
                      all_components: bool = True) -> tuple[SpadeOutput, dict[str, np.ndarray]]:
        if self.scorer is None:
            raise RuntimeError("detector has no memory bank")
        out = self.scorer.score(pyramid, glob)
        if self.motion_scorer is not None:
            mmaps = self.scorer.upsample(self.motion_scorer.score(self._flow_or_still(motion, pyramid.shape[0])))
            final = self.combine_maps(out.maps, mmaps)
            out = SpadeOutput(out.image_scores, out.neighbours, final, appearance_maps=out.maps, motion_maps=mmaps)
        costly = framescore.COSTLY if all_components else self.costly_components_read()
        weights = self.moving_weights(motion, pyramid.shape[0])
        comps = frame_components(out, self.dcfg.topq, self.pixel_threshold, costly=costly, moving_weights=weights)
        return out, comps

    def _flow_or_still(self, motion: np.ndarray | None, batch: int) -> np.ndarray:
        """The batch's flow cell features; zero flow when none is known (no previous frame: nothing moves)."""
        if motion is not None:
            return motion
        return np.zeros((batch, self.dcfg.grid, self.dcfg.grid, 3), np.float32)

    def moving_weights(self, motion: np.ndarray | None, batch: int) -> torch.Tensor | None:
        """moving_max's per-pixel weights [B, S, S] of a batch; None unless the frame score reads moving_max."""
        if self.moving_gate is None:
            return None
        return self.moving_gate(self._flow_or_still(motion, batch))

    def costly_components_read(self) -> set[str]:
        """The costly frame components (framescore.COSTLY) that the configured frame score reads: the
        only ones the live path computes."""
        return {c for c in framescore.COSTLY if self.uses_component(c)}

    def uses_component(self, name: str) -> bool:
        """Whether the configured frame score reads component `name`."""
        return name in self.dcfg.components_used()

    def frame_scores(self, comps: dict[str, np.ndarray]) -> np.ndarray:
        """The configured frame score (before smoothing); 'combined' is the mean held-out z-score of
        the components listed in detector.combine."""
        name = self.dcfg.frame_score
        if name == "combined":
            try:
                return framescore.combine(comps, list(self.dcfg.combine), self.component_stats())
            except KeyError as err:
                where = self.bank.directory if self.bank is not None else "detector"
                raise UserError(f"{where}: frame_score 'combined' needs held-out statistics of {err.args[0]} "
                                "(fit the bank again with bank.holdout > 0 and this config)") from None
        return comps[name]

    def smooth(self, camera_ids: Sequence[str], scores: np.ndarray, starts: Sequence[bool] | None = None) -> np.ndarray:
        """Each camera's causal mean, in order; `starts`: frames that begin a new sequence of their camera,
        whose window then restarts with them."""
        if self.dcfg.smooth_window <= 1:
            return scores
        starts = starts if starts is not None else [False] * len(camera_ids)
        with self._lock:
            out = []
            for c, v, start in zip(camera_ids, scores, starts):
                if start:
                    self._smoother.reset(c)
                out.append(self._smoother(c, v))
            return np.array(out)

    def sequence_starts(self, frames: Sequence[Frame]) -> list[bool]:
        """Which frames begin a new sequence (Frame.sequence) of their camera since the last one scored.
        A camera's first frame ever is not counted: its windows are empty anyway."""
        with self._lock:
            out = []
            for f in frames:
                last = self._sequence.get(f.camera_id)
                out.append(last is not None and last != f.sequence)
                self._sequence[f.camera_id] = f.sequence
            return out

    def _score_resized(self, small: np.ndarray, cams: list[str], prev_small=None, indices=None,
                       all_components: bool = True, motion: np.ndarray | None = None,
                       features: tuple[torch.Tensor, torch.Tensor] | None = None, starts: Sequence[bool] | None = None):
        pyr, glob = features if features is not None else self.features(small)
        if motion is None:
            motion = self.motion_features(small, cams, prev_small, indices, starts)
        out, comps = self.score_tensors(pyr, glob, motion, all_components=all_components)
        return out, comps, self.smooth(cams, self.frame_scores(comps), starts)

    def score_images(self, images: Sequence[np.ndarray], camera_id: str = "default",
                     prev_images: Sequence[np.ndarray | None] | None = None
                     ) -> tuple[SpadeOutput, dict[str, np.ndarray], np.ndarray]:
        """Score consecutive images of one camera, in order. `prev_images`: the true previous frame of
        each image (for motion when images are not consecutive), else the camera's state is used."""
        s = self.dcfg.input_size
        small = resize_batch(images, s)
        prev_small = None
        if prev_images is not None and self.flow is not None:
            prev_small = [None if p is None else resize_batch([p], s)[0] for p in prev_images]
        return self._score_resized(small, [camera_id] * len(images), prev_small)

    def flow_tracker(self) -> FlowTracker | None:
        """A new per-source flow state for a source's decode thread (None: the frame score needs no flow)."""
        if self.flow is None:
            return None
        m = self.dcfg.motion
        return FlowTracker(FlowExtractor(m.flow_size, self.dcfg.grid, m.preset))

    def frame_motion(self, frames: Sequence[Frame], small: np.ndarray,
                     starts: Sequence[bool] | None = None) -> np.ndarray | None:
        """Flow cell features [B, g, g, 3] of a batch: the sources' where they computed them, else from
        each camera's previous frame seen here, unless `starts` says a frame begins a new sequence (None
        when the frame score needs no flow)."""
        if self.flow is None:
            return None
        out = np.empty((len(frames), self.dcfg.grid, self.dcfg.grid, 3), np.float32)
        missing = []
        for i, f in enumerate(frames):
            if f.flow is None:
                missing.append(i)
            else:
                out[i] = f.flow
        if missing:
            out[missing] = self.motion_features(small[missing], [frames[i].camera_id for i in missing],
                                                indices=[frames[i].index for i in missing],
                                                starts=None if starts is None else [starts[i] for i in missing])
        return out

    def prepare(self, picture: Picture) -> np.ndarray:
        """The model input of one decoded frame; sources call it on their own decode threads, so
        resizing runs in parallel across cameras instead of serially on the detector thread."""
        return picture.scaled(self.dcfg.input_size)

    def model_inputs(self, frames: Sequence[Frame]) -> np.ndarray:
        s = self.dcfg.input_size
        out = np.empty((len(frames), s, s, 3), dtype=np.uint8)
        for i, f in enumerate(frames):
            small = f.small
            out[i] = small if small is not None and small.shape == (s, s, 3) else f.picture.scaled(s)
        return out

    def score_frames(self, frames: Sequence[Frame]) -> list[FrameResult]:
        """Results of a batch, every frame component included (evaluation, tests)."""
        return self.score_batch(frames, all_components=True).results()

    def score_batch(self, frames: Sequence[Frame], all_components: bool = False, small: np.ndarray | None = None,
                    features: tuple[torch.Tensor, torch.Tensor] | None = None) -> ScoredBatch:
        """The live path: scores now, per-frame results later (`ScoredBatch.results`, on the sink
        thread); frame components the frame score does not read are skipped unless `all_components`.
        `small` / `features`: the frames' model inputs and backbone features when already computed (one
        backbone pass serves the cameras of several banks, detector/cameras.py)."""
        small = self.model_inputs(frames) if small is None else small
        starts = self.sequence_starts(frames)
        out, comps, scores = self._score_resized(small, [f.camera_id for f in frames], all_components=all_components,
                                                 motion=self.frame_motion(frames, small, starts), features=features,
                                                 starts=starts)
        return self.scored(frames, out, comps, scores)

    def scored(self, frames: Sequence[Frame], out: SpadeOutput, comps: dict[str, np.ndarray],
               scores: np.ndarray) -> ScoredBatch:
        return ScoredBatch(self, frames, out.maps.float().cpu().numpy(), out.neighbours.cpu().numpy(), comps, scores)

    def results(self, frames: Sequence[Frame], out: SpadeOutput, comps: dict[str, np.ndarray],
                scores: np.ndarray) -> list[FrameResult]:
        return self.scored(frames, out, comps, scores).results()
