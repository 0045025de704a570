"""Owns reading an archive back: every member checked against its manifest, one member as a file, the index."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from kerrickpt import archiveindex, progress, sealed, tarstream, zstdframe
from kerrickpt.ahead import Ahead
from kerrickpt.errors import ArchiveCorruptError, ArchiveUnreadableError
from kerrickpt.keys import Key
from kerrickpt.manifest import CHECKSUMS, DIGESTED, FORMAT, Manifest, Member
from kerrickpt.manifest import NAME as MANIFEST_NAME
from kerrickpt.members import CHUNK_MEMBER, HEADER, SAFE_MEMBER, allowed

Source = Path | BinaryIO  # an archive file, or an archive arriving as a stream (a migration)


def label(source: Source) -> str:
    """How messages name an archive."""
    return str(source) if isinstance(source, Path) else "the incoming archive"


def _file(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise ArchiveUnreadableError(f"cannot read {path}: {exc.strerror}") from exc


def _open(path: Path, key: Key | None) -> BinaryIO:
    """The archive file as written before any sealing: plain, or opened with `key` (see sealed.opened)."""
    return sealed.opened(_file(path), key, str(path))


def sealing(path: Path) -> sealed.Header | None:
    """How the archive at `path` is sealed (its key id and method, read without the key); None if it is not."""
    with _file(path) as fh:
        return sealed.peek(fh, str(path))


def _reported(fh: BinaryIO, path: Path) -> BinaryIO:
    """The archive file, its reads reported as a phase of the Progress in effect (see progress)."""
    tracker = progress.current()
    tracker.phase(f"reading {path.name}", fh.seek(0, os.SEEK_END))
    fh.seek(0)
    return cast(BinaryIO, progress.Counted(fh, tracker))


def _members(
    source: Source, index: list[archiveindex.Unpacked] | None = None, digest: Any = None, key: Key | None = None
) -> Iterator[tuple[str, int, Iterator[memoryview]]]:
    """Each member of the archive (name, size, bytes); corruption becomes ArchiveCorruptError.

    The index after the frame, if any, goes to `index` once the last member was read, unpacked (see
    archiveindex.unpack); without `index`, nothing may follow the frame. `digest` (a hash) is updated with the
    frame's compressed bytes as they are read. An archive file sealed with `key` is opened with it.
    """
    path = label(source)
    fh = _open(source, key) if isinstance(source, Path) else source  # closed once read, either way
    if isinstance(source, Path):
        fh = _reported(fh, source)
    after: list[bytes] | None = [] if index is not None else None
    frame = zstdframe.blocks(fh, path, after, archiveindex.MAX_INDEX, digest)
    with fh, Ahead(frame, "kerrickpt-unzstd") as blocks:
        for info, data in tarstream.Reader(blocks, path).members():
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or not allowed(info.name):
                raise ArchiveCorruptError(f"unexpected member {info.name!r} in {path}")
            if info.name in (HEADER, MANIFEST_NAME) and info.size > tarstream.SMALL_MEMBER:
                raise ArchiveCorruptError(f"{path} is corrupt: its {info.name} claims {info.size} bytes")
            yield info.name, info.size, data
        # tar stops at its end marker; read on so a cut or damaged zstd frame end is seen.
        for _ in blocks:
            pass
        if index is not None and after:
            index.append(archiveindex.unpack(after[0], path))  # its framing: a cut-off index is a truncated archive


@contextlib.contextmanager
def output(dest: Path | None, name: str, *, first: bool) -> Iterator[int | None]:
    """Where a member's bytes go: a new 0600 file under `dest` (appended to by later chunks), or nowhere."""
    if dest is None:
        yield None
        return
    target = dest / name
    target.parent.mkdir(mode=0o700, exist_ok=True)
    how = os.O_CREAT | os.O_EXCL if first else os.O_APPEND
    fd = os.open(target, os.O_WRONLY | how | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


@dataclass
class _Received:
    """One file as extract has seen it so far: whole, or the chunks up to now."""

    chunked: bool
    hash: Any
    size: int = 0
    chunks: int = 0
    chunk_bytes: int = 0

    def member(self, name: str) -> Member:
        return Member(name, self.size, self.hash.hexdigest(), self.chunks, self.chunk_bytes)


class PieceReader(io.RawIOBase):
    """A file's pieces as a file object; `finish` reads the rest, so that the check its pieces make at their end
    is made."""

    def __init__(self, pieces: Iterator[bytes | memoryview]) -> None:
        super().__init__()
        self.pieces = pieces
        self.view = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.view:
            piece = next(self.pieces, None)
            if piece is None:
                return 0
            self.view = memoryview(piece)
        taken = min(len(buffer), len(self.view))
        buffer[:taken] = self.view[:taken]
        self.view = self.view[taken:]
        return taken

    def finish(self) -> None:
        """Read what is left of the file (a tar's padding, say) and check it whole."""
        self.view = memoryview(b"")
        for _ in self.pieces:
            pass


class MemberReader(PieceReader):
    """One file of an archive, read as a file from the archive's start: a member and its chunks, which follow
    one another. At its end, ArchiveCorruptError if it is not what the manifest says (`expected`). Only as
    much of the archive is read as it takes to reach the file's end."""

    def __init__(self, path: Path, expected: Member, checksum: str, key: Key | None = None) -> None:
        self.expected = expected
        self.hash = CHECKSUMS[checksum]()
        self.size = 0
        self.members = _members(path, key=key)
        super().__init__(self._pieces())

    def _pieces(self) -> Iterator[memoryview]:
        seen = False
        for member, _, data in self.members:
            chunk = CHUNK_MEMBER.fullmatch(member)
            if (chunk["name"] if chunk else member) != self.expected.name:
                if seen:
                    break
                continue
            seen = True
            for piece in data:
                self.hash.update(piece)
                self.size += len(piece)
                yield piece
            if self.size >= self.expected.size:
                break
        if self.size != self.expected.size or self.hash.hexdigest() != self.expected.digest:
            raise ArchiveCorruptError(f"{self.expected.name} in the archive does not match its checksum")

    def close(self) -> None:
        self.members.close()  # type: ignore[attr-defined]
        super().close()


def extract(
    source: Source,
    dest: Path | None,
    into: Callable[[str, memoryview], None] | None = None,
    key: Key | None = None,
) -> Manifest:
    """Unpack into `dest` (0600 files; None unpacks nothing) and verify every file against the manifest.

    With `into`, each file's bytes go there instead, piece by piece as they are read and
    hashed, under the file's name: a file is whole once it has had its manifest size.
    Raises ArchiveCorruptError for a flipped byte, a truncated archive, or a file or chunk
    that is missing, extra, repeated, out of order or unexpected; `dest` then holds nothing worth using.
    An archive file sealed with `key` is opened with it (see sealed.opened).
    """
    path = label(source)
    received: dict[str, _Received] = {}
    body: bytes | None = None
    version, checksum = 0, "sha256"  # unless the archive starts with its HEADER
    after: list[archiveindex.Unpacked] = []
    frame = archiveindex.DIGEST()
    with contextlib.closing(_members(source, after, frame, key)) as members:
        for member, size, data in members:
            if body is not None:
                raise ArchiveCorruptError(f"{path} has data after its manifest")
            if member == HEADER:
                if received:
                    raise ArchiveCorruptError(f"{path} has its format header in the middle")
                version, checksum = _header(b"".join(data), path)
                continue
            if member == MANIFEST_NAME:
                body = b"".join(data)
                continue
            chunk = CHUNK_MEMBER.fullmatch(member)
            name, index = (chunk["name"], int(chunk["index"])) if chunk else (member, 0)
            if chunk and (not SAFE_MEMBER.fullmatch(name) or CHUNK_MEMBER.fullmatch(name)):
                raise ArchiveCorruptError(f"unexpected member {member!r} in {path}")
            first = name not in received
            got = received.setdefault(name, _Received(bool(chunk), CHECKSUMS[checksum]()))
            if not first and not (chunk and got.chunked):
                raise ArchiveCorruptError(f"{path} holds {name} twice")
            if chunk and index != got.chunks:
                raise ArchiveCorruptError(
                    f"chunk {index} of {name} in {path} is out of order (chunk {got.chunks} was next): "
                    "a chunk is missing, repeated or misplaced"
                )
            with output(dest, name, first=first) as fd:
                for piece in data:
                    got.hash.update(piece)
                    if fd is not None:
                        write_all(fd, piece)
                    elif into is not None:
                        into(name, piece)
            got.size += size
            if chunk:
                got.chunk_bytes = got.chunk_bytes or size
                got.chunks += 1
    if body is None:
        raise ArchiveCorruptError(f"{path} has no manifest: it is incomplete")
    manifest = Manifest.from_json(body)
    if manifest.checksum != checksum:
        raise ArchiveCorruptError(f"{path} was checked with {checksum}, but its manifest says {manifest.checksum}")
    expected = {m.name: m for m in manifest.members}
    for name in sorted(expected.keys() | received.keys()):
        if name not in received:
            raise ArchiveCorruptError(f"{path} lacks {name}, which its manifest lists")
        if name not in expected:
            raise ArchiveCorruptError(f"{path} holds {name}, which its manifest does not list")
        if received[name].chunks < expected[name].chunks:
            raise ArchiveCorruptError(f"{path} lacks chunk {received[name].chunks} of {name}")
        if received[name].member(name) != expected[name]:
            raise ArchiveCorruptError(f"{name} in {path} does not match its checksum")
    if after:
        index = archiveindex.parse(after[0], path)
        if index.body != body:
            raise ArchiveCorruptError(f"the index of {path} does not match its manifest")
        if index.frame is None and version >= DIGESTED:
            raise ArchiveCorruptError(f"{path} has a damaged index (it lacks the digests its version has)")
        if index.frame is not None and index.frame != frame.digest():
            raise ArchiveCorruptError(f"{path} is corrupt: its compressed bytes do not match their digest")
    elif version >= 4:
        raise ArchiveCorruptError(f"{path} is truncated (it lacks the index it ends with)")
    return manifest


def _header(data: bytes, path: str) -> tuple[int, str]:
    """The format version and the checksum algorithm a version 3+ archive's HEADER names."""
    try:
        header = json.loads(data)
        if header["format"] != FORMAT or header["checksum"] not in CHECKSUMS:
            raise ValueError(f"unknown format or checksum: {header}")
        return int(header["version"]), str(header["checksum"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveCorruptError(f"{path} has a damaged format header: {exc}") from exc


def read_index(path: Path, key: Key | None = None) -> archiveindex.Index | None:
    """The index a version 4 archive ends with, read from the end (nothing else is read); None without one.

    Since version 7 the index's bytes are checked against their digest, but the frame's are not read.
    """
    return archiveindex.read(_open(path, key), str(path))


def verify(path: Path, key: Key | None = None) -> Manifest:
    """Check every member against the manifest, unpacking nothing; raises ArchiveCorruptError."""
    return extract(path, None, key=key)


def read_manifest(path: Path, key: Key | None = None) -> Manifest:
    """The manifest, without unpacking anything: from the index, or else (an archive without one) from a
    verify, which reads through the whole archive as finding its manifest, the last member, would."""
    index = read_index(path, key)
    return index.manifest if index is not None else verify(path, key)
