"""Owns a snapshot's warmed image space: a file whose pages are written before the freeze and rewritten during it."""

from __future__ import annotations

import os
from pathlib import Path

from kerrickpt.streamer import Sink

NAME = "images.reserve"
TOUCH_BYTES = 1 << 20
# Handed on at a time after the thaw: as much as a deduplicating store cuts at once (recipewriter.ADD_BYTES), which
# then takes each piece as it is, not joined from smaller ones (a copy of every byte).
READ_BYTES = 8 << 20


class Reserve:
    """A streamer.PipeSink for a dump's images that writes them into pages the machine has already given out.

    Memory taken while the container is frozen costs the freeze what the machine makes it cost: page
    allocation and zeroing, reclaim when memory is short, and on a VM that hands free pages back to
    its host (free page reporting), the host backing each page again, about 1 s per GiB here (README,
    Performance). So the space is taken and written once before the freeze (`size` bytes of zeros:
    about what the dump will write), and the images overwrite it in place, one piece after another
    in the order CRIU sends them; what does not fit grows the file. `into` gives them to the archive
    after the thaw. The file is 0600 in `directory` (a private scratch directory) and is gone after
    `close`: nothing is kept between snapshots.
    """

    def __init__(self, directory: Path, size: int) -> None:
        self.path = directory / NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.used = 0
        self.pieces: dict[str, list[tuple[int, int]]] = {}  # name -> (offset, length), in CRIU's order
        try:
            zeros = memoryview(bytes(TOUCH_BYTES))
            for offset in range(0, size, TOUCH_BYTES):
                # Written, not fallocate'd: a page only allocated is not touched, so nothing would back it yet.
                os.pwrite(self.fd, zeros[: min(TOUCH_BYTES, size - offset)], offset)
        except BaseException:
            self.close()
            raise

    def write(self, name: str, data: bytes) -> None:
        view, at = memoryview(data), self.used
        while view:  # a short write goes on where it stopped
            written = os.pwrite(self.fd, view, at)
            view, at = view[written:], at + written
        self._add(name, len(data))

    def take(self, name: str, pipe: int, most: int) -> int:
        """streamer.PipeSink: CRIU's pages go from its pipe into the reserve's pages, copied once, by the kernel."""
        moved = os.splice(pipe, self.fd, most, offset_dst=self.used)
        self._add(name, moved)
        return moved

    def _add(self, name: str, length: int) -> None:
        """`length` more bytes of image `name` were written at the end of what is used."""
        pieces = self.pieces.setdefault(name, [])
        if pieces and sum(pieces[-1]) == self.used:  # CRIU's writes to one image often follow each other
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + length)
        elif length:
            pieces.append((self.used, length))
        self.used += length

    def end(self, name: str) -> None:
        self.pieces.setdefault(name, [])  # an empty image is an image too

    def layout(self, prefix: str) -> dict[str, list[tuple[int, int]]]:
        """Where each image lies in the reserve's file (`path`), named under `prefix`: its pieces, in order."""
        return {prefix + name: list(pieces) for name, pieces in self.pieces.items()}

    def into(self, sink: Sink) -> None:
        """Hand every image to `sink` as CRIU wrote it, in the order CRIU began them."""
        for name, pieces in self.pieces.items():
            for offset, length in pieces:
                for at in range(offset, offset + length, READ_BYTES):
                    sink.write(name, os.pread(self.fd, min(READ_BYTES, offset + length - at), at))
            sink.end(name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)
