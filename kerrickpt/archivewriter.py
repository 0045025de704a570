"""Owns writing a checkpoint: what any target does with its files, and the archive, put in place once complete."""

from __future__ import annotations

import abc
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

from kerrickpt import archiveindex, faults, pagehash, progress, sealed, tarstream, zstdframe
from kerrickpt.archive import write_all
from kerrickpt.errors import KerrickptError, UsageError
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
class _Sum:
    """A file as written so far: its size and checksum."""

    hash: Any = field(default_factory=CHECKSUMS[CHECKSUM])
    size: int = 0


class Target(abc.ABC):
    """What a checkpoint writes into: an archive (Writer), or a deduplicating store (recipewriter.Writer). Files go in
    whole or as streams, several open at once, each under a name checked and written once, its size and checksum
    taken as it comes; the manifest last (`commit`), listing them in the order they ended.

    Each kind keeps the bytes its way (`_put`, `_close`) and puts the snapshot in place its way (`commit`).
    """

    # Failures of where it writes that a checkpoint passes on as they are, not as a failed dump.
    errors: tuple[type[KerrickptError], ...] = ()
    path: Path | None  # the snapshot's file once committed (an archive's: known from the start)

    def __init__(self, level: int) -> None:
        self.level = level  # zstd's, for what it compresses
        self.open: dict[str, _Sum] = {}
        self.members: list[Member] = []
        # The names of `members`, kept beside them (each added to both): asked for each new file, a list's search
        # made a dump of many small images (a container's TCP connections, one each) quadratic.
        self.ended: set[str] = set()
        self.started = 0.0  # when its output was opened: compress_s is from then to the manifest

    def __enter__(self) -> Self:
        return self

    @abc.abstractmethod
    def __exit__(self, *exc: object) -> None:
        """Whatever was not committed is removed."""

    @property
    @abc.abstractmethod
    def linking(self) -> tuple[Path, Path] | None:
        """(the partial file, the path it is linked to once complete), for the guardian to tell a snapshot in place
        from one a death cut short; None if that path is not known up front."""

    @abc.abstractmethod
    def ready(self) -> None:
        """Called before the freeze: what the target prepares meanwhile (see recipewriter.Writer.prepare) is done,
        so that none of it runs while the container is frozen."""

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append `data` to the file `name`, which may be one of several open at once."""
        written = self._file(name)
        written.hash.update(data)
        written.size += len(data)
        # Kept as it came, unless the caller may change it afterwards: each kind holds some bytes before it cuts them.
        self._put(name, data if isinstance(data, bytes) else bytes(data))

    def end(self, name: str) -> None:
        """The file `name` is complete."""
        written = self._file(name)
        del self.open[name]
        # Cut into chunk members once bigger than one (see Writer): a Member says so whoever keeps the bytes.
        chunks = -(-written.size // CHUNK_BYTES) if written.size > CHUNK_BYTES else 0
        member = Member(name, written.size, written.hash.hexdigest(), chunks, CHUNK_BYTES if chunks else 0)
        self._close(member)
        self.members.append(member)
        self.ended.add(name)

    def add_file(self, name: str, source: Path, size: int | None = None) -> None:
        """Add the file at `source` as `name`, its first `size` bytes if given."""
        with source.open("rb") as fh:
            left = os.fstat(fh.fileno()).st_size if size is None else size
            while left and (data := fh.read(min(CHUNK, left))):
                self.write(name, data)
                left -= len(data)
        self.end(name)

    def commit_files(self, manifest: Manifest, files: dict[str, Path], sizes: dict[str, int] | None = None) -> Manifest:
        """Add whole `files` (archive name -> file), in the order of their names, and commit with `manifest`.

        `sizes` caps members at the length they had at a given moment (a log that kept growing).
        """
        for name, source in sorted(files.items()):
            self.add_file(name, source, (sizes or {}).get(name))
        return self.commit(manifest)

    def hashing_ahead(self, path: Path, files: dict[str, pagehash.Pieces]) -> contextlib.AbstractContextManager[None]:
        """A context in which `files` (each: its pieces of the file at `path`) are written: a target that names
        chunks by their content has them hashed meanwhile on other cores (see recipewriter); an archive does not."""
        return contextlib.nullcontext()

    def under(self, prefix: str) -> _Under:
        """This target as a Sink whose names go under `prefix` (CRIU names `pages-1.img`, not `images/...`)."""
        return _Under(self, prefix)

    def _file(self, name: str) -> _Sum:
        written = self.open.get(name)
        if written is None:
            if not SAFE_MEMBER.fullmatch(name) or CHUNK_MEMBER.fullmatch(name):
                raise ValueError(f"unsafe archive member name {name!r}")
            if name in self.ended:
                raise ValueError(f"{name} was already written to the archive")
            written = self.open[name] = _Sum()
        return written

    @abc.abstractmethod
    def _put(self, name: str, data: bytes) -> None:
        """Keep `data`, the next bytes of the file `name` (bytes: `write` copied any other buffer)."""

    @abc.abstractmethod
    def _close(self, member: Member) -> None:
        """The file `member` names is complete: keep the rest of its bytes."""

    def _complete(self, manifest: Manifest, finalize: Callable[[Manifest], None] | None) -> None:
        """The manifest as `commit` writes it: its members, checksum and compress_s, then `finalize`'s part."""
        if self.open:
            raise ValueError(f"unfinished files in the archive: {', '.join(sorted(self.open))}")
        manifest.members = self.members
        manifest.checksum = CHECKSUM
        manifest.timings["compress_s"] = round(time.monotonic() - self.started, 4)
        if finalize:
            finalize(manifest)

    @abc.abstractmethod
    def commit(self, manifest: Manifest, finalize: Callable[[Manifest], None] | None = None) -> Manifest:
        """Write the manifest last, then put the snapshot in place, never over a file.

        `finalize` may complete the manifest (timings) just before it is written.
        """


@dataclass
class Held:
    """A file's bytes not yet handed on (into a member of an archive, or cut into a store's chunks).

    The bytes wait as the immutable pieces they came in, never in a buffer that grows and
    shrinks: whoever a member's bytes reach may keep them (a broken link's traceback keeps
    the frames that handed them over), and a bytearray with a view still out cannot be resized.
    """

    pieces: deque[bytes | memoryview] = field(default_factory=deque)  # memoryviews of bytes only
    held: int = 0  # the bytes in `pieces`

    def add(self, data: bytes) -> None:
        self.pieces.append(data)
        self.held += len(data)

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


@dataclass
class _Pending(Held):
    """A file's bytes not yet in a member of the archive, and the members it has had."""

    chunks: int = 0


class Writer(Target):
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
        super().__init__(level)
        self.path = path
        self.tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{time.monotonic_ns()}"
        self.fd: int | None = None
        self.offset = 0  # bytes of tar written
        self.pending: dict[str, _Pending] = {}
        self.indexed = archiveindex.Copies()
        self.frame = archiveindex.DIGEST()  # of the zstd frame's bytes, as they are written
        self.mirror = mirror
        self.key = key
        self.sealer: sealed.Writer | None = None
        self.progress = progress.current()  # here: bytes may come from the streamer's thread

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.tmp.unlink(missing_ok=True)

    @property
    def linking(self) -> tuple[Path, Path]:
        return self.tmp, self.path

    def ready(self) -> None:
        """An archive prepares nothing before the freeze."""

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

    def _put(self, name: str, data: bytes) -> None:
        pending = self.pending.setdefault(name, _Pending())
        pending.add(data)
        while pending.held > CHUNK_BYTES:  # more follows: this file is chunked
            faults.inject("archive-chunk")
            self._member(f"{name}.{pending.chunks:06d}", pending.take(CHUNK_BYTES))
            pending.chunks += 1

    def _close(self, member: Member) -> None:
        pending = self.pending.pop(member.name, None) or _Pending()  # an empty file had no write
        rest = pending.take(pending.held)
        self._member(f"{member.name}.{pending.chunks:06d}" if member.chunks else member.name, rest)
        if not member.chunks and archiveindex.indexable(member.name):
            self.indexed.add(member.name, b"".join(rest))

    def _member(self, name: str, pieces: Sequence[bytes | memoryview]) -> None:
        """One tar member of `pieces`, written straight to the compressor (tarfile's stream mode would copy
        it in 10 KiB pieces)."""
        header, padding = tarstream.framing(name, sum(len(piece) for piece in pieces))
        for piece in (header, *pieces, padding):
            self._out().write(piece)
            self.offset += len(piece)

    def commit(self, manifest: Manifest, finalize: Callable[[Manifest], None] | None = None) -> Manifest:
        faults.inject("archive-before-manifest")
        self._out()  # opened here if no file came before
        self._complete(manifest, finalize)
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

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
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

    def into(self, writer: Target) -> None:
        for name in self.names:
            writer.add_file(name, self._path(name))


@dataclass(frozen=True)
class _Under:
    """A Target's files under a prefix: a streamer.Sink for CRIU's image names."""

    writer: Target
    prefix: str

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
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
    """Write whole `files` and the manifest to `path` with a Writer, in one call (see Target.commit_files)."""
    with Writer(path, level=level) as writer:
        return writer.commit_files(manifest, files, sizes)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
