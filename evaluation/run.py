"""Offline evaluation on an STC-layout test set: frame AUROC (micro, macro), pixel AUROC, plots."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configs import jsonsafe
from configs.errors import UserError
from configs.schema import AppConfig
from detector.cameras import BankRouter
from detector.detector import Detector, resize_batch
from detector.evt import count_alarms
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
            chunk = idx[s : s + bs]
            prev = [read_image(v.frames[i - 1]) if i > 0 else None for i in chunk] if with_prev else None
            yield v.name, chunk, [read_image(v.frames[i]) for i in chunk], prev


def metric_maps(maps: torch.Tensor) -> np.ndarray:
    """Anomaly maps [B, S, S] at the metric resolution (METRIC_SIZE^2, bilinear), float32."""
    if maps.shape[-1] != METRIC_SIZE:
        maps = F.interpolate(
            maps.unsqueeze(1), size=(METRIC_SIZE, METRIC_SIZE), mode="bilinear", align_corners=False
        ).squeeze(1)
    return maps.float().cpu().numpy()


def metric_masks(masks: np.ndarray, idx) -> np.ndarray:
    """bool [len(idx), METRIC_SIZE, METRIC_SIZE]: frames `idx` of a video's pixel masks, nearest-neighbour."""
    return (
        np.stack(
            [
                cv2.resize(np.ascontiguousarray(masks[i]), (METRIC_SIZE, METRIC_SIZE), interpolation=cv2.INTER_NEAREST)
                for i in idx
            ]
        )
        > 0
    )


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


def false_alarm_rate(
    scores: list[np.ndarray],
    labels: list[np.ndarray],
    thr: float | list[float],
    fps: float,
    every: int = 1,
    run: int = 1,
) -> dict:
    """Alerts per hour of normal footage: rising edges of score >= thr (one, or one per video) inside
    normal stretches (maximal runs of label 0 within a video), over their duration at the source fps.
    `alarms` counts them as the threshold's tail model predicts them (detector/evt.py): runs of frames
    above the threshold, runs fewer than `run` source frames apart counting as one."""
    edges, frames, runs = 0, 0, 0
    gap = max(1, round(run / max(every, 1)))
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
            runs += count_alarms(s[i:j], t, gap, inclusive=True)
            frames += j - i
            i = j
    hours = frames * every / max(fps, 1e-6) / 3600.0
    return {
        "false_alarms": edges,
        "normal_hours": hours,
        "false_alarms_per_hour": edges / hours if hours > 0 else float("nan"),
        "alarms": runs,
        "alarms_per_hour": runs / hours if hours > 0 else float("nan"),
    }


@dataclass
class SceneRouting:
    """The bank of each test video (for a per-scene bank, detector/scenes.py, its scene's), over one
    `BankRouter` that holds one scene's detector at a time (test videos come in name order, so a scene's
    videos are consecutive); all share one backbone."""

    router: BankRouter
    scene: dict[str, str | None]  # test video -> its scene (None: one bank for all)
    scene_of_bank: dict[Path, str | None]
    per_scene: bool

    @classmethod
    def of(cls, cfg: AppConfig, bank_dir: str | Path, videos: list[TestVideo]) -> SceneRouting:
        bank_dir = Path(bank_dir)
        scene_banks = read_index(bank_dir)
        if scene_banks is None:
            router = BankRouter(cfg, {v.name: bank_dir for v in videos}, hold_one=True)
            router.detector_for(videos[0].name)  # a bad bank fails now, before anything is written
            return cls(router, {v.name: None for v in videos}, {bank_dir: None}, False)
        scene = {v.name: scene_of(v.name) for v in videos}
        unnamed = [n for n, s in scene.items() if s is None]
        if unnamed:
            raise UserError(
                f"{bank_dir}: a per-scene bank, but test videos {', '.join(unnamed[:5])} do not follow "
                "STC's <scene>_<clip> naming (e.g. 01_0014)"
            )
        missing = sorted({s for s in scene.values() if s not in scene_banks})
        if missing:
            raise UserError(
                f"{bank_dir}: no bank for scene(s) {', '.join(missing)} of the test set "
                f"(it has {', '.join(scene_banks) or 'none'}; fit on training footage of every scene)"
            )
        router = BankRouter(cfg, {name: scene_banks[s] for name, s in scene.items()}, hold_one=True)
        return cls(router, scene, {path: s for s, path in scene_banks.items()}, True)

    def threshold_of(self, name: str) -> float:
        return self.router.thresholds[self.router.banks[name]].frame

    def summary(self, key: str):
        """One bank's threshold or fps ("frame", "pixel", "fps"), or {scene: value} of a per-scene bank."""
        values = {self.scene_of_bank[path]: getattr(t, key) for path, t in self.router.thresholds.items()}
        return values if self.per_scene else values[None]


@dataclass
class VideoScores:
    """One test video's scored frames, batch by batch."""

    scores: list[np.ndarray] = field(default_factory=list)
    components: dict[str, list[np.ndarray]] = field(default_factory=dict)
    indices: list[int] = field(default_factory=list)


@dataclass
class ScoredTestSet:
    videos: dict[str, VideoScores]
    pixel_all: PixelAuroc
    pixel_by_video: dict[str, PixelAuroc]
    elapsed_s: float


def score_video_batch(
    det: Detector, camera_id: str, images: list[np.ndarray], previous: list[np.ndarray | None] | None
):
    """(SpadeOutput, components, smoothed frame scores) of consecutive images of one camera, on the
    detector's offline path: `previous` are the true previous frames when images are not consecutive,
    else the camera's own previous frame is used."""
    size = det.detector_cfg.input_size
    model_input = resize_batch(images, size)
    previous_input = None
    if previous is not None and det.flow_extractor is not None:
        previous_input = [None if p is None else resize_batch([p], size)[0] for p in previous]
    flow = det.flow_features(model_input, camera_id, previous=previous_input)
    out, components = det.score_offline(model_input, flow)
    return out, components, det.smoothed_frame_scores(components, [camera_id] * len(images))


def _score_test_set(
    cfg: AppConfig, videos: list[TestVideo], routing: SceneRouting, every: int, progress: bool
) -> ScoredTestSet:
    """Every sampled test frame scored against its video's bank; pixel AUROC accumulated on the way."""
    total = sum(len(range(0, len(v.frames), every)) for v in videos)
    per_video = {v.name: VideoScores() for v in videos}
    pixel_all = PixelAuroc()
    pixel_by_video = {v.name: PixelAuroc() for v in videos}
    by_name = {v.name: v for v in videos}
    masks_cache: dict[str, np.ndarray | None] = {}
    with_prev = cfg.detector.needs_flow and every > 1
    batches = prefetch(lambda: _batches(videos, every, cfg.detector.batch_size, with_prev), maxsize=4, name="eval-read")
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="eval", unit="frame", disable=not progress, dynamic_ncols=True)
    try:
        for name, idx, images, prev in batches:
            # One camera id per video: motion state and live smoothing never cross videos.
            out, components, scores = score_video_batch(routing.router.detector_for(name), f"eval-{name}", images, prev)
            rec = per_video[name]
            rec.scores.append(scores)
            rec.indices.extend(idx)
            for k, v in components.items():
                rec.components.setdefault(k, []).append(v)
            if name not in masks_cache:
                masks_cache = {name: by_name[name].pixel_masks()}  # one video's memmap at a time
            masks = masks_cache[name]
            if masks is not None:
                maps, gt = metric_maps(out.maps), metric_masks(masks, idx)
                pixel_all.update(maps, gt)
                pixel_by_video[name].update(maps, gt)
            bar.update(len(idx))
    finally:
        batches.close()
        bar.close()
    return ScoredTestSet(per_video, pixel_all, pixel_by_video, time.perf_counter() - t0)


score_test_set = _score_test_set  # public: what evaluate (and app/cluster.py's Ray tasks, on a subset) call


@dataclass
class VideoResults:
    labels: np.ndarray
    scores: np.ndarray  # after `eval --smooth`
    components: dict[str, np.ndarray]
    report: dict  # metrics.json's per_video entry


def _video_results(v: TestVideo, rec: VideoScores, pixel: PixelAuroc, smoothing: str, window: int) -> VideoResults:
    idx = np.asarray(rec.indices, dtype=int)
    raw = np.concatenate(rec.scores) if rec.scores else np.zeros(0)
    s = smooth_scores(raw, smoothing, window)
    lab = v.labels[idx]
    components = {k: np.concatenate(parts) for k, parts in rec.components.items()}
    report = {
        "n_frames": int(len(idx)),
        "n_anomalous": int(lab.sum()),
        "frame_auroc": auroc(lab, s),
        "pixel_auroc": pixel.value(),
        "frame_indices": idx.tolist(),
        "scores": [round(float(x), 6) for x in s],
        "labels": lab.astype(int).tolist(),
        "components": {k: [round(float(x), 5) for x in c] for k, c in components.items()},
    }
    return VideoResults(lab, s, components, report)


def _per_scene(videos: list[TestVideo], routing: SceneRouting, results: list[VideoResults]) -> dict:
    """Frame AUROC of each scene's videos (per-scene banks only)."""
    out = {}
    if routing.per_scene:
        for scene in dict.fromkeys(routing.scene.values()):
            ix = [i for i, v in enumerate(videos) if routing.scene[v.name] == scene]
            lab_s = np.concatenate([results[i].labels for i in ix])
            s_s = np.concatenate([results[i].scores for i in ix])
            out[scene] = {"n_videos": len(ix), "n_frames": int(len(lab_s)), "frame_auroc": auroc(lab_s, s_s)}
    return out


def evaluate(
    cfg: AppConfig,
    data: str | Path,
    bank_dir: str | Path,
    out_dir: str | Path,
    every: int = 1,
    smoothing: str = "none",
    window: int = 1,
    progress: bool = True,
    plots: bool = True,
    score=None,
) -> dict:
    """Score an STC-layout test set against a bank (or each test video against its scene's bank) and write
    metrics.json. Frame scores of different scenes are pooled as they are (micro AUROC): every bank's
    distances are measured in the same backbone's feature space. `score` replaces `score_test_set` (same
    arguments and result): app/cluster.py scores chunks of videos with it on Ray tasks."""
    out_dir = Path(out_dir)
    videos = load_test_set(data)
    routing = SceneRouting.of(cfg, bank_dir, videos)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = (score or score_test_set)(cfg, videos, routing, every, progress)
    results = [
        _video_results(v, scored.videos[v.name], scored.pixel_by_video[v.name], smoothing, window) for v in videos
    ]
    videos_out = {v.name: r.report for v, r in zip(videos, results)}
    labels = np.concatenate([r.labels for r in results])
    scores = np.concatenate([r.scores for r in results])
    components_all: dict[str, list] = {}
    for r in results:
        for k, c in r.components.items():
            components_all.setdefault(k, []).append(c)
    per_scene = _per_scene(videos, routing, results)
    macro = [r["frame_auroc"] for r in videos_out.values() if not math.isnan(r["frame_auroc"])]
    thr = [routing.threshold_of(v.name) for v in videos]
    alarm = scores >= np.concatenate([np.full(len(r.scores), t) for r, t in zip(results, thr)])
    fps_src = float(np.median([t.fps for t in routing.router.thresholds.values()]))
    fa = false_alarm_rate(
        [np.asarray(r["scores"]) for r in videos_out.values()],
        [np.asarray(r["labels"]) for r in videos_out.values()],
        thr,
        fps_src,
        every,
        run=max(1, round(cfg.alerts.exit_duration_s * fps_src)),
    )
    total = sum(len(range(0, len(v.frames), every)) for v in videos)
    elapsed = scored.elapsed_s
    metrics = {
        "frame_auroc_micro": auroc(labels, scores),
        "frame_auroc_macro": float(np.mean(macro)) if macro else float("nan"),
        "pixel_auroc": scored.pixel_all.value(),
        "n_frames": int(len(labels)),
        "n_anomalous": int(labels.sum()),
        "n_videos": len(videos),
        "n_videos_macro": len(macro),
        "every": every,
        "frame_score": cfg.detector.frame_score,
        # detector_causal_window: the live causal mean (detector.smooth_window) already in every frame
        # score; mode/window: the extra offline smoothing of `eval --smooth`, applied on top of it
        "smoothing": {"mode": smoothing, "window": window, "detector_causal_window": cfg.detector.smooth_window},
        "component_auroc_micro": {k: auroc(labels, np.concatenate(v)) for k, v in components_all.items()},
        "threshold": routing.summary("frame"),
        "at_threshold": {
            "recall": float(alarm[labels == 1].mean()) if labels.any() else float("nan"),
            "false_positive_rate": float(alarm[labels == 0].mean()) if (labels == 0).any() else float("nan"),
            **fa,
            "predicted_alarms_per_hour": routing.summary("predicted_alarms_per_hour"),
            "tail_model": cfg.bank.tail_model,
        },
        "pixel_threshold": routing.summary("pixel"),
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

        write_plots(out_dir, labels, scores, scored.pixel_all, videos_out, dict(zip(videos_out, thr)))
    return metrics
