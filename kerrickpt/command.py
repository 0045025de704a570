"""Owns running external programs: one place for timeouts and log tails."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from kerrickpt.errors import CommandTimeout

TAIL_LINES = 20


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of `text`, for error messages."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def tail_file(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it is missing."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            return tail(fh.read().decode(errors="replace"), lines)
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"


def run(argv: Sequence[str], *, timeout: float, input_bytes: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a program to completion, capturing its output; kill it after `timeout` seconds."""
    try:
        return subprocess.run(
            list(argv),
            input=input_bytes.decode() if input_bytes is not None else None,
            capture_output=True,
            text=True,
            errors="replace",  # a program's output is read as text, whatever bytes it holds
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL if input_bytes is None else None,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stderr or b"") if isinstance(exc.stderr, bytes) else (exc.stderr or "").encode()
        raise CommandTimeout(
            f"{argv[0]} did not finish within {timeout:.0f} s and was killed",
            log_tail=tail(out.decode(errors="replace")),
        ) from exc


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


def wait(process: subprocess.Popen[bytes], *, deadline: float, log: Path) -> int:
    """Its exit code; at `deadline` (time.monotonic()) it is killed and CommandTimeout names its log's tail."""
    try:
        return process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise CommandTimeout(
            f"{process.args[0]} did not finish in time and was killed",  # type: ignore[index]
            log_tail=tail_file(log),
        ) from None
