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


MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_SLAVE = 2, 4, 8, 1 << 14, 1 << 19

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    encoded = [s.encode() if s is not None else None for s in (source, target, fstype)]
    if _libc.mount(*encoded, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def private_proc() -> None:
    """In a new mount namespace: stop mount events flowing back to the host, and show this PID namespace in /proc."""
    unshare(CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_SLAVE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
