"""Owns the target side of a migration: pre-flight checks, receiving and restoring, and answering `recover`."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from kerrickpt import compat, containers, criu, faults, node, procs, transport
from kerrickpt.errors import (
    BusyError,
    ContainerExistsError,
    KerrickptError,
    NodeIncompatibleError,
    NotReadyError,
    RestoreFailed,
    TransportError,
)
from kerrickpt.manifest import READABLE
from kerrickpt.node import Fingerprint
from kerrickpt.restore import restore

log = logging.getLogger(__name__)

INCOMING = "incoming"
SPACE_MARGIN = 64 * 2**20
PAGES_WAIT_S = 60.0  # for `agent pages` and the receiver to meet, either way round


def preflight(request: dict[str, Any], state_dir: Path | str | None = None) -> dict[str, Any]:
    """Can this node take the container described by `request`? Raises the reason it cannot."""
    registry = containers.Registry(state_dir)
    report = node.check()
    if not report.ready:
        raise NotReadyError("the target is not ready: " + "; ".join(report.problems))
    found = criu.locate()
    verdict = compat.compare(Fingerprint.from_dict(request["fingerprint"]), node.fingerprint(found.version))
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "cpuinfo.img").write_bytes(base64.b64decode(request["cpuinfo"]))
        cpu_ok, cpu_log = criu.cpuinfo_check(found, Path(scratch))
    if not cpu_ok:
        verdict = compat.Verdict(
            (*verdict.differences, compat.Difference("cpuinfo", compat.FATAL, "", "", f"criu cpuinfo check: {cpu_log}"))
        )
    if not verdict.is_acceptable(force=bool(request.get("force"))):
        raise NodeIncompatibleError(f"the target cannot take {request['name']}:\n{verdict.explain()}")
    name = containers.check_name(request["name"])
    if registry.path(name).exists():
        raise ContainerExistsError(f"the target has a container named {name!r} already")
    differ = []
    for path, size in request["files"].items():
        try:
            actual: int | str = os.stat(path).st_size
        except OSError as exc:
            actual = exc.strerror or "missing"
        if actual != size:
            differ.append(f"{path} (source: {size} bytes, target: {actual})")
    if differ:
        raise NodeIncompatibleError("files the container has open differ on the target: " + ", ".join(differ))
    need = 2 * int(request["memory_bytes"]) + SPACE_MARGIN
    free = shutil.disk_usage(registry.scratch).free
    if free < need:
        raise NodeIncompatibleError(f"no room for the images on the target: {free} bytes free, {need} needed")
    return {
        "verdict": verdict.to_dict(),
        "warnings": [d.message for d in verdict.differences],
        "archive_versions": list(READABLE),
        "lazy_pages": report.features["lazy_pages"],
    }


def _marker(registry: containers.Registry, migration_id: str) -> Path:
    directory = registry.root / INCOMING
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / f"{containers.check_name(migration_id)}.json"


def receive(
    stdin: BinaryIO,
    stdout: TextIO,
    *,
    name: str,
    migration_id: str,
    force: bool = False,
    lazy: bool = False,
    state_dir: Path | str | None = None,
) -> int:
    """Take an archive streamed by the source, restore it, and tell the source once it runs.

    With `lazy`, the memory the archive lacks comes afterwards through `agent pages` (post-copy).

    Until the container runs here, any failure removes what this side made and is
    reported; once it runs it stays, whatever happens to the connection.
    """
    registry = containers.Registry(state_dir)
    marker = _marker(registry, migration_id)
    earlier = status(migration_id, state_dir)
    if earlier["state"] == "in-progress":
        transport.emit(stdout, "error", **BusyError(f"migration {migration_id} is being received").to_dict())
        return BusyError.exit_code
    if earlier["state"] != "absent":
        # It came here already: say so, so that the source never runs its copy again.
        transport.emit(stdout, "restored", name=earlier.get("name", name), pid_map={}, warnings=[])
        return 0
    started = procs.start_time(os.getpid())
    info = {"pid": os.getpid(), "start": started}
    containers.write_atomic(marker, json.dumps(info))
    try:
        transport.emit(stdout, "ready")  # the source freezes the container only after this
        try:
            # Unpacked and verified while it arrives; restored only after the source's END frame.
            incoming = transport.FrameReader(stdin)
            page_stream = _connect_pages(registry, migration_id) if lazy else None
            result = restore(
                incoming, name=name, state_dir=registry.root, force=force, migration_id=migration_id, pages=page_stream
            )
        except Exception as exc:
            if status(migration_id, registry.root)["state"] in ("running", "exited"):
                # It failed after the container came up here: it runs, so that is the only true answer.
                log.warning("receiving %s: %s after it came up here", name, exc)
                transport.emit(stdout, "restored", name=name, pid_map={}, warnings=[f"after the restore: {exc}"])
                return 0
            # Whatever went wrong, the source must hear it did not run here, or it waits frozen.
            failure = (
                exc
                if isinstance(exc, KerrickptError)
                else RestoreFailed(f"receiving {name} failed: {type(exc).__name__}: {exc}")
            )
            transport.emit(stdout, "error", **failure.to_dict())
            return failure.exit_code
        # It runs here: from now on the only true answer is "restored", whatever fails next.
        try:
            # Outlives the container's record: `recover` must hear "it came here" even after it left again.
            containers.write_atomic(_tombstone(registry, migration_id), json.dumps({"name": name}))
            faults.inject("target-after-restore")
        except Exception as exc:
            log.warning("receiving %s: %s after it came up here; `recover` may not see it once it leaves", name, exc)
        transport.emit(stdout, "restored", **result.to_dict())
        return 0
    finally:
        marker.unlink(missing_ok=True)


def pages(migration_id: str, stdin_fd: int, stdout_fd: int, state_dir: Path | str | None = None) -> None:
    """The target's end of a post-copy page stream (`agent pages`): relays between this ssh session
    and the lazy-pages daemon `receive` starts, which connects to a socket only root can reach."""
    registry = containers.Registry(state_dir)
    path = _pages_socket(registry, migration_id)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, _short(path) as address:
        try:
            listener.bind(address)  # in a 0700 directory of root's: that is the socket's authentication
        except OSError as exc:
            raise TransportError(f"cannot make the page socket {path}: {exc}") from exc
        try:
            listener.listen(1)
            listener.settimeout(PAGES_WAIT_S)  # the receiver connects as soon as its stream begins
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                raise TransportError("no lazy-pages daemon came for the page stream") from None
        finally:
            path.unlink(missing_ok=True)
    with connection:
        # Until the daemon has every page and hangs up: the source's CRIU then ends too.
        transport.Relay(connection, stdin_fd, stdout_fd).done.wait()


def _pages_socket(registry: containers.Registry, migration_id: str) -> Path:
    return _marker(registry, migration_id).with_suffix(".pages")


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """`path` as a socket address: through /proc/self/fd, since sun_path holds 108 bytes and a state dir may not."""
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def _connect_pages(registry: containers.Registry, migration_id: str) -> socket.socket:
    """The connection to this migration's `agent pages`, which the source started before the freeze."""
    path = _pages_socket(registry, migration_id)
    deadline = time.monotonic() + PAGES_WAIT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short(path) as address:
                sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise TransportError(f"the page stream of the migration never came ({exc})", transient=True) from exc
            time.sleep(0.05)


def _tombstone(registry: containers.Registry, migration_id: str) -> Path:
    return _marker(registry, migration_id).with_suffix(".done")


def status(migration_id: str, state_dir: Path | str | None = None) -> dict[str, Any]:
    """What became of a migration here: running, exited, departed (came and went), in-progress or absent.

    What a receiver that died mid-way left is gone by then, so that `absent` is the truth.
    """
    registry = containers.Registry(state_dir)
    for container in registry.all():
        if container.migration == migration_id:
            return {"state": "running" if container.is_running() else "exited", "name": container.name}
    tombstone = _tombstone(registry, migration_id)
    if tombstone.exists():
        return {"state": "departed", **json.loads(tombstone.read_text())}
    marker = _marker(registry, migration_id)
    try:
        info = json.loads(marker.read_text())
    except FileNotFoundError:
        return {"state": "absent"}
    if info["start"] is not None and procs.is_alive(info["pid"], info["start"]):
        return {"state": "in-progress"}
    # The receiver died before the container ran here: opening the registry above swept
    # its half-made container and its scratch; only its marker is left.
    marker.unlink(missing_ok=True)
    return {"state": "absent"}
