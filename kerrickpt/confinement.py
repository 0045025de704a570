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

HOST_ROOT = "host"  # --rootfs host: an overlay of the node's own root file system
RANGE = 65536  # the ids a container has: root (0) to nobody (65534) and 65535
# The ids of a container with host ids (`--ids host`): every id the kernel maps (all but (uid_t)-1), each
# the host's own, so that a job's files on its volumes belong to its user (see Confinement.host_ids).
HOST_IDS = (1 << 32) - 1
OWN, HOST = "own", "host"  # `--ids`: a host id range of its own, or the host's ids
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
    range. A container with host ids (`host_ids`) is said so: uid_base and gid_base 0 and `ids` HOST_IDS, an
    identity map claiming no range (records and archives from before it have RANGE ids: their own)."""

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

    @property
    def host_ids(self) -> bool:
        """Whether the container's ids are the host's: its root is host root as files go, so its own mounts
        that hold files are nosuid (see rootfs)."""
        return self.ids == HOST_IDS

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
    ids: tuple[int, int] | None,
    *,
    user: str | None = None,
    volumes: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
) -> Confinement:
    """The confinement `kerrickpt run --rootfs` asks for, container ids from host ids `ids` (uid, gid) on, or
    the host's ids if None; UsageError for a root, user, volume or command the container would not find."""
    root = lower_dir(rootfs)
    account = users.resolve(user or "0", root)
    count = RANGE if ids is not None else HOST_IDS
    if account.uid >= count or account.gid >= count:
        raise UsageError(f"--user {user}: ids inside a container go up to {count - 1}")
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
    uid_base, gid_base = ids or (0, 0)
    return Confinement(
        rootfs=rootfs,
        uid_base=uid_base,
        gid_base=gid_base,
        ids=count,
        uid=account.uid,
        gid=account.gid,
        groups=account.groups,
        volumes=bound,
        env=environment,
        workdir=workdir,
        # Asked for, with a range of its own (the launcher falls back if this node refuses: rootfs.stage); host
        # ids see the lower layer's owners as they are.
        idmapped_lower=ids is not None,
    )
