"""Owns the target side of a migration: pre-flight checks, receiving and restoring, and answering `recover`."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import msgspec

from kerrickpt import (
    archive,
    claims,
    compat,
    containers,
    criu,
    faults,
    feeder,
    garbage,
    isolation,
    netlinks,
    network,
    node,
    postcopy,
    procs,
    restorer,
    schema,
    transport,
)
from kerrickpt.confinement import Confinement
from kerrickpt.errors import (
    BusyError,
    ContainerExistsError,
    Interrupted,
    KerrickptError,
    NodeIncompatibleError,
    NotCheckpointable,
    NotReadyError,
    ProtocolError,
    RestoreFailed,
    TransportError,
    UsageError,
)
from kerrickpt.manifest import READABLE
from kerrickpt.node import Fingerprint
from kerrickpt.restore import Prepared, prepare, restore

log = logging.getLogger(__name__)

SPACE_MARGIN = 64 * 2**20
CHUNK = 1 << 20


def preflight(raw: bytes | object, state_dir: Path | str | None = None) -> dict[str, Any]:
    """Can this node take the container the source's request (`raw`: its JSON, or that parsed)
    describes? Raises the reason it cannot; ProtocolError if the request is malformed. What it claims for the
    container (see `preflight_holding`) is let go as it answers."""
    with preflight_holding(raw, state_dir) as answer:
        return answer


@contextlib.contextmanager
def preflight_holding(raw: bytes | object, state_dir: Path | str | None = None) -> Iterator[dict[str, Any]]:
    """The answer of `preflight`, and what it claims held while the context lasts.

    What the container's network of its own needs here (its address, its published node ports) is claimed for it,
    as the container the request's migration brings (see network.reserve): the source holds the pre-flight open
    until the migration ends (see `answer_preflight`), so no other run, restore or migration takes it before the
    restore does, and the migration's receiver checks that it is still held before the freeze. Once no pre-flight
    nor receiver of the migration lives, and it did not bring the container, the claims go: as the context ends,
    or, for one killed, as claims of a holder that is gone (taken over, or removed by `gc`)."""
    request = schema.from_peer(raw, schema.PreflightRequest, "the source")
    try:
        cpuinfo = base64.b64decode(request.cpuinfo, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"the source sent a malformed message: cpuinfo is not base64: {exc}") from exc
    registry = containers.Registry(state_dir)
    # A source from before sends none: what is claimed then is let go as soon as the answer is given.
    migration_id = request.migration_id or uuid.uuid4().hex
    marker = registry.preflight_marker(migration_id)
    me = os.getpid()
    owner = {"pid": me, "start": procs.start_time(me)}
    containers.write_atomic(marker, json.dumps(owner))  # before any claim
    try:
        answer = _check(request, cpuinfo, registry, migration_id, state_dir)
        if request.network is not None and not request.net_remap:
            # What the receiver makes before the archive comes (see `_prepare`).
            carried = msgspec.to_builtins(request.network)
            ahead = {"name": request.name, "network": carried, "confined": request.confinement is not None}
            containers.write_atomic(marker, json.dumps({**owner, "ahead": ahead}))
        yield answer
    finally:
        marker.unlink(missing_ok=True)  # first: the receiver then holds the claims, or no one
        network.let_go(registry, migration_id)


def answer_preflight(stdin: BinaryIO, stdout: TextIO, *, hold: bool, state_dir: Path | str | None = None) -> None:
    """`agent preflight`: answer the source's request (its JSON: all of `stdin`, or `hold`ing, its first frame)
    and, `hold`ing, keep what the pre-flight claimed (see `preflight_holding`) until the source closes its end: it
    does so when the migration ends, or its kerrickpt or ssh dies. Also after limits.RECEIVE_STALL without a word
    from it: a link that died without closing must not hold the claims for ever (a receiver that runs by then
    holds them)."""
    if hold:
        frame = transport.read_frame(stdin)
        if frame is None:
            raise ProtocolError("the source sent no pre-flight request")
        request = bytes(frame[1])
    else:
        request = stdin.read()
    with preflight_holding(request, state_dir) as answer:
        transport.emit(stdout, "ok", **answer)
        with contextlib.suppress(TransportError):  # a stall: see above
            while hold and transport.read_frame(stdin) is not None:
                pass


def _check(
    request: schema.PreflightRequest,
    cpuinfo: bytes,
    registry: containers.Registry,
    migration_id: str,
    state_dir: Path | str | None,
) -> dict[str, Any]:
    """The pre-flight's checks, and its claims for migration `migration_id` (see `preflight_holding`): its answer."""
    report = node.check(state_dir)
    if not report.ready:
        raise NotReadyError("the target is not ready: " + "; ".join(report.problems))
    found = criu.locate()
    verdict = compat.compare(Fingerprint.of(request.fingerprint), node.fingerprint(found.version))
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "cpuinfo.img").write_bytes(cpuinfo)
        cpu_ok, cpu_log = criu.cpuinfo_check(found, Path(scratch))
    if not cpu_ok:
        verdict = compat.Verdict(
            (*verdict.differences, compat.Difference("cpuinfo", compat.FATAL, "", "", f"criu cpuinfo check: {cpu_log}"))
        )
    if not verdict.is_acceptable(force=request.force):
        raise NodeIncompatibleError(f"the target cannot take {request.name}:\n{verdict.explain()}")
    if request.confinement is not None:
        confined = Confinement.from_dict(msgspec.to_builtins(request.confinement))
        lacking = isolation.lacking(confined, report.features)
        if lacking:
            raise NodeIncompatibleError(f"the target cannot take {request.name}: " + "; ".join(lacking))
    name = containers.check_name(request.name)
    if registry.is_abandoned(name):
        # Left by a run or a receiver that died (killed mid-way, its network made ahead): the migration is refused
        # for it otherwise, and `gc` would remove it all the same.
        containers.remove_if_abandoned(registry, name)
    if registry.path(name).exists():
        raise ContainerExistsError(f"the target has a container named {name!r} already")
    if request.network is not None:
        lacking = node.network_lacking(report.features, confined=request.confinement is not None)
        if lacking:
            raise NodeIncompatibleError(f"the target cannot take the network of {request.name}: " + "; ".join(lacking))
        carried = network.Identity.from_dict(msgspec.to_builtins(request.network))
        try:
            network.reserve(registry, claims.Holder(name, migration_id), carried, remap=request.net_remap)
        except (UsageError, NotCheckpointable) as exc:
            exc.message = f"the target cannot take the network of {name} (nothing was frozen): {exc.message}"
            raise
    differ = []
    for path, size in request.files.items():
        try:
            actual: int | str = os.stat(path).st_size
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            actual = getattr(exc, "strerror", None) or "missing"
        if actual != size:
            differ.append(f"{path} (source: {size} bytes, target: {actual})")
    if differ:
        raise NodeIncompatibleError("files the container has open differ on the target: " + ", ".join(differ))
    need = 2 * request.memory_bytes + SPACE_MARGIN
    free = shutil.disk_usage(registry.scratch).free
    if free < need:
        raise NodeIncompatibleError(f"no room for the images on the target: {free} bytes free, {need} needed")
    return {
        "verdict": verdict.to_dict(),
        "warnings": [d.message for d in verdict.differences],
        "archive_versions": list(READABLE),
        "lazy_pages": report.features["lazy_pages"],
        "lazy_pages_confined": report.features["lazy_pages_confined"],
        "network_migration": True,
        "confined_network": True,
    }


def receive(
    stdin: BinaryIO,
    stdout: TextIO,
    *,
    name: str,
    migration_id: str,
    force: bool = False,
    lazy: bool = False,
    net_remap: bool = False,
    reserved: bool = False,
    state_dir: Path | str | None = None,
) -> int:
    """Take an archive streamed by the source, restore it, and tell the source once it runs.

    With `lazy`, the memory the archive lacks comes afterwards through `agent pages` (post-copy).
    With `net_remap`, a container with a network of its own gets an address of this node's (see restore).
    `reserved`: a pre-flight of the migration claimed what the container's network needs here, and holds it (see
    `preflight_holding`); should it no longer, the source hears so before it freezes the container.

    Until the container runs here, any failure removes what this side made and is
    reported; once it runs it stays, whatever happens to the connection.
    """
    registry = containers.Registry(state_dir)
    marker = registry.incoming(schema.migration_id(migration_id))
    earlier = status(migration_id, state_dir)
    if earlier["state"] == "abandoned":  # an earlier receiver of this migration died: this one cleans up
        earlier = reap(migration_id, state_dir)
    if earlier["state"] == "in-progress":
        transport.emit(stdout, "error", **BusyError(f"migration {migration_id} is being received").to_dict())
        return BusyError.exit_code
    if earlier["state"] != "absent":
        # It came here already: say so, so that the source never runs its copy again.
        address = _address_here(registry, migration_id)
        transport.emit(stdout, "restored", name=earlier.get("name", name), pid_map={}, warnings=[], address=address)
        return 0
    started = procs.start_time(os.getpid())
    info = {"pid": os.getpid(), "start": started}
    containers.write_atomic(marker, json.dumps(info))
    prepared: Prepared | None = None
    reader: transport.FrameReader | None = None
    try:
        with contextlib.ExitStack() as stack:
            try:
                # Connected before ready: a page stream that cannot come fails while nothing is frozen yet.
                watcher = stack.enter_context(postcopy.Watcher(registry, migration_id)) if lazy else None
                # From here on this receiver holds the claims too: were they held until now, they stay so.
                if reserved and not registry.preflight_holds(migration_id):
                    raise TransportError(
                        f"the pre-flight of migration {migration_id} no longer holds what {name}'s network needs "
                        "here (its connection ended, or its kerrickpt died), and another container may have taken "
                        "it since: nothing was frozen; migrate it again"
                    )
                # Both before the archive comes, else after its last byte, in the container's downtime: the restore's
                # helper (its Python's start and imports), which leaves without an order if the transfer fails, and
                # the container's network, which `_failed` removes then.
                helper = stack.enter_context(contextlib.closing(restorer.Helper()))
                prepared = _prepare(registry, name, migration_id) if reserved and not net_remap else None
                transport.emit(stdout, "ready")  # the source freezes the container only after this
                incoming: Path | transport.FrameReader = (reader := transport.FrameReader(stdin))
                if watcher is None and feeder.can_gate(registry.scratch):
                    # Kept as it came, then streamed into CRIU (see feeder): unpacking 1 GiB while the
                    # source compresses takes the CPU the source needs, and CRIU waits for the index,
                    # which comes last, anyway.
                    incoming = _store(incoming, stack.enter_context(_scratch(registry)))
                # Else unpacked and verified while it arrives. Restored only after the source's END frame.
                result = restore(
                    incoming, name=name, state_dir=registry.root, force=force, migration_id=migration_id,
                    watcher=watcher, net_remap=net_remap, helper=helper, prepared=prepared,
                )  # fmt: skip
            except Exception as exc:
                return _failed(stdout, registry, name, migration_id, exc, prepared)
            except BaseException as exc:  # a signal (Interrupted): nothing prepared stays
                if prepared is not None:
                    prepared.discard(registry, exc)
                if reader is None or not reader.ended:
                    _interrupted(stdout, name, exc)
                raise
        # It runs here: from now on the only true answer is "restored", whatever fails next.
        try:
            # Outlives the container's record: `recover` must hear "it came here" even after it left again.
            containers.write_atomic(_tombstone(registry, migration_id), json.dumps({"name": name}))
            faults.inject("target-after-restore")
        except Exception as exc:
            log.warning("receiving %s: %s after it came up here; `recover` may not see it once it leaves", name, exc)
        # The source learns from it when the network lock ended here, whatever this node's clock says.
        since = None if result.connected_at is None else round(time.monotonic() - result.connected_at, 4)
        transport.emit(stdout, "restored", **result.to_dict(), answered_after_s=since)
        return 0
    finally:
        marker.unlink(missing_ok=True)  # first: its pre-flight then holds the claims, or no one
        network.let_go(registry, migration_id)


@contextlib.contextmanager
def _scratch(registry: containers.Registry) -> Iterator[Path]:
    directory = registry.scratch_dir("receive-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _store(incoming: transport.FrameReader, directory: Path) -> Path:
    """The archive arriving on `incoming`, written whole (its END frame checked) to a 0600 file in `directory`."""
    path = directory / "archive.kckpt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while chunk := incoming.read(CHUNK):
            archive.write_all(fd, memoryview(chunk))
    finally:
        os.close(fd)
    return path


def _prepare(registry: containers.Registry, name: str, migration_id: str) -> Prepared | None:
    """Container `name`'s network of its own, made (see restore.prepare) as the pre-flight of migration `migration_id`
    that holds its claims here says it is (see `preflight_holding`); None if none says so (it has none, or gets a new
    address here: its restore makes it)."""
    said = next((mark["ahead"] for mark in registry.preflights(migration_id) if "ahead" in mark), None)
    if said is None or said["name"] != name:
        return None
    carried = network.Identity.from_dict(said["network"])
    return prepare(registry, name, migration_id, carried, confined=said["confined"])


def _failed(
    stdout: TextIO,
    registry: containers.Registry,
    name: str,
    migration_id: str,
    exc: Exception,
    prepared: Prepared | None,
) -> int:
    """Answer a receive that raised `exc`: restored if the container runs here all the same, else the error, once
    what was `prepared` for it before its archive came is removed."""
    if _came_up(registry, migration_id):
        # It failed after the container came up here: it runs, so that is the only true answer.
        log.warning("receiving %s: %s after it came up here", name, exc)
        address = _address_here(registry, migration_id)
        warnings = [f"after the restore: {exc}"]
        transport.emit(stdout, "restored", name=name, pid_map={}, warnings=warnings, address=address)
        return 0
    if prepared is not None:
        prepared.discard(registry, exc)
    # Whatever went wrong, the source must hear it did not run here, or it waits frozen.
    failure = (
        exc
        if isinstance(exc, KerrickptError)
        else RestoreFailed(f"receiving {name} failed: {type(exc).__name__}: {exc}")
    )
    transport.emit(stdout, "error", **failure.to_dict())
    return failure.exit_code


def _interrupted(stdout: TextIO, name: str, exc: BaseException) -> None:
    """Tell the source that a signal ended this receiver before the archive's END frame: nothing was restored, so
    the source runs its copy again now. Without the answer it could not tell whether the END it sent was acted on
    (its last frames fit in the pipes of a receiver already gone), and would leave the container frozen for
    `recover`. After the END frame no answer is given: the restore may have begun."""
    how = f"by {signal.Signals(exc.signum).name}" if isinstance(exc, Interrupted) else f"({type(exc).__name__})"
    failure = TransportError(f"kerrickpt on the target was ended {how} before {name}'s archive came whole; "
                             "nothing of it was restored there")  # fmt: skip
    transport.emit(stdout, "error", **failure.to_dict())


def _came_up(registry: containers.Registry, migration_id: str) -> bool:
    """Whether the container came up here (whatever became of it since): a post-copy one counts
    until its memory stopped coming, when its watcher killed it."""
    pages = postcopy.reap(registry, migration_id)  # a watcher that died: its container is killed now
    if pages is not None:
        return pages["state"] != postcopy.FAILED
    return any(c.migration == migration_id for c in registry.all())


def _address_here(registry: containers.Registry, migration_id: str) -> str | None:
    """The address (ADDR/PREFIX) of the container migration `migration_id` brought here, if it is recorded with a
    network of its own: `migrate --net-remap` prints it."""
    for container in registry.all():
        if container.migration == migration_id and container.network is not None:
            return container.network.address
    return None


def _tombstone(registry: containers.Registry, migration_id: str) -> Path:
    return registry.incoming(migration_id).with_suffix(".done")


def status(migration_id: str, state_dir: Path | str | None = None) -> dict[str, Any]:
    """What became of a migration here: running, exited, departed (came and went), in-progress,
    failed (post-copy: its memory stopped coming, so it was killed here), abandoned (its receiver,
    or its post-copy watcher, died: `reap` finishes it) or absent.

    Only looks. A post-copy migration is in progress until every page came: only then has it moved.
    """
    registry = containers.Registry(state_dir)
    pages = postcopy.outcome(registry, schema.migration_id(migration_id)) or {"state": None}
    if pages["state"] in (postcopy.FAILED, postcopy.ABANDONED):
        return dict(pages)
    if pages["state"] == postcopy.IN_FLIGHT:
        return {"state": "in-progress"}
    for container in registry.all():
        if container.migration == migration_id:
            if _left_cut_off(registry, migration_id, container) is not None:
                return {"state": "abandoned", "why": "its receiver died before it connected the container here"}
            return {"state": "running" if container.is_running() else "exited", "name": container.name}
    tombstone = _tombstone(registry, migration_id)
    if tombstone.exists():
        return {"state": "departed", **json.loads(tombstone.read_text())}
    marker = registry.incoming(migration_id)
    alive = containers.claimant_alive(marker)
    if alive is None:  # no marker, or one being written
        return {"state": "in-progress" if marker.exists() else "absent"}
    if not alive:
        return {"state": "abandoned", "why": "its receiver died before the container ran here"}
    return {"state": "in-progress"}


def reap(migration_id: str, state_dir: Path | str | None = None) -> dict[str, Any]:
    """`status`, once what dead kerrickpt processes left here is removed (`garbage.collect`): the
    half-made container of a receiver that died, the container of a post-copy whose watcher died; and once a
    container whose receiver died after recording it, before connecting it, is connected (and announced).
    What an abandoned migration answers then is `absent`, `failed` or `running`."""
    registry = containers.Registry(state_dir)
    for container in registry.all():
        left = _left_cut_off(registry, migration_id, container) if container.migration == migration_id else None
        if left is not None:
            # Restored whole and recorded: only the receiver's last step is missing (see restore).
            network.reconnect(left)
            containers.write_atomic(_tombstone(registry, migration_id), json.dumps({"name": container.name}))
    garbage.collect(registry)
    return status(migration_id, state_dir)


def _left_cut_off(
    registry: containers.Registry, migration_id: str, container: containers.Container
) -> network.Network | None:
    """The network of `container`, of migration `migration_id`, if it was left cut off here: its receiver died
    after recording it, before connecting it (restore's very last step) and saying it came here (its tombstone)."""
    own = container.network
    if (
        own is None
        or _tombstone(registry, migration_id).exists()
        or containers.claimant_alive(registry.incoming(migration_id)) is True
    ):
        return None
    return own if netlinks.is_cut_off(own.veth) else None
