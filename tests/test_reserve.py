"""The warmed image space of a snapshot: taken before the freeze, overwritten in place by the images, which come
out whole and in CRIU's order, and gone afterwards. No timing is judged."""

from __future__ import annotations

import os
import stat
from contextlib import closing
from pathlib import Path

import pytest

from kerrickpt.reserve import NAME, Reserve
from kerrickpt.streamer import PipeSink


class Recorder:
    """A streamer.Sink that keeps what it is given."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ended: list[str] = []

    def write(self, name: str, data: bytes) -> None:
        assert name not in self.ended, f"{name} written after its end"
        self.files[name] = self.files.get(name, b"") + data

    def end(self, name: str) -> None:
        self.files.setdefault(name, b"")
        self.ended.append(name)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir(mode=0o700)
    return path


def test_the_space_is_taken_before_any_image_comes_and_is_private(scratch: Path) -> None:
    with closing(Reserve(scratch, 3 * 2**20 + 5)) as reserve:
        info = os.stat(scratch / NAME)
        assert info.st_size == 3 * 2**20 + 5
        assert info.st_blocks * 512 >= info.st_size, "written, so the pages are taken, not a sparse file"
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert reserve.used == 0


def test_images_written_side_by_side_come_out_whole_in_the_order_criu_began_them(scratch: Path) -> None:
    pages, core, inventory = os.urandom(3 * 2**20 + 17), os.urandom(5000), b"inv"
    with closing(Reserve(scratch, 4 * 2**20)) as reserve:
        reserve.write("pages-1.img", pages[: 2**20])
        reserve.write("core-1.img", core[:100])
        reserve.write("pages-1.img", pages[2**20 :])
        reserve.write("core-1.img", core[100:])
        reserve.end("core-1.img")
        reserve.end("pages-1.img")
        reserve.end("empty.img")  # opened and closed without a byte
        reserve.write("inventory.img", inventory)
        reserve.end("inventory.img")
        out = Recorder()
        reserve.into(out)
    assert list(out.files) == ["pages-1.img", "core-1.img", "empty.img", "inventory.img"]
    assert out.files == {"pages-1.img": pages, "core-1.img": core, "empty.img": b"", "inventory.img": inventory}
    assert out.ended == list(out.files)


def test_images_overwrite_the_space_in_place_and_what_does_not_fit_grows_it(scratch: Path) -> None:
    with closing(Reserve(scratch, 2**20)) as reserve:
        reserve.write("pages-1.img", b"x" * 700_000)
        assert os.stat(scratch / NAME).st_size == 2**20, "in place: the file did not grow"
        reserve.write("pages-1.img", b"y" * 700_000)
        assert os.stat(scratch / NAME).st_size == 1_400_000
        out = Recorder()
        reserve.into(out)
    assert out.files["pages-1.img"] == b"x" * 700_000 + b"y" * 700_000


def test_nothing_is_kept_once_it_is_closed_even_after_a_failure(scratch: Path) -> None:
    with pytest.raises(RuntimeError), closing(Reserve(scratch, 2**20)) as reserve:
        reserve.write("pages-1.img", b"z" * 1000)
        raise RuntimeError("the dump failed")
    assert list(scratch.iterdir()) == []
    reserve.close()  # twice is harmless: the checkpoint's own cleanup closes it again
    with closing(Reserve(scratch, 0)) as empty:  # no memory to reserve: the images simply grow the file
        empty.write("pages-1.img", b"a")
        assert os.stat(scratch / NAME).st_size == 1
    assert list(scratch.iterdir()) == []


def test_images_taken_straight_from_criu_pipes_land_as_written_ones_do(scratch: Path) -> None:
    pages, core = os.urandom(300_000), os.urandom(5000)
    reader, writer = os.pipe()
    with closing(Reserve(scratch, 2**20)) as reserve:
        assert isinstance(reserve, PipeSink), "the streamer splices into it rather than reading through Python"
        os.write(writer, pages[:60_000])
        assert reserve.take("pages-1.img", reader, 2**20) == 60_000
        reserve.write("core-1.img", core)
        reserve.end("core-1.img")
        rest = memoryview(pages)[60_000:]
        while rest:
            sent = os.write(writer, rest[:50_000])
            rest = rest[sent:]
            assert reserve.take("pages-1.img", reader, 2**20) == sent
        os.close(writer)
        assert reserve.take("pages-1.img", reader, 2**20) == 0, "the pipe's end"
        os.close(reader)
        reserve.end("pages-1.img")
        assert os.stat(scratch / NAME).st_size == 2**20, "in place"
        out = Recorder()
        reserve.into(out)
    assert out.files == {"pages-1.img": pages, "core-1.img": core}
    assert list(out.files) == ["pages-1.img", "core-1.img"]
