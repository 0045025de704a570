"""Owns the namespace and mount system calls Python's os module lacks (unshare, setns, mount, idmapped mounts)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from kerrickpt import idmap
from kerrickpt.idmap import IdMap

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NS_GET_USERNS = 0xB701  # an ioctl on a namespace's file: an fd of the user namespace that owns it

_libc = ctypes.CDLL(None, use_errno=True)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def setns(path: str | Path | int, flag: int) -> None:
    """Join the namespace pinned at `path` (a /proc/PID/ns file or a bind mount of one), or open at fd `path`, of type
    `flag`."""
    fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, flag) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        if fd is not path:
            os.close(fd)


def owner(path: str | Path) -> int:
    """An fd of the user namespace that owns the namespace pinned at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, NS_GET_USERNS)
    finally:
        os.close(fd)


def map_ids(pid: int, ids: IdMap) -> None:
    """Map `pid`'s new user namespace's ids as `ids` says.

    Written from the parent, which holds CAP_SETUID/CAP_SETGID here, so `setgroups` stays allowed:
    denying it would make the container's own setgroups() fail (field notes).
    """
    Path(f"/proc/{pid}/uid_map").write_text(idmap.text(ids.uids))
    Path(f"/proc/{pid}/gid_map").write_text(idmap.text(ids.gids))


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE = 1 << 12, 1 << 14, 1 << 18, 1 << 19
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64; glibc has no wrapper

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str | Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    encoded = [s.encode() if s is not None else None for s in (source, str(target), fstype, data)]
    _check(_libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]), f"mount {target}")


def bind(
    source: str | Path, target: str | Path, *, read_only: bool = False, recursive: bool = False, nosuid: bool = False
) -> None:
    """Bind `source` at `target`; read-only or nosuid takes a second call: the kernel ignores those flags on the
    first. A nosuid bind keeps the nodev and noexec its source has."""
    mount(str(source), target, None, MS_BIND | (MS_REC if recursive else 0))
    if read_only:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    elif nosuid:
        kept = os.statvfs(target).f_flag & (MS_NODEV | MS_NOEXEC)  # statvfs's ST_ flags have these numbers
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | kept)


def umount(target: str | Path) -> None:
    _check(_libc.umount2(str(target).encode(), MNT_DETACH), f"umount {target}")


def pivot_root(new_root: str | Path) -> None:
    """Make `new_root` (a mount point) this mount namespace's root and detach the old one beneath it."""
    os.chdir(new_root)
    # pivot_root(".", ".") stacks the old root on the new one; detaching "." then drops the old root.
    _check(_syscall(SYS_PIVOT_ROOT, b".", b"."), f"pivot_root {new_root}")
    _check(_libc.umount2(b".", MNT_DETACH), "detaching the old root")
    os.chdir("/")


def private_proc() -> None:
    """In a new mount namespace: stop mount events flowing back to the host, and show this PID namespace in /proc."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_SLAVE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


# The new mount API (Linux 5.12+ for idmapped mounts); x86_64 numbers, glibc 2.36 has no wrappers here.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x100000


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _syscall(number: int, *args: int | bytes | ctypes.c_void_p) -> int:
    """A system call by number: every argument a long (or a pointer), as the kernel reads them."""
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return int(_libc.syscall(ctypes.c_long(number), *converted))


def mapped_user_namespace(ids: IdMap) -> int:
    """An fd of a new user namespace mapped as `ids` says; it forks (a child makes the namespace and leaves;
    the fd keeps it): call only from a helper program."""
    with holding(CLONE_NEWUSER) as child:
        map_ids(child, ids)
        return os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def holding(flags: int, userns: int | None = None) -> Iterator[int]:
    """A child process that made new namespaces `flags` (in the user namespace open at fd `userns`, which then owns
    them), by PID, while the context lasts; then it leaves, and its namespaces live on only if something else holds
    them. It forks: call only from a helper program."""
    made_r, made_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            os.close(made_r)
            os.close(done_w)
            if userns is not None:
                setns(userns, CLONE_NEWUSER)
            unshare(flags)
            os.write(made_w, b"n")
            os.read(done_r, 1)  # until the parent let go of the namespaces
        except BaseException as exc:
            os.write(made_w, str(exc).encode())
        finally:
            os._exit(0)
    os.close(made_w)
    os.close(done_r)
    try:
        said = os.read(made_r, 4096)
        if said != b"n":
            raise OSError(errno.EPERM, f"could not make namespaces: {said.decode() or 'no answer'}")
        yield child
    finally:
        os.close(done_w)
        os.close(made_r)
        os.waitpid(child, 0)


def bind_idmapped(source: str | Path, target: str | Path, userns_fd: int) -> None:
    """Bind `source` (its own mount only, not those beneath) at `target`, its owners seen through
    `userns_fd`'s id map: host id 0 is that namespace's 0, so its first host id here."""
    tree = _syscall(SYS_OPEN_TREE, AT_FDCWD, str(source).encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    if tree < 0:
        _check(tree, f"open_tree {source}")
    try:
        attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
        pointer = ctypes.c_void_p(ctypes.addressof(attr))
        done = _syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, pointer, ctypes.sizeof(attr))
        _check(done, f"idmapping {source}")
        done = _syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, str(target).encode(), MOVE_MOUNT_F_EMPTY_PATH)
        _check(done, f"move_mount {target}")
    finally:
        os.close(tree)
