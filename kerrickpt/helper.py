"""Owns kerrickpt's helper programs: a fresh Python started by fork and exec, which takes a JSON order
on its stdin. Work that needs a child process of its own runs there, never in a forked copy of the
caller: a caller may have threads, and a lock another thread held at the fork stays locked in the copy."""

from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

PROGRAMS = {"launch": "kerrickpt.launcher", "restore": "kerrickpt.restorer"}  # each has main(order)
# Not `-m`: the package imports these modules, and runpy warns of a module run that was imported already.
ENTRY = "import sys; from kerrickpt import helper; helper.main(sys.argv[1])"


def start(program: str, order: dict[str, Any], *, pass_fds: Sequence[int] = (), stdout: int = subprocess.DEVNULL
          ) -> subprocess.Popen[bytes]:  # fmt: skip
    """Start helper `program` with `order`; it gets `pass_fds` (at the same numbers) and no other fd of ours.

    It runs in /, where only root can put modules it would import.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", ENTRY, program], stdin=subprocess.PIPE, stdout=stdout, pass_fds=pass_fds, cwd="/"
    )
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it died at once: its exit code says so
        process.stdin.write(json.dumps(order).encode())
    process.stdin.close()
    return process


def main(program: str) -> None:  # pragma: no cover - the helper program
    importlib.import_module(PROGRAMS[program]).main(json.loads(sys.stdin.buffer.read()))
