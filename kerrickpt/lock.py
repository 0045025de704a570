"""Owns the locks between kerrickpt processes: wait up to a limit, name the holder, take over a dead one's."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kerrickpt import procs
from kerrickpt.errors import BusyError

POLL_INTERVAL = 0.05


@dataclass(frozen=True)
class Holder:
    """The run holding a lock, as recorded in the lock file."""

    pid: int
    start: int | None
    host: str
    since: str

    @classmethod
    def me(cls) -> Holder:
        pid = os.getpid()
        return cls(pid, procs.start_time(pid), platform.node(), datetime.now(UTC).isoformat(timespec="seconds"))

    def is_running(self) -> bool:
        """False only when it is known to have ended (a holder on another host is assumed alive)."""
        if self.host != platform.node():
            return True
        return self.start is not None and procs.is_alive(self.pid, self.start)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def held(path: Path, *, wait: float, what: str, inherit: bool = True) -> Iterator[Holder | None]:
    """Hold the exclusive lock `path` for the block, waiting up to `wait` seconds, else BusyError.

    flock() locks die with their process, so a run killed while holding one never blocks the
    next; the next finds the dead run's record still in the file and yields it (else None).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    # Inheritable by default: CRIU and kerrickpt's guardian inherit the lock, so a run killed
    # mid-dump keeps it until they have finished and thawed the container.
    os.set_inheritable(fd, inherit)
    try:
        deadline = time.monotonic() + wait
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise BusyError(_busy(fd, what, wait))
            time.sleep(POLL_INTERVAL)
        stale = _read(fd)
        _record(fd, json.dumps(Holder.me().to_dict()).encode())
        try:
            yield stale
        finally:
            # An empty record tells the next run that this one let go cleanly.
            _record(fd, b"")
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read(fd: int) -> Holder | None:
    try:
        return Holder(**json.loads(os.pread(fd, 4096, 0)))
    except (ValueError, TypeError):
        return None


def _record(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _busy(fd: int, what: str, wait: float) -> str:
    holder = _read(fd)
    who = holder.describe() if holder else "not recorded yet"
    gave_up = f"gave up after {wait:g} s" if wait else "try again later"
    message = f"another kerrickpt ({who}) is working on {what}; {gave_up}"
    if holder and not holder.is_running():
        message += "; that run has ended, but a process it started still holds the lock (CRIU or its guardian)"
    return message
