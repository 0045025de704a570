"""Owns progress reports of long operations: the Progress protocol, the one in effect, and a terminal line."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import BinaryIO, Protocol, TextIO


class Progress(Protocol):
    """What a long operation reports: the phase it is in, and bytes as they pass."""

    def phase(self, name: str, total: int | None = None) -> None:
        """A new phase begins; `total` is how many bytes it will pass, where known."""

    def advance(self, nbytes: int) -> None:
        """`nbytes` more bytes passed (from any thread)."""


class _Silent:
    """The default: a library call that nobody watches reports to nobody."""

    def phase(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


SILENT: Progress = _Silent()
_active: ContextVar[Progress] = ContextVar("kerrickpt_progress", default=SILENT)


def current() -> Progress:
    """The Progress of the calling context (`reporting`), else SILENT. Threads start SILENT: capture it first."""
    return _active.get()


@contextlib.contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    """Report the library calls of the block (kerrickpt.checkpoint, restore, migrate, ...) to `progress`."""
    token = _active.set(progress)
    try:
        yield progress
    finally:
        _active.reset(token)


class Counted:
    """A binary file whose reads are reported to a Progress, whichever thread reads it."""

    def __init__(self, file: BinaryIO, progress: Progress) -> None:
        self.file = file
        self.progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.progress.advance(len(data))
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self.file, name)

    def __enter__(self) -> Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


class Line:
    """One line on a terminal, redrawn in place: `kerrickpt: WHAT: PHASE 12.0 MiB of 48.0 MiB, 30.0 MiB/s, 1 s left`."""

    INTERVAL = 0.2  # seconds between redraws for bytes: a terminal need not see every write

    def __init__(self, what: str, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.stream = stream
        self.clock = clock
        self.lock = threading.Lock()
        self.name = ""
        self.total: int | None = None
        self.done = 0
        self.started = self.drawn = clock()
        self.shown = False
        self.behind = False  # bytes came since the last redraw

    def phase(self, name: str, total: int | None = None) -> None:
        with self.lock:
            if self.behind:  # a phase's bytes are seen at least once, however fast it went
                self._draw()
            self.name, self.total, self.done = name, total, 0
            self.started = self.clock()
            self._draw()

    def advance(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            self.behind = True
            if self.clock() - self.drawn >= self.INTERVAL:
                self._draw()

    def text(self) -> str:
        words = f"kerrickpt: {self.what}: {self.name}"
        if not self.done:
            return words
        words += f" {_size(self.done)}" + (f" of {_size(self.total)}" if self.total else "")
        elapsed = self.clock() - self.started
        if elapsed <= 0:
            return words
        rate = self.done / elapsed
        words += f", {_size(rate)}/s"
        if self.total and self.total > self.done:
            words += f", {(self.total - self.done) / rate:.0f} s left"
        return words

    def _draw(self) -> None:
        self.drawn = self.clock()
        self.behind = False
        text = self.text()
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):  # not a terminal (io.UnsupportedOperation is both)
            width = 0
        if width > 1:  # a line that wrapped would not be redrawn in place
            text = text[: width - 1]
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """Clear the line: what the command prints next starts on a clean one."""
        with self.lock:
            if self.behind:
                self._draw()
            if self.shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


@contextlib.contextmanager
def on_terminal(what: str, stream: TextIO, *, quiet: bool) -> Iterator[None]:
    """Show the block's progress on `stream` if it is a terminal and not `quiet`; else nothing at all."""
    if quiet or not stream.isatty():
        yield
        return
    line = Line(what, stream)
    try:
        with reporting(line):
            yield
    finally:
        line.close()
