"""Owns this node's containers: the state directory, `run`, `ps` and `kill`."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kerrickpt import (
    cgroups,
    claims,
    confinement,
    faults,
    idranges,
    isolation,
    launcher,
    lock,
    netlinks,
    netports,
    network,
    procs,
    schema,
    stdio,
)
from kerrickpt import rootfs as rootfs_
from kerrickpt.confinement import Confinement
from kerrickpt.errors import (
    BusyError,
    ContainerExistsError,
    ContainerNotFoundError,
    ExitedAtOnce,
    HostError,
    KerrickptError,
    NotReadyError,
    StateDamagedError,
    UsageError,
)

log = logging.getLogger(__name__)

STATE_ENV = "KERRICKPT_STATE_DIR"
DEFAULT_STATE_DIR = Path("/var/lib/kerrickpt")
NAME_MAX = 63
NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX - 1}}}")
RECORD = "container.json"
OWNER = "owner"  # the run that reserved the name, until the record exists
LOG = "log"
PREFLIGHT = ".preflight"  # a live pre-flight's mark in STATE/incoming (see Registry.preflight_marker)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (root's, 0600) so that a crash leaves the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    # A new file of our own, never one planted under that name, nor what a planted symlink points at.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def claimant_alive(claim: Path) -> bool | None:
    """Whether the process that wrote the claim file `claim` (see `Registry.claim`) lives; None if
    there is no claim, or it is being written right now."""
    try:
        owner = json.loads(claim.read_text())
        return owner["start"] is not None and procs.is_alive(owner["pid"], owner["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"bad container name {name!r}: use letters, digits, '.', '_' and '-' (at most {NAME_MAX})")
    return name


@dataclass
class Container:
    """A container kerrickpt runs on this node, as recorded in its state directory."""

    name: str
    cgroup: list[str]
    init_pid: int
    init_start: int
    command: list[str]
    created: str
    log: str | None = None
    memory_limit: int | None = None
    migration: str | None = None  # the id of the migration that brought it here
    host_job: bool = False  # restored from a job that shared the host's namespaces
    confinement: Confinement | None = None  # its own root and users; None: it shares the host's
    stdio: stdio.Stdio | None = None  # its fd 1 and 2 when they are its caller's files; None: its log
    network: network.Network | None = None  # its own network namespace and address; None: it shares the node's

    @property
    def group(self) -> cgroups.Cgroup:
        return cgroups.Cgroup(tuple(Path(p) for p in self.cgroup))

    def is_running(self) -> bool:
        return procs.is_alive(self.init_pid, self.init_start)


@dataclass(frozen=True)
class ContainerStatus:
    """One row of `kerrickpt ps`; an `abandoned` one (its run died before registering it) has no init,
    and a `damaged` one (its record is unreadable) nothing but its name. `ids` is a confined container's
    (confinement.OWN or HOST), None for one that shares the node's users."""

    name: str
    state: str
    init_pid: int | None
    init_ns_pid: int | None
    processes: int | None
    memory_bytes: int | None
    memory_limit: int | None
    cgroup: list[str]
    log: str | None
    created: str | None
    ids: str | None = None
    address: str | None = None  # its own network's address; None: it shares the node's network

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Registry:
    """The state directory: one subdirectory per container, plus private scratch space."""

    def __init__(self, root: Path | str | None = None) -> None:
        if os.geteuid() != 0:
            raise NotReadyError("kerrickpt needs root: CRIU, cgroups and namespaces require it")
        self.root = Path(root or os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR)
        self.containers = self.root / "containers"
        self.scratch = self.root / "tmp"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (self.containers, self.scratch):
            # Images hold process memory: private directories only. A state directory the
            # operator made keeps its own mode; what kerrickpt makes inside it is 0700.
            try:
                path.mkdir(mode=0o700)
                os.chmod(path, 0o700)  # whatever the umask
            except FileExistsError:
                pass

    @staticmethod
    def claim(scratch: Path) -> None:
        """Make this process the owner of a scratch directory another made: it outlives its maker."""
        me = os.getpid()
        write_atomic(scratch / OWNER, json.dumps({"pid": me, "start": procs.start_time(me)}))

    def abandoned(self) -> list[str]:
        """Names whose run died before registering them: `kill NAME` or `gc` removes what it left."""
        return [p.name for p in sorted(self.containers.iterdir()) if self.is_abandoned(p.name)]

    def is_gone(self, holder: claims.Holder) -> bool:
        """Whether the holder of a claim is gone from here (see claims): a container once its directory is; one that
        a migration brings once that migration no longer arrives (`is_arriving`) and no container here is the one it
        brought. Never for what is not a name."""
        name, migration = holder.container, holder.migration
        if NAME_PATTERN.fullmatch(name) is None:
            return False
        if migration is None:
            return not self.path(name).is_dir()
        return not self.is_arriving(migration) and not self._brought(name, migration)

    def is_arriving(self, migration_id: str) -> bool:
        """Whether migration `migration_id` is arriving here: a pre-flight of it holds claims for its container (see
        `preflight_marker`), or its receiver runs. Never false for what is not a migration's id."""
        if NAME_PATTERN.fullmatch(migration_id) is None:
            return True
        return claimant_alive(self.incoming(migration_id)) is True or self.preflight_holds(migration_id)

    def preflight_holds(self, migration_id: str) -> bool:
        """Whether a pre-flight of migration `migration_id` lives and holds what it claimed (see receiver.preflight)."""
        return next(self.preflights(migration_id), None) is not None

    def preflights(self, migration_id: str) -> Iterator[dict[str, Any]]:
        """The marks of the pre-flights of migration `migration_id` that live (see `preflight_marker`)."""
        for marker in self.incoming(migration_id).parent.glob(f"{check_name(migration_id)}.*{PREFLIGHT}"):
            if claimant_alive(marker) is not True:
                continue
            try:
                mark = json.loads(marker.read_text())
            except (OSError, ValueError):  # it ended just now
                continue
            yield mark

    def preflight_marker(self, migration_id: str) -> Path:
        """Where this process, a pre-flight of migration `migration_id`, marks that it lives while it holds claims
        for the container the migration brings: one mark each, as a pre-flight tried again may overlap the first."""
        return self.incoming(migration_id).with_name(f"{migration_id}.{os.getpid()}{PREFLIGHT}")

    def _brought(self, name: str, migration_id: str) -> bool:
        """Whether container `name` here is the one migration `migration_id` brought (or may be: its record is
        damaged)."""
        try:
            fields = json.loads((self.path(name) / RECORD).read_bytes())
        except FileNotFoundError:
            return False
        except ValueError:
            return True
        return not isinstance(fields, dict) or fields.get("migration") == migration_id

    def is_abandoned(self, name: str) -> bool:
        path = self.path(name)
        return not (path / RECORD).exists() and claimant_alive(path / OWNER) is False

    def path(self, name: str) -> Path:
        return self.containers / check_name(name)

    def reserve(self, name: str) -> Path:
        """Claim a name: its state directory is created or ContainerExistsError raised."""
        path = self.path(name)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            left = " (left by a run that died: `kerrickpt gc` removes it)" if self.is_abandoned(name) else ""
            raise ContainerExistsError(f"a container named {name!r} already exists on this node{left}") from None
        me = {"pid": os.getpid(), "start": procs.start_time(os.getpid())}
        write_atomic(path / OWNER, json.dumps(me))
        return path

    def release(self, name: str) -> None:
        idranges.release(self, name)  # first: a claim whose name is gone is anyone's (see idranges)
        network.release(self, name)
        shutil.rmtree(self.path(name), ignore_errors=True)

    def get(self, name: str) -> Container:
        record = self.path(name) / RECORD
        try:
            fields = json.loads(record.read_text())
            if fields.get("confinement") is not None:
                fields["confinement"] = Confinement.from_dict(schema.recorded_confinement(fields["confinement"]))
            if fields.get("stdio") is not None:
                fields["stdio"] = stdio.Stdio.from_dict(fields["stdio"])
            if fields.get("network") is not None:
                fields["network"] = network.Network.from_dict(fields["network"])
            container = Container(**fields)
        except FileNotFoundError:
            raise ContainerNotFoundError(f"no container named {name!r} on this node (state: {self.root})") from None
        except (ValueError, TypeError, AttributeError) as exc:  # torn, not JSON, or not a record's fields
            raise StateDamagedError(
                f"the record of container {name} ({record}) is damaged ({exc}); "
                f"`kerrickpt kill {name}` ends what runs in its cgroup and removes it"
            ) from None
        if not isinstance(container.init_pid, int) or not isinstance(container.cgroup, list):
            raise StateDamagedError(f"the record of container {name} ({record}) is damaged (wrong field types)")
        return container

    def save(self, container: Container) -> None:
        write_atomic(self.path(container.name) / RECORD, json.dumps(asdict(container), indent=2))

    def all(self) -> list[Container]:
        return [self.get(name) for name in self.recorded()]

    def recorded(self) -> list[str]:
        """The names with a record, readable or not."""
        return [path.name for path in sorted(self.containers.iterdir()) if (path / RECORD).exists()]

    def refuse_while_migrating(self, name: str) -> None:
        """BusyError while a migration of `name` is pending: the target may run it, and `recover` decides."""
        if self.journal_path(name).exists():
            raise BusyError(
                f"a migration of {name} is pending and the target may run it: run `kerrickpt recover {name}` first"
            )

    def journal_path(self, name: str) -> Path:
        """Where a migration of `name` under way is journaled (see migrate.Journal)."""
        directory = self.root / "migrations"
        directory.mkdir(mode=0o700, exist_ok=True)
        return directory / f"{check_name(name)}.json"

    def incoming(self, migration_id: str) -> Path:
        """Where the target side of migration `migration_id` keeps its marker (receiver) and files beside it."""
        directory = self.root / "incoming"
        directory.mkdir(mode=0o700, exist_ok=True)
        return directory / f"{check_name(migration_id)}.json"

    def lock(self, name: str) -> AbstractContextManager[lock.Holder | None]:
        """Hold the container for one command: checkpoint, migrate, recover and kill never overlap on it."""
        directory = self.root / "locks"
        directory.mkdir(mode=0o700, exist_ok=True)
        return lock.held(directory / f"{check_name(name)}.lock", wait=0, what=name)

    def scratch_dir(self, prefix: str) -> Path:
        """A private directory for images; its name carries this PID, so a crash's leftovers are swept."""
        return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=self.scratch))

    def log_path(self, name: str) -> Path:
        return self.path(name) / LOG

    def open_log(self, name: str) -> int:
        """The container's log, opened for appending the way its processes hold it."""
        return os.open(self.log_path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def run(
    name: str,
    argv: list[str],
    *,
    memory_limit: int | None = None,
    state_dir: Path | str | None = None,
    rootfs: str | None = None,
    user: str | None = None,
    volumes: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    ids: str = confinement.OWN,
    pool: isolation.IdPool | None = None,
    cgroup_parents: Mapping[Path, Path] | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    net: str | None = None,
    address: str | None = None,
    publish: Sequence[str] = (),
) -> ContainerStatus:
    """Start a checkpointable container and return once its command runs.

    Its fd 1 and 2 are its log, or the regular files open at `stdout` and `stderr` (the caller's, best opened
    O_WRONLY | O_APPEND), which a checkpoint names to CRIU and a restore may replace (see stdio).

    With `rootfs` (a directory, or confinement.HOST_ROOT) it is confined: its own root (an overlay of
    `rootfs` and a writable layer of its own), user and mount namespaces, its ids a host range of its
    own (`ids` "own"), but for "host" the uid, gid and groups of `user`, which are the host's own (its root
    and volumes nosuid); the command runs as `user` (NAME|UID[:GID]) with `env`, in `workdir`, and `volumes`
    (SRC:DST[:ro]) are bound in. Its range comes from `pool`, by default the node's (isolation.id_pool); users'
    jobs give theirs (privilege.jobs_pool). Its cgroups go beneath `cgroup_parents` if given (see cgroups.own).

    With `net` network.OWN it has a network namespace of its own on the node's bridge (see network), its
    address `address` (ADDR/PREFIX) or the subnet's first free one, and the node ports `publish`
    (HOSTPORT:PORT[/tcp|udp]) forwarded to it, confined or not; with network.HOST (or None) it shares the node's."""
    if not argv:
        raise UsageError("no command given to run")
    net = net or network.HOST
    if net not in network.MODES:
        raise UsageError(f"--net {net}: give one of {', '.join(network.MODES)}")
    if net == network.HOST and (address or publish):
        raise UsageError("--ip and --publish need a network of the container's own (--net own)")
    ports = netports.parse(publish)
    if ids not in confinement.ID_MODES:
        raise UsageError(f"--ids {ids}: give one of {', '.join(confinement.ID_MODES)}")
    if rootfs is None and (user or volumes or env or workdir or ids != confinement.OWN):
        raise UsageError("--user, --volume, --env, --workdir and --ids need a root of the container's own (--rootfs)")
    given = stdio.Given.of(stdout, stderr)
    registry = Registry(state_dir)
    registry.reserve(name)
    group: cgroups.Cgroup | None = None
    own_net: network.Network | None = None
    try:
        # Claimed first: bad network input is refused before a root is confined.
        planned = network.plan(registry, name, address, ports) if net == network.OWN else None
        confined = None
        if rootfs is not None:
            confined = confinement.confine(
                name,
                argv[0],
                rootfs,
                idranges.claim(registry, name, pool or isolation.id_pool()),
                host_ids=ids == confinement.HOST,
                user=user,
                volumes=volumes,
                env=env,
                workdir=workdir,
            )
        if planned is not None:
            own_net, settings = planned
            # A confined container's is its user namespace's (see netnsmaker): CRIU dumps it so, with its sockets.
            network.create(registry, own_net, settings, owner=confined.id_map if confined else None)
        try:
            group = cgroups.create(cgroups.detect(), name, memory_limit, cgroup_parents)
        except FileExistsError:
            raise ContainerExistsError(f"cgroup {cgroups.parent_name()}/{name} exists already") from None
        layer = None
        log_fd = registry.open_log(name)
        outputs = given.copies()
        try:
            if confined is not None:
                layer = rootfs_.Layer.of(registry.path(name))
                layer.create(confined)
                # CRIU's restore reopens the log from inside the container's user namespace.
                rootfs_.share(log_fd, confined)
            netns = own_net.pin if own_net else None
            init_pid, idmapped = launcher.spawn(name, argv, group, outputs.outputs(log_fd), confined, layer, netns)
            if confined is not None:
                confined = replace(confined, idmapped_lower=idmapped)
        finally:
            os.close(log_fd)
            outputs.close()
        started = procs.start_time(init_pid)
        if started is None:
            raise ExitedAtOnce(f"{argv[0]} exited at once; see {registry.log_path(name)}", pid=init_pid)
        container = Container(
            name=name,
            cgroup=group.to_list(),
            init_pid=init_pid,
            init_start=started,
            command=list(argv),
            created=utc_now(),
            log=str(registry.log_path(name)),
            memory_limit=memory_limit,
            confinement=confined,
            stdio=given.record(),
            network=own_net,
        )
        faults.inject("run-before-save")  # all made, nothing recorded: what `gc` finds of a run that died
        registry.save(container)
        return status(container)
    except BaseException as exc:
        undo(registry, name, group, own_net, exc)
        raise


def undo(
    registry: Registry, name: str, group: cgroups.Cgroup | None, own_net: network.Network | None, exc: BaseException
) -> None:
    """Remove what a run or restore of `name` that failed with `exc` made: its cgroups, its network, then the name.
    Should its network not all go, the name stays reserved (abandoned once this process is gone: `kill` and `gc`
    finish the removal), and `exc` says so. Its network is cut off before the kill (see network.cut_off)."""
    if own_net is not None:
        with suppress(HostError):  # should it fail, destroy below says what could not go
            network.cut_off(own_net)
    if group is not None:
        group.remove()
    if own_net is not None:
        try:
            network.destroy(own_net)
        except HostError as failed:
            left = f"{failed.message}: `kerrickpt gc` (or `kerrickpt kill {name}`) removes the rest"
            if isinstance(exc, KerrickptError):
                exc.message += f"; and {left}"
            else:  # a signal (Interrupted), whose exit prints no message: said here, or nowhere
                log.warning("%s: %s", name, left)
            return
    registry.release(name)


def status(container: Container) -> ContainerStatus:
    group = container.group
    running = container.is_running()
    state = "exited"
    ns_pid = None
    if running:
        try:
            state = "frozen" if group.freezer.is_frozen() else "running"
            ns_pid = procs.read(container.init_pid).ns_pid
        except (FileNotFoundError, ProcessLookupError):
            state = "exited"
    return ContainerStatus(
        name=container.name,
        state=state,
        init_pid=container.init_pid,
        init_ns_pid=ns_pid,
        processes=len(group.pids()) if running else 0,
        memory_bytes=group.memory_usage() if running else None,
        memory_limit=container.memory_limit,
        cgroup=container.cgroup,
        log=container.log,
        created=container.created,
        ids=container.confinement.id_mode if container.confinement else None,
        address=container.network.address if container.network else None,
    )


def _abandoned_status(registry: Registry, name: str) -> ContainerStatus | None:
    """Its row, or None if `kill` or `gc` removed it meanwhile."""
    group = cgroups.existing(cgroups.detect(), name)
    log = registry.log_path(name)
    try:
        made = datetime.fromtimestamp(registry.path(name).stat().st_mtime, UTC)
    except FileNotFoundError:
        return None
    return ContainerStatus(
        name=name,
        state="abandoned",
        init_pid=None,
        init_ns_pid=None,
        processes=len(group.pids()),
        memory_bytes=group.memory_usage(),
        memory_limit=group.memory_limit(),
        cgroup=group.to_list(),
        log=str(log) if log.exists() else None,
        created=made.isoformat(timespec="milliseconds"),
    )


def _recorded_status(registry: Registry, name: str) -> ContainerStatus:
    """Its row; one that says only `damaged` if its record cannot be read (`kill NAME` still ends it)."""
    try:
        return status(registry.get(name))
    except StateDamagedError:
        return ContainerStatus(name, "damaged", None, None, None, None, None, [], None, None)


def ps(state_dir: Path | str | None = None) -> list[ContainerStatus]:
    """Every container of this node with its state, and the names of runs that died before registering
    theirs (`abandoned`). Only looks: `kill NAME` or `gc` removes what an abandoned one left."""
    registry = Registry(state_dir)
    rows = [_recorded_status(registry, name) for name in registry.recorded()]
    rows += [row for name in registry.abandoned() if (row := _abandoned_status(registry, name))]
    return sorted(rows, key=lambda row: row.name)


def resume(container: Container) -> None:
    """Let a frozen container run again, on its network too: a checkpoint cut it off (see netlinks.cut_off).
    Connected first: should that fail, it stays frozen rather than running cut off."""
    if container.network is not None:
        network.reconnect(container.network)  # announced too: a migration's target may have announced it
    container.group.freezer.thaw()


def needs_recovery(container: Container) -> bool:
    """Whether `recover` has something to do for it: it is frozen, or cut off its network (a checkpoint's
    kerrickpt died after the thaw, or its guardian could not connect it again)."""
    return container.group.freezer.is_frozen() or (
        container.network is not None and netlinks.is_cut_off(container.network.veth)
    )


def remove(registry: Registry, container: Container, *, reset_peers: bool = False) -> None:
    """Kill every process of the container and remove its cgroups, network and state. Its network is cut off
    before the kill (see network.cut_off), unless `reset_peers` (a user's `kill`: its connections end here, and its
    peers had better hear so than wait for their timeouts)."""
    if container.network is not None and not reset_peers:
        network.cut_off(container.network)
    container.group.remove()
    if container.network is not None:
        network.destroy(container.network)
    registry.release(container.name)


def remove_abandoned(registry: Registry, name: str) -> None:
    """Kill what runs in `name`'s cgroups and free the name: for one without a (readable) record, such as
    a name whose run died before registering it."""
    cgroups.existing(cgroups.detect(), name).remove()
    network.sweep(*network.names(registry, name))  # all of it tried; the name stays if some could not go
    registry.release(name)


def remove_if_abandoned(registry: Registry, name: str) -> bool:
    """remove_abandoned, once the container's lock is held and `name` is still abandoned under it: a name seen
    abandoned a while ago may have been removed by another command and reserved anew by a live run since (reserve
    needs no lock, but makes the name's directory, which is then no longer abandoned). False if another command
    holds the name, or it is not abandoned now."""
    try:
        with registry.lock(name):
            if not registry.is_abandoned(name):
                return False
            remove_abandoned(registry, name)
            return True
    except BusyError:
        return False


def kill(name: str, state_dir: Path | str | None = None) -> None:
    """End a container and remove its cgroups and state (also what an `abandoned` one left)."""
    registry = Registry(state_dir)
    with registry.lock(name):
        registry.refuse_while_migrating(name)
        if registry.is_abandoned(name):
            remove_abandoned(registry, name)
            return
        try:
            container = registry.get(name)
        except StateDamagedError:
            # Its record is unreadable, but its cgroup is where kerrickpt makes every container's.
            remove_abandoned(registry, name)
            return
        remove(registry, container, reset_peers=True)
