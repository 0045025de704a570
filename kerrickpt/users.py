"""Owns naming users and paths inside a container's root: `--user NAME|UID[:GROUP|GID]` read in its
/etc/passwd and /etc/group, and paths resolved as the container sees them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kerrickpt.errors import UsageError

MAX_LINKS = 40  # as the kernel's path walk


@dataclass(frozen=True)
class Account:
    """Who a command runs as inside a container: ids, supplementary groups and home directory."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def inside(root: Path, path: str) -> Path | None:
    """The host path of `path` as the container whose root is `root` sees it, or None if there is none.

    Symbolic links are resolved within `root`: an absolute one restarts at `root`, never at the host's
    root (as it would under /proc/PID/root, or for an unpacked image's directory)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = MAX_LINKS
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        if not candidate.exists():
            return None
        resolved.append(part)
    return root.joinpath(*resolved)


def through_link(root: Path, path: str) -> bool:
    """Whether `path` passes through a symbolic link in `root` (where nothing may be mounted: as the host's
    root, the link would lead to the host's files)."""
    point = root
    for part in (p for p in path.split("/") if p):
        point = point / part
        if point.is_symlink():
            return True
    return False


def resolve(spec: str, root: Path) -> Account:
    """Whom `spec` names in the file system whose root is `root`. A user without a group gets the primary
    group its passwd line gives, or group 0 if it has none there (as Podman does); its supplementary
    groups are those /etc/group lists it in."""
    user, _, group = spec.partition(":")
    if not user or (group == "" and spec.endswith(":")):
        raise UsageError(f"--user {spec!r}: give NAME, UID, NAME:GROUP or UID:GID")
    passwd = _entries(root, "passwd")
    key = 2 if user.isdigit() else 0
    line = next((fields for fields in passwd if fields[key] == user), None)
    if line is None and not user.isdigit():
        raise UsageError(f"--user {spec!r}: no user {user!r} in the container's /etc/passwd")
    uid = int(line[2]) if line else int(user)
    gid = int(line[3]) if line else 0
    groups = _entries(root, "group")
    if group.isdigit():
        gid = int(group)
    elif group:
        found = next((int(fields[2]) for fields in groups if fields[0] == group), None)
        if found is None:
            raise UsageError(f"--user {spec!r}: no group {group!r} in the container's /etc/group")
        gid = found
    name = line[0] if line else None
    member = {int(f[2]) for f in groups if name and len(f) > 3 and name in f[3].split(",")}
    home = line[5] if line and len(line) > 5 and line[5] else "/"
    return Account(uid, gid, tuple(sorted({gid} | member)), home)


def _entries(root: Path, database: str) -> list[list[str]]:
    """The well-formed lines of /etc/`database` in `root`, split at ':'; none if it has no such file."""
    found = inside(root, f"/etc/{database}")
    try:
        text = found.read_text(errors="replace") if found and found.is_file() else ""
    except OSError:
        return []
    lines = [line.split(":") for line in text.splitlines()]
    ids = (2, 3) if database == "passwd" else (2,)  # passwd: uid and gid; group: gid
    return [fields for fields in lines if len(fields) > ids[-1] and all(fields[i].isdigit() for i in ids)]
