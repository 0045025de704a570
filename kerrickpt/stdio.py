"""Owns a container's standard output and error when they are files its caller holds open rather than its log
(a Slurm job's output file): checking them, and CRIU's keys for them, which a checkpoint names external and a
restore hands the caller's new files for."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kerrickpt import criuopts, helper
from kerrickpt.errors import UsageError

STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Stdio:
    """CRIU's keys (criuopts.fd_key) of the caller's files that are a container's fd 1 and 2; None: its log."""

    stdout: str | None = None
    stderr: str | None = None

    @property
    def pair(self) -> tuple[str | None, str | None]:
        return self.stdout, self.stderr

    @property
    def keys(self) -> list[str]:
        """What a dump names `--external`: CRIU then records neither their path nor their size."""
        return sorted({key for key in (self.stdout, self.stderr) if key})

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stdio:
        return cls(stdout=data.get("stdout"), stderr=data.get("stderr"))


@dataclass(frozen=True)
class Given:
    """The caller's files for a container's fd 1 and 2 (None: its log), as open descriptors."""

    stdout: int | None = None
    stderr: int | None = None

    @classmethod
    def of(cls, stdout: int | None, stderr: int | None) -> Given:
        """UsageError unless each of `stdout` and `stderr` given is an open regular file."""
        for fd, stream in ((stdout, "stdout"), (stderr, "stderr")):
            if fd is not None:
                _check(fd, stream)
        return cls(stdout, stderr)

    def copies(self) -> Given:
        """Copies numbered 3 or above (close them; see helper.above_stdio)."""
        return Given(*(None if fd is None else helper.above_stdio(fd) for fd in self.pair))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)

    @property
    def pair(self) -> tuple[int | None, int | None]:
        return self.stdout, self.stderr

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(sorted({fd for fd in self.pair if fd is not None}))

    def outputs(self, log_fd: int) -> tuple[int, int]:
        """What a new container's fd 1 and 2 are: the caller's files, or its log."""
        return (log_fd if self.stdout is None else self.stdout, log_fd if self.stderr is None else self.stderr)

    def record(self) -> Stdio | None:
        """What a checkpoint of a container started with these must name; None: both are its log."""
        if not self.fds:
            return None
        return Stdio(*(None if fd is None else criuopts.fd_key(fd) for fd in self.pair))

    def inherit(self, archived: Stdio, log: Path) -> dict[str, Path | int]:
        """What CRIU gives the restored tree, as it is, in place of each archived key (see restorer.Helper.run):
        the file given for its stream, else this node's log of the container."""
        return {criuopts.handed_as_is(key): log if fd is None else fd for key, fd in self._handed(archived).items()}

    def restored(self, archived: Stdio | None) -> Stdio | None:
        """The restored container's own keys: those of the files handed for its archived ones (the log: None)."""
        if archived is None:
            return None
        handed = self._handed(archived)
        fds = [None if key is None else handed[key] for key in archived.pair]
        named = Stdio(*(None if fd is None else criuopts.fd_key(fd) for fd in fds))
        return named if named.keys else None

    def _handed(self, archived: Stdio) -> dict[str, int | None]:
        """The fd given for each archived key, None for none; one key for both streams (the same file at the
        checkpoint) gets the file given for either, stdout's first."""
        handed: dict[str, int | None] = {}
        for key, fd in zip(archived.pair, self.pair, strict=True):
            if key is not None and handed.get(key) is None:
                handed[key] = fd
        return handed

    def unused(self, archived: Stdio | None) -> list[str]:
        """Warnings for what was given for a stream the container archived as its log: that stays its log."""
        return [
            f"the archived container's {stream} was its log, which it keeps writing to: the {stream} given is unused"
            for stream, fd, key in zip(STREAMS, self.pair, (archived or Stdio()).pair, strict=True)
            if fd is not None and key is None
        ]


def paths(record: Stdio | None, pid: int) -> list[str]:
    """Where process `pid` (a container's init) has the caller's files of `record` open as its fd 1 and 2:
    a restore elsewhere needs neither."""
    found = []
    for fd, key in enumerate(record.pair if record else (), start=1):
        if key:
            with contextlib.suppress(OSError):  # it ended meanwhile: the checkpoint will say so
                found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def _check(fd: int, stream: str) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise UsageError(f"the {stream} given (fd {fd}) is not an open file: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UsageError(
            f"the {stream} given (fd {fd}) is not a regular file: a container's output can go to a file only "
            "(CRIU names it to a restore, which hands in the file to go on with)"
        )
