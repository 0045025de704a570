"""Owns the tar members of an archive: the framing written around each, and reading them from a stream of blocks."""

from __future__ import annotations

import re
import tarfile
import time
from collections.abc import Iterator

from kerrickpt.errors import ArchiveCorruptError

SMALL_MEMBER = 16 << 20  # the most a member read whole (header, pax header, manifest) may claim


def framing(name: str, size: int) -> tuple[bytes, bytes]:
    """A tar member's header and the padding after its `size` bytes."""
    return header(name, size, int(time.time())), bytes(-size % tarfile.BLOCKSIZE)


def header(name: str, size: int, mtime: int) -> bytes:
    """The header tarfile writes for a member `name` of `size` bytes, modified at `mtime` (see _tarinfo), in the pax
    format. A name and numbers that fit a plain ustar header (most do) get one made here, byte for byte tarfile's:
    tarfile takes some 30 microseconds a header, and a dump's images (one per TCP connection of a container) are
    framed within its freeze."""
    encoded = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    if not 0 < len(encoded) <= USTAR_NAME or not 0 <= size < USTAR_NUMBER or not 0 <= mtime < USTAR_NUMBER:
        return _tarinfo(name, size, mtime).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    block = bytearray(_USTAR)
    block[: len(encoded)] = encoded
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % mtime
    block[148:155] = b"%06o\0" % sum(block)  # summed with its own field as spaces, as _USTAR has it
    return bytes(block)


def ending(offset: int) -> bytes:
    """The end of a tar of `offset` bytes: two zero blocks, then zeros up to a whole record, as tarfile ends one."""
    return bytes(2 * tarfile.BLOCKSIZE + -(offset + 2 * tarfile.BLOCKSIZE) % tarfile.RECORDSIZE)


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = mtime
    return info


USTAR_NAME = 100  # the most bytes of a name that tarfile's pax format puts in a plain ustar header
USTAR_NUMBER = 8**11  # and the numbers its 12-byte octal fields hold
_EMPTY = _tarinfo("", 0, 0).tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
_USTAR = _EMPTY[:148] + b" " * 8 + _EMPTY[156:]  # what `header` fills in: its checksum field as spaces


# A record of a pax extended header: "LENGTH KEYWORD=VALUE\n", LENGTH counting the whole record.
PAX_RECORD = re.compile(rb"([0-9]+) ([^=]+)=")


def _pax(data: bytes, label: str) -> dict[str, str]:
    """The records of a pax extended header: a name too long for the tar header comes this way."""
    records: dict[str, str] = {}
    pos = 0
    while match := PAX_RECORD.match(data, pos):
        if len(match[1]) > len(str(len(data))):  # longer than the header: and int() refuses 4,300 digits
            raise ArchiveCorruptError(f"{label} is corrupt: a damaged pax header")
        end = match.start() + int(match[1])
        if end <= match.end() or data[end - 1 : end] != b"\n":
            raise ArchiveCorruptError(f"{label} is corrupt: a damaged pax header")
        records[match[2].decode("utf-8", "surrogateescape")] = data[match.end() : end - 1].decode(
            "utf-8", "surrogateescape"
        )
        pos = end
    return records


class Reader:
    """A tar stream over decompressed blocks, read in exact amounts; members' bytes are views, never copies."""

    def __init__(self, blocks: Iterator[bytes], label: str) -> None:
        self.blocks = blocks
        self.label = label
        self.view = memoryview(b"")

    def members(self) -> Iterator[tuple[tarfile.TarInfo, Iterator[memoryview]]]:
        """Each member with its bytes, up to the end marker; what the consumer leaves unread is skipped."""
        pax: dict[str, str] = {}
        while self._more():
            try:
                info = tarfile.TarInfo.frombuf(self._read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
            except tarfile.EOFHeaderError:  # a zero block: the end of the tar
                return
            except tarfile.HeaderError as exc:
                raise ArchiveCorruptError(f"{self.label} is corrupt: {exc}") from exc
            if info.size < 0:  # tarfile reads a base-256 size field as a negative number
                raise ArchiveCorruptError(f"{self.label} is corrupt: a tar member of {info.size} bytes")
            info.name = pax.get("path", info.name)
            data = self._pieces(info.size)
            if info.type == tarfile.XHDTYPE:  # describes the next member, and only it
                if info.size > SMALL_MEMBER:  # read whole: zeros compress 30,000:1, so it must be bounded
                    raise ArchiveCorruptError(f"{self.label} is corrupt: a pax header of {info.size} bytes")
                pax = _pax(b"".join(data), self.label)
            else:
                pax = {}
                yield info, data
                for _ in data:
                    pass
            for _ in self._pieces(-info.size % tarfile.BLOCKSIZE):
                pass

    def _more(self) -> bool:
        """Whether bytes follow (a tar stream may end without its end marker, as tarfile accepts)."""
        if not self.view:
            self.view = memoryview(next(self.blocks, b""))
        return bool(self.view)

    def _pieces(self, size: int) -> Iterator[memoryview]:
        while size:
            if not self._more():
                raise ArchiveCorruptError(f"{self.label} is corrupt: it ends inside a tar member")
            piece, self.view = self.view[:size], self.view[size:]
            size -= len(piece)
            yield piece

    def _read(self, size: int) -> bytes:
        return b"".join(self._pieces(size))
