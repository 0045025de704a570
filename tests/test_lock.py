"""The lock between runs: a second run waits or gives up naming the holder; a dead run's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kerrickpt.errors import BusyError
from kerrickpt.lock import held

HOLDER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from kerrickpt.lock import held
    with held(Path(sys.argv[1]), wait=0, what="the test lock"):
        if sys.argv[3] == "spawn":  # like CRIU, a child inherits the lock
            print(subprocess.Popen(["sleep", "60"], close_fds=False).pid, flush=True)
        else:
            print(0, flush=True)
        time.sleep(float(sys.argv[2]))
        Path(sys.argv[1] + ".letting-go").touch()
    """
)

Start = Callable[..., tuple[subprocess.Popen[str], int]]


@pytest.fixture
def start_holder(tmp_path: Path) -> Iterator[Start]:
    """Runs that take the lock in another process; whatever they started is killed afterwards."""
    started: list[int] = []

    def start(seconds: float = 60, spawn: bool = False) -> tuple[subprocess.Popen[str], int]:
        argv = [sys.executable, "-c", HOLDER, str(tmp_path / "lock"), str(seconds), "spawn" if spawn else "-"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        started.append(proc.pid)
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        if child:
            started.append(child)
        return proc, child

    yield start
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            continue


def test_a_second_run_gives_up_after_wait_naming_the_holder(start_holder: Start, tmp_path: Path) -> None:
    holder, _ = start_holder()
    began = time.monotonic()
    with pytest.raises(BusyError) as refused, held(tmp_path / "lock", wait=0.3, what="the test lock"):
        pytest.fail("the lock was held by another process")
    assert time.monotonic() - began >= 0.3
    assert refused.value.exit_code == 13
    assert f"another kerrickpt (pid {holder.pid} on " in str(refused.value)
    assert "is working on the test lock; gave up after 0.3 s" in str(refused.value)


def test_a_waiting_run_goes_on_once_the_holder_lets_go(start_holder: Start, tmp_path: Path) -> None:
    holder, _ = start_holder(seconds=0.5)
    with held(tmp_path / "lock", wait=30, what="the test lock") as took_over:
        assert (tmp_path / "lock.letting-go").exists(), "the lock came free only when the holder let go"
    assert took_over is None, "a holder that let go cleanly leaves no record behind"
    assert holder.wait() == 0


def test_the_lock_of_a_killed_run_is_taken_over(start_holder: Start, tmp_path: Path) -> None:
    holder, _ = start_holder()
    holder.kill()
    holder.wait()
    with held(tmp_path / "lock", wait=0, what="the test lock") as took_over:
        assert took_over is not None and took_over.pid == holder.pid
        assert not took_over.is_running()
    with held(tmp_path / "lock", wait=0, what="the test lock") as again:
        assert again is None


def test_a_process_started_by_a_dead_run_keeps_its_lock(start_holder: Start, tmp_path: Path) -> None:
    holder, child = start_holder(spawn=True)
    holder.kill()
    holder.wait()
    with pytest.raises(BusyError, match="that run has ended"), held(tmp_path / "lock", wait=0.2, what="it"):
        pytest.fail("the dead run's child still holds the lock")
    os.kill(child, signal.SIGKILL)  # not our child: held() waits until it is gone
    with held(tmp_path / "lock", wait=5, what="the test lock") as took_over:
        assert took_over is not None and took_over.pid == holder.pid
