"""Owns how much of a container's log a checkpoint carries, and the log's rebuilding at its full length on restore."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kerrickpt.archivewriter import CHUNK, Writer
from kerrickpt.errors import ArchiveCorruptError

MEMBER = "log"
DEFAULT_BYTES = 8 << 20
# Looked at past the cut for the end of a line, so the carried part starts with a whole one.
LINE_BYTES = 64 << 10
# A log_start beyond this is no log a node wrote: ftruncate would fail or fill the disk's metadata.
LARGEST = 1 << 50


@dataclass(frozen=True)
class Tail:
    """The part of the log file at `path` a checkpoint carries: bytes `start` to `end`."""

    path: Path
    start: int
    end: int


def measure(path: Path, limit: int) -> Tail:
    """At the dump: the log's last `limit` bytes as it is now (it keeps growing once thawed),
    from the first whole line among them if one starts near the cut."""
    end = os.stat(path).st_size
    start = max(0, end - limit)
    if start:
        with path.open("rb") as fh:
            fh.seek(start - 1)
            head = fh.read(min(LINE_BYTES, end - start + 1))
        newline = head.find(b"\n")
        if newline >= 0:
            start += newline
    return Tail(path, start, end)


def add(writer: Writer, tail: Tail) -> None:
    """Write the carried part as the archive's log member."""
    with tail.path.open("rb") as fh:
        fh.seek(tail.start)
        left = tail.end - tail.start
        while left and (data := fh.read(min(CHUNK, left))):
            writer.write(MEMBER, data)
            left -= len(data)
    writer.end(MEMBER)


def rebuild(fd: int, start: int) -> None:
    """On restore, before the carried part is appended to the empty log `fd` (O_APPEND): a hole (no disk
    space, read as zero bytes) and a line break where the lines that were not carried were, so the log
    keeps its length and offsets, and the first carried line is a line of its own."""
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= LARGEST:
        raise ArchiveCorruptError(f"the manifest's log_start {start!r} is not an offset into a log")
    if start:
        os.ftruncate(fd, start - 1)
        os.write(fd, b"\n")
