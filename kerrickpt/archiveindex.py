"""Owns the index an archive ends with: its manifest and small images in a skippable zstd frame."""

from __future__ import annotations

import os
import struct
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

import xxhash
import zstandard

from kerrickpt import tarstream
from kerrickpt.errors import ArchiveCorruptError, ArchiveUnreadableError
from kerrickpt.manifest import CHECKSUMS, Manifest
from kerrickpt.manifest import NAME as MANIFEST_NAME
from kerrickpt.members import SAFE_MEMBER
from kerrickpt.zstdframe import DEFAULT_LEVEL

# Since version 4 the archive ends with an index after its zstd frame: a copy of the manifest and of
# the small images, in a zstd skippable frame (which `zstd -d` passes over), found from the file's
# end. CRIU's restore asks for inventory.img first, which its dump writes last: with the index a
# restore can serve CRIU from the start and stream the memory (pages-*.img) as the frame is read.
INDEX_MAGIC = 0x184D2A5B  # one of the 16 magic numbers zstd reserves for skippable frames
_INDEX_HEAD = struct.Struct("<II")  # the skippable frame's magic and size
_INDEX_FOOT = struct.Struct("<Q8s")  # the index's whole length and a tag, the file's last bytes
INDEX_TAG = b"kckptidx"
# Since version 7 the foot also holds two XXH3-128 digests, so that no byte of the file goes unchecked
# (zstd decodes some changed bytes to the same output, which its checksum and the members' then
# miss): of the zstd frame's compressed bytes, and of the index's own bytes but that digest. Its
# last 16 bytes are laid out as before, with a tag of its own.
_DIGESTED_FOOT = struct.Struct("<16s16sQ8s")  # the frame's digest, the index's digest, length, tag
DIGESTED_TAG = b"kckptdig"
_TAGS = {INDEX_TAG: _INDEX_FOOT, DIGESTED_TAG: _DIGESTED_FOOT}
DIGEST = xxhash.xxh3_128
INDEX_BYTES = 32 << 20  # the most the index's images may hold: bigger ones come from the frame
INDEX_FRAMING = 2048  # what the index's tar adds to an image at the most: its header, a pax header, padding
MAX_INDEX = INDEX_BYTES + 2 * tarstream.SMALL_MEMBER  # the index's images with their framing, and its manifest


def indexable(name: str) -> bool:
    """Whether a file may go into the index: an image, but never process memory, which is streamed."""
    return name.startswith("images/") and not name.startswith("images/pages-")


@dataclass
class Copies:
    """The small images an index will hold: over INDEX_BYTES the biggest go, as their framing counts too."""

    files: dict[str, bytes] = field(default_factory=dict)
    held: int = 0

    def add(self, name: str, data: bytes) -> None:
        self.files[name] = data
        self.held += len(data) + INDEX_FRAMING
        # CRIU's first request, inventory.img, is small and written last.
        while self.held > INDEX_BYTES:
            biggest = self.files.pop(max(self.files, key=lambda n: len(self.files[n])))
            self.held -= len(biggest) + INDEX_FRAMING


def pack(manifest: bytes, files: dict[str, bytes], frame: bytes) -> bytes:
    """The index frame: a zstd-compressed tar of the manifest and `files`, skippable, findable from the end,
    with `frame`, the digest of the archive's zstd frame, and a digest of its own bytes."""
    tar = bytearray()
    for name, data in [(MANIFEST_NAME, manifest), *files.items()]:
        header, padding = tarstream.framing(name, len(data))
        tar += header + data + padding
    body = zstandard.ZstdCompressor(level=DEFAULT_LEVEL, write_checksum=True).compress(tar + bytes(1024))
    size = len(body) + _DIGESTED_FOOT.size
    head = _INDEX_HEAD.pack(INDEX_MAGIC, size) + body + frame
    ending = _INDEX_FOOT.pack(_INDEX_HEAD.size + size, DIGESTED_TAG)
    return head + DIGEST(head + ending).digest() + ending


@dataclass(frozen=True)
class Index:
    """What a version 4 archive ends with: its manifest and its small images, each checked against the manifest."""

    manifest: Manifest
    body: bytes  # the manifest as written, to compare with the one inside the frame
    files: dict[str, bytes]
    frame: bytes | None  # the digest of the zstd frame's compressed bytes (DIGEST); None before version 7


Unpacked = tuple[bytes, bytes | None]  # what `unpack` gives


def unpack(rest: bytes, path: str) -> Unpacked:
    """The compressed tar inside an index frame (`rest`: everything after the archive's zstd frame), and the
    digest of the zstd frame the index gives since version 7 (its own digest checked)."""
    if len(rest) < _INDEX_HEAD.size or _INDEX_HEAD.unpack_from(rest)[0] != INDEX_MAGIC:
        raise ArchiveCorruptError(f"{path} has trailing data after its end")
    size = _INDEX_HEAD.unpack_from(rest)[1]
    if len(rest) < _INDEX_HEAD.size + size:
        raise ArchiveCorruptError(f"{path} is truncated (its index ends early)")
    if len(rest) > _INDEX_HEAD.size + size or size < _INDEX_FOOT.size:
        raise ArchiveCorruptError(f"{path} has trailing data after its end")
    length, tag = _INDEX_FOOT.unpack_from(rest, len(rest) - _INDEX_FOOT.size)
    foot = _TAGS.get(tag)
    if foot is None or length != len(rest) or size < foot.size:
        raise ArchiveCorruptError(f"{path} has a damaged index")
    body = rest[_INDEX_HEAD.size : -foot.size]
    if foot is _INDEX_FOOT:
        return body, None
    frame, digest, _, _ = foot.unpack_from(rest, len(rest) - foot.size)
    if DIGEST(rest[: -_INDEX_FOOT.size - len(digest)] + rest[-_INDEX_FOOT.size :]).digest() != digest:
        raise ArchiveCorruptError(f"{path} has a damaged index (its bytes do not match their digest)")
    return body, frame


def parse(unpacked: Unpacked, path: str) -> Index:
    """The index `unpack` found, every image in it checked against its manifest's digest."""
    compressed, frame = unpacked
    try:
        if not 0 <= zstandard.frame_content_size(compressed) <= MAX_INDEX:  # -1: not said; zeros compress 30,000:1
            raise zstandard.ZstdError("its size is not given or too big")
        tar = zstandard.ZstdDecompressor().decompress(compressed, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ArchiveCorruptError(f"{path} has a damaged index: {exc}") from exc
    body: bytes | None = None
    files: dict[str, bytes] = {}
    for info, data in tarstream.Reader(iter([tar]), path).members():
        name = info.name
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or not (
            name == MANIFEST_NAME if body is None else indexable(name) and SAFE_MEMBER.fullmatch(name)
        ):
            raise ArchiveCorruptError(f"unexpected member {name!r} in the index of {path}")
        if name in files:
            raise ArchiveCorruptError(f"the index of {path} holds {name} twice")
        if body is None:
            body = b"".join(data)
        else:
            files[name] = b"".join(data)
    if body is None:
        raise ArchiveCorruptError(f"the index of {path} has no manifest")
    manifest = Manifest.from_json(body)
    expected = {m.name: m for m in manifest.members}
    for name, data in files.items():
        member = expected.get(name)
        digest = CHECKSUMS[manifest.checksum](data).hexdigest()
        if member is None or member.chunks or (member.size, member.digest) != (len(data), digest):
            raise ArchiveCorruptError(f"the copy of {name} in the index of {path} does not match its checksum")
    return Index(manifest, body, files, frame)


def read(fh: BinaryIO, path: str) -> Index | None:
    """The index the archive open as `fh` ends with, read from the end (nothing else is read); None without one.

    `fh` is closed once read.
    """
    try:
        with fh:
            size = fh.seek(0, os.SEEK_END)  # a sealed archive's plain size, not its file's
            if size < _INDEX_HEAD.size + _INDEX_FOOT.size:
                return None
            fh.seek(size - _INDEX_FOOT.size)
            length, tag = _INDEX_FOOT.unpack(fh.read(_INDEX_FOOT.size))
            if tag not in _TAGS:
                return None
            if not _INDEX_HEAD.size + _INDEX_FOOT.size <= length <= min(size, MAX_INDEX):
                raise ArchiveCorruptError(f"{path} has a damaged index")
            fh.seek(size - length)
            rest = fh.read(length)
    except OSError as exc:
        raise ArchiveUnreadableError(f"reading {path} failed: {exc.strerror}") from exc
    return parse(unpack(rest, path), path)
