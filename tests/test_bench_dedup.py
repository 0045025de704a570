"""The dedup case's own arithmetic, on made-up numbers: which snapshots it restores, in which order the stores take
their turns, what a store's size is, and the metrics it makes of what it measured. No timing is judged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.dedup import STORES, Measured, allocated, picks, turned
from bench.lab import MIB


def test_each_round_starts_one_store_further_so_every_store_takes_every_place() -> None:
    assert [turned(STORES, n) for n in range(4)] == [
        ["whole", "chunks", "sealed"],
        ["chunks", "sealed", "whole"],
        ["sealed", "whole", "chunks"],
        ["whole", "chunks", "sealed"],
    ]


def test_the_first_the_middle_and_the_last_snapshot_are_restored_each_once() -> None:
    assert picks(24) == [0, 11, 23]
    assert picks(3) == [0, 1, 2]
    assert picks(2) == [0, 1]
    assert picks(1) == [0]


def test_a_stores_size_is_what_du_counts_not_what_its_files_say(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "pack").write_bytes(os.urandom(MIB))
    with (store / "sparse").open("wb") as fh:
        fh.truncate(64 * MIB)  # a hole: 64 MiB long, nothing allocated
    assert MIB <= allocated(store) < 2 * MIB


def measured(sizes: dict[str, list[int]]) -> Measured:
    run = Measured()
    for store, taken in run.taken.items():
        taken.size_bytes = sizes[store]
        count = len(sizes[store])
        taken.frozen_s, taken.snapshot_s, taken.peak_mib = [0.5] * count, [4.0] * count, [60.0] * count
        run.restore_s[store] = [1.0, 3.0, 2.0]
        run.restore_peak_mib[store] = [50.0, 70.0, 60.0]
    for archive in ("archive", "sealed_archive"):
        run.restore_s[archive], run.restore_peak_mib[archive] = [1.5] * 3, [55.0] * 3
        run.checkpoint_s[archive] = [2.0] * 3
    return run


def test_growth_is_per_snapshot_after_the_first_in_full_archives_of_the_store_of_whole_archives() -> None:
    full = 100 * MIB
    values, series = measured({"whole": [full, 2 * full, 3 * full, 4 * full],
                               "chunks": [full + 10 * MIB, full + 20 * MIB, full + 35 * MIB, full + 40 * MIB],
                               "sealed": [full, full, full, full + 30 * MIB]}).metrics()  # fmt: skip
    assert values["dedup.full_archive_mib"] == 100
    assert values["dedup.whole.growth_x"] == 1.0
    assert values["dedup.chunks.growth_x"] == pytest.approx(0.1)  # 30 MiB over the 3 snapshots after the first
    assert values["dedup.sealed.growth_x"] == pytest.approx(0.1)
    assert (values["dedup.chunks.first_x"], values["dedup.chunks.total_x"]) == (pytest.approx(1.1), pytest.approx(1.4))
    assert values["dedup.whole.total_x"] == 4.0
    assert series["dedup.chunks.size_mib"] == [110, 120, 135, 140]
    # The restore target is for any snapshot: the slowest of those restored; each restore is a sample too.
    assert values["dedup.chunks.restore_max_s"] == 3.0
    assert series["dedup.chunks.restore_s"] == [1.0, 3.0, 2.0]
    assert values["dedup.sealed.restore_peak_mib"] == 70.0
    assert series["dedup.sealed_archive.checkpoint_s"] == [2.0] * 3
    assert series["dedup.whole.frozen_s"] == [0.5] * 4


def test_one_snapshot_gives_no_growth() -> None:
    values, _ = measured({store: [MIB] for store in STORES}).metrics()
    assert not any(name.endswith("growth_x") for name in values)
    assert values["dedup.chunks.total_x"] == 1.0
