"""Fitting a memory bank from normal footage, streaming to disk, then calibrating thresholds."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs.errors import UserError
from configs.schema import AppConfig
from detector import framescore
from detector.bank import PIXEL, BankWriter, clear_bank, open_bank, write_coreset, write_meta
from detector.coreset import build_coreset
from detector.detector import Detector, bank_signature, load_backbone
from detector.motion import build_motion_model, flow_noise, frame_flow_medians
from detector.scenes import scene_dir, split_by_scene, write_index
from detector.thresholds import combine_maps, scoring_settings
from stream.allocator import HeapTrimmer
from stream.footage import FootageItem, check_counts, discover, iter_frames, select_indices, stc_training_dir
from stream.prefetch import prefetch

log = logging.getLogger(__name__)


class FrameSpool:
    """Held-out frames (uint8 [S, S, 3], or None) kept in a temporary file, not in RAM: a 10 % holdout
    of a 20,000-frame fit is 2,000 frames, and `fit` promises RAM bounded by a batch."""

    def __init__(self, path: Path, size: int):
        self.path, self.shape = Path(path), (size, size, 3)
        self._f = open(self.path, "w+b")
        self._present: list[bool] = []

    def append(self, img: np.ndarray | None) -> None:
        self._present.append(img is not None)
        self._f.write((img if img is not None else np.zeros(self.shape, np.uint8)).tobytes())

    def __len__(self) -> int:
        return len(self._present)

    def __getitem__(self, sl: slice) -> list:
        start, stop, _ = sl.indices(len(self))
        self._f.flush()
        n = int(np.prod(self.shape))
        data = np.fromfile(self.path, dtype=np.uint8, count=(stop - start) * n, offset=start * n)
        imgs = data.reshape((stop - start,) + self.shape)
        return [imgs[k] if self._present[start + k] else None for k in range(stop - start)]

    def close(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def split_holdout(selected: list[list[int]], fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """Hold out the last `fraction` of each item's selected frames, as one contiguous stretch.

    Neighbouring frames of a fixed camera are near-duplicates: an interleaved holdout would find its
    twin in the bank and calibrate thresholds far too low. A separate stretch of time is unseen footage.
    """
    bank, hold = [], []
    for idx in selected:
        k = int(round(len(idx) * fraction)) if len(idx) >= 4 else 0
        bank.append(idx[: len(idx) - k])
        hold.append(idx[len(idx) - k :])
    if fraction > 0 and not any(hold) and sum(len(b) for b in bank) >= 2:
        # Too little footage per item for a stretch: hold out the tail of the longest item instead.
        i = max(range(len(bank)), key=lambda j: len(bank[j]))
        k = max(1, int(round(len(bank[i]) * fraction)))
        bank[i], hold[i] = bank[i][:-k], bank[i][-k:]
    return bank, hold


def _frames(items: list[FootageItem], wanted: list[set[int]], size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(item index, frame index, model input uint8 [S, S, 3]) of the wanted frames, decoded and shrunk
    ahead in a thread, the same way as the live sources do (stream.picture)."""

    def produce():
        for i, (item, w) in enumerate(zip(items, wanted)):
            if w:
                for f, picture in iter_frames(item, w):
                    yield i, f, picture.scaled(size)

    return prefetch(produce, maxsize=64, name="fit-decode")


def fit_bank(cfg: AppConfig, data: str | Path, bank_dir: str | Path, progress: bool = True) -> dict:
    """Build a bank in `bank_dir` from the normal footage under `data`; returns its metadata, or
    {"scenes": {scene: metadata}} when it is split by scene (`bank.per_scene`, detector/scenes.py)."""
    bank_dir = Path(bank_dir)
    items = discover(data)
    bcfg = cfg.bank
    # Frames are chosen over all the footage first: a per-scene fit decodes and stores what a pooled one does.
    selected = select_indices([it.n_frames for it in items], bcfg.every, bcfg.max_frames)
    scenes = split_by_scene([it.name for it in items], bcfg.per_scene, stc_training_dir(data) is not None)
    extractor, device = load_backbone(cfg)
    if not scenes:
        return _fit_items(cfg, items, selected, bank_dir, extractor, device, progress, data)
    bank_dir.mkdir(parents=True, exist_ok=True)
    clear_bank(bank_dir)
    metas: dict[str, dict] = {}
    for scene, idx in scenes.items():
        log.info("%s: scene %s (%d of %d scenes): %d videos", bank_dir, scene, len(metas) + 1, len(scenes), len(idx))
        metas[scene] = _fit_items(
            cfg,
            [items[i] for i in idx],
            [selected[i] for i in idx],
            bank_dir / scene_dir(scene),
            extractor,
            device,
            progress,
            f"{data} (scene {scene})",
            desc=f"fit scene {scene}",
        )
        write_index(bank_dir, list(metas))
    return {"scenes": metas}


@dataclass
class FitPlan:
    """Which frames of each footage item go into the bank, which are held out for calibration, and which
    must be decoded (both, plus each one's predecessor t-1 when the frame score needs flow)."""

    bank_frames: list[list[int]]
    holdout_frames: list[list[int]]
    bank_sets: list[set[int]]
    holdout_sets: list[set[int]]
    wanted: list[set[int]]

    @classmethod
    def of(cls, selected: list[list[int]], holdout: float, needs_flow: bool) -> FitPlan:
        bank_frames, holdout_frames = split_holdout(selected, holdout)
        bank_sets = [set(x) for x in bank_frames]
        holdout_sets = [set(x) for x in holdout_frames]
        wanted = [b | h for b, h in zip(bank_sets, holdout_sets)]
        if needs_flow:  # flow needs each selected frame's true predecessor t-1
            wanted = [w | {f - 1 for f in w if f > 0} for w in wanted]
        return cls(bank_frames, holdout_frames, bank_sets, holdout_sets, wanted)


class BankFrames:
    """The bank's frames, fed one by one and written to the bank a batch at a time: their features, and
    with flow each one's flow cell features (the motion model) and median cell flow (the noise floor)."""

    def __init__(self, det: Detector, writer: BankWriter, batch_size: int, keep_motion: bool):
        self.det, self.writer, self.batch_size, self.keep_motion = det, writer, batch_size, keep_motion
        self.needs_flow = det.flow_extractor is not None
        self.motion_features: list[np.ndarray] = []
        self.flow_medians: list[np.ndarray] = []  # bank frames' median cell flow (the moving gate's noise floor)
        self._inputs: list[np.ndarray] = []
        self._previous: list[np.ndarray | None] = []
        self._origins: list[tuple[int, int]] = []

    def add(self, model_input: np.ndarray, previous: np.ndarray | None, origin: tuple[int, int]) -> bool:
        """Add a frame; True when that completed a batch (written now)."""
        self._inputs.append(model_input)
        self._previous.append(previous)
        self._origins.append(origin)
        if len(self._inputs) < self.batch_size:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if not self._inputs:
            return
        stack = np.stack(self._inputs)
        pyramid, global_features = self.det.features(stack)
        self.writer.append(pyramid.cpu().numpy(), global_features.cpu().numpy(), list(self._origins))
        if self.needs_flow:
            flow = self.det.flow_features(stack, previous=list(self._previous))
            assert flow is not None, "needs_flow: the detector has a flow extractor"
            self.flow_medians.append(frame_flow_medians(flow, self._previous))
            if self.keep_motion:
                self.motion_features.append(flow.astype(np.float16))
        self._inputs.clear()
        self._origins.clear()
        self._previous.clear()

    def all_flow_medians(self) -> np.ndarray | None:
        return np.concatenate(self.flow_medians) if self.flow_medians else None


class HoldoutFrames:
    """Held-out frames in time order, with their predecessors when the frame score needs flow and the
    footage item each came from; spooled to temporary files (`FrameSpool`), removed by `close`."""

    def __init__(self, bank_dir: Path, size: int, needs_flow: bool):
        self.frames = FrameSpool(bank_dir / "holdout.tmp", size)
        self.previous = FrameSpool(bank_dir / "holdout_prev.tmp", size) if needs_flow else None
        self.items: list[int] = []

    def add(self, item: int, model_input: np.ndarray, previous: np.ndarray | None) -> None:
        self.frames.append(model_input)
        if self.previous is not None:
            self.previous.append(previous)
        self.items.append(item)

    def close(self) -> None:
        for spool in (self.frames, self.previous):
            if spool is not None:
                spool.close()


def _read_footage(
    items: list[FootageItem],
    plan: FitPlan,
    size: int,
    bank_frames: BankFrames,
    holdout: HoldoutFrames,
    progress: bool,
    desc: str,
) -> None:
    """Decode the planned frames once, in order, handing each to the bank or the holdout with its true
    predecessor (None unless frame t-1 was decoded just before it)."""
    last: dict[int, tuple[int, np.ndarray]] = {}  # item -> (frame index, model input)
    trimmer = HeapTrimmer()
    bar = tqdm(total=sum(map(len, plan.wanted)), desc=desc, unit="frame", disable=not progress, dynamic_ncols=True)
    try:
        for i, f, model_input in _frames(items, plan.wanted, size):
            prev = last.get(i)
            previous = prev[1] if prev is not None and prev[0] == f - 1 else None
            last[i] = (f, model_input)
            if f in plan.holdout_sets[i]:
                holdout.add(i, model_input, previous)
            elif f in plan.bank_sets[i]:
                if bank_frames.add(model_input, previous, (i, f)):
                    trimmer.maybe()
            bar.update(1)
        bank_frames.flush()
    except BaseException:
        bank_frames.writer.abort()
        raise
    finally:
        bar.close()


def _bank_meta(cfg: AppConfig, signature: dict, extractor, items: list[FootageItem], plan: FitPlan) -> dict:
    """The bank's metadata before calibration: its signature, where its frames came from, how it was fitted."""
    bcfg = cfg.bank
    meta = dict(signature)
    meta.update(
        weights_origin=extractor.weights_origin,
        layers="blocks 1-3 (strides 4, 8, 16)",
        sources=[
            {
                "path": str(it.path),
                "kind": it.kind,
                "frames": it.n_frames,
                "decoded": it.decoded,
                "fps": it.fps,
                "selected": len(b),
                "holdout": len(h),
            }
            for it, b, h in zip(items, plan.bank_frames, plan.holdout_frames)
        ],
        count_warnings=[w for w in (check_counts(it) for it in items) if w],
        fit={"every": bcfg.every, "max_frames": bcfg.max_frames, "holdout": bcfg.holdout},
    )
    return meta


def _finish_bank(
    cfg: AppConfig,
    bank_dir: Path,
    writer: BankWriter,
    meta: dict,
    signature: dict,
    bank_frames: BankFrames,
    device: torch.device,
) -> None:
    """Write the bank's metadata and motion model, then its coreset (detector.gallery: coreset)."""
    # Written by write_coreset once the coreset exists: a bank whose selection was interrupted is a
    # complete knn bank and is refused, by name, by a config asking for the coreset.
    coreset_params = meta.pop("coreset", None)
    motion_model = None
    if cfg.detector.motion.enabled:
        motion_cfg = cfg.detector.motion
        motion_model = build_motion_model(
            np.concatenate(bank_frames.motion_features).astype(np.float32), motion_cfg.window, motion_cfg.centres
        )
        meta["motion"] = signature["motion"]
    writer.finish(meta, motion_model)
    if coreset_params is not None:
        fit_coreset(cfg, bank_dir, writer, device)


def _fit_items(
    cfg: AppConfig,
    items: list[FootageItem],
    selected: list[list[int]],
    bank_dir: Path,
    extractor,
    device: torch.device,
    progress: bool,
    data,
    desc: str = "fit",
) -> dict:
    """Fit one bank from `items`' `selected` frames (`data` names them in errors, `desc` in the progress bar):
    plan -> read the footage into the bank and the holdout -> finish the bank -> calibrate on the holdout."""
    needs_flow = cfg.detector.needs_flow
    plan = FitPlan.of(selected, cfg.bank.holdout, needs_flow)
    if sum(map(len, plan.bank_frames)) == 0:
        raise UserError(f"{data}: no frames selected for the bank (check bank.every / bank.max_frames)")
    signature = bank_signature(cfg, extractor)
    size = cfg.detector.input_size
    writer = BankWriter(
        bank_dir, pixel_dim=extractor.pixel_dim, grid=cfg.detector.grid, global_dim=extractor.global_dim
    )
    bank_frames = BankFrames(
        Detector(cfg, extractor, None, device), writer, cfg.detector.batch_size, keep_motion=cfg.detector.motion.enabled
    )
    holdout = HoldoutFrames(bank_dir, size, needs_flow)
    try:  # the spools are temporary files: removed however fit ends
        _read_footage(items, plan, size, bank_frames, holdout, progress, desc)
        _finish_bank(
            cfg, bank_dir, writer, _bank_meta(cfg, signature, extractor, items, plan), signature, bank_frames, device
        )
        bank = open_bank(bank_dir)
        meta = bank.meta
        fps = float(np.median([it.fps for it in items])) if items else 25.0
        if len(holdout.frames):
            det = Detector(cfg, extractor, bank, device)
            meta["calibration"] = calibrate(
                det, holdout.frames, fps, cfg, holdout.previous, holdout.items, bank_frames.all_flow_medians()
            )
        else:
            log.warning("%s: no held-out frames (bank.holdout=0): thresholds must be set in the config", bank_dir)
            meta["calibration"] = {}
            bank_medians = bank_frames.all_flow_medians()  # None when no bank frame's flow was computed
            if bank_medians is not None:  # moving_max needs only the noise floor, which bank frames give as well
                meta["calibration"]["flow_noise"] = flow_noise(bank_medians)
        write_meta(bank_dir, meta)
        return meta
    finally:
        holdout.close()


def fit_coreset(cfg: AppConfig, bank_dir: Path, writer: BankWriter, device: torch.device) -> dict:
    """Select the coreset of a finished bank's pixel.f16 and add it to the bank (detector.gallery: coreset)."""
    cc = cfg.detector.coreset
    shape = (writer.n, writer.grid * writer.grid, writer.pixel_dim)
    log.info(
        "%s: selecting the coreset (%d patch features, fraction %g, at most %s candidates) on %s",
        bank_dir,
        shape[0] * shape[1],
        cc.fraction,
        cc.max_features,
        device,
    )
    feats, index, stats = build_coreset(
        bank_dir / PIXEL,
        shape,
        fraction=cc.fraction,
        max_size=cc.max_size,
        projection_dim=cc.projection_dim,
        max_features=cc.max_features,
        seed=cc.seed,
        device=device,
    )
    log.info("%s: coreset of %d features selected in %.1f s", bank_dir, stats["size"], stats["total_s"])
    return write_coreset(bank_dir, feats, index, cc.model_dump(mode="json"), stats)


def calibrate(
    det: Detector,
    holdout: FrameSpool | list[np.ndarray],
    fps: float,
    cfg: AppConfig,
    prev: FrameSpool | list[np.ndarray | None] | None = None,
    items: list[int] | None = None,
    flow_medians: np.ndarray | None = None,
) -> dict:
    """Score held-out normal frames against the finished bank; store what thresholds need.

    With `prev` (each held-out frame's predecessor) and a detector that computes flow, the flow noise
    floor is measured on the held-out frames plus `flow_medians` (the bank frames' median cell flow).

    Stores per-component statistics and, since bank format 2, the component values of every held-out
    frame in time order, so the detector can calibrate any frame score / smoothing when it loads.
    Steps: flow and noise floor -> score (offline path, uncalibrated) -> pixel threshold -> frame statistics.
    """
    assert det.bank is not None, "calibration is stored in the detector's bank"
    det.bank.calibration = {}  # scored uncalibrated: no pixel normalisation, no calibrated pixel threshold
    batch_size = cfg.detector.batch_size
    flows, noise = None, None
    if prev is not None and det.flow_extractor is not None:  # flow first: the moving gate needs the noise floor
        flows, noise = _holdout_flow(det, holdout, prev, batch_size, flow_medians)
        det.set_flow_noise(noise)
    scored = _score_holdout(det, holdout, flows, batch_size)
    pixels = _pixel_calibration(scored, cfg.bank.pixel_quantile, cfg.detector.motion.weight)
    sequences = {k: np.concatenate(v).astype(np.float64) for k, v in scored.components.items()}
    sequences["regions"] = framescore.region_scores(pixels.final_maps, pixels.threshold, stride=1)
    rate = cfg.bank.target_false_alarms_per_hour
    final = pixels.final_maps
    cal = {
        "n_holdout": len(holdout),
        "fps": fps,
        "target_false_alarms_per_hour": rate,
        "pixel_quantile": cfg.bank.pixel_quantile,
        "pixel_threshold": pixels.threshold,
        "pixel_stats": {"mean": float(final.mean()), "std": float(final.std()), "max": float(final.max())},
        "frame": _frame_statistics(sequences, list(cfg.detector.combine), rate, fps),
        "holdout_items": [int(i) for i in (items if items is not None else [0] * len(holdout))],
        "holdout_components": {k: [round(float(x), 6) for x in v] for k, v in sequences.items()},
    }
    if pixels.norm is not None:
        cal["pixel_norm"] = pixels.norm
    if noise is not None:
        cal["flow_noise"] = noise
    cal["scoring"] = scoring_settings(cfg)
    det.bank.calibration = cal
    return cal


def _holdout_flow(
    det: Detector, holdout, prev, batch_size: int, flow_medians: np.ndarray | None
) -> tuple[list[np.ndarray], float]:
    """Each held-out batch's flow cell features against its true predecessors, and the flow noise floor of
    the held-out frames plus the bank frames' `flow_medians`."""
    flows: list[np.ndarray] = []
    medians = [] if flow_medians is None else [np.asarray(flow_medians, dtype=np.float32)]
    for s in range(0, len(holdout), batch_size):
        before = prev[s : s + batch_size]
        flow = det.flow_features(np.stack(holdout[s : s + batch_size]), previous=before)
        assert flow is not None, "called only for a detector with a flow extractor"
        flows.append(flow)
        medians.append(frame_flow_medians(flows[-1], before))
    return flows, flow_noise(np.concatenate(medians))


@dataclass
class HoldoutScores:
    components: dict[str, list[np.ndarray]]  # component -> one array per batch
    appearance_maps: np.ndarray  # [N, S/4, S/4] every 4th pixel of the appearance maps
    motion_maps: np.ndarray | None  # likewise of the motion maps (None: no motion model)


def _score_holdout(det: Detector, holdout, flows: list[np.ndarray] | None, batch_size: int) -> HoldoutScores:
    """The held-out frames through the offline path, batch by batch: their components and subsampled maps."""
    components: dict[str, list[np.ndarray]] = {}
    appearance, motion = [], []
    trimmer = HeapTrimmer()
    for j, s in enumerate(range(0, len(holdout), batch_size)):
        trimmer.maybe()
        out, batch_components = det.score_offline(
            np.stack(holdout[s : s + batch_size]), flows[j] if flows is not None else None
        )
        for k, v in batch_components.items():
            components.setdefault(k, []).append(v)
        app = out.appearance_maps if out.appearance_maps is not None else out.maps
        # Copies, not strided views: a view would keep each batch's full-size maps alive.
        appearance.append(np.ascontiguousarray(app[:, ::4, ::4].float().cpu().numpy()))
        if out.motion_maps is not None:
            motion.append(np.ascontiguousarray(out.motion_maps[:, ::4, ::4].float().cpu().numpy()))
    return HoldoutScores(components, np.concatenate(appearance), np.concatenate(motion) if motion else None)


@dataclass
class PixelCalibration:
    final_maps: np.ndarray  # the held-out final pixel maps (subsampled)
    threshold: float  # their `pixel_quantile`
    norm: dict | None  # the appearance and motion maps' normalisation (None: no motion)


def _pixel_calibration(scored: HoldoutScores, quantile: float, motion_weight: float) -> PixelCalibration:
    """The pixel threshold: the held-out final maps' quantile, after normalising appearance and motion."""
    app_maps = scored.appearance_maps
    norm = None
    final = app_maps
    if scored.motion_maps is not None:
        mot_maps = scored.motion_maps
        norm = {
            "appearance": {"mean": float(app_maps.mean()), "q": float(np.quantile(app_maps, quantile))},
            "motion": {"mean": float(mot_maps.mean()), "q": float(np.quantile(mot_maps, quantile))},
        }
        final = combine_maps(torch.from_numpy(app_maps), torch.from_numpy(mot_maps), norm, motion_weight).numpy()
    return PixelCalibration(final, float(np.quantile(final, quantile)), norm)


def _frame_statistics(sequences: dict[str, np.ndarray], combine: list[str], rate: float, fps: float) -> dict:
    """Every component's held-out statistics and threshold, and those of their combination."""
    frame = {}
    for k, v in sequences.items():
        frame[k] = framescore.stats_of(v) | {"threshold": framescore.tail_threshold(v, rate, fps)}
    combined = framescore.combine(sequences, combine, frame)
    frame["combined"] = framescore.stats_of(combined) | {"threshold": framescore.tail_threshold(combined, rate, fps)}
    return frame
