"""Owns the Python API of a batch job: a `Job` runs the job's supervisor (kerrickpt.supervisor) in a helper program
of its own, which alone becomes the subreaper of the container's init, and passes `preempt()` and `cancel()` on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kerrickpt import containers, errors, helper
from kerrickpt.errors import HostError, KerrickptError, UsageError
from kerrickpt.events import Events, descriptor
from kerrickpt.supervisor import JobResult, Supervisor

PREEMPT, CANCEL = signal.SIGUSR1, signal.SIGUSR2  # what the helper takes from its Job
# Its own end, e.g. the caller's terminal closed or Ctrl-C to the caller's process group: cancel, never leave
# the container unwatched.
ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Job:
    """A batch job (see Supervisor, and the README's Preemptible jobs). `run()` blocks until the job's command
    ends by itself or the job is preempted or cancelled; `preempt()` and `cancel()` may come from any thread,
    before or while it runs. A calling process with threads stays fit for them: the supervisor, which becomes
    the container's subreaper and reaps it, is a process of its own. `stdout`, `stderr` (regular files) and
    an `events` of `fd:N` are descriptors the helper gets at the same numbers."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        directory: Path | str,
        *,
        events: str | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        **settings: Any,
    ) -> None:
        """`settings`: Supervisor's (state_dir, every, grace, keep, in_own_cgroup, level) and `containers.run`'s
        container options; JSON-able, for the helper gets them so."""
        if not argv:
            raise UsageError("no command given to run")
        self.order: dict[str, Any] = {
            "name": containers.check_name(name),
            "argv": list(argv),
            "directory": str(Path(directory).absolute()),
            "events": events,
            "stdout": stdout,
            "stderr": stderr,
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in settings.items()},
        }
        given = [stdout, stderr, descriptor(events)]
        self.fds = sorted({fd for fd in given if fd is not None})
        self.process: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.asked: list[signal.Signals] = []  # before the helper could take them

    def preempt(self) -> None:
        """Checkpoint and stop, within the grace time; the result is `requeue`."""
        self._ask(PREEMPT)

    def cancel(self) -> None:
        """Stop without a checkpoint (the one there is stays); the result is `cancelled`."""
        self._ask(CANCEL)

    def _ask(self, signum: signal.Signals) -> None:
        with self.lock:
            if self.process is None:
                self.asked.append(signum)
            elif self.process.returncode is None:
                self.process.send_signal(signum)

    def run(self) -> JobResult:
        """Resume or start the job and wait until it ends: its JobResult, or the KerrickptError it failed with."""
        copies = {fd: helper.above_stdio(fd) for fd in self.fds}
        try:
            process = helper.start("job", pass_fds=list(copies.values()), stdout=subprocess.PIPE)
        finally:
            for copy in copies.values():
                os.close(copy)
        helper.send(process, _renumbered(self.order, copies))
        assert process.stdout is not None
        said: dict[str, Any] = {}
        with process.stdout:
            for line in process.stdout:
                message = json.loads(line)
                if message.get("ready"):
                    with self.lock:  # its handlers are in place: what was asked before goes now
                        self.process = process
                        for signum in self.asked:
                            process.send_signal(signum)
                said.update(message)
        with self.lock:
            process.wait()
        if "result" in said:
            return JobResult(**said["result"])
        if "error" in said:
            raise errors.from_dict(said["error"])
        raise KerrickptError(f"the job's supervisor died without an answer (exit code {process.returncode})")


def _renumbered(order: dict[str, Any], copies: dict[int, int]) -> dict[str, Any]:
    events = order["events"]
    fd = descriptor(events)
    if fd is not None:
        events = f"fd:{copies[fd]}"
    stdio = {key: None if order[key] is None else copies[order[key]] for key in ("stdout", "stderr")}
    return {**order, **stdio, "events": events}


def job(name: str, argv: Sequence[str], directory: Path | str, **options: Any) -> JobResult:
    """Run a job to its end (`Job(...).run()`): the call a scheduler written in Python makes."""
    return Job(name, argv, directory, **options).run()


def main(order: dict[str, Any]) -> None:  # pragma: no cover - the helper program
    """Supervise the job; say {"ready": true} once a signal from the Job is taken, then {"result": ...} or
    {"error": ...}."""
    try:
        events = Events.open(order.pop("events"), order["name"])
        supervisor = Supervisor(order.pop("name"), order.pop("argv"), order.pop("directory"), events=events,
                                **order.pop("settings"), **order)  # fmt: skip
        signal.signal(PREEMPT, lambda _signum, _frame: supervisor.preempt())
        signal.signal(CANCEL, lambda _signum, _frame: supervisor.cancel())
        for ending in ENDING:
            signal.signal(ending, lambda signum, _frame: supervisor.cancel(signum))
        _say({"ready": True})
        _say({"result": supervisor.run().to_dict()})
    except KerrickptError as exc:
        _say({"error": exc.to_dict()})
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _say({"error": HostError(f"{exc.strerror or exc}{where}").to_dict()})


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)
