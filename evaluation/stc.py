"""The ShanghaiTech Campus (STC) test layout: frames, frame labels and pixel masks per video.

testing/frames/<video>/<NNN>.jpg
testing/test_frame_mask/<video>.npy   (T,)       1 = anomalous frame
testing/test_pixel_mask/<video>.npy   (T, H, W)  1 = anomalous pixel (optional)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs.errors import UserError
from stream.footage import list_images, natural_key


@dataclass
class TestVideo:
    name: str
    frames: list[Path]
    labels: np.ndarray  # uint8 (T,)
    pixel_mask_path: Path | None

    def pixel_masks(self) -> np.ndarray | None:
        """uint8 (T, H, W), memory-mapped (a long video's masks are large)."""
        if self.pixel_mask_path is None:
            return None
        return np.load(self.pixel_mask_path, mmap_mode="r")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npy label file ({err})") from None


def load_test_set(root: str | Path) -> list[TestVideo]:
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: data folder not found")
    frames_dir = root / "testing" / "frames"
    fmask_dir = root / "testing" / "test_frame_mask"
    pmask_dir = root / "testing" / "test_pixel_mask"
    if not frames_dir.is_dir():
        raise UserError(f"{frames_dir}: missing (expected an STC root with testing/frames/<video>/*.jpg)")
    if not fmask_dir.is_dir():
        raise UserError(f"{fmask_dir}: missing (expected testing/test_frame_mask/<video>.npy labels)")
    videos = []
    for vdir in sorted((p for p in frames_dir.iterdir() if p.is_dir()), key=natural_key):
        frames = list_images(vdir)
        if not frames:
            raise UserError(f"{vdir}: no frames (expected NNN.jpg images)")
        lpath = fmask_dir / f"{vdir.name}.npy"
        if not lpath.is_file():
            raise UserError(f"{lpath}: missing frame labels for test video {vdir.name}")
        labels = _load_npy(lpath)
        if labels.ndim != 1 or len(labels) != len(frames):
            raise UserError(
                f"{lpath}: {labels.shape[0] if labels.ndim else 0} labels for {len(frames)} frames in {vdir} "
                "(expected one label per frame)"
            )
        ppath = pmask_dir / f"{vdir.name}.npy"
        if ppath.is_file():
            pm = _load_npy(ppath)
            if pm.ndim != 3 or pm.shape[0] != len(frames):
                raise UserError(f"{ppath}: shape {pm.shape}, expected ({len(frames)}, H, W) for the frames in {vdir}")
        else:
            ppath = None
        videos.append(TestVideo(vdir.name, frames, np.asarray(labels, dtype=np.uint8), ppath))
    if not videos:
        raise UserError(f"{frames_dir}: empty (expected one folder of frames per test video)")
    return videos
