"""Owns a job's machine-readable events: one JSON object per line, to a file or a file descriptor."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from kerrickpt.errors import UsageError

log = logging.getLogger(__name__)


def descriptor(target: str | None) -> int | None:
    """The N of an events target `fd:N`; None for a path or none. UsageError for an `fd:` without a number."""
    if target is None or not target.startswith("fd:"):
        return None
    try:
        return int(target[3:])
    except ValueError:
        raise UsageError(f"--events {target}: not a file descriptor number") from None


class Events:
    """Where a job's events go: each `emit` writes one whole line, `{"event": KIND, "time": UNIX, "job": NAME, ...}`
    (started, restored, checkpoint-start, checkpointed, checkpoint-failed, requeue, exited)."""

    def __init__(self, fd: int | None, job: str) -> None:
        if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.set_blocking(fd, False)  # a FIFO nobody reads never holds the job up
        self.fd = fd
        self.job = job
        self.lock = threading.Lock()

    @classmethod
    def open(cls, target: str | None, job: str, opener: Callable[[str], int] | None = None) -> Events:
        """`target`: a path (appended to, made 0644 if new; by `opener`, which returns its descriptor, if
        given), `fd:N` (an open descriptor, kept open), or None."""
        if target is None:
            return cls(None, job)
        fd = descriptor(target)
        if fd is not None:
            try:
                os.fstat(fd)
            except OSError:
                raise UsageError(f"--events {target}: not an open file descriptor") from None
            return cls(fd, job)
        if opener is not None:
            return cls(opener(target), job)
        return cls(os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644), job)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"event": kind, "time": round(time.time(), 3), "job": self.job, **fields}
        if self.fd is not None:
            # One write per line, O_APPEND: a reader never sees half of one, even with other writers.
            line = json.dumps(event, default=str).encode() + b"\n"
            with self.lock:
                try:
                    os.write(self.fd, line)
                except OSError as exc:
                    # The job matters more than its report: a full disk, a reader gone, a pipe that blocks.
                    log.warning("events of %s stop: %s", self.job, exc.strerror or exc)
                    self.fd = None
        return event
