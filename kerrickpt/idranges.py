"""Owns which host id range each container on this node holds: claiming one no other container shares, and releasing it.

A claim is a file in STATE/idranges, `uid-BASE` or `gid-BASE`, naming its container (see claims, whose rule
for stale claims it follows): a container holds one of each.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kerrickpt import claims, containers
from kerrickpt.confinement import RANGE
from kerrickpt.errors import ArchiveCorruptError, NoIdRangeError
from kerrickpt.idmap import Extent, IdMap
from kerrickpt.isolation import IdPool

if TYPE_CHECKING:
    from kerrickpt.containers import Registry

DIRECTORY = "idranges"
UID, GID = "uid", "gid"
USERNS_IMAGES = "userns-*.img"


def claim(registry: Registry, name: str, pool: IdPool, prefer: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (uid_base, gid_base) of the host id range `name` holds, claimed now from `pool` unless it holds one.

    `prefer`, the range the container had on the node it comes from, is taken if it is a range of this
    pool and free; else the search starts at a place the name's hash gives, so that containers of other
    nodes, which prefer their ranges when they migrate here, rarely find theirs taken, and a container
    run again under its name gets its ids (and the files its volumes hold) back. The uid and the gid range
    are claimed each on its own: any free one of each serves.
    """
    directory = _directory(registry)
    me = claims.Holder(name)
    seen = [(*_parse(path.name), path, owner) for path, owner in _claims(directory)]
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    uid_prefer, gid_prefer = prefer or (None, None)
    uid_base = _claim_one(registry, directory, seen, UID, pool.uids, start, uid_prefer, me)
    gid_base = None
    if uid_base is not None:
        gid_base = _claim_one(registry, directory, seen, GID, pool.gids, start, gid_prefer, me)
        if gid_base is None:
            claims.drop(directory / f"{UID}-{uid_base}", me)
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
        if owner == me and path not in kept:
            claims.drop(path, me)
    return uid_base, gid_base


def _claim_one(
    registry: Registry,
    directory: Path,
    seen: list[tuple[str, int, Path, claims.Holder | None]],
    kind: str,
    spans: tuple[tuple[int, int], ...],
    start: int,
    prefer: int | None,
    me: claims.Holder,
) -> int | None:
    """Claim a `kind` range of `spans` for `me`: the one it holds, else `prefer`, else the first free one
    from the `start`-th on; None if none is free."""
    blocks = _blocks(spans)
    start %= len(blocks) or 1
    candidates = [base for kind_, base, _, owner in seen if kind_ == kind and owner == me]
    candidates += [prefer] if prefer in blocks else []
    for base in candidates + blocks[start:] + blocks[:start]:
        if _free(registry, seen, kind, base, me) and claims.take(registry, directory / f"{kind}-{base}", me):
            return base
    return None


def release(registry: Registry, name: str) -> None:
    """Drop the claims of `name`, if it has any; call it before the name is freed (see claims' rule)."""
    claims.release(registry, _directory(registry), _is_range, name)


def held(registry: Registry) -> dict[str, tuple[int, int]]:
    """The (uid_base, gid_base) each container of this node holds, by name (stale claims included: see `stale`)."""
    return _pairs([(*_parse(path.name), path, owner) for path, owner in _claims(_directory(registry))])


def stale(registry: Registry) -> list[Path]:
    """Claims whose container is gone, and claims a run that died left half written: what `gc` removes."""
    return claims.stale(registry, _directory(registry), _is_range)


def _directory(registry: Registry) -> Path:
    return claims.directory(registry, DIRECTORY)


def _blocks(spans: tuple[tuple[int, int], ...]) -> list[int]:
    """The first ids of the whole ranges in `spans` (id_pool's spans hold whole ranges only)."""
    return [start for first, count in spans for start in range(first, first + count - RANGE + 1, RANGE)]


def _pairs(seen: list[tuple[str, int, Path, claims.Holder | None]]) -> dict[str, tuple[int, int]]:
    """The (uid_base, gid_base) of each container that holds both."""
    uids = {owner.container: base for kind, base, _, owner in seen if kind == UID and owner is not None}
    gids = {owner.container: base for kind, base, _, owner in seen if kind == GID and owner is not None}
    return {name: (uids[name], gids[name]) for name in sorted(uids) if name in gids}


def _parse(filename: str) -> tuple[str, int]:
    kind, _, base = filename.partition("-")
    return kind, int(base)


def _is_range(filename: str) -> bool:
    kind, _, base = filename.partition("-")
    return kind in (UID, GID) and base.isdigit()


def _claims(directory: Path) -> Iterator[tuple[Path, claims.Holder | None]]:
    return claims.held(directory, _is_range)


def _free(
    registry: Registry, seen: list[tuple[str, int, Path, claims.Holder | None]], kind: str, base: int, me: claims.Holder
) -> bool:
    """Whether, as `seen` were, no other container's live claim overlaps the `kind` range at `base`. A stale
    claim overlapping it without being it (made while /etc/subuid cut the pool differently) goes now."""
    for other_kind, other, path, owner in seen:
        if other_kind != kind or abs(other - base) >= RANGE or owner == me:
            continue
        if claims.refuses(registry, owner, me):
            return False
        if other != base:  # one at `base` itself is taken over by _take
            claims.drop_stale(registry, path)
    return True


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
