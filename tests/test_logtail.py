"""A checkpoint carries only the tail of a chatty container's log; the restored log keeps its length."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import archive
from kerrickpt.localnodes import Cluster
from tests.helpers import archived_log, assert_consecutive, cli, ticks
from tests.test_migrate import Job, migrate

pytestmark = pytest.mark.root

FILLER = b"".join(b"filler line %07d of an old chatty history\n" % i for i in range(400_000))  # 17 MiB


def _chatter(log: Path) -> None:
    """History the container 'wrote' before: appended the way its own processes write."""
    with log.open("ab") as fh:
        fh.write(FILLER)


def test_checkpoint_carries_the_logs_tail_and_restore_rebuilds_its_length(
    start_workload, state_dir: Path, tmp_path: Path
) -> None:
    w = start_workload()
    log = Path(w.status.log or "")
    _chatter(log)
    w.wait_ticking(beyond=max(ticks(w.log)))  # ticks after the history: the tail holds the counter
    archive = tmp_path / "w.kckpt"

    run = cli("checkpoint", w.name, "-o", str(archive), "--log-tail", "1M", "--json", state_dir=state_dir)

    assert run.returncode == 0, run.stderr
    assert archive.stat().st_size < 1 << 20, "the history did not travel"
    carried = archived_log(archive).encode()
    shown = json.loads(cli("inspect", "--json", str(archive)).stdout)
    start = shown["log_start"]
    assert len(carried) <= 1 << 20 and start > len(FILLER) - (1 << 20)
    assert carried.startswith(b"filler line ") and carried.count(b"\n") > 1000, "whole lines from the cut on"
    last_archived = max(ticks(carried.decode()))

    restored = kerrickpt.restore(archive, state_dir=state_dir)

    assert restored.name == w.name
    w.wait_ticking(beyond=last_archived)
    rebuilt = log.read_bytes()
    assert rebuilt[:start] == bytes(start - 1) + b"\n", "the lines not carried read as one empty line of zeros"
    assert rebuilt[start : start + len(carried)] == carried, "the tail sits at its old offset"
    numbers = ticks(rebuilt[start:].decode())
    assert_consecutive(numbers)
    assert numbers[-1] > last_archived, "the restored container writes on after its carried lines"
    assert os.stat(log).st_blocks * 512 < start, "the hole takes no disk space"


def test_default_tail_is_8_mib_and_a_short_log_travels_whole(start_workload, state_dir: Path, tmp_path: Path) -> None:
    chatty, quiet = start_workload(), start_workload()
    _chatter(Path(chatty.status.log or ""))
    big, small = tmp_path / "chatty.kckpt", tmp_path / "quiet.kckpt"

    kerrickpt.checkpoint(chatty.name, big, state_dir=state_dir, leave_running=True)
    kerrickpt.checkpoint(quiet.name, small, state_dir=state_dir, leave_running=True)

    (tmp_path / "unpacked").mkdir()
    archive.extract(big, tmp_path / "unpacked")
    assert 8 << 20 >= (tmp_path / "unpacked" / "log").stat().st_size > (8 << 20) - 100, "chunked, reassembled"
    assert kerrickpt.inspect(big).manifest.log_start > 0
    whole = archived_log(small)
    assert kerrickpt.inspect(small).manifest.log_start == 0 and whole.startswith("ready ") and "tick 1 pid" in whole
    copy = kerrickpt.restore(small, name="quiet-copy", state_dir=state_dir)
    assert Path(str(next(r.log for r in kerrickpt.ps(state_dir) if r.name == copy.name))).read_text().startswith(whole)


def test_a_negative_log_tail_is_refused_before_any_freeze(start_workload, state_dir: Path, tmp_path: Path) -> None:
    w = start_workload()

    run = cli("checkpoint", w.name, "-o", str(tmp_path / "x"), "--log-tail", "-1", "--json", state_dir=state_dir)

    assert run.returncode == 2 and json.loads(run.stdout)["exit_code"] == 2
    assert w.status.state == "running" and not (tmp_path / "x").exists()


def test_a_migration_carries_the_tail_and_the_target_keeps_the_logs_length(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)
    _chatter(a.state_dir / "containers" / job.name / "log")

    result = migrate(cluster, a, b, job, "--log-tail", "1M")

    assert result.returncode == 0, result.stderr
    job.keeps_counting(b)
    log = b.state_dir / "containers" / job.name / "log"
    rebuilt = log.read_bytes()
    start = rebuilt.index(b"filler line ")
    assert start > len(FILLER) - (1 << 20) and rebuilt[:start] == bytes(start - 1) + b"\n"
    assert_consecutive(ticks(rebuilt[start:].decode()))
    assert os.stat(log).st_blocks * 512 < start, "the lines not carried take no room on the target"
