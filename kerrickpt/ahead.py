"""Owns running an iterator in a worker thread, a few items ahead of the one consuming them."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

AHEAD = 2  # decompressed steps waiting to be hashed and written


class Ahead:
    """Runs an iterator in a worker thread named `name`, at most AHEAD items ahead of the one consuming them.

    zstd, like xxhash and os.write, lets go of the GIL on big buffers, so the next block
    decompresses while this one is hashed and written. Whatever the worker raises is raised
    to the consumer in its place; leaving the block stops the worker and waits for it.
    """

    def __init__(self, items: Iterator[bytes], name: str) -> None:
        self.items = items
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(AHEAD)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Iterator[bytes]:
        self.thread.start()
        return self._consume()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        # The worker puts at most one more item once it can see `stop`: this makes room for it.
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join()

    def _run(self) -> None:
        try:
            for item in self.items:
                self.queue.put(item)
                if self.stop.is_set():
                    return
            self.queue.put(None)
        except BaseException as exc:  # raised again by the consumer, in its own thread
            self.queue.put(exc)

    def _consume(self) -> Iterator[bytes]:
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
