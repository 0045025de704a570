"""Owns the job case: one workload preempted and requeued under `kerrickpt job`, and the same under DMTCP.

Three numbers each, as a Slurm job sees them: from the preemption signal until the
checkpoint is complete, the checkpoint's size, and from the requeued job's start until the
workload runs again. The workload counts its wake-ups into a file (memload --ticks); the
count is zeroed before the restart, so the first non-zero count is the restored workload
running. Both run the same dynamically linked memload (DMTCP preloads itself into it) with
its output appended to a log, and the restored workload's memory is verified as in every case.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bench import dmtcp
from bench.lab import MIB, READY, BenchError, Lab, Runner, removed, timeout_for, verify, wait_for, wait_for_line
from kerrickpt import command
from kerrickpt.localnodes import kerrickpt_path

REQUEUE_EXIT = 85  # `kerrickpt job`: checkpointed, requeue me
TICKS_ZERO = b"0" * 20 + b"\n"  # what memload writes, at count 0: the file keeps its size


def parse_ticks(text: str) -> int:
    """memload's count from its ticks file; 0 for a file it has not written yet."""
    return int(text) if text.strip() else 0


def parse_events(text: str) -> list[dict[str, Any]]:
    """The events `kerrickpt job --events` appended, one JSON object a line, oldest first."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def last_event(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for event in reversed(events):
        if event.get("event") == name:
            return event
    raise BenchError(f"kerrickpt job logged no {name!r} event; it logged {[e.get('event') for e in events]}")


def workload(lab: Lab, mib: int, kind: str, work: Path) -> list[str]:
    """memload counting into work/ticks, its output appended to work/log (a file it opens itself, so a restored
    copy writes on there whatever the restorer does with its own output)."""
    memload = [str(lab.dynamic_binary), "--ticks", str(work / "ticks"), str(mib), kind]
    return ["/bin/sh", "-c", f"exec {shlex.join(memload)} >>{shlex.quote(str(work / 'log'))} 2>&1"]


def wait_running(ticks: Path, timeout: float, runner: Runner) -> float:
    """Poll the ticks file until its count is above 0; the monotonic time it was first seen so."""
    return wait_for(lambda: time.monotonic() if _count(ticks) > 0 else None, timeout, f"count in {ticks}",
                    runner=runner)  # fmt: skip


def _count(ticks: Path) -> int:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return parse_ticks(ticks.read_text())
    return 0


def holder(ticks: Path) -> int:
    """The PID of the process holding the ticks file open: the restored workload, whatever restored it."""
    target = str(ticks)
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{pid}/fd")
            if any(os.readlink(fds / fd) == target for fd in os.listdir(fds)):
                return pid
    raise BenchError(f"no process holds {ticks} open")


def started(work: Path, mib: int, runner: Runner) -> str:
    """Wait until the workload `runner` started filled its memory and counts; the memory's sum it reported."""
    expected = wait_for_line(work / "log", READY, 0, timeout_for(mib), runner=runner).group(1)
    wait_running(work / "ticks", timeout_for(mib), runner)
    return expected


def resumed(work: Path, expected: str, mib: int, restart_at: float, runner: Runner) -> tuple[float, bool]:
    """Seconds from `restart_at` until the workload `runner` restores counts, and whether its memory is as written."""
    running_at = wait_running(work / "ticks", timeout_for(mib), runner)
    return running_at - restart_at, verify(work / "log", holder(work / "ticks"), expected, mib)


def under_dmtcp(lab: Lab, mib: int, kind: str) -> tuple[dict[str, float], dict[str, bool]]:
    """dmtcp_launch, `dmtcp_command --bcheckpoint`, the whole computation killed, dmtcp_restart."""
    tool = lab.baseline("dmtcp", dmtcp.baseline)
    limit = timeout_for(mib)
    with lab.scratch("dmtcp") as work, contextlib.ExitStack() as cleanup:
        work.chmod(0o700)
        cleanup.callback(tool.kill_all)
        session = dmtcp.Session(tool, work)
        launched = session.launch(workload(lab, mib, kind, work), work / "dmtcp.log")
        expected = started(work, mib, launched)
        checkpoint_s = session.checkpoint(limit)
        size = session.image_bytes()
        tool.kill_all()  # preempted: the job and its coordinator end
        (work / "ticks").write_bytes(TICKS_ZERO)
        restart_at = time.monotonic()
        restarted = session.restart(work / "dmtcp.log")
        resume_s, ok = resumed(work, expected, mib, restart_at, restarted)
    return ({"dmtcp.checkpoint_s": checkpoint_s, "dmtcp.image_mib": size / MIB, "dmtcp.resume_s": resume_s},
            {"dmtcp.restart": ok})  # fmt: skip


def under_kerrickpt(lab: Lab, mib: int, kind: str) -> tuple[dict[str, float], dict[str, bool]]:
    """`kerrickpt job` on node a, SIGTERM until it exits 85, then `kerrickpt job` again with the same name and dir."""
    node = lab.nodes[0]
    limit = timeout_for(mib)
    with lab.scratch("job") as work, removed(node, work.name):
        work.chmod(0o700)
        name = work.name
        events = work / "events.jsonl"
        argv = ["nsenter", f"--net=/run/netns/{node.netns}", kerrickpt_path(), "job", "--name", name,
                "--dir", str(work / "dir"), "--events", str(events), "--", *workload(lab, mib, kind, work)]  # fmt: skip
        env = {**os.environ, **node.env()}
        with _job(argv, env, work / "job.log") as first:
            expected = started(work, mib, first)
            preempted_at = time.monotonic()
            first.process.send_signal(signal.SIGTERM)
            code = first.process.wait(timeout=limit)
            checkpoint_s = time.monotonic() - preempted_at
        if code != REQUEUE_EXIT:
            raise BenchError(f"kerrickpt job exited {code} after SIGTERM, not {REQUEUE_EXIT}:\n"
                             f"{command.tail_file(work / 'job.log')}")  # fmt: skip
        checkpointed = last_event(parse_events(events.read_text()), "checkpointed")
        (work / "ticks").write_bytes(TICKS_ZERO)
        restart_at = time.monotonic()
        with _job(argv, env, work / "job.log") as second:
            resume_s, ok = resumed(work, expected, mib, restart_at, second)
            last_event(parse_events(events.read_text()), "restored")  # not a fresh start
    return ({"job.checkpoint_s": checkpoint_s, "job.archive_mib": checkpointed["archive_bytes"] / MIB,
             "job.resume_s": resume_s}, {"job.restore": ok})  # fmt: skip


@contextlib.contextmanager
def _job(argv: list[str], env: dict[str, str], log: Path) -> Iterator[Runner]:
    """`kerrickpt job` in the foreground as a batch script runs it; killed (no checkpoint) if still running after.

    Its output comes through a pipe, copied to `log`: the workload writes a log of its own, and with a regular file
    for stdout `kerrickpt job` would hand that file to the container (Slurm's case), a step this case leaves out.
    """
    process = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    copier = threading.Thread(target=_copy, args=(process.stdout, log), daemon=True)
    copier.start()
    try:
        yield Runner(process, log, copier)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        copier.join(timeout=60)


def _copy(source: IO[bytes], log: Path) -> None:
    with source, log.open("ab", buffering=0) as out:
        for line in source:
            out.write(line)
