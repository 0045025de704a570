"""Owns the archive file: a zstd-compressed tar of CRIU images plus a manifest with checksums."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from kerrickpt import faults
from kerrickpt.errors import ArchiveCorruptError, ArchiveUnreadableError, UsageError
from kerrickpt.manifest import NAME as MANIFEST_NAME
from kerrickpt.manifest import Manifest, Member

CHUNK = 1 << 20
# Members a stream is cut into: big enough to compress well, small enough to buffer several.
CHUNK_BYTES = 4 << 20
COMPRESSED_CHUNK = 1 << 16
MIN_SLICE = 512
OUTPUT_TARGET = 8 << 20  # bytes of decompressed output per step, at most about
# zstd's own job size at level 3 is 8 MiB: fed as fast as a stream comes, its jobs in flight
# hold some 50 MiB. 2 MiB jobs hold a quarter of that, at the same speed and ratio.
JOB_BYTES = 2 << 20
DEFAULT_LEVEL = 3
# A checkpoint keeps its container down until its archive is complete, and compression sets the pace:
# level 1 compresses heap-like memory ~1.6x faster than 3, for archives ~7% bigger. Incompressible
# data costs little either way: zstd stores blocks it cannot shrink (~5 GB/s a core at level 1).
CHECKPOINT_LEVEL = 1
# Only these names are ever written or extracted: no paths, no links, no surprises.
SAFE_MEMBER = re.compile(r"(images/(?!\.\.?$)[A-Za-z0-9_.-]+|log)")
CHUNK_MEMBER = re.compile(r"(?P<name>.+)\.(?P<index>[0-9]{6})")


@dataclass
class _Pending:
    """A file being written: its bytes not yet in a member, and the hash and size of all of it."""

    buffer: bytearray = field(default_factory=bytearray)
    sha: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    chunks: int = 0


class Writer:
    """An archive being written: files go in whole or as streams, the manifest last (see `commit`).

    The archive appears at `path` only once complete and on disk; until then it lives
    under a hidden temporary name in the same directory, removed if anything fails.
    A stream's size is not known up front, so a file is held back until it ends or
    exceeds CHUNK_BYTES, then written as chunk members: memory stays bounded.
    """

    def __init__(
        self, path: Path, *, level: int = DEFAULT_LEVEL, mirror: Callable[[bytes | memoryview], None] | None = None
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
        self.mirror = mirror

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
            self.raw: BinaryIO | _Tee = os.fdopen(self.fd, "wb", closefd=False)
            if self.mirror:
                self.raw = _Tee(self.raw, self.mirror)
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, threads=-1, job_size=JOB_BYTES, write_checksum=True
            )
            compressor = zstandard.ZstdCompressor(compression_params=params)
            self.zstd = compressor.stream_writer(self.raw, closefd=False)
        return self.zstd

    def under(self, prefix: str) -> _Under:
        """This archive as a Sink whose names go under `prefix` (CRIU names `pages-1.img`, not `images/...`)."""
        return _Under(self, prefix)

    def write(self, name: str, data: bytes) -> None:
        """Append `data` to the file `name`, which may be one of several open at once."""
        pending = self._pending(name)
        pending.buffer += data
        pending.sha.update(data)
        pending.size += len(data)
        while len(pending.buffer) > CHUNK_BYTES:  # more follows: this file is chunked
            faults.inject("archive-chunk")
            with memoryview(pending.buffer) as view:  # no copy of the chunk
                self._member(f"{name}.{pending.chunks:06d}", view[:CHUNK_BYTES])
            del pending.buffer[:CHUNK_BYTES]
            pending.chunks += 1

    def end(self, name: str) -> None:
        """The file `name` is complete."""
        pending = self._pending(name)
        del self.pending[name]
        chunks = pending.chunks + 1 if pending.chunks else 0
        self._member(f"{name}.{pending.chunks:06d}" if chunks else name, pending.buffer)
        sha = pending.sha.hexdigest()
        self.members.append(Member(name, pending.size, sha, chunks, CHUNK_BYTES if chunks else 0))

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

    def _member(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """One tar member, written straight to the compressor (tarfile's stream mode would copy it in 10 KiB pieces)."""
        header = _tarinfo(name, len(data)).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
        padding = bytes(-len(data) % tarfile.BLOCKSIZE)
        for piece in (header, data, padding):
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
        manifest.timings["compress_s"] = round(time.monotonic() - self.started, 4)
        if finalize:
            finalize(manifest)
        body = manifest.to_json()
        self._member(MANIFEST_NAME, body)
        # The end of a tar: two zero blocks, then zeros up to a whole record, as tarfile ends one.
        self.offset += 2 * tarfile.BLOCKSIZE
        self.zstd.write(bytes(2 * tarfile.BLOCKSIZE + -self.offset % tarfile.RECORDSIZE))
        self.zstd.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        # link() fails if `path` appeared meanwhile: never replace someone's file.
        os.link(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return manifest


@dataclass(frozen=True)
class _Tee:
    """The archive file, whose every compressed byte also goes to `mirror` as it is written."""

    file: BinaryIO
    mirror: Callable[[bytes | memoryview], None]

    def write(self, data: bytes | memoryview) -> int:
        self.file.write(data)
        self.mirror(data)
        return len(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


# zstd levels for a migration by the link's speed through ssh (MiB/s, at least): on a link faster
# than compression the fastest level that still squeezes; level 1 compresses heap-like memory at
# about 600 MiB/s a core on the project's machines, level 3 at 375.
LINK_LEVELS = ((1000.0, -3), (100.0, 1))


def level_for_link(mib_s: float) -> int:
    """The zstd level to stream over a link of `mib_s` MiB/s."""
    return next((level for floor, level in LINK_LEVELS if mib_s >= floor), DEFAULT_LEVEL)


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
    level: int = DEFAULT_LEVEL,
    sizes: dict[str, int] | None = None,
) -> Manifest:
    """Write whole `files` (archive name -> file) and the manifest to `path` with a Writer, in one call.

    `sizes` caps members at the length they had at a given moment (a log that kept growing).
    """
    with Writer(path, level=level) as writer:
        for name, source in sorted(files.items()):
            writer.add_file(name, source, (sizes or {}).get(name))
        return writer.commit(manifest)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(time.time())
    return info


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ZstdReader(io.RawIOBase):
    """Decompresses one zstd frame and insists that it ends: a truncated file is an error.

    zstandard's stream_reader bounds its output but accepts a cut-off frame silently, and
    decompressobj checks the frame but returns all the output of its input at once: zeroed
    memory compresses ~26,000:1, so 64 KiB in could be 1.6 GiB out. So the compressed input
    is fed in slices sized from the last ratio seen, keeping each output near OUTPUT_TARGET.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.buffer = b""
        self.offset = 0
        self.pending = b""  # compressed bytes read but not yet fed
        self.slice = MIN_SLICE

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while self.offset >= len(self.buffer):
            if self.dobj.eof:
                if self.pending or self.dobj.unused_data or self.fh.read(1):
                    raise ArchiveCorruptError("the archive has trailing data after its end")
                return 0
            if not self.pending:
                self.pending = self.fh.read(COMPRESSED_CHUNK)
                if not self.pending:
                    raise ArchiveCorruptError("the archive is truncated (the compressed stream ends early)")
            fed, self.pending = self.pending[: self.slice], self.pending[self.slice :]
            self.buffer, self.offset = self.dobj.decompress(fed), 0
            ratio = max(1, len(self.buffer)) / len(fed)
            self.slice = max(MIN_SLICE, min(COMPRESSED_CHUNK, int(OUTPUT_TARGET / ratio)))
        size = min(len(target), len(self.buffer) - self.offset)
        target[:size] = self.buffer[self.offset : self.offset + size]
        self.offset += size
        return size


Source = Path | BinaryIO  # an archive file, or an archive arriving as a stream (a migration)


def label(source: Source) -> str:
    """How messages name an archive."""
    return str(source) if isinstance(source, Path) else "the incoming archive"


def _members(source: Source) -> Iterator[tuple[tarfile.TarInfo, BinaryIO]]:
    """Each member of the archive with a reader for its bytes; corruption becomes ArchiveCorruptError."""
    path = label(source)
    try:
        fh = source.open("rb") if isinstance(source, Path) else source  # closed once read, either way
    except OSError as exc:
        raise ArchiveUnreadableError(f"cannot read {path}: {exc.strerror}") from exc
    stream = io.BufferedReader(_ZstdReader(fh), CHUNK)
    try:
        with fh, tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for info in tar:
                if not info.isreg() or not (SAFE_MEMBER.fullmatch(info.name) or info.name == MANIFEST_NAME):
                    raise ArchiveCorruptError(f"unexpected member {info.name!r} in {path}")
                reader = tar.extractfile(info)
                assert reader is not None  # regular files always have one
                yield info, reader
            # tar stops at its end marker; read on so a cut or damaged zstd frame end is seen.
            while stream.read(CHUNK):
                pass
    except ArchiveCorruptError:
        raise
    except OSError as exc:
        raise ArchiveUnreadableError(f"reading {path} failed: {exc}") from exc
    except (zstandard.ZstdError, tarfile.TarError, EOFError) as exc:
        raise ArchiveCorruptError(f"{path} is corrupt: {exc}") from exc


def _output(dest: Path | None, name: str, *, first: bool) -> BinaryIO:
    """Where a member's bytes go: a new 0600 file under `dest` (appended to by later chunks), or nowhere."""
    if dest is None:
        return open(os.devnull, "wb")
    target = dest / name
    target.parent.mkdir(mode=0o700, exist_ok=True)
    how = os.O_CREAT | os.O_EXCL if first else os.O_APPEND
    out = os.open(target, os.O_WRONLY | how | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(out, "wb")


@dataclass
class _Received:
    """One file as extract has seen it so far: whole, or the chunks up to now."""

    chunked: bool
    sha: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    chunks: int = 0
    chunk_bytes: int = 0

    def member(self, name: str) -> Member:
        return Member(name, self.size, self.sha.hexdigest(), self.chunks, self.chunk_bytes)


def extract(source: Source, dest: Path | None) -> Manifest:
    """Unpack into `dest` (0600 files; None unpacks nothing) and verify every file against the manifest.

    Raises ArchiveCorruptError for a flipped byte, a truncated archive, or a file or chunk
    that is missing, extra, repeated, out of order or unexpected; `dest` then holds nothing worth using.
    """
    path = label(source)
    received: dict[str, _Received] = {}
    manifest: Manifest | None = None
    with contextlib.closing(_members(source)) as members:
        for info, reader in members:
            if manifest is not None:
                raise ArchiveCorruptError(f"{path} has data after its manifest")
            if info.name == MANIFEST_NAME:
                manifest = Manifest.from_json(reader.read())
                continue
            chunk = CHUNK_MEMBER.fullmatch(info.name)
            name, index = (chunk["name"], int(chunk["index"])) if chunk else (info.name, 0)
            if chunk and (not SAFE_MEMBER.fullmatch(name) or CHUNK_MEMBER.fullmatch(name)):
                raise ArchiveCorruptError(f"unexpected member {info.name!r} in {path}")
            first = name not in received
            got = received.setdefault(name, _Received(chunked=bool(chunk)))
            if not first and not (chunk and got.chunked):
                raise ArchiveCorruptError(f"{path} holds {name} twice")
            if chunk and index != got.chunks:
                raise ArchiveCorruptError(
                    f"chunk {index} of {name} in {path} is out of order (chunk {got.chunks} was next): "
                    "a chunk is missing, repeated or misplaced"
                )
            with _output(dest, name, first=first) as fh:
                while data := reader.read(CHUNK):
                    got.sha.update(data)
                    fh.write(data)
            got.size += info.size
            if chunk:
                got.chunk_bytes = got.chunk_bytes or info.size
                got.chunks += 1
    if manifest is None:
        raise ArchiveCorruptError(f"{path} has no manifest: it is incomplete")
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
    return manifest


def verify(path: Path) -> Manifest:
    """Check every member against the manifest, unpacking nothing; raises ArchiveCorruptError."""
    return extract(path, None)


def read_manifest(path: Path) -> Manifest:
    """The manifest, without unpacking anything."""
    with contextlib.closing(_members(path)) as members:
        for info, reader in members:
            if info.name == MANIFEST_NAME:
                return Manifest.from_json(reader.read())
    raise ArchiveCorruptError(f"{path} has no manifest: it is incomplete")
