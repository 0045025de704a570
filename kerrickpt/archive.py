"""Owns the archive file: a zstd-compressed tar of CRIU images plus a manifest with checksums."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import struct
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from kerrickpt import faults, progress
from kerrickpt.errors import ArchiveCorruptError, ArchiveUnreadableError, UsageError
from kerrickpt.manifest import CHECKSUMS, FORMAT, VERSION, Manifest, Member
from kerrickpt.manifest import NAME as MANIFEST_NAME

CHUNK = 1 << 20
# Members a stream is cut into: big enough to compress well, small enough to buffer several.
CHUNK_BYTES = 4 << 20
COMPRESSED_CHUNK = 1 << 20  # read at once
BLOCKS_PER_STEP = 32  # zstd blocks decompressed at once: 4 MiB at most
ZSTD_RLE_BLOCK = 1  # a block type whose content is one byte, repeated
AHEAD = 2  # decompressed steps waiting to be hashed and written
SMALL_MEMBER = 16 << 20  # the most a member read whole (header, pax header, manifest) may claim
# zstd's own job size at level 3 is 8 MiB: fed as fast as a stream comes, its jobs in flight
# hold some 50 MiB. 2 MiB jobs hold a quarter of that, at the same speed and ratio.
JOB_BYTES = 2 << 20
DEFAULT_LEVEL = 3
# A checkpoint keeps its container down until its archive is complete, and compression sets the pace
# (two cores shared with CRIU). `zstd -T2` on 256 MiB of the benchmark's heap-like memory: 0.28 s at
# level -2, 0.40 s at 1, 0.45 s at 3; the archive ~16% bigger than level 3's, within the 1.2x issue 6
# allows. Incompressible data costs little at any level: zstd stores blocks it cannot shrink.
CHECKPOINT_LEVEL = -2
# Only these names are ever written or extracted: no paths, no links, no surprises.
SAFE_MEMBER = re.compile(r"(images/(?!\.\.?$)[A-Za-z0-9_.-]+|log|layer\.tar|layer-removed\.json)")
CHUNK_MEMBER = re.compile(r"(?P<name>.+)\.(?P<index>[0-9]{6})")
# The first member since version 3: how the members are checksummed, known before the first one is
# read (the manifest, which also says it, comes last). Without it, a member is checked with sha256.
HEADER = "format"
# XXH3-128 hashes at ~30 GB/s a core against sha256's ~2: on two cores sha256 cost a checkpoint or a
# restore half a CPU-second per GiB. The checksums guard against accidents, not tampering (README).
CHECKSUM = "xxh3_128"
# Since version 4 the archive ends with an index after its zstd frame: a copy of the manifest and of
# the small images, in a zstd skippable frame (which `zstd -d` passes over), found from the file's
# end. CRIU's restore asks for inventory.img first, which its dump writes last: with the index a
# restore can serve CRIU from the start and stream the memory (pages-*.img) as the frame is read.
INDEX_MAGIC = 0x184D2A5B  # one of the 16 magic numbers zstd reserves for skippable frames
_INDEX_HEAD = struct.Struct("<II")  # the skippable frame's magic and size
_INDEX_FOOT = struct.Struct("<Q8s")  # the index's whole length and a tag, the file's last bytes
INDEX_TAG = b"kckptidx"
INDEX_BYTES = 32 << 20  # the most the index's images may hold: bigger ones come from the frame
INDEX_FRAMING = 2048  # what the index's tar adds to an image at the most: its header, a pax header, padding
MAX_INDEX = INDEX_BYTES + 2 * SMALL_MEMBER  # the index's images with their framing, and its manifest


def indexable(name: str) -> bool:
    """Whether a file may go into the index: an image, but never process memory, which is streamed."""
    return name.startswith("images/") and not name.startswith("images/pages-")


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
        self.indexed: dict[str, bytes] = {}  # copies of the small images, for the index
        self.indexed_bytes = 0
        self.mirror = mirror
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
            self.raw: BinaryIO | _Tee = os.fdopen(self.fd, "wb", closefd=False)
            if self.mirror:
                self.raw = _Tee(self.raw, self.mirror)
            if self.progress is not progress.SILENT:
                self.raw = _Tee(self.raw, lambda data: self.progress.advance(len(data)))
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, threads=-1, job_size=JOB_BYTES, write_checksum=True
            )
            compressor = zstandard.ZstdCompressor(compression_params=params)
            self.zstd = compressor.stream_writer(self.raw, closefd=False)
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
        if not chunks and indexable(name):
            self.indexed[name] = b"".join(rest)
            self.indexed_bytes += pending.size + INDEX_FRAMING
            # Over budget the biggest go: CRIU's first request, inventory.img, is small and written last.
            while self.indexed_bytes > INDEX_BYTES:
                biggest = self.indexed.pop(max(self.indexed, key=lambda n: len(self.indexed[n])))
                self.indexed_bytes -= len(biggest) + INDEX_FRAMING

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
        header, padding = _framing(name, sum(len(piece) for piece in pieces))
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
        # The end of a tar: two zero blocks, then zeros up to a whole record, as tarfile ends one.
        self.offset += 2 * tarfile.BLOCKSIZE
        self.zstd.write(bytes(2 * tarfile.BLOCKSIZE + -self.offset % tarfile.RECORDSIZE))
        self.zstd.close()
        self.raw.write(_index(body, self.indexed))
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


# zstd levels for a migration by the link's speed through ssh (MiB/s, at least): the level whose
# output the link carries as fast as two cores make it. On heap-like memory here, level -2
# compresses 1.4x as fast as level 1 (~900 MiB/s on two cores) for ~10% more bytes (~270 MiB/s
# of output); level 1 wins only where the link takes less than -2 squeezes into it (~190 MiB/s).
# Between the local test nodes (250-460 MiB/s) -2 cut the median downtime at 256 MiB and
# 1 GiB heap from 1.11 to 0.91 s and from 4.73 to 4.36 s, and tied on half-random memory.
LINK_LEVELS = ((1000.0, -3), (200.0, -2), (100.0, 1))


def level_for_link(mib_s: float) -> int:
    """The zstd level to stream over a link of `mib_s` MiB/s."""
    return next((level for floor, level in LINK_LEVELS if mib_s >= floor), DEFAULT_LEVEL)


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


def _framing(name: str, size: int) -> tuple[bytes, bytes]:
    """A tar member's header and the padding after its `size` bytes."""
    header = _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    return header, bytes(-size % tarfile.BLOCKSIZE)


def _index(manifest: bytes, files: dict[str, bytes]) -> bytes:
    """The index frame: a zstd-compressed tar of the manifest and `files`, skippable, findable from the end."""
    tar = bytearray()
    for name, data in [(MANIFEST_NAME, manifest), *files.items()]:
        header, padding = _framing(name, len(data))
        tar += header + data + padding
    body = zstandard.ZstdCompressor(level=DEFAULT_LEVEL, write_checksum=True).compress(tar + bytes(1024))
    size = len(body) + _INDEX_FOOT.size
    return _INDEX_HEAD.pack(INDEX_MAGIC, size) + body + _INDEX_FOOT.pack(_INDEX_HEAD.size + size, INDEX_TAG)


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


def _decompressed(fh: BinaryIO, label: str, after: list[bytes] | None = None) -> Iterator[bytes]:
    """The bytes of one zstd frame, BLOCKS_PER_STEP blocks at a time; a frame that does not end is an error.

    What follows the frame may only be an index (see INDEX_MAGIC), whose bytes go to `after`.

    zstandard's stream_reader bounds its output but accepts a cut-off frame silently, and
    decompressobj checks the frame but returns all the output of its input at once: zeroed
    memory compresses ~30,000:1, so 64 KiB in could be 2 GiB out. So decompressobj is fed
    whole zstd blocks, found from their headers, BLOCKS_PER_STEP at a time: a block holds
    at most zstandard.BLOCKSIZE_MAX bytes however well it compressed. Errors come out as
    the archive errors they mean, whichever thread runs this.
    """
    dobj = zstandard.ZstdDecompressor().decompressobj()
    data = bytearray()  # compressed bytes read, not yet fed

    def fill(size: int) -> None:
        while len(data) < size:
            if not (more := fh.read(COMPRESSED_CHUNK)):
                raise ArchiveCorruptError("the archive is truncated (the compressed stream ends early)")
            data.extend(more)

    def feed(end: int) -> bytes:
        with memoryview(data) as view, view[:end] as fed:
            block = dobj.decompress(fed)
        del data[:end]
        return block

    try:
        start = len(zstandard.FRAME_HEADER) + 1  # the magic number and the byte that tells the header's size
        fill(start)
        if not data.startswith(zstandard.FRAME_HEADER):
            raise ArchiveCorruptError(f"{label} is not a kerrickpt archive (it is not zstd-compressed)")
        end = zstandard.frame_header_size(bytes(data[:start]))
        last = False
        while not last:
            for _ in range(BLOCKS_PER_STEP):
                fill(end + 3)
                header = int.from_bytes(data[end : end + 3], "little")
                kind, size, last = header >> 1 & 3, header >> 3, bool(header & 1)
                if size > zstandard.BLOCKSIZE_MAX:
                    raise ArchiveCorruptError(f"{label} is corrupt: a zstd block claims {size} bytes")
                end += 3 + (1 if kind == ZSTD_RLE_BLOCK else size)
                if last:
                    break
            fill(end)
            if block := feed(len(data) if last else end):  # after the last block: its checksum
                yield block
            end = 0
        while not dobj.eof:
            fill(1)
            feed(len(data))
        rest = dobj.unused_data + fh.read(MAX_INDEX)
        if fh.read(1) or (rest and after is None):
            raise ArchiveCorruptError("the archive has trailing data after its end")
        if rest and after is not None:
            _index_body(rest, label)  # its framing: a cut-off index is a truncated archive
            after.append(rest)
    except OSError as exc:
        raise ArchiveUnreadableError(f"reading {label} failed: {exc}") from exc
    except zstandard.ZstdError as exc:
        raise ArchiveCorruptError(f"{label} is corrupt: {exc}") from exc


class _Ahead:
    """Runs an iterator in a worker thread, at most AHEAD items ahead of the one consuming them.

    zstd, like xxhash and os.write, lets go of the GIL on big buffers, so the next block
    decompresses while this one is hashed and written. Whatever the worker raises is raised
    to the consumer in its place; leaving the block stops the worker and waits for it.
    """

    def __init__(self, items: Iterator[bytes]) -> None:
        self.items = items
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(AHEAD)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kerrickpt-unzstd", daemon=True)

    def __enter__(self) -> Iterator[bytes]:
        self.thread.start()
        return self._consume()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        # The worker puts at most one more item once it can see `stop`: this makes room for it.
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join()

    def _run(self) -> None:
        try:
            for item in self.items:
                self.queue.put(item)
                if self.stop.is_set():
                    return
            self.queue.put(None)
        except BaseException as exc:  # raised again by the consumer, in its own thread
            self.queue.put(exc)

    def _consume(self) -> Iterator[bytes]:
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


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


class _Tar:
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


def _allowed(name: str) -> bool:
    """A member kerrickpt writes: a safe file name, a chunk of one (a log grows past a chunk too), or its own."""
    chunk = CHUNK_MEMBER.fullmatch(name)
    return bool(SAFE_MEMBER.fullmatch(chunk["name"] if chunk else name)) or name in (HEADER, MANIFEST_NAME)


Source = Path | BinaryIO  # an archive file, or an archive arriving as a stream (a migration)


def label(source: Source) -> str:
    """How messages name an archive."""
    return str(source) if isinstance(source, Path) else "the incoming archive"


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise ArchiveUnreadableError(f"cannot read {path}: {exc.strerror}") from exc


def _reported(fh: BinaryIO, path: Path) -> BinaryIO:
    """The archive file, its reads reported as a phase of the Progress in effect (see progress)."""
    tracker = progress.current()
    tracker.phase(f"reading {path.name}", os.fstat(fh.fileno()).st_size)
    return cast(BinaryIO, progress.Counted(fh, tracker))


def _members(source: Source, after: list[bytes] | None = None) -> Iterator[tuple[str, int, Iterator[memoryview]]]:
    """Each member of the archive (name, size, bytes); corruption becomes ArchiveCorruptError.

    The index after the frame, if any, goes to `after` once the last member was read.
    """
    path = label(source)
    fh = _open(source) if isinstance(source, Path) else source  # closed once read, either way
    if isinstance(source, Path):
        fh = _reported(fh, source)
    with fh, _Ahead(_decompressed(fh, path, after)) as blocks:
        for info, data in _Tar(blocks, path).members():
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or not _allowed(info.name):
                raise ArchiveCorruptError(f"unexpected member {info.name!r} in {path}")
            if info.name in (HEADER, MANIFEST_NAME) and info.size > SMALL_MEMBER:
                raise ArchiveCorruptError(f"{path} is corrupt: its {info.name} claims {info.size} bytes")
            yield info.name, info.size, data
        # tar stops at its end marker; read on so a cut or damaged zstd frame end is seen.
        for _ in blocks:
            pass


@contextlib.contextmanager
def _output(dest: Path | None, name: str, *, first: bool) -> Iterator[int | None]:
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


class MemberReader(io.RawIOBase):
    """One file of an archive, read as a file from the archive's start: a member and its chunks, which follow
    one another. At its end, ArchiveCorruptError if it is not what the manifest says (`expected`). Only as
    much of the archive is read as it takes to reach the file's end."""

    def __init__(self, path: Path, expected: Member, checksum: str) -> None:
        super().__init__()
        self.expected = expected
        self.hash = CHECKSUMS[checksum]()
        self.size = 0
        self.members = _members(path)
        self.pieces = self._pieces()
        self.view = memoryview(b"")

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

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.view:
            self.view = next(self.pieces, memoryview(b""))
        taken = min(len(buffer), len(self.view))
        buffer[:taken] = self.view[:taken]
        self.view = self.view[taken:]
        return taken

    def finish(self) -> None:
        """Read what is left of the file (a tar's padding, say) and check it whole."""
        self.view = memoryview(b"")
        for _ in self.pieces:
            pass

    def close(self) -> None:
        self.members.close()  # type: ignore[attr-defined]
        super().close()


def extract(source: Source, dest: Path | None, into: Callable[[str, memoryview], None] | None = None) -> Manifest:
    """Unpack into `dest` (0600 files; None unpacks nothing) and verify every file against the manifest.

    With `into`, each file's bytes go there instead, piece by piece as they are read and
    hashed, under the file's name: a file is whole once it has had its manifest size.
    Raises ArchiveCorruptError for a flipped byte, a truncated archive, or a file or chunk
    that is missing, extra, repeated, out of order or unexpected; `dest` then holds nothing worth using.
    """
    path = label(source)
    received: dict[str, _Received] = {}
    body: bytes | None = None
    version, checksum = 0, "sha256"  # unless the archive starts with its HEADER
    after: list[bytes] = []
    with contextlib.closing(_members(source, after)) as members:
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
            with _output(dest, name, first=first) as fd:
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
        index = _read_index(after[0], path)
        if index.body != body:
            raise ArchiveCorruptError(f"the index of {path} does not match its manifest")
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


@dataclass(frozen=True)
class Index:
    """What a version 4 archive ends with: its manifest and its small images, each checked against the manifest."""

    manifest: Manifest
    body: bytes  # the manifest as written, to compare with the one inside the frame
    files: dict[str, bytes]


def _index_body(rest: bytes, path: str) -> bytes:
    """The compressed tar inside an index frame (`rest`: everything after the archive's zstd frame)."""
    if len(rest) < _INDEX_HEAD.size or _INDEX_HEAD.unpack_from(rest)[0] != INDEX_MAGIC:
        raise ArchiveCorruptError(f"{path} has trailing data after its end")
    size = _INDEX_HEAD.unpack_from(rest)[1]
    if len(rest) < _INDEX_HEAD.size + size:
        raise ArchiveCorruptError(f"{path} is truncated (its index ends early)")
    if len(rest) > _INDEX_HEAD.size + size or size < _INDEX_FOOT.size:
        raise ArchiveCorruptError(f"{path} has trailing data after its end")
    if _INDEX_FOOT.unpack_from(rest, len(rest) - _INDEX_FOOT.size) != (len(rest), INDEX_TAG):
        raise ArchiveCorruptError(f"{path} has a damaged index")
    return rest[_INDEX_HEAD.size : -_INDEX_FOOT.size]


def _read_index(rest: bytes, path: str) -> Index:
    """The index in `rest`, every image in it checked against its manifest's digest."""
    compressed = _index_body(rest, path)
    try:
        if not 0 <= zstandard.frame_content_size(compressed) <= MAX_INDEX:  # -1: not said; zeros compress 30,000:1
            raise zstandard.ZstdError("its size is not given or too big")
        tar = zstandard.ZstdDecompressor().decompress(compressed, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ArchiveCorruptError(f"{path} has a damaged index: {exc}") from exc
    body: bytes | None = None
    files: dict[str, bytes] = {}
    for info, data in _Tar(iter([tar]), path).members():
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
    return Index(manifest, body, files)


def read_index(path: Path) -> Index | None:
    """The index a version 4 archive ends with, read from the end (nothing else is read); None without one."""
    fh = _open(path)
    try:
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size < _INDEX_HEAD.size + _INDEX_FOOT.size:
                return None
            fh.seek(size - _INDEX_FOOT.size)
            length, tag = _INDEX_FOOT.unpack(fh.read(_INDEX_FOOT.size))
            if tag != INDEX_TAG:
                return None
            if not _INDEX_HEAD.size + _INDEX_FOOT.size <= length <= min(size, MAX_INDEX):
                raise ArchiveCorruptError(f"{path} has a damaged index")
            fh.seek(size - length)
            rest = fh.read(length)
    except OSError as exc:
        raise ArchiveUnreadableError(f"reading {path} failed: {exc.strerror}") from exc
    return _read_index(rest, str(path))


def verify(path: Path) -> Manifest:
    """Check every member against the manifest, unpacking nothing; raises ArchiveCorruptError."""
    return extract(path, None)


def read_manifest(path: Path) -> Manifest:
    """The manifest, without unpacking anything: from the index, or else read through the whole archive."""
    index = read_index(path)
    if index is not None:
        return index.manifest
    with contextlib.closing(_members(path, [])) as members:
        for member, _, data in members:
            if member == MANIFEST_NAME:
                return Manifest.from_json(b"".join(data))
    raise ArchiveCorruptError(f"{path} has no manifest: it is incomplete")
