"""Owns feeding an archive to CRIU's streamed restore: each image into its pipe as the archive is read,
spilled to disk while CRIU does not want it yet, and CRIU's gate, which lets the restored tree run only
once the whole archive is verified."""

from __future__ import annotations

import fcntl
import fnmatch
import os
import select
import shlex
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kerrickpt import archive, archiveindex, cgroups, faults, limits, members, sources, streamer
from kerrickpt.errors import ArchiveCorruptError, RestoreFailed

IMAGES = "images/"
LOG = "log"
MEMORY = 16 << 20  # what may wait in memory for CRIU to read or ask for it; beyond it the archive waits
STALL = 0.2  # s: CRIU takes and asks for nothing this long while the archive waits: the archive goes on, spilling
WRITE_BYTES = 1 << 20
ANSWER_TIMEOUT = 60.0  # s: for CRIU to give up once its images were cut off
# CRIU's restore now lasts as long as the archive's reading: its time limit grows by a second for
# every READ_FLOOR bytes of archive (a slow disk's pace), on top of limits.RESTORE.
READ_FLOOR = 10 << 20
VERDICT = b"verified"
# CRIU runs its action scripts at each stage of a restore and kills the restored tree, which has
# not run yet, if the post-restore one fails; only after it do the processes run again. kerrickpt
# holds the gate's lock until it has a verdict, and the kernel lets go of it if kerrickpt dies.
GATE_SCRIPT = """#!/bin/sh
# kerrickpt's gate: the restored tree may run once kerrickpt has verified the whole archive.
[ "$CRTOOLS_SCRIPT_ACTION" = post-restore ] || exit 0
exec 9< {lock}
{flock} --shared 9 || exit 1
IFS= read -r verdict <&9 || :
[ "$verdict" = {verdict} ]
"""


def can_gate(directory: Path) -> bool:
    """Whether CRIU can run the gate from `directory` (not on a noexec mount) with util-linux's flock."""
    return shutil.which("flock") is not None and not os.statvfs(directory).f_flag & os.ST_NOEXEC


@dataclass(eq=False)
class _File:
    """One image as CRIU gets it: bytes [delivered, spilled) wait on disk, [spilled, received) in memory."""

    name: str
    size: int
    received: int = 0
    delivered: int = 0
    spilled: int = 0
    # The archive's own pieces, not copies: a copy per piece, and a bytearray's moves as it is
    # consumed from the front, cost more than the whole restore otherwise does.
    memory: deque[memoryview] = field(default_factory=deque)
    spill: int | None = None  # the fd of its spill file
    pipe: int | None = None
    done: bool = False  # delivered whole, or CRIU closed its pipe

    @property
    def waiting(self) -> int:
        return self.received - self.delivered


class Feed:
    """Serves one archive's images to one `criu restore --stream` in `scratch`, from its index and its frame.

    Enter it before CRIU starts (its socket and gate must be there); `serve` then reads the
    archive, verifies it and answers CRIU until the restore's helper has answered. CRIU runs
    the gate (`gate`, its action script) with the tree restored; the gate lets the tree run
    only on kerrickpt's verdict, which comes once the whole archive is verified.
    """

    def __init__(self, source: sources.Source, index: archiveindex.Index, scratch: Path) -> None:
        self.source = source
        self.index = index
        self.timeout = limits.RESTORE.seconds() + source.size / READ_FLOOR
        self.checked = False  # the whole archive was read and found sound
        self.images_dir = scratch / "images"
        self.gate = scratch / "gate.sh"
        self.lock = scratch / "gate"
        self.files: dict[str, _File] = {}
        for member in index.manifest.members:
            if member.name.startswith(IMAGES) and member.name not in index.files:
                name = member.name.removeprefix(IMAGES)
                self.files[name] = _File(name, member.size)
        # Each file CRIU has an open pipe of, by the pipe: every round of `_pump` looks at them all, so a file leaves
        # once its pipe closed (a list of all made a restore of many small images, one per TCP connection, quadratic).
        self.served: dict[int, _File] = {}
        self.log: int | None = None
        self.verdict: int | None = None  # the gate's lock, held until the verdict
        self.answers = bytearray()
        self.answer_fd: int | None = None
        self.group: cgroups.Cgroup | None = None
        self.connection: socket.socket | None = None
        self.accepted = False
        self.last_progress = time.monotonic()
        self.listener: streamer.Serve | None = None

    def __enter__(self) -> Feed:
        self.images_dir.mkdir(mode=0o700)
        os.close(os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        flock = shutil.which("flock") or "flock"
        script = GATE_SCRIPT.format(
            flock=shlex.quote(flock), lock=shlex.quote(str(self.lock)), verdict=VERDICT.decode()
        )
        fd = os.open(self.gate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o700)
        with os.fdopen(fd, "w") as out:
            out.write(script)
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

    def substitute(self, pattern: str, change: Callable[[dict[str, bytes]], dict[str, bytes]]) -> None:
        """Serve CRIU other bytes for the indexed images whose names match `pattern` (a glob): those `change`,
        given the images, returns. The archive is still checked as it is."""
        found = {
            name.removeprefix(IMAGES): data
            for name, data in self.index.files.items()
            if fnmatch.fnmatch(name.removeprefix(IMAGES), pattern)
        }
        for name, data in change(found).items():
            self.index.files[IMAGES + name] = data

    def log_to(self, path: Path) -> None:
        """Append the archived log to `path` as it is read (its own description: the processes' offset is theirs)."""
        self.log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def serve(self, answers: int, group: cgroups.Cgroup) -> bytes:
        """Feed CRIU, whose processes join `group`, until `answers` (the helper's pipe) ends; returns what it said.

        Raises ArchiveCorruptError if the archive proves damaged, once CRIU has given up (its
        pipes and its gate are cut): the tree it restored never ran. A CRIU that fails first
        is told apart from a damaged archive by reading the archive to its end all the same.
        """
        self.answer_fd, self.group = answers, group
        # Taken here, after the fork: a lock the restore's helper shared would outlive kerrickpt.
        self.verdict = os.open(self.lock, os.O_WRONLY | os.O_CLOEXEC)
        fcntl.flock(self.verdict, fcntl.LOCK_EX)
        self.last_progress = time.monotonic()
        try:
            try:
                self._check(into=self._take)
                faults.inject("restore-before-verdict")
                if self.verdict is not None:  # else CRIU is done already: it failed
                    os.write(self.verdict, VERDICT)
                    os.close(self.verdict)  # the lock goes with it: the gate reads the verdict
                    self.verdict = None
                while self.answer_fd is not None:
                    self._pump(1.0)
            except OSError as exc:  # this node's: a spill file on a full disk, say (the archive's raise their own)
                raise RestoreFailed(f"serving {self.source.label} to CRIU failed: {exc}") from exc
        except BaseException as exc:
            self._cut()  # CRIU's next read fails, or its gate; it kills the tree and gives up; its helper answers
            deadline = time.monotonic() + ANSWER_TIMEOUT
            while self.answer_fd is not None and time.monotonic() < deadline:
                self._answers(wait=deadline - time.monotonic())
            if isinstance(exc, Exception) and not isinstance(exc, ArchiveCorruptError) and not self.checked:
                # Whatever broke off serving (CRIU's protocol, this node), a damaged archive says so.
                self._check(into=None)
            raise
        finally:
            if self.answer_fd is not None:
                os.close(self.answer_fd)
                self.answer_fd = None
        return bytes(self.answers)

    def _check(self, into: Callable[[str, memoryview], None] | None) -> None:
        """Read and verify the whole archive, passing its pieces `into` CRIU; ArchiveCorruptError if damaged."""
        if self.source.extract(None, into=into) != self.index.manifest:
            raise ArchiveCorruptError(f"the index of {self.source.label} does not match its manifest")
        self.checked = True

    def _take(self, name: str, piece: memoryview) -> None:
        """The archive's next piece of file `name`: to the log, to CRIU, or to wait."""
        if name == LOG:
            if self.log is not None:
                archive.write_all(self.log, piece)
            return
        if self.answer_fd is None:  # CRIU is done (it failed): the rest is only checked
            return
        file = self.files.get(name.removeprefix(IMAGES))
        if file is not None and not file.done:
            if file.pipe is not None and not file.waiting:  # straight on, without a copy
                file.delivered += self._write(file, piece[: file.size - file.delivered])
                piece = piece[file.delivered - file.received :]
                file.received = file.spilled = file.delivered
            if piece and not file.done:  # CRIU may have closed the pipe
                file.memory.append(piece)
                file.received += len(piece)
        self._pump(0)
        while self.answer_fd is not None and self._backlog() > MEMORY:
            if time.monotonic() - self.last_progress > STALL:
                # CRIU takes nothing now: it waits for what comes later in the archive. Read on.
                for each in self.files.values():
                    self._spill(each)
                break
            self._pump(STALL)

    def _backlog(self) -> int:
        return sum(f.received - f.spilled for f in self.files.values() if not f.done)

    def _spill(self, file: _File) -> None:
        """Move what `file` keeps in memory to its spill file (0600, in the private images directory)."""
        if not file.memory:
            return
        if file.spill is None:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            file.spill = os.open(self.images_dir / file.name, flags, 0o600)
            os.unlink(self.images_dir / file.name)  # its room goes back as soon as it is closed
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
        elif self.connection is not None:
            poller.register(self.connection, select.POLLIN)
        poller.register(self.answer_fd, select.POLLIN)
        pipes = {}
        for pipe, file in self.served.items():
            if min(file.received, file.size) > file.delivered:
                pipes[pipe] = file
                poller.register(pipe, select.POLLOUT)
        for fd, _ in poller.poll(wait * 1000):
            if self.answer_fd is None:
                break
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
        """Read what the helper says; at its end CRIU is done, one way or the other, and its pipes are closed."""
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
        self._cut()
        for file in self.files.values():
            file.memory.clear()

    def _request(self) -> None:
        assert self.connection is not None
        name = streamer.Serve.request(self.connection)
        if name is None:  # CRIU opens no more images; its pipes go on
            self.connection.close()
            self.connection = None
            return
        member = IMAGES + name
        exists = bool(members.SAFE_MEMBER.fullmatch(member)) and (member in self.index.files or name in self.files)
        pipe = streamer.Serve.answer(self.connection, name, exists)
        if pipe is None:
            return
        flags = fcntl.fcntl(pipe, fcntl.F_GETFL)
        fcntl.fcntl(pipe, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        if member in self.index.files:
            data = self.index.files[member]
            file = _File(name, len(data), received=len(data), memory=deque([memoryview(data)] if data else []))
        else:
            file = self.files[name]
            if file.pipe is not None or file.done:  # only a file CRIU had is done
                os.close(pipe)
                raise RestoreFailed(f"CRIU asked for {name} twice; it streams each image once")
        file.pipe = pipe
        self.served[pipe] = file
        self.last_progress = time.monotonic()
        self._deliver(file)

    def _deliver(self, file: _File) -> None:
        """Write what `file` has for CRIU into its pipe, until the pipe is full."""
        while file.pipe is not None and (room := min(file.received, file.size) - file.delivered) > 0:
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
            del self.served[file.pipe]
            os.close(file.pipe)
        file.pipe, file.done = None, True
        file.memory.clear()
        if file.spill is not None:
            os.close(file.spill)
            file.spill = None

    def _cut(self) -> None:
        """Close every pipe, the connection, the socket and the gate: CRIU's next read or request fails, or its gate."""
        for file in list(self.served.values()):
            self._close(file)
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.listener is not None:  # a CRIU not yet accepted is refused too
            self.listener.close()
        if self.verdict is not None:  # the gate gets the lock and no verdict
            os.close(self.verdict)
            self.verdict = None
