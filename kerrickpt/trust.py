"""Owns the trust checks on directories whose contents root acts on: who owns them, who may write in them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kerrickpt.errors import UntrustedStoreError

HINT = "whoever can write there could plant what root then restores (chown root and chmod go-w to trust it)"


def problem(path: Path, *, above: bool = False) -> str | None:
    """Why the directory `path` is not one that only root (or this user) controls, or None.

    As ssh's StrictModes: owned by root or this user, writable by nobody else. A directory
    `above` the one checked may be writable by all if it is root's and sticky, as /tmp is:
    there, others cannot rename or remove what is not theirs.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, not by root"
    sticky_root = above and st.st_uid == 0 and st.st_mode & stat.S_ISVTX
    if st.st_mode & 0o022 and not sticky_root:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check(path: Path, what: str) -> None:
    """Refuse the directory `path` unless `problem` finds nothing wrong with it."""
    found = problem(path)
    if found:
        raise UntrustedStoreError(f"refusing {what} {path}: it {found}; {HINT}")


def check_tree(path: Path, what: str) -> None:
    """Refuse `path` unless it (its real path) and every directory above it pass `problem`."""
    real = Path(os.path.realpath(path))
    check(real, what)
    for parent in real.parents:
        found = problem(parent, above=True)
        if found:
            raise UntrustedStoreError(f"refusing {what} {path}: {parent} above it {found}; {HINT}")
