"""The RPC wrapper's contract with the process it talks to (no root needed: a stand-in plays CRIU's swrk)."""

from __future__ import annotations

import shlex
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kerrickpt import criu
from kerrickpt.errors import DumpFailed
from tests.helpers import wait_for


class Interrupted(BaseException):
    """What the CLI's signal handler raises (errors.Interrupted), without ending the test run."""


@pytest.fixture
def interrupt_once() -> Iterator[Callable[[Callable[[], object], Path], threading.Thread]]:
    """Starts a thread that, once `ready()` holds, sends SIGUSR1 to the main thread (so that a system call
    it waits in is cut short), which raises Interrupted there, then creates the file `sent`."""

    def interrupted(signum: int, _frame: object) -> None:
        raise Interrupted

    def interrupt(ready: Callable[[], object], sent: Path) -> None:
        try:
            wait_for(ready, timeout=60, what="the stand-in to run")
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        finally:
            sent.touch()  # also on failure: the stand-in must not wait for it forever

    threads: list[threading.Thread] = []

    def start(ready: Callable[[], object], sent: Path) -> threading.Thread:
        threads.append(threading.Thread(target=interrupt, args=(ready, sent), daemon=True))
        threads[-1].start()
        return threads[-1]

    before = signal.signal(signal.SIGUSR1, interrupted)
    try:
        yield start
    finally:
        for thread in threads:
            thread.join(70)
        signal.signal(signal.SIGUSR1, before)


def test_a_signal_during_an_rpc_call_unwinds_only_once_criu_has_exited(
    tmp_path: Path, interrupt_once: Callable[[Callable[[], object], Path], threading.Thread]
) -> None:
    # CRIU may be seizing the tree when the signal comes: unwinding (and thawing) before it exits
    # would let the processes it has not seized yet run under it.
    running, signalled, exited = tmp_path / "running", tmp_path / "signalled", tmp_path / "exited"
    swrk = tmp_path / "criu"
    # Answers nothing, as CRIU mid-dump, and outlives the signal by a second whatever the load.
    swrk.write_text(
        f"#!/bin/sh\ntouch {shlex.quote(str(running))}\n"
        f"until [ -e {shlex.quote(str(signalled))} ]; do sleep 0.01; done\n"
        f"sleep 1\ntouch {shlex.quote(str(exited))}\n"
    )
    swrk.chmod(0o755)
    client = criu._rpc(criu.Criu(str(swrk), "4.2.1"), tmp_path, tmp_path, criu.DUMP_LOG)
    client.opts.pid = 1  # as `dump` asks: without a pid pycriu detaches CRIU to dump itself

    # pycriu has its socket to the stand-in once it knows its pid: only then can it be hung up on.
    interrupt_once(lambda: running.exists() and getattr(client._comm, "sk", None), signalled)
    with pytest.raises(Interrupted):
        criu._call(client, "dump", 60.0, DumpFailed, tmp_path / criu.DUMP_LOG)

    assert exited.exists(), "the call unwound while the program it talks to still ran"
