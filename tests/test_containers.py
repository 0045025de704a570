"""The state directory: names, records, and what a run that died half-way leaves behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kerrickpt import cgroups, containers
from kerrickpt.errors import ContainerExistsError, UsageError
from tests.helpers import unique_name, wait_for

pytestmark = pytest.mark.root


def test_names_are_checked_and_claimed_once(state_dir: Path) -> None:
    registry = containers.Registry(state_dir)
    for bad in ("", "../x", "a/b", "-x", "x" * 64):
        with pytest.raises(UsageError):
            registry.reserve(bad)
    name = unique_name()
    registry.reserve(name)
    with pytest.raises(ContainerExistsError):
        registry.reserve(name)
    assert (state_dir / "containers").stat().st_mode & 0o777 == 0o700


def test_a_run_that_died_before_registering_is_swept(state_dir: Path) -> None:
    registry = containers.Registry(state_dir)
    name = unique_name("half")
    registry.reserve(name)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (registry.path(name) / containers.OWNER).write_text(json.dumps({"pid": dead.pid, "start": 1}))
    group = cgroups.create(cgroups.detect(), name)
    orphan = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; exec sleep 600"])
    try:
        wait_for(lambda: group.pids() == [orphan.pid], what="the half-restored process in its cgroup")

        containers.Registry(state_dir)  # any later command sweeps

        assert orphan.wait(timeout=10) == -9
        assert not registry.path(name).exists()
        assert not any(d.exists() for d in group.dirs)
    finally:
        orphan.kill()
        orphan.wait()
        group.remove()
