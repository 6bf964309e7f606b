"""Fitting a memory bank from normal footage, streaming to disk, then calibrating thresholds."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from configs.errors import UserError
from configs.schema import AppConfig
import torch

from detector import framescore
from detector.bank import PIXEL, BankWriter, clear_bank, open_bank, write_coreset, write_meta
from detector.coreset import build_coreset
from detector.detector import Detector, bank_signature
from detector.motion import build_motion_model, flow_noise, frame_flow_medians
from detector.scenes import scene_dir, split_by_scene, write_index
from stream.prefetch import prefetch
from stream.allocator import HeapTrimmer
from stream.footage import FootageItem, check_counts, discover, iter_frames, select_indices, stc_training_dir

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
        hold.append(idx[len(idx) - k:])
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
    extractor, device = Detector.build_extractor(cfg)
    if not scenes:
        return _fit_items(cfg, items, selected, bank_dir, extractor, device, progress, data)
    bank_dir.mkdir(parents=True, exist_ok=True)
    clear_bank(bank_dir)
    metas: dict[str, dict] = {}
    for scene, idx in scenes.items():
        log.info("%s: scene %s (%d of %d scenes): %d videos", bank_dir, scene, len(metas) + 1, len(scenes), len(idx))
        metas[scene] = _fit_items(cfg, [items[i] for i in idx], [selected[i] for i in idx],
                                  bank_dir / scene_dir(scene), extractor, device, progress, f"{data} (scene {scene})",
                                  desc=f"fit scene {scene}")
        write_index(bank_dir, list(metas))
    return {"scenes": metas}


def _fit_items(cfg: AppConfig, items: list[FootageItem], selected: list[list[int]], bank_dir: Path,
               detector_extractor, device: torch.device, progress: bool, data, desc: str = "fit") -> dict:
    """Fit one bank from `items`' `selected` frames (`data` names them in errors, `desc` in the progress bar)."""
    bcfg = cfg.bank
    bank_idx, hold_idx = split_holdout(selected, bcfg.holdout)
    n_bank = sum(map(len, bank_idx))
    if n_bank == 0:
        raise UserError(f"{data}: no frames selected for the bank (check bank.every / bank.max_frames)")
    signature = bank_signature(cfg, detector_extractor)
    size = cfg.detector.input_size
    writer = BankWriter(bank_dir, pixel_dim=detector_extractor.pixel_dim, grid=cfg.detector.grid,
                        global_dim=detector_extractor.global_dim)
    det = Detector(cfg, detector_extractor, None, device)
    bank_sets = [set(x) for x in bank_idx]
    hold_sets = [set(x) for x in hold_idx]
    wanted = [b | h for b, h in zip(bank_sets, hold_sets)]
    use_motion = cfg.detector.motion.enabled  # the bank gets a normal-flow model
    needs_flow = cfg.detector.needs_flow
    if needs_flow:  # flow needs each selected frame's true predecessor t-1
        wanted = [w | {f - 1 for f in w if f > 0} for w in wanted]
    holdout = FrameSpool(bank_dir / "holdout.tmp", size)
    hold_prev = FrameSpool(bank_dir / "holdout_prev.tmp", size) if needs_flow else None
    try:  # the spools are temporary files: removed however fit ends
        hold_items: list[int] = []
        motion_feats: list[np.ndarray] = []
        flow_medians: list[np.ndarray] = []  # bank frames' median cell flow (the moving gate's noise floor)
        batch, origins, batch_prev = [], [], []
        last: dict[int, tuple[int, np.ndarray]] = {}  # item -> (frame index, resized frame)
        bs = cfg.detector.batch_size

        def flush():
            stack = np.stack(batch)
            pyr, glob = det.features(stack)
            writer.append(pyr.cpu().numpy(), glob.cpu().numpy(), list(origins))
            if needs_flow:
                feats = det.motion_features(stack, prev_u8=list(batch_prev))
                flow_medians.append(frame_flow_medians(feats, batch_prev))
                if use_motion:
                    motion_feats.append(feats.astype(np.float16))
            batch.clear()
            origins.clear()
            batch_prev.clear()

        trimmer = HeapTrimmer()
        bar = tqdm(total=sum(map(len, wanted)), desc=desc, unit="frame", disable=not progress, dynamic_ncols=True)
        try:
            for i, f, small in _frames(items, wanted, size):
                prev = last.get(i)
                prev_img = prev[1] if prev is not None and prev[0] == f - 1 else None
                last[i] = (f, small)
                if f in hold_sets[i]:
                    holdout.append(small)
                    if hold_prev is not None:
                        hold_prev.append(prev_img)
                    hold_items.append(i)
                elif f in bank_sets[i]:
                    batch.append(small)
                    batch_prev.append(prev_img)
                    origins.append((i, f))
                    if len(batch) >= bs:
                        flush()
                        trimmer.maybe()
                bar.update(1)
            if batch:
                flush()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        warnings = [w for w in (check_counts(it) for it in items) if w]
        meta = dict(signature)
        meta.update(
            weights_origin=detector_extractor.weights_origin,
            layers="blocks 1-3 (strides 4, 8, 16)",
            sources=[{"path": str(it.path), "kind": it.kind, "frames": it.n_frames, "decoded": it.decoded,
                      "fps": it.fps, "selected": len(b), "holdout": len(h)}
                     for it, b, h in zip(items, bank_idx, hold_idx)],
            count_warnings=warnings,
            fit={"every": bcfg.every, "max_frames": bcfg.max_frames, "holdout": bcfg.holdout},
        )
        # Written by write_coreset once the coreset exists: a bank whose selection was interrupted is a
        # complete knn bank and is refused, by name, by a config asking for the coreset.
        coreset_params = meta.pop("coreset", None)
        motion_model = None
        if use_motion:
            mc = cfg.detector.motion
            motion_model = build_motion_model(np.concatenate(motion_feats).astype(np.float32), mc.window, mc.centres)
            meta["motion"] = signature["motion"]
        writer.finish(meta, motion_model)
        if coreset_params is not None:
            fit_coreset(cfg, bank_dir, writer, device)
        bank = open_bank(bank_dir)
        meta = bank.meta
        fps = float(np.median([it.fps for it in items])) if items else 25.0
        if holdout:
            det = Detector(cfg, detector_extractor, bank, device)
            medians = np.concatenate(flow_medians) if flow_medians else None
            meta["calibration"] = calibrate(det, holdout, fps, cfg, hold_prev, hold_items, medians)
        else:
            log.warning("%s: no held-out frames (bank.holdout=0): thresholds must be set in the config", bank_dir)
            meta["calibration"] = {}
            if flow_medians:  # moving_max needs only the noise floor, which bank frames give as well
                meta["calibration"]["flow_noise"] = flow_noise(np.concatenate(flow_medians))
        write_meta(bank_dir, meta)
        return meta
    finally:
        for spool in (holdout, hold_prev):
            if spool is not None:
                spool.close()


def fit_coreset(cfg: AppConfig, bank_dir: Path, writer: BankWriter, device: torch.device) -> dict:
    """Select the coreset of a finished bank's pixel.f16 and add it to the bank (detector.gallery: coreset)."""
    cc = cfg.detector.coreset
    shape = (writer.n, writer.grid * writer.grid, writer.pixel_dim)
    log.info("%s: selecting the coreset (%d patch features, fraction %g, at most %s candidates) on %s",
             bank_dir, shape[0] * shape[1], cc.fraction, cc.max_features, device)
    feats, index, stats = build_coreset(bank_dir / PIXEL, shape, fraction=cc.fraction, max_size=cc.max_size,
                                        projection_dim=cc.projection_dim, max_features=cc.max_features,
                                        seed=cc.seed, device=device)
    log.info("%s: coreset of %d features selected in %.1f s", bank_dir, stats["size"], stats["total_s"])
    return write_coreset(bank_dir, feats, index, cc.model_dump(mode="json"), stats)


tail_threshold = framescore.tail_threshold  # kept here for callers that import it from fit


def scoring_settings(cfg: AppConfig) -> dict:
    """Detector settings that change held-out scores: thresholds calibrated under others do not apply."""
    d = cfg.detector
    out = {"k_image": d.k_image, "k_gallery": d.k_gallery, "kappa": d.kappa, "sigma": d.sigma, "topq": d.topq,
           "spatial_window": d.spatial_window, "motion_weight": d.motion.weight if d.motion.enabled else None}
    if "moving_max" in d.components_used():  # only then, so thresholds calibrated before it still match
        out["moving"] = d.moving.model_dump(mode="json") | {"flow_size": d.motion.flow_size,
                                                            "preset": d.motion.preset}
    if d.gallery == "coreset":  # only then, so thresholds calibrated before the option existed still match
        out["gallery"] = "coreset"
        out["coreset"] = d.coreset.model_dump(mode="json")
    return out


def calibrate(det: Detector, holdout: list[np.ndarray], fps: float, cfg: AppConfig,
              prev: list[np.ndarray | None] | None = None, items: list[int] | None = None,
              flow_medians: np.ndarray | None = None) -> dict:
    """Score held-out normal frames against the finished bank; store what thresholds need.

    With `prev` (each held-out frame's predecessor) and a detector that computes flow, the flow noise
    floor is measured on the held-out frames plus `flow_medians` (the bank frames' median cell flow).

    Stores per-component statistics and, since bank format 2, the component values of every held-out
    frame in time order, so the detector can calibrate any frame score / smoothing when it loads.
    """
    comps_all: dict[str, list[np.ndarray]] = {}
    app_px, mot_px = [], []
    bs = cfg.detector.batch_size
    det.bank.calibration = {}
    trimmer = HeapTrimmer()
    flows, noise = None, None
    if prev is not None and det.flow is not None:  # flow first: the moving gate needs the noise floor
        flows, medians = [], [] if flow_medians is None else [np.asarray(flow_medians, dtype=np.float32)]
        for s in range(0, len(holdout), bs):
            before = prev[s:s + bs]
            flows.append(det.motion_features(np.stack(holdout[s:s + bs]), prev_u8=before))
            medians.append(frame_flow_medians(flows[-1], before))
        noise = flow_noise(np.concatenate(medians))
        det.set_flow_noise(noise)
    for j, s in enumerate(range(0, len(holdout), bs)):
        trimmer.maybe()
        stack = np.stack(holdout[s:s + bs])
        pyr, glob = det.features(stack)
        out, comps = det.score_tensors(pyr, glob, flows[j] if flows is not None else None)
        for k, v in comps.items():
            comps_all.setdefault(k, []).append(v)
        app = out.appearance_maps if out.appearance_maps is not None else out.maps
        # Copies, not strided views: a view would keep each batch's full-size maps alive.
        app_px.append(np.ascontiguousarray(app[:, ::4, ::4].float().cpu().numpy()))
        if out.motion_maps is not None:
            mot_px.append(np.ascontiguousarray(out.motion_maps[:, ::4, ::4].float().cpu().numpy()))
    q = cfg.bank.pixel_quantile
    app_maps = np.concatenate(app_px)
    norm = None
    final = app_maps
    if mot_px:
        mot_maps = np.concatenate(mot_px)
        norm = {"appearance": {"mean": float(app_maps.mean()), "q": float(np.quantile(app_maps, q))},
                "motion": {"mean": float(mot_maps.mean()), "q": float(np.quantile(mot_maps, q))}}
        det.bank.calibration = {"pixel_norm": norm}
        final = det.combine_maps(torch.from_numpy(app_maps), torch.from_numpy(mot_maps)).numpy()
    pixel_threshold = float(np.quantile(final, q))
    seqs = {k: np.concatenate(v).astype(np.float64) for k, v in comps_all.items()}
    seqs["regions"] = framescore.region_scores(final, pixel_threshold, stride=1)
    rate = cfg.bank.target_false_alarms_per_hour
    frame = {}
    for k, v in seqs.items():
        frame[k] = framescore.stats_of(v) | {"threshold": tail_threshold(v, rate, fps)}
    comb = framescore.combine(seqs, list(cfg.detector.combine), frame)
    frame["combined"] = framescore.stats_of(comb) | {"threshold": tail_threshold(comb, rate, fps)}
    cal = {
        "n_holdout": len(holdout),
        "fps": fps,
        "target_false_alarms_per_hour": rate,
        "pixel_quantile": q,
        "pixel_threshold": pixel_threshold,
        "pixel_stats": {"mean": float(final.mean()), "std": float(final.std()), "max": float(final.max())},
        "frame": frame,
        "holdout_items": [int(i) for i in (items if items is not None else [0] * len(holdout))],
        "holdout_components": {k: [round(float(x), 6) for x in v] for k, v in seqs.items()},
    }
    if norm is not None:
        cal["pixel_norm"] = norm
    if noise is not None:
        cal["flow_noise"] = noise
    cal["scoring"] = scoring_settings(cfg)
    det.bank.calibration = cal
    return cal
