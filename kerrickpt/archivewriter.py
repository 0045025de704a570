"""Owns writing an archive: files whole or as chunked streams, the manifest last, put in place once complete."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from kerrickpt import archiveindex, faults, progress, sealed, tarstream, zstdframe
from kerrickpt.archive import write_all
from kerrickpt.errors import UsageError
from kerrickpt.keys import Key
from kerrickpt.manifest import CHECKSUMS, FORMAT, VERSION, Manifest, Member
from kerrickpt.manifest import NAME as MANIFEST_NAME
from kerrickpt.members import CHUNK_MEMBER, HEADER, SAFE_MEMBER

CHUNK = 1 << 20
# Members a stream is cut into: big enough to compress well, small enough to buffer several.
CHUNK_BYTES = 4 << 20
# XXH3-128 hashes at ~30 GB/s a core against sha256's ~2: on two cores sha256 cost a checkpoint or a
# restore half a CPU-second per GiB. The checksums guard against accidents, not tampering (README).
CHECKSUM = "xxh3_128"


@dataclass
class _Pending:
    """A file being written: its bytes not yet in a member, and the hash and size of all of it.

    The bytes wait as the immutable pieces they came in, never in a buffer that grows and
    shrinks: whoever a member's bytes reach may keep them (a broken link's traceback keeps
    the frames that handed them over), and a bytearray with a view still out cannot be resized.
    """

    pieces: deque[bytes | memoryview] = field(default_factory=deque)  # memoryviews of bytes only
    held: int = 0  # the bytes in `pieces`
    hash: Any = field(default_factory=CHECKSUMS[CHECKSUM])
    size: int = 0
    chunks: int = 0

    def add(self, data: bytes) -> None:
        self.pieces.append(data)
        self.held += len(data)
        self.hash.update(data)
        self.size += len(data)

    def take(self, size: int) -> list[bytes | memoryview]:
        """The first `size` bytes held (all there are, at most), as pieces; a piece cut in two is not copied."""
        taken: list[bytes | memoryview] = []
        while size and self.pieces:
            piece = self.pieces.popleft()
            if len(piece) > size:
                view = memoryview(piece)
                piece = view[:size]
                self.pieces.appendleft(view[size:])
            taken.append(piece)
            size -= len(piece)
            self.held -= len(piece)
        return taken


class Writer:
    """An archive being written: files go in whole or as streams, the manifest last (see `commit`).

    The archive appears at `path` only once complete and on disk; until then it lives
    under a hidden temporary name in the same directory, removed if anything fails.
    A stream's size is not known up front, so a file is held back until it ends or
    exceeds CHUNK_BYTES, then written as chunk members: memory stays bounded.
    With `key`, the file is sealed with it (see sealed): what `mirror` gets is the archive as it is before.
    """

    def __init__(
        self,
        path: Path,
        *,
        level: int = zstdframe.DEFAULT_LEVEL,
        mirror: Callable[[bytes | memoryview], None] | None = None,
        key: Key | None = None,
    ) -> None:
        if path.exists():
            raise UsageError(f"{path} exists already; remove it or choose another name")
        self.path = path
        self.level = level
        self.tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{time.monotonic_ns()}"
        self.fd: int | None = None
        self.offset = 0  # bytes of tar written
        self.started = 0.0  # when the first member came: compress_s is from then to the manifest
        self.pending: dict[str, _Pending] = {}
        self.members: list[Member] = []
        self.indexed = archiveindex.Copies()
        self.frame = archiveindex.DIGEST()  # of the zstd frame's bytes, as they are written
        self.mirror = mirror
        self.key = key
        self.sealer: sealed.Writer | None = None
        self.progress = progress.current()  # here: bytes may come from the streamer's thread

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.tmp.unlink(missing_ok=True)

    def _out(self) -> Any:
        """The compressed stream, opened with the first member: a run that dies before leaves no file."""
        if self.fd is None:
            self.started = time.monotonic()
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self.file = os.fdopen(self.fd, "wb", closefd=False)
            self.raw: BinaryIO | sealed.Writer | _Tee = self.file
            if self.key is not None:
                self.raw = self.sealer = sealed.Writer(self.file, self.key)
            self.raw = _Tee(self.raw, self.frame.update)
            if self.mirror:
                self.raw = _Tee(self.raw, self.mirror)
            if self.progress is not progress.SILENT:
                self.raw = _Tee(self.raw, lambda data: self.progress.advance(len(data)))
            self.zstd = zstdframe.compressor(self.raw, self.level)
            self._member(HEADER, [json.dumps({"format": FORMAT, "version": VERSION, "checksum": CHECKSUM}).encode()])
        return self.zstd

    def under(self, prefix: str) -> _Under:
        """This archive as a Sink whose names go under `prefix` (CRIU names `pages-1.img`, not `images/...`)."""
        return _Under(self, prefix)

    def write(self, name: str, data: bytes) -> None:
        """Append `data` to the file `name`, which may be one of several open at once."""
        pending = self._pending(name)
        # Kept as it came, unless the caller may change it afterwards.
        pending.add(data if isinstance(data, bytes) else bytes(data))
        while pending.held > CHUNK_BYTES:  # more follows: this file is chunked
            faults.inject("archive-chunk")
            self._member(f"{name}.{pending.chunks:06d}", pending.take(CHUNK_BYTES))
            pending.chunks += 1

    def end(self, name: str) -> None:
        """The file `name` is complete."""
        pending = self._pending(name)
        del self.pending[name]
        chunks = pending.chunks + 1 if pending.chunks else 0
        rest = pending.take(pending.held)
        self._member(f"{name}.{pending.chunks:06d}" if chunks else name, rest)
        digest = pending.hash.hexdigest()
        self.members.append(Member(name, pending.size, digest, chunks, CHUNK_BYTES if chunks else 0))
        if not chunks and archiveindex.indexable(name):
            self.indexed.add(name, b"".join(rest))

    def add_file(self, name: str, source: Path, size: int | None = None) -> None:
        """Add the file at `source` as `name`, its first `size` bytes if given."""
        with source.open("rb") as fh:
            left = os.fstat(fh.fileno()).st_size if size is None else size
            while left and (data := fh.read(min(CHUNK, left))):
                self.write(name, data)
                left -= len(data)
        self.end(name)

    def _pending(self, name: str) -> _Pending:
        pending = self.pending.get(name)
        if pending is None:
            if not SAFE_MEMBER.fullmatch(name) or CHUNK_MEMBER.fullmatch(name):
                raise ValueError(f"unsafe archive member name {name!r}")
            if any(m.name == name for m in self.members):
                raise ValueError(f"{name} was already written to the archive")
            pending = self.pending[name] = _Pending()
        return pending

    def _member(self, name: str, pieces: Sequence[bytes | memoryview]) -> None:
        """One tar member of `pieces`, written straight to the compressor (tarfile's stream mode would copy
        it in 10 KiB pieces)."""
        header, padding = tarstream.framing(name, sum(len(piece) for piece in pieces))
        for piece in (header, *pieces, padding):
            self._out().write(piece)
            self.offset += len(piece)

    def commit(self, manifest: Manifest, finalize: Callable[[Manifest], None] | None = None) -> Manifest:
        """Write the manifest last, then put the archive in place (never over a file).

        `finalize` may complete the manifest (timings) just before it is written.
        """
        if self.pending:
            raise ValueError(f"unfinished files in the archive: {', '.join(sorted(self.pending))}")
        faults.inject("archive-before-manifest")
        self._out()  # opened here if no file came before
        manifest.members = self.members
        manifest.checksum = CHECKSUM
        manifest.timings["compress_s"] = round(time.monotonic() - self.started, 4)
        if finalize:
            finalize(manifest)
        body = manifest.to_json()
        self._member(MANIFEST_NAME, [body])
        ending = tarstream.ending(self.offset)
        self.zstd.write(ending)
        self.offset += len(ending)
        self.zstd.close()
        self.raw.write(archiveindex.pack(body, self.indexed.files, self.frame.digest()))
        if self.sealer is not None:
            self.sealer.finish()
        self.file.flush()
        os.fsync(self.file.fileno())
        # link() fails if `path` appeared meanwhile: never replace someone's file.
        os.link(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return manifest


@dataclass(frozen=True)
class _Tee:
    """The archive file, whose every compressed byte also goes to `mirror` as it is written."""

    file: BinaryIO | sealed.Writer | _Tee
    mirror: Callable[[bytes | memoryview], None]

    def write(self, data: bytes | memoryview) -> int:
        self.file.write(data)
        self.mirror(data)
        return len(data)


class Spool:
    """Files written aside while a container is frozen, each as the archive will name it, for a Writer to take
    once it is thawed (`into`): compression then falls outside the freeze. 0600 files in `directory` (a
    private scratch directory): they may hold the container's files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.names: list[str] = []  # in the order they were begun, as the archive will hold them

    def _path(self, name: str) -> Path:
        return self.directory / name.replace("/", "%")

    def write(self, name: str, data: bytes) -> None:
        if name not in self.names:
            self.names.append(name)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._path(name), flags, 0o600)
        try:
            write_all(fd, memoryview(data))
        finally:
            os.close(fd)

    def end(self, name: str) -> None:
        if name not in self.names:  # an empty file
            self.write(name, b"")

    def into(self, writer: Writer) -> None:
        for name in self.names:
            writer.add_file(name, self._path(name))


@dataclass(frozen=True)
class _Under:
    """A Writer's files under a prefix: a streamer.Sink for CRIU's image names."""

    writer: Writer
    prefix: str

    def write(self, name: str, data: bytes) -> None:
        self.writer.write(self.prefix + name, data)

    def end(self, name: str) -> None:
        self.writer.end(self.prefix + name)


def write(
    path: Path,
    manifest: Manifest,
    files: dict[str, Path],
    *,
    level: int = zstdframe.DEFAULT_LEVEL,
    sizes: dict[str, int] | None = None,
) -> Manifest:
    """Write whole `files` (archive name -> file) and the manifest to `path` with a Writer, in one call.

    `sizes` caps members at the length they had at a given moment (a log that kept growing).
    """
    with Writer(path, level=level) as writer:
        for name, source in sorted(files.items()):
            writer.add_file(name, source, (sizes or {}).get(name))
        return writer.commit(manifest)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
