"""Owns running external programs: one place for timeouts and log tails."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from kerrickpt import limits
from kerrickpt.errors import CommandTimeout

TAIL_LINES = 20
TAIL_BYTES = 64 * 1024


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of `text`, for error messages."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def tail_of(fh: BinaryIO, lines: int = TAIL_LINES) -> str:
    """The last lines of an open file (a program's stderr kept in one), read from its last TAIL_BYTES only: a
    program that wrote on for long leaves no more to read than one that stopped at once."""
    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - TAIL_BYTES))
    return tail(fh.read().decode(errors="replace"), lines)


def tail_file(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it is missing."""
    try:
        with path.open("rb") as fh:
            return tail_of(fh, lines)
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"


def run(argv: Sequence[str], *, timeout: float, input_bytes: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a program to completion, capturing its output; stop it (see `stop`) after `timeout` seconds."""
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL if input_bytes is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",  # a program's output is read as text, whatever bytes it holds
    ) as process:
        try:
            out, err = process.communicate(input_bytes.decode() if input_bytes is not None else None, timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            out, err = process.communicate()
            raise CommandTimeout(
                f"{argv[0]} did not finish within {timeout:.0f} s and was stopped", log_tail=tail(err or "")
            ) from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def start(argv: Sequence[str], *, cwd: Path, new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start a program that reports through its exit code and its own log file, not its output.

    It inherits every inheritable fd, as a forked child would: a guardian's pipe or a lock
    this process holds stays held until the program is gone.
    """
    devnull = subprocess.DEVNULL
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdin=devnull,
        stdout=devnull,
        stderr=devnull,
        close_fds=False,
        start_new_session=new_session,
    )


def stop(process: subprocess.Popen[Any]) -> int:
    """End a program that overran: SIGTERM, a grace period (limits.STOP_GRACE) to clean up, then SIGKILL.

    Returns its exit status (negative: the signal that ended it).
    """
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        return process.wait(timeout=limits.STOP_GRACE.seconds())
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def stop_pid(pid: int) -> None:
    """`stop` for a child another library started and reaps (pycriu's CRIU): through a pidfd, so that
    a PID reused meanwhile is never signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once it has exited
        if not poller.poll(limits.STOP_GRACE.seconds() * 1000):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def wait(
    process: subprocess.Popen[bytes], *, deadline: float, log: Path, before_stop: Callable[[], None] | None = None
) -> int:
    """Its exit code; at `deadline` (time.monotonic()) `before_stop` runs, it is stopped (see `stop`) and
    CommandTimeout names its log's tail."""
    try:
        return process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        if before_stop is not None:
            before_stop()
        stop(process)
        raise CommandTimeout(
            f"{process.args[0]} did not finish in time and was stopped",  # type: ignore[index]
            log_tail=tail_file(log),
        ) from None
