"""Offline evaluation on an STC-layout test set: frame AUROC (micro, macro), pixel AUROC, plots."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configs.schema import AppConfig
from configs import jsonsafe
from configs.errors import UserError
from detector.detector import Detector
from detector.scenes import read_index, scene_of
from evaluation.metrics import PixelAuroc, auroc
from evaluation.stc import TestVideo, load_test_set
from stream.footage import read_image
from stream.prefetch import prefetch

log = logging.getLogger(__name__)

METRIC_SIZE = 256  # the paper reports pixel metrics at 256x256


def _batches(videos: list[TestVideo], every: int, bs: int, with_prev: bool = False):
    """(video, indices, images, previous images or None). With `with_prev` each frame's true
    predecessor t-1 is read too (motion when sampling every N-th frame)."""
    for v in videos:
        idx = list(range(0, len(v.frames), every))
        for s in range(0, len(idx), bs):
            chunk = idx[s:s + bs]
            prev = [read_image(v.frames[i - 1]) if i > 0 else None for i in chunk] if with_prev else None
            yield v.name, chunk, [read_image(v.frames[i]) for i in chunk], prev


def metric_maps(maps: torch.Tensor) -> np.ndarray:
    """Anomaly maps [B, S, S] at the metric resolution (METRIC_SIZE^2, bilinear), float32."""
    if maps.shape[-1] != METRIC_SIZE:
        maps = F.interpolate(maps.unsqueeze(1), size=(METRIC_SIZE, METRIC_SIZE), mode="bilinear",
                             align_corners=False).squeeze(1)
    return maps.float().cpu().numpy()


def metric_masks(masks: np.ndarray, idx) -> np.ndarray:
    """bool [len(idx), METRIC_SIZE, METRIC_SIZE]: frames `idx` of a video's pixel masks, nearest-neighbour."""
    return np.stack([cv2.resize(np.ascontiguousarray(masks[i]), (METRIC_SIZE, METRIC_SIZE),
                                interpolation=cv2.INTER_NEAREST) for i in idx]) > 0


def smooth_scores(x: np.ndarray, mode: str, window: int) -> np.ndarray:
    """'none'; 'causal' (trailing mean, usable live); 'centred' (offline only). Never uses test statistics."""
    if mode == "none" or window <= 1 or len(x) == 0:
        return x
    if mode == "causal":
        c = np.cumsum(np.concatenate([[0.0], x]))
        i = np.arange(1, len(x) + 1)
        lo = np.maximum(0, i - window)
        return (c[i] - c[lo]) / (i - lo)
    if mode == "centred":
        k = np.ones(window) / window
        pad = window // 2
        xp = np.pad(x, (pad, window - 1 - pad), mode="edge")
        return np.convolve(xp, k, mode="valid")
    raise ValueError(f"unknown smoothing {mode!r}")


def false_alarm_rate(scores: list[np.ndarray], labels: list[np.ndarray], thr: float | list[float], fps: float,
                     every: int = 1) -> dict:
    """Alerts per hour of normal footage: rising edges of score >= thr (one, or one per video) inside
    normal stretches (maximal runs of label 0 within a video), over their duration at the source fps."""
    edges, frames = 0, 0
    per_video = thr if isinstance(thr, (list, tuple)) else [thr] * len(scores)
    for s, lab, t in zip(scores, labels, per_video):
        normal = lab == 0
        i = 0
        while i < len(lab):
            if not normal[i]:
                i += 1
                continue
            j = i
            while j < len(lab) and normal[j]:
                j += 1
            a = s[i:j] >= t
            edges += int(a[0]) + int(np.count_nonzero(a[1:] & ~a[:-1]))
            frames += j - i
            i = j
    hours = frames * every / max(fps, 1e-6) / 3600.0
    return {"false_alarms": edges, "normal_hours": hours,
            "false_alarms_per_hour": edges / hours if hours > 0 else float("nan")}


class BankDetectors:
    """The detector each test video is scored with: the bank's, or, for a per-scene bank
    (detector/scenes.py), its scene's. One scene's detector is held at a time (test videos come in name
    order, so a scene's videos are consecutive); all share one backbone."""

    def __init__(self, cfg: AppConfig, bank_dir: str | Path, videos: list[TestVideo]):
        self.cfg, self.bank_dir = cfg, Path(bank_dir)
        self.scene_banks = read_index(bank_dir)
        self.scene = {v.name: None for v in videos}
        self.thresholds: dict[str | None, dict] = {}  # scene -> frame / pixel threshold, source fps
        self._current: tuple[str | None, Detector] | None = None
        if self.scene_banks is None:
            self._current = (None, self._load(None, self.bank_dir))
            return
        self.scene = {v.name: scene_of(v.name) for v in videos}
        unnamed = [n for n, s in self.scene.items() if s is None]
        if unnamed:
            raise UserError(f"{bank_dir}: a per-scene bank, but test videos {', '.join(unnamed[:5])} do not follow "
                            "STC's <scene>_<clip> naming (e.g. 01_0014)")
        missing = sorted({s for s in self.scene.values() if s not in self.scene_banks})
        if missing:
            raise UserError(f"{bank_dir}: no bank for scene(s) {', '.join(missing)} of the test set "
                            f"(it has {', '.join(self.scene_banks) or 'none'}; fit on training footage of every scene)")

    def _load(self, scene: str | None, directory: Path) -> Detector:
        det = Detector.load(self.cfg, directory, share=self._current[1] if self._current is not None else None)
        self.thresholds[scene] = {"frame": det.frame_threshold, "pixel": det.pixel_threshold, "fps": det.source_fps}
        return det

    def for_video(self, name: str) -> Detector:
        scene = self.scene[name]
        if self._current is None or self._current[0] != scene:
            self._current = (scene, self._load(scene, self.scene_banks[scene]))
        return self._current[1]

    def threshold_of(self, name: str) -> float:
        return self.thresholds[self.scene[name]]["frame"]

    def summary(self, key: str):
        """One bank's threshold or fps, or {scene: value} of a per-scene bank."""
        if self.scene_banks is None:
            return self.thresholds[None][key]
        return {s: t[key] for s, t in self.thresholds.items()}


def evaluate(cfg: AppConfig, data: str | Path, bank_dir: str | Path, out_dir: str | Path, every: int = 1,
             smoothing: str = "none", window: int = 1, progress: bool = True, plots: bool = True) -> dict:
    """Score an STC-layout test set against a bank (or each test video against its scene's bank) and write
    metrics.json. Frame scores of different scenes are pooled as they are (micro AUROC): every bank's
    distances are measured in the same backbone's feature space."""
    out_dir = Path(out_dir)
    videos = load_test_set(data)
    dets = BankDetectors(cfg, bank_dir, videos)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(range(0, len(v.frames), every)) for v in videos)
    per_video: dict[str, dict] = {v.name: {"scores": [], "comps": {}, "idx": []} for v in videos}
    pix_all = PixelAuroc()
    pix_video = {v.name: PixelAuroc() for v in videos}
    by_name = {v.name: v for v in videos}
    masks_cache: dict[str, np.ndarray | None] = {}
    with_prev = cfg.detector.needs_flow and every > 1
    batches = prefetch(lambda: _batches(videos, every, cfg.detector.batch_size, with_prev), maxsize=4,
                       name="eval-read")
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="eval", unit="frame", disable=not progress, dynamic_ncols=True)
    try:
        for name, idx, images, prev in batches:
            # One camera id per video: motion state and live smoothing never cross videos.
            out, comps, scores = dets.for_video(name).score_images(images, camera_id=f"eval-{name}", prev_images=prev)
            rec = per_video[name]
            rec["scores"].append(scores)
            rec["idx"].extend(idx)
            for k, v in comps.items():
                rec["comps"].setdefault(k, []).append(v)
            if name not in masks_cache:
                masks_cache = {name: by_name[name].pixel_masks()}  # one video's memmap at a time
            masks = masks_cache[name]
            if masks is not None:
                maps, gt = metric_maps(out.maps), metric_masks(masks, idx)
                pix_all.update(maps, gt)
                pix_video[name].update(maps, gt)
            bar.update(len(idx))
    finally:
        batches.close()
        bar.close()
    elapsed = time.perf_counter() - t0

    labels_all, scores_all = [], []
    comps_all: dict[str, list] = {}
    videos_out = {}
    for v in videos:
        rec = per_video[v.name]
        idx = np.asarray(rec["idx"], dtype=int)
        raw = np.concatenate(rec["scores"]) if rec["scores"] else np.zeros(0)
        s = smooth_scores(raw, smoothing, window)
        lab = v.labels[idx]
        labels_all.append(lab)
        scores_all.append(s)
        for k, parts in rec["comps"].items():
            comps_all.setdefault(k, []).append(np.concatenate(parts))
        videos_out[v.name] = {
            "n_frames": int(len(idx)), "n_anomalous": int(lab.sum()),
            "frame_auroc": auroc(lab, s), "pixel_auroc": pix_video[v.name].value(),
            "frame_indices": idx.tolist(), "scores": [round(float(x), 6) for x in s],
            "labels": lab.astype(int).tolist(),
            "components": {k: [round(float(x), 5) for x in np.concatenate(parts)] for k, parts in rec["comps"].items()},
        }
    labels = np.concatenate(labels_all)
    scores = np.concatenate(scores_all)
    per_scene = {}
    if dets.scene_banks is not None:
        for scene in dict.fromkeys(dets.scene.values()):
            ix = [i for i, v in enumerate(videos) if dets.scene[v.name] == scene]
            lab_s, s_s = np.concatenate([labels_all[i] for i in ix]), np.concatenate([scores_all[i] for i in ix])
            per_scene[scene] = {"n_videos": len(ix), "n_frames": int(len(lab_s)), "frame_auroc": auroc(lab_s, s_s)}
    macro = [r["frame_auroc"] for r in videos_out.values() if not math.isnan(r["frame_auroc"])]
    thr = [dets.threshold_of(v.name) for v in videos]
    alarm = scores >= np.concatenate([np.full(len(s), t) for s, t in zip(scores_all, thr)])
    fps_src = float(np.median([t["fps"] for t in dets.thresholds.values()]))
    fa = false_alarm_rate([np.asarray(r["scores"]) for r in videos_out.values()],
                          [np.asarray(r["labels"]) for r in videos_out.values()], thr, fps_src, every)
    metrics = {
        "frame_auroc_micro": auroc(labels, scores),
        "frame_auroc_macro": float(np.mean(macro)) if macro else float("nan"),
        "pixel_auroc": pix_all.value(),
        "n_frames": int(len(labels)),
        "n_anomalous": int(labels.sum()),
        "n_videos": len(videos),
        "n_videos_macro": len(macro),
        "every": every,
        "frame_score": cfg.detector.frame_score,
        # detector_causal_window: the live causal mean (detector.smooth_window) already in every frame
        # score; mode/window: the extra offline smoothing of `eval --smooth`, applied on top of it
        "smoothing": {"mode": smoothing, "window": window, "detector_causal_window": cfg.detector.smooth_window},
        "component_auroc_micro": {k: auroc(labels, np.concatenate(v)) for k, v in comps_all.items()},
        "threshold": dets.summary("frame"),
        "at_threshold": {
            "recall": float(alarm[labels == 1].mean()) if labels.any() else float("nan"),
            "false_positive_rate": float(alarm[labels == 0].mean()) if (labels == 0).any() else float("nan"),
            **fa,
        },
        "pixel_threshold": dets.summary("pixel"),
        "fps": total / elapsed if elapsed > 0 else float("nan"),
        "config": cfg.detector.model_dump(),
        "bank": str(bank_dir),
        "data": str(data),
        **({"per_scene": per_scene} if per_scene else {}),
        "per_video": videos_out,
    }
    (out_dir / "metrics.json").write_text(jsonsafe.dumps(metrics, indent=1))
    if plots:
        from evaluation.plots import write_plots

        write_plots(out_dir, labels, scores, pix_all, videos_out, dict(zip(videos_out, thr)))
    return metrics
