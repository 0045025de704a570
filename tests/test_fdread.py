"""Reading so many bytes from a pipe, and giving up on one that stays silent."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from kerrickpt import fdread


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # closed by the test
            os.close(fd)


def test_bytes_written_in_pieces_come_back_whole(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe

    def write() -> None:
        for piece in (b"abc", b"defgh", b"ij"):
            os.write(write_end, piece)
            time.sleep(0.01)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert fdread.read_exact(read_end, 10, stall=5) == b"abcdefghij"
    finally:
        writer.join()


def test_a_pipe_that_ends_early_gives_what_it_had(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, b"abc")
    os.close(write_end)

    assert fdread.read_exact(read_end, 10, stall=5) == b"abc"


def test_a_silent_pipe_is_given_up_on(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, b"abc")

    with pytest.raises(fdread.Stalled):
        fdread.read_exact(read_end, 10, stall=0.1)
    assert not fdread.ready(read_end, select.POLLIN, 0)  # what came was taken
