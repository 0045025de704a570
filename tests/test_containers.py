"""The state directory: checkpoint scratch of runs that died is swept; that of live runs, and others, is not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kerrickpt import containers

pytestmark = pytest.mark.root


def test_sweep_removes_only_the_scratch_of_dead_runs(state_dir: Path) -> None:
    registry = containers.Registry(state_dir)
    mine = registry.scratch_dir("checkpoint-")
    ns = os.stat("/proc/self/ns/pid").st_ino
    orphan = registry.scratch / f"checkpoint-{ns}.{os.getpid()}.1-abc"  # this PID, another start time: long gone
    other_ns = registry.scratch / f"checkpoint-{ns + 1}.{os.getpid()}.1-abc"
    legacy = registry.scratch / "checkpoint-abcdef"
    pending = registry.scratch / f"migrate-{ns}.{os.getpid()}.1-abc"  # `recover` owns it
    for path in (orphan, other_ns, legacy, pending):
        (path / "images").mkdir(parents=True)

    swept = registry.sweep_scratch("checkpoint-")

    assert swept == [orphan]
    left = sorted(p.name for p in registry.scratch.iterdir())
    assert left == sorted(p.name for p in (mine, other_ns, legacy, pending))
