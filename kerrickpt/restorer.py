"""Owns the processes that run CRIU's restore: inside the container's cgroup and, for host-namespace
jobs, in fresh IPC and PID namespaces whose init is kerrickpt's own reaper."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kerrickpt import cgroups, command, criu, criuopts, helper, namespaces, rootfs, sysvipc
from kerrickpt.confinement import Confinement
from kerrickpt.errors import ArchiveCorruptError, CommandTimeout, KerrickptError, RestoreFailed

if TYPE_CHECKING:  # the helper program imports this module, and only what it runs: it starts in the downtime
    from kerrickpt import feeder, postcopy


@dataclass(frozen=True)
class Plan:
    """How to restore: the tree's session outside it, its SysV objects, a PID namespace of its own."""

    shell_job: bool = False
    ipc: sysvipc.JobIpc | None = None
    new_pid_namespace: bool = False
    watcher: postcopy.Watcher | None = None  # post-copy: its daemon serves the memory the images lack
    gate: Path | None = None  # the images come from a streamer (feeder.Feed), and the tree waits for this gate
    timeout: float | None = None  # for CRIU's restore: limits.RESTORE unless a streamed restore's own
    confinement: Confinement | None = None  # a confined container's, its layer unpacked at `layer`
    layer: rootfs.Layer | None = None
    cgroup_parents: Mapping[Path, Path] | None = None  # where its cgroups go (see cgroups.own); None: the node's
    netns: Path | None = None  # its own network namespace, made for it (see network); None: it shares the node's
    # Or, for a confined container's own network namespace, which CRIU restores: its veth's end that CRIU moves in.
    unplaced: str | None = None
    tcp: str | None = None  # criu.TCP_ESTABLISHED or TCP_CLOSE: what becomes of its established connections


class Helper:
    """The program that runs CRIU's restore: a fresh one (fork and exec, no Python in between), since a
    caller with threads must never run Python in a forked child, where a lock another thread held at
    the fork stays locked for good. Its Python takes a while to start: it starts as the restore
    begins, and gets its order once the restore is planned (`run`); left without one, it leaves. It holds
    `pass_fds` (numbered 3 or above) at their numbers, for `run` to hand to CRIU.

    Its stderr is a file of its own, not its caller's: a migration's receiver starts it before the archive comes,
    and the receiver's stderr is its ssh channel, which must close as the receiver ends, whatever becomes of this
    helper. What it says there (a Python that failed before it could answer) comes with the error that it died
    without an answer.
    """

    def __init__(self, pass_fds: Sequence[int] = ()) -> None:
        self.answers: int | None
        self.answers, writer = os.pipe()
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the helper; closed in close()
        try:
            self.process = helper.start("restore", pass_fds=(writer, *pass_fds), stderr=self.errors.fileno())
        except BaseException:
            os.close(self.answers)
            self.errors.close()
            raise
        finally:
            os.close(writer)
        self.writer = writer  # its number in the helper, where it stays open

    def run(
        self,
        group: cgroups.Cgroup,
        found: criu.Criu,
        scratch: Path,
        inherit: Mapping[str, Path | int],
        plan: Plan,
        feed: feeder.Feed | None = None,
    ) -> int:
        """Restore the images in `scratch`, or those `feed` serves while CRIU restores; returns the host PID
        of the tree's init (its root, or kerrickpt's init). CRIU gives the restored tree each file of
        `inherit` in place of the file its key names: a path opened for appending, or a number of `pass_fds`."""
        if feed is not None:
            plan = dataclasses.replace(plan, gate=feed.gate, timeout=feed.timeout)
        helper.send(self.process, _order(group, found, scratch, inherit, plan, self.writer))
        reader, self.answers = self.answers, None
        assert reader is not None
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
            self.process.wait()  # it leaves once CRIU's answer is sent: the pipe's end came first
        answer = _answer(said)
        _raise_error(answer)
        if "pid" not in answer:
            raise RestoreFailed(
                f"the restore helper died without an answer (exit code {self.process.returncode})",
                log_tail=self._said(),
            )
        return int(answer.get("init", answer["pid"]))

    def close(self) -> None:
        """Wait until it is gone; one never given an order leaves now."""
        if self.answers is not None:
            helper.send(self.process, None)
            os.close(self.answers)
            self.answers = None
        self.process.wait()
        self.errors.close()

    def _said(self) -> str:
        """The last lines it wrote to its stderr."""
        return command.tail_of(self.errors)


def _order(
    group: cgroups.Cgroup,
    found: criu.Criu,
    scratch: Path,
    inherit: Mapping[str, Path | int],
    plan: Plan,
    writer: int,
) -> dict[str, Any]:
    """What the helper needs, as JSON: the plan, with only whether a post-copy watcher serves the memory."""
    return {
        "cgroup": group.to_list(),
        "criu": dataclasses.asdict(found),
        "scratch": str(scratch.absolute()),  # the helper runs in /
        "inherit": {key: path if isinstance(path, int) else str(path.absolute()) for key, path in inherit.items()},
        "shell_job": plan.shell_job,
        "ipc": plan.ipc.to_dict() if plan.ipc is not None else None,
        "new_pid_namespace": plan.new_pid_namespace,
        "lazy": plan.watcher is not None,
        "gate": str(plan.gate.absolute()) if plan.gate is not None else None,
        "timeout": plan.timeout,
        "confinement": plan.confinement.to_dict() if plan.confinement else None,
        "layer": str(plan.layer.root) if plan.layer else None,
        "netns": str(plan.netns) if plan.netns else None,
        "unplaced": plan.unplaced,
        "tcp": plan.tcp,
        "answers": writer,
    }


@dataclass(frozen=True)
class _Order:
    """The helper's side of `_order`."""

    group: cgroups.Cgroup
    found: criu.Criu
    scratch: Path
    inherit: dict[str, Path | int]  # an int: a descriptor the helper got at its start
    shell_job: bool
    ipc: sysvipc.JobIpc | None
    new_pid_namespace: bool
    lazy: bool
    gate: Path | None
    timeout: float | None
    confinement: Confinement | None
    layer: rootfs.Layer | None
    netns: Path | None
    unplaced: str | None
    tcp: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Order:
        return cls(
            group=cgroups.Cgroup(tuple(Path(d) for d in data["cgroup"])),
            found=criu.Criu(**data["criu"]),
            scratch=Path(data["scratch"]),
            inherit={str(k): v if isinstance(v, int) else Path(v) for k, v in data["inherit"].items()},
            shell_job=bool(data["shell_job"]),
            ipc=sysvipc.JobIpc.from_dict(data["ipc"]) if data["ipc"] is not None else None,
            new_pid_namespace=bool(data["new_pid_namespace"]),
            lazy=bool(data["lazy"]),
            gate=Path(data["gate"]) if data["gate"] is not None else None,
            timeout=None if data["timeout"] is None else float(data["timeout"]),
            confinement=Confinement.from_dict(data["confinement"]) if data["confinement"] else None,
            layer=rootfs.Layer(Path(data["layer"])) if data["layer"] else None,
            netns=Path(data["netns"]) if data["netns"] else None,
            unplaced=data["unplaced"],
            tcp=data["tcp"],
        )


def main(order: dict[str, Any]) -> None:  # pragma: no cover - the restore helper
    """The helper program (`helper.start("restore", ...)`): its answers go to the order's pipe."""
    writer = int(order["answers"])
    try:
        _child(_Order.from_dict(order), writer)
    except BaseException as exc:
        _send(writer, _error(exc))
    # The restore waits for the answer pipe's end, which comes when this process is gone: Python's own
    # teardown would add some 30 ms to the container's downtime. Everything it needed to say is said.
    sys.stderr.flush()
    os._exit(0)


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


def _restore(order: _Order, inherit: Mapping[str, int]) -> int:
    confined = order.confinement
    external = criuopts.restore_externals(confined) if confined else []
    external += [criuopts.netdev_external(order.unplaced)] if order.unplaced else []
    return criu.restore(
        order.found,
        order.scratch / "images",
        order.scratch,
        inherit_fds=inherit,
        shell_job=order.shell_job,
        lazy_pages=order.lazy,
        gate=order.gate,
        timeout=order.timeout,
        root=rootfs.ROOT if confined else None,
        external=external,
        tcp=order.tcp,
    )


def _child(order: _Order, writer: int) -> None:  # pragma: no cover - the restore helper
    """Join the cgroup (CRIU and the tree it makes inherit it), make the IPC objects, restore."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC  # as the processes held them: see containers.open_log
    inherit = {key: path if isinstance(path, int) else os.open(path, flags) for key, path in order.inherit.items()}
    if order.netns is not None:
        inherit[criuopts.NETNS_KEY] = os.open(order.netns, os.O_RDONLY | os.O_CLOEXEC)
    order.group.add(os.getpid())
    if order.confinement is not None and order.layer is not None:
        rootfs.stage(order.confinement, order.layer)
        rootfs.bind_host_paths(order.confinement, rootfs.HOST_BINDS)
    if order.ipc is not None:
        namespaces.unshare(namespaces.CLONE_NEWIPC)
        sysvipc.recreate(order.ipc)
    if order.new_pid_namespace:
        namespaces.unshare(namespaces.CLONE_NEWPID)
        init = os.fork()  # safe here: the helper has no other thread
        if init == 0:
            _init(order, inherit, writer)
        _send(writer, {"init": init})
    else:
        _send(writer, {"pid": _restore(order, inherit)})


def _init(
    order: _Order, inherit: Mapping[str, int], writer: int
) -> NoReturn:  # pragma: no cover - PID 1 of the job's new PID namespace
    """Restore the job at its own PIDs from inside the namespace, then stay as its reaper.

    CRIU must see this namespace in /proc to give the job its PIDs back; the job dies
    with its PID 1, so this process outlives it and leaves when the last one is gone.
    """
    try:
        namespaces.private_proc()
        os.setsid()
        _send(writer, {"pid": _restore(order, inherit)})
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
