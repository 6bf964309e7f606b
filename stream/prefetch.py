"""Running a producer (decoding, image reading) in a thread so it overlaps the model."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetch(produce: Callable[[], Iterable[T]], maxsize: int = 16, name: str = "prefetch") -> Iterator[T]:
    """Yield what `produce()` yields, computed ahead in a daemon thread (at most `maxsize` items ahead).

    An exception in the producer is re-raised in the consumer; closing the generator early (break,
    an exception downstream) stops the producer at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in produce():
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # re-raised by the consumer, in its own thread
            put((_END, err))

    t = threading.Thread(target=work, name=name, daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        t.join(timeout=5)
