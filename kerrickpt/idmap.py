"""Owns a container's id map: which host uid and gid each of its ids is, as the extents of the kernel's uid_map
and gid_map, and the translations either way."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kerrickpt.errors import NoIdRangeError, UsageError

# (first container id, first host id, count): one line of /proc/PID/uid_map.
Extent = tuple[int, int, int]
# Host ids below are the node's own (its system's and its users'): no container's range starts there.
LOWEST = 65536
LAST = (1 << 32) - 2  # the last host id: (1 << 32) - 1 is (uid_t) -1, no one's, and no map may name it
# What the kernel takes in one uid_map or gid_map (user_namespaces(7)): 340 lines, a write of less than a page.
MAX_EXTENTS = 340
MAX_BYTES = 4095


@dataclass(frozen=True)
class IdMap:
    """The uid and gid extents of a container's user namespace, none overlapping another on either side."""

    uids: tuple[Extent, ...]
    gids: tuple[Extent, ...]

    def __post_init__(self) -> None:
        for kind, extents in (("uid", self.uids), ("gid", self.gids)):
            size = len(text(extents).encode())
            if len(extents) > MAX_EXTENTS or size > MAX_BYTES:
                raise UsageError(
                    f"the container's {kind} map would have {len(extents)} lines ({size} bytes), more than the kernel "
                    f"takes ({MAX_EXTENTS} lines, {MAX_BYTES} bytes): its user is in too many groups to keep them all"
                )

    @classmethod
    def shifted(cls, uid_base: int, gid_base: int, count: int) -> IdMap:
        """Container ids 0..count-1 are host ids from uid_base and from gid_base."""
        return cls(((0, uid_base, count),), ((0, gid_base, count),))

    @classmethod
    def keeping(cls, uid_base: int, gid_base: int, count: int, uids: Iterable[int], gids: Iterable[int]) -> IdMap:
        """As `shifted`, but each of `uids` and `gids` (never 0: the container's root stays its own) is the host's
        own id, mapped to itself; the container ids of the range they stand on map to nothing. NoIdRangeError if
        a range starts below LOWEST (its root would be a host id of the node's own) or holds one of those ids."""
        return cls(_keeping(uid_base, count, uids, "uid"), _keeping(gid_base, count, gids, "gid"))

    def to_dict(self) -> dict[str, list[list[int]]]:
        return {"uids": [list(e) for e in self.uids], "gids": [list(e) for e in self.gids]}

    @classmethod
    def from_dict(cls, data: dict[str, list[list[int]]]) -> IdMap:
        uids, gids = (tuple((int(a), int(b), int(c)) for a, b, c in data[kind]) for kind in ("uids", "gids"))
        return cls(uids, gids)

    @property
    def root(self) -> tuple[int, int]:
        """The host uid and gid of the container's root, which every map has (see keeping)."""
        uid, gid = self.host_uid(0), self.host_gid(0)
        assert uid is not None and gid is not None
        return uid, gid

    def host_uid(self, uid: int) -> int | None:
        """The host uid of container uid `uid`; None if the container has no such id."""
        return _through(self.uids, uid, inward=False)

    def host_gid(self, gid: int) -> int | None:
        return _through(self.gids, gid, inward=False)

    def container_uid(self, uid: int) -> int | None:
        """The container uid host uid `uid` is; None if it is none of the container's."""
        return _through(self.uids, uid, inward=True)

    def container_gid(self, gid: int) -> int | None:
        return _through(self.gids, gid, inward=True)


def text(extents: tuple[Extent, ...]) -> str:
    """`extents` as uid_map or gid_map takes them, in one write (the kernel takes no second)."""
    return "".join(f"{first} {lower} {count}\n" for first, lower, count in extents)


def _keeping(base: int, count: int, own: Iterable[int], kind: str) -> tuple[Extent, ...]:
    if base < LOWEST:
        raise NoIdRangeError(
            f"the container's {kind} range starts at host {kind} {base}, one of the node's own: its root would be "
            f"a host user's; ranges start at {LOWEST} or above"
        )
    kept = sorted(set(own) - {0})
    clash = [host for host in kept if base <= host < base + count]
    if clash:
        raise NoIdRangeError(
            f"host {kind} {clash[0]}, a user's own, lies in the id range at {base} this node gives containers: "
            "/etc/subuid and /etc/subgid must give root ranges that hold no user's ids"
        )
    extents: list[Extent] = []
    start = 0
    for host in [h for h in kept if h < count] + [count]:
        if host > start:
            extents.append((start, base + start, host - start))
        start = host + 1
    identity: list[Extent] = []
    for host in kept:  # a run of consecutive ids is one extent: the kernel takes 340 at most
        first, _, length = identity[-1] if identity else (0, 0, 0)
        if identity and first + length == host:
            identity[-1] = (first, first, length + 1)
        else:
            identity.append((host, host, 1))
    extents += identity
    return tuple(sorted(extents))


def _through(extents: tuple[Extent, ...], value: int, *, inward: bool) -> int | None:
    for first, lower, count in extents:
        start, end = (lower, first) if inward else (first, lower)
        if start <= value < start + count:
            return end + value - start
    return None
