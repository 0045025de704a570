"""Progress of long operations: a line on a terminal, nothing at all elsewhere."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import termios
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import archive, archivewriter, progress
from kerrickpt.localnodes import Cluster, kerrickpt_path
from tests import test_archive
from tests.helpers import KERRICKPT, cli, cli_env, finished, ipc_keys, unique_name

MiB = 2**20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_shows_phase_bytes_rate_and_time_left() -> None:
    out, clock = io.StringIO(), Clock()
    line = progress.Line("restore", out, clock)
    line.phase("reading job1.kckpt", 100 * MiB)
    clock.now += 1
    line.advance(25 * MiB)
    assert line.text() == "kerrickpt: restore: reading job1.kckpt 25.0 MiB of 100.0 MiB, 25.0 MiB/s, 3 s left"
    assert out.getvalue().endswith("\r\x1b[K" + line.text()), "redrawn in place"
    line.phase("restoring with CRIU")
    assert line.text() == "kerrickpt: restore: restoring with CRIU"
    clock.now += 2
    line.advance(3 * MiB)
    assert line.text() == "kerrickpt: restore: restoring with CRIU 3.0 MiB, 1.5 MiB/s", "no time left when unknown"
    line.close()
    assert out.getvalue().endswith("1.5 MiB/s\r\x1b[K"), "the last bytes shown, then the line cleared"


def test_the_line_fits_the_terminal() -> None:
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
    with os.fdopen(terminal, "w") as stream:
        line = progress.Line("snapshots verify", stream)
        line.phase("reading 20250131T140000.456Z.kckpt", 2**30)
        line.close()
    shown = ""
    # Each write reaches the terminal's other end on its own: one read may see the first alone.
    while select.select([controller], [], [], 0.5)[0]:
        try:
            shown += os.read(controller, 4096).decode()
        except OSError:  # the terminal's side is closed and all was read
            break
    os.close(controller)
    assert shown == "\r\x1b[Kkerrickpt: snapshots verify: \r\x1b[K", "cut to 29 columns: a wrapped line stays"


def test_bytes_of_a_fast_phase_are_shown_once_it_ends() -> None:
    out, clock = io.StringIO(), Clock()
    line = progress.Line("checkpoint", out, clock)
    line.phase("writing the archive")
    line.advance(4096)  # within the redraw interval: not drawn yet
    assert "4.0 KiB" not in out.getvalue()
    clock.now += 0.01
    line.phase("done")
    assert "writing the archive 4.0 KiB, 400.0 KiB/s" in out.getvalue()


class Recorder:
    def __init__(self) -> None:
        self.phases: list[tuple[str, int | None]] = []
        self.bytes = 0

    def phase(self, name: str, total: int | None = None) -> None:
        self.phases.append((name, total))

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes


def test_writing_and_reading_an_archive_report_their_bytes(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(os.urandom(300_000))
    path = tmp_path / "a.kckpt"
    written, read = Recorder(), Recorder()
    with progress.reporting(written):
        archivewriter.write(path, test_archive.manifest(), {"log": log})
    assert 300_000 < written.bytes <= path.stat().st_size, "the compressed bytes, as they are written"
    with progress.reporting(read):
        archive.verify(path)
    assert read.phases == [("reading a.kckpt", path.stat().st_size)] and read.bytes == path.stat().st_size
    assert progress.current() is progress.SILENT, "outside `reporting`, a library call reports to nobody"


def on_terminal(*args: str, state_dir: Path | None = None) -> tuple[int, str, str]:
    return run_on_terminal([*KERRICKPT, *args], cli_env(state_dir))


def run_on_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run `argv` with its stderr on a pseudo-terminal: its exit code, stdout, and what the terminal got."""
    controller, terminal = pty.openpty()
    try:
        run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=terminal, text=True, env=env)
    finally:
        os.close(terminal)
    shown = b""
    try:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: every copy of the terminal's other end is closed
                break
            if not data:
                break
            shown += data
        out, _ = finished(run, 120)
    finally:
        os.close(controller)
        if run.poll() is None:
            run.kill()
            run.wait()
    return run.returncode, out, shown.decode()


@pytest.mark.root
def test_progress_on_a_terminal_and_nothing_extra_elsewhere(start_workload, state_dir: Path, tmp_path: Path) -> None:
    w = start_workload()
    archive = tmp_path / "w.kckpt"
    code, out, shown = on_terminal("checkpoint", w.name, "-o", str(archive), "--leave-running", state_dir=state_dir)
    assert code == 0, shown
    for phase in ("freezing", "dumping", "writing the archive"):
        assert f"\r\x1b[Kkerrickpt: checkpoint: {phase}" in shown
    assert "MiB/s" in shown or "KiB/s" in shown
    assert shown.endswith("\r\x1b[K"), "the line is cleared: the result starts on a clean one"
    assert out.startswith(f"checkpointed {w.name}")

    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    taken = kerrickpt.snapshot(w.name, store, state_dir=state_dir)
    code, out, shown = on_terminal("snapshots", "verify", "--store", str(store))
    assert code == 0, shown
    size = f"of {taken.snapshot.archive_bytes / 1024:.1f} KiB"
    assert f"kerrickpt: snapshots verify: reading {taken.snapshot.id}.kckpt" in shown and size in shown
    code, out, shown = on_terminal("restore", str(archive), "--name", w.name + "-b", state_dir=state_dir)
    assert code == 0, shown
    assert "kerrickpt: restore: restoring with CRIU" in shown and "kerrickpt: restore: reading w.kckpt" in shown

    assert on_terminal("snapshots", "verify", "--store", str(store), "--quiet")[2] == "", "--quiet: nothing"
    code, out, shown = on_terminal("snapshots", "verify", "--store", str(store), "--json")
    assert shown == "" and json.loads(out)[0]["status"] == "verified", "--json: the result only"
    piped = cli("checkpoint", w.name, "-o", str(tmp_path / "again.kckpt"), "--leave-running", state_dir=state_dir)
    assert piped.returncode == 0 and piped.stderr == "", "not a terminal: nothing extra"
    piped = cli("snapshots", "verify", "--store", str(store))
    assert piped.returncode == 0 and piped.stderr == ""


@pytest.mark.root
def test_migration_progress_on_a_terminal(cluster: Cluster, workload: Path) -> None:
    a, b = cluster.nodes
    name = unique_name("prog")
    started = a.kerrickpt("run", "--name", name, "--", str(workload), "run", *map(str, ipc_keys()))
    assert started.returncode == 0, started.stderr
    argv = ["nsenter", f"--net=/run/netns/{a.netns}", kerrickpt_path(), "migrate", name, *cluster.migrate_args(b)]
    code, out, shown = run_on_terminal(argv, {**os.environ, **a.env()})
    assert code == 0, shown
    for phase in ("pre-flight on root@", "dumping and compressing", f"root@{b.address} restores it"):
        assert f"\r\x1b[Kkerrickpt: migrate: {phase}" in shown
    assert "KiB/s" in shown or "MiB/s" in shown, "the bytes sent while dumping"
    assert shown.endswith("\r\x1b[K") and out.startswith(f"moved {name} to ")
