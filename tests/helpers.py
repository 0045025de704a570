"""Helpers the tests share: names, IPC keys, waiting, reading the workload's state."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kerrickpt
from bench.lab import READY, REDISLOAD
from kerrickpt import cgroups, procs, vfork
from kerrickpt.freezer import Freezer


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def ipc_keys() -> tuple[int, int, int]:
    base = random.randrange(0x10000, 0x7FFF0000)
    return base, base + 1, base + 2


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition", interval: float = 0.02
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


TICK = re.compile(r"^tick (\d+) pid (\d+)$", re.M)


def ticks(text: str) -> list[int]:
    return [int(m.group(1)) for m in TICK.finditer(text)]


COUNT = re.compile(r"^count (\d+)$", re.M)


def counts(text: str) -> list[int]:
    """The counts the job tests' jobcount printed."""
    assert "MISMATCH" not in text, text
    return [int(n) for n in COUNT.findall(text)]


def assert_consecutive(numbers: list[int]) -> None:
    assert numbers, "no ticks"
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "the counter skipped or was reset"


def checkpointed_side_writer(
    memload: Path, mib: int, state_dir: Path, tmp_path: Path, key: kerrickpt.Key | None = None
) -> tuple[str, Path, Path]:
    """A container with `mib` MiB of memory that ticks into a file outside it (opened anew for every tick),
    checkpointed (sealed with `key`, if given): its name, that file, and the archive. A restored tree that ran
    would tick on."""
    side = tmp_path / "side"
    name = unique_name("side")
    script = f"{memload} {mib} mixed & while :; do echo tick >> {side}; sleep 0.02; done"
    kerrickpt.run(name, ["/bin/sh", "-c", script], state_dir=state_dir)
    wait_for(lambda: READY.search((state_dir / "containers" / name / "log").read_text()), timeout=60, what="fill")
    archive = tmp_path / "w.kckpt"
    kerrickpt.checkpoint(name, archive, state_dir=state_dir, key=key)
    return name, side, archive


def archived_log(archive: Path) -> str:
    """The container's log as the archive carries it, read with standard tools."""
    out = subprocess.run(f"zstd -dc '{archive}' | tar -xO log", shell=True, capture_output=True, check=True)
    return out.stdout.decode()


KERRICKPT = [sys.executable, "-m", "kerrickpt.cli.main"]


def finished(run: subprocess.Popen[Any], timeout: float) -> tuple[Any, Any]:
    """`run.communicate(timeout=timeout)`, but a run still going at the timeout is killed and reaped before the
    TimeoutExpired goes on: no test leaves its kerrickpt running."""
    try:
        return run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        run.communicate()
        raise


def cli_env(state_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    if state_dir:
        env["KERRICKPT_STATE_DIR"] = str(state_dir)
    return env | extra


def cli(*args: str, state_dir: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run the real command in its own process, to see its real exit code."""
    env = cli_env(state_dir, **extra_env)
    return subprocess.run([*KERRICKPT, *args], capture_output=True, text=True, env=env, timeout=120)


def probe(workload: Path, host_pid: int, keys: tuple[int, int, int]) -> dict[str, object]:
    """Read the workload's SysV objects from inside the IPC namespace of `host_pid`."""
    out = subprocess.run(
        ["nsenter", "-t", str(host_pid), "-i", str(workload), "probe", *map(str, keys)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return json.loads(out.stdout)


def cgroup_dirs(name: str) -> list[Path]:
    return list(cgroups.existing(cgroups.detect(), name).dirs)


class Workload:
    """A running ipcworkload container: parent, counter child, two-threaded child, SysV objects."""

    def __init__(self, name: str, keys: tuple[int, int, int], state_dir: Path, binary: Path) -> None:
        self.name = name
        self.keys = keys
        self.state_dir = state_dir
        self.binary = binary

    @property
    def status(self) -> kerrickpt.ContainerStatus:
        return next(r for r in kerrickpt.ps(self.state_dir) if r.name == self.name)

    @property
    def log(self) -> str:
        return Path(self.status.log or "").read_text()

    def pid_map(self) -> dict[int, int]:
        pids = cgroups.Cgroup(tuple(Path(p) for p in self.status.cgroup)).pids()
        return {p.ns_pid: p.host_pid for p in procs.read_all(pids)}

    def probe(self) -> dict[str, object]:
        return probe(self.binary, self.status.init_pid, self.keys)

    def wait_ticking(self, beyond: int = 0) -> int:
        """Wait until the counter passes `beyond`; returns the last tick seen."""

        def last() -> int:
            return max(ticks(self.log), default=0)

        return int(wait_for(lambda: last() > beyond + 2 and last(), what="ticks"))


def freezer_roots() -> list[Path]:
    """Every hierarchy with a freezer on this host (cgroup v2, the v1 freezer): tests run through each."""
    layout = cgroups.detect()
    return [r for r in (layout.unified, layout.freezer) if r is not None]


def guardians(freezer: Freezer) -> list[int]:
    """The PIDs of the guardians standing by for `freezer`'s cgroup."""
    control = str(freezer.control(frozen=False)[0]).encode()
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if control in argv and any(arg.endswith(b"guard.py") for arg in argv):
                found.append(int(entry.name))
    return found


def waits_in(pid: int, kernel_function: str) -> bool:
    """Whether the process sleeps in the kernel in a function named like `kernel_function` (its wchan)."""
    return kernel_function in Path(f"/proc/{pid}/wchan").read_text()


COUNTER = Path(__file__).parent / "workload" / "counter.py"
# `run` options of a confined container on the node's own root whose command runs as a user, as services do.
CONFINED_USER = 1000
CONFINED = ("--rootfs", "host", "--user", str(CONFINED_USER))
# A python any user may run, for the counter in a container whose command runs as a user: the venv's may be one
# under /root.
USER_PYTHON = "/usr/bin/python3"


def host_status(pid: int) -> dict[str, str]:
    """/proc/PID/status, by field."""
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())


def uid_inside(pid: int) -> int:
    """The uid host PID `pid` runs as, as its user namespace sees it."""
    host = int(host_status(pid)["Uid"].split()[0])
    for line in Path(f"/proc/{pid}/uid_map").read_text().splitlines():
        inside, outside, count = map(int, line.split())
        if outside <= host < outside + count:
            return inside + host - outside
    raise AssertionError(f"host uid {host} of PID {pid} is unmapped in its own user namespace")


@dataclass
class Client:
    """A client of a redis server (bench/redisload.py's `talk`): INCR of a key of its own every 100 ms over one
    connection, each answer checked to be the previous one plus 1."""

    process: subprocess.Popen[str]
    output: Path
    stop: Path

    @classmethod
    def start(cls, enter: list[str], address: str, port: int, directory: Path) -> Client:
        """One talking to `address`:`port` from where `enter` (an nsenter prefix) puts it; its files in
        `directory`, named for the address (several may talk at once)."""
        output, stop = directory / f"client-{address}.out", directory / f"client-{address}.stop"
        with output.open("w") as out:
            argv = [*enter, sys.executable, str(REDISLOAD), "talk", address, str(port), str(stop)]
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        return cls(process, output, stop)

    def answers(self) -> list[int]:
        return [int(n) for n in re.findall(r"^answer (\d+)$", self.output.read_text(), re.M)]

    def wait_more(self, count: int = 5) -> None:
        """Until `count` more answers came; fails at once if the client gave up."""
        before = len(self.answers())
        wait_for(
            lambda: len(self.answers()) >= before + count or self.process.poll() is not None,
            timeout=60,
            what=f"{count} more answers",
        )
        assert self.process.poll() is None, self.output.read_text()[-500:]

    def finish(self) -> list[int]:
        """Stop it; every answer it got, which it checked one by one."""
        self.stop.touch()
        assert self.process.wait(timeout=60) == 0, self.output.read_text()[-500:]
        assert re.search(r"^done \d+$", self.output.read_text(), re.M)
        return self.answers()

    def end(self) -> None:
        """Kill it if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def ending_vforks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Each vfork a freeze catches is waited out in vain (it outlasts the wait, thawed), then ended (its child killed)
    and waited out again; returns the list that gets the time.monotonic() at the end of each such wait."""
    wait_out = vfork.wait_out
    waited: list[float] = []

    def ending(vforks: list[vfork.Vfork], timeout: float) -> None:
        wait_out(vforks, timeout)
        for caught in vforks:
            os.kill(caught.child.host_pid, signal.SIGKILL)
        wait_out(vforks, timeout)
        waited.append(time.monotonic())

    monkeypatch.setattr(vfork, "wait_out", ending)
    return waited
