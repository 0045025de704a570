"""Owns a batch job's run, in the process that supervises it (`kerrickpt job`, or the helper of a `job.Job`): its
container resumed from its last checkpoint or started afresh, checkpointed when the scheduler asks (then "requeue
me") and every so often, until its command ends by itself."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kerrickpt import archive, archivewriter, cgroups, command, containers, lock, zstdframe
from kerrickpt.containers import run as run_container
from kerrickpt.errors import (
    ArchiveCorruptError,
    ArchiveUnreadableError,
    BusyError,
    ExitedAtOnce,
    KerrickptError,
    SourceNotEnded,
    StateDamagedError,
    UsageError,
)
from kerrickpt.events import Events
from kerrickpt.isolation import IdPool
from kerrickpt.manifest import Manifest
from kerrickpt.restore import restore

# "Checkpointed, requeue me": in Slurm's RequeueExit and HTCondor's checkpoint_exit_code. Outside 1-21
# (kerrickpt's own errors), 64-78 (sysexits), 126-165 (the shell's and 128+N for signal N).
REQUEUE_EXIT = 85
SUFFIX = ".kckpt"
DEFAULT_GRACE = 60.0  # seconds for the final checkpoint when neither --grace nor Slurm says
DUMP_SHARE = 0.9
_PR_SET_CHILD_SUBREAPER = 36
_PREEMPT, _CANCEL = b"p", b"c"
GAVE_WAY = "it gave way to the job's end or a request"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    """How a job's run ended: `exited` (its command ended by itself; `exit_code` is the command's, 128+N for
    signal N), `requeue` (checkpointed, or the checkpoint failed and the previous one stays: exit_code is
    REQUEUE_EXIT) or `cancelled` (ended without a checkpoint)."""

    name: str
    ended: str
    exit_code: int
    resumed: bool  # started from a checkpoint
    checkpoint: str | None  # the checkpoint the directory holds now, if any
    checkpointed: bool = False  # `requeue`: this run's own checkpoint is that one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`: seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    factor = units.get(value[-1:], 1)
    try:
        seconds = float(value[:-1] if value[-1:] in units else value) * factor
    except ValueError:
        raise UsageError(f"not a duration: {text!r} (examples: 90s, 15m, 2h)") from None
    if seconds <= 0:
        raise UsageError(f"a duration must be positive, not {text!r}")
    return seconds


class Supervisor:
    """A batch job's container, supervised by this process, which becomes its init's subreaper: a process of its
    own (see job.Job). `run()` restores NAME from its checkpoint in `directory` if there is one, else
    starts `argv`, and waits. `preempt()` and `cancel()` (from a signal handler or another thread) ask it to
    checkpoint and stop, or to stop. Container options are those of `containers.run`; `stdout`/`stderr`
    (regular files) take the command's output, also after a restore elsewhere. The container on the node is
    named `container` (default: the job's name); `admit` may refuse a checkpoint's manifest before it is
    restored (privilege.check_archive); its id range comes from `pool` (default: the node's) when started and
    when restored."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        directory: Path | str,
        *,
        state_dir: Path | str | None = None,
        every: float | None = None,
        grace: float | None = None,
        keep: bool = False,
        events: Events | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        in_own_cgroup: bool = True,
        level: int = zstdframe.CHECKPOINT_LEVEL,
        container: str | None = None,
        admit: Callable[[Manifest], None] | None = None,
        pool: IdPool | None = None,
        **options: Any,
    ) -> None:
        if not argv:
            raise UsageError("no command given to run")
        self.name = containers.check_name(name)
        self.container = containers.check_name(container or name)
        self.admit = admit
        self.pool = pool
        self.argv = list(argv)
        self.directory = Path(directory).absolute()
        self.state_dir = state_dir
        self.every = every
        self.grace = DEFAULT_GRACE if grace is None else grace
        self.keep = keep
        self.events = events or Events(None, name)
        self.stdio = {"stdout": stdout, "stderr": stderr} if stdout is not None or stderr is not None else {}
        self.in_own_cgroup = in_own_cgroup
        self.level = level
        self.options = options
        self.deadline: float | None = None
        self.cancelled_by = signal.SIGTERM
        self._requests_r, self._requests_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending: bytes | None = None

    @property
    def archive(self) -> Path:
        return self.directory / f"{self.name}{SUFFIX}"

    def preempt(self, within: float | None = None) -> None:
        """Checkpoint and stop (with REQUEUE_EXIT) within `within` seconds (default: the grace time) from now."""
        if self.deadline is None:
            # The dump by nine tenths of the time: the rest is for reading the archive back and replacing the last.
            self.deadline = time.monotonic() + DUMP_SHARE * (self.grace if within is None else within)
        self._ask(_PREEMPT)

    def cancel(self, signum: int = signal.SIGTERM) -> None:
        """Stop without a checkpoint (the one there is stays) and exit 128+`signum`."""
        self.cancelled_by = signum
        self._ask(_CANCEL)

    def _ask(self, request: bytes) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already holds requests enough
            os.write(self._requests_w, request)

    def run(self) -> JobResult:
        """Resume or start the job and wait until its command ends or it is preempted or cancelled."""
        registry = containers.Registry(self.state_dir)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # One run of a job at a time, on whichever node: two would replace, and remove, each other's checkpoint.
            with lock.held(self.directory / f".{self.name}.lock", wait=0, what=f"job {self.name}"):
                for stale in self.directory.glob(f".{self.name}{SUFFIX}.partial-*"):  # of a run that was killed
                    stale.unlink()
                _become_subreaper()
                self._clear_stale(registry)
                return self._run(cgroups.own(cgroups.detect()) if self.in_own_cgroup else None)
        finally:
            os.close(self._requests_r)
            os.close(self._requests_w)

    def _run(self, parents: Mapping[Path, Path] | None) -> JobResult:
        try:
            try:
                init, resumed = self._resume_or_start(parents)
            except ExitedAtOnce as exc:
                return self._exited(exc.pid, resumed=False)
            return self._supervise(init, resumed)
        except BaseException:
            self._end_container()  # its job is over: never leave it running unwatched
            raise

    def _clear_stale(self, registry: containers.Registry) -> None:
        """What a run of this job that died left on this node (a node that runs it again)."""
        try:
            container = registry.get(self.container)
        except StateDamagedError:
            containers.kill(self.container, self.state_dir)
            return
        except KerrickptError:
            if registry.is_abandoned(self.container):
                containers.kill(self.container, self.state_dir)
            return
        if container.is_running():
            raise BusyError(f"job {self.name} runs on this node already (init pid {container.init_pid})")
        containers.kill(self.container, self.state_dir)

    def _resume_or_start(self, parents: Mapping[Path, Path] | None) -> tuple[int, bool]:
        if self.archive.exists():
            began = time.monotonic()
            try:
                if self.admit is not None:
                    self.admit(archive.read_manifest(self.archive))
                restored = restore(
                    self.archive,
                    name=self.container,
                    state_dir=self.state_dir,
                    cgroup_parents=parents,
                    pool=self.pool,
                    **self.stdio,
                )
            except ArchiveCorruptError as exc:
                if isinstance(exc, ArchiveUnreadableError):  # the storage's trouble, perhaps for a moment: no verdict
                    raise
                aside = self.archive.with_name(f"{self.archive.name}.corrupt-{_stamp()}")
                self.archive.rename(aside)
                log.warning("the checkpoint of %s is unusable (%s): kept as %s; starting afresh", self.name, exc, aside)
                self.events.emit("checkpoint-unusable", reason=exc.message, kept_as=str(aside))
            else:
                seconds = round(time.monotonic() - began, 3)
                self.events.emit("restored", archive=str(self.archive), seconds=seconds, init_pid=restored.init_pid)
                return restored.init_pid, True
        status = run_container(
            self.container,
            self.argv,
            state_dir=self.state_dir,
            cgroup_parents=parents,
            pool=self.pool,
            **self.stdio,
            **self.options,
        )
        assert status.init_pid is not None
        self.events.emit("started", command=self.argv, init_pid=status.init_pid)
        return status.init_pid, False

    def _supervise(self, init: int, resumed: bool) -> JobResult:
        pidfd = os.pidfd_open(init)
        try:
            due = time.monotonic() + self.every if self.every else None
            while True:
                request = self._request() if self._pending else None
                if request is None:
                    wait = None if due is None else max(0.0, due - time.monotonic())
                    ready = select.select([pidfd, self._requests_r], [], [], wait)[0]
                    if pidfd in ready:
                        return self._exited(init, resumed)
                    request = self._request() if self._requests_r in ready else None
                if request == _CANCEL:
                    self._end_container()
                    with contextlib.suppress(ChildProcessError):
                        _reap(init)
                    self.events.emit("exited", cancelled=True)
                    return JobResult(self.name, "cancelled", 128 + self.cancelled_by, resumed, self._kept())
                if request == _PREEMPT:
                    return self._preempted(init, resumed)
                if due is not None and time.monotonic() >= due:
                    self._checkpoint(leave_running=True, pidfd=pidfd)
                    due = time.monotonic() + self.every if self.every else None
        finally:
            os.close(pidfd)

    def _request(self) -> bytes | None:
        """The request waiting: one a periodic checkpoint broke off for, or the next in the pipe (a cancel
        outranks a preemption)."""
        pending, self._pending = self._pending, None
        with contextlib.suppress(BlockingIOError):
            pending = (pending or b"") + os.read(self._requests_r, 64)
        if not pending:
            return None
        return _CANCEL if _CANCEL in pending else _PREEMPT

    def _exited(self, init: int, resumed: bool) -> JobResult:
        code, killed = _reap(init)
        self._end_container()
        # A command a signal ended (the kernel's OOM killer, say) did not end by itself: its checkpoint stays.
        # One set aside as corrupt stays for whoever looks into it.
        if not (self.keep or killed):
            self.archive.unlink(missing_ok=True)
        self.events.emit("exited", exit_code=code, checkpoint=self._kept())
        return JobResult(self.name, "exited", code, resumed, self._kept())

    def _preempted(self, init: int, resumed: bool) -> JobResult:
        saved = self._checkpoint(leave_running=False, pidfd=None)
        if not saved and _has_ended(init):  # it ended by itself meanwhile: that, not a requeue, is its outcome
            return self._exited(init, resumed)
        self._end_container()  # also what a checkpoint that could not end it all left (its exit code 18)
        with contextlib.suppress(ChildProcessError):
            _reap(init)
        self.events.emit("requeue", checkpoint=self._kept(), checkpointed=saved)
        return JobResult(self.name, "requeue", REQUEUE_EXIT, resumed, self._kept(), checkpointed=saved)

    def _checkpoint(self, *, leave_running: bool, pidfd: int | None) -> bool:
        """Checkpoint into a partial archive beside the current one, which it replaces only once it is complete
        and verified; the final one (not `leave_running`) by the deadline. A periodic one gives way to a
        request (`pidfd`: the init's, whose end also stops it). Returns whether it replaced the checkpoint."""
        partial = self.directory / f".{self.name}{SUFFIX}.partial-{os.getpid()}"
        partial.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "kerrickpt.cli.main", "checkpoint", self.container, "-o", str(partial), "-q"]
        argv += ["--level", str(self.level)] + (["--leave-running"] if leave_running else [])
        argv += ["--state-dir", str(self.state_dir)] if self.state_dir else []
        left = None if self.deadline is None else round(self.deadline - time.monotonic(), 3)
        self.events.emit("checkpoint-start", final=not leave_running, within_s=left)
        began = time.monotonic()
        try:
            failure = self._run_checkpoint(argv, watch=[] if pidfd is None else [pidfd, self._requests_r])
            if failure is None:
                manifest = archive.verify(partial)
                os.replace(partial, self.archive)
                archivewriter.fsync_dir(self.directory)
        except (KerrickptError, OSError) as exc:
            failure = str(exc)
        finally:
            partial.unlink(missing_ok=True)
        if failure is not None:
            kept = self._kept()
            if failure != GAVE_WAY:  # what ends the job, or asks for more, says so itself
                log.warning("checkpoint of %s failed: %s; %s", self.name, failure, f"kept {kept}" if kept else "none")
            self.events.emit("checkpoint-failed", reason=failure, kept=kept, final=not leave_running)
            return False
        self.events.emit(
            "checkpointed",
            archive=str(self.archive),
            archive_bytes=self.archive.stat().st_size,
            seconds=round(time.monotonic() - began, 3),
            frozen_s=manifest.timings.get("frozen_s"),
            final=not leave_running,
        )
        return True

    def _run_checkpoint(self, argv: list[str], watch: list[int]) -> str | None:
        """Run `kerrickpt checkpoint` (a process of its own, so that a deadline can stop it: on SIGTERM it thaws
        the container and removes its partial archive). None if it succeeded, else why not."""
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = os.pidfd_open(process.pid)
        try:
            while True:
                left = None if self.deadline is None else self.deadline - time.monotonic()
                if left is not None and left <= 0:
                    command.stop(process)
                    return f"it did not finish within the grace time of {self.grace:.0f} s"
                ready = select.select([done, *watch], [], [], left)[0]
                if done in ready:
                    break
                if self._requests_r in ready:
                    self._pending = self._request()  # a preemption or cancel outranks a periodic checkpoint
                if ready:  # that, or the job's end
                    command.stop(process)
                    return GAVE_WAY
        finally:
            os.close(done)
        assert process.stderr is not None
        said = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        # 18: the archive is complete, but not all of the container could be ended (the caller ends it).
        if process.wait() not in (0, SourceNotEnded.exit_code):
            return said.splitlines()[-1] if said else f"kerrickpt checkpoint exited with {process.returncode}"
        return None

    def _end_container(self) -> None:
        with contextlib.suppress(KerrickptError):
            containers.kill(self.container, self.state_dir)

    def _kept(self) -> str | None:
        return str(self.archive) if self.archive.exists() else None


def _become_subreaper() -> None:
    """The container's init, whose parent exits once it runs, becomes this process's child: its exit code is ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap(pid: int) -> tuple[int, bool]:
    """Wait for child `pid`: its exit code (128+N if signal N ended it), and whether a signal did."""
    info = os.waitid(os.P_PID, pid, os.WEXITED)
    assert info is not None
    killed = info.si_code != os.CLD_EXITED
    return (128 + info.si_status if killed else info.si_status), killed


def _has_ended(pid: int) -> bool:
    """Whether child `pid` has ended (it stays to be reaped)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
