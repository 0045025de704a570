"""The job case's pure parts: memload's ticks, `kerrickpt job --events`, the targets; bench/dmtcp-build's refusals."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.lab import BenchError
from bench.preemption import TICKS_ZERO, last_event, parse_events, parse_ticks
from bench.report import Results

BUILD = Path(__file__).parent.parent / "bench" / "dmtcp-build"


def test_ticks_count_from_memloads_file_and_the_zeroed_file_reads_as_not_running() -> None:
    assert parse_ticks("00000000000000000289\n") == 289
    assert parse_ticks(TICKS_ZERO.decode()) == 0
    assert parse_ticks("") == 0  # created, not yet written: memload is still filling its memory


def test_the_last_event_of_a_kind_is_found_among_a_requeued_jobs_events() -> None:
    events = parse_events(
        '{"event": "started", "time": 1.0}\n'
        '{"event": "checkpointed", "time": 2.0, "archive_bytes": 10, "seconds": 0.5}\n'
        "\n"
        '{"event": "checkpointed", "time": 3.0, "archive_bytes": 20, "seconds": 0.7}\n'
        '{"event": "requeue", "time": 3.1}\n'
    )
    assert last_event(events, "checkpointed")["archive_bytes"] == 20
    with pytest.raises(BenchError) as refused:
        last_event(events, "restored")
    assert "no 'restored' event; it logged ['started', 'checkpointed', 'checkpointed', 'requeue']" in str(refused.value)


def test_job_targets_are_kerrickpt_over_dmtcp_and_shown_in_the_table() -> None:
    results = Results()
    results.add(1024, "heap", 1, {"dmtcp.checkpoint_s": 10.0, "dmtcp.image_mib": 200.0, "dmtcp.resume_s": 4.0}, {})
    results.add(1024, "heap", 1, {"job.checkpoint_s": 4.0, "job.archive_mib": 250.0, "job.resume_s": 1.0}, {})
    rows = {r["target"]: r for r in results.targets() if r["target"].startswith("job:")}
    checkpoint, size, resume = rows.values()
    assert (checkpoint["value"], checkpoint["holds"]) == (0.4, True)
    assert (size["value"], size["holds"]) == (1.25, False)
    assert (resume["value"], resume["holds"]) == (0.25, True)
    table = results.table()
    assert "job.archive_mib" in table and "1.25x dmtcp.image_mib" in table


def run_build(tmp_path: Path, tarball: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERRICKPT_CI_CACHE": str(tmp_path / "cache"), "KERRICKPT_DMTCP_TARBALL": str(tarball)}
    return subprocess.run([str(BUILD)], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_dmtcp_build_says_where_it_looked_when_the_source_is_absent(tmp_path: Path) -> None:
    result = run_build(tmp_path, tmp_path / "nowhere.tar.gz")
    assert result.returncode == 1
    assert f"not at {tmp_path / 'nowhere.tar.gz'}" in result.stderr
    assert "KERRICKPT_DMTCP_TARBALL" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_dmtcp_build_refuses_a_tarball_that_is_not_the_pinned_one(tmp_path: Path) -> None:
    fake = tmp_path / "dmtcp-2bef5cf8c5f8.tar.gz"
    fake.write_bytes(b"not dmtcp")
    result = run_build(tmp_path, fake)
    assert result.returncode == 1
    assert "sha256" in result.stderr and "is not the pinned" in result.stderr
    assert not (tmp_path / "cache").exists()
