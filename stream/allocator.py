"""The C heap of long, decode-heavy batch jobs.

Decoded frames are ~1.2 MB numpy buffers allocated on one thread and freed on another. glibc raises
its mmap threshold after such frees, so later frames come from the arenas instead, and the arenas
fragment: a long fit's RSS doubled while holding no more data (docs/history.md, section 3). Handing the
free pages back now and then keeps RSS at what is in use, at no measured cost. (Fit has since shrunk
frames on its decode thread, stream/picture.py, so fewer and smaller buffers cross threads; the trim
stays. Current fit memory: docs/results.md, "Fit speed and memory".)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    """`maybe()` returns the C heap's free pages to the OS at most every `period_s` seconds."""

    def __init__(self, period_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.period_s, self._clock = period_s, clock
        self._trim = _malloc_trim()
        self._last = clock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe(self) -> None:
        if self._trim is None or self._clock() - self._last < self.period_s:
            return
        self._trim(0)
        self._last = self._clock()
        self.trims += 1
