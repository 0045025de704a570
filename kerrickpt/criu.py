"""Owns every call into CRIU: locating the binary, `criu check`, the streaming dump, and restore over pycriu's RPC."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kerrickpt import command, streamer
from kerrickpt.errors import CommandTimeout, DumpFailed, KerrickptError, NotReadyError, RestoreFailed

CHECK_TIMEOUT = 60.0
DUMP_TIMEOUT = 600.0
STREAM_GRACE = 60.0  # for CRIU to let go of the tree once its image stream has ended or broken
RESTORE_TIMEOUT = 600.0
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
LOG_LEVEL = 4


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


def _call(client, request: str, timeout: float, error: type[KerrickptError], log: Path):  # type: ignore[no-untyped-def]
    """Send one RPC request; kill criu if it overruns; turn failures into `error` with the log tail."""
    import pycriu

    timed_out = threading.Event()

    def watchdog() -> None:
        swrk = getattr(client._comm, "swrk", None)
        if swrk:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.kill(swrk, signal.SIGKILL)

    timer = threading.Timer(timeout, watchdog)
    timer.start()
    try:
        return getattr(client, request)()
    except pycriu.CRIUException as exc:
        if timed_out.is_set():
            raise CommandTimeout(
                f"criu {request} did not finish within {timeout:.0f} s and was killed",
                log_tail=command.tail_file(log),
            ) from exc
        raise error(f"criu {request} failed: {exc}", log_tail=command.tail_file(log)) from exc
    finally:
        timer.cancel()
        for fd in (client.opts.images_dir_fd, client.opts.work_dir_fd):
            os.close(fd)


def dump(
    criu: Criu,
    pid: int,
    images_dir: Path,
    work_dir: Path,
    *,
    freeze_cgroup: str,
    shell_job: bool = False,
    timeout: float = DUMP_TIMEOUT,
) -> None:
    """Dump the tree rooted at host PID `pid` into `images_dir`, leaving it frozen in `freeze_cgroup`."""
    client = _rpc(criu, images_dir, work_dir, DUMP_LOG)
    client.opts.pid = pid
    # The caller froze the cgroup; CRIU puts it back to FROZEN when it lets go, so
    # kerrickpt alone decides between killing the source and thawing it.
    client.opts.leave_running = True
    client.opts.freeze_cgroup = freeze_cgroup
    client.opts.shell_job = shell_job
    _call(client, "dump", timeout, DumpFailed, work_dir / DUMP_LOG)


def dump_streamed(
    criu: Criu,
    pid: int,
    images_dir: Path,
    work_dir: Path,
    sink: streamer.Sink,
    *,
    freeze_cgroup: str,
    shell_job: bool = False,
    timeout: float = DUMP_TIMEOUT,
) -> None:
    """Dump as `dump` does, but stream the images into `sink` while CRIU writes them (`criu dump --stream`).

    The archive is then compressed during the dump rather than after it; CRIU goes only
    as fast as `sink` takes the images. This one call runs CRIU's command line, not its
    RPC: CRIU's service refuses to stream ("Image streaming is not supported with CRIU's
    service feature", criu/cr-service.c). It takes the options `dump` gives the RPC;
    `images_dir` holds only the streamer's socket.
    """
    argv = [
        criu.path, "dump", "--stream", "--tree", str(pid),
        # Relative: CRIU puts the socket's path in sun_path, 108 bytes, too few for a deep state dir.
        "--images-dir", ".", "--work-dir", str(work_dir), "--log-file", DUMP_LOG, f"-v{LOG_LEVEL}",
        # The caller froze the cgroup; CRIU puts it back to FROZEN when it lets go, so
        # kerrickpt alone decides between killing the source and thawing it.
        "--leave-running", "--freeze-cgroup", freeze_cgroup,
        # kerrickpt recreates cgroups itself, with the limits from the manifest.
        "--manage-cgroups=ignore",
    ] + (["--shell-job"] if shell_job else [])  # fmt: skip
    log = work_dir / DUMP_LOG
    with streamer.Capture(images_dir) as capture:
        process = command.start(argv, cwd=images_dir)
        try:
            capture.serve(process.pid, sink, idle=timeout)
        finally:
            # Also after a failure here: CRIU, its pipes closed, gives up and lets go of the
            # tree (its parasite leaves the tasks); it is killed only if it does not.
            returncode = command.wait(process, deadline=time.monotonic() + STREAM_GRACE, log=log)
    if returncode != 0:
        raise DumpFailed(f"criu dump failed (exit code {returncode})", log_tail=command.tail_file(log))


def restore(
    criu: Criu,
    images_dir: Path,
    work_dir: Path,
    *,
    inherit_fds: Mapping[str, int],
    shell_job: bool = False,
    timeout: float = RESTORE_TIMEOUT,
) -> int:
    """Restore a tree (RPC restores are always detached); returns the host PID of its root."""
    client = _rpc(criu, images_dir, work_dir, RESTORE_LOG)
    client.opts.shell_job = shell_job
    for key, fd in inherit_fds.items():
        os.set_inheritable(fd, True)
        entry = client.opts.inherit_fd.add()
        entry.key = key
        entry.fd = fd
    response = _call(client, "restore", timeout, RestoreFailed, work_dir / RESTORE_LOG)
    return int(response.pid)
