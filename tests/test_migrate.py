"""Migration between two real nodes (network namespaces with real sshd), real CRIU: exactly one copy runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.lab import READY, pipe_max_size, wait_for_line
from bench.lab import Job as MemJob
from kerrickpt import containers, node, procs, sysvipc, transport, zstdframe
from kerrickpt.localnodes import SSHD, Cluster, Node, kerrickpt_path
from tests.helpers import KERRICKPT, cli_env, finished, ipc_keys, probe, ticks, unique_name, wait_for
from tests.test_confined import STEPS, USER, steps_written

pytestmark = pytest.mark.root


class Job:
    """The ipcworkload container as seen on whichever node runs it."""

    def __init__(self, node: Node, binary: Path) -> None:
        self.name = unique_name("mig")
        self.keys = ipc_keys()
        self.binary = binary
        started = node.kerrickpt("run", "--name", self.name, "--", str(binary), "run", *map(str, self.keys))
        assert started.returncode == 0, started.stderr
        wait_for(lambda: len(ticks(self.log(node))) > 3, what="ticks")

    def log(self, node: Node) -> str:
        path = node.state_dir / "containers" / self.name / "log"
        return path.read_text() if path.exists() else ""

    def row(self, node: Node) -> dict[str, object] | None:
        return next((r for r in node.json("ps") if r["name"] == self.name), None)

    def probe(self, node: Node) -> dict[str, object]:
        row = self.row(node)
        assert row is not None
        return probe(self.binary, int(row["init_pid"]), self.keys)  # type: ignore[call-overload]

    def keeps_counting(self, node: Node) -> None:
        seen = max(ticks(self.log(node)))
        wait_for(lambda: max(ticks(self.log(node))) > seen + 2, what=f"{self.name} counting on {node.name}")


def migrate(
    cluster: Cluster, source: Node, target: Node, job: Job, *extra: str, fault: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {"KERRICKPT_FAULT": fault} if fault else {}
    return source.kerrickpt("migrate", job.name, *cluster.migrate_args(target), *extra, "--json", env=env)


def running_copies(cluster: Cluster, job: Job) -> list[str]:
    return [n.name for n in cluster.nodes if (row := job.row(n)) and row["state"] == "running"]


def assert_nothing_left(node: Node, job: Job) -> None:
    """No trace of the job on `node`: record, cgroups, scratch files, markers."""
    assert job.row(node) is None
    assert not (node.state_dir / "containers" / job.name).exists()
    for root in ("unified", "freezer", "memory"):
        assert not Path(f"/sys/fs/cgroup/{root}/{node.cgroup_parent}/{job.name}").exists()
    wait_for(lambda: not list((node.state_dir / "tmp").iterdir()), what=f"{node.name}'s scratch to be empty")
    incoming = node.state_dir / "incoming"
    # A post-copy's record that it failed stays: `recover` must hear the copy here was killed.
    assert not incoming.exists() or not [p for p in incoming.iterdir() if p.suffix != ".postcopy"]


@pytest.fixture
def squatter(workload: Path) -> Iterator[Callable[..., dict[str, object]]]:
    """A job in the target's host namespaces holding SysV objects with the migrated job's keys and ids."""
    started: list[tuple[subprocess.Popen[bytes], tuple[int, int, int]]] = []

    def start(keys: tuple[int, int, int], ids: dict[str, object]) -> dict[str, object]:
        for kind in ("shm", "msg", "sem"):
            Path(f"/proc/sys/kernel/{kind}_next_id").write_text(str(ids[f"{kind}_id"]))
        proc = subprocess.Popen([str(workload), "run", *map(str, keys)], stdout=subprocess.DEVNULL)
        started.append((proc, keys))
        state = wait_for(lambda: _try_probe(workload, proc.pid, keys), what="the squatter's objects")
        assert isinstance(state, dict)
        return {**state, "pid": proc.pid}

    yield start
    for proc, keys in started:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        pids = [int(p) for p in children.read_text().split()] if children.exists() else []
        for pid in [*pids, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        # SysV objects outlive their processes: remove the ones made here.
        shm, msg, sem = map(str, keys)
        subprocess.run(["ipcrm", "-M", shm, "-Q", msg, "-S", sem], capture_output=True, check=False)


def assert_moved_with_its_state(cluster: Cluster, job: Job, before: dict[str, object]) -> None:
    """Node b alone runs the job, counting on where it stopped, with the SysV state it had on a."""
    a, b = cluster.nodes
    assert running_copies(cluster, job) == ["b"]
    assert_nothing_left(a, job)
    job.keeps_counting(b)
    numbers = ticks(job.log(b))
    assert numbers == list(range(1, len(numbers) + 1)), "the counter went on where it stopped"
    after = job.probe(b)
    for key in ("shm_id", "msg_id", "sem_id", "data_sha", "messages", "sems"):
        assert after[key] == before[key], key


def _try_probe(workload: Path, pid: int, keys: tuple[int, int, int]) -> dict[str, object] | None:
    try:
        return probe(workload, pid, keys)
    except subprocess.CalledProcessError:
        return None


def test_migration_moves_the_job_with_its_state(cluster: Cluster, workload: Path, squatter) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)
    before = job.probe(a)
    other = squatter(job.keys, before)
    for kind, column in (("shm", "shmid"), ("msg", "msqid"), ("sem", "semid")):
        # The squatter took the job's ids where they were free; where not, another host object has them.
        assert before[f"{kind}_id"] in {row[column] for row in sysvipc.table(kind)}

    result = migrate(cluster, a, b, job)

    assert result.returncode == 0, result.stderr
    moved = json.loads(result.stdout)
    assert sorted(int(k) for k in moved["pid_map"]) == [1, 2, 3], "the job sees its own PIDs"
    assert moved["downtime_s"] > 0 and moved["attempts"] == {"preflight": 1, "transfer": 1}
    assert_moved_with_its_state(cluster, job, before)
    assert not list((a.state_dir / "migrations").iterdir())
    untouched = probe(workload, int(other["pid"]), job.keys)  # type: ignore[call-overload]
    assert untouched["messages"] == other["messages"] and untouched["sems"] == other["sems"]
    assert untouched["shm_id"] == other["shm_id"] and untouched["data_sha"] == other["data_sha"]


def restart_sshd(cluster: Cluster, node: Node, **env: str) -> None:
    node.stop_sshd()
    node.extra_env.update(env)
    node.start_sshd()
    cluster.wait_for_sshd(node)


def test_incompatible_target_is_refused_before_the_freeze_and_not_retried(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    restart_sshd(cluster, b, KERRICKPT_TEST_FINGERPRINT="arch=aarch64")
    job = Job(a, workload)

    result = migrate(cluster, a, b, job)

    assert result.returncode == 7, result.stderr
    assert "arch" in result.stderr and "aarch64" in result.stderr
    assert "retrying" not in result.stderr
    assert json.loads(result.stdout)["error"] == "NodeIncompatibleError"
    assert running_copies(cluster, job) == ["a"]
    assert not (a.state_dir / "migrations").exists() or not list((a.state_dir / "migrations").iterdir())
    assert_nothing_left(b, job)
    job.keeps_counting(a)


@pytest.mark.parametrize(
    ("fault", "extra", "code", "said"),
    [
        # The link drops before the end frame: retried once, then the source resumes.
        ("transfer-cut", ("--attempts", "2"), 11, "attempt 1/2 to transfer"),
        # The target's restore fails: a permanent failure, not retried.
        ("restore-before-criu:fail", (), 8, "fault injected"),
    ],
)
def test_failure_before_the_target_runs_it_resumes_the_source(
    cluster: Cluster, workload: Path, fault: str, extra: tuple[str, ...], code: int, said: str
) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)

    result = migrate(cluster, a, b, job, *extra, fault=fault)

    assert result.returncode == code, result.stderr
    assert said in result.stderr and "runs on here again" in result.stderr
    assert result.stderr.count("retrying") == (1 if extra else 0)
    assert running_copies(cluster, job) == ["a"]
    job.keeps_counting(a)
    assert_nothing_left(b, job)


def recover_says_moved(a: Node, job: Job) -> None:
    """`recover` on the source ends with the target having had it: the source copy is removed."""
    recovered = a.kerrickpt("recover", job.name, "--json")
    assert recovered.returncode == 0, recovered.stderr
    assert json.loads(recovered.stdout)["outcome"] == "moved"


def test_lost_confirmation_keeps_source_frozen_until_recover(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)

    result = migrate(cluster, a, b, job, fault="target-after-restore:kill")

    assert result.returncode == 12, result.stderr
    assert "kerrickpt recover" in result.stderr
    source = job.row(a)
    assert source is not None and source["state"] == "frozen", "never two running copies"
    assert running_copies(cluster, job) == ["b"]

    recover_says_moved(a, job)
    assert_nothing_left(a, job)
    assert running_copies(cluster, job) == ["b"]
    job.keeps_counting(b)


def test_source_killed_during_transfer_is_resumed_by_recover(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)

    result = migrate(cluster, a, b, job, fault="source-during-transfer:kill")

    assert result.returncode == -signal.SIGKILL
    assert job.row(a)["state"] == "frozen"  # type: ignore[index]
    recovered = a.kerrickpt("recover", job.name, "--json")

    assert recovered.returncode == 0, recovered.stderr
    assert json.loads(recovered.stdout)["outcome"] == "resumed"
    assert running_copies(cluster, job) == ["a"]
    job.keeps_counting(a)
    assert_nothing_left(b, job)
    assert not list((a.state_dir / "migrations").iterdir())
    assert not list((a.state_dir / "tmp").iterdir()), "recover removed the dead run's archive"


def test_a_target_that_died_before_the_restore_is_shown_abandoned_and_recover_cleans_it(
    cluster: Cluster, workload: Path
) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)

    result = migrate(cluster, a, b, job, fault="restore-before-criu:kill")

    assert result.returncode == 12, result.stderr
    assert job.row(a)["state"] == "frozen"  # type: ignore[index]
    # Asking changes nothing: b shows what its dead receiver left, and keeps it until someone cleans up.
    assert [(r["name"], r["state"]) for r in b.json("ps")] == [(job.name, "abandoned")]
    assert (b.state_dir / "containers" / job.name).is_dir()
    recovered = a.kerrickpt("recover", job.name, "--json")

    assert recovered.returncode == 0, recovered.stderr
    assert json.loads(recovered.stdout)["outcome"] == "resumed", "b said it has nothing, once it had cleaned up"
    assert running_copies(cluster, job) == ["a"]
    job.keeps_counting(a)
    assert_nothing_left(b, job)


def test_target_whose_sshd_comes_up_late_is_reached(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)
    b.stop_sshd()
    timer = threading.Timer(2.0, b.start_sshd)
    timer.start()
    try:
        result = migrate(cluster, a, b, job)
    finally:
        timer.join()

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["attempts"]["preflight"] > 1
    assert "retrying" in result.stderr
    assert running_copies(cluster, job) == ["b"]
    job.keeps_counting(b)


def test_missing_remote_kerrickpt_is_not_retried(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)
    args = [*cluster.migrate_args(b), "--remote-kerrickpt", "/nonexistent/kerrickpt"]

    result = a.kerrickpt("migrate", job.name, *args)

    assert result.returncode == 11, result.stderr
    assert "exit 127" in result.stderr and "retrying" not in result.stderr
    assert running_copies(cluster, job) == ["a"]


BALLAST = "import os, time\nballast = os.urandom(32 << 20)\nwhile True:\n    time.sleep(0.05)\n"


def start_migration(cluster: Cluster, name: str, *, fault: str) -> subprocess.Popen[bytes]:
    """`migrate NAME --json` from node a to node b, run as a child of the test, which `fault` may stop (pause)."""
    a, b = cluster.nodes
    env = {**os.environ, **a.env(), "KERRICKPT_FAULT": fault}
    argv = ["nsenter", f"--net=/run/netns/{a.netns}", kerrickpt_path(), "migrate", name, "--json"]
    return subprocess.Popen([*argv, *cluster.migrate_args(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def stopped(run: subprocess.Popen[bytes]) -> bool:
    """Whether `run` stopped (a pause fault) rather than ended."""
    _, status = os.waitpid(run.pid, os.WUNTRACED)
    return os.WIFSTOPPED(status)


def test_the_target_takes_the_archive_while_the_source_still_writes_it(cluster: Cluster) -> None:
    a, b = cluster.nodes
    name = unique_name("ballast")
    started = a.kerrickpt("run", "--name", name, "--", sys.executable, "-c", BALLAST)
    assert started.returncode == 0, started.stderr
    run = start_migration(cluster, name, fault="archive-before-manifest:pause")
    try:
        assert stopped(run), "the source stops with its archive written up to the manifest"
        # The source holds the container frozen and has not finished its archive; the target has most of it.
        assert [r["state"] for r in a.json("ps") if r["name"] == name] == ["frozen"]
        # It arrives there as it was written: kept whole, 0600, not unpacked (CRIU is fed from it at the end).
        (kept,) = (b.state_dir / "tmp").glob("receive-*/archive.kckpt")
        assert kept.stat().st_size > 16 << 20 and kept.stat().st_mode & 0o777 == 0o600
        assert kept.parent.stat().st_mode & 0o777 == 0o700
        assert not [p for p in (b.state_dir / "tmp").rglob("*") if p.is_file() and p != kept]
        assert not [r for r in b.json("ps") if r["name"] == name], "nothing runs there before the end"
    finally:
        os.kill(run.pid, signal.SIGCONT)
        out, err = finished(run, 120)
    assert run.returncode == 0, err
    moved = json.loads(out)
    assert moved["attempts"]["transfer"] == 1
    assert moved["compression"]["level"] == zstdframe.level_for_link(moved["compression"]["link_mib_s"])
    assert [r["state"] for r in b.json("ps") if r["name"] == name] == ["running"]
    assert not list((b.state_dir / "tmp").iterdir()), "the target removed the archive it restored from"
    assert not [r for r in a.json("ps") if r["name"] == name]


def test_the_downtime_ends_when_the_targets_answer_arrives(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)
    started = time.monotonic()
    run = start_migration(cluster, job.name, fault="source-after-answer:pause")
    try:
        assert stopped(run), "the source stops once the target's answer arrived"
        answered = time.monotonic()  # the freeze came after `started`, the answer before this
        assert running_copies(cluster, job) == ["b"], "it runs there, connected, as the answer says"
        # Held longer than the freeze can have lasted until the answer: a downtime that went on past the answer
        # (to the target's kerrickpt exiting and ssh ending, say: the source waits for both after it) takes it in.
        time.sleep(answered - started)
    finally:
        os.kill(run.pid, signal.SIGCONT)
        out, err = finished(run, 120)
    assert run.returncode == 0, err
    assert 0 < json.loads(out)["downtime_s"] < answered - started
    assert_nothing_left(a, job)
    job.keeps_counting(b)


def test_a_failure_after_the_target_runs_it_still_hands_over(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)

    result = migrate(cluster, a, b, job, fault="target-after-restore:fail")

    assert result.returncode == 0, result.stderr
    assert running_copies(cluster, job) == ["b"], "it runs there: the source must not resume"
    assert_nothing_left(a, job)
    job.keeps_counting(b)


def test_lazy_migration_runs_there_before_its_memory_arrived_and_keeps_its_state(
    cluster: Cluster, workload: Path, big_pipes: None
) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)
    before = job.probe(a)

    result = migrate(cluster, a, b, job, "--lazy")

    assert result.returncode == 0, result.stderr
    moved = json.loads(result.stdout)
    assert moved["lazy"] is True and moved["attempts"]["transfer"] == 1
    assert_moved_with_its_state(cluster, job, before)
    # Its images stay on b only until every page came: the watcher removes them then.
    wait_for(lambda: not list((b.state_dir / "tmp").iterdir()), what="b's images to go")


def test_lazy_migration_without_big_enough_pipes_is_refused_before_the_freeze(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)

    with pipe_max_size(node.LAZY_PIPE_SIZE // 4):  # as this machine kind comes
        result = migrate(cluster, a, b, job, "--lazy")

    assert result.returncode == 3, result.stderr
    assert "fs.pipe-max-size" in result.stderr and "Nothing was frozen" in result.stderr
    assert running_copies(cluster, job) == ["a"]
    job.keeps_counting(a)


def test_lazy_migration_whose_page_stream_breaks_kills_the_target_copy_and_resumes_the_source(
    cluster: Cluster, memload: Path, big_pipes: None
) -> None:
    a, b = cluster.nodes
    name, mib = unique_name("lazy"), 64
    started = a.kerrickpt("run", "--name", name, "--", str(memload), str(mib), "mixed")
    assert started.returncode == 0, started.stderr
    log = a.state_dir / "containers" / name / "log"
    expected = wait_for_line(log, READY, 0, 60).group(1)

    result = a.kerrickpt(
        "migrate", name, *cluster.migrate_args(b), "--lazy", "--json", env={"KERRICKPT_FAULT": "pages-cut"}
    )

    assert result.returncode == 11, result.stderr
    assert "runs on here again" in result.stderr and "killed its copy" in result.stderr
    assert "lazy-pages daemon exited" in result.stderr and "page-xfer" in result.stderr, "and what CRIU saw"
    rows = {n.name: [r for r in n.json("ps") if r["name"] == name] for n in cluster.nodes}
    assert rows["b"] == [], "the copy that lacked memory is gone"
    assert [r["state"] for r in rows["a"]] == ["running"]
    source = MemJob(a, name, int(rows["a"][0]["init_pid"]), [], expected)
    assert source.verify(mib), "the source resumed with all of its memory"
    wait_for(lambda: not list((b.state_dir / "tmp").iterdir()), what="b's images to be removed")
    assert not list((a.state_dir / "migrations").iterdir())


def serving_pages(node: Node) -> int | None:
    """The PID of the `kerrickpt agent pages` that relays a migration's memory to `node`, if one runs."""
    mine = f"{containers.STATE_ENV}={node.state_dir}".encode()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if b"\0agent\0pages\0" in (entry / "cmdline").read_bytes() and mine in (entry / "environ").read_bytes():
                return int(entry.name)
    return None


def postcopy_record(node: Node) -> dict[str, object] | None:
    """What the watcher of the post-copy restore on `node` recorded, once it did."""
    records = list((node.state_dir / "incoming").glob("*.postcopy")) if (node.state_dir / "incoming").exists() else []
    with contextlib.suppress(OSError, ValueError):
        return json.loads(records[0].read_text()) if records else None
    return None


# A counter beside memory that takes a while to pull: the page stream can be held mid-way.
COUNTED_BALLAST = '{memload} 256 mixed & i=0; while :; do i=$((i+1)); echo "tick $i pid $$"; sleep 0.05; done'


def traced(pid: int) -> bool:
    """Whether a tracer (CRIU) holds the process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line for line in status.splitlines() if line.startswith("TracerPid:")).split()[1] != "0"


def test_lazy_migration_whose_watcher_is_killed_ends_with_the_source_running_alone(
    cluster: Cluster, memload: Path, big_pipes: None
) -> None:
    a, b = cluster.nodes
    name = unique_name("lazy")
    started = a.kerrickpt("run", "--name", name, "--", "sh", "-c", COUNTED_BALLAST.format(memload=memload))
    assert started.returncode == 0, started.stderr
    logs = {n.name: n.state_dir / "containers" / name / "log" for n in cluster.nodes}
    wait_for_line(logs["a"], READY, 0, 60)
    init = int(next(r for r in a.json("ps") if r["name"] == name)["init_pid"])
    argv = ["nsenter", f"--net=/run/netns/{a.netns}", kerrickpt_path(), "migrate", name, "--lazy", "--json"]
    env = {**os.environ, **a.env()}
    run = subprocess.Popen([*argv, *cluster.migrate_args(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        # b's copy counts on from where a's stopped: it runs there. Hold its memory mid-way.
        counted = {n: lambda n=n: len(ticks(logs[n].read_text() if logs[n].exists() else "")) for n in logs}
        wait_for(lambda: counted["b"]() > counted["a"](), timeout=120, what="b's copy to count")
        pages = serving_pages(b)
        assert pages, "the page stream still runs"
        os.kill(pages, signal.SIGSTOP)
        try:
            record = postcopy_record(b)
            assert record is not None and record["state"] == "in-flight", record
            watcher, born = int(record["pid"]), int(record["start"])  # type: ignore[call-overload]
            assert procs.is_alive(watcher, born), "the transfer is not over: the watcher still watches"
            os.kill(watcher, signal.SIGKILL)
            wait_for(lambda: not procs.is_alive(watcher, born), what="the watcher to die")
            assert traced(init), "a's copy stays held by its CRIU while b's runs"
        finally:
            os.kill(pages, signal.SIGCONT)
        out, err = finished(run, 300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()

    # Nobody watches b's copy any more: should its memory stop coming it would read zeros. The
    # target's next answer about the migration kills it, and the source resumes.
    assert run.returncode == 11, err
    assert b"runs on here again" in err and b"its watcher died" in err
    assert json.loads(out)["error"] == "TransportError"
    rows = {n.name: [r["state"] for r in n.json("ps") if r["name"] == name] for n in cluster.nodes}
    assert rows == {"a": ["running"], "b": []}
    seen = ticks(logs["a"].read_text())
    wait_for(lambda: len(ticks(logs["a"].read_text())) > len(seen) + 2, what="a's copy to count again")
    numbers = ticks(logs["a"].read_text())
    assert numbers == list(range(1, len(numbers) + 1)), "the counter went on where it stopped, never twice"
    wait_for(lambda: not list((b.state_dir / "tmp").iterdir()), what="b's images to be removed")
    assert not (b.state_dir / "containers" / name).exists()
    assert not list((a.state_dir / "migrations").iterdir())


def test_lazy_migration_whose_answer_is_lost_still_gets_its_memory_and_recover_finishes_it(
    cluster: Cluster, workload: Path, big_pipes: None
) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)
    before = job.probe(a)

    result = migrate(cluster, a, b, job, "--lazy", fault="target-after-restore:kill")

    assert result.returncode == 12, result.stderr
    assert job.row(a)["state"] == "frozen", "never two running copies"  # type: ignore[index]
    recover_says_moved(a, job)
    assert_moved_with_its_state(cluster, job, before)


@pytest.mark.parametrize("fault", ["restore-before-criu:fail", "restore-after-lazy-daemon:fail"])
def test_lazy_migration_whose_restore_fails_resumes_the_source(
    cluster: Cluster, workload: Path, big_pipes: None, fault: str
) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)

    result = migrate(cluster, a, b, job, "--lazy", fault=fault)

    assert result.returncode == 8, result.stderr
    assert "fault injected" in result.stderr and "runs on here again" in result.stderr
    assert running_copies(cluster, job) == ["a"]
    job.keeps_counting(a)
    assert_nothing_left(b, job)


def _lost_confirmation(cluster: Cluster, workload: Path) -> tuple[Job, Path]:
    """A job that runs on b while a, whose answer was lost, holds it frozen; and a's journal of it."""
    a, b = cluster.nodes
    job = Job(a, workload)
    result = migrate(cluster, a, b, job, fault="target-after-restore:kill")
    assert result.returncode == 12, result.stderr
    assert job.row(a)["state"] == "frozen"  # type: ignore[index]
    return job, a.state_dir / "migrations" / f"{job.name}.json"


def _answering(journal: Path, script: Path, answer: str) -> None:
    """Point the journal's link at a program that gives `answer` as the target's status."""
    script.write_text(f"#!/bin/sh\ncat >/dev/null\necho '{answer}'\n")
    script.chmod(0o755)
    entry = json.loads(journal.read_text())
    journal.write_text(json.dumps({**entry, "link": {**entry["link"], "remote_kerrickpt": str(script)}}))


def test_recover_resumes_only_on_the_targets_word_and_removes_a_copy_that_departed(
    cluster: Cluster, workload: Path, tmp_path: Path
) -> None:
    a, b = cluster.nodes
    job, journal = _lost_confirmation(cluster, workload)
    real = journal.read_text()
    migration_id = json.loads(real)["id"]
    init_there = job.row(b)["init_pid"]  # type: ignore[index]

    # A second delivery of the same migration, to the real receiver: "already here", not restored again.
    again = b.kerrickpt("agent", "receive", "--name", job.name, "--migration-id", migration_id)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["event"] == "restored"
    assert [r["init_pid"] for r in b.json("ps") if r["name"] == job.name] == [init_there]

    # Anything but the target's explicit word keeps the source frozen: exit 12, one line, no traceback.
    garbled = ('{"event": "ok"}', '{"event": "ok", "state": "gone-fishing"}', '{"event": "ok", "state": ["absent"]}')
    for answer in (*garbled, '{"state": "absent"}', "[1, 2]"):
        _answering(journal, tmp_path / "status", answer)
        said = a.kerrickpt("recover", job.name, "--attempts", "1")
        assert said.returncode == 12, (answer, said.stderr)
        assert "Traceback" not in said.stderr and len(said.stderr.strip().splitlines()) == 1, said.stderr
        assert job.row(a)["state"] == "frozen", answer  # type: ignore[index]
    # Still receiving: asked again, then busy; the source stays frozen.
    _answering(journal, tmp_path / "status", '{"event": "ok", "state": "in-progress"}')
    busy = a.kerrickpt("recover", job.name, "--attempts", "2")
    assert busy.returncode == 13, busy.stderr
    assert "still receiving" in busy.stderr and "retrying" in busy.stderr
    assert job.row(a)["state"] == "frozen"  # type: ignore[index]

    # It came to b and went from there: the target remembers; the source copy must go.
    journal.write_text(real)
    assert b.kerrickpt("kill", job.name).returncode == 0
    recover_says_moved(a, job)
    assert_nothing_left(a, job)
    assert running_copies(cluster, job) == []


def test_recover_removes_the_source_copy_once_the_targets_copy_exited(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job, _ = _lost_confirmation(cluster, workload)
    os.kill(int(job.row(b)["init_pid"]), signal.SIGKILL)  # type: ignore[index, arg-type]
    wait_for(lambda: job.row(b)["state"] == "exited", what="the copy on b to exit")  # type: ignore[index]

    recover_says_moved(a, job)
    assert_nothing_left(a, job)
    assert running_copies(cluster, job) == []


def test_sigterm_after_the_end_frame_keeps_the_source_frozen_and_exits_12(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    job = Job(a, workload)
    env = {**os.environ, **a.env(), "KERRICKPT_FAULT": "restore-before-verdict:pause"}
    argv = ["nsenter", f"--net=/run/netns/{a.netns}", kerrickpt_path(), "migrate", job.name]
    run = subprocess.Popen(
        [*argv, *cluster.migrate_args(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    receiver = 0
    try:

        def stopped_receiver() -> int:
            """The receiver (or its process that feeds CRIU), once it has stopped at the fault."""
            for marker in (b.state_dir / "incoming").glob("*.json"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    pids = [int(json.loads(marker.read_text())["pid"])]
                    while pids:
                        pid = pids.pop()
                        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                            return pid
                        pids += map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
            return 0

        # The target stops with the whole archive and its end frame received, before it answers.
        receiver = int(wait_for(stopped_receiver, timeout=120, what="the target's receiver to stop"))
        run.send_signal(signal.SIGTERM)
        _, err = finished(run, 120)
    finally:
        if receiver:
            os.kill(receiver, signal.SIGCONT)
        if run.poll() is None:
            run.kill()
            run.communicate()

    assert run.returncode == 12, err
    assert "Traceback" not in err and "kerrickpt recover" in err
    assert job.row(a)["state"] == "frozen", "the target may run it: never two running copies"
    wait_for(lambda: job.row(b) is not None and job.row(b)["state"] == "running", timeout=60, what="b to run it")  # type: ignore[index]

    recover_says_moved(a, job)
    assert running_copies(cluster, job) == ["b"]
    assert_nothing_left(a, job)


# Counts as the ipcworkload does, with 48 MiB of memory that does not compress: a dump of many chunks.
TICKER = (
    "import os, time\nballast = os.urandom(48 << 20)\ni = 0\nwhile True:\n"
    "    i += 1\n    print(f'tick {i} pid {os.getpid()}', flush=True)\n    time.sleep(0.05)\n"
)


def _run_paused_at_each_chunk(
    cluster: Cluster, name: str, on_pause: Callable[[subprocess.Popen[bytes], Path], None], stderr: Path
) -> subprocess.Popen[bytes]:
    """Migrate `name` from a to b with the source stopping at each chunk of its dump (its container frozen, its
    stream under way): `on_pause` acts there, then the source goes on. Returns it exited."""
    a, b = cluster.nodes
    env = {**os.environ, **a.env(), "KERRICKPT_FAULT": "archive-chunk:pause", "KERRICKPT_SEND_STALL": "2"}
    argv = ["nsenter", f"--net=/run/netns/{a.netns}", kerrickpt_path(), "migrate", name, "--json"]
    with stderr.open("wb") as err:
        run = subprocess.Popen([*argv, *cluster.migrate_args(b)], stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        while True:
            _, status = os.waitpid(run.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                run.returncode = os.waitstatus_to_exitcode(status)
                return run
            on_pause(run, stderr)
            os.kill(run.pid, signal.SIGCONT)
    finally:
        if run.returncode is None:
            run.kill()
            run.wait()


def _receiver(node: Node) -> int:
    """The PID of the kerrickpt receiving a migration on `node`, from its marker."""
    (marker,) = (node.state_dir / "incoming").glob("*.json")
    return int(json.loads(marker.read_text())["pid"])


def _start_ticker(node: Node) -> str:
    name = unique_name("tick")
    started = node.kerrickpt("run", "--name", name, "--", sys.executable, "-c", TICKER)
    assert started.returncode == 0, started.stderr
    log = node.state_dir / "containers" / name / "log"
    wait_for(lambda: len(ticks(log.read_text())) > 3, timeout=60, what="ticks")
    return name


def _assert_moved_and_counting(cluster: Cluster, name: str, run: subprocess.Popen[bytes], stderr: Path) -> None:
    """The migration succeeded on a later attempt, from the file: b alone runs it, counting on."""
    a, b = cluster.nodes
    err = stderr.read_text()
    assert run.returncode == 0, err
    assert "Traceback" not in err
    moved = json.loads(run.stdout.read())  # type: ignore[union-attr]
    assert moved["attempts"]["transfer"] >= 2, "a later attempt came from the file"
    assert [r["state"] for r in b.json("ps") if r["name"] == name] == ["running"]
    assert not [r for r in a.json("ps") if r["name"] == name], "the source copy is gone"
    assert not (a.state_dir / "containers" / name).exists()
    log = b.state_dir / "containers" / name / "log"
    seen = max(ticks(log.read_text()))
    wait_for(lambda: max(ticks(log.read_text())) > seen + 2, timeout=30, what="counting on b")
    numbers = ticks(log.read_text())
    assert numbers == list(range(1, len(numbers) + 1)), "the counter went on where it stopped"
    assert not list((a.state_dir / "tmp").iterdir())


def test_a_dump_whose_link_was_cut_is_resent_from_the_file_and_restored(cluster: Cluster, tmp_path: Path) -> None:
    _, b = cluster.nodes
    name = _start_ticker(cluster.nodes[0])
    killed: list[int] = []

    def cut(run: subprocess.Popen[bytes], stderr: Path) -> None:
        if not killed:  # the target's receiver dies mid-stream
            killed.append(_receiver(b))
            os.kill(killed[0], signal.SIGKILL)

    run = _run_paused_at_each_chunk(cluster, name, cut, tmp_path / "stderr")

    assert killed
    _assert_moved_and_counting(cluster, name, run, tmp_path / "stderr")


def test_a_target_that_takes_nothing_for_the_stall_limit_is_given_up_and_the_archive_resent(
    cluster: Cluster, tmp_path: Path
) -> None:
    _, b = cluster.nodes
    name = _start_ticker(cluster.nodes[0])
    stderr = tmp_path / "stderr"
    stopped: list[int] = []

    def resume_once_given_up() -> None:
        wait_for(lambda: "retrying" in stderr.read_text(), timeout=120, what="the source to give up the stream")
        os.kill(stopped[0], signal.SIGCONT)  # it finds the stream gone, and leaves

    def stall(run: subprocess.Popen[bytes], stderr: Path) -> None:
        if not stopped:  # the target stops reading mid-stream, its link open (the source's stall limit: 2 s)
            stopped.append(_receiver(b))
            os.kill(stopped[0], signal.SIGSTOP)
            threading.Thread(target=resume_once_given_up, daemon=True).start()

    try:
        run = _run_paused_at_each_chunk(cluster, name, stall, stderr)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    assert f"{b.address} took nothing for 2 s" in stderr.read_text()
    _assert_moved_and_counting(cluster, name, run, stderr)


def test_a_receiver_that_gets_nothing_for_its_stall_limit_removes_what_it_received(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    migration_id = uuid.uuid4().hex
    env = cli_env(state_dir, KERRICKPT_RECEIVE_STALL="1")
    argv = [*KERRICKPT, "agent", "receive", "--name", unique_name("stall"), "--migration-id", migration_id]
    with subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        assert run.stdin is not None and run.stdout is not None
        try:
            assert json.loads(run.stdout.readline())["event"] == "ready"
            # Part of an archive, then nothing: a link that died without closing.
            run.stdin.write(transport.FRAME_HEADER.pack(transport.DATA, 1 << 20) + os.urandom(1 << 20))
            run.stdin.flush()
            said = json.loads(run.stdout.readline())
            code = run.wait(timeout=60)
        finally:
            run.stdin.close()

    assert said["event"] == "error" and said["message"] == "the source sent nothing for 1 s", said
    assert said["transient"] and code == 11
    assert not list((state_dir / "tmp").iterdir()), "what it received is gone"
    assert not list((state_dir / "incoming").iterdir()), "and it is no longer in progress"


class ConfinedJob(Job):
    """A `--rootfs host` container whose user (not root) appends numbered records to a file in its layer."""

    def __init__(self, node: Node, *options: str) -> None:  # not Job's: it runs a command of its own
        self.name = unique_name("conf")
        argv = ["run", "--name", self.name, "--rootfs", "host", "--user", str(USER), *options]
        started = node.kerrickpt(*argv, "--", "sh", "-c", STEPS)
        assert started.returncode == 0, started.stderr
        wait_for(lambda: len(ticks(self.log(node))) > 3, what="steps")

    def steps(self, node: Node) -> list[int]:
        """The records in the file on `node`'s copy of its layer."""
        return steps_written(node.state_dir, self.name)


def assert_moved_with_its_files(cluster: Cluster, job: ConfinedJob) -> None:
    """Node b alone runs it, as its user, its file and its log going on with no record lost or written twice."""
    a, b = cluster.nodes
    assert running_copies(cluster, job) == ["b"]
    assert_nothing_left(a, job)
    assert not list((a.state_dir / "idranges").glob("[ug]id-*")), "a's id range claims were released"
    assert len(list((b.state_dir / "idranges").glob("[ug]id-*"))) == 2, "b holds a uid and a gid range for it"
    job.keeps_counting(b)
    numbers = ticks(job.log(b))
    assert numbers == list(range(1, len(numbers) + 1)), "the counter went on where it stopped"
    written = job.steps(b)
    assert len(written) >= numbers[-1] - 1 and written == list(range(1, len(written) + 1)), "no record lost or twice"
    uid = b.kerrickpt("exec", job.name, "--", "id", "-u")
    assert uid.returncode == 0 and uid.stdout.strip() == str(USER), uid.stderr


def test_a_confined_container_migrates_with_its_files(cluster: Cluster) -> None:
    a, b = cluster.nodes
    job = ConfinedJob(a)

    result = migrate(cluster, a, b, job)

    assert result.returncode == 0, result.stderr
    assert_moved_with_its_files(cluster, job)


def assert_refused_before_the_freeze(
    cluster: Cluster, job: ConfinedJob, result: subprocess.CompletedProcess[str]
) -> None:
    """The target refused it in the pre-flight: a kept running, never frozen, and b holds nothing of it."""
    a, b = cluster.nodes
    assert result.returncode == 7, result.stderr
    assert json.loads(result.stdout)["error"] == "NodeIncompatibleError"
    assert running_copies(cluster, job) == ["a"]
    assert_nothing_left(b, job)
    job.keeps_counting(a)
    assert not (a.state_dir / "migrations").exists() or not list((a.state_dir / "migrations").iterdir())


def test_a_target_lacking_a_volume_of_a_confined_container_is_refused_before_the_freeze(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b = cluster.nodes
    source = tmp_path / "volume"
    source.mkdir()
    job = ConfinedJob(a, "--volume", f"{source}:/data")
    source.rmdir()  # the nodes share one file system: b has it no more (the bind inside a stays)

    result = migrate(cluster, a, b, job)

    assert f"its volume {source} is not here" in result.stderr
    assert_refused_before_the_freeze(cluster, job, result)


def without_user_namespaces(node: Node) -> list[str]:
    """The argv prefix that runs a program as if on a node without user namespaces: in a mount namespace of
    its own, where /proc/sys/user/max_user_namespaces reads 0. The real sysctl is global (every process on
    the machine, other tests too, would lose user namespaces) and root here may not write it: without
    CAP_SYS_RESOURCE it is read-only."""
    zero = node.workdir / "max_user_namespaces"
    zero.write_text("0\n")
    script = f'mount --bind "{zero}" /proc/sys/user/max_user_namespaces && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]


def test_a_target_without_user_namespaces_is_refused_before_the_freeze(cluster: Cluster) -> None:
    a, b = cluster.nodes
    job = ConfinedJob(a)
    prefix = without_user_namespaces(b)
    checked = subprocess.run(
        [*prefix, kerrickpt_path(), "check", "--json"], env={**os.environ, **b.env()}, capture_output=True, text=True
    )
    assert json.loads(checked.stdout)["features"]["user_namespaces"] is False, checked.stderr
    b.stop_sshd()
    # b's sshd, and every kerrickpt it starts, sees the 0; it dies with the cluster (or with the next restart).
    assert b.sshd is None
    b.sshd = subprocess.Popen(
        [*prefix, "nsenter", f"--net=/run/netns/{b.netns}", SSHD, "-D", "-e", "-f", str(b.workdir / "sshd_config")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cluster.wait_for_sshd(b)

    result = migrate(cluster, a, b, job)

    assert "no user_namespaces here" in result.stderr
    assert_refused_before_the_freeze(cluster, job, result)


def test_lazy_migration_of_a_confined_container_without_userfaultfd_in_user_namespaces_is_refused_before_the_freeze(
    cluster: Cluster, big_pipes: None
) -> None:
    a, b = cluster.nodes
    job = ConfinedJob(a)
    if node.UNPRIVILEGED_USERFAULTFD.read_text().strip() == "1":
        pytest.fail("this machine allows userfaultfd in user namespaces already: the refusal cannot be seen")

    result = migrate(cluster, a, b, job, "--lazy")

    assert result.returncode == 3, result.stderr
    assert "vm.unprivileged_userfaultfd=1" in result.stderr and "Nothing was frozen" in result.stderr
    assert running_copies(cluster, job) == ["a"]
    assert_nothing_left(b, job)
    job.keeps_counting(a)


def test_lazy_migration_of_a_confined_container_moves_it_with_its_files(
    cluster: Cluster, big_pipes: None, userfaultfd_in_user_namespaces: None
) -> None:
    a, b = cluster.nodes
    job = ConfinedJob(a)

    result = migrate(cluster, a, b, job, "--lazy")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["lazy"] is True
    assert_moved_with_its_files(cluster, job)
