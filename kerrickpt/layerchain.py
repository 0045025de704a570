"""Owns chains of file-system layers in a snapshot store: which snapshot last carried a container's layer, whether
the next one may carry only what changed since, and the layers a restore lays one over the other."""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerrickpt import archive, containers, layer, rootfs
from kerrickpt.errors import ArchiveCorruptError, SnapshotNotFoundError, UsageError
from kerrickpt.manifest import Manifest, is_layer
from kerrickpt.store import Snapshot, Store

# Deltas on one whole layer at most. A restore reads every archive of the chain, and one archive lost or corrupt
# loses every snapshot built on it: past this many, a snapshot carries its whole layer again.
MAX_DELTAS = 16
RECORD = "index.json"  # in the layer's directory, beside upper/ and work/
RECORD_FORMAT = "kerrickpt-layer-index"


@dataclass(frozen=True)
class Carried:
    """A container's layer as the last snapshot that carried it saw it."""

    lineage: str
    store: str  # the store's directory
    snapshot: str  # the snapshot's id there
    index: layer.Index

    def as_base(self) -> dict[str, str]:
        """What a delta on this snapshot records of it (Manifest.layer_base)."""
        return {"snapshot": self.snapshot, "lineage": self.lineage, "index": self.index.digest}


def identity(lineage: str, index: layer.Index) -> dict[str, str]:
    """What an archive records of the layer it carries (Manifest.layer)."""
    return {"lineage": lineage, "index": index.digest}


def record(where: rootfs.Layer, carried: Carried) -> None:
    """Keep, in the container's state, the layer as the snapshot just published carried it; written whole or not
    at all (a record left behind by a crash names an older snapshot, against which a delta is as right)."""
    body = {
        "format": RECORD_FORMAT,
        "lineage": carried.lineage,
        "store": carried.store,
        "snapshot": carried.snapshot,
        "entries": carried.index.entries,
    }
    with contextlib.suppress(FileNotFoundError):  # the container ended meanwhile: its layer is gone
        containers.write_atomic(where.root / RECORD, json.dumps(body, separators=(",", ":")))


def recorded(where: rootfs.Layer) -> Carried | None:
    """The record `record` kept; None if there is none or it is unreadable (the next snapshot is then whole)."""
    try:
        body: Any = json.loads((where.root / RECORD).read_text())
        if body.get("format") == RECORD_FORMAT and isinstance(body.get("entries"), dict):
            index = layer.Index(body["entries"])
            return Carried(str(body["lineage"]), str(body["store"]), str(body["snapshot"]), index)
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    return None


def base_for(store: Store, name: str, where: rootfs.Layer) -> Carried | None:
    """The snapshot in `store` the next snapshot of container `name` may carry only its changes against: the one
    that last carried this very layer, if it is still there, whole, usable and at most MAX_DELTAS - 1 deltas above
    a whole layer. None: carry the whole layer."""
    lineage = where.lineage
    last = recorded(where)
    if lineage is None or last is None or last.lineage != lineage or last.store != str(store.root):
        return None
    snap = next((s for s in store.list(name) if s.id == last.snapshot), None)
    if snap is None or snap.corrupt or snap.layer != identity(lineage, last.index):
        return None
    try:
        chain = store.chain(snap)
    except SnapshotNotFoundError:
        return None
    return last if len(chain) <= MAX_DELTAS else None


@dataclass(frozen=True)
class Delta:
    """One layer of a chain, as unpacked for a restore: its tar, and the names it removes from its base."""

    tar: Path
    removed: list[str]


def gather(top: Manifest, bases: list[Path], scratch: Path) -> list[Delta]:
    """The layers a restore of `top` (unpacked in `scratch`) lays one over the other, from the whole one up to
    `top`'s: those under it unpacked from the archives `bases` (the chain a store resolved, whole one first)
    into `scratch`, every checksum verified, each the very layer the one above names as its base. Raises
    UsageError for a delta without its chain, ArchiveCorruptError for a chain that does not hold together."""
    own = Delta(scratch / layer.MEMBER, _removed(top, scratch))
    if top.layer_base is None:
        return [own]
    if not bases:
        raise UsageError(
            f"the archive of {top.name} carries only what changed in its file-system layer since snapshot "
            f"{top.layer_base['snapshot']}: restore it from its store, with that snapshot in it "
            "(`kerrickpt restore --store DIR NAME --at TIME`)"
        )
    layers: list[tuple[Manifest, Path]] = []
    for number, path in enumerate(bases):
        into = scratch / f"base-{number}"
        into.mkdir(mode=0o700)
        with (into / layer.MEMBER).open("wb") as tar, (into / layer.REMOVED).open("wb") as removed:
            keep = functools.partial(_keep, {layer.MEMBER: tar, layer.REMOVED: removed})
            try:
                manifest = archive.extract(path, None, keep)
            except FileNotFoundError as exc:
                raise ArchiveCorruptError(f"the snapshot {path}, a base of {top.name}'s, is gone") from exc
        layers.append((manifest, into))
    for (below, _), (above, _) in zip(layers, [*layers[1:], (top, scratch)], strict=True):
        wanted = above.layer_base
        if not is_layer(below.layer, wanted):
            raise ArchiveCorruptError(
                f"the snapshot of {above.name} taken {above.created} was not taken on the file-system layer of the "
                f"one taken {below.created}: this chain of snapshots does not hold together"
            )
    if layers[0][0].layer_base is not None:
        raise ArchiveCorruptError(f"the chain of snapshots under {top.name}'s does not start with a whole layer")
    return [*(Delta(into / layer.MEMBER, _removed(manifest, into)) for manifest, into in layers), own]


def _keep(outputs: dict[str, Any], name: str, data: memoryview) -> None:
    if name in outputs:
        outputs[name].write(data)


def _removed(manifest: Manifest, into: Path) -> list[str]:
    return layer.read_removed(into / layer.REMOVED) if manifest.layer_base else []


def describe(snap: Snapshot) -> str:
    """How `snapshots list` says what a snapshot's layer is."""
    return f"delta on {snap.base}" if snap.base else "whole"
