"""Owns sealed files: an archive's bytes encrypted and authenticated with a key, as a stream of sealed segments.

A sealed file is a plain header, then segments of SEGMENT bytes of the plain file each (the last one at most that,
empty only if the whole file is), each sealed with a key of the file's own (keys.Key.derived, from the header's
random salt) and bound to the header, to its index and to whether it is the last (the STREAM construction of Tink's
streaming AEAD and of age): a segment changed, moved, repeated or dropped, or a file cut short or grown, even at a
segment boundary, fails its authentication. The header says which key and method sealed it, so that it can be
named without the key.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from kerrickpt import keys
from kerrickpt.errors import ArchiveCorruptError, ArchiveUnreadableError, KeyUnusableError

MAGIC = b"kckptsea"  # a plain archive starts with zstd's magic number: the two are told apart by their first bytes
VERSION = 1
SEGMENT = 1 << 20  # a segment's plain bytes: what a reader decrypts at once and holds
MIN_SEGMENT, MAX_SEGMENT = 4 << 10, 64 << 20  # what a header may say: a reader holds one segment in memory
SALT_BYTES = 16
OVERHEAD = keys.NONCE_BYTES + keys.TAG_BYTES  # what sealing adds to a segment
_HEADER = struct.Struct("<8sHB8s16sI")  # magic, version, sealing, key id, salt, segment size
_WHERE = struct.Struct("<QB")  # a segment's index and whether it is the last, bound with the header


@dataclass(frozen=True)
class Header:
    """What a sealed file says of itself in the clear: which key and method sealed it, and how."""

    sealing: int
    key_id: str
    salt: bytes
    segment: int

    @property
    def method(self) -> str:
        return keys.NAMES[self.sealing]

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, self.sealing, bytes.fromhex(self.key_id), self.salt, self.segment)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "key_id": self.key_id, "segment_bytes": self.segment}


def _bound(header: bytes, index: int, last: bool) -> bytes:
    return header + _WHERE.pack(index, last)


def peek(fh: BinaryIO, label: str) -> Header | None:
    """The header of the file open as `fh` if it is sealed, None if it is not (a plain archive); `fh` is left at
    its start. ArchiveCorruptError for a header this kerrickpt cannot use."""
    try:
        start = fh.read(_HEADER.size)
        fh.seek(0)
    except OSError as exc:
        raise ArchiveUnreadableError(f"reading {label} failed: {exc.strerror}") from exc
    if not start.startswith(MAGIC):
        return None
    if len(start) < _HEADER.size:
        raise ArchiveCorruptError(f"{label} is truncated (within its encryption header)")
    _, version, sealing, key_id, salt, segment = _HEADER.unpack(start)
    if version != VERSION:
        raise ArchiveCorruptError(
            f"{label} is sealed in format version {version}; this kerrickpt reads version {VERSION} (a newer "
            "kerrickpt wrote it, or its header is damaged)"
        )
    if sealing not in keys.NAMES or not MIN_SEGMENT <= segment <= MAX_SEGMENT:
        raise ArchiveCorruptError(f"{label} has a damaged encryption header (method {sealing}, segments {segment})")
    return Header(sealing, key_id.hex(), salt, segment)


def opened(fh: BinaryIO, key: keys.Key | None, label: str) -> BinaryIO:
    """The file open as `fh` to read as it was before sealing: `fh` itself if it is plain, else a Reader.

    A sealed file needs its key (KeyUnusableError naming the key it needs, or both keys if `key` is another); a
    plain one is refused when a key is given, as anyone may have written it: who gives a key expects what only
    its holder could write. `fh` is closed if refused.
    """
    try:
        header = peek(fh, label)
        if header is None:
            if key is not None:
                raise ArchiveCorruptError(
                    f"{label} is not encrypted, but a key was given: refused, as anyone could have written it "
                    "(without a key it is read as the plain archive it is)"
                )
            return fh
        if key is None:
            raise KeyUnusableError(
                f"{label} is encrypted ({header.method}) with key {header.key_id}: give its key file "
                "(--key-file, or $KERRICKPT_KEY_FILE)"
            )
        key.check(header.key_id, label)
        return Reader(fh, header, key, label)
    except BaseException:
        fh.close()
        raise


class Writer:
    """A sealed file being written to `out`: `write` the plain bytes, then `finish` (its last segment).

    The header is written at once; a segment is sealed once more than a segment's bytes have come, so that the last
    one, sealed by `finish`, is never empty unless the whole file is. A segment gathers in one buffer and is sealed
    into another, both made once: this runs on the thread that feeds the compressor, while CRIU waits on it.
    """

    def __init__(self, out: BinaryIO, key: keys.Key, segment: int = SEGMENT) -> None:
        self.out = out
        self.header = Header(key.sealing, key.id, os.urandom(SALT_BYTES), segment)
        self.packed = self.header.pack()
        self.key = key.derived(self.header.salt)
        self.plain = memoryview(bytearray(segment))
        self.held = 0  # bytes of `plain` that wait to be sealed
        self.sealed = bytearray(OVERHEAD + segment)
        self.index = 0
        out.write(self.packed)

    def write(self, data: bytes | memoryview) -> int:
        left = memoryview(data).cast("B")
        size = len(left)
        while left:
            if self.held == len(self.plain):  # full, and more comes: not the last
                self._seal(last=False)
            taken = min(len(left), len(self.plain) - self.held)
            self.plain[self.held : self.held + taken] = left[:taken]
            self.held += taken
            left = left[taken:]
        return size

    def _seal(self, *, last: bool) -> None:
        self.out.write(self.key.seal_into(self.plain[: self.held], _bound(self.packed, self.index, last), self.sealed))
        self.held = 0
        self.index += 1

    def finish(self) -> None:
        """Seal what is left as the last segment; nothing may be written after."""
        self._seal(last=True)


class Reader(io.RawIOBase):
    """A sealed file read as the plain file it holds, seekable: each segment is authenticated before any of its
    bytes is given out (ArchiveCorruptError if it fails). The file's size says how many segments it must hold and
    which is the last, so that one cut off or added is found when the segment it changes is read."""

    def __init__(self, fh: BinaryIO, header: Header, key: keys.Key, label: str) -> None:
        super().__init__()
        self.fh = fh
        self.header = header
        self.packed = header.pack()
        self.key = key.derived(header.salt)
        self.label = label
        sealed = header.segment + OVERHEAD
        body = os.fstat(fh.fileno()).st_size - _HEADER.size
        self.count = -(-body // sealed)  # segments
        self.last_bytes = body - (self.count - 1) * sealed
        if self.count == 0 or self.last_bytes < OVERHEAD:
            raise ArchiveCorruptError(f"{label} is truncated (its last encrypted segment is cut off)")
        self.size = body - self.count * OVERHEAD  # plain bytes
        self.position = 0
        self.cached: tuple[int, bytes] = (-1, b"")
        self.read_buffer = bytearray(sealed)  # each segment is read into it: fresh memory each time costs more

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.position = base + offset
        return self.position

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (all that are left if negative), fewer only at the end; a segment read whole is
        given out without a copy."""
        end = self.size if size is None or size < 0 else min(self.size, self.position + size)
        pieces = []
        while self.position < end:
            index, at = divmod(self.position, self.header.segment)
            plain = self._segment(index)
            piece = plain[at : at + end - self.position] if at or end - self.position < len(plain) else plain
            pieces.append(piece)
            self.position += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _segment(self, index: int) -> bytes:
        if self.cached[0] == index:
            return self.cached[1]
        sealed = len(self.read_buffer)
        got = os.preadv(self.fh.fileno(), [self.read_buffer], _HEADER.size + index * sealed)
        last = index == self.count - 1
        if got != (self.last_bytes if last else sealed):
            raise ArchiveUnreadableError(f"{self.label} changed size while it was read")
        data = memoryview(self.read_buffer)[:got]
        what = f"encrypted segment {index} of {self.label}"
        try:
            plain = self.key.open(data, _bound(self.packed, index, last), self.header.sealing, what)
        except ArchiveCorruptError:
            self._explain(data, index, last)
            raise
        self.cached = (index, plain)
        return plain

    def _explain(self, data: memoryview, index: int, last: bool) -> None:
        """A segment that fails where it is but opens as the last or as not the last: the file was cut off at a
        segment boundary, or has more after its end."""
        try:
            self.key.open(data, _bound(self.packed, index, not last), self.header.sealing, "")
        except ArchiveCorruptError:
            return
        if last:
            raise ArchiveCorruptError(f"{self.label} is truncated (it ends at an encrypted segment's boundary)")
        raise ArchiveCorruptError(f"{self.label} has data after its last encrypted segment")

    def close(self) -> None:
        self.fh.close()
        super().close()
