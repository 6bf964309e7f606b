"""Shared helpers of the benchmark scripts: repo path, config overrides, cached inputs, machine facts.

Inputs are generated with the project's own synthetic scene (stream.synthetic) and cached under the
work dir (default benchmarks/out/, git-ignored), keyed by everything that determines their content, so
a second run (or anyone else's) measures the same bytes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_WORKDIR = ROOT / "benchmarks" / "out"
STC_SIZE = (856, 480)  # ShanghaiTech Campus frame size


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def load_config(args):
    """The config named by --config with the command line's overrides applied (validated)."""
    import configs

    cfg = configs.load(args.config)
    d = cfg.detector
    if getattr(args, "backbone", None):
        d.backbone.name = args.backbone
    if getattr(args, "weights", None):
        d.backbone.weights = None if args.weights == "pretrained" else args.weights
    if getattr(args, "input_size", None):
        d.input_size = args.input_size
    if getattr(args, "grid", None):
        d.grid = args.grid
    if getattr(args, "device", None):
        d.device = args.device
    if getattr(args, "threads", None):
        d.threads = args.threads
    if getattr(args, "batch", None):
        d.batch_size = args.batch
        cfg.pipeline.max_batch = args.batch
    cfg.pipeline.progress = False
    return cfg


def config_yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True)


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_clip(workdir: Path, size, fps: int, frames: int, seed: int, anomaly: str | None) -> Path:
    """An H.264 .mp4 of the seed's scene (render_clip), generated once."""
    from stream.synthetic import render_clip

    w, h = size
    path = workdir / "inputs" / f"clip_{w}x{h}_{fps}fps_{frames}f_seed{seed}_{anomaly or 'normal'}.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".part.mp4")
        t0 = time.monotonic()
        log(f"rendering {path.name} ({frames} frames) ...")
        render_clip(tmp, seed=seed, size=(w, h), fps=fps, frames=frames, anomaly=anomaly)
        os.replace(tmp, path)
        log(f"  done in {time.monotonic() - t0:.1f} s")
    return path


def ensure_footage(workdir: Path, size, fps: int, videos: int, frames: int, seed: int) -> Path:
    """Normal training footage of the SAME scene as `ensure_clip(seed=seed)`, STC layout (generate_stc).

    Both render_clip and generate_stc build `Scene(size, seed=seed)`: the layout and background are
    fixed by `seed`; only the people (clip seeds [seed, 3] vs [seed, 1, i]) differ.
    """
    from stream.synthetic import generate_stc

    w, h = size
    root = workdir / "footage" / f"stc_{w}x{h}_{fps}fps_{videos}x{frames}f_seed{seed}"
    done = root / ".complete"
    if not done.is_file():
        t0 = time.monotonic()
        log(f"generating normal footage {root.name} ...")
        generate_stc(root, seed=seed, size=(w, h), fps=fps, train_videos=videos, train_frames=frames, test_videos=0)
        done.write_text("ok\n")
        log(f"  done in {time.monotonic() - t0:.1f} s")
    return root


def ensure_bank(cfg, footage: Path, workdir: Path):
    """(bank dir, fit info or None when cached): a bank fitted on `footage` with `cfg`, in a subprocess."""
    d = cfg.detector
    # Fields that only change how a bank is used, not its content, stay out of the key.
    # (backbone.freeze is not one: in bf16 the frozen trunk's features differ from the eager one's.)
    runtime_only = {"batch_size": True, "threads": True, "pixel_bank": True}
    from stream.picture import METHOD

    key = short_hash(
        {
            "footage": footage.name,
            "resize": METHOD,
            "detector": d.model_dump(mode="json", exclude=runtime_only),
            "bank": cfg.bank.model_dump(mode="json"),
        }
    )
    bank = workdir / "banks" / f"{d.backbone.name}_{d.input_size}_g{d.grid}_{key}"
    if (bank / "meta.json").is_file():
        return bank, None
    log(f"fitting bank {bank.name} on {footage.name} (subprocess, device {d.device}) ...")
    info = fit_in_subprocess(cfg, footage, bank)
    log(f"  done in {info['wall_s']:.1f} s ({info['n_frames']} frames)")
    return bank, info


def fit_in_subprocess(cfg, data: Path, bank: Path, timeout: float | None = None) -> dict:
    """`run_stream.py fit` in a fresh process (keeps the caller's peak RSS clean); returns its JSON."""
    bank.mkdir(parents=True, exist_ok=True)
    cfg_path = bank.parent / (bank.name + ".config.yaml")
    cfg_path.write_text(config_yaml(cfg))
    cmd = [
        sys.executable,
        str(ROOT / "run_stream.py"),
        "fit",
        "--config",
        str(cfg_path),
        "--data",
        str(data),
        "--bank",
        str(bank),
        "--quiet",
    ]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=child_env())
    if p.returncode != 0:
        raise RuntimeError(f"fit failed ({p.returncode}):\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout[p.stdout.index("{") :])
    out["wall_s"] = time.monotonic() - t0
    return out


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def maxrss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_info() -> dict:
    def run(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def machine_info(device) -> dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import av
        import cv2

        info["pyav"] = av.__version__
        info["opencv"] = cv2.__version__
        info["opencv_threads"] = cv2.getNumThreads()
    except Exception:
        pass
    return info


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """The result as indented JSON at `path` (parents created); logged."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {p}")
    return p
