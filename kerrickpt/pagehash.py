"""Owns hashing a snapshot's pages on other cores: worker processes that name the 4 KiB chunks of files in a file.

A deduplicating store names each chunk by its address (see `addresser`), and a snapshot of 1 GiB hashes 262,144 of
them. In one process that is one core's work: hashlib lets go of Python's lock for each 4 KiB page and takes it back,
and threads doing so wait on each other at every page. After the thaw the dump's images lie in one file (the
snapshot's reserve), so workers map that file and hash its pages in parallel, without Python's lock between them,
while the run cuts and stores them; the run takes their addresses in the order it cuts.

This module imports nothing but Python's own: a worker runs it as a script (`python -I -S pagehash.py`), which starts
in some 20 ms, not as kerrickpt, whose imports take ten times that.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import mmap
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

CHUNK = 4096  # a store's chunk (chunks.CHUNK is this): defined here, since a worker imports nothing of kerrickpt
DIGEST = 32  # bytes an address takes, a sha256 (chunks.ADDRESS is this)
SEGMENT = 4 << 20  # bytes a worker hashes as one task: enough to keep it busy, small enough to share out evenly
MOST_WORKERS = 4
PIPE_BYTES = 1 << 20  # each worker's output pipe: a quarter of a GiB's addresses, so workers run ahead of the run
WAIT = 120.0  # s a worker may give nothing (4 MiB takes it some 3 ms) before the run hashes its pages itself

log = logging.getLogger(__name__)

Pieces = list[tuple[int, int]]  # (offset, length) in the file, in the order they make up a file's bytes


def addresser(key: bytes | None) -> Callable[[bytes | memoryview], bytes]:
    """How a store addresses a chunk: the sha256 of its bytes, or in an encrypted store (`key`: its address key)
    their HMAC-SHA256. One definition, so that the workers and the run can never name a chunk differently."""
    if key is None:
        return lambda data: hashlib.sha256(data).digest()
    # The one-call form: an HMAC object made per 4 KiB chunk cost half again the hashing, and held the GIL.
    return partial(hmac.digest, key, digest="sha256")


class Hashing:
    """The addresses of the chunks of `files` (name -> its pieces of the file at `path`), cut every CHUNK bytes of
    each file, hashed by worker processes (see the module's docstring) from the moment it is made.

    `take` gives them in the order a run cuts each file; None once the workers cannot give them (one died or hung):
    the run then hashes the rest itself, slower but the same. `close` ends the workers.
    """

    def __init__(self, path: Path, files: dict[str, Pieces], key: bytes | None, workers: int) -> None:
        # Each task: a file's name, how many addresses it gives, and the pieces of the file it hashes; task i goes to
        # worker i % n, and the run takes them in order.
        tasks = [(name, *task) for name, pieces in files.items() for task in _segments(pieces)]
        self.order: collections.deque[tuple[str, int, subprocess.Popen[bytes]]] = collections.deque()
        self.taken: dict[str, bytearray] = collections.defaultdict(bytearray)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names = set(files)
        self.failed = False
        n = min(workers, len(tasks))
        try:
            for number in range(n):
                self.procs.append(_start(path, key, [pieces for _, _, pieces in tasks[number::n]]))
        except OSError as exc:
            log.info("pages are hashed in this process: a worker did not start: %s", exc)
            self.close()
            self.failed = True
        else:
            self.order.extend((name, count, self.procs[i % n]) for i, (name, count, _) in enumerate(tasks))

    def take(self, name: str, count: int) -> bytes | None:
        """The next `count` addresses of file `name`, back to back; None if the workers could not give them, or
        were not given the file."""
        if name not in self.names:
            return None
        want = count * DIGEST
        have = self.taken[name]
        while len(have) < want and self.order and not self.failed:
            task, addresses, proc = self.order.popleft()
            got = self._read(proc, addresses * DIGEST)
            if got is None:
                self.failed = True
                self.close()
            else:
                self.taken[task] += got
        if self.failed or len(have) < want:
            return None
        piece = bytes(have[:want])
        del have[:want]
        return piece

    def _read(self, proc: subprocess.Popen[bytes], size: int) -> bytes | None:
        """`size` bytes from worker `proc`, or None if it ends or gives nothing for WAIT s first."""
        from kerrickpt import fdread  # here, not above: a worker runs this file with Python's own modules only

        assert proc.stdout is not None
        try:
            data = fdread.read_exact(proc.stdout.fileno(), size, WAIT)
        except fdread.Stalled:
            log.warning("a page-hashing worker gave nothing for %.0f s: the run hashes its pages itself", WAIT)
            return None
        if len(data) < size:
            log.warning("a page-hashing worker ended early: the run hashes its pages itself")
            return None
        return bytes(data)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()


def workers() -> int:
    """How many workers hash a snapshot's pages: one per core this process may run on (none on one core, nor in a
    Python embedded in a program that cannot say which Python it is)."""
    if not sys.executable:
        return 0
    cores = len(os.sched_getaffinity(0))
    return min(cores, MOST_WORKERS) if cores > 1 else 0


def _segments(pieces: Pieces) -> list[tuple[int, Pieces]]:
    """A file's pieces in tasks of SEGMENT bytes of the file (whole chunks, but for its end): each task's count of
    addresses, and its pieces."""
    tasks: list[tuple[int, Pieces]] = []
    current: Pieces = []
    held = 0
    for offset, length in pieces:
        while length:
            take = min(length, SEGMENT - held)
            current.append((offset, take))
            offset, length, held = offset + take, length - take, held + take
            if held == SEGMENT:
                tasks.append((SEGMENT // CHUNK, current))
                current, held = [], 0
    if held:
        tasks.append((-(-held // CHUNK), current))
    return tasks


def _start(path: Path, key: bytes | None, tasks: list[Pieces]) -> subprocess.Popen[bytes]:
    """A worker hashing `tasks` of the file at `path`: told them (and the key, never on its command line) on its
    standard input, which it reads whole; it writes each task's addresses in turn, then ends."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", __file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    with contextlib.suppress(OSError):  # a smaller pipe only lets it run less far ahead
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    order = json.dumps({"path": str(path), "key": key.hex() if key is not None else None, "tasks": tasks})
    try:
        proc.stdin.write(order.encode())
        proc.stdin.close()
    except OSError:
        proc.kill()
        proc.wait()
        raise
    return proc


def _serve() -> None:
    """A worker: each task's addresses, in order, on standard output."""
    order = json.loads(sys.stdin.buffer.read())
    address = addresser(None if order["key"] is None else bytes.fromhex(order["key"]))
    fd = os.open(order["path"], os.O_RDONLY | os.O_CLOEXEC)
    view = memoryview(mmap.mmap(fd, 0, prot=mmap.PROT_READ))  # left to the process's end to unmap
    os.close(fd)
    out = sys.stdout.buffer
    for pieces in order["tasks"]:
        data: bytes | memoryview
        if len(pieces) == 1:
            data = view[pieces[0][0] : sum(pieces[0])]
        else:  # a task over pieces written apart (CRIU wrote other images between them)
            data = b"".join(view[offset : offset + length] for offset, length in pieces)
        out.write(b"".join([address(data[at : at + CHUNK]) for at in range(0, len(data), CHUNK)]))
        out.flush()


if __name__ == "__main__":
    _serve()
