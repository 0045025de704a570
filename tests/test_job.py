"""`kerrickpt job` on one node: resume or start, checkpoint on a signal within its grace time, pass the exit code."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import archive
from tests.helpers import KERRICKPT, cli_env, counts, unique_name, wait_for

pytestmark = pytest.mark.root


class Running:
    """One `kerrickpt job` in the foreground, its output appended to `out`."""

    def __init__(self, args: list[str], out: Path, state_dir: Path) -> None:
        with out.open("ab") as fh:
            self.process = subprocess.Popen([*KERRICKPT, "job", *args], stdout=fh, stderr=fh, env=cli_env(state_dir))

    def end(self, signum: int | None = None, timeout: float = 120) -> int:
        if signum is not None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)


@contextlib.contextmanager
def running(args: list[str], out: Path, state_dir: Path) -> Iterator[Running]:
    job = Running(args, out, state_dir)
    try:
        yield job
    finally:
        if job.process.poll() is None:
            job.process.kill()  # its container goes with the test's state dir
            job.process.wait()


def checkpointed(args: list[str], out: Path, state_dir: Path) -> None:
    """Run the job until it counts, then SIGTERM: it checkpoints and asks to be requeued."""
    with running(args, out, state_dir) as job:
        wait_for(lambda: len(counts(out.read_text())) > 5, 30, "the job counting")
        assert job.end(signal.SIGTERM) == kerrickpt.REQUEUE_EXIT


def events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kinds(path: Path) -> list[object]:
    return [e["event"] for e in events(path)]


def job_paths(tmp_path: Path) -> tuple[str, Path, Path, Path]:
    """A job's name, its checkpoint directory, its events file and its output."""
    return unique_name("job"), tmp_path / "ckpt", tmp_path / "events", tmp_path / "out"


def job_args(name: str, directory: Path, log: Path, *more: str) -> list[str]:
    return ["--name", name, "--dir", str(directory), "--events", str(log), *more]


def test_sigterm_checkpoints_exits_85_and_the_next_run_continues_the_count(
    tmp_path: Path, state_dir: Path, jobcount: Path
) -> None:
    name, directory, log, out = job_paths(tmp_path)
    args = job_args(name, directory, log, "--", str(jobcount))
    for run in range(3):
        with running(args, out, state_dir) as job:
            wait_for(lambda run=run: len(counts(out.read_text())) > 10 * (run + 1), 30, "the job counting")
            assert job.end(signal.SIGTERM) == kerrickpt.REQUEUE_EXIT
        assert (directory / f"{name}.kckpt").exists()
        assert not kerrickpt.ps(state_dir), "nothing of the job is left on the node"
    numbers = counts(out.read_text())
    assert numbers == list(range(1, len(numbers) + 1)), "no count lost and none repeated over three requeues"
    assert kinds(log) == ["started"] + ["checkpoint-start", "checkpointed", "requeue", "restored"] * 2 + [
        "checkpoint-start",
        "checkpointed",
        "requeue",
    ]
    done = [e for e in events(log) if e["event"] == "checkpointed"]
    assert all(e["archive_bytes"] == os.path.getsize(directory / f"{name}.kckpt") for e in done[-1:])
    assert (directory.stat().st_mode & 0o777, (directory / f"{name}.kckpt").stat().st_mode & 0o777) == (0o700, 0o600)


def test_a_command_that_ends_by_itself_passes_its_exit_code_and_leaves_no_checkpoint(
    tmp_path: Path, state_dir: Path, jobcount: Path
) -> None:
    name, directory, log, out = job_paths(tmp_path)
    script = f"{jobcount} 40 && exit 7"
    with running(
        job_args(name, directory, log, "--every", "0.5s", "--", "/bin/sh", "-c", script), out, state_dir
    ) as job:
        assert job.end() == 7
    assert counts(out.read_text()) == list(range(1, 41))
    assert "checkpointed" in kinds(log), "periodic checkpoints were taken while it ran"
    assert kinds(log)[-1] == "exited" and events(log)[-1]["exit_code"] == 7
    assert not list(directory.glob("*kckpt*")), "its checkpoints are gone with it (its lock file stays)"
    assert not kerrickpt.ps(state_dir)


def test_a_command_ended_by_a_signal_exits_128_plus_its_number(tmp_path: Path, state_dir: Path) -> None:
    name, directory, log, out = job_paths(tmp_path)
    # A fault's signal ends even a PID namespace's init, which a kill from inside would not.
    crash = ["/usr/bin/python3", "-c", "import ctypes, time; time.sleep(2); ctypes.string_at(0)"]
    with running(job_args(name, directory, log, "--every", "0.5s", "--", *crash), out, state_dir) as job:
        assert job.end() == 128 + signal.SIGSEGV
    assert events(log)[-1]["exit_code"] == 128 + signal.SIGSEGV
    assert "checkpointed" in kinds(log)
    assert events(log)[-1]["checkpoint"] == str(directory / f"{name}.kckpt"), "a crash is no end by itself: it stays"
    assert (directory / f"{name}.kckpt").exists()


def test_sigint_ends_the_job_without_a_checkpoint_and_keeps_the_last_one(
    tmp_path: Path, state_dir: Path, jobcount: Path
) -> None:
    name, directory, log, out = job_paths(tmp_path)
    args = job_args(name, directory, log, "--", str(jobcount))
    checkpointed(args, out, state_dir)
    kept = (directory / f"{name}.kckpt").stat()
    with running(args, out, state_dir) as job:
        wait_for(lambda: "restored" in kinds(log), 30, "the job resumed")
        assert job.end(signal.SIGINT) == 128 + signal.SIGINT
    assert kinds(log)[-2:] == ["restored", "exited"] and events(log)[-1]["cancelled"] is True
    after = (directory / f"{name}.kckpt").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns), "no checkpoint taken on cancel"
    assert not kerrickpt.ps(state_dir)


def test_a_checkpoint_past_its_grace_time_keeps_the_previous_one_and_the_job_resumes_from_it(
    tmp_path: Path, state_dir: Path, jobcount: Path
) -> None:
    name, directory, log, out = job_paths(tmp_path)
    args = job_args(name, directory, log, "--every", "1s", "--grace", "0.001", "--", str(jobcount))
    with running(args, out, state_dir) as job:
        wait_for(lambda: "checkpointed" in kinds(log), 30, "a periodic checkpoint")
        wait_for(lambda: kinds(log)[-1] == "checkpoint-start", 30, "the next periodic checkpoint starting")
        wait_for(lambda: kinds(log)[-1] != "checkpoint-start", 30, "the next periodic checkpoint done")
        periodic = (directory / f"{name}.kckpt").stat()
        assert job.end(signal.SIGTERM) == kerrickpt.REQUEUE_EXIT
    failed = [e for e in events(log) if e["event"] == "checkpoint-failed"]
    assert failed and failed[-1]["final"] is True and "grace time" in str(failed[-1]["reason"])
    assert failed[-1]["kept"] == str(directory / f"{name}.kckpt")
    now = (directory / f"{name}.kckpt").stat()
    assert (now.st_ino, now.st_mtime_ns) == (periodic.st_ino, periodic.st_mtime_ns), "the previous one stays"
    assert not list(directory.glob(".*partial*")), "no partial archive left"
    before = counts(out.read_text())
    resumed_at = archive.read_manifest(directory / f"{name}.kckpt")
    assert resumed_at.name == name
    with running(args, out, state_dir) as job:
        wait_for(lambda: len(counts(out.read_text())) > len(before) + 3, 30, "the resumed job counting")
        job.end(signal.SIGINT)
    resumed = counts(out.read_text())[len(before) :]
    assert 1 < resumed[0] <= before[-1], "it went on from the periodic checkpoint: a few counts again, not from 1"
    assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))


def test_an_unusable_checkpoint_is_kept_aside_and_the_job_starts_afresh(
    tmp_path: Path, state_dir: Path, jobcount: Path
) -> None:
    name, directory, log, out = job_paths(tmp_path)
    args = job_args(name, directory, log, "--", str(jobcount))
    checkpointed(args, out, state_dir)
    path = directory / f"{name}.kckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    out.write_text("")
    with running(args, out, state_dir) as job:
        wait_for(lambda: len(counts(out.read_text())) > 3, 30, "the job counting afresh")
        job.end(signal.SIGINT)
    assert counts(out.read_text())[0] == 1
    assert kinds(log)[-3:] == ["checkpoint-unusable", "started", "exited"]
    assert len(list(directory.glob(f"{name}.kckpt.corrupt-*"))) == 1


def test_a_second_run_of_a_job_on_this_or_another_node_is_refused(
    tmp_path: Path, state_dir: Path, jobcount: Path
) -> None:
    name, directory, log, out = job_paths(tmp_path)
    args = job_args(name, directory, log, "--", str(jobcount))
    with running(args, out, state_dir) as first:
        wait_for(lambda: "started" in kinds(log), 30, "the first run started")
        # Another state directory stands for another node that shares the job's directory.
        for other_state in (state_dir, tmp_path / "other-node"):
            second = subprocess.run(
                [*KERRICKPT, "job", *args], capture_output=True, text=True, env=cli_env(other_state), timeout=60
            )
            assert second.returncode == kerrickpt.BusyError.exit_code, second.stderr
            assert f"job {name}" in second.stderr
        assert first.process.poll() is None, "the first run goes on"
        first.end(signal.SIGINT)
    assert kinds(log) == ["started", "exited"]


def test_the_python_api_preempts_and_resumes_a_job_from_another_thread(
    tmp_path: Path, state_dir: Path, jobcount: Path
) -> None:
    name, directory, out_path = unique_name("job"), tmp_path / "ckpt", tmp_path / "out"
    outcomes: list[kerrickpt.JobResult] = []
    with out_path.open("ab") as out:
        for ask in ("preempt", "cancel"):
            job = kerrickpt.Job(
                name, [str(jobcount)], directory, state_dir=state_dir, stdout=out.fileno(), stderr=out.fileno(),
            )  # fmt: skip
            runner = threading.Thread(target=lambda job=job: outcomes.append(job.run()))
            runner.start()
            seen = len(counts(out_path.read_text()))
            wait_for(lambda seen=seen: len(counts(out_path.read_text())) > seen + 5, 30, "the job counting")
            getattr(job, ask)()
            runner.join(60)
            assert not runner.is_alive()
    first, second = outcomes
    assert (first.ended, first.exit_code, first.resumed, first.checkpointed) == (
        "requeue", kerrickpt.REQUEUE_EXIT, False, True,
    )  # fmt: skip
    assert (second.ended, second.resumed) == ("cancelled", True)
    numbers = counts(out_path.read_text())
    assert numbers == list(range(1, len(numbers) + 1))
    assert not is_subreaper(), "the caller is left as it was: its helper was the container's subreaper"


def is_subreaper() -> bool:
    flag = ctypes.c_int()
    assert ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    return bool(flag.value)


def test_a_command_that_exits_as_it_starts_passes_its_exit_code(tmp_path: Path, state_dir: Path) -> None:
    name, directory, log, out = job_paths(tmp_path)
    with running(job_args(name, directory, log, "--", "/bin/sh", "-c", "exit 3"), out, state_dir) as job:
        assert job.end() == 3
    assert kinds(log) == ["exited"] and not kerrickpt.ps(state_dir)


def test_events_that_cannot_be_written_stop_and_the_job_goes_on(tmp_path: Path, state_dir: Path) -> None:
    name, directory, _, _ = job_paths(tmp_path)
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads them
    try:
        args = ["--name", name, "--dir", str(directory), "--events", f"fd:{writer}", "--"]
        done = subprocess.run(
            [*KERRICKPT, "job", *args, "/bin/sh", "-c", "sleep 0.3; exit 5"],
            capture_output=True, text=True, env=cli_env(state_dir), timeout=60, pass_fds=(writer,),
        )  # fmt: skip
    finally:
        os.close(writer)
    assert done.returncode == 5, done.stderr
    assert "events of" in done.stderr and "stop" in done.stderr
