"""The benchmark's statistics and picture, on made-up numbers: min, median, max and p95, the repeated snapshots'
target, warm-up runs left out of the numbers, and the PNG bench/run writes beside its JSON. No timing is judged."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread

from bench.picture import draw
from bench.report import REPEATED_FROZEN, Results, p95, spread

MACHINE = {"nproc": "2", "memory_gib": "23.5", "kernel": "6.18"}


def test_p95_is_the_sample_that_95_percent_of_them_do_not_exceed() -> None:
    assert p95([float(n) for n in range(20, 0, -1)]) == 19.0  # 19 of 20 are at most 19, whatever the order
    assert p95([float(n) for n in range(1, 101)]) == 95.0
    assert p95([0.4, 0.5, 2.5]) == 2.5  # few samples: the worst one
    assert p95([0.7]) == 0.7


def test_every_metric_gets_min_median_and_max_in_the_json_and_the_table() -> None:
    results = Results()
    for rep, seconds in enumerate((0.9, 0.3, 0.5), start=1):
        results.add(256, "heap", rep, {"raw.dump_s": seconds}, {})
    assert spread([0.9, 0.3, 0.5]) == {"min": 0.3, "median": 0.5, "max": 0.9}
    (row,) = results.to_dict(MACHINE, {})["results"]
    assert (row["min"], row["median"], row["max"]) == (0.3, 0.5, 0.9)
    assert "  256 heap   raw.dump_s                         0.300     0.500     0.900" in results.table()


def snapshots(results: Results, frozen: list[float], mib: int = 1024, kind: str = "heap") -> None:
    results.add(mib, kind, 1, {"kpt.repeated_total_s": 40.0}, {"kpt.repeated (left running)": True},
                {REPEATED_FROZEN: frozen, "kpt.repeated_snapshot_s": [2.0] * len(frozen)})  # fmt: skip


def test_repeated_snapshots_report_median_p95_and_max_and_judge_p95_against_the_median() -> None:
    results = Results()
    snapshots(results, [0.4] * 18 + [2.1, 2.8])  # two outliers in 20: p95 is the smaller of them
    snapshots(results, [0.4] * 19 + [2.8], kind="mixed")  # one in 20 stays outside p95
    rows = {r["kind"]: r for r in results.to_dict(MACHINE, {})["repeated"]}
    heap, mixed = rows["heap"], rows["mixed"]
    assert (heap["snapshots"], heap["median"], heap["p95"], heap["max"]) == (20, 0.4, 2.1, 2.8)
    assert heap["total_s"] == 40.0
    assert (mixed["p95"], mixed["max"]) == (0.4, 2.8)
    targets = {r["kind"]: r for r in results.targets() if r["target"].startswith("repeated snapshots")}
    assert targets["heap"]["value"] == 2.1 / 0.4 and targets["heap"]["holds"] is False
    assert targets["mixed"]["value"] == 1.0 and targets["mixed"]["holds"] is True
    assert targets["heap"]["target"] == "repeated snapshots (20): frozen window p95 / median"
    table = results.table()
    assert " 1024 heap                   20         0.400   2.100   2.800       5.25          40.00" in table
    assert "repeated snapshots (20): frozen window p95 / median" in table


def test_a_warm_up_run_counts_in_no_number_but_its_memory_checks_are_kept() -> None:
    results = Results()
    results.add(256, "heap", 0, {"raw.dump_s": 9.0}, {"raw.restore": False}, warmup=True)
    results.add(256, "heap", 1, {"raw.dump_s": 0.3}, {"raw.restore": True})
    (row,) = results.to_dict(MACHINE, {})["results"]
    assert row["samples"] == [0.3]
    assert [(c["rep"], c["warmup"], c["ok"]) for c in results.checks] == [(0, True, False), (1, False, True)]
    assert "memory verified after 1 of 2 restores (1 of them in warm-up runs): BAD after raw.restore" in results.table()


def fake_report(kinds: tuple[str, ...], *, repeated: bool) -> dict[str, object]:
    results = Results()
    for kind in kinds:
        for mib in (256, 1024, 4096):
            for rep in (1, 2):
                seconds = mib / 1024 * rep
                metrics = {"raw.dump_s": seconds, "raw.restore_s": seconds / 2, "raw.downtime_s": seconds * 1.5,
                           "kpt.checkpoint_s": seconds, "kpt.restore_s": seconds, "kpt.downtime_s": 2 * seconds,
                           "conf.L64.checkpoint_s": seconds, "conf.L64.migrate_downtime_s": seconds}  # fmt: skip
                results.add(mib, kind, rep, metrics, {})
        if repeated:
            snapshots(results, [0.4, 0.5, 0.45, 2.2], kind=kind)
    return results.to_dict(MACHINE, {"command": "bench/run --sizes 256M,1G,4G"})


def test_the_picture_is_a_png_with_a_row_of_panels_per_workload_kind(tmp_path: Path) -> None:
    both, heap = tmp_path / "both.png", tmp_path / "heap.png"
    draw(fake_report(("heap", "mixed"), repeated=True), both)
    draw(fake_report(("heap",), repeated=True), heap)
    for path in (both, heap):
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    two_rows, one_row = imread(both), imread(heap)
    assert two_rows.shape[1] == one_row.shape[1]
    assert two_rows.shape[0] > 1.8 * one_row.shape[0]


def test_the_picture_is_drawn_without_repeated_snapshots_or_with_cases_missing(tmp_path: Path) -> None:
    path = tmp_path / "bench-results.png"
    draw(fake_report(("heap",), repeated=False), path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_what_connections_add_to_a_migration_is_judged_in_seconds_against_issue_15s_limit() -> None:
    results = Results()
    for rep, added in enumerate((0.02, 0.09, 0.03), start=1):
        results.add(256, "heap", rep, {"net.added_downtime_s": added}, {})
    results.add(16, "heap", 1, {"net.added_downtime_s": 0.3}, {})
    rows = {r["mib"]: r for r in results.targets() if r["target"].startswith("netmigrate:")}
    assert (rows[256]["value"], rows[256]["goal"], rows[256]["holds"]) == (0.03, "<= 0.05 s", True)
    assert rows[16]["holds"] is False
    assert "netmigrate: downtime with connections - without, s      0.30  <= 0.05 s  NO" in results.table()


def dedup_run(results: Results, kind: str, *, growth: float, chunks_snapshot_s: float) -> None:
    metrics = {"dedup.chunks.growth_x": growth, "dedup.sealed.growth_x": growth * 1.1,
               "dedup.chunks.total_x": 1.4 + 23 * growth, "dedup.whole.total_x": 24.0, "dedup.sealed.total_x": 3.0,
               "dedup.chunks.restore_max_s": 2.0}  # fmt: skip
    series = {"dedup.whole.frozen_s": [0.40] * 24, "dedup.chunks.frozen_s": [0.42] * 24,
              "dedup.sealed.frozen_s": [0.50] * 24, "dedup.whole.snapshot_s": [4.0] * 24,
              "dedup.chunks.snapshot_s": [chunks_snapshot_s] * 24, "dedup.sealed.snapshot_s": [3.3] * 24,
              "dedup.whole.restore_s": [1.5, 1.6, 1.7], "dedup.chunks.restore_s": [1.8, 2.0, 1.9],
              "dedup.sealed.restore_s": [2.0, 2.2, 2.1], "dedup.archive.restore_s": [1.6, 1.5, 1.7]}  # fmt: skip
    results.add(1024, kind, 1, metrics, {"dedup.chunks restore of snapshot 1 of 24": True}, series)


def test_the_dedup_stores_are_judged_against_the_store_of_whole_archives_and_archive_files() -> None:
    results = Results()
    dedup_run(results, "heap", growth=0.06, chunks_snapshot_s=3.0)
    dedup_run(results, "mixed", growth=0.2, chunks_snapshot_s=4.4)
    rows = {(r["kind"], r["target"]): r for r in results.targets()}
    growth = rows[("heap", "dedup store: grows per snapshot / full archive")]
    assert (growth["value"], growth["goal"], growth["holds"]) == (0.06, "<= 0.15x", True)
    assert rows[("mixed", "dedup store: grows per snapshot / full archive")]["holds"] is False
    frozen = rows[("heap", "dedup store: frozen / whole-archive store's")]
    assert (frozen["value"], frozen["holds"]) == (pytest.approx(1.05), True)
    assert rows[("heap", "encrypted store: frozen / whole-archive store's")]["holds"] is False
    assert rows[("heap", "dedup store: snapshot run / whole-archive store's")]["value"] == 0.75
    assert rows[("mixed", "dedup store: snapshot run / whole-archive store's")]["holds"] is False
    # Any snapshot's restore: the slowest restored against the archive's median.
    assert rows[("heap", "dedup store: slowest restore / archive restore")]["value"] == 2.0 / 1.6
    assert rows[("heap", "encrypted store: snapshot run / dedup store's")]["value"] == pytest.approx(1.1)
    assert rows[("heap", "encrypted archive, dedup case: restore / plain")]["value"] is None  # not measured here
    stores = {(r["kind"], r["store"]): r for r in results.to_dict(MACHINE, {})["dedup"]}
    assert (stores[("heap", "chunks")]["snapshots"], stores[("heap", "chunks")]["restore_max_s"]) == (24, 2.0)
    assert stores[("heap", "whole")]["growth_x"] is None
    table = results.table()
    assert " 1024 heap   chunks             24    0.060    2.78    0.420       3.00      1.90    2.00" in table
    assert " 1024 heap   whole              24        -   24.00    0.400       4.00      1.60    1.70" in table
    assert "dedup store: grows per snapshot / full archive" in table
