import threading

import pytest

from stream.prefetch import prefetch


def test_yields_everything_in_order():
    assert list(prefetch(lambda: iter(range(100)), maxsize=3)) == list(range(100))


def test_producer_error_reaches_the_consumer():
    def produce():
        yield 1
        raise ValueError("bad frame 2")

    it = prefetch(produce)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad frame 2"):
        next(it)


def test_closing_early_stops_the_producer():
    produced = []
    done = threading.Event()

    def produce():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            done.set()

    it = prefetch(produce, maxsize=2)
    assert next(it) == 0
    it.close()
    assert done.wait(5)
    assert len(produced) < 10
