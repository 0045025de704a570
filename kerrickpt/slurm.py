"""Owns what a job asks Slurm from inside its allocation: whether its SIGTERM is a requeue, and how long it has."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence

from kerrickpt import command
from kerrickpt.errors import CommandTimeout

TIMEOUT = 10.0  # for one scontrol call: slurmctld answers in milliseconds when it is up
TERM_GRACE = 25.0  # after SIGTERM, when Slurm does not say: within its default KillWait, 30 s


def job_id(env: Mapping[str, str] = os.environ) -> str | None:
    """The id of the Slurm job this process runs in, if any."""
    return env.get("SLURM_JOB_ID") or None


def _fields(text: str) -> dict[str, str]:
    """scontrol's `KEY=VALUE` words (`--oneliner`) or `KEY = VALUE` lines (`show config`)."""
    return dict(m.groups() for m in re.finditer(r"(\w+)\s*=\s*(\S*)", text))


def _scontrol(args: Sequence[str], as_user: Sequence[str]) -> dict[str, str] | None:
    """Ask scontrol, as the job's user (`as_user` prefixes the command: the job's SLURM_CONF is theirs to
    choose); None if it cannot answer."""
    try:
        done = command.run([*as_user, "scontrol", *args, "--oneliner"], timeout=TIMEOUT)
    except (OSError, CommandTimeout):
        return None
    return _fields(done.stdout) if done.returncode == 0 else None


def is_requeue(env: Mapping[str, str] = os.environ, as_user: Sequence[str] = ()) -> bool:
    """Whether the SIGTERM this job just had means it goes back to the queue (a requeue, a preemption past its
    grace time, its node set down) rather than `scancel`: Slurm counts the restart before it signals a requeue,
    and never for scancel. Unsure (no answer from slurmctld) counts as a requeue: a checkpoint too many costs
    a little time, one too few the job's work."""
    job = job_id(env)
    if job is None:
        return True
    fields = _scontrol(["show", "job", job], as_user)
    if fields is None or not fields.get("Restarts", "").isdigit():
        return True
    return int(fields["Restarts"]) > int(env.get("SLURM_RESTART_COUNT") or 0)


def grace(signal_is_term: bool, env: Mapping[str, str] = os.environ, as_user: Sequence[str] = ()) -> float | None:
    """The seconds Slurm leaves a job between its signal and SIGKILL: after SIGTERM, the cluster's KillWait
    (TERM_GRACE without an answer); after a preemption signal (`--signal`), the partition's GraceTime (KillWait
    if it has none). None outside Slurm, or after a preemption signal without an answer."""
    job = job_id(env)
    if job is None:
        return None
    kill_wait = _seconds(_config(tuple(as_user)).get("KillWait", ""))
    if signal_is_term:
        return TERM_GRACE if kill_wait is None else kill_wait
    fields = _scontrol(["show", "job", job], as_user) or {}
    partition = _scontrol(["show", "partition", fields.get("Partition", "")], as_user) or {}
    grace_time = _seconds(partition.get("GraceTime", ""))
    return grace_time if grace_time else kill_wait


def escapes_signals(env: Mapping[str, str] = os.environ, as_user: Sequence[str] = ()) -> bool | None:
    """Whether a container beneath this job is out of reach of Slurm's own signals, as kerrickpt needs: so with
    proctrack/cgroup, which signals the members of a step's cgroup and not those of cgroups made beneath it;
    not with proctrack/linuxproc or pgid, which signal the job's whole process tree, where the container's
    processes would get the SIGTERM of a requeue before kerrickpt could checkpoint them. None outside Slurm
    or without an answer."""
    if job_id(env) is None:
        return None
    tracking = _config(tuple(as_user)).get("ProctrackType")
    return None if tracking is None else tracking == "proctrack/cgroup"


@functools.lru_cache(maxsize=4)
def _config(as_user: tuple[str, ...]) -> dict[str, str]:
    """`scontrol show config`, asked once: it does not change under a running job."""
    return _scontrol(["show", "config"], as_user) or {}


def _seconds(text: str) -> float | None:
    """`30` or `30 sec` (scontrol show config): seconds."""
    match = re.match(r"\d+", text)
    return float(match.group()) if match else None
