"""Decoding whole zstd frames back to back in one call into libzstd."""

from __future__ import annotations

import os

import pytest
import zstandard

from kerrickpt import zstdbatch

PAGE = 4096


def frames_of(pages: list[bytes]) -> bytes:
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    return b"".join(compressor.compress(page) for page in pages)


def pages_of(count: int) -> list[bytes]:
    # Half compressible, half not: zstd stores a page it cannot shrink raw, in a block of its own kind.
    return [(b"page %d " % i) * 400 + os.urandom(PAGE - 400 * len(b"page %d " % i)) for i in range(count)]


def test_frames_back_to_back_decode_to_their_pages_and_a_short_last_one() -> None:
    pages = [*pages_of(300), b"tail" * 100]

    assert zstdbatch.decode(frames_of(pages), PAGE * 300 + 400) == b"".join(pages)


def test_a_flipped_byte_in_any_frame_is_refused() -> None:
    frames = bytearray(frames_of(pages_of(8)))
    for at in (len(frames) // 3, len(frames) - 1):
        damaged = bytearray(frames)
        damaged[at] ^= 0x10
        with pytest.raises(zstdbatch.FrameError):
            zstdbatch.decode(bytes(damaged), PAGE * 8)


@pytest.mark.parametrize("size", [PAGE * 7, PAGE * 8 - 1, PAGE * 8 + 1, PAGE * 9])
def test_frames_holding_more_or_less_than_the_size_asked_are_refused(size: int) -> None:
    with pytest.raises(zstdbatch.FrameError):
        zstdbatch.decode(frames_of(pages_of(8)), size)


def test_a_frame_cut_short_is_refused() -> None:
    frames = frames_of(pages_of(4))
    with pytest.raises(zstdbatch.FrameError):
        zstdbatch.decode(frames[:-3], PAGE * 4)
