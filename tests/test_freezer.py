"""Freezing stops a real process and thawing resumes it, through both the v1 and v2 freezer."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kerrickpt import cgroups, postcopy, procs
from kerrickpt import freezer as freezer_module
from kerrickpt.errors import HostError
from kerrickpt.freezer import Freezer, FreezeTimeout, VforkTimeout, frozen
from tests.helpers import ending_vforks, freezer_roots, unique_name, wait_for

pytestmark = pytest.mark.root

MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2
NOBODY = 65534
REFUSED = 13  # the exit code of a child refused with EPERM


def counter_loop(counter: Path) -> str:
    """A shell loop writing a growing number to `counter`, one every 10 ms it gets to run."""
    return f"i=0; while :; do i=$((i+1)); echo $i > {counter}; sleep 0.01; done"


def count(counter: Path) -> int:
    """The number a counter_loop last wrote (0 before its first, or while it rewrites the file)."""
    text = counter.read_text().strip() if counter.exists() else ""
    return int(text) if text else 0


@pytest.fixture(params=freezer_roots(), ids=lambda r: r.name)
def counting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Freezer, Path]]:
    """A shell loop writing a growing number to a file, in a fresh cgroup of one hierarchy."""
    group = cgroups.Cgroup((request.param / unique_name("frz"),))
    group.dirs[0].mkdir()
    counter = tmp_path / "n"
    proc = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; {counter_loop(counter)}"])
    try:
        wait_for(lambda: count(counter) > 1, what="counting")
        yield group.freezer, counter
    finally:
        group.remove()
        proc.wait()


def test_freeze_stops_and_thaw_resumes(counting: tuple[Freezer, Path], tmp_path: Path) -> None:
    freezer, counter = counting
    outside = tmp_path / "outside"
    witness = subprocess.Popen(["sh", "-c", counter_loop(outside)])  # runnable, in no frozen cgroup
    try:
        wait_for(lambda: count(outside) > 0, what="the witness counting")
        freezer.freeze()
        assert freezer.is_frozen()
        held = count(counter)
        # The window is as long as a runnable loop needs for 30 rounds, however loaded the machine.
        start = count(outside)
        wait_for(lambda: count(outside) >= start + 30, timeout=60, what="the witness to count on")
        assert count(counter) == held, "a frozen process ran"
        freezer.thaw()
        wait_for(lambda: count(counter) > held, what="counting again")
    finally:
        witness.kill()
        witness.wait()


@pytest.fixture(params=freezer_roots(), ids=lambda r: r.name)
def group(request: pytest.FixtureRequest) -> Iterator[cgroups.Cgroup]:
    """A fresh cgroup of one hierarchy, its processes killed and the cgroup removed afterwards."""
    made = cgroups.Cgroup((request.param / unique_name("frz"),))
    made.dirs[0].mkdir()
    try:
        yield made
    finally:
        made.remove()


def in_vfork(pid: int) -> bool:
    """Whether the process sleeps in vfork, by its state and kernel stack (not by kcmp, as the freezer tells)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "D" and "vfork" in Path(f"/proc/{pid}/stack").read_text()
    except (FileNotFoundError, ProcessLookupError):  # it ended
        return False


def waiting_for_exec(group: cgroups.Cgroup) -> list[int]:
    """The processes in vfork whose child has not exec'd yet: it still bears its parent's name. (One whose child
    exec'd may still sleep there, frozen before it could run; ptrace stops it once it does.)"""
    found = procs.read_all(group.pids())
    names = {p.host_pid: Path(f"/proc/{p.host_pid}/comm").read_text() for p in found}
    return [
        p.host_pid
        for p in found
        for c in found
        if c.host_ppid == p.host_pid and names[c.host_pid] == names[p.host_pid] and in_vfork(p.host_pid)
    ]


def test_a_shell_running_commands_is_frozen_with_none_of_its_tasks_in_vfork(group: cgroups.Cgroup) -> None:
    """dash vforks each command; a freeze that caught one would leave a task CRIU cannot seize."""
    shell = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; while :; do /bin/true; done"])
    try:
        for _ in range(50):
            # Running commands again, so that this freeze may catch one in vfork: a vfork lasts microseconds, so one
            # is looked for a while, not required (a loaded machine may show none in a sample every 20 ms).
            with contextlib.suppress(AssertionError):
                wait_for(lambda: any(in_vfork(pid) for pid in group.pids()), timeout=1, what="a vfork")
            group.freezer.freeze_for_ptrace()
            assert waiting_for_exec(group) == [], "frozen mid-vfork"
            group.freezer.thaw()
    finally:
        group.kill()
        shell.wait()


def test_a_vfork_that_never_ends_fails_the_freeze_naming_its_task_and_thaws(
    group: cgroups.Cgroup, stuck_vfork: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(freezer_module, "VFORK_WAIT", 0.05)
    parent = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; exec {stuck_vfork}"])
    try:
        wait_for(lambda: in_vfork(parent.pid), what="the vfork")

        with pytest.raises(VforkTimeout, match=f"process {parent.pid} .*waits in vfork") as failure:
            group.freezer.freeze_for_ptrace(attempts=3)

        assert "at each of 3 freezes" in str(failure.value)
        assert not group.freezer.is_frozen(), "thawed again"
    finally:
        group.kill()
        parent.wait()


def test_a_vfork_waited_out_counts_in_no_frozen_time(
    group: cgroups.Cgroup, stuck_vfork: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The freeze that caught a vfork was undone: the time frozen counts from the next one, which held."""
    parent = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; exec {stuck_vfork}"])
    waited = ending_vforks(monkeypatch)
    try:
        wait_for(lambda: in_vfork(parent.pid), what="the vfork")

        with frozen(group.freezer) as frozen_at:
            assert group.freezer.is_frozen()

        assert len(waited) == 1, "a first freeze caught the vfork"
        assert frozen_at > waited[0], "frozen from before the vfork was waited out"
    finally:
        group.kill()
        parent.wait()


def test_a_child_sharing_its_parents_memory_without_vfork_is_frozen_at_once(
    group: cgroups.Cgroup, stuck_vfork: Path
) -> None:
    """clone(CLONE_VM) without CLONE_VFORK: the parent runs on, ptrace can seize both, and there is nothing to wait
    out (it would never end)."""
    parent = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; exec {stuck_vfork} clone"])
    try:
        wait_for(lambda: len(group.pids()) == 2, what="the child")

        group.freezer.freeze_for_ptrace(attempts=1)

        assert group.freezer.is_frozen()
    finally:
        group.kill()
        parent.wait()


def test_a_freeze_whose_look_for_vforks_fails_is_thawed(group: cgroups.Cgroup, stuck_vfork: Path) -> None:
    """A caller the cgroup was delegated to, freezing processes of another user's: kcmp refuses it (EPERM) once they
    are frozen. They must not stay so."""
    control, _ = group.freezer.control(frozen=True)
    os.chown(control, NOBODY, NOBODY)
    parent = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; exec {stuck_vfork}"])
    try:
        wait_for(lambda: in_vfork(parent.pid), what="the vfork")
        caller = os.fork()
        if caller == 0:  # reports by its exit code alone
            code = 1
            try:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                group.freezer.freeze_for_ptrace()
            except HostError as exc:
                code = REFUSED if "kcmp failed: Operation not permitted" in exc.message else 2
            finally:
                os._exit(code)

        _, status = os.waitpid(caller, 0)

        assert os.waitstatus_to_exitcode(status) == REFUSED, "kcmp refused the unprivileged caller"
        assert not group.freezer.is_frozen(), "thawed again"
    finally:
        group.kill()
        parent.wait()


def test_frozen_block_thaws_on_failure(counting: tuple[Freezer, Path]) -> None:
    freezer, _ = counting
    with pytest.raises(RuntimeError), frozen(freezer):
        assert freezer.is_frozen()
        raise RuntimeError("dump failed")
    assert not freezer.is_frozen()


@contextlib.contextmanager
def stuck_in_the_kernel(where: Path) -> Iterator[Callable[[], None]]:
    """A FUSE mount at `where` whose server never answers: a task that looks into it sleeps
    uninterruptibly, which no freezer can stop. The callable releases it (the connection ends)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fuse},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"kerrickpt-test", str(where).encode(), b"fuse", MS_NOSUID | MS_NODEV, options) != 0:
        os.close(fuse)
        pytest.skip(f"cannot mount FUSE: {os.strerror(ctypes.get_errno())}")
    released: list[bool] = []

    def release() -> None:
        if not released:
            released.append(True)
            os.close(fuse)  # every request waiting on it fails with ECONNABORTED

    try:
        yield release
    finally:
        release()
        libc.umount2(str(where).encode(), MNT_DETACH)


@pytest.mark.skipif(cgroups.detect().unified is None, reason="needs cgroup v2")
def test_post_copy_source_whose_freeze_cannot_complete_never_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Post-copy: the source's CRIU will not exit and the tree cannot all freeze; the target may run it."""
    unified = cgroups.detect().unified
    assert unified is not None
    group = cgroups.Cgroup((unified / unique_name("frz"),))
    group.dirs[0].mkdir()
    mount, counter = tmp_path / "fuse", tmp_path / "n"
    mount.mkdir()
    join = f"echo 0 > {group.dirs[0]}/cgroup.procs"
    loop = f"{join}; {counter_loop(counter)}"
    page_server = subprocess.Popen(["sleep", "600"])  # stands in for a CRIU that will not exit
    monkeypatch.setattr(freezer_module, "FREEZE_TIMEOUT", 1.0)
    jobs: list[subprocess.Popen[bytes]] = []
    try:
        with stuck_in_the_kernel(mount) as release:
            jobs.append(subprocess.Popen(["sh", "-c", loop]))
            jobs.append(subprocess.Popen(["sh", "-c", f"{join}; exec stat {mount}/x"], stderr=subprocess.DEVNULL))
            wait_for(lambda: count(counter) > 1, what="counting")
            wait_for(lambda: Path(f"/proc/{jobs[1].pid}/stat").read_text().split()[2] == "D", what="stuck")

            with pytest.raises(FreezeTimeout, match="stays requested"):
                postcopy.let_go(page_server, group.freezer, grace=0.1)

            assert page_server.poll() is not None, "CRIU was killed all the same"
            held = counter.read_text()
            release()  # the stuck task leaves the kernel, and stops there
            wait_for(group.freezer.is_frozen, what="the freeze to complete")
            assert counter.read_text() == held, "the source never ran again"
    finally:
        page_server.kill()
        page_server.wait()
        group.remove()
        for job in jobs:
            job.wait()
