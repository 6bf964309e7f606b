#!/usr/bin/env python3
"""Frame-score and pixel-map variants recomputed from one pass of the product's detector
(docs/history.md, section 4f).

    python benchmarks/frame_evidence.py --data ../shared/data/avenue_stc --work /tmp/fe \
        --json benchmarks/cpu/frame_evidence.json

Fits a bank on --data with the config (cached under --work by its settings), then scores the test set once
with the product's detector, one camera per test video as `run_stream.py eval` does, and keeps every frame's
pyramid features, last-block map, flow cells and frame components on disk (fp16; ~0.7 GB for the Avenue
sample's 1,353 frames). A multi-scene STC root is fitted as one bank (the variants read one coreset). Each
variant then recomputes its cell map, pixel map and frame score from that cache, so the rows differ only in
the mechanism named. Rows:

- product: the detector's own frame score (equals `eval`); baseline: the same recomputed here (float32
  distances to the coreset: ranking ties may differ from the product's bf16 ranking);
- sigma_S / topq_Q: the Gaussian of the pixel map / a top-fraction mean instead of the weighted maximum;
- kappa_K: mean distance to the K nearest coreset features;
- local_scale_*: distance relative to the spread of the bank features nearest to the matched coreset
  feature (its 90th percentile: a local-density, LOF-like normalisation);
- whiten_*: distances in the bank's whitened feature space (covariance shrunk toward its mean eigenvalue);
- motion_novelty: moving_max's gate driven by flow beyond what the bank's frames show at that cell;
- moving_embedding: moving_max times sqrt(distance of the motion-weighted mean feature to the bank's);
- semantic_moving_P: the same with the backbone's last block (what kind of thing moves), distance^P;
  semantic_moving_z: moving_max and that distance as held-out z-scores, summed (no exponent to choose);
- border_cell: a diagnostic, not a mechanism: the map's outer cell ignored by the frame score;
- stack: local_scale_sqrt_ratio, moving_embedding and border_cell together.

`--subsets "a,b;c,d"` adds each row's frame micro AUROC over those groups of test videos alone (is a gain
there in every part of the set, or in one?).

The variants need a coreset gallery and the moving_max frame score (the default config).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.benchutil import git_info, loadavg, log, machine_info, short_hash, write_json  # noqa: E402

CHUNK = 8192  # query cells per distance matrix


def frame_aurocs(
    scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], window: int, subsets: list[list[str]] = ()
) -> dict:
    from detector.framescore import causal_mean
    from evaluation.metrics import auroc

    s = {v: causal_mean(x, window) for v, x in scores.items()}
    per = {v: auroc(labels[v], s[v]) for v in s}
    macro = [a for a in per.values() if not math.isnan(a)]

    def micro(names):
        return auroc(np.concatenate([labels[v] for v in names]), np.concatenate([s[v] for v in names]))

    return {
        "frame_micro": micro(list(labels)),
        "frame_macro": float(np.mean(macro)) if macro else float("nan"),
        "per_video": {v: (None if math.isnan(a) else round(a, 4)) for v, a in per.items()},
        "subset_micro": [round(micro(names), 4) for names in subsets],
    }


class Cache:
    """Per test video: pyramid features [T, cells, C] and last-block maps [T, D, h, w] (fp16), flow cells
    [T, g, g, 3], frame components, labels."""

    def __init__(self, root: Path):
        self.root = root

    def videos(self) -> list[str]:
        return json.loads((self.root / "videos.json").read_text())

    def load(self, name: str, *keys: str) -> dict:
        """The video's arrays named `keys` (default: all); only those are read."""
        with np.load(self.root / f"{name}.npz") as z:
            return {k: z[k] for k in (keys or z.files)}


class LastBlock:
    """Keeps the backbone's last block ([B, D, h, w], before global pooling) of the detector's latest pass.
    Wraps the detector's trunk: one per detector."""

    def __init__(self, det):
        self.value = None
        run = det.extractor._run_trunk

        def capture(x):
            taps, last = run(x)
            self.value = last
            return taps, last

        det.extractor._run_trunk = capture

    def take(self) -> np.ndarray:
        return self.value.float().cpu().numpy().astype(np.float16)


def build_cache(cfg, data: Path, bank: Path, root: Path) -> Cache:
    import torch

    from detector.detector import Detector, resize_batch
    from evaluation.stc import load_test_set
    from stream.footage import read_image

    if (root / "videos.json").is_file():
        return Cache(root)
    root.mkdir(parents=True, exist_ok=True)
    det = Detector.load(cfg, bank)
    last_block = LastBlock(det)
    videos = load_test_set(data)
    s, bs = cfg.detector.input_size, cfg.detector.batch_size
    t0 = time.monotonic()
    for v in videos:
        pyr, flow, last, comps = [], [], [], {}
        for a in range(0, len(v.frames), bs):
            small = resize_batch([read_image(p) for p in v.frames[a : a + bs]], s)
            p, g = det.features(small)
            m = det.flow_features(small, f"eval-{v.name}")
            _, c = det.score_offline(small, m, features=(p, g))
            pyr.append(p.permute(0, 2, 3, 1).flatten(1, 2).to(torch.float16).cpu().numpy())
            last.append(last_block.take())
            flow.append(m)
            for k, x in c.items():
                comps.setdefault(k, []).append(x)
        np.savez(
            root / f"{v.name}.npz",
            pyr=np.concatenate(pyr),
            flow=np.concatenate(flow),
            last=np.concatenate(last),
            labels=v.labels,
            **{f"comp_{k}": np.concatenate(x) for k, x in comps.items()},
        )
        log(f"  cached {v.name} ({len(v.frames)} frames, {time.monotonic() - t0:.0f} s)")
    (root / "videos.json").write_text(json.dumps([v.name for v in videos]))
    return Cache(root)


def frames_with_flow(
    cfg, data: Path, keys: list[tuple[int, int]], det, last_block: LastBlock
) -> tuple[np.ndarray, np.ndarray]:
    """Flow cells [N, g, g, 3] (against each frame's predecessor; zero for a video's first frame) and
    last-block maps [N, D, h, w] (fp16) of the footage frames `keys` ((item, frame) of `discover(data)`)."""
    from detector.fit import _frames
    from stream.footage import discover

    items = discover(data)
    wanted = [set() for _ in items]
    for i, f in keys:
        wanted[i] |= {f, f - 1} if f > 0 else {f}
    frames = {(i, f): small for i, f, small in _frames(items, wanted, cfg.detector.input_size)}
    cells, last = [], []
    bs = cfg.detector.batch_size
    for a in range(0, len(keys), bs):
        chunk = keys[a : a + bs]
        stack = np.stack([frames[k] for k in chunk])
        cells.append(det.flow_features(stack, previous=[frames.get((i, f - 1)) for i, f in chunk]))
        det.features(stack)
        last.append(last_block.take())
    return np.concatenate(cells), np.concatenate(last)


def held_out_keys(cfg, data: Path) -> list[tuple[int, int]]:
    """(item, frame) of the frames `fit` held out (bank.holdout), in calibration order."""
    from detector.fit import split_holdout
    from stream.footage import discover, select_indices

    items = discover(data)
    selected = select_indices([it.n_frames for it in items], cfg.bank.every, cfg.bank.max_frames)
    _, hold = split_holdout(selected, cfg.bank.holdout)
    return [(i, f) for i, h in enumerate(hold) for f in h]


class Variants:
    """Cell maps, pixel maps and frame scores of each variant, from the cache and the bank."""

    def __init__(self, cfg, bank: Path, cache: Cache, data: Path, subsets: list[list[str]] = ()):
        import torch

        from detector.detector import Detector
        from evaluation.stc import load_test_set

        self.torch = torch
        self.det = Detector.load(cfg, bank)
        if self.det.scorer.coreset is None or self.det.moving_gate is None:
            raise SystemExit("frame_evidence.py needs detector.gallery: coreset and frame_score: moving_max")
        self.last_block = LastBlock(self.det)
        self.cfg, self.cache, self.data, self.subsets = cfg, cache, data, subsets
        self.bank = self.det.bank
        self.coreset = self.det.scorer.coreset.float().cpu()
        self.grid, self.size = cfg.detector.grid, cfg.detector.input_size
        self.videos = cache.videos()
        self.labels = {v: cache.load(v, "labels")["labels"] for v in self.videos}
        self.tests = {t.name: t for t in load_test_set(data)}
        self._bank_pixels = None

    # --- building blocks -------------------------------------------------------------------------------
    def nearest(self, q, gallery, k: int = 1):
        """(distances [N, k], indices [N, k]) of q's k nearest rows of `gallery`, float32."""
        torch = self.torch
        ds, ix = [], []
        for a in range(0, len(q), CHUNK):
            r = torch.cdist(q[a : a + CHUNK], gallery).topk(k, dim=1, largest=False)
            ds.append(r.values)
            ix.append(r.indices)
        return torch.cat(ds), torch.cat(ix)

    def bank_pixels(self):
        if self._bank_pixels is None:
            pixels = self.bank.pixel_features
            self._bank_pixels = np.asarray(pixels).reshape(-1, pixels.shape[-1])
        return self._bank_pixels

    def upsample(self, cells, sigma: float | None = None):
        from detector.anomaly_map import upsample_blur_operator

        if sigma is None:
            return self.det.scorer.upsample(cells)
        a = upsample_blur_operator(self.grid, self.size, sigma, "cpu")
        return a @ cells.float() @ a.T

    def run(self, cell_fn, *, sigma=None, agg="max", gate=None, border=0, pixel=True, post=None) -> dict:
        """cell_fn(video, features [T, cells, C]) -> cell map [T, cells]; gate(video, flow) -> weights [T, S, S]."""
        from evaluation.metrics import PixelAuroc

        pix = PixelAuroc() if pixel else None
        scores = {}
        for v in self.videos:
            c = self.cache.load(v)
            cells = cell_fn(v, self.torch.from_numpy(c["pyr"].astype(np.float32))).reshape(-1, self.grid, self.grid)
            maps = self.upsample(cells, sigma)
            if pix is not None:
                self._pixel_update(pix, v, maps)
            w = gate(v, c["flow"]) if gate is not None else self.det.moving_gate(c["flow"])
            weighted = maps * w
            if border:
                weighted = weighted[:, border:-border, border:-border]
            flat = weighted.flatten(1)
            if agg == "max":
                s = flat.amax(dim=1)
            else:
                s = flat.topk(max(1, int(round(agg * flat.shape[1]))), dim=1).values.mean(dim=1)
            scores[v] = s.numpy() if post is None else post(v, c, s.numpy())
        return self._row(scores, pix)

    def _pixel_update(self, pix, v: str, maps) -> None:
        from evaluation.run import metric_maps, metric_masks

        masks = self.tests[v].pixel_masks()
        if masks is not None:
            pix.update(metric_maps(maps), metric_masks(masks, range(len(masks))))

    def _row(self, scores: dict, pix) -> dict:
        r = frame_aurocs(scores, self.labels, self.cfg.detector.smooth_window, self.subsets)
        r["pixel"] = pix.value() if pix is not None and pix.n else None
        return r

    # --- the variants ----------------------------------------------------------------------------------
    def plain(self, k: int = 1):
        def cells(_v, f):
            d, _ = self.nearest(f.reshape(-1, f.shape[-1]), self.coreset, k)
            return d.mean(dim=1).reshape(f.shape[0], -1)

        return cells

    def local_scale(self, form: str):
        """Distance to the nearest coreset feature over that feature's local spread: the 90th percentile of
        the distances of the bank features it is nearest to (the sparser the normal features there, the
        larger a normal query's distance)."""
        torch = self.torch
        if not hasattr(self, "_radius"):
            bank = torch.from_numpy(self.bank_pixels().astype(np.float32))
            d, i = self.nearest(bank, self.coreset)
            d, i = d[:, 0], i[:, 0]
            r = torch.zeros(len(self.coreset))
            for j in torch.unique(i).tolist():
                r[j] = torch.quantile(d[i == j], 0.9)
            self._radius = r.clamp(min=float(r[r > 0].median()) * 0.25)
        radius = self._radius

        def cells(_v, f):
            d, i = self.nearest(f.reshape(-1, f.shape[-1]), self.coreset)
            d, r = d[:, 0], radius[i[:, 0]]
            return (d - r if form == "diff" else d / r.sqrt()).reshape(f.shape[0], -1)

        return cells

    def whiten(self, shrink: float, power: float):
        torch = self.torch
        x = torch.from_numpy(self.bank_pixels()[::7].astype(np.float32))
        mu = x.mean(0)
        x = x - mu
        ev, u = torch.linalg.eigh(x.T @ x / len(x))
        lam = ev * (1 - shrink) + shrink * ev.mean()
        w = u @ torch.diag(lam.clamp(min=1e-6) ** -power) @ u.T
        gallery = (self.coreset - mu) @ w

        def cells(_v, f):
            d, _ = self.nearest((f.reshape(-1, f.shape[-1]) - mu) @ w, gallery)
            return d[:, 0].reshape(f.shape[0], -1)

        return cells

    def train_frames(self):
        """Flow cells, last-block maps and bank rows of the bank frames that follow a frame of their video."""
        if not hasattr(self, "_train"):
            origins = [tuple(o) for o in self.bank.meta["frame_origins"]]
            rows = [j for j, (_, f) in enumerate(origins) if f > 0]
            cells, last = frames_with_flow(self.cfg, self.data, [origins[j] for j in rows], self.det, self.last_block)
            self._train = (cells, last, np.asarray(rows))
        return self._train

    def widened(self, magnitude):
        """Flow magnitude [N, g, g] -> [N, 1, g, g], widened by moving_max's dilation, as its gate sees it."""
        import torch.nn.functional as F

        t = self.torch.as_tensor(magnitude, dtype=self.torch.float32).unsqueeze(1)
        d = self.det.moving_gate.dilate
        return F.max_pool2d(t, 2 * d + 1, stride=1, padding=d) if d else t

    def moving_share(self, cells, size=None):
        """Per-frame weights [N, cells] summing to 1 over what moves (moving_max's gate without its static
        floor), pooled to `size` (h, w) when given."""
        import torch.nn.functional as F

        w = (self.widened(cells[..., 2]) / self.det.moving_gate.moving).clamp(max=1.0)
        if size is not None:
            w = F.adaptive_avg_pool2d(w, size)
        w = w.flatten(1)
        return w / (w.sum(dim=1, keepdim=True) + 1e-6)

    def motion_novelty_gate(self):
        """moving_max's gate, but 'moving' means faster than the 99th percentile of the bank frames' flow at
        this cell (both widened by the gate's dilation) plus the camera's moving threshold."""
        import torch.nn.functional as F

        g = self.det.moving_gate
        flow, _, _ = self.train_frames()
        normal = self.widened(np.percentile(flow[..., 2], 99, axis=0)[None])

        def gate(_v, cells):
            m = self.widened(cells[..., 2])
            w = g.static_weight + (1 - g.static_weight) * (m / (g.moving + normal)).clamp(max=1.0)
            return F.interpolate(w, size=(self.size, self.size), mode="bilinear", align_corners=False).squeeze(1)

        return gate

    def moving_embedding(self):
        """Each frame's mean pyramid feature over its moving cells (gate without the static floor), its
        distance to the nearest bank frame's; the frame score is moving_max x sqrt(that distance)."""
        torch = self.torch
        flow, _, rows = self.train_frames()

        def embed(feats, cells):
            return torch.einsum("nc,ncd->nd", self.moving_share(cells), feats)

        bank_emb = embed(torch.from_numpy(self.bank.gather(rows).astype(np.float32)), flow)

        def post(_v, c, s):
            e = embed(torch.from_numpy(c["pyr"].astype(np.float32)), c["flow"])
            d = torch.cdist(e, bank_emb).amin(dim=1).numpy()
            return s * np.sqrt(d)

        return post

    def semantic_moving(self, power: float | None):
        """Like moving_embedding, with the backbone's last block (ImageNet semantics at stride 32) pooled
        over the moving cells: what kind of thing moves, against the bank frames'. Frame score: moving_max
        x distance^power, or (power None) the sum of both as z-scores against the held-out frames (the
        product's `combined`)."""
        torch = self.torch
        flow, last, _ = self.train_frames()

        def embed(last_maps, cells):
            w = self.moving_share(cells, last_maps.shape[-2:])
            return torch.einsum("bn,bcn->bc", w, torch.from_numpy(last_maps.astype(np.float32)).flatten(2))

        bank_emb = embed(last, flow)

        def distance(last_maps, cells):
            return torch.cdist(embed(last_maps, cells), bank_emb).amin(dim=1).numpy()

        if power is None:
            stats = self.det.thresholds.component_stats()[self.cfg.detector.frame_score]
            held_cells, held_last = frames_with_flow(
                self.cfg, self.data, held_out_keys(self.cfg, self.data), self.det, self.last_block
            )
            held = distance(held_last, held_cells)

            def post(_v, c, s):
                d = distance(c["last"], c["flow"])
                return (s - stats["mean"]) / stats["std"] + (d - held.mean()) / held.std()

            return post

        def post(_v, c, s):
            return s * distance(c["last"], c["flow"]) ** power

        return post


def product_row(v: Variants, cache: Cache, component: str) -> dict:
    key = f"comp_{component}"
    return v._row({n: cache.load(n, key)[key] for n in v.videos}, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "avenue_stc"), help="STC-layout root")
    ap.add_argument("--config", default=None)
    ap.add_argument("--work", default="/tmp/frame_evidence", help="bank and feature cache (reused when present)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the rows (default: all)")
    ap.add_argument("--subsets", default=None, help="groups of test videos, e.g. 'a,b;c,d': micro AUROC of each")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from benchmarks.benchutil import config_yaml, ensure_bank, load_config

    data = Path(args.data)
    if not (data / "testing").is_dir():
        log(f"{data}: no STC test set (testing/) there; nothing measured")
        return 2
    args.backbone = None
    cfg = load_config(args)
    cfg.bank.per_scene = False  # the variants read one bank's coreset
    work = Path(args.work)
    key = short_hash([str(data.resolve()), config_yaml(cfg)])
    bank, _ = ensure_bank(cfg, data, work / f"bank_{key}")
    cache = build_cache(cfg, data, bank, work / f"cache2_{key}")
    subsets = [g.split(",") for g in args.subsets.split(";")] if args.subsets else []
    missing = sorted({n for g in subsets for n in g} - set(cache.videos()))
    if missing:
        log(f"--subsets: no test video(s) {', '.join(missing)} in {data}")
        return 2
    v = Variants(cfg, bank, cache, data, subsets)
    sigma = cfg.detector.sigma
    edge = cfg.detector.input_size // cfg.detector.grid
    rows = {
        "product": lambda: product_row(v, cache, cfg.detector.frame_score),
        "baseline": lambda: v.run(v.plain()),
        **{f"sigma_{s:g}": (lambda s=s: v.run(v.plain(), sigma=s)) for s in (2.0, 8.0, 12.0) if s != sigma},
        **{f"topq_{q:g}": (lambda q=q: v.run(v.plain(), agg=q, pixel=False)) for q in (0.001, 0.005, 0.02)},
        **{f"kappa_{k}": (lambda k=k: v.run(v.plain(k))) for k in (2, 3, 5)},
        "local_scale_diff": lambda: v.run(v.local_scale("diff")),
        "local_scale_sqrt_ratio": lambda: v.run(v.local_scale("sqrt_ratio")),
        "whiten_0.3_pow0.25": lambda: v.run(v.whiten(0.3, 0.25)),
        "whiten_0.1_pow0.5": lambda: v.run(v.whiten(0.1, 0.5)),
        "motion_novelty": lambda: v.run(v.plain(), gate=v.motion_novelty_gate(), pixel=False),
        "moving_embedding": lambda: v.run(v.plain(), post=v.moving_embedding(), pixel=False),
        **{
            f"semantic_moving_{p:g}": (lambda p=p: v.run(v.plain(), post=v.semantic_moving(p), pixel=False))
            for p in (0.25, 0.5, 1.0)
        },
        "semantic_moving_z": lambda: v.run(v.plain(), post=v.semantic_moving(None), pixel=False),
        "border_cell": lambda: v.run(v.plain(), border=edge, pixel=False),
        "stack": lambda: v.run(v.local_scale("sqrt_ratio"), post=v.moving_embedding(), border=edge, pixel=False),
    }
    chosen = list(rows) if not args.variants else args.variants.split(",")
    unknown = [c for c in chosen if c not in rows]
    if unknown:
        log(f"--variants: unknown {unknown}; known: {', '.join(rows)}")
        return 2
    torch.set_grad_enabled(False)
    results = []
    print("| variant | frame micro | frame macro | pixel AUROC | per video |" + " subsets |" * bool(subsets))
    print("|---|---|---|---|---|" + "---|" * bool(subsets))
    for name in chosen:
        t0 = time.monotonic()
        r = rows[name]()
        r.update(variant=name, seconds=round(time.monotonic() - t0, 1))
        results.append(r)
        pix = "-" if r["pixel"] is None else f"{r['pixel']:.4f}"
        per = " / ".join("-" if a is None else f"{a:.2f}" for a in r["per_video"].values())
        sub = " / ".join(f"{a:.3f}" for a in r["subset_micro"])
        print(
            f"| {name} | {r['frame_micro']:.3f} | {r['frame_macro']:.3f} | {pix} | {per} |"
            + f" {sub} |" * bool(subsets),
            flush=True,
        )
    if args.json:
        write_json(
            Path(args.json),
            {
                "command": " ".join(sys.argv),
                "git": git_info(),
                "loadavg": loadavg(),
                "machine": machine_info(torch.device("cpu")),
                "data": str(data),
                "bank": str(bank),
                "smooth_window": cfg.detector.smooth_window,
                "subsets": subsets,
                "rows": results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
