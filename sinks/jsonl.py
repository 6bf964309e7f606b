"""Append-only JSON-lines log of frames, alerts and camera status: the zero-infrastructure sink."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TextIO

from detector.result import FrameResult
from sinks.base import AlertEvent
from sinks.schema import alert_message, frame_message, status_message
from stream.frame import Frame


class JsonlSink:
    """One JSON object per line, tagged by "type" ("frame" | "alert" | "status") and "v".

    Opened in append mode (a restarted run adds to the log rather than replacing it) and line
    buffered, so every complete line is in the kernel's hands as soon as it is written: a crash
    loses at most a line being written, never earlier ones.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO | None = open(self.path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()  # camera status may arrive from source threads

    def _emit(self, obj: dict) -> None:
        line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock:
            if self._f is not None:
                self._f.write(line)

    def write(self, result: FrameResult, frame: Frame) -> None:
        self._emit({"type": "frame", **frame_message(result)})

    def alert(self, event: AlertEvent) -> None:
        # "type" tags the line kind here, so the lifecycle step (the wire message's "type") moves
        # to "event"; every other field is the Redis alert message unchanged.
        msg = alert_message(event)
        self._emit({"type": "alert", "event": msg.pop("type"), **msg})

    def camera_status(self, camera: str, state: str, detail: str = "") -> None:
        self._emit({"type": "status", **status_message(camera, state, time.time(), detail)})

    def close(self) -> None:
        with self._lock:
            if self._f is None:
                return
            f, self._f = self._f, None
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
