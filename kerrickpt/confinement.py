"""Owns what confines a container with its own root and users: its root, host id range, user, volumes, environment
and working directory, as its record and its archive keep them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

HOST_ROOT = "host"  # --rootfs host: an overlay of the node's own root file system


@dataclass(frozen=True)
class Volume:
    """A host path bind-mounted into the container; it does not travel (shared storage by definition)."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Confinement:
    """A container's own root, users and mounts. `rootfs` is the overlay's read-only lower layer: HOST_ROOT
    or an absolute directory; the writable layer lives in the container's state. Container ids 0..ids-1
    are host ids uid_base.. and gid_base..; the command runs as `uid`:`gid` inside."""

    rootfs: str
    uid_base: int
    gid_base: int
    ids: int = 65536
    uid: int = 0
    gid: int = 0
    volumes: tuple[Volume, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Confinement:
        fields = dict(data)
        fields["volumes"] = tuple(Volume(**v) for v in data.get("volumes", ()))
        return cls(**fields)
