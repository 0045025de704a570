"""The guardian thaws a container whose checkpointing process died, but only once CRIU is done with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kerrickpt import cgroups, containers
from kerrickpt.freezer import Freezer
from kerrickpt.guard import Guardian
from tests.helpers import Workload, guardians, ticks, unique_name, wait_for, waits_in

pytestmark = pytest.mark.root

DIES_FROZEN = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    from pathlib import Path
    from kerrickpt.freezer import Freezer
    from kerrickpt.guard import Guardian
    freezer = Freezer(Path(sys.argv[1]))
    Guardian(freezer)
    if sys.argv[2] == "spawn":  # stands in for CRIU, which inherits the guardian's pipe
        print(subprocess.Popen(["sleep", "60"], close_fds=False, stdout=subprocess.DEVNULL).pid, flush=True)
    else:
        print(0, flush=True)
    freezer.freeze()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def freezer_of(w: Workload) -> Freezer:
    return containers.Registry(w.state_dir).get(w.name).group.freezer


def die_frozen(freezer: Freezer, spawn: bool) -> int:
    """A process that arms a guardian, freezes the container and is killed; returns its child's PID."""
    argv = [sys.executable, "-c", DIES_FROZEN, str(freezer.path), "spawn" if spawn else "-"]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=30, check=False)
    assert proc.returncode == -signal.SIGKILL
    return int(proc.stdout)


def test_a_killed_process_leaves_its_container_thawed(start_workload) -> None:
    w = start_workload()
    freezer = freezer_of(w)
    die_frozen(freezer, spawn=False)
    wait_for(lambda: not freezer.is_frozen(), what="the guardian to thaw the container")
    w.wait_ticking(beyond=max(ticks(w.log)))


def test_the_guardian_waits_for_a_child_that_inherited_its_pipe(start_workload) -> None:
    w = start_workload()
    freezer = freezer_of(w)
    child = die_frozen(freezer, spawn=True)
    try:
        # The process that armed it is dead: only the child's end of the pipe keeps the guardian reading.
        (guardian,) = guardians(freezer)
        wait_for(lambda: waits_in(guardian, "pipe_read"), what="the guardian to wait on its pipe")
        assert freezer.is_frozen(), "CRIU may still be dumping: the container must stay frozen until it is done"
    finally:
        os.kill(child, signal.SIGKILL)
    wait_for(lambda: not freezer.is_frozen(), what="the guardian to thaw the container")


def test_a_disarmed_guardian_leaves_the_container_as_it_is(start_workload) -> None:
    w = start_workload()
    freezer = freezer_of(w)
    try:
        with Guardian(freezer) as guardian:
            freezer.freeze()
        assert guardian.process.returncode == 0, "it ended: nothing is left to thaw"
        assert freezer.is_frozen()
    finally:
        freezer.thaw()


def test_a_failure_in_the_block_leaves_the_thaw_to_the_guardian(start_workload) -> None:
    w = start_workload()
    freezer = freezer_of(w)
    with pytest.raises(RuntimeError), Guardian(freezer) as guardian:
        freezer.freeze()
        raise RuntimeError("as when a signal cuts the dump short")
    assert guardian.process.returncode == 0 and not freezer.is_frozen()


def test_the_guardian_of_a_removed_cgroup_has_nothing_to_do() -> None:
    layout = cgroups.detect()
    path = (layout.unified or layout.freezer or Path("/nonexistent")) / unique_name("gone")
    path.mkdir()
    try:
        guardian = Guardian(Freezer(path))
    finally:
        path.rmdir()
    os.close(guardian.writer)  # as if this process had died
    assert guardian.process.wait(timeout=30) == 0
