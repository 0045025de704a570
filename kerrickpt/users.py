"""Owns naming a user inside a container's root: `--user NAME|UID[:GROUP|GID]` read in its /etc/passwd and group."""

from __future__ import annotations

import os
from pathlib import Path

from kerrickpt.errors import UsageError


def resolve(spec: str, root: Path) -> tuple[int, int]:
    """The uid and gid `spec` names in the file system whose root is `root`. A user without a group gets
    the primary group its passwd line gives, or group 0 if it has none there (as Podman does)."""
    user, _, group = spec.partition(":")
    if not user or (group == "" and spec.endswith(":")):
        raise UsageError(f"--user {spec!r}: give NAME, UID, NAME:GROUP or UID:GID")
    passwd = _entries(root, "passwd")
    if user.isdigit():
        uid = int(user)
        primary = next((int(fields[3]) for fields in passwd if int(fields[2]) == uid), 0)
    else:
        line = next((fields for fields in passwd if fields[0] == user), None)
        if line is None:
            raise UsageError(f"--user {spec!r}: no user {user!r} in the container's /etc/passwd")
        uid, primary = int(line[2]), int(line[3])
    if not group:
        return uid, primary
    if group.isdigit():
        return uid, int(group)
    found = next((int(fields[2]) for fields in _entries(root, "group") if fields[0] == group), None)
    if found is None:
        raise UsageError(f"--user {spec!r}: no group {group!r} in the container's /etc/group")
    return uid, found


def _entries(root: Path, database: str) -> list[list[str]]:
    """The well-formed lines of /etc/`database` under `root`, split at ':'; none if it has no such file.

    Its last component is not followed if it is a symbolic link: under /proc/PID/root an absolute
    link would be resolved against the host's root, not the container's."""
    try:
        fd = os.open(root / "etc" / database, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, errors="replace") as fh:
        lines = [line.rstrip("\n").split(":") for line in fh]
    ids = (2, 3) if database == "passwd" else (2,)  # passwd: uid and gid; group: gid
    return [fields for fields in lines if len(fields) > ids[-1] and all(fields[i].isdigit() for i in ids)]
