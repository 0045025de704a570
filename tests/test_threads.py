"""The library called from a program's thread pool: `run` and `restore` run no Python in a forked child
(where a lock another thread held at the fork stays locked), and work side by side."""

from __future__ import annotations

import os
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import kerrickpt
from tests.helpers import archived_log, assert_consecutive, ticks, unique_name

pytestmark = pytest.mark.root

_watching: list[int] = []  # the write end of a pipe, while a test watches for forked children running Python


def _in_forked_child() -> None:
    # Runs in any child forked by os.fork() (never in one subprocess starts, which execs at once):
    # exactly where a threaded program's locks would deadlock. It says where it was forked.
    for fd in _watching:
        os.write(fd, "".join(traceback.format_stack(limit=6)).encode()[-2000:])


os.register_at_fork(after_in_child=_in_forked_child)


def test_runs_and_restores_from_a_thread_pool_while_other_threads_hold_locks(
    start_workload, state_dir: Path, tmp_path: Path
) -> None:
    w = start_workload()
    archive = tmp_path / "w.kckpt"
    kerrickpt.checkpoint(w.name, archive, state_dir=state_dir)
    last_archived = max(ticks(archived_log(archive)))
    names = [unique_name("pool") for _ in range(3)]
    copies = [unique_name("streamed"), unique_name("unpacked")]
    held = threading.Lock()
    stop = threading.Event()

    def busy() -> int:
        """What a scheduler's other threads do meanwhile: take a lock, hold it, allocate."""
        rounds = 0
        while not stop.is_set():
            with held:
                rounds += len([bytearray(4096) for _ in range(64)])
        return rounds

    reader, writer = os.pipe()
    _watching.append(writer)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            noise = [pool.submit(busy) for _ in range(2)]
            runs = [pool.submit(kerrickpt.run, n, ["sleep", "600"], state_dir=state_dir) for n in names]
            with archive.open("rb") as stream:  # a stream is unpacked first; a file is fed to CRIU as read
                restores = [
                    pool.submit(kerrickpt.restore, archive, name=copies[0], state_dir=state_dir),
                    pool.submit(kerrickpt.restore, stream, name=copies[1], state_dir=state_dir),
                ]
                started = [f.result(timeout=300) for f in runs]
                restored = [f.result(timeout=300) for f in restores]
            stop.set()
            assert all(f.result(timeout=60) > 0 for f in noise)
    finally:
        stop.set()
        _watching.remove(writer)
        os.close(writer)
    os.set_blocking(reader, False)  # a forked child is written at its fork: before the calls returned
    try:
        forked = os.read(reader, 1 << 16).decode()
    except BlockingIOError:  # nothing, and some process still holds the write end
        forked = ""
    finally:
        os.close(reader)
    assert forked == "", f"a child of this process ran Python after a fork, forked at:\n{forked}"

    assert [s.state for s in started] == ["running"] * 3
    assert [r.name for r in restored] == copies
    states = {r.name: r.state for r in kerrickpt.ps(state_dir)}
    assert states == {n: "running" for n in [*names, *copies]}
    for copy in copies:
        restored_copy = type(w)(copy, w.keys, state_dir, w.binary)
        restored_copy.wait_ticking(beyond=last_archived)
        numbers = ticks(restored_copy.log)
        assert_consecutive(numbers)
        assert numbers[0] == 1 and numbers[-1] > last_archived, "the counter went on where it stopped"
