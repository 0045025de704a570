"""Owns `checkpoint`: freeze, dump with CRIU, write the archive, then end or thaw the container."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zstandard

from kerrickpt import (
    archivewriter,
    cgroups,
    containers,
    criu,
    criuopts,
    faults,
    guard,
    layer,
    layerchain,
    lock,
    logtail,
    netlinks,
    netports,
    network,
    node,
    procs,
    progress,
    reserve,
    rootfs,
    sysvipc,
    zstdframe,
)
from kerrickpt.errors import (
    CommandTimeout,
    ContainerDamaged,
    ContainerNotFoundError,
    DumpFailed,
    KerrickptError,
    NotCheckpointable,
    SourceNotEnded,
    UsageError,
)
from kerrickpt.freezer import frozen
from kerrickpt.keys import Key
from kerrickpt.manifest import Manifest

NAMESPACES = ["pid", "ipc", "uts"]


@dataclass(frozen=True)
class CheckpointResult:
    name: str
    archive: Path
    archive_bytes: int
    left_running: bool
    manifest: Manifest
    layer_index: layer.Index | None = None  # a confined container's layer as carried

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "archive": str(self.archive),
            "archive_bytes": self.archive_bytes,
            "left_running": self.left_running,
            "timings": self.manifest.timings,
            "processes": self.manifest.processes,
        }


def checkpoint(
    name: str | None,
    output: Path | str | archivewriter.Target,
    *,
    cgroup: Path | str | None = None,
    leave_running: bool = False,
    state_dir: Path | str | None = None,
    level: int = zstdframe.CHECKPOINT_LEVEL,
    log_tail: int = logtail.DEFAULT_BYTES,
    layer_base: layerchain.Carried | None = None,
    key: Key | None = None,
) -> CheckpointResult:
    """Checkpoint container `name` (or the tree in `cgroup`) into the archive `output` (or into the Target given:
    a deduplicating store's, see store.Store.taking_in), with the last `log_tail` bytes of its log; with
    `layer_base`, only what changed in its layer since that snapshot; with `key`, sealed with it (encrypted and
    authenticated: see sealed).

    Whatever fails, the container is thawed and keeps running and nothing is left at `output`.
    """
    if (name is None) == (cgroup is None):
        raise UsageError("give either a container name or --cgroup PATH")
    if not isinstance(output, archivewriter.Target):
        output = Path(output).absolute()
        if output.exists():
            raise UsageError(f"{output} exists already; remove it or choose another name")
        if not output.parent.is_dir():
            raise UsageError(f"{output.parent} is not a directory")
    registry = containers.Registry(state_dir)
    found = criu.locate()
    if name is None:
        group = cgroups.adopt(Path(str(cgroup)), cgroups.detect())
        # Keyed by the cgroup's path: two runs on one foreign cgroup must not freeze it at once.
        held = "cgroup-" + hashlib.sha256(str(group.dirs[0]).encode()).hexdigest()[:16]
        with registry.lock(held):
            subject = Subject(Path(str(cgroup)).name, group)
            return _checkpoint(found, registry, subject, output, leave_running, level, log_tail, None, key)
    with registry.lock(name):
        registry.refuse_while_migrating(name)
        subject = Subject.of(registry.get(name))
        return _checkpoint(found, registry, subject, output, leave_running, level, log_tail, layer_base, key)


def _checkpoint(
    found: criu.Criu,
    registry: containers.Registry,
    subject: Subject,
    output: Path | archivewriter.Target,
    leave_running: bool,
    level: int,
    log_tail: int,
    layer_base: layerchain.Carried | None,
    key: Key | None,
) -> CheckpointResult:
    carried: list[layer.Index] = []
    writer = output if isinstance(output, archivewriter.Target) else archivewriter.Writer(output, level=level, key=key)
    manifest = capture(
        found, registry, subject, writer, thaw_after_dump=leave_running, log_tail=log_tail, layer_base=layer_base,
        carried=carried.append,
    )  # fmt: skip
    path = writer.path
    assert path is not None  # committed
    if not leave_running:
        # The archive is complete and on disk: now, and only now, end the source.
        try:
            if subject.container:
                containers.remove(registry, subject.container)
            else:
                subject.group.kill()
        except (KerrickptError, OSError) as exc:
            raise SourceNotEnded(_what_is_left(subject, path, exc)) from exc
        if manifest.ipc:
            # The job's queues and semaphores travel in the archive; left behind, they would leak.
            sysvipc.remove(sysvipc.JobIpc.from_dict(manifest.ipc))
    index = carried[0] if carried else None
    return CheckpointResult(subject.label, path, path.stat().st_size, leave_running, manifest, index)


def _what_is_left(subject: Subject, output: Path, exc: Exception) -> str:
    """What a checkpoint whose archive is complete left of its source, and how to end it."""
    pids = subject.group.pids()
    dirs = [str(d) for d in subject.group.dirs if d.exists()]
    left = f"processes {pids} in" if pids else "no process, but"
    finish = (
        f"`kerrickpt kill {subject.container.name}` ends it and removes the rest"
        if subject.container
        else "write 1 to its cgroup.kill (cgroup v2) or kill them"
    )
    return (
        f"the archive {output} is complete, but {subject.label} could not all be ended ({exc}): left are {left} "
        f"the cgroups {', '.join(dirs) or '(none)'}, frozen or with SIGKILL pending, so none runs again; {finish}"
    )


class LazyDump(Protocol):
    """A post-copy dump, whose CRIU is left serving the memory it did not write."""

    def dump(
        self, pid: int, images: Path, cgroup: str, shell_job: bool, external: Sequence[str], tcp_established: bool
    ) -> None: ...

    def stop(self) -> None:
        """Give up: CRIU lets go of the tree, leaving it frozen."""


@dataclass(frozen=True)
class Subject:
    """What is checkpointed: a container kerrickpt runs, or a cgroup it did not create."""

    label: str
    group: cgroups.Cgroup
    container: containers.Container | None = None

    @classmethod
    def of(cls, container: containers.Container) -> Subject:
        if not container.is_running():
            raise ContainerNotFoundError(f"container {container.name!r} is not running")
        if container.host_job:
            raise NotCheckpointable(
                f"{container.name} was restored from a job that shared the host's namespaces; kerrickpt cannot "
                "checkpoint it again yet (CRIU refuses the time and mount namespaces it nests inside "
                "kerrickpt's init). The job keeps running."
            )
        # Before anything else (a migration's pre-flight, the freeze); again once frozen (see _tree).
        _refuse_strangers(container, procs.read_all(container.group.pids()))
        return cls(container.name, container.group, container)


DUMP_TURN = Path("/run/kerrickpt-dump.lock")  # one per node, whatever the state directory
DUMP_TURN_WAIT = 600.0  # s: CRIU's own limit for a dump


def capture(
    found: criu.Criu,
    registry: containers.Registry,
    subject: Subject,
    writer: archivewriter.Target,
    *,
    thaw_after_dump: bool,
    link_mib_s: float | None = None,
    lazy: LazyDump | None = None,
    log_tail: int = logtail.DEFAULT_BYTES,
    layer_base: layerchain.Carried | None = None,
    carried: Callable[[layer.Index], None] | None = None,
    on_freeze: Callable[[float], None] | None = None,
) -> Manifest:
    """Freeze, dump and write into `writer` (an archive, or a deduplicating store's), which it commits. On success
    the subject is left frozen unless `thaw_after_dump`; on failure it is thawed, nothing is committed, and
    DumpFailed names the failing step (or the writer's own errors, see Target.errors); but if CRIU was stopped or
    died with its code perhaps inside the processes, they stay frozen (ContainerDamaged).

    The manifest records the writer's zstd level and, when the level was chosen for a link, that link's speed.
    `lazy` dumps instead, leaving memory for post-copy: its CRIU outlives this call, serving it.
    Of the log, the archive carries the last `log_tail` bytes (see logtail). A confined container's layer is
    carried whole, or with `layer_base` only what changed since that snapshot; `carried` gets its index.
    `on_freeze` gets the time.monotonic() of the freeze that held (not of the retries a vfork made undo): the
    downtime's start.
    """
    if log_tail < 0:
        raise UsageError(f"the log tail cannot be negative ({log_tail} bytes)")
    container, group = subject.container, subject.group
    confined = container.confinement if container else None
    host_job = _shares_host_pid_namespace(group)
    if host_job:
        _refuse_what_cannot_travel(group)
    # Its log is opened on the host's side, where this process sees it too (see criuopts.file_key).
    log_external = criuopts.file_key(Path(container.log)) if confined and container and container.log else None
    # Its caller's files, which grow on: named only, so that a restore hands in the files to go on with.
    stdio = container.stdio if container else None
    own_net = container.network if container else None
    scratch = registry.scratch_dir("checkpoint-")
    images = scratch / "images"
    images.mkdir(mode=0o700)
    warmed: reserve.Reserve | None = None
    try:
        if thaw_after_dump and lazy is None:
            # Its images go to memory taken before the freeze, not during it (see reserve).
            step = "reserving space for the images"
            progress.current().phase("reserving space for the images")
            warmed = reserve.Reserve(scratch, group.memory_usage() or 0)
        step = "reading what the store holds of the container"
        writer.ready()
        step = "freezing the cgroup"
        progress.current().phase("freezing")
        freezer = group.freezer
        with writer:
            reconnect = (netlinks.connecting(own_net.veth), netlinks.TIMEOUT) if own_net else None
            guardian = guard.Guardian(freezer, writer.linking, reconnect)
            # Dumps on this node take turns, each from before its freeze until CRIU let go of its tree: CRIU's
            # parasite makes `proc.crtools` in the dumped task's working directory when its /proc is not its PID
            # namespace's, and two dumps at once of tasks in one directory (/, say) fail there (EEXIST). Not
            # inherited: a post-copy CRIU serving pages long after must not hold it.
            turn = contextlib.ExitStack()
            turn.enter_context(lock.held(DUMP_TURN, wait=DUMP_TURN_WAIT, what="a dump on this node", inherit=False))
            # Cut off outside the lazy CRIU's stop: connected again only once that CRIU has let go.
            with turn, guardian, frozen(freezer) as frozen_at, _cut_off(own_net), _stopped_on_failure(lazy):
                if on_freeze is not None:
                    on_freeze(frozen_at)
                locked_at = time.monotonic()  # cut off (with a network of its own): the network lock holds
                step = "reading the process tree"
                if host_job:
                    _refuse_what_cannot_travel(group)  # again: it may have appeared since the first look
                tree = _tree(group, container, host_job)
                pids = [int(p["host_pid"]) for p in tree]
                shell_job = tree[0]["sid"] not in pids
                log = container.log if container else procs.stdout_file(pids[0])
                # Only its tail: the whole history would cost every checkpoint its length, frozen.
                tail = logtail.measure(Path(log), log_tail) if log else None
                step = "saving the job's SysV objects"
                ipc = sysvipc.save(pids) if host_job and procs.shares_namespace(pids[0], "ipc") else None
                lineage, index, base = None, None, None
                # Thawed after the dump, it has its layer written aside and compressed after the thaw.
                spool = archivewriter.Spool(scratch) if thaw_after_dump and lazy is None else None
                if confined:
                    assert container is not None  # a confined container is always one of this node's
                    # Its files as they are with its memory (it is frozen), and first in the archive: a restore
                    # unpacks them before CRIU reads the images that follow.
                    step = "carrying its file-system layer"
                    where = rootfs.Layer.of(registry.path(container.name))
                    lineage = where.lineage
                    base = layer_base if layer_base and layer_base.lineage == lineage else None
                    index = layer.add(spool or writer, where.upper, confined, base.index if base else None)
                    if carried is not None:
                        carried(index)
                step = "criu dump"
                progress.current().phase("dumping" if thaw_after_dump else "dumping and compressing")
                faults.inject("checkpoint-before-criu")
                dump_started = time.monotonic()
                cgroup = str(freezer.path)
                external = criuopts.dump_externals(confined, log_external) if confined else []
                external += stdio.keys if stdio else []
                # A confined container's network namespace is its user namespace's: CRIU dumps it (see criuopts).
                external += [criuopts.netns_external(own_net.pin)] if own_net and not confined else []
                # Frozen and cut off, as CRIU finds them: what `inspect` says the archive carries.
                connections = netports.established(pids[0]) if own_net else []
                tcp = own_net is not None  # in the node's network, a copy of a connection would clash with its source
                if lazy is not None:
                    lazy.dump(pids[0], images, cgroup, shell_job, external, tcp)
                elif warmed is not None:
                    # The freeze window is what counts: CRIU writes at full speed, compression follows the thaw.
                    criu.dump_streamed(
                        found, pids[0], images, scratch, warmed, freeze_cgroup=cgroup, shell_job=shell_job,
                        external=external, tcp_established=tcp,
                    )  # fmt: skip
                else:
                    # The container stays down until its archive is complete: compress while CRIU dumps.
                    sink = writer.under("images/")
                    criu.dump_streamed(
                        found, pids[0], images, scratch, sink, freeze_cgroup=cgroup, shell_job=shell_job,
                        external=external, tcp_established=tcp,
                    )  # fmt: skip
                timings = {"dump_s": round(time.monotonic() - dump_started, 4)}
                turn.close()
                if own_net is not None:
                    timings["cut_off_s"] = round(locked_at - frozen_at, 4)  # how far into the freeze
                if thaw_after_dump:
                    if own_net is not None:
                        netlinks.connect(own_net.veth)  # before the thaw: a container never runs cut off
                        timings["network_lock_s"] = round(time.monotonic() - locked_at, 4)
                    freezer.thaw()
                    timings["frozen_s"] = round(time.monotonic() - frozen_at, 4)
                step = "writing the archive"
                progress.current().phase("writing the archive")
                if spool is not None:
                    spool.into(writer)
                if warmed is not None:
                    sink = writer.under("images/")
                    with writer.hashing_ahead(warmed.path, warmed.layout(sink.prefix)):
                        warmed.into(sink)
                    warmed.close()
                manifest = Manifest(
                    name=subject.label,
                    created=containers.utc_now(),
                    source=node.fingerprint(found.version),
                    processes=tree,
                    command=container.command if container else list(tree[0]["cmdline"]),
                    memory_limit=container.memory_limit if container else group.memory_limit(),
                    log_path=log,
                    namespaces=["ipc"] if host_job else NAMESPACES + (["net"] if own_net else []),
                    timings=timings,
                    pid_namespace="host" if host_job else "own",
                    shell_job=shell_job,
                    ipc=ipc.to_dict() if ipc else None,
                    compression=_compression(writer.level, link_mib_s),
                    log_start=tail.start if tail else 0,
                    confinement=confined,
                    log_external=log_external,
                    stdio=stdio,
                    layer=layerchain.identity(lineage, index) if lineage and index else None,
                    layer_base=base.as_base() if base else None,
                    network=own_net.identity() if own_net else None,
                    connections=connections,
                )
                for dumped in sorted(images.iterdir()):  # the lazy dump's images; a streamed one left none here
                    writer.add_file(f"images/{dumped.name}", dumped)
                if tail:
                    logtail.add(writer, tail)

                def finish(m: Manifest) -> None:
                    # Kept frozen: the container stays down until its archive is complete.
                    m.timings.setdefault("frozen_s", round(time.monotonic() - frozen_at, 4))

                committed = writer.commit(manifest, finish)
                faults.inject("checkpoint-archive-linked")  # complete at `output`, the guardian not yet disarmed
                return committed
    except ContainerDamaged as exc:
        if container:
            advice = (
                f"end it (`kerrickpt kill {subject.label}`) and restore its last good checkpoint, or thaw it "
                f"at your own risk (`kerrickpt recover {subject.label}`)"
            )
        else:
            advice = f"end the processes in {group.dirs[0]}, or thaw that cgroup at your own risk"
        exc.message = f"checkpoint of {subject.label} failed: {exc.message}. To go on, {advice}"
        raise
    except KerrickptError as exc:
        if isinstance(exc, (DumpFailed, UsageError, CommandTimeout, NotCheckpointable, *writer.errors)):
            raise
        message = f"checkpoint of {subject.label} failed while {step}: {exc.message}"
        raise DumpFailed(message, log_tail=exc.log_tail) from exc
    except (OSError, ValueError, zstandard.ZstdError) as exc:
        raise DumpFailed(f"checkpoint of {subject.label} failed while {step}: {exc}") from exc
    finally:
        if warmed is not None:
            warmed.close()
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _stopped_on_failure(lazy: LazyDump | None) -> Iterator[None]:
    """A lazy CRIU holds the tree (and the guardian's pipe) until it lets go: on failure, before the thaw."""
    try:
        yield
    except BaseException:
        if lazy is not None:
            lazy.stop()
        raise


@contextlib.contextmanager
def _cut_off(own_net: network.Network | None) -> Iterator[None]:
    """Cut a container off its network (see netlinks.cut_off) while it is dumped, the only network lock (see
    criu.NETWORK_LOCK): a packet taken while CRIU reads its sockets, in TCP repair, would be missing from the
    archive or change what is read. One that is to end stays cut off until it has: its connections would take
    packets the archive lacks, then answer its end with a reset. On failure it is connected again, before
    the thaw; but not while a damaged container stays frozen (errors.ContainerDamaged): `recover` does it."""
    if own_net is None:
        yield
        return
    netlinks.cut_off(own_net.veth)
    try:
        yield
    except BaseException as exc:
        if not getattr(exc, "keeps_frozen", False):
            netlinks.connect(own_net.veth)
        raise


def _compression(level: int, link_mib_s: float | None) -> dict[str, Any]:
    """The manifest's record of the zstd level, and of the link speed it was chosen for."""
    return {"level": level} if link_mib_s is None else {"level": level, "link_mib_s": round(link_mib_s, 1)}


def _shares_host_pid_namespace(group: cgroups.Cgroup) -> bool:
    pids = group.pids()
    if not pids:
        raise ContainerNotFoundError("the cgroup has no processes")
    return procs.shares_namespace(pids[0], "pid")


def _refuse_what_cannot_travel(group: cgroups.Cgroup) -> None:
    """Before any freeze: a host-namespace job with SysV shared memory, with queues or semaphore sets it
    did not create, or in a session whose leader this PID namespace cannot see, cannot be carried."""
    pids = group.pids()
    unseen = [p.host_pid for p in procs.read_all(pids) if p.sid == 0]
    if unseen:
        # /proc shows session 0 when the leader lives in an ancestor PID namespace; CRIU refuses those.
        raise NotCheckpointable(
            f"process {unseen[0]} belongs to a session whose leader is outside this node's PID namespace, "
            "which CRIU cannot dump. Start the job in a session of its own (setsid) or under `kerrickpt run`. "
            "The job keeps running."
        )
    shm = sysvipc.shared_memory_of(pids)
    if shm:
        raise NotCheckpointable(
            f"the job uses SysV shared memory in the host's IPC namespace ({'; '.join(shm)}), which CRIU "
            "cannot save outside an IPC namespace of the job's own. Run the job under `kerrickpt run` "
            "(its own PID and IPC namespaces) to checkpoint it. The job keeps running."
        )
    if procs.shares_namespace(pids[0], "ipc"):
        shared = [str(use) for use in sysvipc.uses(pids) if not use.own]
        if shared:
            raise NotCheckpointable(
                f"the job uses SysV objects in the host's IPC namespace that it did not create "
                f"({'; '.join(shared)}): others may share them, and the checkpoint would take them from the "
                "host. Run the job under `kerrickpt run`, or let it make its own. The job keeps running."
            )


def _tree(group: cgroups.Cgroup, container: containers.Container | None, host_job: bool) -> list[dict[str, Any]]:
    """The frozen tree, root first; refuses what this route cannot dump."""
    processes = procs.read_all(group.pids())
    if not processes:
        raise ContainerNotFoundError("the cgroup has no processes")
    roots = procs.roots(processes)
    if container:
        _refuse_strangers(container, processes)
        roots = [p for p in processes if p.host_pid == container.init_pid]
    if len(roots) != 1:
        raise UsageError(f"the cgroup holds {len(roots)} process trees; kerrickpt dumps exactly one")
    root = roots[0]
    if root.ns_pid != 1 and not host_job:
        raise UsageError(
            f"process {root.host_pid} is not the init of its PID namespace; "
            "checkpoint needs the whole namespace's tree in the cgroup"
        )
    ordered = [root] + [p for p in processes if p is not root]
    return [p.to_dict() for p in ordered]


def _refuse_strangers(container: containers.Container, processes: list[procs.Process]) -> None:
    """A process in the container's cgroup that is not its init's descendant, such as a `kerrickpt exec`
    session (nsenter and its command). CRIU dumps the init's tree alone: the archive would lack it, and
    ending the source would kill it unsaved (Podman refuses such a checkpoint too)."""
    members = {p.host_pid for p in procs.tree(processes, container.init_pid)}
    strangers = [p for p in processes if p.host_pid not in members]
    if strangers:
        named = ", ".join(map(str, strangers))
        raise NotCheckpointable(
            f"{container.name} holds processes outside its init's tree, which a checkpoint cannot carry: {named}. "
            "A `kerrickpt exec` session (or a process that joined its cgroup from outside) must end first: "
            "wait for it, or end it (kill the PIDs above). The container keeps running."
        )
