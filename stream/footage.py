"""Offline footage: discovering, counting and decoding the normal videos/images a bank is fitted on.

Accepts an STC root (`training/videos/*.avi`), a folder of videos, a folder of images, or a folder of
image folders. Frame counts are cross-checked (container header, demuxed packets, decoded frames)
because PyAV is known to misread some files, notably STC's original training .avi files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from configs.errors import UserError
from stream.picture import Picture

log = logging.getLogger(__name__)

VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".webm", ".ts", ".flv", ".wmv"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def natural_key(p: Path):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder in natural order; other files are skipped with a warning naming them."""
    images: list[Path] = []
    skipped: list[Path] = []
    for p in sorted(folder.iterdir(), key=natural_key):
        if p.is_file():
            (images if p.suffix.lower() in IMAGE_EXTS else skipped).append(p)
    for p in skipped:
        if not p.name.startswith("."):
            log.warning("%s: not an image file (expected %s), skipped", p, "/".join(sorted(IMAGE_EXTS)))
    return images


@dataclass
class FootageItem:
    path: Path
    kind: str  # "video" | "images"
    n_frames: int  # frames expected (header or packet count for videos, file count for image folders)
    fps: float = 25.0
    header_frames: int = 0
    images: list[Path] = field(default_factory=list)
    decoded: int | None = None  # set once fully decoded

    @property
    def name(self) -> str:
        return self.path.stem if self.kind == "video" else self.path.name


def probe_video(path: Path) -> FootageItem:
    """Count a video's frames by demuxing (cheap: no decoding) and read its header."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise UserError(f"{path}: no video stream (expected a video file)")
            s = c.streams.video[0]
            header = int(s.frames or 0)
            fps = float(s.average_rate or s.guessed_rate or 25.0)
            packets = sum(1 for p in c.demux(s) if p.size > 0)
    except UserError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable video ({_reason(err)})") from None
    if packets == 0:
        raise UserError(f"{path}: contains no video frames")
    if header and header != packets:
        log.warning("%s: container header says %d frames but %d packets were demuxed", path, header, packets)
    return FootageItem(path, "video", packets, fps, header)


def _reason(err: Exception) -> str:
    msg = getattr(err, "strerror", None) or str(err)
    return msg.strip().rstrip(".") or type(err).__name__


def stc_training_dir(root: str | Path) -> Path | None:
    """The normal footage folder of an STC-layout root (training/videos or training/frames), else None."""
    for sub in ("videos", "frames"):
        if (Path(root) / "training" / sub).is_dir():
            return Path(root) / "training" / sub
    return None


def discover(root: str | Path) -> list[FootageItem]:
    """The normal footage under `root`, each item probed for its frame count."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: data folder not found")
    if root.is_file():
        if root.suffix.lower() in VIDEO_EXTS:
            return [probe_video(root)]
        raise UserError(f"{root}: expected a folder (STC root, videos or images) or a video file")
    base = stc_training_dir(root) or root
    items: list[FootageItem] = []
    videos = sorted((p for p in base.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS), key=natural_key)
    items += [probe_video(p) for p in videos]
    images = [p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if images:
        imgs = list_images(base)
        items.append(FootageItem(base, "images", len(imgs), images=imgs))
    for sub in sorted((p for p in base.iterdir() if p.is_dir()), key=natural_key):
        imgs = [p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        if imgs:
            imgs = list_images(sub)
            items.append(FootageItem(sub, "images", len(imgs), images=imgs))
    if not items:
        raise UserError(
            f"{base}: no videos ({', '.join(sorted(VIDEO_EXTS))}) or images found "
            "(expected an STC root with training/videos/, a folder of videos, or a folder of images)"
        )
    return items


def read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def iter_frames(item: FootageItem, wanted: set[int] | None = None) -> Iterator[tuple[int, Picture]]:
    """(frame index, picture) for the wanted indices (all when None), decoding sequentially. Convert
    each picture on the iterating thread (they share one swscale context).

    For videos the decoded count is recorded on `item.decoded` and cross-checked with the demuxed
    packet count and the header; a disagreement is reported naming the file and all three counts.
    """
    if item.kind == "images":
        for i, p in enumerate(item.images):
            if wanted is None or i in wanted:
                yield i, Picture(read_image(p))
        item.decoded = len(item.images)
        return
    n = 0
    try:
        with av.open(str(item.path)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            reformatter = VideoReformatter()
            for frame in c.decode(stream):
                if wanted is None or n in wanted:
                    yield n, Picture(frame, reformatter)
                n += 1
    except (av.FFmpegError, OSError, ValueError) as err:
        if n == 0:
            raise UserError(f"{item.path}: not a decodable video ({_reason(err)})") from None
        log.warning("%s: decoding stopped after %d frames (%s)", item.path, n, _reason(err))
    item.decoded = n
    check_counts(item)


def check_counts(item: FootageItem) -> str | None:
    """A one-line warning when header, demuxer and decoder disagree on a video's frame count."""
    counts = {"decoded": item.decoded, "demuxed packets": item.n_frames}
    if item.header_frames:
        counts["header"] = item.header_frames
    if item.decoded is None or len(set(counts.values())) == 1:
        return None
    msg = (
        f"{item.path}: frame counts disagree ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
        "PyAV may be misreading this file (known for STC's original training .avi files): re-encode it, "
        f"e.g. ffmpeg -i {item.path.name} -c:v libx264 -crf 18 {item.path.stem}.mp4, and fit again"
    )
    log.warning(msg)
    return msg


def select_indices(counts: list[int], every: int, max_frames: int | None) -> list[list[int]]:
    """Evenly subsample frame indices across all items: every N-th, then at most `max_frames` in total."""
    per_item = [list(range(0, n, every)) for n in counts]
    total = sum(len(x) for x in per_item)
    if max_frames is None or total <= max_frames:
        return per_item
    flat = [(i, f) for i, idx in enumerate(per_item) for f in idx]
    keep = np.linspace(0, total - 1, max_frames).round().astype(int)
    out: list[list[int]] = [[] for _ in counts]
    for k in np.unique(keep):
        i, f = flat[k]
        out[i].append(f)
    return out
