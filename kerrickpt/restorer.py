"""Owns the processes that run CRIU's restore: inside the container's cgroup and, for host-namespace
jobs, in fresh IPC and PID namespaces whose init is kerrickpt's own reaper."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from kerrickpt import cgroups, criu, feeder, namespaces, postcopy, sysvipc
from kerrickpt.errors import ArchiveCorruptError, CommandTimeout, KerrickptError, RestoreFailed


@dataclass(frozen=True)
class Plan:
    """How to restore: the tree's session outside it, its SysV objects, a PID namespace of its own."""

    shell_job: bool = False
    ipc: sysvipc.JobIpc | None = None
    new_pid_namespace: bool = False
    watcher: postcopy.Watcher | None = None  # post-copy: its daemon serves the memory the images lack
    gate: Path | None = None  # the images come from a streamer (feeder.Feed), and the tree waits for this gate
    timeout: float | None = None  # for CRIU's restore: limits.RESTORE unless a streamed restore's own


def run(
    group: cgroups.Cgroup,
    found: criu.Criu,
    scratch: Path,
    inherit: Mapping[str, int],
    plan: Plan,
    feed: feeder.Feed | None = None,
) -> int:
    """Restore the images in `scratch`, or those `feed` serves while CRIU restores; returns the host PID of
    the tree's init (its root, or kerrickpt's init)."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(reader)
        if feed is not None:
            feed.forget()
            plan = dataclasses.replace(plan, gate=feed.gate, timeout=feed.timeout)
        _child(group, found, scratch, inherit, plan, writer)
    os.close(writer)
    try:
        if feed is not None:
            try:
                said = feed.serve(reader, group)
            except KerrickptError as exc:
                if not isinstance(exc, ArchiveCorruptError):
                    # Serving broke off as CRIU ended (stopped at its limit, say): the helper says why.
                    _raise_error(_answer(bytes(feed.answers)))
                raise
        else:
            with os.fdopen(reader, "rb") as fh:
                said = fh.read()
    finally:
        os.waitpid(child, 0)
    answer = _answer(said)
    _raise_error(answer)
    if "pid" not in answer:
        raise RestoreFailed("the restore helper died without an answer")
    return int(answer.get("init", answer["pid"]))


def _answer(said: bytes) -> dict[str, Any]:
    """What the helper said, its lines merged."""
    answer: dict[str, Any] = {}
    for line in said.splitlines():
        if line.strip():
            answer.update(json.loads(line))
    return answer


def _raise_error(answer: dict[str, Any]) -> None:
    """The error the helper reported, if it did."""
    if "error" in answer:
        kind = CommandTimeout if answer["timeout"] else RestoreFailed
        raise kind(answer["error"], log_tail=answer["log_tail"])


def _send(writer: int, message: dict[str, Any]) -> None:
    os.write(writer, json.dumps(message).encode() + b"\n")


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, KerrickptError):
        return {"error": exc.message, "log_tail": exc.log_tail, "timeout": isinstance(exc, CommandTimeout)}
    return {"error": f"{type(exc).__name__}: {exc}", "log_tail": "", "timeout": False}


def _restore(found: criu.Criu, scratch: Path, inherit: Mapping[str, int], plan: Plan) -> int:
    return criu.restore(
        found,
        scratch / "images",
        scratch,
        inherit_fds=inherit,
        shell_job=plan.shell_job,
        lazy_pages=plan.watcher is not None,
        gate=plan.gate,
        timeout=plan.timeout,
    )


def _child(
    group: cgroups.Cgroup, found: criu.Criu, scratch: Path, inherit: Mapping[str, int], plan: Plan, writer: int
) -> NoReturn:  # pragma: no cover - runs in the child
    """Join the cgroup (CRIU and the tree it makes inherit it), make the IPC objects, restore."""
    try:
        group.add(os.getpid())
        if plan.ipc is not None:
            namespaces.unshare(namespaces.CLONE_NEWIPC)
            sysvipc.recreate(plan.ipc)
        if plan.new_pid_namespace:
            namespaces.unshare(namespaces.CLONE_NEWPID)
            init = os.fork()
            if init == 0:
                _init(found, scratch, inherit, plan, writer)
            _send(writer, {"init": init})
        else:
            _send(writer, {"pid": _restore(found, scratch, inherit, plan)})
    except BaseException as exc:
        _send(writer, _error(exc))
    finally:
        os._exit(0)


def _init(
    found: criu.Criu, scratch: Path, inherit: Mapping[str, int], plan: Plan, writer: int
) -> NoReturn:  # pragma: no cover - PID 1 of the job's new PID namespace
    """Restore the job at its own PIDs from inside the namespace, then stay as its reaper.

    CRIU must see this namespace in /proc to give the job its PIDs back; the job dies
    with its PID 1, so this process outlives it and leaves when the last one is gone.
    """
    try:
        namespaces.private_proc()
        os.setsid()
        _send(writer, {"pid": _restore(found, scratch, inherit, plan)})
    except BaseException as exc:
        _send(writer, _error(exc))
        os._exit(1)
    os.chdir("/")
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    while True:
        try:
            os.wait()
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
