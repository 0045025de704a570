"""The RPC wrapper's contract with the process it talks to (no root needed: a stand-in plays CRIU's swrk)."""

from __future__ import annotations

import shlex
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kerrickpt import criu
from kerrickpt.errors import DumpFailed


class Interrupted(BaseException):
    """What the CLI's signal handler raises (errors.Interrupted), without ending the test run."""


@pytest.fixture
def interrupt_after() -> Iterator[threading.Timer]:
    """A SIGUSR1 to the main thread in 0.2 s (so that a system call it waits in is cut short), which raises
    Interrupted there."""

    def interrupted(signum: int, _frame: object) -> None:
        raise Interrupted

    before = signal.signal(signal.SIGUSR1, interrupted)
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    try:
        yield timer
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, before)


def test_a_signal_during_an_rpc_call_unwinds_only_once_criu_has_exited(
    tmp_path: Path, interrupt_after: threading.Timer
) -> None:
    # CRIU may be seizing the tree when the signal comes: unwinding (and thawing) before it exits
    # would let the processes it has not seized yet run under it.
    exited = tmp_path / "exited"
    swrk = tmp_path / "criu"
    swrk.write_text(f"#!/bin/sh\nsleep 1\ntouch {shlex.quote(str(exited))}\n")  # answers nothing, as CRIU mid-dump
    swrk.chmod(0o755)
    client = criu._rpc(criu.Criu(str(swrk), "4.2.1"), tmp_path, tmp_path, criu.DUMP_LOG)
    client.opts.pid = 1  # as `dump` asks: without a pid pycriu detaches CRIU to dump itself

    interrupt_after.start()
    with pytest.raises(Interrupted):
        criu._call(client, "dump", 30.0, DumpFailed, tmp_path / criu.DUMP_LOG)

    assert exited.exists(), "the call unwound while the program it talks to still ran"
