"""Owns waiting on a pipe or a socket, and reading so many bytes from one that may stay silent too long."""

from __future__ import annotations

import os
import select


class Stalled(Exception):
    """Nothing came for the time allowed."""


def ready(fd: int, event: int, timeout: float) -> bool:
    """Whether `fd` is ready for `event` (or has hung up) within `timeout` s; poll, as select() stops at fd 1024."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(timeout * 1000))


def read_exact(fd: int, size: int, stall: float) -> bytearray:
    """`size` bytes from `fd`, fewer only where it ends; Stalled if nothing comes for `stall` s at a time.

    Read into one buffer of that size: pieces joined afterwards would hold it twice, and os.read allocates its whole
    `size` for each pipe-sized piece."""
    data = bytearray(size)
    got = 0
    with memoryview(data) as view:
        while got < size:
            if not ready(fd, select.POLLIN, stall):
                raise Stalled(f"nothing came for {stall:g} s")
            if not (count := os.readv(fd, [view[got:]])):
                break
            got += count
    del data[got:]
    return data
