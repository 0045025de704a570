"""The store benchmark's own parts: its fixed-chunk store keeps a changed chunk once; memload rewrites its share."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.engines import ENGINES, Bench, Cas, digests, summary, tree_size
from bench.lab import CHURNED
from kerrickpt import archivewriter
from kerrickpt.manifest import Manifest
from tests.test_store import SOURCE

PAGE = 4096


def _images(path: Path, memory: bytes) -> Path:
    path.mkdir()
    (path / "pages-1.img").write_bytes(memory)
    (path / "inventory.img").write_bytes(b"inventory")
    return path


@pytest.mark.parametrize("dictionary", [False, True])
def test_a_snapshot_that_changed_one_page_grows_the_store_by_about_that_page(tmp_path: Path, dictionary: bool) -> None:
    memory = bytearray(random.Random(1).randbytes(256 * PAGE))
    first = _images(tmp_path / "first", bytes(memory))
    memory[100 * PAGE : 101 * PAGE] = random.Random(2).randbytes(PAGE)
    second = _images(tmp_path / "second", bytes(memory))
    repo = tmp_path / "repo"
    Cas(repo, PAGE, dictionary).store(first, "snap-0")
    before = tree_size(repo)
    Cas(repo, PAGE, dictionary).store(second, "snap-1")
    # One new chunk (random: stored as it is) and the second snapshot's list of 257 chunk digests.
    assert tree_size(repo) - before < 2 * PAGE + 257 * 32
    for name, images in (("snap-0", first), ("snap-1", second)):
        Cas(repo, PAGE, dictionary).read(name, tmp_path / f"read-{name}")
        assert digests(tmp_path / f"read-{name}") == digests(images)


def test_kerrickpts_store_plain_and_encrypted_stores_and_reads_back_each_snapshot(tmp_path: Path) -> None:
    memory = bytearray(random.Random(3).randbytes(256 * PAGE))
    engines = [ENGINES["archive"], ENGINES["kerrickpt"], ENGINES["kerrickpt-enc"]]
    (tmp_path / "work").mkdir()
    bench = Bench(tmp_path / "work", engines)
    bench.setup()
    taken = {}
    for index in range(2):
        memory[index * PAGE : (index + 1) * PAGE] = random.Random(4 + index).randbytes(PAGE)
        taken[index] = _images(tmp_path / f"images-{index}", bytes(memory))
        created = f"2025-03-01T12:0{index}:00.000+00:00"
        manifest = Manifest(name="bench", created=created, source=SOURCE, processes=[], command=["sh"])
        archive = tmp_path / f"taken-{index}.kckpt"
        archivewriter.write(archive, manifest, {f"images/{p.name}": p for p in taken[index].iterdir()})
        bench.store_all(index, taken[index], archive)
    for index, images in taken.items():
        bench.read_all(index, images)  # each compared with its images

    rows = {row["engine"]: row for row in summary(bench.rows, engines)}
    assert rows["kerrickpt"]["growth_x"] < 0.1 and rows["kerrickpt-enc"]["growth_x"] < 0.1


def test_the_summary_is_against_the_plain_archive_of_the_same_snapshot() -> None:
    stores = [
        {"snapshot": s, "engine": e, "verb": "store", "s": t, "rss_mib": 10.0, "size_bytes": size}
        for e, sizes, t in (("archive", (100, 200, 300), 2.0), ("cas4k", (150, 160, 180), 1.0))
        for s, size in enumerate(sizes)
    ]
    reads = [
        {"snapshot": 2, "engine": e, "verb": "read", "s": t, "rss_mib": 5.0} for e, t in (("archive", 2), ("cas4k", 3))
    ]
    rows = {row["engine"]: row for row in summary(stores + reads, [ENGINES["archive"], ENGINES["cas4k"]])}
    assert rows["cas4k"]["first_x"] == 1.5
    assert rows["cas4k"]["growth_x"] == pytest.approx(0.15)  # the median of 10/100 and 20/100
    assert rows["cas4k"]["total_x"] == pytest.approx(1.8)  # the whole store, in first archives
    assert rows["cas4k"]["store_x"] == 0.5
    assert rows["cas4k"]["read_x"] == {2: 1.5}


def _line(log: Path, pattern: re.Pattern[str], offset: int) -> re.Match[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if match := pattern.search(log.read_text()[offset:]):
            return match
        time.sleep(0.05)
    raise AssertionError(f"{log} never showed {pattern.pattern}: {log.read_text()}")


def test_memload_rewrites_its_share_of_pages_on_sigusr2_and_verifies_against_the_new_memory(
    memload: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    with log.open("w") as out:
        process = subprocess.Popen([str(memload), "--churn", "5", "1", "8", "heap"], stdout=out)
    try:
        ready = _line(log, re.compile(r"^ready mib=8 kind=heap sum=([0-9a-f]+)$", re.M), 0)
        offset = len(log.read_text())
        process.send_signal(signal.SIGUSR2)
        churned = _line(log, CHURNED, offset)
        assert int(churned.group(1)) == 8 * 256 * 5 // 100  # 5% of 2048 pages
        assert churned.group(2) != ready.group(1)
        offset = len(log.read_text())
        process.send_signal(signal.SIGUSR1)
        verified = _line(log, re.compile(r"^verify (OK|BAD) sum=([0-9a-f]+)", re.M), offset)
        assert verified.groups() == ("OK", churned.group(2))
    finally:
        process.kill()
        process.wait(timeout=30)
