"""Owns every call into CRIU: locating the binary, `criu check`, the streaming dump and restore, and pycriu's RPC."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kerrickpt import command, criuopts, limits, streamer
from kerrickpt.errors import (
    CommandTimeout,
    ContainerDamaged,
    DumpFailed,
    KerrickptError,
    NotReadyError,
    RestoreFailed,
)
from kerrickpt.freezer import Freezer

CHECK_TIMEOUT = 60.0
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
RESTORE_PIDFILE = "restore.pid"
LAZY_LOG = "lazy-pages.log"
LOG_LEVEL = 4
# What compel names the memfd that carries CRIU's parasite code into a task (MEMFD_FNAME): a task
# whose /proc/PID/maps still shows it was left with CRIU's code inside.
PARASITE_MAP = "/memfd:CRIUMFD"
# What a restore does with the established TCP connections in the images (CRIU's option names).
TCP_ESTABLISHED, TCP_CLOSE = "tcp-established", "tcp-close"
# CRIU's network lock is never taken: its iptables chain inside the container's network namespace outlives a CRIU
# that is stopped or killed (it has no handler for SIGTERM), which would leave the container cut off for good.
# kerrickpt cuts a container with a network of its own off itself, around every dump (see netlinks.cut_off), and
# undoes that on every path; the method is recorded in the images, and a restore takes it from there.
NETWORK_LOCK = "skip"


@dataclass(frozen=True)
class Criu:
    """A usable CRIU binary and its version."""

    path: str
    version: str


def locate() -> Criu:
    """The CRIU that kerrickpt uses: $KERRICKPT_CRIU, else `criu` on PATH."""
    path = os.environ.get("KERRICKPT_CRIU") or shutil.which("criu")
    if not path:
        raise NotReadyError("CRIU not found: install it (ci/setup builds 4.2.1) or set KERRICKPT_CRIU")
    result = command.run([path, "--version"], timeout=CHECK_TIMEOUT)
    for line in result.stdout.splitlines():
        if line.startswith("Version:"):
            return Criu(path=path, version=line.split(":", 1)[1].strip())
    raise NotReadyError(f"{path} --version printed no version", log_tail=command.tail(result.stdout + result.stderr))


def check(criu: Criu) -> tuple[bool, str]:
    """Run `criu check`: whether the kernel can do checkpoint/restore, and CRIU's words."""
    result = command.run([criu.path, "check"], timeout=CHECK_TIMEOUT)
    text = (result.stdout + result.stderr).strip()
    return result.returncode == 0 and "Looks good" in text, text


def has_feature(criu: Criu, feature: str) -> bool:
    """Whether `criu check --feature FEATURE` succeeds on this kernel."""
    return command.run([criu.path, "check", "--feature", feature], timeout=CHECK_TIMEOUT).returncode == 0


def cpuinfo_dump(criu: Criu, directory: Path) -> Path:
    """Write this CPU's description as CRIU sees it (cpuinfo.img) into `directory`."""
    result = command.run([criu.path, "cpuinfo", "dump", "-D", str(directory)], timeout=CHECK_TIMEOUT)
    if result.returncode != 0:
        raise KerrickptError("criu cpuinfo dump failed", log_tail=command.tail(result.stderr))
    return directory / "cpuinfo.img"


def cpuinfo_check(criu: Criu, directory: Path) -> tuple[bool, str]:
    """Whether this CPU can run what was dumped on the CPU described by `directory`/cpuinfo.img."""
    result = command.run([criu.path, "cpuinfo", "check", "-D", str(directory)], timeout=CHECK_TIMEOUT)
    return result.returncode == 0, command.tail(result.stdout + result.stderr)


def _rpc(criu: Criu, images_dir: Path, work_dir: Path, log_name: str):  # type: ignore[no-untyped-def]
    """A pycriu client with the options every request shares."""
    import pycriu  # imported late: `kerrickpt check` must work without it

    client = pycriu.criu()
    client.use_binary(criu.path)
    client.opts.images_dir_fd = _inheritable_dir_fd(images_dir)
    client.opts.work_dir_fd = _inheritable_dir_fd(work_dir)
    client.opts.log_file = log_name
    client.opts.log_level = LOG_LEVEL
    # kerrickpt recreates cgroups itself, with the limits from the manifest.
    client.opts.manage_cgroups = False
    return client


def _inheritable_dir_fd(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.set_inheritable(fd, True)
    return fd


def _call(  # type: ignore[no-untyped-def]
    client,
    request: str,
    timeout: float,
    error: type[KerrickptError],
    log: Path,
):
    """Send one RPC request; stop criu if it overruns (see command.stop_pid); turn failures into `error`
    with the log tail, CommandTimeout if it was stopped."""
    import pycriu

    timed_out, ended = threading.Event(), threading.Event()

    def watchdog() -> None:
        # pycriu starts CRIU inside the call: a limit shorter than that start waits for it.
        while not (swrk := getattr(client._comm, "swrk", None)) and not ended.wait(0.01):
            pass
        if swrk and not ended.is_set():
            timed_out.set()
            command.stop_pid(swrk)

    timer = threading.Timer(timeout, watchdog)
    timer.start()
    try:
        return getattr(client, request)()
    except pycriu.CRIUException as exc:
        if timed_out.is_set():
            raise CommandTimeout(
                f"criu {request} did not finish within {timeout:g} s and was stopped",
                log_tail=command.tail_file(log),
            ) from exc
        raise error(_said(f"criu {request} failed: {exc}", log), log_tail=command.tail_file(log)) from exc
    except BaseException:
        # pycriu lets a signal's exception (SIGTERM, Ctrl-C) out of its call with CRIU still
        # running. CRIU may be seizing the tree, some tasks held by ptrace and the rest only by
        # the freeze: a thaw now would let those run under it. Hang up and wait until CRIU
        # lets go (the watchdog still bounds that), then unwind.
        _hang_up(client)
        raise
    finally:
        ended.set()
        timer.cancel()
        for fd in (client.opts.images_dir_fd, client.opts.work_dir_fd):
            os.close(fd)


def _hang_up(client) -> None:  # type: ignore[no-untyped-def]
    """Close pycriu's socket to CRIU and reap CRIU, if pycriu had not done so yet."""
    # A signal may come before pycriu's connect() stored them: then CRIU, whose PID is not known
    # yet, has not been asked anything and leaves when its socket closes with pycriu's objects.
    sk, swrk = getattr(client._comm, "sk", None), getattr(client._comm, "swrk", None)
    if sk is not None:
        sk.close()
    if swrk:
        with contextlib.suppress(ChildProcessError):  # pycriu reaped it already
            os.waitpid(swrk, 0)


def _hold(freeze_cgroup: str) -> None:
    """Freeze the tree of a CRIU about to be stopped: CRIU thaws the cgroup once ptrace holds every task,
    and its death lets them go; frozen now, they stay frozen then."""
    control, value = Freezer(Path(freeze_cgroup)).control(frozen=True)
    control.write_text(value)


def _parasite_left(freeze_cgroup: str) -> list[int]:
    """The processes in `freeze_cgroup` that still have CRIU's parasite code mapped."""
    left: list[int] = []
    try:
        pids = Path(freeze_cgroup, "cgroup.procs").read_text().split()
    except OSError:  # the cgroup is gone, and its processes with it
        return left
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile
            if PARASITE_MAP in Path(f"/proc/{pid}/maps").read_text():
                left.append(int(pid))
    return left


# What CRIU logs as an error on every run where it may not raise its own limit (field notes), and goes on.
HARMLESS = b"Can't setup RLIMIT_NOFILE for self"


def _said(what: str, log: Path) -> str:
    """`what` failed, and the first error CRIU's `log` gives, which says why where the last lines (the log's tail)
    often tell only of the unwinding after it."""
    try:
        with log.open("rb") as fh:
            first = next((line for line in fh if b"Error (" in line and HARMLESS not in line), b"")
    except OSError:
        first = b""
    said = first.decode(errors="replace").partition("Error (")[2].partition("): ")[2].strip()
    return f"{what}: {said}" if said else what


def _damaged(freeze_cgroup: str, what: str, log: Path) -> ContainerDamaged:
    """CRIU ended (`what`) while its parasite may have been inside the tree: keep it frozen and say so."""
    _hold(freeze_cgroup)
    left = _parasite_left(freeze_cgroup)
    inside = f" (processes {', '.join(map(str, left))} still hold it)" if left else ""
    return ContainerDamaged(
        f"{what}, while its code may have been inside the processes{inside}: they may not run correctly, "
        "so they are left frozen",
        log_tail=command.tail_file(log),
    )


def _dump_argv(
    criu: Criu,
    pid: int,
    images_dir: Path,
    work_dir: Path,
    freeze_cgroup: str,
    shell_job: bool,
    external: Sequence[str],
    tcp_established: bool = False,
) -> list[str]:
    """`criu dump` with the options every dump of kerrickpt's gets: the freeze is the caller's, and so are cgroups."""
    argv = [
        criu.path, "dump", "--tree", str(pid), "--images-dir", str(images_dir), "--work-dir", str(work_dir),
        "--log-file", DUMP_LOG, f"-v{LOG_LEVEL}",
        # The caller froze the cgroup; CRIU puts it back to FROZEN when it lets go, so
        # kerrickpt alone decides between killing the source and thawing it.
        "--leave-running", "--freeze-cgroup", freeze_cgroup,
        # kerrickpt recreates cgroups itself, with the limits from the manifest.
        "--manage-cgroups=ignore", "--network-lock", NETWORK_LOCK,
    ]  # fmt: skip
    argv += ["--shell-job"] if shell_job else []
    return argv + (["--tcp-established"] if tcp_established else []) + criuopts.command_line(external)


def dump_streamed(
    criu: Criu,
    pid: int,
    images_dir: Path,
    work_dir: Path,
    sink: streamer.Sink,
    *,
    freeze_cgroup: str,
    shell_job: bool = False,
    external: Sequence[str] = (),
    tcp_established: bool = False,
) -> None:
    """Dump the tree rooted at host PID `pid`, leaving it frozen in `freeze_cgroup`, streaming the images into
    `sink` while CRIU writes them (`criu dump --stream`); `external` names what CRIU may not dump itself (see
    criuopts).

    `sink` is the archive (compressed during the dump) or a snapshot's reserve (see reserve); CRIU goes only
    as fast as `sink` takes the images. This runs CRIU's command line, not its RPC: CRIU's service refuses
    to stream ("Image streaming is not supported with CRIU's service feature", criu/cr-service.c).
    `images_dir` holds only the streamer's socket. CRIU may go on as long as its images keep coming:
    limits.DUMP is how long it may send none. ContainerDamaged if it had to be stopped, or left its code inside.
    """
    # Relative: CRIU puts the socket's path in sun_path, 108 bytes, too few for a deep state dir.
    argv = _dump_argv(criu, pid, Path("."), work_dir, freeze_cgroup, shell_job, external, tcp_established)
    argv.append("--stream")
    log = work_dir / DUMP_LOG
    with streamer.Capture(images_dir) as capture:
        process = command.start(argv, cwd=images_dir)
        try:
            capture.serve(process.pid, sink, idle=limits.DUMP.seconds())
        finally:
            # Also after a failure here: CRIU, its pipes closed, gives up and lets go of the
            # tree (its parasite leaves the tasks); it is stopped only if it does not.
            deadline = time.monotonic() + limits.LET_GO.seconds()
            try:
                returncode = command.wait(process, deadline=deadline, log=log, before_stop=lambda: _hold(freeze_cgroup))
            except CommandTimeout as exc:
                what = "criu dump did not let go of the tree in time and was stopped"
                raise _damaged(freeze_cgroup, what, log) from exc
            # Whatever failed first: a CRIU that ended this way may have left its code inside.
            if returncode < 0 or (returncode and _parasite_left(freeze_cgroup)):
                how = f"was ended by signal {-returncode}" if returncode < 0 else f"failed (exit code {returncode})"
                raise _damaged(freeze_cgroup, f"criu dump {how}", log)
    if returncode != 0:
        raise DumpFailed(f"criu dump failed (exit code {returncode})", log_tail=command.tail_file(log))


def dump_lazy(
    criu: Criu,
    pid: int,
    images_dir: Path,
    work_dir: Path,
    pages: socket.socket,
    *,
    freeze_cgroup: str,
    shell_job: bool = False,
    external: Sequence[str] = (),
    tcp_established: bool = False,
) -> subprocess.Popen[bytes]:
    """Dump as `dump` does, but leave the memory CRIU can fetch on demand for post-copy (`--lazy-pages`).

    Returns once the images are written. The returned CRIU then serves the rest of the
    memory through `pages`, a connected socket (`--ps-socket`: no port is opened), and
    exits once the target has all of it or the transfer broke off, with 0 either way (only
    the target knows which); it then lets go of the tree, which stays frozen in
    `freeze_cgroup`. Closing `pages` makes it give up.
    """
    ready_read, ready_write = os.pipe()
    os.set_inheritable(pages.fileno(), True)
    argv = _dump_argv(criu, pid, images_dir, work_dir, freeze_cgroup, shell_job, external, tcp_established)
    argv += ["--lazy-pages", "--ps-socket", str(pages.fileno()), "--status-fd", str(ready_write)]
    timeout = limits.DUMP.seconds()
    log = work_dir / DUMP_LOG
    return _start_until_ready(argv, work_dir, ready_read, ready_write, log, timeout, DumpFailed, freeze_cgroup)


def lazy_pages_daemon(
    criu: Criu, images_dir: Path, work_dir: Path, pages: socket.socket, *, timeout: float | None = None
) -> subprocess.Popen[bytes]:
    """Start CRIU's lazy-pages daemon for a restore from `images_dir`: it fetches memory through `pages`.

    In a session of its own: it must outlive the ssh session that started it until every page came.
    """
    ready_read, ready_write = os.pipe()
    os.set_inheritable(pages.fileno(), True)
    argv = [
        criu.path, "lazy-pages", "--page-server", "--ps-socket", str(pages.fileno()), "--images-dir",
        str(images_dir), "--work-dir", str(work_dir), "--log-file", LAZY_LOG, f"-v{LOG_LEVEL}",
        "--status-fd", str(ready_write),
    ]  # fmt: skip
    timeout = limits.RESTORE.seconds() if timeout is None else timeout
    return _start_until_ready(argv, work_dir, ready_read, ready_write, work_dir / LAZY_LOG, timeout, RestoreFailed)


def _start_until_ready(
    argv: list[str],
    cwd: Path,
    ready_read: int,
    ready_write: int,
    log: Path,
    timeout: float,
    error: type[KerrickptError],
    freeze_cgroup: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start CRIU and wait for the byte it writes to --status-fd once it is ready; its failure is `error`,
    or, for a dump that holds the tree in `freeze_cgroup`, ContainerDamaged where its code may be left inside."""
    os.set_inheritable(ready_write, True)
    try:
        process = command.start(argv, cwd=cwd, new_session=True)
    finally:
        os.close(ready_write)
    with os.fdopen(ready_read, "rb") as ready:
        poller = select.poll()
        poller.register(ready, select.POLLIN)
        ended = bool(poller.poll(timeout * 1000))  # ready, or gone: its end of the pipe closed
        if ended and ready.read(1):
            return process
    if ended:
        code = process.wait()
        what = f"criu {argv[1]} failed (exit code {code})"
    else:
        if freeze_cgroup is not None:
            _hold(freeze_cgroup)
        code = command.stop(process)
        what = f"criu {argv[1]} was not ready within {timeout:g} s and was stopped"
    if freeze_cgroup is not None and (not ended or code < 0 or _parasite_left(freeze_cgroup)):
        raise _damaged(freeze_cgroup, what, log)
    raise error(_said(what, log), log_tail=command.tail_file(log))


def restore(
    criu: Criu,
    images_dir: Path,
    work_dir: Path,
    *,
    inherit_fds: Mapping[str, int],
    shell_job: bool = False,
    lazy_pages: bool = False,
    gate: Path | None = None,
    timeout: float | None = None,
    root: Path | None = None,
    external: Sequence[str] = (),
    tcp: str | None = None,
) -> int:
    """Restore a tree (always detached); returns the host PID of its root. A confined container's tree
    gets `root` as its root and `external` binds (see criuopts). Its established TCP connections come back
    with `tcp` TCP_ESTABLISHED, or closed with TCP_CLOSE (a copy whose peers must not see two).

    With `lazy_pages`, memory comes on demand from the lazy-pages daemon running in `work_dir`.
    With a `gate`, the images come from the streamer serving `images_dir` (`criu restore
    --stream`), and the restored tree runs only once the gate, CRIU's action script, lets it
    (see feeder): on the command line, as for the streaming dump (CRIU's service refuses to
    stream), with the options the RPC gets. CRIU has `timeout` s (by default limits.RESTORE).
    """
    timeout = limits.RESTORE.seconds() if timeout is None else timeout
    for fd in inherit_fds.values():
        os.set_inheritable(fd, True)
    if gate is not None:
        return _restore_streamed(criu, images_dir, work_dir, inherit_fds, shell_job, gate, timeout, root, external, tcp)
    client = _rpc(criu, images_dir, work_dir, RESTORE_LOG)
    client.opts.tcp_established = tcp == TCP_ESTABLISHED
    client.opts.tcp_close = tcp == TCP_CLOSE
    client.opts.shell_job = shell_job
    client.opts.lazy_pages = lazy_pages
    client.opts.external.extend(external)
    if root is not None:
        client.opts.root = str(root)
    for key, fd in inherit_fds.items():
        entry = client.opts.inherit_fd.add()
        entry.key = key
        entry.fd = fd
    response = _call(client, "restore", timeout, RestoreFailed, work_dir / RESTORE_LOG)
    return int(response.pid)


def _restore_streamed(
    criu: Criu,
    images_dir: Path,
    work_dir: Path,
    inherit_fds: Mapping[str, int],
    shell_job: bool,
    gate: Path,
    timeout: float,
    root: Path | None,
    external: Sequence[str],
    tcp: str | None,
) -> int:
    argv = [
        # Relative, as for the dump: the socket's path must fit sun_path's 108 bytes.
        criu.path, "restore", "--stream", "--images-dir", ".", "--work-dir", str(work_dir),
        "--log-file", RESTORE_LOG, f"-v{LOG_LEVEL}", "--restore-detached", "--manage-cgroups=ignore",
        "--pidfile", str(work_dir / RESTORE_PIDFILE), "--action-script", str(gate),
    ]  # fmt: skip
    for key, fd in inherit_fds.items():
        argv += ["--inherit-fd", f"fd[{fd}]:{key}"]
    argv += criuopts.command_line(external) + (["--root", str(root)] if root is not None else [])
    argv += [f"--{tcp}"] if tcp is not None else []
    log = work_dir / RESTORE_LOG
    process = command.start(argv + (["--shell-job"] if shell_job else []), cwd=images_dir)
    returncode = command.wait(process, deadline=time.monotonic() + timeout, log=log)
    if returncode != 0:
        what = f"criu restore failed (exit code {returncode})"
        raise RestoreFailed(_said(what, log), log_tail=command.tail_file(log))
    return int((work_dir / RESTORE_PIDFILE).read_text())
