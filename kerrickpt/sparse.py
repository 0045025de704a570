"""Owns files with holes in a tar stream: where a file has its data, and the member GNU's sparse format 1.0 makes
of it (GNU tar's --sparse --format=pax, which tarfile reads)."""

from __future__ import annotations

import contextlib
import itertools
import os
import tarfile
from typing import BinaryIO

# A file's holes are carried as a map of its data runs, of this many runs at the most: the map is held in memory.
MAX_RUNS = 4096
# tarfile misreads a sparse member whose stored size needs a pax header (8 GiB and more): bigger ones go whole.
LARGEST = 8**11 - MAX_RUNS * 64


def data_runs(fd: int, size: int) -> list[tuple[int, int]] | None:
    """Where a file with holes has its data, as (offset, length) runs; None for a file without holes, or with too
    many of them (it is carried whole: its zeros cost little compressed)."""
    try:
        if os.lseek(fd, 0, os.SEEK_HOLE) >= size:
            return None
        runs = []
        offset = 0
        with contextlib.suppress(OSError):  # ENXIO: only a hole is left
            while offset < size and len(runs) < MAX_RUNS:
                start = os.lseek(fd, offset, os.SEEK_DATA)
                offset = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                runs.append((start, offset - start))
    except OSError:  # a file system that does not say where holes are
        return None
    finally:
        os.lseek(fd, 0, os.SEEK_SET)  # where the data is read from
    return runs if len(runs) < MAX_RUNS and sum(length for _, length in runs) < LARGEST else None


class Member:
    """A file with holes as a member in GNU's sparse format 1.0 (GNU tar's --sparse --format=pax, which tarfile
    reads): headers give its real size, its data is the map of its data runs, then the runs one after another."""

    def __init__(self, info: tarfile.TarInfo, fh: BinaryIO, runs: list[tuple[int, int]]) -> None:
        head = "".join(f"{number}\n" for number in (len(runs), *itertools.chain.from_iterable(runs))).encode()
        self.head = head + bytes(-len(head) % tarfile.BLOCKSIZE)
        info.pax_headers.update(
            {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(info.size)}
        )
        info.size = len(self.head) + sum(length for _, length in runs)
        self.fh, self.runs, self.left = fh, iter(runs), 0

    def read(self, size: int) -> bytes:
        """`size` bytes (fewer only at the end): tarfile takes a shorter read for a file cut short."""
        pieces = []
        while size and (piece := self._piece(size)):
            pieces.append(piece)
            size -= len(piece)
        return b"".join(pieces)

    def _piece(self, size: int) -> bytes:
        if self.head:
            taken, self.head = self.head[:size], self.head[size:]
            return taken
        while not self.left:
            run = next(self.runs, None)
            if run is None:
                return b""
            self.fh.seek(run[0])
            self.left = run[1]
        data = self.fh.read(min(size, self.left))
        self.left -= len(data)
        return data
