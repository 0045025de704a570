"""Owns `exec`: a command run inside a running container (its namespaces, cgroup, user and root) on the
caller's stdin, stdout and stderr, ending with the command's exit code."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from kerrickpt import cgroups, confinement, containers, procs, users
from kerrickpt.errors import BusyError, ContainerNotFoundError, NotReadyError, UsageError

SHELL = "/bin/sh"
# The session stops itself until kerrickpt has put it in the container's cgroup, then becomes nsenter,
# whose child, the command, starts in that cgroup too: nsenter enters namespaces, not cgroups.
GATE = 'kill -STOP $$ && exec "$@"'
# nsenter's option for each namespace of the container it enters. The user, mount and network namespaces only
# where they are the container's own: entering one's own user namespace fails (EINVAL).
ALWAYS = {"pid": "--pid", "ipc": "--ipc", "uts": "--uts"}
WHERE_OWN = {"user": "--user", "mnt": "--mount", "net": "--net"}
FORWARDED = (signal.SIGTERM, signal.SIGHUP)
TYPED = (signal.SIGINT, signal.SIGQUIT)  # a terminal sends these to its whole foreground process group


def exec_in(
    name: str,
    argv: Sequence[str],
    *,
    user: str | None = None,
    workdir: str | None = None,
    env: Sequence[str] = (),
    state_dir: Path | str | None = None,
) -> int:
    """Run `argv` inside running container `name`, as `podman exec` does, and return its exit code
    (128+N if signal N ended it; nsenter's own failures exit 1, a command not found 127, not runnable 126).

    It runs in the container's PID, IPC and UTS namespaces and cgroup, and in its user and mount
    namespaces if it has them, as `user` (NAME|UID[:GROUP|GID], looked up in the container's root;
    default: the container's user, for a plain container the caller's), in `workdir` (default: the
    container's) with the container's environment (for a plain container the caller's) plus `env`
    (K=V each). While it waits, SIGTERM and SIGHUP are passed on to the command; SIGINT and SIGQUIT
    too unless a terminal sends them to the command itself.
    """
    if not argv:
        raise UsageError("no command given to exec")
    extra = confinement.parse_env(env)
    if workdir is not None and not workdir.startswith("/"):
        raise UsageError(f"--workdir {workdir!r} is not an absolute path")
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise NotReadyError("nsenter (util-linux) is missing: exec needs it")
    registry = containers.Registry(state_dir)
    with registry.lock(name):  # not while a checkpoint, migration or kill holds the container
        registry.refuse_while_migrating(name)
        session = _start(registry.get(name), nsenter, list(argv), user, workdir, extra)
    return session.wait()


class Session:
    """A command started by `exec_in`: its nsenter is our child, the command nsenter's."""

    def __init__(self, process: subprocess.Popen[bytes], group: cgroups.Cgroup) -> None:
        self.process = process
        self.group = group

    def wait(self) -> int:
        """The command's exit code, or 128+N for signal N."""
        with self._passing_signals():
            code = self.process.wait()
        return 128 - code if code < 0 else code

    def signal(self, signum: int) -> None:
        """Send `signum` to the command (to nsenter if it has not forked it yet)."""
        children = [p.host_pid for p in procs.read_all(self.group.pids()) if p.host_ppid == self.process.pid]
        with contextlib.suppress(ProcessLookupError):
            os.kill(children[0] if children else self.process.pid, signum)

    @contextlib.contextmanager
    def _passing_signals(self) -> Iterator[None]:
        """Signals meant to end kerrickpt exec end the command instead; kerrickpt then returns its status.
        Only the main thread can catch signals: from another, the caller passes them (`signal`)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        typed = _terminal_sends_to_us()
        before = {}
        for signum in (*FORWARDED, *TYPED):
            passed = signal.SIG_IGN if typed and signum in TYPED else lambda n, _frame: self.signal(n)
            before[signum] = signal.signal(signum, passed)
        try:
            yield
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)


def _terminal_sends_to_us() -> bool:
    """Whether our controlling terminal's foreground process group is ours, and so the command's:
    Ctrl-C reaches the command from the terminal itself."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _start(
    container: containers.Container,
    nsenter: str,
    argv: list[str],
    user: str | None,
    workdir: str | None,
    extra: dict[str, str],
) -> Session:
    if not container.is_running():
        raise ContainerNotFoundError(f"container {container.name!r} is not running")
    group = container.group
    if group.freezer.is_frozen():
        raise BusyError(
            f"container {container.name} is frozen (a checkpoint or migration holds it, or left it so: "
            "see `kerrickpt recover`); a command started in it would not run"
        )
    init = container.init_pid
    root = Path(f"/proc/{init}/root")  # the container's root, seen from the host
    confined = container.confinement
    if user is not None:
        account = users.resolve(user, root)
        ids: tuple[int, int] | None = (account.uid, account.gid)
    else:
        ids = (confined.uid, confined.gid) if confined else None
    directory = workdir or (confined.workdir if confined else "/")
    found = users.inside(root, directory)
    if found is None or not found.is_dir():
        raise UsageError(f"{directory} is not a directory in container {container.name}")
    environment = (dict(confined.env) if confined else dict(os.environ)) | extra
    entered = [*ALWAYS.values(), *(flag for ns, flag in WHERE_OWN.items() if not procs.shares_namespace(init, ns))]
    who = ["--setuid", str(ids[0]), "--setgid", str(ids[1])] if ids else []
    # --root, --wdns: its root (the container's own if it has one) and its working directory in it,
    # never the caller's, which may lie outside that root.
    command = [nsenter, f"--target={init}", *entered, "--root", f"--wdns={directory}", *who, "--", *argv]
    process = subprocess.Popen([SHELL, "-c", GATE, "kerrickpt-exec", *command], env=environment)
    try:
        # Not reaped (WNOWAIT): Popen still gets the exit status of a gate that died.
        state = os.waitid(os.P_PID, process.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
        if state is not None and state.si_code == os.CLD_STOPPED:
            group.add(process.pid)
            os.kill(process.pid, signal.SIGCONT)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Session(process, group)
