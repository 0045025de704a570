"""Owns what a job asks Slurm from inside its allocation: whether its SIGTERM is a requeue, and how long it has."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from kerrickpt import command
from kerrickpt.errors import CommandTimeout

TIMEOUT = 10.0  # for one scontrol call: slurmctld answers in milliseconds when it is up


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
    """The seconds Slurm leaves a job between its signal and SIGKILL: after SIGTERM, the cluster's KillWait;
    after a preemption signal (`--signal`), the partition's GraceTime (KillWait if it has none). None outside
    Slurm or without an answer."""
    job = job_id(env)
    if job is None:
        return None
    config = _scontrol(["show", "config"], as_user) or {}
    kill_wait = _seconds(config.get("KillWait", ""))
    if signal_is_term:
        return kill_wait
    fields = _scontrol(["show", "job", job], as_user) or {}
    partition = _scontrol(["show", "partition", fields.get("Partition", "")], as_user) or {}
    grace_time = _seconds(partition.get("GraceTime", ""))
    return grace_time if grace_time else kill_wait


def _seconds(text: str) -> float | None:
    """`30` or `30 sec` (scontrol show config): seconds."""
    match = re.match(r"\d+", text)
    return float(match.group()) if match else None
