"""Owns the namespace system calls Python's os module lacks (unshare, setns)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000

_libc = ctypes.CDLL(None, use_errno=True)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def map_ids(pid: int, host_uid: int, host_gid: int, count: int) -> None:
    """Map ids 0..count-1 in `pid`'s new user namespace to host uids from `host_uid` and gids from `host_gid`.

    Written from the parent, which holds CAP_SETUID/CAP_SETGID here, so `setgroups` stays allowed:
    denying it would make the container's own setgroups() fail (field notes).
    """
    Path(f"/proc/{pid}/uid_map").write_text(f"0 {host_uid} {count}\n")
    Path(f"/proc/{pid}/gid_map").write_text(f"0 {host_gid} {count}\n")


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


def bind(source: str | Path, target: str | Path, *, read_only: bool = False, recursive: bool = False) -> None:
    """Bind `source` at `target`; read-only takes a second call: the kernel ignores MS_RDONLY on the first."""
    mount(str(source), target, None, MS_BIND | (MS_REC if recursive else 0))
    if read_only:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def pivot_root(new_root: str | Path) -> None:
    """Make `new_root` (a mount point) this mount namespace's root and detach the old one beneath it."""
    os.chdir(new_root)
    # pivot_root(".", ".") stacks the old root on the new one; detaching "." then drops the old root.
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), f"pivot_root {new_root}")
    _check(_libc.umount2(b".", MNT_DETACH), "detaching the old root")
    os.chdir("/")


def private_proc() -> None:
    """In a new mount namespace: stop mount events flowing back to the host, and show this PID namespace in /proc."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_SLAVE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
