"""Owns claim files: a thing of this node that one container holds (a host id range, an address, a node port),
as a file in a directory of STATE naming its holder (see Holder), and the rule by which a claim is stale.

A claim comes into being whole and exclusively (written aside, then link(2), which fails on an existing name as
O_CREAT|O_EXCL does), so two runs never hold one thing, whatever their timing.

The rule for stale claims: a claim whose container has no directory (STATE/containers/NAME) is stale and may be
taken. `containers.run` and restore reserve the name (its directory) before they claim, and must release the
claims before they free the name: so a claim is never seen stale while its container is alive, and a name
reserved anew never inherits, nor loses, the claim of the container it was before. A claim held for a container
that a migration brings here (from its pre-flight on, before the name is reserved) is stale once neither that
migration's pre-flight nor its receiver lives, nor the container it brought (see State.is_gone). Only a process
that holds a claim file's flock, having seen that the name still leads to that very file, removes it: two runs
that both find a claim stale never remove each other's new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kerrickpt import procs

TEMP = ".claim-"  # a claim being written: .claim-PID-THREAD-N
_GONE = object()  # what _locked yields for a claim file that went


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: container `container` of this node; with `migration`, the container that migration (its
    id) brings here, for which its pre-flight claims what it needs before anything is frozen, and its restore takes
    the claims over (see network.reserve)."""

    container: str
    migration: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {"container": self.container, **({"migration": self.migration} if self.migration else {})}


class State(Protocol):
    """What claims need of a node's state directory (containers.Registry is one): where it is, whether the holder a
    claim names is gone from it (never so for what is not a container's name or a migration's id, which could lead
    anywhere as a path), and whether a migration is still arriving (its pre-flight or receiver lives)."""

    root: Path

    def is_gone(self, holder: Holder) -> bool: ...

    def is_arriving(self, migration: str) -> bool: ...


def directory(registry: State, name: str) -> Path:
    """STATE/`name`, a private directory of claim files, made if missing."""
    path = registry.root / name
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)  # whatever the umask
    return path


def held(where: Path, kind: Callable[[str], bool]) -> Iterator[tuple[Path, Holder | None]]:
    """Each claim file in `where` whose name `kind` accepts, and its holder (None if unreadable: never taken as
    stale)."""
    for path in sorted(where.iterdir()):
        if not path.name.startswith(TEMP) and kind(path.name):
            with contextlib.suppress(FileNotFoundError):  # released meanwhile
                yield path, _owner(path.read_bytes())


def blocking(registry: State, path: Path, holder: Holder) -> str | None:
    """Who holds the claim `path` so that `take` would refuse it `holder`, in words (a container, with the migration
    that brings it while it arrives, or a claim that cannot be read); None if it would not: there is no claim (or no
    longer), or it is `holder`'s or a gone one's. Read once, so that a claim released meanwhile is never blamed on
    no one."""
    try:
        current = _owner(path.read_bytes())
    except FileNotFoundError:
        return None
    if not refuses(registry, current, holder):
        return None
    if current is None:
        return f"a claim file that cannot be read ({path})"
    if current.migration is not None and registry.is_arriving(current.migration):
        return f"the container {current.container} that migration {current.migration} brings here"
    return f"container {current.container}"


def take(registry: State, path: Path, holder: Holder) -> bool:
    """Make the claim `path` `holder`'s (or find it is already), taking it over from a holder that is gone; False
    if another holds it."""
    while True:
        if _create(path, holder):
            return True
        with _locked(path) as current:
            if current is _GONE:
                continue  # released meanwhile: look again
            if current == holder:
                return True
            if refuses(registry, current, holder):  # type: ignore[arg-type]
                return False
            path.unlink()


def refuses(registry: State, current: Holder | None, holder: Holder) -> bool:
    """Whether a claim seen held by `current` is one `take` refuses `holder`: unreadable, or a live other's."""
    return current is None or (current != holder and not registry.is_gone(current))


def drop(path: Path, holder: Holder) -> None:
    """Remove the claim `path` if `holder` still holds it."""
    _remove_if(path, lambda current: current == holder)


def release(registry: State, where: Path, kind: Callable[[str], bool], name: str) -> None:
    """Drop the claims in `where` (of `kind`) that container `name` holds, but those held for it by a migration
    still arriving (a failed restore's: the migration may try again); call it before the name is freed (see the
    rule)."""
    for path, current in held(where, kind):
        if current is None or current.container != name:
            continue
        if current.migration is None or not registry.is_arriving(current.migration):
            drop(path, current)


def let_go(registry: State, where: Path, kind: Callable[[str], bool], migration: str) -> None:
    """Drop the claims in `where` (of `kind`) held for what `migration` brings that no one holds any longer (see the
    rule): its pre-flight and its receiver each call it as they end, so the last of them drops them."""
    for path, current in held(where, kind):
        if current is not None and current.migration == migration and registry.is_gone(current):
            drop_stale(registry, path)


def stale(registry: State, where: Path, kind: Callable[[str], bool]) -> list[Path]:
    """The claims in `where` (of `kind`) whose holder is gone, and claims a run that died left half written."""
    found = [path for path, current in held(where, kind) if current is not None and registry.is_gone(current)]
    return found + [path for path in sorted(where.glob(f"{TEMP}*")) if _writer_dead(path)]


def drop_stale(registry: State, path: Path) -> None:
    """Remove the claim (or half-written claim) `path` if it is still stale."""
    if path.name.startswith(TEMP):
        path.unlink(missing_ok=True)
    else:
        _remove_if(path, lambda current: current is not None and registry.is_gone(current))


def _remove_if(path: Path, should: Callable[[Holder | None], bool]) -> None:
    """Remove the claim `path` if it still is and `should(its holder)`."""
    with _locked(path) as current:
        if current is not _GONE and should(current):  # type: ignore[arg-type]
            path.unlink()


def _owner(data: bytes) -> Holder | None:
    try:
        fields = json.loads(data)
        container, migration = fields["container"], fields.get("migration")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(container, str) or not isinstance(migration, (str, type(None))):
        return None
    return Holder(container, migration)


def _create(path: Path, holder: Holder) -> bool:
    """Make the claim file `path` naming `holder`, whole; False if it exists."""
    return write_new(path, json.dumps(holder.to_dict()).encode())


def write_new(path: Path, data: bytes) -> bool:
    """Make the file `path` (root's, 0600) holding `data`, whole and exclusively: written aside, then linked
    (link(2) fails on an existing name as O_CREAT|O_EXCL does); False if it exists."""
    temp = path.parent / f"{TEMP}{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[object]:
    """Hold the flock of the claim `path` and yield its holder (None if unreadable), or _GONE if `path` was
    removed, or removed and made anew, before the lock was held. Every change of a claim that exists is
    made this way, so that what was seen of it is still true when it is acted on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield _GONE
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held only for a check and an unlink
        mine = os.fstat(fd)
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            yield _GONE
        else:
            yield _owner(os.pread(fd, 4096, 0))
    finally:
        os.close(fd)


def _writer_dead(temp: Path) -> bool:
    pid = temp.name.removeprefix(TEMP).split("-")[0]
    return pid.isdigit() and procs.start_time(int(pid)) is None
