"""A snapshot's pages hashed by worker processes: each chunk named as the store names it, and a run whose workers
die, hang or name other bytes still stores every chunk under its own address."""

from __future__ import annotations

import logging
import os
import random
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from kerrickpt import chunks, keys, pagehash, storeseal
from kerrickpt.manifest import Manifest
from kerrickpt.store import VERIFIED, Snapshot, Store
from tests.test_dedup_store import PAGE, T0, images, read_back, stored, take

MIB = 1 << 20
# Two files in pieces of one file, as CRIU writes its images into a snapshot's reserve in turns: the pages over two
# pieces, the first ending past a task's end (SEGMENT: 4 MiB), the second short of a whole page at its end.
LAYOUT = {
    "images/pages-1.img": [(0, 5 * MIB + 3 * PAGE), (6 * MIB, 3 * MIB + 123)],
    "images/inventory.img": [(5 * MIB + 3 * PAGE, 1000)],
}


def laid_out(path: Path, seed: int) -> dict[str, bytes]:
    """A file at `path` holding LAYOUT's files (random bytes): each file's bytes."""
    data = random.Random(seed).randbytes(10 * MIB)
    path.write_bytes(data)
    return {name: b"".join(data[o : o + n] for o, n in pieces) for name, pieces in LAYOUT.items()}


def seals(tmp_path: Path) -> dict[str, storeseal.Seal]:
    return {"plain": storeseal.PLAIN_SEAL, "encrypted": storeseal.Sealed.of(keys.create(tmp_path / "k"), "ab" * 16)}


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_workers_address_each_chunk_as_the_store_does(tmp_path: Path, kind: str) -> None:
    seal = seals(tmp_path)[kind]
    files = laid_out(tmp_path / "reserve", 1)
    hashing = pagehash.Hashing(tmp_path / "reserve", LAYOUT, seal.address_key, 2)
    try:
        got: dict[str, bytes] = {name: b"" for name in files}
        # Taken in uneven steps, the files in turns, as a run cuts them.
        for step in (1, 700, 3, 1024, 5000):
            for name, data in files.items():
                left = -(-len(data) // PAGE) - len(got[name]) // pagehash.DIGEST
                if left:
                    taken = hashing.take(name, min(step, left))
                    assert taken is not None
                    got[name] += taken
        assert hashing.take("images/other.img", 1) is None  # not one it was given
    finally:
        hashing.close()

    for name, data in files.items():
        assert got[name] == b"".join(seal.address(data[at : at + PAGE]) for at in range(0, len(data), PAGE))


@pytest.mark.parametrize("failure", [signal.SIGKILL, signal.SIGSTOP])
def test_a_worker_that_dies_or_hangs_leaves_the_hashing_to_the_run(
    tmp_path: Path, failure: signal.Signals, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pagehash, "WAIT", 0.5)
    laid_out(tmp_path / "reserve", 2)
    hashing = pagehash.Hashing(tmp_path / "reserve", LAYOUT, None, 2)
    try:
        # Before it has hashed a page: a Python starting takes some 20 ms.
        os.kill(hashing.procs[0].pid, failure)

        assert hashing.take("images/pages-1.img", 2) is None
        assert hashing.take("images/inventory.img", 1) is None
    finally:
        hashing.close()
    assert not hashing.procs


def reserve_snapshot(store: Store, name: str, work: Path) -> Snapshot:
    """The images in `work` (see test_dedup_store.images) taken in as a snapshot run writes its reserve after the
    thaw: the pages laid out in pieces of one file, hashed ahead by the workers."""
    pages = (work / "images" / "pages-1.img").read_bytes()
    half = len(pages) // 2 + 5 * PAGE + 17  # the second piece starts mid-page: as a run cuts it, not as written
    reserve = work / "reserve"
    reserve.write_bytes(pages[:half] + bytes(PAGE) + pages[half:])
    layout = {"images/pages-1.img": [(0, half), (half + PAGE, len(pages) - half)]}
    with store.lock(name, wait=60), store.taking_in(name) as intake:
        with intake.writer.hashing_ahead(reserve, layout):
            intake.writer.write("images/pages-1.img", pages[:half])
            intake.writer.write("images/pages-1.img", pages[half:])
            intake.writer.end("images/pages-1.img")
        intake.writer.add_file("images/inventory.img", work / "images" / "inventory.img")
        intake.writer.commit(Manifest.from_json((work / "manifest.json").read_bytes()))
    assert intake.snapshot is not None
    return intake.snapshot


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_a_snapshot_hashed_ahead_reads_back_and_shares_every_page_with_one_hashed_in_the_run(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "store").mkdir()
    key = keys.create(tmp_path / "store.key") if kind == "encrypted" else None
    store = Store.deduplicating(tmp_path / "store", key)
    pages = random.Random(3).randbytes(600 * PAGE + 99)
    given: list[int] = []
    take_ahead = pagehash.Hashing.take

    def counted(self: pagehash.Hashing, name: str, count: int) -> bytes | None:
        taken = take_ahead(self, name, count)
        given.append(0 if taken is None else count)
        return taken

    monkeypatch.setattr(pagehash.Hashing, "take", counted)
    with caplog.at_level(logging.INFO):
        first = reserve_snapshot(store, "job1", images(store, "job1", T0, pages))
    size = stored(store)
    second = take(store, "job2", T0 + timedelta(hours=1), pages)  # hashed in the run

    assert sum(given) == 601  # every chunk of the pages hashed by the workers
    assert not caplog.records  # and their addresses taken, none hashed again
    assert first.status == VERIFIED and second.status == VERIFIED
    assert read_back(first, tmp_path / "first", key) == pages
    assert stored(store) - size < 0.05 * size  # its recipe: every chunk was shared


def test_addresses_of_other_bytes_are_hashed_again_and_every_chunk_stored_under_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "store").mkdir()
    store = Store.deduplicating(tmp_path / "store")
    pages = random.Random(4).randbytes(600 * PAGE)
    take_ahead = pagehash.Hashing.take

    def shifted(self: pagehash.Hashing, name: str, count: int) -> bytes | None:
        """The addresses of a cut one page further on, as a worker given the wrong pieces would hash them."""
        taken = take_ahead(self, name, count)
        return None if taken is None else taken[pagehash.DIGEST :] + taken[: pagehash.DIGEST]

    monkeypatch.setattr(pagehash.Hashing, "take", shifted)
    first = reserve_snapshot(store, "job1", images(store, "job1", T0, pages))
    monkeypatch.undo()
    size = stored(store)
    second = take(store, "job2", T0 + timedelta(hours=1), pages)

    assert "hashed again" in caplog.text
    assert read_back(first, tmp_path / "first") == read_back(second, tmp_path / "second") == pages
    assert stored(store) - size < 0.05 * size
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened:
        # Every page is found by its own address: none was stored under another's.
        addresses = [storeseal.PLAIN_SEAL.address(pages[at : at + PAGE]) for at in range(0, len(pages), PAGE)]
        assert set(opened.lookup(addresses)) == set(addresses)


def test_a_python_that_cannot_name_itself_hashes_in_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pagehash.sys, "executable", "")
    assert pagehash.workers() == 0
