"""Owns the zstd frame an archive's tar is compressed in: its levels, its writer, and reading it block by block."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import zstandard

from kerrickpt.errors import ArchiveCorruptError, ArchiveUnreadableError

COMPRESSED_CHUNK = 1 << 20  # read at once
BLOCKS_PER_STEP = 32  # zstd blocks decompressed at once: 4 MiB at most
ZSTD_RLE_BLOCK = 1  # a block type whose content is one byte, repeated
ZSTD_CHECKSUM_FLAG = 0x04  # in the frame header's descriptor byte: the frame ends with a 4-byte checksum
ZSTD_CHECKSUM_BYTES = 4
# zstd's own job size at level 3 is 8 MiB: fed as fast as a stream comes, its jobs in flight
# hold some 50 MiB. 2 MiB jobs hold a quarter of that, at the same speed and ratio.
JOB_BYTES = 2 << 20
DEFAULT_LEVEL = 3
# A checkpoint keeps its container down until its archive is complete, and compression sets the pace
# (two cores shared with CRIU). `zstd -T2` on 256 MiB of the benchmark's heap-like memory: 0.28 s at
# level -2, 0.40 s at 1, 0.45 s at 3; the archive ~16% bigger than level 3's, within the 1.2x issue 6
# allows. Incompressible data costs little at any level: zstd stores blocks it cannot shrink.
CHECKPOINT_LEVEL = -2
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


def compressor(raw: Any, level: int) -> zstandard.ZstdCompressionWriter:
    """A zstd frame written to `raw` at `level`, checksummed, compressed on every core in JOB_BYTES jobs."""
    params = zstandard.ZstdCompressionParameters.from_level(level, threads=-1, job_size=JOB_BYTES, write_checksum=True)
    return zstandard.ZstdCompressor(compression_params=params).stream_writer(raw, closefd=False)


def blocks(
    fh: BinaryIO, label: str, after: list[bytes] | None = None, most_after: int = 0, digest: Any = None
) -> Iterator[bytes]:
    """The bytes of one zstd frame, BLOCKS_PER_STEP blocks at a time; a frame that does not end is an error.

    What follows the frame (an archive's index), `most_after` bytes at the most, goes to `after`;
    without `after`, nothing may follow. `digest` (a hash), if given, is updated with the frame's
    compressed bytes, exactly those, as they are fed to zstd.

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
            if digest is not None:
                digest.update(fed)
            block = dobj.decompress(fed)
        del data[:end]
        return block

    try:
        start = len(zstandard.FRAME_HEADER) + 1  # the magic number and the byte that tells the header's size
        fill(start)
        if not data.startswith(zstandard.FRAME_HEADER):
            raise ArchiveCorruptError(f"{label} is not a kerrickpt archive (it is not zstd-compressed)")
        end = zstandard.frame_header_size(bytes(data[:start]))
        checksum = ZSTD_CHECKSUM_BYTES if data[start - 1] & ZSTD_CHECKSUM_FLAG else 0
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
                    end += checksum
                    break
            fill(end)
            if block := feed(end):
                yield block
            end = 0
        # Fed to its last byte and no further, so that `digest` covers the frame and nothing else.
        if not dobj.eof:
            raise ArchiveCorruptError(f"{label} is corrupt: its zstd frame does not end after its last block")
        rest = bytes(data) + fh.read(most_after)
        if fh.read(1) or (rest and after is None):
            raise ArchiveCorruptError("the archive has trailing data after its end")
        if rest and after is not None:
            after.append(rest)
    except OSError as exc:
        raise ArchiveUnreadableError(f"reading {label} failed: {exc}") from exc
    except zstandard.ZstdError as exc:
        raise ArchiveCorruptError(f"{label} is corrupt: {exc}") from exc
