"""The contract every sink implements: one method per thing a sink can be told."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from detector.result import FrameResult, Region
from stream.frame import Frame


@dataclass
class AlertEvent:
    """One step of an alert's lifecycle. On the wire: `sinks.schema.alert_message`."""

    type: str  # "new" | "update" | "end"
    alert_id: str
    camera: str
    start_ts: float  # seconds since the epoch
    end_ts: float | None
    peak_score: float
    regions: list[Region] = field(default_factory=list)
    snapshot: str | None = None
    reason: str | None = None  # for "end": "recovered" | "shutdown" | "source_ended"
    frame_index: int = -1  # the frame this message describes; `regions` are that frame's
    peak_regions: list[Region] = field(default_factory=list)  # the peak frame's (what the snapshot shows)
    start_media_ts: float | None = None  # seconds into a recorded file; None for live cameras
    end_media_ts: float | None = None


class Sink(Protocol):
    def write(self, result: FrameResult, frame: Frame) -> None:
        """Every scored frame, in capture order per camera."""

    def alert(self, event: AlertEvent) -> None:
        """An alert lifecycle message, in order."""

    def camera_status(self, camera: str, state: str, detail: str = "") -> None:
        """Camera went 'online' / 'offline' (detail never contains credentials)."""

    def close(self) -> None:
        """Flush and release everything; idempotent."""
