"""Owns `restore`: verify the archive, check this node, recreate the cgroup, restore with CRIU, register."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from kerrickpt import (
    archiveindex,
    cgroups,
    compat,
    containers,
    criu,
    faults,
    feeder,
    idranges,
    isolation,
    keys,
    layer,
    layerchain,
    logtail,
    netsettings,
    network,
    node,
    postcopy,
    procs,
    progress,
    restorer,
    rootfs,
    sources,
    stdio,
    sysvipc,
)
from kerrickpt.confinement import Confinement
from kerrickpt.errors import (
    ArchiveCorruptError,
    CommandTimeout,
    KerrickptError,
    NodeIncompatibleError,
    NoIdRangeError,
    RestoreFailed,
    TransportError,
    UsageError,
)
from kerrickpt.manifest import Manifest

# What a failed restore raises as it is; any other error of kerrickpt's becomes a RestoreFailed.
# Said as they are; a UsageError is a refusal of what was asked (an address or node port taken): exit 2.
PASSED_ON = (RestoreFailed, CommandTimeout, ArchiveCorruptError, TransportError, UsageError)


@dataclass(frozen=True)
class RestoreResult:
    name: str
    init_pid: int
    pid_map: dict[int, int]
    warnings: list[str] = field(default_factory=list)
    address: str | None = None  # its own network's address here (ADDR/PREFIX); None: it shares the node's
    # When (time.monotonic) its own network was connected here, the end of a migration's network lock; not shown.
    connected_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "init_pid": self.init_pid,
            "pid_map": {str(k): v for k, v in sorted(self.pid_map.items())},
            "warnings": self.warnings,
            "address": self.address,
        }


@dataclass
class Prepared:
    """What a migration's target makes for the container before its archive arrives (see `prepare`), for its
    restore to take over: its name reserved, its network of its own made, cut off."""

    name: str
    net: network.Network
    settings: netsettings.Settings
    confined: bool
    taken: bool = False  # by a restore, whose failure removes it (see _restore_as)

    def discard(self, registry: containers.Registry, exc: BaseException) -> None:
        """Remove it, unless a restore took it (see containers.undo, which says in `exc` what could not go)."""
        if not self.taken:
            containers.undo(registry, self.name, None, self.net, exc)


def prepare(
    registry: containers.Registry, name: str, migration_id: str, carried: network.Identity, *, confined: bool
) -> Prepared:
    """Reserve `name` and make its network of its own (`carried`, which the pre-flight of migration `migration_id`
    claimed here: see network.reserve), cut off, for the restore of a container that migration brings, `confined`
    or not: made while its archive arrives, not after the last byte, in its downtime (some 40-60 ms)."""
    registry.reserve(name)
    own_net: network.Network | None = None
    try:
        own_net, settings = network.plan(
            registry, name, carried.ip, carried.ports, ask_segment=False, migration=migration_id
        )
        _make_network(registry, own_net, settings, confined=confined)
        faults.inject("prepare-after-network")
    except BaseException as exc:
        containers.undo(registry, name, None, own_net, exc)
        raise
    return Prepared(name, own_net, settings, confined)


def _make_network(
    registry: containers.Registry, own_net: network.Network, settings: netsettings.Settings, *, confined: bool
) -> None:
    """Make `own_net`, cut off until it is restored and recorded (see criu.NETWORK_LOCK): a client's packet for a
    connection not restored yet would be answered with a reset, and a restore that fails after CRIU's must not have
    answered any (the archive's connections stay good for another try)."""
    if confined:  # CRIU restores its network namespace, which its user namespace owns (see criuopts.netdev_external)
        network.create_unplaced(registry, own_net, settings)
    else:
        network.create(registry, own_net, settings, connected=False)


def restore(
    path: Path | str | BinaryIO,
    *,
    name: str | None = None,
    state_dir: Path | str | None = None,
    force: bool = False,
    migration_id: str | None = None,
    pid_namespace: str = "new",
    watcher: postcopy.Watcher | None = None,
    bases: Sequence[Path] = (),
    cgroup_parents: Mapping[Path, Path] | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    tcp_close: bool = False,
    net_remap: bool = False,
    pool: isolation.IdPool | None = None,
    key: keys.Key | None = None,
    helper: restorer.Helper | None = None,
    prepared: Prepared | None = None,
) -> RestoreResult:
    """Restore the archive at `path` (or arriving on a stream) as container `name` (default: the name
    it was dumped under).

    Every checksum is verified before any restored process runs: before any exists when the
    archive is unpacked first; when an archive file with an index is streamed into CRIU, before
    CRIU's gate lets the restored tree run (see feeder). On failure nothing of the container is
    left on this node. A job that shared the host's namespaces comes back in
    new IPC and PID namespaces at its own PIDs, or with `pid_namespace="host"` at its
    PIDs on the host, which must all be free. With a post-copy `watcher`, the memory the
    archive lacks comes through it after this returns. A snapshot that carries only what changed in its
    file-system layer needs `bases`: the archives its layer builds on, the one with the whole layer first
    (Store.chain resolves them); without them it is refused (UsageError). Its cgroups go beneath
    `cgroup_parents` if given (see cgroups.own).

    A container whose fd 1 and 2 were its caller's files (`containers.run`'s `stdout` and `stderr`) gets the
    regular files open at `stdout` and `stderr` in their place, or without them its log here. A confined
    container's id range comes from `pool`, by default the node's (as `containers.run`'s).

    A container with a network of its own gets it back here: its address (it must be free) and MAC, its published
    ports, and its established TCP connections, or, with `tcp_close`, those closed (a copy next to its source:
    then it takes another address of the node's subnet if its own is in use). With `net_remap` it takes an address
    of this node's pool whatever its own was, its connections closed, its listeners kept (a migration to a node
    its address cannot live on).

    A snapshot in an encrypted store needs its `key` (KeyUnusableError before anything is read if it is missing or
    wrong); every chunk and its recipe are authenticated before any restored process runs.

    An archive file sealed with a key (`checkpoint(key=...)`) needs that `key`, and with a key only a sealed one is
    taken (see sealed.opened): KeyUnusableError before anything is read if it is missing or another.

    `helper`: the restore's helper program started ahead, holding none of the caller's files (neither `stdout` nor
    `stderr`, nor the caller's own stderr: see restorer.Helper): a migration's receiver starts it before the archive
    arrives, as its Python and imports take 0.1-0.3 s. The restore ends it as it ends one of its own (Helper.close;
    its caller may close it again).
    `prepared`: what `prepare` made for it, taken over once the archive is read as far as its manifest (RestoreFailed
    if that carries another name or network); before that, a failure leaves it to the caller (Prepared.discard).
    """
    if pid_namespace not in ("new", "host"):
        raise UsageError(f"pid_namespace must be 'new' or 'host', not {pid_namespace!r}")
    checked = stdio.Given.of(stdout, stderr)
    registry = containers.Registry(state_dir)
    found = criu.locate()
    scratch = registry.scratch_dir("restore-")
    handed_over = False  # to a post-copy watcher, whose daemon reads the images until every page came
    given = checked.copies()  # the helper gets them at its start, at these numbers
    assert helper is None or not given.fds, "a helper started ahead holds none of the caller's files"
    try:
        helper = helper or restorer.Helper(given.fds)  # its Python starts while the archive is read
    except BaseException:
        given.close()
        raise
    try:
        # An archive, or a store's recipe (its chunks held from pruning until the restore is done).
        with sources.opened(Path(path) if isinstance(path, (str, Path)) else path, key) as source:
            label = source.label
            # A source with an index is read while CRIU restores from it (see feeder); else it is unpacked first.
            streams = watcher is None and feeder.can_gate(scratch)
            index = source.read_index() if streams else None
            if index is not None and index.manifest.confinement is not None and not _userns_indexed(index):
                index = None  # its user namespace images may have to move to another range: unpacked first
            if index is not None and index.manifest.layer_base is not None:
                index = None  # a layer delta goes over its chain, with the names it removes: unpacked first
            if index is not None:
                manifest = index.manifest
            else:
                try:
                    manifest = source.extract(scratch)
                except OSError as exc:  # a full disk while unpacking, say: the archive may be fine
                    raise RestoreFailed(f"unpacking {label} failed: {exc}") from exc
            verdict = compat.compare(manifest.source, node.fingerprint(found.version))
            if not verdict.is_acceptable(force=force):
                raise NodeIncompatibleError(f"this node cannot take {label}:\n{verdict.explain()}")
            name = containers.check_name(name or manifest.name)
            # Every base verified before anything is made (a streamed restore reads its one layer from the archive).
            layers = layerchain.gather(manifest, list(bases), scratch) if index is None else []
            plan = dataclasses.replace(_plan(manifest, pid_namespace), watcher=watcher, cgroup_parents=cgroup_parents)
            if manifest.network is not None:
                closes = tcp_close or net_remap
                plan = dataclasses.replace(plan, tcp=criu.TCP_CLOSE if closes else criu.TCP_ESTABLISHED)
            elif tcp_close:
                raise UsageError(
                    f"--tcp-close: {label} has no network of its own (it shared its node's), so no TCP connection of "
                    "it was carried to close"
                )
            with contextlib.nullcontext() if index is None else feeder.Feed(source, index, scratch) as feed:
                init_pid, connected_at = _restore_as(
                    registry, found, manifest, scratch, name, migration_id, plan, feed, helper, layers, given, pool,
                    remap=net_remap, prepared=prepared,
                )  # fmt: skip
        handed_over = watcher is not None
    finally:
        helper.close()
        given.close()
        if not handed_over:
            shutil.rmtree(scratch, ignore_errors=True)
    restored = registry.get(name)
    pid_map = {p.ns_pid: p.host_pid for p in procs.read_all(restored.group.pids())}
    warnings = [d.message for d in verdict.differences] + given.unused(manifest.stdio)
    address = restored.network.address if restored.network else None
    return RestoreResult(
        name=name, init_pid=init_pid, pid_map=pid_map, warnings=warnings, address=address, connected_at=connected_at
    )


def _plan(manifest: Manifest, pid_namespace: str) -> restorer.Plan:
    ipc = sysvipc.JobIpc.from_dict(manifest.ipc) if manifest.ipc else None
    if manifest.pid_namespace == "own":
        if pid_namespace == "host":
            raise UsageError(f"{manifest.name} had a PID namespace of its own; it cannot join the host's")
        return restorer.Plan(shell_job=manifest.shell_job, ipc=ipc)
    if pid_namespace == "host":
        wanted = sorted({int(t) for p in manifest.processes for t in p.get("tids") or [p["host_pid"]]})
        taken = [pid for pid in wanted if not procs.is_free(pid)]
        if taken:
            raise RestoreFailed(
                f"PIDs {', '.join(map(str, taken))} of {manifest.name} are in use on this node, so it cannot "
                "come back in the host's PID namespace; restore without --pid-namespace host to give it "
                "a PID namespace of its own"
            )
    return restorer.Plan(shell_job=manifest.shell_job, ipc=ipc, new_pid_namespace=pid_namespace == "new")


def _restore_as(
    registry: containers.Registry,
    found: criu.Criu,
    manifest: Manifest,
    scratch: Path,
    name: str,
    migration_id: str | None,
    plan: restorer.Plan,
    feed: feeder.Feed | None,
    helper: restorer.Helper,
    layers: list[layerchain.Delta],
    given: stdio.Given,
    pool: isolation.IdPool | None,
    *,
    remap: bool,
    prepared: Prepared | None,
) -> tuple[int, float | None]:
    """The restored init's host PID, and when its own network was connected (None: it shares the node's). What
    was `prepared` for it is this restore's from here on, whatever happens."""
    if prepared is None:
        registry.reserve(name)
    else:
        prepared.taken = True
    group: cgroups.Cgroup | None = None
    log_fd: int | None = None
    own_net: network.Network | None = prepared.net if prepared is not None else None
    settings: netsettings.Settings | None = None
    try:
        confined = manifest.confinement is not None
        if prepared is not None:
            if (name, manifest.network, confined) != (prepared.name, prepared.net.identity(), prepared.confined):
                raise RestoreFailed(f"the archive of {name} is not the container its migration's pre-flight announced")
            settings = prepared.settings
        elif manifest.network is not None:
            archived = manifest.network
            fall_back = plan.tcp == criu.TCP_CLOSE
            wanted = None if remap else archived.ip  # None: the pool's first free address
            # A migration's pre-flight asked the segment for its address before the freeze, and claimed it and the
            # ports (network.reserve): taken over here. Asked again, the downtime would be longer by the probes' wait.
            asked = migration_id is not None and not remap
            own_net, settings = network.plan(
                registry, name, wanted, archived.ports, fall_back=fall_back, ask_segment=not asked,
                migration=migration_id,
            )  # fmt: skip
            _make_network(registry, own_net, settings, confined=confined)
        if own_net is not None and confined:
            plan = dataclasses.replace(plan, unplaced=own_net.unplaced)
        elif own_net is not None:
            plan = dataclasses.replace(plan, netns=own_net.pin)
        try:
            group = cgroups.create(cgroups.detect(), name, manifest.memory_limit, plan.cgroup_parents)
        except FileExistsError:
            raise RestoreFailed(f"cgroup {cgroups.parent_name()}/{name} exists already") from None
        if manifest.confinement is not None:
            confinement = _confine(registry, name, manifest, scratch, feed, layers, pool or isolation.id_pool())
            plan = dataclasses.replace(plan, confinement=confinement, layer=rootfs.Layer.of(registry.path(name)))
        inherit: dict[str, Path | int] = {}
        if manifest.log_path:
            # The restored processes write to this container's own log, which starts
            # with what the source had written; CRIU hands them this file (the helper opens it) in place of the
            # source's path (no size check, no clash with a source still running).
            log_fd = registry.open_log(name)
            if plan.confinement is not None:
                # CRIU's restore reopens it from inside the container's user namespace.
                rootfs.share(log_fd, plan.confinement)
            logtail.rebuild(log_fd, manifest.log_start)  # the lines not carried: a hole, the same length
            if feed is not None:  # the archived log follows as the archive is read, before the tree runs
                feed.log_to(registry.log_path(name))
            else:
                with (scratch / "log").open("rb") as saved, os.fdopen(os.dup(log_fd), "wb") as out:
                    shutil.copyfileobj(saved, out)
            inherit[manifest.log_external or manifest.log_path.lstrip("/")] = registry.log_path(name)
        if manifest.stdio is not None:
            # The caller's files, or this container's log (opened by the helper, for a confined one shared above).
            inherit.update(given.inherit(manifest.stdio, registry.log_path(name)))
        faults.inject("restore-before-criu")
        if plan.watcher is not None:
            plan.watcher.start(found, scratch, group, name)
            faults.inject("restore-after-lazy-daemon")
        progress.current().phase("restoring with CRIU")
        init_pid = helper.run(group, found, scratch, inherit, plan, feed)
        faults.inject("restore-after-criu")  # restored, not yet recorded
        started = procs.start_time(init_pid)
        if started is None:
            if plan.watcher is not None:
                plan.watcher.explain_exit()
            raise RestoreFailed(f"the restored container {name} exited at once")
        if plan.unplaced is not None:
            assert own_net is not None and settings is not None
            network.adopt(own_net, settings, init_pid)
        registry.save(
            containers.Container(
                name=name,
                cgroup=group.to_list(),
                init_pid=init_pid,
                init_start=started,
                command=manifest.command,
                created=containers.utc_now(),
                log=str(registry.log_path(name)) if manifest.log_path else None,
                memory_limit=manifest.memory_limit,
                migration=migration_id,
                host_job=manifest.pid_namespace == "host",
                confinement=plan.confinement,
                stdio=given.restored(manifest.stdio),
                network=own_net,
            )
        )
        faults.inject("restore-after-save")  # recorded, not yet connected: see receiver.reap
        # The very last step (see above).
        return init_pid, network.reconnect(own_net) if own_net is not None else None
    except BaseException as exc:
        if plan.watcher is not None:
            plan.watcher.abort()  # before anything else: its daemon must not serve what is torn down
        containers.undo(registry, name, group, own_net, exc)
        if isinstance(exc, KerrickptError) and not isinstance(exc, PASSED_ON):
            raise RestoreFailed(f"restore of {name} failed: {exc.message}", log_tail=exc.log_tail) from exc
        raise
    finally:
        if log_fd is not None:
            os.close(log_fd)


def _userns_indexed(index: archiveindex.Index) -> bool:
    """Whether the archive's index holds every user namespace image (a streamed restore may rewrite those only)."""
    names = [m.name for m in index.manifest.members if fnmatch.fnmatch(m.name, f"images/{idranges.USERNS_IMAGES}")]
    return all(name in index.files for name in names)


def _confine(
    registry: containers.Registry,
    name: str,
    manifest: Manifest,
    scratch: Path,
    feed: feeder.Feed | None,
    layers: list[layerchain.Delta],
    pool: isolation.IdPool,
) -> Confinement:
    """Give a confined container its id range here, from `pool` (the one it had, if free; a user's own host ids
    stay theirs), and its writable layer as the archive carries it: from the unpacked archive (`layers`: its own
    over the chain it builds on), or read from the archive's start (its first file) while the rest waits for
    CRIU. Its user namespace images must map what its confinement says; they are given the new range's map."""
    archived = manifest.confinement
    assert archived is not None
    try:
        was = archived.id_map
    except (NoIdRangeError, UsageError) as exc:  # on any node: a range among the node's own ids, or too many groups
        raise ArchiveCorruptError(f"the archive's recorded id map cannot be given to it: {exc.message}") from None
    ids = idranges.claim(registry, name, pool, prefer=(archived.uid_base, archived.gid_base))
    confined = dataclasses.replace(archived, uid_base=ids[0], gid_base=ids[1])
    id_map = confined.id_map  # NoIdRangeError here, before anything is unpacked, if the range holds the user's ids
    member = next((m for m in manifest.members if m.name == layer.MEMBER), None)
    if member is None:
        raise ArchiveCorruptError("the archive of a container with a root of its own carries no file-system layer")
    target = rootfs.Layer.of(registry.path(name))
    target.create(confined)
    images = scratch / "images"
    if feed is None:
        idranges.remap_images(images, was, id_map)
        with layers[0].tar.open("rb") as fh:
            layer.unpack(fh, target.upper, id_map)
        for delta in layers[1:]:
            with delta.tar.open("rb") as fh:
                layer.apply(fh, delta.removed, target.upper, id_map)
        shared = [images, *images.iterdir()]
    else:
        feed.substitute(idranges.USERNS_IMAGES, lambda found: idranges.remap(found, was, id_map))
        with feed.source.member(member, manifest.checksum) as fh:
            layer.unpack(cast(BinaryIO, fh), target.upper, id_map)
            fh.finish()
        shared = [images]  # CRIU reads the images from the feeder's socket there
    for path in shared:
        rootfs.share(path, confined)
    return confined
