"""Fitting a memory bank from normal footage, streaming to disk, then calibrating thresholds."""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from statistics import NormalDist
from typing import Iterator

import numpy as np
from tqdm import tqdm

from configs.errors import UserError
from configs.schema import AppConfig
from detector.bank import BankWriter, open_bank, write_meta
from detector.detector import Detector, bank_signature, resize_batch
from stream.footage import FootageItem, check_counts, discover, iter_frames, select_indices

log = logging.getLogger(__name__)

_DONE = object()


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


def _decode_worker(items: list[FootageItem], wanted: list[set[int]], out: queue.Queue, stop: threading.Event):
    try:
        for i, (item, w) in enumerate(zip(items, wanted)):
            if not w:
                continue
            for f, img in iter_frames(item, w):
                while not stop.is_set():
                    try:
                        out.put((i, f, img), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        out.put(_DONE)
    except BaseException as err:  # handed to the consumer, which re-raises it in the main thread
        out.put(err)


def _frames(items: list[FootageItem], wanted: list[set[int]]) -> Iterator[tuple[int, int, np.ndarray]]:
    """Decode in a thread so decoding overlaps feature extraction."""
    q: queue.Queue = queue.Queue(maxsize=64)
    stop = threading.Event()
    t = threading.Thread(target=_decode_worker, args=(items, wanted, q, stop), daemon=True, name="fit-decode")
    t.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


def fit_bank(cfg: AppConfig, data: str | Path, bank_dir: str | Path, progress: bool = True) -> dict:
    """Build a bank in `bank_dir` from the normal footage under `data`; returns its metadata."""
    bank_dir = Path(bank_dir)
    items = discover(data)
    bcfg = cfg.bank
    selected = select_indices([it.n_frames for it in items], bcfg.every, bcfg.max_frames)
    bank_idx, hold_idx = split_holdout(selected, bcfg.holdout)
    n_bank = sum(map(len, bank_idx))
    if n_bank == 0:
        raise UserError(f"{data}: no frames selected for the bank (check bank.every / bank.max_frames)")
    detector_extractor, device = Detector.build_extractor(cfg)
    signature = bank_signature(cfg, detector_extractor)
    size = cfg.detector.input_size
    writer = BankWriter(bank_dir, pixel_dim=detector_extractor.pixel_dim, grid=cfg.detector.grid,
                        global_dim=detector_extractor.global_dim)
    det = Detector(cfg, detector_extractor, None, device)
    bank_sets = [set(x) for x in bank_idx]
    hold_sets = [set(x) for x in hold_idx]
    wanted = [b | h for b, h in zip(bank_sets, hold_sets)]
    holdout: list[np.ndarray] = []
    batch, origins = [], []
    bs = cfg.detector.batch_size

    def flush():
        pyr, glob = det.features(np.stack(batch))
        writer.append(pyr.cpu().numpy(), glob.cpu().numpy(), list(origins))
        batch.clear()
        origins.clear()

    bar = tqdm(total=sum(map(len, wanted)), desc="fit", unit="frame", disable=not progress, dynamic_ncols=True)
    try:
        for i, f, img in _frames(items, wanted):
            small = resize_batch([img], size)[0]
            if f in hold_sets[i]:
                holdout.append(small)
            else:
                batch.append(small)
                origins.append((i, f))
                if len(batch) >= bs:
                    flush()
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
    writer.finish(meta)
    bank = open_bank(bank_dir)
    meta = bank.meta
    fps = float(np.median([it.fps for it in items])) if items else 25.0
    if holdout:
        det = Detector(cfg, detector_extractor, bank, device)
        meta["calibration"] = calibrate(det, holdout, fps, cfg)
    else:
        log.warning("%s: no held-out frames (bank.holdout=0): thresholds must be set in the config", bank_dir)
        meta["calibration"] = {}
    write_meta(bank_dir, meta)
    return meta


def tail_threshold(values: np.ndarray, alarms_per_hour: float, fps: float) -> float:
    """Frame threshold for a target false-alarm rate, from held-out normal scores.

    A few hundred held-out frames cannot show a 1-in-100,000 event, so the tail is extrapolated with a
    normal fit: threshold = mean + z * std with P(Z > z) = alarms_per_hour / frames_per_hour. Consecutive
    frames are correlated and one alert spans many frames, so this errs towards fewer alarms.
    """
    p = min(0.5, alarms_per_hour / (3600.0 * max(fps, 1e-6)))
    z = NormalDist().inv_cdf(1.0 - p)
    mu, sd = float(np.mean(values)), float(np.std(values))
    return mu + z * max(sd, 1e-12)


def calibrate(det: Detector, holdout: list[np.ndarray], fps: float, cfg: AppConfig) -> dict:
    """Score held-out normal frames against the finished bank; store what thresholds need."""
    comps_all: dict[str, list[np.ndarray]] = {}
    pix = []
    bs = cfg.detector.batch_size
    for s in range(0, len(holdout), bs):
        pyr, glob = det.features(np.stack(holdout[s:s + bs]))
        out, comps = det.score_tensors(pyr, glob)
        for k, v in comps.items():
            comps_all.setdefault(k, []).append(v)
        pix.append(out.maps[:, ::4, ::4].float().cpu().numpy().ravel())
    rate = cfg.bank.target_false_alarms_per_hour
    frame = {}
    for k, parts in comps_all.items():
        v = np.concatenate(parts).astype(np.float64)
        frame[k] = {"mean": float(v.mean()), "std": float(max(v.std(), 1e-12)), "max": float(v.max()),
                    "q99": float(np.quantile(v, 0.99)), "threshold": tail_threshold(v, rate, fps)}
    zs = [(np.concatenate(comps_all[k]) - frame[k]["mean"]) / frame[k]["std"] for k in ("map_max", "topq")]
    comb = np.mean(zs, axis=0)
    frame["combined"] = {"mean": float(comb.mean()), "std": float(max(comb.std(), 1e-12)),
                         "max": float(comb.max()), "q99": float(np.quantile(comb, 0.99)),
                         "threshold": tail_threshold(comb, rate, fps)}
    pixels = np.concatenate(pix)
    q = cfg.bank.pixel_quantile
    return {
        "n_holdout": len(holdout),
        "fps": fps,
        "target_false_alarms_per_hour": rate,
        "pixel_quantile": q,
        "pixel_threshold": float(np.quantile(pixels, q)),
        "pixel_stats": {"mean": float(pixels.mean()), "std": float(pixels.std()), "max": float(pixels.max())},
        "frame": frame,
    }
