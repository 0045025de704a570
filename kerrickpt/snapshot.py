"""Owns `snapshot`: under the container's lock, checkpoint it running into the store, publish, then prune."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kerrickpt import containers, garbage, keys, layerchain, logtail, rootfs, zstdframe
from kerrickpt.checkpoint import checkpoint
from kerrickpt.errors import UsageError
from kerrickpt.lock import Holder
from kerrickpt.retention import Plan, Policy
from kerrickpt.store import Snapshot, Store


@dataclass(frozen=True)
class SnapshotResult:
    """What one run did: the snapshot it published, what retention decided, what it cleaned up."""

    snapshot: Snapshot
    plan: Plan[Snapshot] | None
    duration_s: float
    took_over: Holder | None = None
    cleaned: list[Path] = field(default_factory=list)

    @property
    def removed(self) -> list[Snapshot]:
        return self.plan.removed if self.plan else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot.to_dict(),
            "kept": [s.id for s in self.plan.kept] if self.plan else None,
            "removed": [s.id for s in self.removed],
            "duration_s": round(self.duration_s, 4),
            "took_over_lock_of": self.took_over.to_dict() if self.took_over else None,
            "cleaned": [str(p) for p in self.cleaned],
        }


def snapshot(
    name: str | None,
    store: Store | Path | str,
    *,
    cgroup: Path | str | None = None,
    policy: Policy | None = None,
    wait: float = 0.0,
    state_dir: Path | str | None = None,
    level: int = zstdframe.DEFAULT_LEVEL,
    log_tail: int = logtail.DEFAULT_BYTES,
    key: keys.Key | None = None,
    encrypt: bool = False,
) -> SnapshotResult:
    """Snapshot container `name` (or the tree in `cgroup`, stored under its last path component).

    The container is frozen only while CRIU dumps it and keeps running whatever happens.
    The snapshot appears in the store complete and verified, or not at all; only then are
    older ones pruned by `policy` (no rule: nothing is pruned). A confined container's layer is
    carried whole, or only what changed since the last snapshot of it in this store (see layerchain).

    An encrypted store needs its `key`: missing or wrong, the run is refused before the container is touched
    (KeyUnusableError). `encrypt` asks for an encrypted store: a plain one is refused (UsageError), as a store's
    encryption is chosen once, by `snapshots init --encrypt`.
    """
    started = time.monotonic()
    if (name is None) == (cgroup is None):
        raise UsageError("give either a container name or --cgroup PATH")
    label = containers.check_name(name or Path(str(cgroup)).name)
    store = store if isinstance(store, Store) else Store(store, key)
    if encrypt and store.key_id is None:
        raise UsageError(
            f"{store.root} is not an encrypted store, and a store's encryption is chosen once, for the whole store: "
            "make an encrypted one with `kerrickpt snapshots init --store DIR --encrypt --key-file FILE` (on an empty "
            "directory) and snapshot into it"
        )
    if store.deduplicates:
        store.seal()  # an encrypted store's key, before anything is frozen or written
    policy = policy or Policy()
    source = f"container {name}" if name else f"cgroup {Path(str(cgroup)).resolve()}"
    with store.lock(label, wait=wait) as took_over:
        store.claim(label, source)
        cleaned = store.clean(label)
        # Images of runs that died (a cron job's run killed mid-way) would fill the disk run after run.
        registry = containers.Registry(state_dir)
        leftovers = garbage.collect(registry, kinds=(garbage.SCRATCH,))
        cleaned += [Path(leftover.path) for leftover in leftovers]
        where = rootfs.Layer.of(registry.path(name)) if name else None
        # A deduplicating store shares whatever the layer's tar has unchanged; a delta would only add a chain.
        base = layerchain.base_for(store, label, where) if where and not store.deduplicates else None
        with contextlib.ExitStack() as stack:
            # A deduplicating store cuts it into chunks as it is written, after the thaw: no archive is read back.
            intake = stack.enter_context(store.taking_in(label, level=level)) if store.deduplicates else None
            taken = checkpoint(
                name,
                intake.writer if intake else store.incoming(label),
                cgroup=cgroup,
                leave_running=True,
                state_dir=state_dir,
                level=level,
                log_tail=log_tail,
                layer_base=base,
            )
        published = intake.snapshot if intake else store.publish(label)
        assert published is not None  # a writer's commit published it, or raised
        if where and taken.layer_index and published.layer:
            carried = layerchain.Carried(published.layer["lineage"], str(store.root), published.id, taken.layer_index)
            layerchain.record(where, carried)
        plan = None
        if not policy.is_empty:
            plan = store.plan(label, policy)
            store.remove(plan.removed)
    return SnapshotResult(published, plan, time.monotonic() - started, took_over, cleaned)
