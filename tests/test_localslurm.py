"""The local Slurm cluster: it comes up, runs jobs as the test user, preempts and requeues them, and leaves nothing."""

from __future__ import annotations

import contextlib
import datetime
import os
import pwd
import re
import select
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kerrickpt.localslurm import HIGH, LOW, TEST_USER, LocalSlurm
from tests.helpers import wait_for

pytestmark = pytest.mark.root

TIMEOUT = 120.0  # Slurm's own timers make these waits seconds long; a loaded machine makes them longer
REQUEUE_ME = 85  # the RequeueExit code of these tests

# Counts its runs in its output (appended to over requeues) and says which signal reached the batch shell.
LOOPING = f"""#!/bin/sh
run=${{SLURM_RESTART_COUNT:-0}}
echo "start $run on $SLURMD_NODENAME"
trap 'echo "USR1 $run"; exit {REQUEUE_ME}' USR1
trap 'echo "TERM $run at $(date +%s)"; exit 0' TERM
while :; do sleep 0.1; done
"""

# On SIGTERM, asks slurmctld (from inside the job, on its node) how many times the job was requeued.
ASKING = """#!/bin/sh
run=${SLURM_RESTART_COUNT:-0}
echo "start $run on $SLURMD_NODENAME"
trap 'echo "TERM $run $(scontrol show job --oneliner $SLURM_JOB_ID | grep -o "Restarts=[0-9]*")"; exit 0' TERM
while :; do sleep 0.1; done
"""


def wait_until(predicate: Callable[[], object], what: str) -> None:
    wait_for(predicate, TIMEOUT, what, interval=0.2)  # each poll asks slurmctld


def state(slurm: LocalSlurm, job: int) -> str:
    return slurm.job(job)["JobState"]


def wait_running(slurm: LocalSlurm, job: int, restarts: int = 0) -> str:
    """Wait until the job runs (its `restarts`-th requeue); returns its node."""

    def running() -> bool:
        fields = slurm.job(job)
        return fields["JobState"] == "RUNNING" and fields["Restarts"] == str(restarts)

    wait_until(running, f"job {job} running after {restarts} requeues")
    return slurm.job(job)["NodeList"]


def output(slurm: LocalSlurm, job: int) -> str:
    path = slurm.jobs_dir / f"job-{job}.out"
    return path.read_text() if path.exists() else ""


def events(slurm: LocalSlurm, job: int) -> list[str]:
    """The script's own lines, without what slurmstepd and the shell add when the job is killed."""
    return re.findall(r"^(?:start|USR1|TERM) .*$", output(slurm, job), re.M)


def submit(slurm: LocalSlurm, script: str, *args: str) -> int:
    return slurm.submit(script, "--output=job-%j.out", "--open-mode=append", *args)


def other(slurm: LocalSlurm, node: str) -> str:
    return next(name for name in slurm.names if name != node)


def test_comes_up_idle_and_runs_a_batch_job_as_the_test_user() -> None:
    with LocalSlurm() as slurm:
        assert slurm.node_states() == dict.fromkeys(slurm.names, "idle")
        job = submit(slurm, "#!/bin/sh\nid -un\nhostname\necho $SLURMD_NODENAME\n")
        wait_until(lambda: state(slurm, job) == "COMPLETED", f"job {job} completed")
        node = slurm.job(job)["NodeList"]
        assert node in slurm.names
        assert output(slurm, job).split() == [TEST_USER, node, node], "its own user, on its node's host name"
        path = slurm.jobs_dir / f"job-{job}.out"
        assert path.stat().st_uid == pwd.getpwnam(TEST_USER).pw_uid
        assert slurm.job(job)["ExitCode"] == "0:0"


def test_preemption_signals_the_batch_shell_at_once_and_requeues_the_job_on_its_exit_code() -> None:
    """--signal=B:USR1 reaches the batch shell when a HIGH job needs its node; RequeueExit requeues it."""
    with LocalSlurm(grace_time=120, requeue_exit=[REQUEUE_ME]) as slurm:
        low = submit(slurm, LOOPING, f"--partition={LOW}", "--signal=B:USR1")
        node = wait_running(slurm, low)
        wait_until(lambda: "start 0" in output(slurm, low), "the low job's script started")
        high = submit(slurm, "#!/bin/sh\nexec sleep 600\n", f"--partition={HIGH}", f"--nodelist={node}")
        wait_until(lambda: state(slurm, high) == "RUNNING", "the high job running")
        assert slurm.job(high)["NodeList"] == node
        assert "USR1 0" in output(slurm, low), "the batch shell had the signal, well within its grace time"
        assert wait_running(slurm, low, restarts=1) == other(slurm, node), "requeued, on the node still free"
        wait_until(lambda: "start 1" in output(slurm, low), "the low job's script started again")
        assert events(slurm, low) == [f"start 0 on {node}", "USR1 0", f"start 1 on {other(slurm, node)}"]


def test_a_preempted_batch_shell_exiting_with_a_code_not_in_requeue_exit_ends_the_job() -> None:
    with LocalSlurm(grace_time=120) as slurm:
        low = submit(slurm, LOOPING, f"--partition={LOW}", "--signal=B:USR1")
        node = wait_running(slurm, low)
        wait_until(lambda: "start 0" in output(slurm, low), "the low job's script started")
        high = submit(slurm, "#!/bin/sh\nexec sleep 600\n", f"--partition={HIGH}", f"--nodelist={node}")
        wait_until(lambda: state(slurm, high) == "RUNNING", "the high job running")
        wait_until(lambda: state(slurm, low) != "COMPLETING", "the low job ended")
        fields = slurm.job(low)
        assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", f"{REQUEUE_ME}:0", "0")


def test_without_a_batch_signal_the_batch_shell_gets_sigterm_only_when_the_grace_time_is_over() -> None:
    grace = 5
    with LocalSlurm(grace_time=grace) as slurm:
        low = submit(slurm, LOOPING, f"--partition={LOW}")
        node = wait_running(slurm, low)
        wait_until(lambda: "start 0" in output(slurm, low), "the low job's script started")
        high = submit(slurm, "#!/bin/sh\nexec sleep 600\n", f"--partition={HIGH}", f"--nodelist={node}")
        wait_until(lambda: state(slurm, high) == "RUNNING", "the high job running")
        term = re.fullmatch(r"TERM 0 at (\d+)", events(slurm, low)[-1])
        assert term, output(slurm, low)
        submitted = datetime.datetime.fromisoformat(slurm.job(high)["SubmitTime"]).timestamp()
        # A lower bound, safe under load: the shell's SIGTERM came after the grace time, not at preemption.
        assert int(term.group(1)) >= submitted + grace - 1
        assert wait_running(slurm, low, restarts=1) == other(slurm, node)
        wait_until(lambda: "start 1" in output(slurm, low), "the low job's script started again")
        assert [e.split()[0] for e in events(slurm, low)] == ["start", "TERM", "start"]


def test_scontrol_requeue_sends_sigterm_and_runs_the_job_again() -> None:
    with LocalSlurm() as slurm:
        job = submit(slurm, LOOPING)
        wait_running(slurm, job)
        wait_until(lambda: "start 0" in output(slurm, job), "the job's script started")
        slurm.run("scontrol", "requeue", str(job))
        wait_running(slurm, job, restarts=1)
        wait_until(lambda: "start 1" in output(slurm, job), "the job's script started again")
        assert [e.split()[:2] for e in events(slurm, job)] == [["start", "0"], ["TERM", "0"], ["start", "1"]]


def test_inside_the_job_scontrol_tells_a_requeue_from_an_scancel_by_its_restart_count() -> None:
    """Both send the batch shell SIGTERM; a requeue has counted the restart by then, scancel has not."""
    with LocalSlurm() as slurm:
        requeued, cancelled = submit(slurm, ASKING), submit(slurm, ASKING)
        for job in (requeued, cancelled):
            wait_running(slurm, job)
            wait_until(lambda job=job: "start 0" in output(slurm, job), f"job {job}'s script started")
        slurm.run("scontrol", "requeue", str(requeued))
        slurm.run("scancel", str(cancelled))
        wait_until(lambda: state(slurm, cancelled) == "CANCELLED", "the cancelled job ended")
        wait_running(slurm, requeued, restarts=1)
        wait_until(lambda: "start 1" in output(slurm, requeued), "the requeued job's script started again")
        assert [e.split()[:3] for e in events(slurm, requeued)] == [
            ["start", "0", "on"],
            ["TERM", "0", "Restarts=1"],
            ["start", "1", "on"],
        ]
        assert [e.split()[:3] for e in events(slurm, cancelled)] == [["start", "0", "on"], ["TERM", "0", "Restarts=0"]]


def test_a_drained_node_keeps_its_job_until_it_is_requeued_and_it_runs_again_on_the_other_node() -> None:
    with LocalSlurm() as slurm:
        job = submit(slurm, LOOPING)
        node = wait_running(slurm, job)
        wait_until(lambda: "start 0" in output(slurm, job), "the job's script started")
        slurm.run("scontrol", "update", f"nodename={node}", "state=drain", "reason=kerrickpt-test")
        wait_until(lambda: slurm.node_states()[node] == "drng", "the node draining")
        assert state(slurm, job) == "RUNNING", "draining does not stop a running job"
        slurm.run("scontrol", "requeue", str(job))
        assert wait_running(slurm, job, restarts=1) == other(slurm, node)
        wait_until(lambda: "start 1" in output(slurm, job), "the job's script started again")
        assert slurm.node_states()[node] == "drain"
        assert [e.split()[:2] for e in events(slurm, job)] == [["start", "0"], ["TERM", "0"], ["start", "1"]]


def test_with_job_cgroups_a_job_runs_in_a_cgroup_of_its_own_with_its_memory_limit() -> None:
    with LocalSlurm(job_cgroups=True) as slurm:
        job = submit(slurm, "#!/bin/sh\ncat /proc/self/cgroup\nexec sleep 600\n", "--mem=64M")
        node = wait_running(slurm, job)
        wait_until(lambda: f"job_{job}" in output(slurm, job), "the job's cgroups listed")
        job_path = f"slurm_{node}/uid_{pwd.getpwnam(TEST_USER).pw_uid}/job_{job}"
        assert f"/{job_path}/step_batch" in output(slurm, job)
        limits = [
            int((top.parent / job_path / name).read_text())
            for top in slurm.job_cgroup_dirs()
            for name in ("memory.limit_in_bytes", "memory.max")
            if (top.parent / job_path / name).exists()
        ]
        assert limits == [64 * 2**20]
        trees = slurm.job_cgroup_dirs()
    assert not [tree for tree in trees if tree.exists()], "closing removed Slurm's cgroups too"


def commands(pids: list[int]) -> set[str]:
    """The command names of those processes still there."""
    names = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def pidfds(pids: list[int]) -> list[int]:
    """A pidfd of each process still there: it tells when that process, and no later one with its PID, is gone."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    return fds


def test_closing_leaves_no_process_namespace_cgroup_or_file() -> None:
    everything = {"munged", "slurmctld", "slurmd", "slurmstepd", "sleep"}
    with LocalSlurm() as slurm:
        job = submit(slurm, "#!/bin/sh\nexec sleep 600\n")
        wait_running(slurm, job)
        wait_until(lambda: everything <= commands(slurm.daemon_pids()), "the daemons and the job's sleep")
        fds = pidfds(slurm.daemon_pids())
        netns = [node.netns for node in slurm.cluster.nodes]
        cgroup_dirs = slurm.cgroup_dirs()
        directory = slurm.dir
    try:
        running = [fd for fd in fds if not select.select([fd], [], [], 0)[0]]
        assert not running, f"{len(running)} processes of the cluster are still running"
    finally:
        for fd in fds:
            os.close(fd)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [name for name in netns if re.search(rf"^{name}\b", listed, re.M)]
    assert not [path for path in cgroup_dirs if path.exists()]
    assert not directory.exists()
