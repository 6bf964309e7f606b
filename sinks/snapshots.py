"""JPEG snapshots of an alert's peak frame, with the detector's overlay."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import cv2

from detector.result import FrameResult
from sinks.annotate import annotate_frame
from stream.frame import Frame


def safe_name(name: str) -> str:
    """A camera id or alert id usable as one path component (config allows '.', '..' and the like)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return cleaned if cleaned.strip(".") else cleaned.replace(".", "_") or "_"


class SnapshotWriter:
    """Writes `<dir>/<camera>/<alert_id>.jpg`. Saving again for the same alert overwrites the file, so the
    path published with the alert's first message stays valid and ends up showing the final peak."""

    def __init__(
        self, dir: str | os.PathLike, quality: int = 90, map_floor: float = 1.0, normal_regions: str = "faint"
    ) -> None:
        self.dir = Path(dir)
        self.normal_regions = normal_regions  # how a normal frame's regions show (sinks.annotate)
        self.quality = int(quality)
        self.map_floor = map_floor

    def path_for(self, camera: str, alert_id: str) -> Path:
        return self.dir / safe_name(camera) / f"{safe_name(alert_id)}.jpg"

    def save(self, camera: str, alert_id: str, frame: Frame, result: FrameResult) -> str:
        rgb = annotate_frame(frame.image, result, self.map_floor, normal_regions=self.normal_regions)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for alert {alert_id}")
        path = self.path_for(camera, alert_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        # tmp + rename in the same directory: a reader (dashboard, alert consumer) never sees a
        # half-written JPEG, even while an update overwrites it. No fsync: snapshots are best-effort
        # evidence and an fsync per alert event would stall the pipeline on slow disks.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.tobytes())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return str(path)
