"""Owns a throwaway Slurm cluster on this machine, for the tests (and the benchmark and example of issue 14 to come).

munged, slurmctld and one slurmd per local node (see localnodes.py), every file they use in a
private directory: the machine's /etc/slurm and /etc/munge are never read nor written. The
controller is a node of its own (its own network and UTS namespaces), so nothing listens on the
host's network and two such clusters never share a port. Each daemon runs in a cgroup of its
own under its node's cgroup parent: closing the cluster kills every process a daemon started,
the jobs' included, and never one it did not; then it removes the job cgroups Slurm made.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kerrickpt import cgroups, command
from kerrickpt.localnodes import PATH, Cluster, Node

TEST_USER = "kerrickpt-test"  # the unprivileged user jobs run as; ci/setup creates it
MUNGE_USER = "munge"
CONTROLLER = "ctl"  # the controller's host name
LOW, HIGH = "low", "high"  # partitions on every node: a job in HIGH preempts (requeues) one in LOW
START_TIMEOUT = 60.0
CLIENT_TIMEOUT = 30.0
# The main scheduling loop and backfill, every few seconds rather than every 60 and 30 s, so that
# a preempting job starts within seconds; a requeued job may start again after cred_expire
# (at least 5 s) rather than 120 s.
SCHEDULER_PARAMETERS = "sched_interval=2,bf_interval=1"
CRED_EXPIRE = 5
REAL_MEMORY_MB = 2048  # what a node offers to `--mem`; less than any test machine has
# With job_cgroups: Slurm's own cgroup per job (cgroup v1 on hybrid hosts), its memory limited to `--mem`.
CGROUP_CONF = "CgroupPlugin=autodetect\nConstrainRAMSpace=yes\n"


@dataclass(frozen=True)
class _Daemon:
    name: str
    process: subprocess.Popen[bytes]
    cgroup: cgroups.Cgroup
    log: Path  # where its output goes, the first place to look when it exits early


_CGROUPFS = ("cgroup", "cgroup2")


class SlurmError(RuntimeError):
    """A daemon of the local Slurm cluster did not come up, or a Slurm command failed."""


class LocalSlurm:
    """munged and slurmctld on a controller node, one slurmd on each of `count` compute nodes.

    Two partitions span every compute node: LOW (PriorityTier=1, PreemptMode=REQUEUE with
    `grace_time`) and HIGH (PriorityTier=2), with PreemptType=preempt/partition_prio and
    JobRequeue=1, so a HIGH job needing a LOW job's node has Slurm requeue the LOW job.

    How a LOW job's batch script learns of it (Slurm 22.05, found by the tests): at once only
    if it was submitted with `--signal=B:SIG` (preempt_send_user_signal is set), for the
    SIGTERM of the grace time reaches job steps, never the batch shell. Without it the script
    gets SIGTERM only when the grace time is over and slurmctld's periodic check (every 30 s,
    not configurable) requeues the job, and then `kill_wait` seconds (KillWait) until SIGKILL,
    as on `scontrol requeue`. A script that exits with a code in `requeue_exit` (RequeueExit)
    is requeued; one that exits with another code during its grace time ends the job.

    Slurm tracks a job's processes by their tree, or with `job_cgroups` in a cgroup of the job's
    own (proctrack/cgroup, task/cgroup), which `--mem` limits.
    """

    def __init__(
        self,
        count: int = 2,
        *,
        grace_time: int = 30,
        kill_wait: int = 30,
        requeue_exit: Sequence[int] = (),
        job_cgroups: bool = False,
    ) -> None:
        self.grace_time = grace_time
        self.kill_wait = kill_wait
        self.requeue_exit = tuple(requeue_exit)
        self.job_cgroups = job_cgroups
        self._daemons: list[_Daemon] = []
        self.dir = Path(tempfile.mkdtemp(prefix="kerrickpt-slurm-"))
        self.dir.chmod(0o755)  # the test user's commands read the configuration
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.jobs_dir = self.dir / "jobs"
        try:
            self.cluster = Cluster(count + 1, start_sshd=False)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        *self.nodes, self.controller = self.cluster.nodes
        # Unique on this machine: Slurm names its cgroups after them (slurm_NAME in each hierarchy).
        self.names = [f"kpt{self.cluster.id}{node.name}" for node in self.nodes]
        try:
            self._write_files()
            self._start_munged()
            self._start_slurmctld()
            for node in self.nodes:
                self._start_slurmd(node)
            self.wait_idle()
        except BaseException:
            self.close()
            raise

    def _write_files(self) -> None:
        test_user = _user(TEST_USER)
        self.jobs_dir.mkdir()
        os.chown(self.jobs_dir, test_user.pw_uid, test_user.pw_gid)
        munge_user = _user(MUNGE_USER)
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o755)  # clients of every user reach the socket in it
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (munge_dir, key):
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        (self.dir / "ctld").mkdir(mode=0o700)
        for node in self.nodes:
            self.node_dir(node).mkdir(mode=0o755, parents=True)
        self.conf.write_text(self._slurm_conf())
        if self.job_cgroups:
            (self.dir / "cgroup.conf").write_text(CGROUP_CONF)

    def _slurm_conf(self) -> str:
        names = ",".join(self.names)
        lines = [
            f"ClusterName=kpt{self.cluster.id}",
            f"SlurmctldHost={CONTROLLER}({self.controller.address})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}",
            f"StateSaveLocation={self.dir}/ctld",
            f"SlurmctldPidFile={self.dir}/ctld/slurmctld.pid",
            f"SlurmctldLogFile={self.dir}/ctld/slurmctld.log",
            f"SlurmdSpoolDir={self.dir}/nodes/%n/spool",
            f"SlurmdPidFile={self.dir}/nodes/%n/slurmd.pid",
            f"SlurmdLogFile={self.dir}/nodes/%n/slurmd.log",
            *(
                ["ProctrackType=proctrack/cgroup", "TaskPlugin=task/cgroup"]
                if self.job_cgroups
                else ["ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none"]
            ),
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",  # memory allocated, so that --mem limits a job cgroup
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",  # a finished job stays in `scontrol show job` for the test to read
            f"KillWait={self.kill_wait}",
            "MessageTimeout=5",
            "SlurmctldTimeout=10",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            f"SchedulerParameters={SCHEDULER_PARAMETERS}",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "PreemptExemptTime=0",
            "SlurmctldParameters=preempt_send_user_signal",
            *([f"RequeueExit={','.join(map(str, self.requeue_exit))}"] if self.requeue_exit else []),
            *[
                f"NodeName={name} NodeAddr={node.address} CPUs=1 RealMemory={REAL_MEMORY_MB} State=UNKNOWN"
                for name, node in zip(self.names, self.nodes, strict=True)
            ],
            f"PartitionName={LOW} Nodes={names} Default=YES MaxTime=INFINITE State=UP"
            f" PriorityTier=1 PreemptMode=REQUEUE GraceTime={self.grace_time}",
            f"PartitionName={HIGH} Nodes={names} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF",
        ]
        return "\n".join(lines) + "\n"

    def _spawn(self, node: Node, name: str, argv: Sequence[str], log: Path) -> None:
        """Start a daemon in the foreground, in a new cgroup `name` under the node's cgroup parent."""
        layout = cgroups.detect()
        group = cgroups.Cgroup(tuple(root / node.cgroup_parent / name for root in layout.roots()))
        for path in group.dirs:
            path.mkdir(parents=True)
        try:
            with log.open("ab") as out:
                process = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    env={"PATH": PATH, "SLURM_CONF": str(self.conf)},
                    preexec_fn=lambda: group.add(os.getpid()),  # in the cgroup before it can fork
                )
        except BaseException:
            group.remove()  # not one of _daemons yet: close() would not find it
            raise
        self._daemons.append(_Daemon(name, process, group, log))

    def _in_node(self, node: Node, hostname: str, argv: Sequence[str]) -> list[str]:
        """argv run in the node's network namespace and a UTS namespace named `hostname`, by exec."""
        return [
            "nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts",
            "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv,
        ]  # fmt: skip

    def _start_munged(self) -> None:
        munge_dir = self.munge_socket.parent
        argv = [
            "setpriv", f"--reuid={MUNGE_USER}", f"--regid={MUNGE_USER}", "--clear-groups",
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={munge_dir / 'munge.key'}", f"--log-file={munge_dir / 'munged.log'}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}",
        ]  # fmt: skip
        self._spawn(self.controller, "munged", argv, munge_dir / "munged.out")
        self._wait(self._munge_answers, "munged answering")

    def _munge_answers(self) -> bool:
        if not self.munge_socket.exists():
            return False
        probe = command.run(["munge", f"--socket={self.munge_socket}", "--no-input"], timeout=CLIENT_TIMEOUT)
        return probe.returncode == 0

    def _start_slurmctld(self) -> None:
        argv = self._in_node(self.controller, CONTROLLER, ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn(self.controller, "slurmctld", argv, self.dir / "ctld" / "slurmctld.out")
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld answering")

    def _start_slurmd(self, node: Node) -> None:
        name = self.name(node)
        argv = self._in_node(node, name, ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._spawn(node, "slurmd", argv, self.node_dir(node) / "slurmd.out")

    def _wait(self, ready: Callable[[], object], what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for daemon in self._daemons:
                if daemon.process.poll() is not None:
                    raise SlurmError(
                        f"{daemon.name} exited with {daemon.process.returncode}: {command.tail_file(daemon.log)}"
                    )
            if time.monotonic() > deadline:
                raise SlurmError(f"{what} not within {timeout:.0f} s; slurmctld: {command.tail_file(self.log())}")
            time.sleep(0.2)

    def wait_idle(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every compute node is idle: up, registered and running no job."""
        self._wait(lambda: set(self.node_states().values()) == {"idle"}, "every node idle", timeout)

    def name(self, node: Node) -> str:
        """The node's name in Slurm, and its host name."""
        return self.names[self.nodes.index(node)]

    def node_dir(self, node: Node) -> Path:
        return self.dir / "nodes" / self.name(node)  # %n in slurm.conf

    def log(self, node: Node | None = None) -> Path:
        """slurmctld's log, or the slurmd log of `node`."""
        return self.dir / "ctld" / "slurmctld.log" if node is None else self.node_dir(node) / "slurmd.log"

    def command(self, *argv: str, user: str | None = None) -> list[str]:
        """argv of a Slurm client, run where it reaches the controller, as `user` (default root)."""
        env = [f"SLURM_CONF={self.conf}", f"PATH={PATH}"]
        as_user: list[str] = []
        if user is not None:
            entry = _user(user)
            env += [f"HOME={entry.pw_dir}", f"USER={user}", f"LOGNAME={user}"]
            as_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
        return ["nsenter", f"--net=/run/netns/{self.controller.netns}", *as_user, "env", "-i", *env, *argv]

    def run(
        self, *argv: str, user: str | None = None, check: bool = True, timeout: float = CLIENT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client; with `check`, raise SlurmError if it fails."""
        result = command.run(self.command(*argv, user=user), timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def submit(self, script: str, *sbatch_args: str, user: str = TEST_USER) -> int:
        """Submit a batch script (its text) as `user`, from the jobs directory; returns the job id."""
        path = self.jobs_dir / f"script-{time.monotonic_ns()}.sh"
        path.write_text(script)
        path.chmod(0o644)
        result = self.run("sbatch", "--parsable", f"--chdir={self.jobs_dir}", *sbatch_args, str(path), user=user)
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`'s fields of a job (JobState, Restarts, NodeList, Reason, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def node_states(self) -> dict[str, str]:
        """Each compute node's state as `sinfo -N` gives it (idle, alloc, mix, down*, drain, ...)."""
        result = self.run("sinfo", "--Node", "--noheader", "--format=%N %t", check=False)
        return dict(line.split() for line in result.stdout.splitlines() if line.strip())

    def daemon_pids(self) -> list[int]:
        """Every process the daemons of this cluster run now (munged, slurmctld, slurmds, their jobs)."""
        return sorted({pid for daemon in self._daemons for pid in daemon.cgroup.pids()})

    def cgroup_dirs(self) -> list[Path]:
        """The cgroup directories of the daemons, in every hierarchy."""
        return [path for daemon in self._daemons for path in daemon.cgroup.dirs]

    def close(self) -> None:
        """Kill every daemon and what it started, then remove the nodes and files; each step even if one fails."""
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self.cluster.close)
            cleanup.callback(shutil.rmtree, self.dir, ignore_errors=True)
            cleanup.callback(self._remove_job_cgroups)
            for daemon in self._daemons:  # the slurmds first, munged last
                cleanup.callback(daemon.process.wait, 10)
                cleanup.callback(cgroups.remove_tree, daemon.cgroup)
            self._daemons = []

    def job_cgroup_dirs(self) -> list[Path]:
        """The cgroup trees Slurm made for this cluster's jobs (slurm_NAME in any hierarchy), with job_cgroups."""
        mounts = [line.split()[1] for line in cgroups.MOUNTS.read_text().splitlines() if line.split()[2] in _CGROUPFS]
        return [path for mount in mounts for name in self.names if (path := Path(mount) / f"slurm_{name}").is_dir()]

    def _remove_job_cgroups(self) -> None:
        for top in self.job_cgroup_dirs():
            cgroups.remove_tree(cgroups.Cgroup((top,)))

    def __enter__(self) -> LocalSlurm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise SlurmError(f"user {name} does not exist; ci/setup creates it") from None
