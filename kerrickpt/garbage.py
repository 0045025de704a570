"""Owns what kerrickpt processes that died left on this node: finding it, which changes nothing, and `gc`."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from kerrickpt import claims, containers, idranges, netlinks, network, postcopy, procs

CONTAINER, SCRATCH, POSTCOPY, MARKER = "container", "scratch", "post-copy", "marker"
ID_RANGE, NETWORK, PROBE = "id-range", "network", "probe"
KINDS = (POSTCOPY, CONTAINER, SCRATCH, ID_RANGE, NETWORK, PROBE, MARKER)


@dataclass(frozen=True)
class Leftover:
    """One thing a dead kerrickpt process left: what it is, where, and why it is garbage."""

    kind: str  # container (a name its run never registered), scratch, post-copy, marker, id-range, network or probe
    path: str
    why: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def find(registry: containers.Registry) -> list[Leftover]:
    """Everything `collect` would remove, in the order it would: nothing is changed."""
    found = [
        Leftover(POSTCOPY, str(record), "its watcher died while the memory came: its container is killed")
        for record in sorted(_incoming(registry, ".postcopy"))
        if (postcopy.outcome(registry, record.stem) or {}).get("state") == postcopy.ABANDONED
    ]
    found += [
        Leftover(CONTAINER, str(registry.path(name)), "its run died before registering it; what runs in it is killed")
        for name in registry.abandoned()
    ]
    found += [
        Leftover(SCRATCH, str(path), "the kerrickpt process it belonged to died")
        for path in sorted(registry.scratch.iterdir())
        if _scratch_owner_dead(path)
    ]
    found += [
        Leftover(ID_RANGE, str(claim), "its container is gone from this node: the range is free again")
        for claim in idranges.stale(registry)
    ]
    found += [
        Leftover(
            NETWORK,
            str(claim),
            "its container is gone from this node, or its migration here ended without it: the address or node port "
            "is free again",
        )
        for claim in network.stale(registry)
    ]
    found += [
        Leftover(PROBE, str(netlinks.NETNS_DIR / netns), "the `kerrickpt check` that probed with it died")
        for netns, pid, start in netlinks.probes()
        if not _prober_alive(pid, start)
    ]
    found += [
        Leftover(MARKER, str(marker), f"its {maker} died")
        for suffix, maker in ((".json", "receiver"), (containers.PREFLIGHT, "pre-flight"))
        for marker in sorted(_incoming(registry, suffix))
        if containers.claimant_alive(marker) is False
    ]
    return found


def collect(registry: containers.Registry, *, dry_run: bool = False, kinds: tuple[str, ...] = KINDS) -> list[Leftover]:
    """Remove what dead kerrickpt processes left (or, with `dry_run`, only say what): kill the container
    of a post-copy whose watcher died, then names never registered and their cgroups, scratch
    directories (memory images), the id range, address and node port claims of containers that are gone
    (after the names, whose removal frees theirs), the network namespaces of `kerrickpt check`s killed while they
    probed (of this node, whatever its state directory), and markers of receivers and pre-flights that died; only
    those of `kinds`."""
    found = [leftover for leftover in find(registry) if leftover.kind in kinds]
    if dry_run:
        return found
    for leftover in found:
        path = Path(leftover.path)
        if leftover.kind == POSTCOPY:
            postcopy.reap(registry, path.stem)
        elif leftover.kind == CONTAINER:
            containers.remove_if_abandoned(registry, path.name)  # found a while ago: looked at again, locked
        elif leftover.kind == SCRATCH:
            shutil.rmtree(path, ignore_errors=True)
        elif leftover.kind in (ID_RANGE, NETWORK):
            claims.drop_stale(registry, path)
        elif leftover.kind == PROBE:
            netlinks.remove_netns(path.name)
        else:  # a marker goes last: until then, the migration's status says what is left
            path.unlink(missing_ok=True)
    return found


def gc(state_dir: Path | str | None = None, *, dry_run: bool = False) -> list[Leftover]:
    """Remove what kerrickpt processes that died left on this node; returns what was (would be) removed."""
    return collect(containers.Registry(state_dir), dry_run=dry_run)


def _incoming(registry: containers.Registry, suffix: str) -> list[Path]:
    directory = registry.root / "incoming"
    return [p for p in directory.iterdir() if p.suffix == suffix] if directory.is_dir() else []


def _prober_alive(pid: int, start: int | None) -> bool:
    """Whether the process that made a probe namespace lives (see netlinks.probes)."""
    return procs.start_time(pid) is not None if start is None else procs.is_alive(pid, start)


def _scratch_owner_dead(path: Path) -> bool:
    """A scratch directory is its maker's (whose PID its name carries) unless another process claimed it."""
    alive = containers.claimant_alive(path / containers.OWNER)
    if alive is not None:
        return not alive
    if (path / containers.OWNER).exists():
        return False  # a claim being written right now
    owner = path.name.split("-")[1] if path.name.count("-") >= 2 else ""
    return owner.isdigit() and procs.start_time(int(owner)) is None
