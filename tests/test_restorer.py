"""Batch jobs that share the host's PID and IPC namespaces: checkpointed from their cgroup, restored at
their own PIDs with their SysV queues and semaphores, in namespaces of their own. Real CRIU, as root."""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import cgroups, procs, restorer, sysvipc
from tests.helpers import cli_env, finished, ipc_keys, probe, ticks, unique_name, wait_for

pytestmark = pytest.mark.root


@dataclass
class HostJob:
    cgroup: Path
    keys: tuple[int, int, int]  # (0: no shared memory, message queue key, semaphore set key)
    log: Path
    pids: list[int]
    proc: subprocess.Popen[bytes]

    def tids(self) -> list[int]:
        return sorted({t for pid in self.pids for t in procs.read(pid).tids})


def start_job(
    workload: Path, tmp_path: Path, made: list[HostJob], shm_key: int = 0, keys: tuple[int, int] | None = None
) -> HostJob:
    """A job as a batch system starts it: plain processes in the host's namespaces, in a cgroup.

    With `keys`, the job is not the workload but DAEMON_USER: one process that uses the host's
    queue and semaphore set with those keys, made before it started, and counts.
    """
    layout = cgroups.detect()
    root = layout.unified or layout.freezer
    assert root is not None
    path = root / unique_name("batch")
    path.mkdir()
    msg_key, sem_key = keys or ipc_keys()[1:]
    log = tmp_path / f"{path.name}.log"
    command = f"{workload} run {shm_key} {msg_key} {sem_key}"
    if keys:
        command = shlex.join([sys.executable, "-c", DAEMON_USER, str(msg_key), str(sem_key)])
    # The job's session leader is a shell outside its cgroup, as a batch system's step daemon would be:
    # a session of its own, not this test's (whose leader may be outside this PID namespace in CI).
    script = f"(echo 0 > {path}/cgroup.procs && exec {command}) & wait"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    job = HostJob(path, (shm_key, msg_key, sem_key), log, [], proc)
    made.append(job)  # before waiting: the fixture removes it even if it never comes up
    processes = 1 if keys else 3
    wait_for(
        lambda: len(cgroups.Cgroup((path,)).pids()) == processes and len(ticks(log.read_text())) > 3, what="the job"
    )
    job.pids = cgroups.Cgroup((path,)).pids()
    return job


@pytest.fixture
def host_job(workload: Path, tmp_path: Path) -> Iterator[callable]:
    made: list[HostJob] = []

    def start(shm_key: int = 0, keys: tuple[int, int] | None = None) -> HostJob:
        return start_job(workload, tmp_path, made, shm_key, keys)

    yield start
    for job in made:
        cgroups.Cgroup((job.cgroup,)).remove()
        job.proc.wait()
        # SysV objects outlive processes: remove any the job left in the host's namespace.
        for flag, key in (("-M", job.keys[0]), ("-Q", job.keys[1]), ("-S", job.keys[2])):
            if key:
                subprocess.run(["ipcrm", flag, str(key)], capture_output=True, check=False)


# A job that sends to a queue and raises a semaphore that a host daemon made, then counts.
DAEMON_USER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
msqid, semid = libc.msgget(int(sys.argv[1]), 0), libc.semget(int(sys.argv[2]), 0, 0)
message = ctypes.create_string_buffer(b"\\x01\\0\\0\\0\\0\\0\\0\\0job\\0")
assert msqid >= 0 and semid >= 0 and libc.msgsnd(msqid, message, 4, 0) == 0
assert libc.semop(semid, (ctypes.c_short * 3)(0, 1, 0), 1) == 0
for n in range(1, 1000000):
    print(f"tick {n} pid {os.getpid()}", flush=True)
    time.sleep(0.1)
"""


def _reaped(pid: int) -> bool:
    """No zombie of the checkpointed job holds the PID any more: it is free, or a live process's."""
    return procs.start_time(pid) is not None or procs.is_free(pid)


@pytest.fixture
def occupy() -> Iterator[callable]:
    """Make processes sit on given host PIDs, as the target's own processes would."""
    sitters: list[subprocess.Popen[bytes]] = []

    def take(pids: list[int]) -> list[subprocess.Popen[bytes]]:
        """Sit on every PID; returns the sitters. A PID a stranger took meanwhile is occupied all the same."""
        for pid in pids:
            # Wait for the job's zombie to go, not for a live stranger (pid_max may be 32768 here).
            wait_for(lambda pid=pid: _reaped(pid), what=f"PID {pid} to be reaped", timeout=30)
            # Until a sitter of ours has it: a stranger that takes it may leave it again at once (a busy machine).
            for _ in range(200):
                if any(s.pid == pid for s in sitters):
                    break
                if procs.is_free(pid):
                    Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
                    sitters.append(subprocess.Popen(["sleep", "600"]))
                else:
                    time.sleep(0.01)
        assert not [pid for pid in pids if procs.is_free(pid)], "could not occupy every PID"
        return [s for s in sitters if s.pid in pids]

    yield take
    for sitter in sitters:
        sitter.kill()
        sitter.wait()


def host_probe(workload: Path, keys: tuple[int, int, int]) -> dict[str, object]:
    out = subprocess.run([str(workload), "probe", *map(str, keys)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_job_comes_back_at_its_pids_with_its_queue_and_semaphores(
    host_job, occupy, workload: Path, state_dir: Path, tmp_path: Path
) -> None:
    job = host_job()
    before = host_probe(workload, job.keys)
    tids = job.tids()
    archive = tmp_path / "job.kckpt"

    kerrickpt.checkpoint(None, archive, cgroup=job.cgroup, state_dir=state_dir)

    assert cgroups.Cgroup((job.cgroup,)).pids() == []
    assert not [r for r in sysvipc.table("msg") if r["key"] == job.keys[1]], "the job's queue went into the archive"
    shown = kerrickpt.inspect(archive).manifest
    assert shown.pid_namespace == "host" and shown.ipc is not None
    assert [q["key"] for q in shown.ipc["queues"]] == [job.keys[1]]
    assert [s["values"] for s in shown.ipc["semaphores"]] == [[7, 11, 13]]
    # The target's own processes sit on the job's PIDs; its own objects have the job's keys and ids.
    job.proc.wait()  # its session leader reaps the job's first process, freeing its PID
    holders = occupy(tids)
    host_objects = sysvipc.JobIpc(
        [sysvipc.Queue(job.keys[1], int(before["msg_id"]), 0o600, [(5, b"host\0")])],  # type: ignore[call-overload]
        [sysvipc.Semaphores(job.keys[2], int(before["sem_id"]), 0o600, [1, 2, 3])],  # type: ignore[call-overload]
    )
    sysvipc.recreate(host_objects)
    host_before = host_probe(workload, job.keys)
    assert (host_before["msg_id"], host_before["sem_id"]) == (before["msg_id"], before["sem_id"])
    with pytest.raises(kerrickpt.RestoreFailed, match="in use"):
        kerrickpt.restore(archive, name=unique_name("host"), pid_namespace="host", state_dir=state_dir)

    restored = kerrickpt.restore(archive, state_dir=state_dir)

    assert set(job.pids) <= set(restored.pid_map), "the job sees its own PIDs"
    assert restored.pid_map[1] == restored.init_pid, "PID 1 is kerrickpt's init, the job's reaper"
    inside = probe(workload, restored.pid_map[job.pids[0]], job.keys)
    for key in ("msg_id", "sem_id", "messages", "sems"):
        assert inside[key] == before[key], key
    assert len(os.listdir(f"/proc/{restored.pid_map[job.pids[2]]}/task")) == 2
    log = state_dir / "containers" / restored.name / "log"
    seen = max(ticks(log.read_text()))
    wait_for(lambda: max(ticks(log.read_text())) > seen + 2, what="the counter")
    numbers = ticks(log.read_text())
    assert numbers == list(range(1, len(numbers) + 1))
    assert host_probe(workload, job.keys) == host_before, "the host's own objects are untouched"
    with pytest.raises(kerrickpt.NotCheckpointable, match="cannot checkpoint it again"):
        kerrickpt.checkpoint(restored.name, tmp_path / "again.kckpt", state_dir=state_dir)
    assert all(holder.poll() is None for holder in holders), "the host's own processes are untouched"
    assert not [pid for pid in tids if procs.is_free(pid)]
    sysvipc.remove(host_objects)


def test_shared_memory_in_the_host_namespace_is_refused_without_freezing(
    host_job, state_dir: Path, tmp_path: Path
) -> None:
    job = host_job(shm_key=ipc_keys()[0])
    archive = tmp_path / "never.kckpt"
    result = subprocess.run(
        [sys.executable, "-m", "kerrickpt.cli.main", "checkpoint", "--cgroup", str(job.cgroup), "-o", str(archive)],
        capture_output=True,
        text=True,
        env={**os.environ, "KERRICKPT_STATE_DIR": str(state_dir)},
    )
    assert result.returncode == 14, result.stderr
    assert "shared memory" in result.stderr and "kerrickpt run" in result.stderr
    assert not archive.exists()
    assert not cgroups.Cgroup((job.cgroup,)).freezer.is_frozen()
    seen = max(ticks(job.log.read_text()))
    wait_for(lambda: max(ticks(job.log.read_text())) > seen + 2, what="the job to keep running")


def test_one_archive_restored_twice_at_once(host_job, workload: Path, state_dir: Path, tmp_path: Path) -> None:
    job = host_job()
    archive = tmp_path / "job.kckpt"
    kerrickpt.checkpoint(None, archive, cgroup=job.cgroup, state_dir=state_dir)
    names = [unique_name("twin"), unique_name("twin")]
    env = {**os.environ, "KERRICKPT_STATE_DIR": str(state_dir)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "kerrickpt.cli.main", "restore", str(archive), "--name", name, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in names
    ]
    try:
        results = [finished(run, 120) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in results]
    maps = [{int(k): v for k, v in json.loads(out)["pid_map"].items()} for out, _ in results]
    for pid_map in maps:
        assert set(job.pids) <= set(pid_map)
        assert len(os.listdir(f"/proc/{pid_map[job.pids[2]]}/task")) == 2
    assert set(maps[0].values()).isdisjoint(maps[1].values())
    namespaces = {os.readlink(f"/proc/{m[job.pids[0]]}/ns/{kind}") for m in maps for kind in ("pid", "ipc")}
    assert len(namespaces) == 4, "each copy has its own PID and IPC namespaces"
    for name, pid_map in zip(names, maps, strict=True):
        log = state_dir / "containers" / name / "log"
        seen = max(ticks(log.read_text()))
        wait_for(lambda log=log, seen=seen: max(ticks(log.read_text())) > seen + 2, what=f"{name} counting")
        assert probe(workload, pid_map[job.pids[0]], job.keys)["messages"] == [
            [1, "alpha"],
            [2, "bravo"],
            [7, "charlie"],
        ]


def test_host_pid_namespace_route_when_the_pids_are_free(
    host_job, workload: Path, state_dir: Path, tmp_path: Path
) -> None:
    job = host_job()
    archive = tmp_path / "job.kckpt"
    kerrickpt.checkpoint(None, archive, cgroup=job.cgroup, state_dir=state_dir)
    job.proc.wait()  # its session leader reaps the job's first process, freeing its PID
    wait_for(lambda: all(map(procs.is_free, job.pids)), what="the job's PIDs to be free", timeout=30)

    restored = kerrickpt.restore(archive, pid_namespace="host", state_dir=state_dir)

    assert {pid: pid for pid in job.pids} == restored.pid_map, "the same PIDs on the host"
    assert procs.shares_namespace(job.pids[0], "pid") and not procs.shares_namespace(job.pids[0], "ipc")
    assert probe(workload, job.pids[0], job.keys)["sems"] == [7, 11, 13]


def test_a_job_whose_session_leader_is_out_of_sight_is_refused_without_freezing(
    state_dir: Path, tmp_path: Path
) -> None:
    # In a PID namespace of its own, the shell is PID 1 of a session led from outside, as in a container.
    layout = cgroups.detect()
    root = layout.unified or layout.freezer
    assert root is not None
    path = root / unique_name("batch")
    path.mkdir()
    job = "while :; do sleep 0.05; done"
    script = (
        f"(echo 0 > {path}/cgroup.procs && exec sh -c '{job}') & "
        f'while [ -z "$(cat {path}/cgroup.procs)" ]; do sleep 0.01; done; '
        f"{sys.executable} -m kerrickpt.cli.main checkpoint --cgroup {path} -o {tmp_path}/never.kckpt; "
        "echo exit=$?; exec sleep 600"
    )
    inner = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(state_dir),
    )
    try:
        assert inner.stdout is not None and inner.stderr is not None
        assert inner.stdout.readline() == "exit=14\n", inner.stderr.readline()
        group = cgroups.Cgroup((path,))
        assert not group.freezer.is_frozen()
        assert ("sh", "-c", job) in [p.cmdline for p in procs.read_all(group.pids())], "the job runs on"
        assert not (tmp_path / "never.kckpt").exists()
    finally:
        inner.kill()  # --kill-child: PID 1 of the namespace goes, and every process in it
        _, err = finished(inner, 30)
        cgroups.Cgroup((path,)).remove()
    assert "session whose leader is outside" in err and "setsid" in err, err


def test_the_kernel_keeps_a_creator_pid_for_shared_memory_only() -> None:
    # Issue 12 asked to tell the job's queues and semaphore sets by their creator's PID: there is none.
    columns = {kind: (sysvipc.SYSVIPC / kind).read_text().split("\n", 1)[0].split() for kind in ("msg", "sem", "shm")}
    assert "cpid" in columns["shm"]
    assert not [c for c in columns["msg"] + columns["sem"] if c.startswith("c") and "pid" in c]
    assert {"lspid", "lrpid", "ctime"} <= set(columns["msg"]) and "ctime" in columns["sem"]


def test_queues_and_semaphores_a_host_daemon_made_are_refused_before_the_freeze_and_kept(
    host_job, state_dir: Path, tmp_path: Path
) -> None:
    _, msg_key, sem_key = ipc_keys()
    msqid = sysvipc._libc.msgget(msg_key, sysvipc.IPC_CREAT | sysvipc.IPC_EXCL | 0o600)
    semid = sysvipc._libc.semget(sem_key, 1, sysvipc.IPC_CREAT | sysvipc.IPC_EXCL | 0o600)
    daemons = sysvipc.JobIpc([sysvipc.Queue(msg_key, msqid, 0o600)], [sysvipc.Semaphores(sem_key, semid, 0o600)])
    try:
        assert msqid >= 0 and semid >= 0
        made = time.time()
        wait_for(lambda: time.time() > made + 2.5, what="a job clearly younger than the objects")
        job = host_job(keys=(msg_key, sem_key))
        archive = tmp_path / "never.kckpt"

        result = subprocess.run(
            [sys.executable, "-m", "kerrickpt.cli.main", "checkpoint", "--cgroup", str(job.cgroup), "-o", str(archive)],
            capture_output=True,
            text=True,
            env=cli_env(state_dir),
            timeout=120,
        )

        assert result.returncode == 14, result.stderr
        assert f"queue key {msg_key} id {msqid}" in result.stderr and "did not create" in result.stderr
        assert f"semaphore set key {sem_key} id {semid}" in result.stderr
        assert not archive.exists()
        assert not cgroups.Cgroup((job.cgroup,)).freezer.is_frozen()
        (queue,) = [r for r in sysvipc.table("msg") if r["msqid"] == msqid]
        assert queue["qnum"] == 1 and queue["lspid"] == job.pids[0], "the daemon's queue stays, with the message"
        values = (ctypes.c_ushort * 1)()
        assert sysvipc._libc.semctl(semid, 0, sysvipc.GETALL, ctypes.byref(values)) == 0 and list(values) == [1]
        seen = max(ticks(job.log.read_text()))
        wait_for(lambda: max(ticks(job.log.read_text())) > seen + 2, what="the job to keep running")
    finally:
        sysvipc.remove(daemons)


def test_a_restore_helper_holds_neither_its_callers_stdout_nor_its_stderr() -> None:
    # A migration's receiver starts it before the archive comes; the receiver's stderr is its ssh channel, which
    # must close as the receiver ends (the source waits for it), whatever becomes of the helper.
    helper = restorer.Helper()
    try:
        held = {os.readlink(f"/proc/{helper.process.pid}/fd/{fd}") for fd in (1, 2)}
        assert not held & {os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)}
    finally:
        helper.close()
