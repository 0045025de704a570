"""Owns what confines a container with its own root and users: its root, host id range, user, volumes, environment
and working directory, as its record and its archive keep them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kerrickpt import users
from kerrickpt.errors import UsageError
from kerrickpt.idmap import IdMap

HOST_ROOT = "host"  # --rootfs host: an overlay of the node's own root file system
RANGE = 65536  # the ids a container has: root (0) to nobody (65534) and 65535
OWN, HOST = "own", "host"  # `--ids`: a host id range of its own, or that with its user's ids the host's own
ID_MODES = (OWN, HOST)


@dataclass(frozen=True)
class Volume:
    """A host path bind-mounted into the container; it does not travel (shared storage by definition)."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Confinement:
    """A container's own root, users and mounts. `rootfs` is the overlay's read-only lower layer: HOST_ROOT
    or an absolute directory; the writable layer lives in the container's state. Container ids 0..ids-1
    are host ids uid_base.. and gid_base..; the command runs as `uid`:`gid` inside. With `idmapped_lower` its
    lower layer is seen through that map, so the lower layer's owners are the container's (host root's files
    its root's); without it (a node that refused, or a container from before), they are nobody unless in the
    range. With `host_ids` (`--ids host`) the ids it runs as, `uid`, `gid` and `groups` but 0, are not of its
    range but the host's own, each mapped to itself (see id_map)."""

    rootfs: str
    uid_base: int
    gid_base: int
    ids: int = RANGE
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    volumes: tuple[Volume, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    idmapped_lower: bool = False
    host_ids: bool = False

    @property
    def id_map(self) -> IdMap:
        """The container's user namespace map; NoIdRangeError if its user's own ids lie in its range."""
        if not self.host_ids:
            return IdMap.shifted(self.uid_base, self.gid_base, self.ids)
        return IdMap.keeping(self.uid_base, self.gid_base, self.ids, (self.uid,), (self.gid, *self.groups))

    def check_ids(self) -> None:
        """Refuse now, before anything is made for it, an id map the container could not be given: its range holds
        its user's own ids or starts among the node's (NoIdRangeError), or the kernel would not take it (UsageError)."""
        self.id_map  # noqa: B018 - building the map is the check

    @property
    def id_mode(self) -> str:
        return HOST if self.host_ids else OWN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Confinement:
        fields = dict(data)
        fields["volumes"] = tuple(Volume(**v) for v in data.get("volumes", ()))
        fields["groups"] = tuple(data.get("groups", ()))
        return cls(**fields)


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RESERVED = ("/", "/proc", "/dev", "/sys", "/tmp")  # the container's own mounts: no volume goes there


def parse_volume(text: str) -> Volume:
    """`SRC:DST[:ro]`, both absolute."""
    parts = text.split(":")
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        source, target, read_only = parts[0], parts[1], parts[2] == "ro"
    elif len(parts) == 2:
        source, target, read_only = parts[0], parts[1], False
    else:
        raise UsageError(f"bad volume {text!r}: use SRC:DST or SRC:DST:ro")
    if not (source.startswith("/") and target.startswith("/")):
        raise UsageError(f"bad volume {text!r}: SRC and DST must be absolute paths")
    target = os.path.normpath(target)
    if target in RESERVED or target.startswith(("/proc/", "/dev/", "/sys/", "/tmp/")):
        raise UsageError(f"bad volume {text!r}: {target} is the container's own")
    if not os.path.exists(source):
        raise UsageError(f"volume source {source} does not exist")
    return Volume(os.path.realpath(source), target, read_only)


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r}: give KEY=VALUE")
        env[key] = value
    return env


def lower_dir(rootfs: str) -> Path:
    """The directory a `--rootfs` names; UsageError if it is none."""
    if rootfs == HOST_ROOT:
        return Path("/")
    path = Path(rootfs)
    if not path.is_absolute():
        raise UsageError(f"--rootfs {rootfs}: give an absolute path, or `host`")
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise UsageError(f"--rootfs {rootfs} {what}")
    return path


def seen(root: Path, path: str, volumes: Sequence[Volume] = ()) -> Path | None:
    """The host path of `path` as the container will see it: in a volume bound over it, else in its root;
    None if there is none."""
    path = os.path.normpath(path)
    volume = next((v for v in volumes if (path + "/").startswith(v.target.rstrip("/") + "/")), None)
    if volume is not None:
        return users.inside(Path(volume.source), path.removeprefix(volume.target.rstrip("/")) or "/")
    return users.inside(root, path)


def command_path(root: Path, argv0: str, path: str, volumes: Sequence[Volume] = ()) -> Path | None:
    """Where the container finds its command `argv0`, searching `path` as execvp does, in its root or a
    volume; None if nowhere."""
    candidates = [argv0] if "/" in argv0 else [f"{d}/{argv0}" for d in path.split(":") if d]
    for candidate in candidates:
        found = seen(root, candidate, volumes)
        if found is not None and found.is_file() and os.access(found, os.X_OK):
            return found
    return None


def confine(
    name: str,
    argv0: str,
    rootfs: str,
    ids: tuple[int, int],
    *,
    host_ids: bool = False,
    user: str | None = None,
    volumes: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
) -> Confinement:
    """The confinement `kerrickpt run --rootfs` asks for, container ids from host ids `ids` (uid, gid) on, its
    user's the host's own with `host_ids`; UsageError for a root, user, volume or command the container would not
    find, NoIdRangeError for host ids its range holds."""
    root = lower_dir(rootfs)
    account = users.resolve(user or "0", root)
    if not host_ids and (account.uid >= RANGE or account.gid >= RANGE):
        raise UsageError(f"--user {user}: ids inside a container go up to {RANGE - 1} (but with --ids host)")
    environment = {"PATH": DEFAULT_PATH, "HOSTNAME": name, "HOME": account.home, **(env or {})}
    bound = tuple(parse_volume(v) for v in volumes)
    if command_path(root, argv0, environment["PATH"], bound) is None:
        raise UsageError(f"{argv0}: no such program in the container's root {root} (searched {environment['PATH']})")
    linked = [v.target for v in bound if users.through_link(root, v.target)]
    if linked:
        raise UsageError(f"--volume ...:{linked[0]}: it passes through a symbolic link in the container's root")
    workdir = workdir or "/"
    if not workdir.startswith("/"):
        raise UsageError(f"--workdir {workdir}: give an absolute path")
    where = seen(root, workdir, bound)
    if where is None or not where.is_dir():
        raise UsageError(f"--workdir {workdir}: no such directory in the container's root or its volumes")
    confined = Confinement(
        rootfs=rootfs,
        uid_base=ids[0],
        gid_base=ids[1],
        uid=account.uid,
        gid=account.gid,
        groups=account.groups,
        volumes=bound,
        env=environment,
        workdir=workdir,
        # Asked for (the launcher falls back if this node refuses: rootfs.stage), but with host ids: through the
        # map, host root's files would be the container's root's, and so CRIU's restore's, to open.
        idmapped_lower=not host_ids,
        host_ids=host_ids,
    )
    confined.check_ids()
    return confined
