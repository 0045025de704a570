"""Owns which host id range each container on this node holds: claiming one no other container shares, and releasing it.

A claim is a file in STATE/idranges, `uid-BASE` or `gid-BASE`, naming its container: a container holds one
of each. It comes into being whole and exclusively (written aside, then link(2), which fails on an
existing name as O_CREAT|O_EXCL does), so two runs never hold one range, whatever their timing.

The rule for stale claims: a claim whose container has no directory (STATE/containers/NAME) is stale and
may be taken. `containers.run` and restore reserve the name (its directory) before they claim, and must
release the claims before they free the name: so a claim is never seen stale while its container is
alive, and a name reserved anew never inherits, nor loses, the claim of the container it was before.
Only a process that holds a claim file's flock, having seen that the name still leads to that very file,
removes it: two runs that both find a claim stale never remove each other's new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kerrickpt import containers, procs
from kerrickpt.confinement import RANGE
from kerrickpt.errors import ArchiveCorruptError, NoIdRangeError
from kerrickpt.idmap import Extent, IdMap
from kerrickpt.isolation import IdPool

if TYPE_CHECKING:
    from kerrickpt.containers import Registry

DIRECTORY = "idranges"
UID, GID = "uid", "gid"
USERNS_IMAGES = "userns-*.img"
_TEMP = ".claim-"  # a claim being written: .claim-PID-THREAD-N
_GONE = object()  # what _locked yields for a claim file that went


def claim(registry: Registry, name: str, pool: IdPool, prefer: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (uid_base, gid_base) of the host id range `name` holds, claimed now from `pool` unless it holds one.

    `prefer`, the range the container had on the node it comes from, is taken if it is a range of this
    pool and free; else the search starts at a place the name's hash gives, so that containers of other
    nodes, which prefer their ranges when they migrate here, rarely find theirs taken, and a container
    run again under its name gets its ids (and the files its volumes hold) back. The uid and the gid range
    are claimed each on its own: any free one of each serves.
    """
    directory = _directory(registry)
    claims = [(*_parse(path.name), path, owner) for path, owner in _claims(directory)]
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    uid_prefer, gid_prefer = prefer or (None, None)
    uid_base = _claim_one(registry, directory, claims, UID, pool.uids, start, uid_prefer, name)
    gid_base = None
    if uid_base is not None:
        gid_base = _claim_one(registry, directory, claims, GID, pool.gids, start, gid_prefer, name)
        if gid_base is None:
            _remove_if(directory / f"{UID}-{uid_base}", lambda owner: owner == name)
    if uid_base is None or gid_base is None:
        if not pool.ranges:
            raise NoIdRangeError(
                f"this node has no host id range to give container {name}'s users (pool: {pool.source}): give "
                "root ranges of 65536 ids in /etc/subuid and /etc/subgid, e.g. `root:1000000:6553600` in both"
            )
        raise NoIdRangeError(
            f"no free host id range for container {name}: containers on this node hold all {pool.ranges} of the "
            f"pool ({pool.source}); remove some (`kerrickpt ps`; `kerrickpt gc` frees those of containers that "
            f"are gone) or {pool.grow}"
        )
    kept = (directory / f"{UID}-{uid_base}", directory / f"{GID}-{gid_base}")
    for path, owner in _claims(directory):  # what a claim of `name` cut short left
        if owner == name and path not in kept:
            _remove_if(path, lambda current: current == name)
    return uid_base, gid_base


def _claim_one(
    registry: Registry,
    directory: Path,
    claims: list[tuple[str, int, Path, str | None]],
    kind: str,
    spans: tuple[tuple[int, int], ...],
    start: int,
    prefer: int | None,
    name: str,
) -> int | None:
    """Claim a `kind` range of `spans` for `name`: the one it holds, else `prefer`, else the first free one
    from the `start`-th on; None if none is free."""
    blocks = _blocks(spans)
    start %= len(blocks) or 1
    candidates = [base for kind_, base, _, owner in claims if kind_ == kind and owner == name]
    candidates += [prefer] if prefer in blocks else []
    for base in candidates + blocks[start:] + blocks[:start]:
        if _free(registry, claims, kind, base, name) and _take(registry, directory / f"{kind}-{base}", name):
            return base
    return None


def take(registry: Registry, path: Path, name: str) -> bool:
    """Make the claim file `path` (in a directory of STATE other than this module's) `name`'s, under this module's
    rule for stale claims and by its means; False if another container holds it. What network claims use."""
    return _take(registry, path, name)


def drop(path: Path, name: str) -> None:
    """Remove the claim file `path` if `name` still holds it."""
    _remove_if(path, lambda owner: owner == name)


def owner(path: Path) -> str | None:
    """The container the claim file `path` names; None if there is none (or it is unreadable)."""
    with contextlib.suppress(FileNotFoundError):
        return _owner(path.read_bytes())
    return None


def release(registry: Registry, name: str) -> None:
    """Drop the claims of `name`, if it has any; call it before the name is freed (see the module's rule)."""
    for path, owner in _claims(_directory(registry)):
        if owner == name:
            _remove_if(path, lambda current: current == name)


def held(registry: Registry) -> dict[str, tuple[int, int]]:
    """The (uid_base, gid_base) each container of this node holds, by name (stale claims included: see `stale`)."""
    return _pairs([(*_parse(path.name), path, owner) for path, owner in _claims(_directory(registry))])


def stale(registry: Registry) -> list[Path]:
    """Claims whose container is gone, and claims a run that died left half written: what `gc` removes."""
    directory = _directory(registry)
    found = [path for path, owner in _claims(directory) if owner is not None and _is_stale(registry, owner)]
    return found + [path for path in sorted(directory.glob(f"{_TEMP}*")) if _writer_dead(path)]


def drop_stale(registry: Registry, path: Path) -> None:
    """Remove the claim (or half-written claim) `path` if it is still stale."""
    if path.name.startswith(_TEMP):
        path.unlink(missing_ok=True)
    else:
        _remove_if(path, lambda owner: owner is not None and _is_stale(registry, owner))


def _directory(registry: Registry) -> Path:
    return claims_directory(registry, DIRECTORY)


def claims_directory(registry: Registry, name: str) -> Path:
    """STATE/`name`, a private directory of claim files, made if missing."""
    directory = registry.root / name
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # whatever the umask
    return directory


def _blocks(spans: tuple[tuple[int, int], ...]) -> list[int]:
    """The first ids of the whole ranges in `spans` (id_pool's spans hold whole ranges only)."""
    return [start for first, count in spans for start in range(first, first + count - RANGE + 1, RANGE)]


def _pairs(claims: list[tuple[str, int, Path, str | None]]) -> dict[str, tuple[int, int]]:
    """The (uid_base, gid_base) of each container that holds both."""
    uids = {owner: base for kind, base, _, owner in claims if kind == UID and owner is not None}
    gids = {owner: base for kind, base, _, owner in claims if kind == GID and owner is not None}
    return {name: (uids[name], gids[name]) for name in sorted(uids) if name in gids}


def _parse(filename: str) -> tuple[str, int]:
    kind, _, base = filename.partition("-")
    return kind, int(base)


def _claims(directory: Path) -> Iterator[tuple[Path, str | None]]:
    """Each claim file and the container it names (None if unreadable: never taken as stale)."""
    for path in sorted(directory.iterdir()):
        kind, _, base = path.name.partition("-")
        if kind in (UID, GID) and base.isdigit():
            with contextlib.suppress(FileNotFoundError):  # released meanwhile
                yield path, _owner(path.read_bytes())


def _owner(data: bytes) -> str | None:
    try:
        owner = json.loads(data)["container"]
    except (ValueError, KeyError, TypeError):
        return None
    # A name that is not a container's could lead anywhere as a path: such a claim is never stale.
    return owner if isinstance(owner, str) and containers.NAME_PATTERN.fullmatch(owner) else None


def _is_stale(registry: Registry, owner: str) -> bool:
    return not (registry.containers / owner).is_dir()


def _free(registry: Registry, claims: list[tuple[str, int, Path, str | None]], kind: str, base: int, name: str) -> bool:
    """Whether, as `claims` were, no other container's live claim overlaps the `kind` range at `base`. A stale
    claim overlapping it without being it (made while /etc/subuid cut the pool differently) goes now."""
    for other_kind, other, path, owner in claims:
        if other_kind != kind or abs(other - base) >= RANGE or owner == name:
            continue
        if owner is None or not _is_stale(registry, owner):
            return False
        if other != base:  # one at `base` itself is taken over by _take
            _remove_if(path, lambda current: current is not None and _is_stale(registry, current))
    return True


def _take(registry: Registry, path: Path, name: str) -> bool:
    """Make the claim `path` `name`'s (or find it is already), taking it over from a container that is gone;
    False if another container holds it."""
    while True:
        if _create(path, name):
            return True
        with _locked(path) as owner:
            if owner is _GONE:
                continue  # released meanwhile: look again
            if owner == name:
                return True
            if owner is None or not _is_stale(registry, owner):
                return False
            path.unlink()


def _create(path: Path, name: str) -> bool:
    """Make the claim file `path` naming `name`, whole; False if it exists."""
    temp = path.parent / f"{_TEMP}{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"container": name}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    return True


def _remove_if(path: Path, should: Callable[[str | None], bool]) -> None:
    """Remove the claim `path` if it still is and `should(its container)`."""
    with _locked(path) as owner:
        if owner is not _GONE and should(owner):
            path.unlink()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[object]:
    """Hold the flock of the claim `path` and yield its container (None if unreadable), or _GONE if `path` was
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
    pid = temp.name.removeprefix(_TEMP).split("-")[0]
    return pid.isdigit() and procs.start_time(int(pid)) is None


def remap_images(images_dir: Path, archived: IdMap, restored: IdMap) -> bool:
    """Give the user namespaces CRIU dumped in `images_dir` (userns-*.img) the map `restored` (see `remap`); each
    changed image is replaced whole, root's and 0600. Whether anything changed."""
    paths = {path.name: path for path in sorted(images_dir.glob(USERNS_IMAGES))}
    changed = remap({name: path.read_bytes() for name, path in paths.items()}, archived, restored)
    for name, data in changed.items():
        containers.write_atomic(paths[name], data)  # 0600, root's: a restore shares it with the container's root
    return bool(changed)


def remap(userns: Mapping[str, bytes], archived: IdMap, restored: IdMap) -> dict[str, bytes]:
    """User-namespace images (name -> bytes) given the map `restored` in place of `archived`, the map of the
    confinement the archive records (what a restore for a user checks): an image that maps anything else is
    refused (ArchiveCorruptError), for it is that map, not the recorded one, that CRIU would give the
    restored processes. The images that changed, as their new bytes."""
    from pycriu import images  # imported late, as in criu.py: `kerrickpt check` must work without it

    loaded = {name: _load(images, name, data) for name, data in userns.items()}
    for name, image in loaded.items():
        for entry in image["entries"]:
            for key, extents in (("uid_map", archived.uids), ("gid_map", archived.gids)):
                if _extents(entry.get(key, [])) != sorted(extents):
                    raise ArchiveCorruptError(
                        f"CRIU image {name} maps the container's {key.removesuffix('_map')}s otherwise than its "
                        "recorded confinement: it is not restored"
                    )
    if archived == restored:
        return {}
    changed = {}
    for name, image in loaded.items():
        for entry in image["entries"]:
            for key, extents in (("uid_map", restored.uids), ("gid_map", restored.gids)):
                entry[key] = [{"first": first, "lower_first": lower, "count": count} for first, lower, count in extents]
        out = io.BytesIO()
        images.dump(image, out)
        changed[name] = out.getvalue()
    return changed


def _extents(found: list[dict[str, int]]) -> list[Extent]:
    """An image's map as extents, in order (CRIU's images leave out fields that are 0)."""
    return sorted((e.get("first", 0), e.get("lower_first", 0), e.get("count", 0)) for e in found)


def _load(images: Any, name: str, data: bytes) -> dict[str, Any]:
    from google.protobuf.message import DecodeError

    try:
        return images.load(io.BytesIO(data))
    except (images.MagicException, struct.error, DecodeError, KeyError) as exc:
        raise ArchiveCorruptError(f"CRIU image {name} is unreadable: {exc!r}") from None
