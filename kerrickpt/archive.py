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
from pathlib import Path
from typing import BinaryIO

import zstandard

from kerrickpt import faults
from kerrickpt.errors import ArchiveCorruptError, UsageError
from kerrickpt.manifest import NAME as MANIFEST_NAME
from kerrickpt.manifest import Manifest, Member

CHUNK = 1 << 20
COMPRESSED_CHUNK = 1 << 16
DEFAULT_LEVEL = 3
# Only these names are ever written or extracted: no paths, no links, no surprises.
SAFE_MEMBER = re.compile(r"(images/(?!\.\.?$)[A-Za-z0-9_.-]+|log)")


class _HashingReader(io.RawIOBase):
    """Feeds a file to tarfile while hashing exactly the bytes it takes."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.sha.update(data)
        return data


def write(
    path: Path,
    manifest: Manifest,
    files: dict[str, Path],
    *,
    level: int = DEFAULT_LEVEL,
    finalize: Callable[[Manifest], None] | None = None,
    sizes: dict[str, int] | None = None,
) -> Manifest:
    """Write `files` (archive name -> file) and the manifest to `path`, atomically and never over a file.

    `finalize` may complete the manifest (timings) just before it is written, last in the tar.
    `sizes` caps members at the length they had at a given moment (a log that kept growing).

    The archive appears at `path` only once complete and on disk; until then it lives
    under a hidden temporary name in the same directory, removed if anything fails.
    """
    if path.exists():
        raise UsageError(f"{path} exists already; remove it or choose another name")
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        started = time.monotonic()
        members: list[Member] = []
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=-1)
        with os.fdopen(fd, "wb", closefd=False) as raw:
            with (
                compressor.stream_writer(raw, closefd=False) as zstd_out,
                tarfile.open(fileobj=zstd_out, mode="w|", format=tarfile.PAX_FORMAT) as tar,  # type: ignore[call-overload]
            ):
                for name, source in sorted(files.items()):
                    if not SAFE_MEMBER.fullmatch(name):
                        raise ValueError(f"unsafe archive member name {name!r}")
                    with source.open("rb") as fh:
                        info = _tarinfo(name, (sizes or {}).get(name, os.fstat(fh.fileno()).st_size))
                        reader = _HashingReader(fh)
                        tar.addfile(info, reader)
                    members.append(Member(name=name, size=info.size, sha256=reader.sha.hexdigest()))
                faults.inject("archive-before-manifest")
                manifest.members = members
                manifest.timings["compress_s"] = round(time.monotonic() - started, 4)
                if finalize:
                    finalize(manifest)
                body = manifest.to_json()
                tar.addfile(_tarinfo(MANIFEST_NAME, len(body)), io.BytesIO(body))
            raw.flush()
            os.fsync(fd)
        # link() fails if `path` appeared meanwhile: never replace someone's file.
        os.link(tmp, path)
        fsync_dir(path.parent)
        return manifest
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)


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
    """Decompresses one zstd frame and insists that it ends: a truncated file is an error."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self.buffer:
            if self.dobj.eof:
                if self.dobj.unused_data or self.fh.read(1):
                    raise ArchiveCorruptError("the archive has trailing data after its end")
                return 0
            chunk = self.fh.read(COMPRESSED_CHUNK)
            if not chunk:
                raise ArchiveCorruptError("the archive is truncated (the compressed stream ends early)")
            self.buffer = self.dobj.decompress(chunk)
        size = min(len(target), len(self.buffer))
        target[:size] = self.buffer[:size]
        self.buffer = self.buffer[size:]
        return size


def _members(path: Path) -> Iterator[tuple[tarfile.TarInfo, BinaryIO]]:
    """Each member of the archive with a reader for its bytes; corruption becomes ArchiveCorruptError."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ArchiveCorruptError(f"cannot read {path}: {exc.strerror}") from exc
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
    except (zstandard.ZstdError, tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveCorruptError(f"{path} is corrupt: {exc}") from exc


def _output(dest: Path | None, name: str) -> BinaryIO:
    """Where a member's bytes go: a new 0600 file under `dest`, or nowhere when only verifying."""
    if dest is None:
        return open(os.devnull, "wb")
    target = dest / name
    target.parent.mkdir(mode=0o700, exist_ok=True)
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(out, "wb")


def extract(path: Path, dest: Path | None) -> Manifest:
    """Unpack into `dest` (0600 files; None unpacks nothing) and verify every member against the manifest.

    Raises ArchiveCorruptError for a flipped byte, a truncated archive, or a member
    that is missing, extra or unexpected; `dest` then holds nothing worth using.
    """
    seen: dict[str, Member] = {}
    manifest: Manifest | None = None
    with contextlib.closing(_members(path)) as members:
        for info, reader in members:
            if manifest is not None:
                raise ArchiveCorruptError(f"{path} has data after its manifest")
            if info.name == MANIFEST_NAME:
                manifest = Manifest.from_json(reader.read())
                continue
            if info.name in seen:
                raise ArchiveCorruptError(f"{path} holds {info.name} twice")
            sha = hashlib.sha256()
            with _output(dest, info.name) as fh:
                while chunk := reader.read(CHUNK):
                    sha.update(chunk)
                    fh.write(chunk)
            seen[info.name] = Member(name=info.name, size=info.size, sha256=sha.hexdigest())
    if manifest is None:
        raise ArchiveCorruptError(f"{path} has no manifest: it is incomplete")
    expected = {m.name: m for m in manifest.members}
    for name in sorted(expected.keys() | seen.keys()):
        if name not in seen:
            raise ArchiveCorruptError(f"{path} lacks {name}, which its manifest lists")
        if name not in expected:
            raise ArchiveCorruptError(f"{path} holds {name}, which its manifest does not list")
        if seen[name] != expected[name]:
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
