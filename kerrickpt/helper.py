"""Owns kerrickpt's helper programs: a fresh Python started by fork and exec, which takes a JSON order
on its stdin. Work that needs a child process of its own runs there, never in a forked copy of the
caller: a caller may have threads, and a lock another thread held at the fork stays locked in the copy."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from kerrickpt.errors import CommandTimeout

# Each has main(order).
PROGRAMS = {
    "launch": "kerrickpt.launcher",
    "restore": "kerrickpt.restorer",
    "idmap-probe": "kerrickpt.isolation",
    "open-as": "kerrickpt.privilege",
    "job": "kerrickpt.job",
    "netns": "kerrickpt.netnsmaker",
}
# The package's __init__ imports all of kerrickpt, a quarter of a second, and a restore's helper starts
# within the container's downtime: the helper loads the package bare and imports only what it runs.
# (Not `-m` either: the package imports these modules, and runpy warns of a module imported already.)
ENTRY = (
    "import importlib.util, sys; "
    "sys.modules['kerrickpt'] = importlib.util.module_from_spec(importlib.util.find_spec('kerrickpt')); "
    "from kerrickpt import helper; helper.main(sys.argv[1])"
)


def start(
    program: str, *, pass_fds: Sequence[int] = (), stdout: int = subprocess.DEVNULL, stderr: int | None = None
) -> subprocess.Popen[bytes]:
    """Start helper `program`; it gets `pass_fds` (at the same numbers) and no other fd of ours but our stderr
    (or `stderr`), and waits for its order (`send`). Its Python takes a while to start: start it ahead of its work.

    It runs in /, where only root can put modules it would import.
    """
    return subprocess.Popen(
        [sys.executable, "-c", ENTRY, program],
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=stderr,
        pass_fds=pass_fds,
        cwd="/",
    )


def above_stdio(fd: int) -> int:
    """A copy of `fd` numbered 3 or above (close-on-exec; close it): a helper's own 0 to 2 are its order, its
    answers and stderr, and a child that dup2s copies onto 1 and 2 never overwrites one before copying it."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


def send(process: subprocess.Popen[bytes], order: dict[str, Any] | None) -> None:
    """Give the helper its order; None: none, it leaves."""
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it died at once: its exit code says so
        if order is not None:
            process.stdin.write(json.dumps(order).encode())
        process.stdin.close()


def ask(
    program: str, order: dict[str, Any], *, timeout: float, what: str, pass_fds: Sequence[int] = ()
) -> dict[str, Any]:
    """Start helper `program` with `order` and return the JSON it prints, once it has left: a short answer, which
    the pipe holds; {"error": ...} if it printed none. CommandTimeout (it is killed) if it takes longer than
    `timeout` s to do `what`."""
    process = start(program, pass_fds=pass_fds, stdout=subprocess.PIPE)
    send(process, order)
    assert process.stdout is not None
    with process.stdout:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise CommandTimeout(f"{what} did not finish within {timeout:.0f} s") from None
        out = process.stdout.read()
    try:
        answer: dict[str, Any] = json.loads(out)
    except ValueError:
        answer = {"error": f"the helper exited with {process.returncode} without an answer"}
    return answer


def main(program: str) -> None:  # pragma: no cover - the helper program
    # Imported before the order comes (a restore's: some 40-140 ms), while its caller still prepares it.
    module = importlib.import_module(PROGRAMS[program])
    data = sys.stdin.buffer.read()
    if data:
        module.main(json.loads(data))
