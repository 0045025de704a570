"""Smoke run of the benchmark at its smallest size: it still works end to end. No timings are judged here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.cases import CASES
from bench.report import RATIOS

pytestmark = pytest.mark.root

RUN = Path(__file__).parent.parent / "bench" / "run"


def test_smallest_run_measures_every_case_and_every_restore_keeps_the_memory(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [str(RUN), "--sizes", "16M", "--reps", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())

    assert report["config"]["cases"] == list(CASES)
    for kind in ("heap", "mixed"):
        metrics = {r["metric"] for r in report["results"] if r["kind"] == kind and r["mib"] == 16}
        kerrickpt = ("snapshot", "checkpoint", "restore", "migrate", "migrate_lazy")
        for prefix in ("raw.", "seq.", "runc.", *(f"kpt.{case}" for case in kerrickpt)):
            assert any(m.startswith(prefix) for m in metrics), f"{prefix} missing for {kind}"
        targets = {t["target"] for t in report["targets"] if t["kind"] == kind}
        assert {r.label for r in RATIOS} <= targets
    for row in report["results"]:
        assert row["min"] <= row["median"] and len(row["samples"]) == 1
    restores = {(c["kind"], c["restore"]) for c in report["verified"]}
    # raw, sequential, runc, snapshot, kerrickpt restore, migrate, lazy migrate; both kinds
    assert len(restores) == 2 * 7, restores
    assert all(c["ok"] for c in report["verified"]), report["verified"]

    assert "target of issue 6" in result.stdout
    assert "memory verified after 14 of 14 restores" in result.stdout
    for ratio in RATIOS:
        assert ratio.label in result.stdout
