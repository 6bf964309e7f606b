"""Annotated H.264 recordings, one file (or a series of segments) per camera."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2

from configs.schema import VideoSinkConfig
from detector.result import FrameResult
from sinks.annotate import Annotator
from sinks.base import AlertEvent
from sinks.snapshots import safe_name
from stream.frame import Frame
from stream.video_writer import VideoWriter

log = logging.getLogger(__name__)


@dataclass
class _Recording:
    writer: VideoWriter | None = None
    size: tuple[int, int] = (0, 0)  # (w, h) fixed by the first frame: a video cannot change size
    segment: int = 0
    segment_start: float = 0.0


class VideoSink:
    """`<dir>/<camera>.mp4`, or with `segment_s` a new `<camera>_<n>.mp4` every `segment_s` seconds of
    frame time. Segment numbers continue after the highest already in the directory, so a restarted
    run never overwrites earlier recordings; the unsegmented file is rewritten on every run.

    Files open lazily at a camera's first frame, at that frame's size; a later frame of another size
    (camera reconnected at a new resolution) is resized to fit. Frames are written at a constant
    `fps_hint` (the source's nominal rate), so playback time tracks capture time only as closely
    as the source keeps its rate.
    """

    def __init__(self, cfg: VideoSinkConfig, fps_hint: float | None = 25.0) -> None:
        if not cfg.dir:
            raise ValueError("VideoSinkConfig.dir is required")
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.fps = float(fps_hint) if fps_hint and fps_hint > 0 else 25.0
        self.annotator = Annotator(timeline_s=cfg.timeline_s, normal_regions=cfg.normal_regions)
        self.paths: list[str] = []  # every file this sink created, in order
        self._recs: dict[str, _Recording] = {}
        self._closed = False

    def _next_segment(self, camera: str) -> int:
        pat = re.compile(rf"^{re.escape(camera)}_(\d+)\.mp4$")
        taken = [int(m.group(1)) for p in self.dir.glob(f"{camera}_*.mp4") if (m := pat.match(p.name))]
        return max(taken) + 1 if taken else 0

    def _open(self, camera: str, rec: _Recording, ts: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.segment_s:
            name = f"{camera}_{rec.segment}.mp4"
        else:
            name = f"{camera}.mp4"
        path = os.fspath(self.dir / name)
        w, h = rec.size
        rec.writer = VideoWriter(path, w, h, self.fps, codec=self.cfg.codec, crf=self.cfg.crf)
        rec.segment_start = ts
        self.paths.append(path)
        log.info("recording %s (%dx%d @ %.3g fps)", path, w, h, self.fps)

    def write(self, result: FrameResult, frame: Frame) -> None:
        if self._closed:
            return
        camera = safe_name(frame.camera_id)
        ts = float(result.timestamp)
        rec = self._recs.get(camera)
        if rec is None:
            rec = self._recs[camera] = _Recording(size=frame.size)
            if self.cfg.segment_s:
                rec.segment = self._next_segment(camera)
            self._open(camera, rec, ts)
        elif self.cfg.segment_s and (ts - rec.segment_start >= self.cfg.segment_s or ts < rec.segment_start):
            # Roll on frame time; a timestamp jumping backwards (looped file) also starts a new segment.
            assert rec.writer is not None
            rec.writer.close()
            rec.segment += 1
            self._open(camera, rec, ts)
        rgb = self.annotator.annotate(frame, result)
        if frame.size != rec.size:
            rgb = cv2.resize(rgb, rec.size, interpolation=cv2.INTER_AREA)
        assert rec.writer is not None  # _open made it
        rec.writer.write(rgb)

    def alert(self, event: AlertEvent) -> None:
        pass  # alerts are already visible in the video: banner, boxes and timeline

    def camera_status(self, camera: str, state: str, detail: str = "") -> None:
        pass

    def close(self) -> None:
        """Finalise every file (flush the encoder, write the trailer). Idempotent."""
        if self._closed:
            return
        self._closed = True
        first_err = None
        for rec in self._recs.values():
            if rec.writer is None:
                continue
            try:
                rec.writer.close()
            except Exception as err:  # one broken file must not leave the others unfinalised
                log.error("closing %s failed: %s", rec.writer.path, err)
                first_err = first_err or err
        if first_err is not None:
            raise first_err
