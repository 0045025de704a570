"""Owns starting a container's init: in a helper program, it joins the cgroup, makes the PID, IPC and UTS
namespaces (and for a confined container its user and mount namespaces and its root) and execs the command
as PID 1."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any, NoReturn

from kerrickpt import cgroups, helper, namespaces, rootfs
from kerrickpt.confinement import Confinement
from kerrickpt.errors import KerrickptError, UsageError

TIMEOUT = 60.0  # for the helper to answer: it forks and waits for one exec


def spawn(
    name: str,
    argv: list[str],
    group: cgroups.Cgroup,
    outputs: tuple[int, int],
    confinement: Confinement | None = None,
    layer: rootfs.Layer | None = None,
    netns: Path | None = None,
) -> tuple[int, bool]:
    """Start `argv` as the init of new PID, IPC and UTS namespaces in `group`, its fd 1 and 2 the files open at
    `outputs` (numbered 3 or above), its fd 0 /dev/null; returns its host PID and
    whether its lower layer is idmapped. With a `confinement`, also in its own user and mount namespaces,
    its root the overlay of `layer`, its lower layer idmapped if it asks and this node can (see rootfs.stage).
    With `netns` (a pinned network namespace) in that network namespace.

    The init is PID 1 and a session leader inside its namespace (CRIU refuses a session
    leader outside the tree), has no parent-death signal (a detached restore would kill it),
    and its parent, the helper, exits at once, so nothing of kerrickpt stays in the tree.
    """
    order = {
        "name": name,
        "argv": argv,
        "cgroup": group.to_list(),
        "outputs": list(outputs),
        "confinement": confinement.to_dict() if confinement else None,
        "layer": str(layer.root) if layer else None,
        "netns": str(netns) if netns else None,
    }
    answer = helper.ask("launch", order, timeout=TIMEOUT, what=f"starting {argv[0]}", pass_fds=sorted(set(outputs)))
    if "error" in answer:
        raise KerrickptError(f"could not start the container: {answer['error']}")
    if answer["exec_error"]:
        raise UsageError(f"cannot run {argv[0]}: {answer['exec_error']}")
    return int(answer["init"]), bool(answer["idmapped_lower"])


def main(order: dict[str, Any]) -> None:  # pragma: no cover - the helper program
    """Print {"init": PID, "exec_error": "", "idmapped_lower": bool} once the init exec'd (or why it could not),
    or {"error": ...}."""
    exec_r, exec_w = os.pipe()  # CLOEXEC: EOF means exec succeeded
    try:
        cgroups.Cgroup(tuple(Path(d) for d in order["cgroup"])).add(os.getpid())
        if order["netns"]:
            # First, with the host's privileges: the network namespace belongs to the host's user namespace, or to
            # the one made with it for a confined container (see netnsmaker), which its child joins below.
            namespaces.setns(order["netns"], namespaces.CLONE_NEWNET)
        idmapped = False
        if order["confinement"] is None:
            namespaces.unshare(namespaces.CLONE_NEWPID | namespaces.CLONE_NEWIPC | namespaces.CLONE_NEWUTS)
            init = os.fork()  # safe here: the helper has no other thread
            if init == 0:
                _exec_init(order["name"], order["argv"], _outputs(order), exec_w)
        else:
            confinement = Confinement.from_dict(order["confinement"])
            idmapped = rootfs.stage(confinement, rootfs.Layer(Path(order["layer"])), fall_back=True)
            init = _confined(order, confinement, exec_w)
        os.close(exec_w)
        with os.fdopen(exec_r, "rb") as reader:
            said = reader.read().decode()
        # No init: the child that makes the namespaces said why.
        answer = {"init": init, "exec_error": said, "idmapped_lower": idmapped} if init else {"error": said}
    except Exception as exc:
        answer = {"error": str(exc)}
    print(json.dumps(answer), flush=True)


def _confined(
    order: dict[str, Any], confinement: Confinement, exec_w: int
) -> int | None:  # pragma: no cover - the helper
    """With the container's root staged in the helper's mount namespace: a child that makes the user
    namespace (mapped from here: only the parent may map a range), or joins the one that owns the network
    namespace the helper joined (made and mapped with it), and the others, and forks the init.
    Returns the init's host PID, or None if the child failed (it said why on `exec_w`)."""
    rootfs.bind_host_paths(confinement, rootfs.ROOT)
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    init_r, init_w = os.pipe()
    child = os.fork()  # safe here: the helper has no other thread
    if child == 0:
        for fd in (unshared_r, mapped_w, init_r):
            os.close(fd)
        try:
            if order["netns"]:
                userns = namespaces.owner("/proc/self/ns/net")
                namespaces.setns(userns, namespaces.CLONE_NEWUSER)
                os.close(userns)
                os.close(unshared_w)  # mapped already: the parent, told nothing, maps nothing
            else:
                namespaces.unshare(namespaces.CLONE_NEWUSER)
                os.write(unshared_w, b"u")
                if os.read(mapped_r, 1) != b"m":
                    os._exit(1)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            others = namespaces.CLONE_NEWNS | namespaces.CLONE_NEWPID | namespaces.CLONE_NEWIPC
            namespaces.unshare(others | namespaces.CLONE_NEWUTS)
            init = os.fork()
            if init == 0:
                _exec_init(order["name"], order["argv"], _outputs(order), exec_w, confinement)
            os.write(init_w, str(init).encode())
        except BaseException as exc:
            os.write(exec_w, f"making the container's namespaces failed: {exc}".encode())
        finally:
            os._exit(0)
    for fd in (unshared_w, mapped_r, init_w):
        os.close(fd)
    try:
        if os.read(unshared_r, 1) == b"u":
            namespaces.map_ids(child, confinement.id_map)
            os.write(mapped_w, b"m")
    finally:
        os.close(mapped_w)
        os.waitpid(child, 0)
    with os.fdopen(init_r, "rb") as said:
        init = said.read()
    os.close(unshared_r)
    return int(init) if init else None


def _outputs(order: dict[str, Any]) -> tuple[int, int]:  # pragma: no cover - the helper
    stdout, stderr = order["outputs"]
    return int(stdout), int(stderr)


def _exec_init(
    name: str,
    argv: list[str],
    outputs: tuple[int, int],
    exec_w: int,
    confinement: Confinement | None = None,
) -> NoReturn:  # pragma: no cover - child
    try:
        if confinement is not None:
            rootfs.enter(rootfs.ROOT)
        socket.sethostname(name)
        os.setsid()
        os.chdir("/")
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(outputs[0], 1)
        os.dup2(outputs[1], 2)
        os.closerange(3, exec_w)
        os.closerange(exec_w + 1, os.sysconf("SC_OPEN_MAX"))
        # Python ignores these; an ignored signal would survive exec into the container.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        if confinement is None:
            os.execvp(argv[0], argv)
        os.setgroups(list(confinement.groups))
        os.setresgid(confinement.gid, confinement.gid, confinement.gid)
        os.setresuid(confinement.uid, confinement.uid, confinement.uid)
        os.chdir(confinement.workdir)
        os.execvpe(argv[0], argv, confinement.env)
    except BaseException as exc:
        os.write(exec_w, str(exc).encode())
    finally:
        os._exit(127)
