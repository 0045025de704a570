"""Owns a confined container's root file system: the overlay of its read-only lower layer and its writable
layer in the container's state, and the mounts inside it (/proc, a minimal /dev, /sys read-only, /tmp, volumes).
With host ids (Confinement.host_ids) its root and volumes are nosuid: its user is a host user, who gains nothing
inside that they could not outside."""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from kerrickpt import namespaces, users
from kerrickpt.confinement import Confinement, Volume, lower_dir
from kerrickpt.errors import UsageError
from kerrickpt.namespaces import MS_NODEV, MS_NOEXEC, MS_NOSUID

# Bound from the host's /dev: a user namespace may not make device nodes.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
MOUNT_POINTS = ("proc", "dev", "sys", "tmp")
TMP_SIZE = "50%"  # of RAM at most, as tmpfs's default; it lives in the container's memory (and its checkpoint)


# Where, in a mount namespace of kerrickpt's own, the container's root and the host paths CRIU binds
# in are mounted: a fresh tmpfs over /mnt (hidden from the host, which keeps its /mnt). The user
# namespace's root must reach them by path, which it could not inside kerrickpt's private state dir.
STAGE = Path("/mnt")
ROOT = STAGE / "root"
LOWER = STAGE / "lower"  # the lower layer, idmapped (see stage)
HOST_BINDS = STAGE / "host"


@dataclass(frozen=True)
class Layer:
    """A confined container's writable layer, `<container's state>/layer`, private to root."""

    root: Path

    @classmethod
    def of(cls, container_dir: Path) -> Layer:
        return cls(container_dir / "layer")

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def lineage(self) -> str | None:
        """The layer's random id, made with it: a layer made by a restore or a migration is another lineage,
        which no snapshot of this one is a base for. None for a layer made before lineages."""
        try:
            return (self.root / "lineage").read_text().strip()
        except FileNotFoundError:
            return None

    def create(self, confinement: Confinement) -> None:
        """Make the empty layer, of a lineage of its own; its top is the container's `/`, owned by the container's
        root."""
        self.root.mkdir(mode=0o700)
        self.work.mkdir(mode=0o700)
        self.upper.mkdir(mode=0o755)
        os.chown(self.upper, *confinement.id_map.root)
        (self.root / "lineage").write_text(secrets.token_hex(16) + "\n")


def share(target: Path | int, confinement: Confinement) -> None:
    """Let CRIU's restore read `target` (a path or an open file) from inside the container's user
    namespace. Its tasks there are host root until CRIU makes them root inside, and then the
    container's root group: root's file, that group's too, and no one else's. Its images hold its own
    memory, which its root may read anyway; the scratch directory above them stays root's, 0700."""
    _, group = confinement.id_map.root
    if isinstance(target, int):
        os.fchown(target, 0, group)
        os.fchmod(target, 0o660)
    else:
        os.chown(target, 0, group)
        os.chmod(target, 0o750 if target.is_dir() else 0o640)


def lower(confinement: Confinement) -> str:
    return str(lower_dir(confinement.rootfs))


# What a node does when it cannot see a lower layer through an id map: a kernel before 5.12 (ENOSYS), a
# file system without idmapped mounts (EINVAL, EOPNOTSUPP), an overlay that refuses such a layer (before
# 5.19: EINVAL), or a kernel that forbids it here (EPERM).
IDMAP_REFUSED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)


def stage(confinement: Confinement, layer: Layer, *, fall_back: bool = False) -> bool:
    """In a mount namespace of this process's own, whose mounts never reach the host's: the container's
    root at ROOT. Its lower layer is seen through the container's id map if `confinement` says so; with
    `fall_back`, as is if this node refuses that. Returns whether it is idmapped. Forks: helper programs only."""
    namespaces.unshare(namespaces.CLONE_NEWNS)
    namespaces.mount(None, "/", None, namespaces.MS_REC | namespaces.MS_PRIVATE)
    namespaces.mount("kerrickpt", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
    ROOT.mkdir()
    if confinement.idmapped_lower:
        try:
            _overlay(_idmapped_lower(confinement), layer, confinement)
            return True
        except OSError as exc:
            if not (fall_back and exc.errno in IDMAP_REFUSED):
                why = f"this node cannot show the container's lower layer through its id map: {exc}"
                raise OSError(exc.errno, why) from exc
            if os.path.ismount(LOWER):
                namespaces.umount(LOWER)
    _overlay(lower(confinement), layer, confinement)
    return False


def _idmapped_lower(confinement: Confinement) -> Path:
    """The lower layer at LOWER, its owners seen through the container's id map: host root's files are the
    container root's, host uid 101's its uid 101's, as Podman shows an image's."""
    LOWER.mkdir()
    userns = namespaces.mapped_user_namespace(confinement.id_map)
    try:
        namespaces.bind_idmapped(lower(confinement), LOWER, userns)
    finally:
        os.close(userns)
    return LOWER


def _overlay(lower_dir: str | Path, layer: Layer, confinement: Confinement) -> None:
    # Without redirects and metacopy (the kernel's defaults, said here since a node may change them): the
    # layer alone then holds every file it changed, as a checkpoint must carry it (see layer).
    options = f"lowerdir={lower_dir},upperdir={layer.upper},workdir={layer.work},redirect_dir=off,metacopy=off"
    namespaces.mount("overlay", ROOT, "overlay", MS_NOSUID if confinement.host_ids else 0, options)


def bind_host_paths(confinement: Confinement, under: Path) -> None:
    """Bind /sys (read-only) and each volume's source at its bind point beneath `under`, each without what
    is mounted beneath it: inside the container's user namespace those would be locked to their parent,
    and a bind of a mount with locked children is refused. With host ids each is nosuid, as its root is: a
    setuid file of its root's (or of anyone's) must give its user, a host user, nothing. The binds of a
    restore are nosuid too, and CRIU's binds of them, made from them, stay so."""
    for volume in host_paths(confinement):
        point = _mount_point(under, volume)
        namespaces.bind(volume.source, point, read_only=volume.read_only, nosuid=confinement.host_ids)


def bind_point(under: Path, volume: Volume) -> Path:
    """Where `volume` is bound beneath `under`: the container's root, or HOST_BINDS for CRIU's restore."""
    return under / volume.target.lstrip("/")


def _mount_point(under: Path, volume: Volume) -> Path:
    """The bind point of `volume` beneath `under`, made as it must be (a directory, or a file for a file),
    never through a symbolic link: here, as the host's root, a link in the container's root (an image's
    `/data -> /etc`) would lead onto the host's files."""
    if users.through_link(under, volume.target):
        raise UsageError(f"{volume.target} passes through a symbolic link in the container's root: no bind point")
    point = bind_point(under, volume)
    point.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not point.exists():
        if os.path.isdir(volume.source):
            point.mkdir(mode=0o755)
        else:
            point.touch(mode=0o644)
    return point


def host_paths(confinement: Confinement) -> list[Volume]:
    """What the container binds from the host: /sys, then its volumes."""
    return [Volume("/sys", "/sys", read_only=True), *confinement.volumes]


def populate(merged: Path) -> None:
    """Inside the container's user and mount namespaces, as its root: its own /proc, a minimal /dev, /tmp."""
    for point in MOUNT_POINTS:
        (merged / point).mkdir(exist_ok=True)
    namespaces.mount("proc", merged / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = merged / "dev"
    namespaces.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for device in DEVICES:
        (dev / device).touch(mode=0o666)
        namespaces.bind(f"/dev/{device}", dev / device)
    for sub in ("pts", "shm"):
        (dev / sub).mkdir()
    namespaces.mount("devpts", dev / "pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    (dev / "ptmx").symlink_to("pts/ptmx")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        (dev / name).symlink_to(target)
    namespaces.mount("shm", dev / "shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777")
    namespaces.mount("tmpfs", merged / "tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={TMP_SIZE}")


def enter(merged: Path) -> None:
    """Make `merged` the root. Its mount came from the host's side, so here it is locked, and pivot_root
    refuses a locked mount: a bind of it (with what is mounted beneath) is not."""
    namespaces.bind(merged, merged, recursive=True)
    populate(merged)
    namespaces.pivot_root(merged)
