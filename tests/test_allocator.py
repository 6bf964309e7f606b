"""HeapTrimmer: trims on its period, never more often, and is a no-op where malloc_trim is missing."""

import sys

import pytest

from stream import allocator
from stream.allocator import HeapTrimmer


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_trims_once_per_period():
    clock = Clock()
    calls = []
    tr = HeapTrimmer(period_s=2.0, clock=clock)
    tr._trim = lambda pad: calls.append(pad) or 1
    tr.maybe()
    clock.t += 1.9
    tr.maybe()
    assert calls == []
    clock.t += 0.2
    tr.maybe()
    tr.maybe()
    assert calls == [0] and tr.trims == 1
    clock.t += 2.0
    tr.maybe()
    assert tr.trims == 2


def test_without_malloc_trim_it_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_malloc_trim", lambda: None)
    tr = HeapTrimmer(period_s=0.0)
    assert not tr.available
    tr.maybe()
    assert tr.trims == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_glibc_malloc_trim_is_found_and_callable():
    tr = HeapTrimmer(period_s=0.0)
    assert tr.available
    tr.maybe()
    assert tr.trims == 1
