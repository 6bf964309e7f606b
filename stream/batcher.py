"""Collates frames from all cameras into batches for the detector."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from stream.frame import Frame


@dataclass(frozen=True)
class Arrival:
    frame: Frame
    source: object  # the Source it came from
    received: float  # time.time() when the batcher took it (latency for media-timestamped files)


class Batcher:
    """Round-robin over the sources so one busy camera cannot starve the others.

    A batch closes when it holds `max_batch` frames or `max_wait_s` after its first frame: a larger
    batch runs the model more efficiently, the wait bounds the latency a lone camera pays for it.
    """

    def __init__(self, sources: Sequence, max_batch: int, max_wait_s: float, poll_s: float = 0.002):
        self.sources = list(sources)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self._next = 0

    def _sweep(self, batch: list[Arrival]) -> bool:
        """Take at most one frame from each source; True if any frame was taken."""
        got = False
        n = len(self.sources)
        for k in range(n):
            if len(batch) >= self.max_batch:
                break
            src = self.sources[(self._next + k) % n]
            f = src.read(0)
            if f is not None:
                batch.append(Arrival(f, src, time.time()))
                got = True
        self._next = (self._next + 1) % max(n, 1)
        return got

    def all_finished(self) -> bool:
        return all(s.finished for s in self.sources)

    def next_batch(self, stop: threading.Event, idle_s: float | None = None) -> list[Arrival] | None:
        """The next batch; None once every source has finished (or `stop` is set) and nothing is left.

        With `idle_s`, an empty list comes back after that long without any frame, so the caller
        regains control (deadlines, finished sources) while every camera is silent.
        """
        batch: list[Arrival] = []
        first = None
        idle_until = time.monotonic() + idle_s if idle_s is not None else None
        while not stop.is_set():
            took = self._sweep(batch)
            if batch and first is None:
                first = time.monotonic()
            if len(batch) >= self.max_batch:
                return batch
            if batch and time.monotonic() - first >= self.max_wait_s:
                return batch
            if not took:
                if self.all_finished():
                    return batch or None
                if not batch and idle_until is not None and time.monotonic() >= idle_until:
                    return []
                time.sleep(self.poll_s)
        return batch or None
