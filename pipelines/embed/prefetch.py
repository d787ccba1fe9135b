"""An iterable read ahead in a thread from the moment it is wrapped: ``isa embed`` starts its Ray Data pipeline
(listing, admission, the decode tasks' start) this way before a tower in the driver loads its teacher, so the two
overlap."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
_END = object()


class Prefetched(Generic[Item]):
    """Iterates ``iterable`` in a thread, at most ``depth`` items ahead of the reader; the items, then the error
    that ended it if any, come out in order. :meth:`close` (also at the end of a ``with`` block) has the thread
    stop at its next item and close the iterator it reads."""

    def __init__(self, iterable: Iterable[Item], depth: int = 2):
        self._queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(iterable),), name="isa-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any, error: BaseException | None = None) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterator[Item]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    break
            else:
                self._put(_END)
        except BaseException as error:  # handed to the reader, raised there
            self._put(None, error)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Item]:
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._closed.set()  # the thread ends at its next item: the reader does not wait for it

    def __enter__(self) -> Prefetched[Item]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
