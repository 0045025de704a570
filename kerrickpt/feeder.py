"""Owns feeding an archive to CRIU's streamed restore: each image into its pipe as the archive is read,
spilled to disk while CRIU does not want it yet, and every streamed file's last byte held back until
the whole archive is verified, so no restored process runs on memory from a damaged archive."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kerrickpt import archive, cgroups, streamer
from kerrickpt.errors import ArchiveCorruptError, RestoreFailed

IMAGES = "images/"
LOG = "log"
# CRIU restores every process before any runs again, and cannot finish a process whose memory
# misses a byte: holding back one byte of each streamed file keeps the tree from running.
HOLD = 1
MEMORY = 16 << 20  # what may wait in memory for CRIU to read or ask for it; beyond it the archive waits
STALL = 0.2  # s: CRIU takes and asks for nothing this long while the archive waits: the archive goes on, spilling
WRITE_BYTES = 1 << 20
ANSWER_TIMEOUT = 60.0  # s: for CRIU to give up once its images were cut off


class _Done(Exception):
    """The restore attempt is over (its helper answered) before the archive was read to its end."""


@dataclass(eq=False)
class _File:
    """One image as CRIU gets it: bytes [delivered, spilled) wait on disk, [spilled, received) in memory."""

    name: str
    size: int
    held: bool  # its last HOLD bytes wait for the verdict: it comes from the archive's frame
    received: int = 0
    delivered: int = 0
    spilled: int = 0
    # The archive's own pieces, not copies: a copy per piece, and a bytearray's moves as it is
    # consumed from the front, cost more than the whole restore otherwise does.
    memory: deque[memoryview] = field(default_factory=deque)
    spill: int | None = None  # the fd of its spill file
    pipe: int | None = None
    asked: bool = False
    done: bool = False  # delivered whole, or CRIU closed its pipe

    @property
    def waiting(self) -> int:
        return self.received - self.delivered


class Feed:
    """Serves one archive's images to one `criu restore --stream` in `images_dir`, from its index and its frame.

    Enter it before CRIU starts (its socket must be there to connect to); `serve` then reads
    the archive, verifies it and answers CRIU until the restore's helper has answered.
    """

    def __init__(self, path: Path, index: archive.Index, images_dir: Path) -> None:
        self.path = path
        self.index = index
        self.images_dir = images_dir
        self.files: dict[str, _File] = {}
        for member in index.manifest.members:
            if member.name.startswith(IMAGES) and member.name not in index.files:
                name = member.name.removeprefix(IMAGES)
                self.files[name] = _File(name, member.size, held=True)
        # CRIU cannot finish before a held-back byte: without one, it gets nothing before the verdict.
        self.holds = any(f.size >= HOLD for f in self.files.values())
        self.served: list[_File] = []  # every file CRIU has a pipe of
        self.log: int | None = None
        self.verified = False
        self.answers = bytearray()
        self.answer_fd: int | None = None
        self.group: cgroups.Cgroup | None = None
        self.connection: socket.socket | None = None
        self.accepted = False
        self.last_progress = time.monotonic()
        self.listener: streamer.Serve | None = None

    def __enter__(self) -> Feed:
        self.images_dir.mkdir(mode=0o700)
        self.listener = streamer.Serve(self.images_dir)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._cut()
        for file in self.files.values():
            if file.spill is not None:
                os.close(file.spill)
        if self.log is not None:
            os.close(self.log)

    def log_to(self, path: Path) -> None:
        """Append the archived log to `path` as it is read (its own description: the processes' offset is theirs)."""
        self.log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def serve(self, answers: int, group: cgroups.Cgroup) -> bytes:
        """Feed CRIU, whose processes join `group`, until `answers` (the helper's pipe) ends; returns what it said.

        Raises ArchiveCorruptError once CRIU has given up if the archive proves damaged: CRIU
        then had its pipes cut before the last byte, so the tree never ran.
        """
        self.answer_fd, self.group = answers, group
        try:
            try:
                self.check(into=self._take)
                while self.answer_fd is not None:
                    self._pump(1.0)
            except _Done:
                pass
            except OSError as exc:  # this node's: a spill file on a full disk, say (the archive's raise their own)
                raise RestoreFailed(f"serving {self.path} to CRIU failed: {exc}") from exc
        except BaseException:
            self._cut()  # CRIU's next read fails and it gives up; then its helper answers
            deadline = time.monotonic() + ANSWER_TIMEOUT
            with contextlib.suppress(_Done):
                while self.answer_fd is not None and time.monotonic() < deadline:
                    self._answers(wait=deadline - time.monotonic())
            raise
        finally:
            if self.answer_fd is not None:
                os.close(self.answer_fd)
                self.answer_fd = None
        return bytes(self.answers)

    def check(self, into: Callable[[str, memoryview], None] | None = None) -> None:
        """Read the whole archive and check it against the index it was served from; ArchiveCorruptError if not.

        `serve` does this as it serves; a restore whose CRIU finished early (it never asked for
        a file held back) calls it once more, before the tree counts as restored.
        """
        if archive.extract(self.path, None, into=into) != self.index.manifest:
            raise ArchiveCorruptError(f"the index of {self.path} does not match its manifest")
        self.verified = True

    def _take(self, name: str, piece: memoryview) -> None:
        """The archive's next piece of file `name`: to the log, to CRIU, or to wait."""
        if name == LOG:
            if self.log is not None:
                while piece:
                    piece = piece[os.write(self.log, piece) :]
        elif (file := self.files.get(name.removeprefix(IMAGES))) is not None and not file.done:
            if file.pipe is not None and not file.waiting:  # straight on, without a copy
                file.delivered += self._write(file, piece[: max(0, self._limit(file) - file.delivered)])
                piece = piece[file.delivered - file.received :]
                file.received = file.spilled = file.delivered
            if piece and not file.done:  # CRIU may have closed the pipe
                file.memory.append(piece)
                file.received += len(piece)
        self._pump(0)
        if self._backlog() > MEMORY:
            since = time.monotonic()
            while self._backlog() > MEMORY:
                if self._starving() or time.monotonic() - max(since, self.last_progress) > STALL:
                    # CRIU waits for what comes later in the archive, or takes nothing now: read on.
                    for file in self.files.values():
                        self._spill(file)
                    break
                self._pump(STALL)

    def _limit(self, file: _File) -> int:
        """How far into `file` CRIU may read now."""
        return file.size if self.verified or not file.held else max(0, file.size - HOLD)

    def _backlog(self) -> int:
        return sum(f.received - f.spilled for f in self.files.values() if not f.done)

    def _starving(self) -> bool:
        """Whether CRIU waits on a file whose next bytes are still in the archive (it may read nothing else)."""
        return any(not f.done and not f.waiting and f.delivered < self._limit(f) for f in self.served)

    def _spill(self, file: _File) -> None:
        """Move what `file` keeps in memory to its spill file (0600, in the private images directory)."""
        if not file.memory:
            return
        if file.spill is None:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            file.spill = os.open(self.images_dir / file.name, flags, 0o600)
        at = file.spilled
        for piece in file.memory:
            while piece:
                written = os.pwrite(file.spill, piece, at)
                piece, at = piece[written:], at + written
        file.spilled = file.received
        file.memory.clear()

    def _pump(self, wait: float) -> None:
        """Answer CRIU, fill the pipes that take more and read the helper's answer, waiting up to `wait` s."""
        poller = select.poll()
        assert self.listener is not None and self.answer_fd is not None
        if not self.accepted:
            poller.register(self.listener.listener, select.POLLIN)
        elif self.connection is not None and (self.verified or self.holds):
            poller.register(self.connection, select.POLLIN)
        poller.register(self.answer_fd, select.POLLIN)
        pipes = {}
        for file in self.served:
            if file.pipe is not None and min(file.received, self._limit(file)) > file.delivered:
                pipes[file.pipe] = file
                poller.register(file.pipe, select.POLLOUT)
        for fd, _ in poller.poll(wait * 1000):
            if fd == self.answer_fd:
                self._answers(wait=0)
            elif fd in pipes:
                self._deliver(pipes[fd])
            elif not self.accepted:  # the listener
                assert self.group is not None
                self.connection = self.listener.accept(lambda pid: pid in self.group.pids())  # type: ignore[union-attr]
                self.accepted = True
            else:
                self._request()

    def _answers(self, wait: float) -> None:
        """Read what the helper says; raises _Done once it has said all (CRIU is done, one way or the other)."""
        assert self.answer_fd is not None
        poller = select.poll()
        poller.register(self.answer_fd, select.POLLIN)
        if not poller.poll(max(0.0, wait) * 1000):
            return
        data = os.read(self.answer_fd, 65536)
        if data:
            self.answers += data
            return
        os.close(self.answer_fd)
        self.answer_fd = None
        raise _Done

    def _request(self) -> None:
        assert self.connection is not None
        name = streamer.Serve.request(self.connection)
        if name is None:  # CRIU opens no more images; its pipes go on
            self.connection.close()
            self.connection = None
            return
        member = IMAGES + name
        exists = bool(archive.SAFE_MEMBER.fullmatch(member)) and (member in self.index.files or name in self.files)
        pipe = streamer.Serve.answer(self.connection, name, exists)
        if pipe is None:
            return
        flags = fcntl.fcntl(pipe, fcntl.F_GETFL)
        fcntl.fcntl(pipe, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        if member in self.index.files:
            data = self.index.files[member]
            file = _File(
                name, len(data), held=False, received=len(data), memory=deque([memoryview(data)] if data else [])
            )
        else:
            file = self.files[name]
            if file.asked:
                os.close(pipe)
                raise RestoreFailed(f"CRIU asked for {name} twice; it streams each image once")
        file.asked, file.pipe = True, pipe
        self.served.append(file)
        self.last_progress = time.monotonic()
        self._deliver(file)

    def _deliver(self, file: _File) -> None:
        """Write what `file` may give CRIU now into its pipe, until the pipe is full."""
        while file.pipe is not None and (room := min(file.received, self._limit(file)) - file.delivered) > 0:
            want = min(room, WRITE_BYTES)
            if file.delivered < file.spilled:
                assert file.spill is not None
                data = os.pread(file.spill, min(want, file.spilled - file.delivered), file.delivered)
                written = self._write(file, data)
            else:
                data = file.memory[0][:want]
                written = self._write(file, data)
                if file.memory and written:  # what is delivered leaves memory
                    rest = file.memory[0][written:]
                    if rest:
                        file.memory[0] = rest
                    else:
                        file.memory.popleft()
                file.spilled += written
            file.delivered += written
            if written < len(data):
                break
        if file.pipe is not None and file.delivered >= file.size:
            self._close(file)

    def _write(self, file: _File, data: bytes | memoryview) -> int:
        """Write into `file`'s pipe without blocking; what it took (0 when full or closed by CRIU)."""
        if not data or file.pipe is None:
            return 0
        try:
            written = os.write(file.pipe, data)
        except BlockingIOError:
            return 0
        except BrokenPipeError:  # CRIU read what it wanted, or gave up
            self._close(file)
            return 0
        self.last_progress = time.monotonic()
        return written

    def _close(self, file: _File) -> None:
        if file.pipe is not None:
            os.close(file.pipe)
        file.pipe, file.done = None, True
        file.memory.clear()

    def _cut(self) -> None:
        """Close every pipe, the connection and the socket: CRIU's next read or request fails."""
        for file in self.served:
            self._close(file)
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.listener is not None:  # a CRIU not yet accepted is refused too
            self.listener.close()
