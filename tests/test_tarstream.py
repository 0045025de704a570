"""The tar framing of archive members: headers made without tarfile are byte for byte the ones tarfile makes."""

from __future__ import annotations

import tarfile

import pytest

from kerrickpt import tarstream


@pytest.mark.parametrize(
    ("name", "size", "mtime"),
    [
        ("images/tcp-stream-6fb2b5.img", 120, 1_765_000_000),
        ("images/pages-1.img.000003", 1 << 26, 1_765_000_000),
        ("m", 0, 0),
        ("n" * 100, 8**11 - 1, 8**11 - 1),  # the most a plain header holds
        ("n" * 101, 5, 7),  # a pax header carries the name
        ("images/é.img", 1, 1),
        ("images/bad-\udcff.img", 3, 3),
        ("images/huge.img", 8**11, 1),  # a pax header carries the size
        ("images/late.img", 1, 8**11),
    ],
)
def test_a_header_is_the_one_tarfile_writes(name: str, size: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, mtime
    expected = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")

    assert tarstream.header(name, size, mtime) == expected
