"""Checkpoint and restore of real containers with real CRIU: the state a user sees comes back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import zstandard

import kerrickpt
from bench.lab import READY, verify, wait_for_line
from kerrickpt import cgroups, feeder, procs
from tests.helpers import (
    KERRICKPT,
    archived_log,
    assert_consecutive,
    cgroup_dirs,
    checkpointed_side_writer,
    cli,
    cli_env,
    finished,
    ticks,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.root


def test_checkpoint_stops_and_restore_continues_exactly(start_workload, state_dir: Path, tmp_path: Path) -> None:
    w = start_workload()
    before = w.probe()
    pids_before = w.pid_map()
    assert sorted(pids_before) == [1, 2, 3]
    started = {pid: procs.start_time(pid) for pid in pids_before.values()}
    archive = tmp_path / "w.kckpt"

    result = kerrickpt.checkpoint(w.name, archive, state_dir=state_dir)

    assert result.archive == archive and archive.stat().st_mode & 0o777 == 0o600
    assert not result.left_running
    assert kerrickpt.ps(state_dir) == []
    assert cgroup_dirs(w.name) == []
    for host_pid in pids_before.values():
        # Gone, a zombie, or the number reused by another process on this busy machine.
        assert procs.start_time(host_pid) != started[host_pid]
    last_archived = max(ticks(archived_log(archive)))

    restored = kerrickpt.restore(archive, state_dir=state_dir)

    assert restored.name == w.name
    assert sorted(restored.pid_map) == [1, 2, 3], "every in-container PID comes back"
    assert restored.pid_map[1] == restored.init_pid
    assert w.pid_map() == restored.pid_map
    assert len(os.listdir(f"/proc/{restored.pid_map[3]}/task")) == 2, "the threaded child has both threads"
    w.wait_ticking(beyond=last_archived)
    after = w.probe()
    assert after["data_sha"] == before["data_sha"], "shared memory holds the same bytes"
    assert after["messages"] == before["messages"] == [[1, "alpha"], [2, "bravo"], [7, "charlie"]]
    assert after["sems"] == before["sems"] == [7, 11, 13]
    assert after["shm_id"] == before["shm_id"] and after["msg_id"] == before["msg_id"]
    numbers = ticks(w.log)
    assert_consecutive(numbers)
    assert numbers[0] == 1 and numbers[-1] > last_archived, "the counter continued, not restarted"
    assert int(after["counter"]) > last_archived  # type: ignore[call-overload]


def test_leave_running_archive_restores_a_second_copy(start_workload, state_dir: Path, tmp_path: Path) -> None:
    original = start_workload()
    archive = tmp_path / "copy.kckpt"

    result = kerrickpt.checkpoint(original.name, archive, leave_running=True, state_dir=state_dir)

    assert result.left_running
    assert result.manifest.timings["frozen_s"] > 0
    assert kerrickpt.inspect(archive).manifest.compression == {"level": kerrickpt.CHECKPOINT_LEVEL}
    last = max(ticks(original.log))
    original.wait_ticking(beyond=last)  # the original keeps counting
    copy_name = unique_name("copy")
    restored = kerrickpt.restore(archive, name=copy_name, state_dir=state_dir)

    states = {r.name: r.state for r in kerrickpt.ps(state_dir)}
    assert states == {original.name: "running", copy_name: "running"}
    copy = type(original)(copy_name, original.keys, state_dir, original.binary)
    assert sorted(copy.pid_map()) == sorted(original.pid_map()) == [1, 2, 3]
    assert set(copy.pid_map().values()).isdisjoint(original.pid_map().values())
    ns = {os.readlink(f"/proc/{c.status.init_pid}/ns/ipc") for c in (original, copy)}
    assert len(ns) == 2, "each copy has its own IPC namespace"
    probes = [c.probe() for c in (original, copy)]
    assert probes[0]["messages"] == probes[1]["messages"]
    assert probes[0]["data_sha"] == probes[1]["data_sha"]
    copy.wait_ticking(beyond=max(ticks(archived_log(archive))))
    assert_consecutive(ticks(copy.log))
    assert restored.pid_map == copy.pid_map()


@pytest.mark.parametrize("damage", ["flip", "unseen-flip", "truncate", "end-cut", "index-flip", "index-cut"])
def test_corrupt_archive_is_refused_before_any_restored_process_runs(
    start_workload, state_dir: Path, tmp_path: Path, damage: str
) -> None:
    w = start_workload()
    good = tmp_path / "good.kckpt"
    kerrickpt.checkpoint(w.name, good, leave_running=True, state_dir=state_dir)
    data = bytearray(good.read_bytes())
    index_at = len(data) - int.from_bytes(data[-16:-8], "little")  # see archiveindex.INDEX_MAGIC
    if damage == "flip":  # in the memory, which CRIU is restoring when it shows
        _flip_a_bit(data, 0, index_at, index_at // 2, seen=True)
    elif damage == "unseen-flip":  # one zstd decodes to the same bytes: the frame's digest, at its end, sees it
        _flip_a_bit(data, 0, index_at, index_at // 2, seen=False)
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "end-cut":
        data = data[: len(data) - 200]
    elif damage == "index-flip":
        # The index's zstd frame lies between its skippable frame's head and its foot (see archiveindex.pack).
        _flip_a_bit(data, index_at + 8, len(data) - 48, (index_at + len(data)) // 2, seen=True)
    else:
        data = data[:index_at]
    bad = tmp_path / "bad.kckpt"
    bad.write_bytes(bytes(data))
    workload_processes = _count_processes(str(w.binary))

    with pytest.raises(kerrickpt.ArchiveCorruptError):
        kerrickpt.restore(bad, name=unique_name("bad"), state_dir=state_dir)

    assert _count_processes(str(w.binary)) == workload_processes
    assert [r.name for r in kerrickpt.ps(state_dir)] == [w.name]


def _flip_a_bit(data: bytearray, begin: int, end: int, start: int, *, seen: bool) -> None:
    """Flip the first lowest bit from `start` on (then from `begin` on) whose flip changes what the zstd frame
    data[begin:end] holds (`seen`), or leaves it as it was.

    zstd's decoder does not depend on a few bits of its encoding (66 bytes' lowest bit in a 32 KB frame
    of this test's archive): a flip there leaves every byte the frame holds, and so every checksum, as it
    was; only the digest of the frame's own bytes catches it.
    """
    frame = bytes(data[begin:end])
    held = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
    for at in [*range(start, end), *range(begin, start)]:
        damaged = bytearray(frame)
        damaged[at - begin] ^= 0x01
        try:
            same = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(damaged)) == held
        except zstandard.ZstdError:  # zstd itself sees the damage
            same = False
        if same != seen:
            data[at] ^= 0x01
            return
    raise AssertionError(f"no bit of data[{begin}:{end}] has a flip zstd {'sees' if seen else 'does not see'}")


def _count_processes(exe: str) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                count += (entry / "cmdline").read_bytes().split(b"\0")[0] == exe.encode()
            except OSError:
                continue
    return count


def test_restore_under_a_taken_name_is_refused(start_workload, state_dir: Path, tmp_path: Path) -> None:
    w = start_workload()
    archive = tmp_path / "w.kckpt"
    kerrickpt.checkpoint(w.name, archive, leave_running=True, state_dir=state_dir)
    with pytest.raises(kerrickpt.ContainerExistsError):
        kerrickpt.restore(archive, state_dir=state_dir)
    assert w.status.state == "running"


@pytest.mark.parametrize("leave_running", [False, True], ids=["streamed-dump", "rpc-dump"])
def test_memory_many_times_the_restore_buffers_comes_back_intact(
    memload: Path, state_dir: Path, tmp_path: Path, leave_running: bool
) -> None:
    # The restore streams the memory into CRIU as the archive is read: more than feeder.MEMORY
    # makes the archive wait for CRIU, and the archive is checked whole before the job runs.
    mib = 4 * feeder.MEMORY >> 20
    name = unique_name("mem")
    kerrickpt.run(name, [str(memload), str(mib), "mixed"], state_dir=state_dir)
    log = state_dir / "containers" / name / "log"
    expected = wait_for_line(log, READY, 0, 60).group(1)
    archive = tmp_path / "mem.kckpt"
    kerrickpt.checkpoint(name, archive, leave_running=leave_running, state_dir=state_dir)
    copy = unique_name("mem")

    restored = kerrickpt.restore(archive, name=copy, state_dir=state_dir)

    assert verify(state_dir / "containers" / copy / "log", restored.init_pid, expected, mib)
    assert READY.search((state_dir / "containers" / copy / "log").read_text()), "the archived log came back"


@pytest.mark.parametrize("buffers", ["default", "tiny"])
def test_a_tree_whose_processes_want_their_memory_in_another_order_comes_back_intact(
    memload: Path, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffers: str
) -> None:
    # The dump writes the children's memory one after the other; CRIU's restore asks for all of it at
    # once. Tiny buffers make most of it wait on disk (a spill file) before CRIU reads it.
    if buffers == "tiny":
        monkeypatch.setattr(feeder, "MEMORY", 1 << 20)
        monkeypatch.setattr(feeder, "STALL", 0.001)
    sizes = (24, 40)
    name = unique_name("tree")
    script = " & ".join(f"{memload} {mib} mixed" for mib in sizes) + " & wait"
    kerrickpt.run(name, ["/bin/sh", "-c", script], state_dir=state_dir)
    log = state_dir / "containers" / name / "log"
    wait_for(lambda: len(READY.findall(log.read_text())) == len(sizes), timeout=60, what="both to fill")
    expected = dict(re.findall(r"^ready mib=(\d+) kind=\w+ sum=([0-9a-f]+)$", log.read_text(), re.M))
    archive = tmp_path / "tree.kckpt"
    kerrickpt.checkpoint(name, archive, state_dir=state_dir)
    copy = unique_name("tree")

    restored = kerrickpt.restore(archive, name=copy, state_dir=state_dir)

    assert len(restored.pid_map) == 1 + len(sizes)
    for pid in (host for ns, host in restored.pid_map.items() if ns != 1):  # the shell's children
        mib = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode()
        assert verify(state_dir / "containers" / copy / "log", pid, expected[mib], int(mib)), f"memory of {mib} MiB"


@pytest.mark.parametrize(("action", "code"), [("fail", 8), ("kill", -9)])
def test_a_restore_that_ends_before_its_verdict_never_lets_the_tree_run(
    start_workload, state_dir: Path, tmp_path: Path, action: str, code: int
) -> None:
    w = start_workload()
    archive = tmp_path / "w.kckpt"
    kerrickpt.checkpoint(w.name, archive, leave_running=True, state_dir=state_dir)
    copy = unique_name("gate")

    fault = f"restore-before-verdict:{action}"
    result = cli("restore", str(archive), "--name", copy, state_dir=state_dir, KERRICKPT_FAULT=fault)

    assert result.returncode == code, result.stderr
    group = cgroups.existing(cgroups.detect(), copy)
    wait_for(lambda: not group.pids(), timeout=30, what="CRIU to end the tree it restored")
    log = state_dir / "containers" / copy / "log"
    if log.exists():  # left by a killed run, until `gc` removes it
        assert max(ticks(log.read_text())) == max(ticks(archived_log(archive))), "the tree never ran"
    left = [(r.name, r.state) for r in kerrickpt.ps(state_dir) if r.name != w.name]
    assert left == ([(copy, "abandoned")] if action == "kill" else [])
    kerrickpt.gc(state_dir)
    assert [r.name for r in kerrickpt.ps(state_dir)] == [w.name]
    assert cgroup_dirs(copy) == []


def test_a_restore_whose_criu_is_stopped_at_its_time_limit_never_lets_the_tree_run(
    memload: Path, state_dir: Path, tmp_path: Path
) -> None:
    name, side, archive = checkpointed_side_writer(memload, 64, state_dir, tmp_path)
    ticks_before = side.stat().st_size
    # kerrickpt stops once it has read the archive, before its verdict: CRIU, fed no more, is stuck mid-restore
    # until its limit (a second, and one per 10 MiB of archive) has the restore's helper stop it.
    env = cli_env(
        state_dir,
        KERRICKPT_FAULT="restore-before-verdict:pause",
        KERRICKPT_RESTORE_TIMEOUT="1",
        KERRICKPT_STOP_GRACE="1",
    )
    run = subprocess.Popen([*KERRICKPT, "restore", str(archive)], env=env, stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(run.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "it stops before its verdict"
        (helper,) = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
        # The helper answers once it has stopped CRIU, and ends: a zombie, as its parent is stopped.
        zombie = lambda: Path(f"/proc/{helper}/stat").read_text().split(") ")[1][0] == "Z"  # noqa: E731
        wait_for(zombie, timeout=60, what="CRIU to be stopped")
    finally:
        os.kill(run.pid, signal.SIGCONT)
        _, err = finished(run, 120)

    assert run.returncode == 10, err
    assert b"criu did not finish in time and was stopped" in err
    assert side.stat().st_size == ticks_before, "no restored process ever ran"
    assert kerrickpt.ps(state_dir) == []
    assert cgroup_dirs(name) == []


def test_an_archive_found_damaged_at_its_very_end_never_lets_the_restored_tree_run(
    memload: Path, state_dir: Path, tmp_path: Path
) -> None:
    # The index's manifest differs from the frame's in one date: found only once the whole archive is
    # read, while CRIU, its memory all served, waits at the gate. A tree that ran would write on.
    _, side, good = checkpointed_side_writer(memload, 192, state_dir, tmp_path)
    index = kerrickpt.archive.read_index(good)
    assert index is not None and index.frame is not None
    data = good.read_bytes()
    start = len(data) - int.from_bytes(data[-16:-8], "little")
    created = f'"created": "{index.manifest.created}"'.encode()
    other = created.replace(b'"created": "2', b'"created": "1')
    bad = tmp_path / "bad.kckpt"
    bad.write_bytes(
        data[:start] + kerrickpt.archiveindex.pack(index.body.replace(created, other), index.files, index.frame)
    )
    ticks_before = side.stat().st_size

    with pytest.raises(kerrickpt.ArchiveCorruptError, match="does not match its manifest"):
        kerrickpt.restore(bad, name=unique_name("late"), state_dir=state_dir)

    assert kerrickpt.ps(state_dir) == []
    assert side.stat().st_size == ticks_before, "no restored process ever ran"
