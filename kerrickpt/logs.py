"""Owns `logs`: a container's output as its log file holds it, and following it until the container ends."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kerrickpt import containers
from kerrickpt.errors import UsageError

CHUNK = 1 << 16
IN_MODIFY = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def logs(name: str, *, follow: bool = False, state_dir: Path | str | None = None) -> Iterator[bytes]:
    """The log of container `name` (run here or restored here) in chunks; with `follow`, then what it
    writes next as it writes it, until it ends. Stopping early: close the iterator."""
    container = containers.Registry(state_dir).get(name)
    if container.log is None:
        raise UsageError(f"container {name} keeps no log: it was restored from a job whose output was not a file")
    with open(container.log, "rb") as log:
        yield from _read_new(log)
        if not follow:
            return
        with _ended(container) as ended, _changes(Path(container.log)) as changed:
            if ended is None:
                return
            poller = select.poll()
            poller.register(ended, select.POLLIN)
            poller.register(changed, select.POLLIN)
            while True:
                yield from _read_new(log)  # first: what came before the watch began
                ready = {fd for fd, _ in poller.poll()}
                if ended in ready:
                    yield from _read_new(log)  # what it wrote as it ended
                    return
                with contextlib.suppress(BlockingIOError):
                    os.read(changed, 4096 * 16)  # the events say only that it changed


def _read_new(log: BinaryIO) -> Iterator[bytes]:
    if os.fstat(log.fileno()).st_size < log.tell():
        log.seek(0)  # truncated: what is there now is new
    while chunk := log.read(CHUNK):
        yield chunk


@contextlib.contextmanager
def _ended(container: containers.Container) -> Iterator[int | None]:
    """A pidfd of the container's init, readable once it has ended; None if it has already."""
    try:
        pidfd = os.pidfd_open(container.init_pid)
    except ProcessLookupError:
        yield None
        return
    try:
        # Checked after the open: the PID is that init's, not one reused since.
        yield pidfd if container.is_running() else None
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def _changes(path: Path) -> Iterator[int]:
    """An inotify fd, readable when the file at `path` is written to."""
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    try:
        if _libc.inotify_add_watch(fd, bytes(path), IN_MODIFY) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        yield fd
    finally:
        os.close(fd)
