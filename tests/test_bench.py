"""Smoke runs of the benchmark at its smallest size, warm-up run and repeated snapshots included, and of the network's
and the dedup case, which run only when named: they still work end to end and write their JSON and picture. No
timings are judged here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.cases import DEFAULT
from bench.dedup import ARCHIVES, STORES
from bench.report import LAYER_PHASES, LIMITS, RATIOS, REPEATED_FROZEN

pytestmark = pytest.mark.root

RUN = Path(__file__).parent.parent / "bench" / "run"


def test_smallest_run_measures_every_case_and_every_restore_keeps_the_memory(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    # A tiny layer beside the empty one: enough to show the layer's cost is measured.
    args = ["--sizes", "16M", "--reps", "1", "--layers", "0,4M", "--json", str(out)]
    args += ["--repeat-at", "16M", "--snapshots", "3", "--pause", "0.1"]
    result = subprocess.run(
        [str(RUN), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())

    assert report["config"]["cases"] == list(DEFAULT)
    for kind in ("heap", "mixed"):
        metrics = {r["metric"] for r in report["results"] if r["kind"] == kind and r["mib"] == 16}
        kerrickpt = ("snapshot", "checkpoint", "restore", "migrate", "migrate_lazy")
        confined = (f"conf.L{layer}.{what}" for layer in (0, 4) for what in ("checkpoint", "restore", "migrate"))
        kerrickpt_cases = (f"kpt.{case}" for case in (*kerrickpt, "repeated"))
        for prefix in ("raw.", "seq.", "runc.", "sealed.checkpoint", "sealed.restore", *kerrickpt_cases, *confined):
            assert any(m.startswith(prefix) for m in metrics), f"{prefix} missing for {kind}"
        targets = {t["target"] for t in report["targets"] if t["kind"] == kind}
        assert {r.label for r in RATIOS} <= targets
        costs = [c for c in report["layer_costs"] if c["kind"] == kind]
        assert [(c["layer_mib"], c["phase"]) for c in costs] == [(4, phase) for phase in LAYER_PHASES]
        assert all(c["layer_tar_mib"] >= 4 and c["budget_s"] > 0 for c in costs), costs
    for row in report["results"]:
        # The warm-up run's samples are not among them: one repetition, one sample (three frozen windows).
        assert len(row["samples"]) == (3 if row["metric"] in (REPEATED_FROZEN, "kpt.repeated_snapshot_s") else 1)
        assert row["min"] <= row["median"] <= row["p95"] <= row["max"]
    assert [(r["kind"], r["snapshots"]) for r in report["repeated"]] == [("heap", 3), ("mixed", 3)]
    restores = {(c["kind"], c["restore"]) for c in report["verified"]}
    # raw, sequential, runc, snapshot, kerrickpt restore, of an encrypted archive, migrate, lazy migrate, the
    # repeated snapshots, and a confined restore and migration with each layer; both kinds
    assert len(restores) == 2 * (9 + 2 * 2), restores
    assert [c["warmup"] for c in report["verified"]].count(True) == len(restores)
    assert all(c["ok"] for c in report["verified"]), report["verified"]
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")

    head = "target of issue 6, 13 (confined), 14 (job), 15 (network), 16 (encrypted, dedup) or 17 (repeated)"
    assert head in result.stdout
    runs = 2 * len(restores)  # every restore in the warm-up run and in the one counted
    assert f"memory verified after {runs} of {runs} restores ({len(restores)} of them in warm-up runs)" in result.stdout
    assert "16 MiB heap warm-up: raw" in result.stderr
    assert "16 MiB mixed rep 1: repeated (3 snapshots, 0.1 s apart)" in result.stderr
    assert report["config"]["pause_s"] == 0.1
    for ratio in RATIOS:
        assert ratio.label in result.stdout


def test_the_network_case_migrates_a_container_with_its_connections_and_checks_every_answer(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--cases", "netmigrate", "--connections", "5", "--sizes", "16M", "--kinds", "heap", "--reps", "1"]
    result = subprocess.run([str(RUN), *args, "--json", str(out)], capture_output=True, text=True, timeout=600,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())

    metrics = {r["metric"] for r in report["results"]}
    assert {"net.downtime_s", "net.idle_downtime_s", "net.added_downtime_s", "net.network_lock_s",
            "net.idle_network_lock_s", "net.longest_gap_s", "net.median_longest_gap_s"} == metrics  # fmt: skip
    # The memory of both migrated containers, and each of the five clients' every answer, in turn.
    assert {c["restore"] for c in report["verified"]} == {"net.migrate (no connections)",
                                                          "net.migrate (5 connections, every answer)"}  # fmt: skip
    assert all(c["ok"] for c in report["verified"]), report["verified"]
    assert [t["target"] for t in report["targets"] if t["target"].startswith("netmigrate:")] == [
        "netmigrate: downtime with connections - without, s"
    ]
    assert report["config"]["connections"] == 5
    assert "16 MiB heap rep 1: netmigrate (5 connections)" in result.stderr


def test_the_dedup_case_snapshots_into_three_stores_and_restores_from_each_and_from_archives(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--cases", "dedup", "--dedup-snapshots", "3", "--sizes", "16M", "--kinds", "heap", "--reps", "1",
            "--no-warmup", "--json", str(out)]  # fmt: skip
    result = subprocess.run([str(RUN), *args], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())

    samples = {r["metric"]: r["samples"] for r in report["results"]}
    for store in STORES:
        for series in ("frozen_s", "snapshot_s", "size_mib", "restore_s"):
            assert len(samples[f"dedup.{store}.{series}"]) == 3, (store, series)  # 3 snapshots, 3 of them restored
    for archive in ARCHIVES:
        assert len(samples[f"dedup.{archive}.checkpoint_s"]) == len(samples[f"dedup.{archive}.restore_s"]) == 3
    # What 5% of the pages rewritten add to each store, in full archives: the store of whole archives a whole one.
    assert 0.8 < samples["dedup.whole.growth_x"][0] < 1.2
    assert samples["dedup.chunks.growth_x"][0] < 0.5 and samples["dedup.sealed.growth_x"][0] < 0.5
    # Each store's first, middle and last snapshot and an archive, plain and encrypted, each time; then the workload.
    checks = {c["restore"]: c["ok"] for c in report["verified"]}
    assert len(checks) == 3 * len(STORES) + 3 * len(ARCHIVES) + 1, checks
    assert "dedup.sealed restore of snapshot 2 of 3" in checks and all(checks.values()), checks
    targets = {t["target"]: t["value"] for t in report["targets"]}
    assert targets["dedup store: grows per snapshot / full archive"] == samples["dedup.chunks.growth_x"][0]
    assert all(targets[t.label] is not None for t in (*RATIOS, *LIMITS) if t.metric.startswith("dedup."))
    assert [(r["store"], r["snapshots"]) for r in report["dedup"]] == [(store, 3) for store in STORES]
    assert report["config"]["dedup_snapshots"] == 3
    assert "16 MiB heap rep 1: dedup (3 snapshots into 3 stores)" in result.stderr
