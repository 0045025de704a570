"""Checkpoint failures leave the container thawed and running and no archive behind; foreign cgroups work."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import cgroups, containers, criu, procs
from kerrickpt.checkpoint import DUMP_TURN
from kerrickpt.errors import KerrickptError
from tests.helpers import (
    KERRICKPT,
    assert_consecutive,
    cli,
    cli_env,
    ending_vforks,
    freezer_roots,
    ipc_keys,
    probe,
    ticks,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.root

COUNTER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    i = 0
    while True:
        i += 1
        print(f"tick {i} pid 1", flush=True)
        time.sleep(0.05)
    """
)


def test_dump_refused_by_criu_leaves_container_running(state_dir: Path, tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "outside.sock"))
    listener.listen(1)
    listener.settimeout(30)
    name = unique_name("sock")
    kerrickpt.run(name, [sys.executable, "-c", COUNTER, str(tmp_path / "outside.sock")], state_dir=state_dir)
    peer, _ = listener.accept()
    log = Path(kerrickpt.ps(state_dir)[0].log or "")
    wait_for(lambda: ticks(log.read_text()), what="ticks")
    archive = tmp_path / "never.kckpt"
    try:
        with pytest.raises(kerrickpt.DumpFailed) as failure:
            kerrickpt.checkpoint(name, archive, state_dir=state_dir)
    finally:
        peer.close()
        listener.close()

    assert "criu dump" in str(failure.value)
    assert failure.value.log_tail, "the error shows the tail of CRIU's log"
    assert failure.value.exit_code == 5
    assert not archive.exists()
    assert [p.name for p in tmp_path.iterdir() if "never" in p.name] == [], "no partial file either"
    assert kerrickpt.ps(state_dir)[0].state == "running"
    seen = max(ticks(log.read_text()))
    wait_for(lambda: max(ticks(log.read_text())) > seen + 2, what="the container to keep counting")


def test_unknown_container_and_existing_output_are_refused(start_workload, state_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(kerrickpt.ContainerNotFoundError):
        kerrickpt.checkpoint("no-such-container", tmp_path / "x.kckpt", state_dir=state_dir)
    w = start_workload()
    existing = tmp_path / "exists.kckpt"
    existing.write_text("precious")
    with pytest.raises(kerrickpt.UsageError):
        kerrickpt.checkpoint(w.name, existing, state_dir=state_dir)
    assert existing.read_text() == "precious"
    assert w.status.state == "running"


@pytest.fixture(params=freezer_roots(), ids=lambda r: r.name)
def foreign_tree(request: pytest.FixtureRequest, workload: Path) -> Iterator[tuple[Path, tuple[int, int, int]]]:
    """A tree kerrickpt did not start: its own PID/IPC/UTS namespaces, in a cgroup the test made."""
    path = request.param / unique_name("foreign")
    path.mkdir()
    keys = ipc_keys()
    script = f"echo 0 > {path}/cgroup.procs && exec setsid {workload} run {' '.join(map(str, keys))}"
    outside = subprocess.Popen(
        ["unshare", "--pid", "--ipc", "--uts", "--fork", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(cgroups.Cgroup((path,)).pids()) == 3, what="the foreign tree")
        yield path, keys
    finally:
        cgroups.Cgroup((path,)).remove()
        outside.kill()
        outside.wait()


def test_checkpoint_of_a_foreign_cgroup_restores_as_a_container(
    foreign_tree: tuple[Path, tuple[int, int, int]], workload: Path, state_dir: Path, tmp_path: Path
) -> None:
    path, keys = foreign_tree
    init = min(cgroups.Cgroup((path,)).pids())
    # A few ticks in, so that a counter restarted from zero would show.
    wait_for(lambda: int(probe(workload, init, keys)["counter"]) >= 3, what="counting")  # type: ignore[call-overload]
    before = probe(workload, init, keys)
    archive = tmp_path / "foreign.kckpt"

    result = kerrickpt.checkpoint(None, archive, cgroup=path, state_dir=state_dir)

    assert result.name == path.name
    assert cgroups.Cgroup((path,)).pids() == [], "the source tree was ended"
    restored = kerrickpt.restore(archive, state_dir=state_dir)
    assert sorted(restored.pid_map) == [1, 2, 3]
    after = probe(workload, restored.init_pid, keys)
    assert after["messages"] == before["messages"] and after["sems"] == before["sems"]
    assert after["data_sha"] == before["data_sha"]
    resumed = int(after["counter"])  # type: ignore[call-overload]
    assert resumed >= int(before["counter"]), "the counter was reset"  # type: ignore[call-overload]
    wait_for(
        lambda: int(probe(workload, restored.init_pid, keys)["counter"]) > resumed,  # type: ignore[call-overload]
        what="the restored counter to count on",
    )


def test_checkpoint_killed_once_its_archive_is_in_place_leaves_it_and_the_container_frozen(
    state_dir: Path, tmp_path: Path, start_workload
) -> None:
    job = start_workload()
    archive = tmp_path / "job.kckpt"

    # Killed after the archive was linked, before the guardian was told all went well.
    killed = cli("checkpoint", job.name, "-o", str(archive), state_dir=state_dir,
                 KERRICKPT_FAULT="checkpoint-archive-linked:kill")  # fmt: skip

    # run() returns once the guardian, which shares the pipes, is gone too: it has decided.
    assert killed.returncode == -signal.SIGKILL
    assert job.status.state == "frozen", "its state is in the archive: it must not run on unasked"
    assert "stays frozen" in killed.stderr
    assert kerrickpt.inspect(archive).manifest.name == job.name
    assert cli("recover", job.name, state_dir=state_dir).returncode == 0
    seen = max(ticks(job.log))
    wait_for(lambda: max(ticks(job.log)) > seen + 2, what="the container to count again")


def test_checkpoint_whose_container_cannot_be_removed_says_what_is_left(
    state_dir: Path, tmp_path: Path, start_workload, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = start_workload()
    first = Path(job.status.cgroup[0])
    pinned = first / "pinned"  # a cgroup with a child cannot be removed
    pinned.mkdir()
    monkeypatch.setattr(cgroups, "EMPTY_TIMEOUT", 1.0)
    archive = tmp_path / "job.kckpt"
    try:
        with pytest.raises(kerrickpt.SourceNotEnded) as failure:
            kerrickpt.checkpoint(job.name, archive, state_dir=state_dir)
    finally:
        pinned.rmdir()

    assert failure.value.exit_code == 18
    message = str(failure.value)
    assert f"the archive {archive} is complete" in message
    assert str(first) in message and f"kerrickpt kill {job.name}" in message
    assert cgroups.Cgroup(tuple(Path(p) for p in job.status.cgroup)).pids() == [], "the processes are gone"
    assert kerrickpt.inspect(archive).manifest.name == job.name
    kerrickpt.kill(job.name, state_dir=state_dir)
    assert kerrickpt.ps(state_dir) == []
    assert not first.exists()


# A counter with 512 MiB of memory that zstd's window finds nothing to squeeze in: CRIU takes a while.
BIG_COUNTER = textwrap.dedent(
    """
    import os, time
    heap = bytearray(os.urandom(1 << 20)) * 512
    i = 0
    while True:
        i += 1
        print(f"tick {i} pid 1", flush=True)
        time.sleep(0.05)
    """
)


def _hang_criu_mid_dump(dumping: Callable[[], bool]) -> None:
    """Stop (SIGSTOP) the CRIU this process started once it is `dumping`: a CRIU stuck while it dumps
    memory, its parasite inside the processes."""
    me = os.getpid()

    def criu() -> int | None:
        for child in Path(f"/proc/{me}/task/{me}/children").read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "criu":
                    return int(child)
        return None

    # Looked for only then: `criu --version` (criu.locate) is a short-lived child called criu too.
    wait_for(dumping, timeout=60, what="memory being dumped")
    pid = wait_for(criu, timeout=60, what="the dumping CRIU")
    os.kill(int(pid), signal.SIGSTOP)  # type: ignore[call-overload]


@pytest.mark.parametrize("leave_running", [True, False], ids=["into-reserve", "into-archive"])
def test_criu_stopped_at_its_time_limit_mid_dump_leaves_the_container_frozen_as_damaged(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leave_running: bool
) -> None:
    name = unique_name("big")
    kerrickpt.run(name, [sys.executable, "-c", BIG_COUNTER], state_dir=state_dir)
    log = Path(kerrickpt.ps(state_dir)[0].log or "")
    wait_for(lambda: ticks(log.read_text()), timeout=60, what="ticks")
    # A dump goes at its images' reader's pace, and this is how long it may send nothing. Cut off, it gets
    # as long to let go, then SIGTERM, a second, SIGKILL.
    monkeypatch.setenv("KERRICKPT_DUMP_TIMEOUT", "1")
    monkeypatch.setenv("KERRICKPT_CRIU_LET_GO", "0.5")
    monkeypatch.setenv("KERRICKPT_STOP_GRACE", "1")
    archive = tmp_path / "never.kckpt"
    init = kerrickpt.ps(state_dir)[0].init_pid
    if leave_running:  # written into space taken before the freeze, which hides how far CRIU got: its code is in
        dumping = lambda: criu.PARASITE_MAP in Path(f"/proc/{init}/maps").read_text()  # noqa: E731
    else:  # the archive's hidden partial file grows as CRIU streams
        dumping = lambda: sum(p.stat().st_size for p in tmp_path.glob(".*partial*")) > 8 << 20  # noqa: E731
    threading.Thread(target=_hang_criu_mid_dump, args=(dumping,), daemon=True).start()

    with pytest.raises(kerrickpt.ContainerDamaged) as failure:
        kerrickpt.checkpoint(name, archive, state_dir=state_dir, leave_running=leave_running)

    assert failure.value.exit_code == 17
    assert "left frozen" in str(failure.value) and f"kerrickpt kill {name}" in str(failure.value)
    assert not list(tmp_path.glob("*never*")), "no archive, no partial file"
    assert kerrickpt.ps(state_dir)[0].state == "frozen"
    seen = ticks(log.read_text())
    time.sleep(1.0)  # 20 ticks' time: the counter must not move
    assert ticks(log.read_text()) == seen, "the damaged processes ran"


def test_a_dump_waits_its_turn_on_the_node_before_it_freezes(state_dir: Path, tmp_path: Path) -> None:
    """Two dumps at once of tasks in one working directory fail in CRIU's parasite: a dump waits for the one
    running on the node, and its container runs on meanwhile, unfrozen."""
    name = unique_name("turn")
    ticking = "import time\nfor i in range(1, 10**6):\n    print(f'tick {i} pid 1', flush=True)\n    time.sleep(0.02)"
    kerrickpt.run(name, [sys.executable, "-c", ticking], state_dir=state_dir)
    log = Path(kerrickpt.ps(state_dir)[0].log or "")
    wait_for(lambda: ticks(log.read_text()), what="ticks")
    archive = tmp_path / "later.kckpt"
    fd = os.open(DUMP_TURN, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another dump holds the node's turn
        waiting = subprocess.Popen(
            [*KERRICKPT, "checkpoint", name, "-o", str(archive), "--leave-running"], env=cli_env(state_dir)
        )
        try:
            before = len(ticks(log.read_text()))
            # 3 s of ticks: time enough for a dump that did not wait to be done
            wait_for(lambda: len(ticks(log.read_text())) > before + 150, what="ticks while the dump waits")
            assert waiting.poll() is None and not archive.exists()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        assert waiting.wait(timeout=120) == 0
    finally:
        os.close(fd)
        kerrickpt.kill(name, state_dir=state_dir)
    assert archive.exists()


def test_a_shell_running_commands_is_checkpointed_and_restored_again_and_again(state_dir: Path, tmp_path: Path) -> None:
    """dash vforks each command it runs: a freeze often finds one in vfork, which CRIU could not seize (its
    parent sleeps uninterruptibly until the child execs). Checkpointed and restored 20 times, the shell counts on."""
    counted = tmp_path / "counted"
    name = unique_name("vfork")
    loop = f"(while :; do /bin/true; done) & i=0; while :; do i=$((i+1)); /bin/true; echo $i >> {counted}; done"
    kerrickpt.run(name, ["/bin/sh", "-c", loop], state_dir=state_dir)

    def numbers() -> list[int]:
        return [int(n) for n in counted.read_text().split()] if counted.exists() else []

    def counting_on(what: str) -> None:
        floor = len(numbers()) + 10
        wait_for(lambda: len(numbers()) > floor, what=what)

    counting_on("the shell to count")
    for round_ in range(20):
        archive = tmp_path / f"{round_}.kckpt"
        kerrickpt.checkpoint(name, archive, state_dir=state_dir)
        kerrickpt.restore(archive, state_dir=state_dir)
        archive.unlink()
        counting_on("the restored shell to count on")
    kerrickpt.kill(name, state_dir=state_dir)
    assert_consecutive(numbers())


def test_the_frozen_time_reported_leaves_out_a_freeze_undone_for_a_vfork(
    state_dir: Path, tmp_path: Path, stuck_vfork: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first freeze caught the container mid-vfork and was undone: the time frozen counts from the next freeze,
    which held once the vfork was waited out (ended here, as it was, by killing its child)."""
    name = unique_name("vfork")
    kerrickpt.run(name, [str(stuck_vfork)], state_dir=state_dir)
    waited = ending_vforks(monkeypatch)
    try:
        group = containers.Registry(state_dir).get(name).group
        wait_for(lambda: any(procs.state(pid) == "D" for pid in group.pids()), what="the vfork")

        result = kerrickpt.checkpoint(name, tmp_path / "a.kckpt", state_dir=state_dir)
        after = time.monotonic()

        assert len(waited) == 1, "the first freeze caught the vfork"
        assert result.manifest.timings["frozen_s"] <= round(after - waited[0], 4)
    finally:
        with contextlib.suppress(KerrickptError):
            kerrickpt.kill(name, state_dir=state_dir)
