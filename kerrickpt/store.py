"""Owns the snapshot store: per container, a directory of archives published whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from kerrickpt import (
    archive,
    archivewriter,
    chunks,
    containers,
    dedupstore,
    faults,
    keys,
    recipe,
    recipewriter,
    sources,
    storeseal,
    trust,
    zstdframe,
)
from kerrickpt.errors import (
    ArchiveCorruptError,
    ArchiveUnreadableError,
    ChunkDamagedError,
    DumpFailed,
    RecipeSealError,
    SnapshotNotFoundError,
    StoreUnreadableError,
    UsageError,
)
from kerrickpt.lock import Holder, held
from kerrickpt.manifest import Manifest, is_layer
from kerrickpt.retention import Plan, Policy, keep_bases

SUFFIX = ".kckpt"
META = ".meta"
LOCK = ".lock"
SOURCE = ".source"  # what the series is of: one container, or one cgroup by its path
INCOMING = ".incoming" + SUFFIX
# What a run that died may leave: its incoming archive, the archive Writer's partial file, a record half written.
TEMPORARY = (INCOMING, f".{INCOMING}.partial-*", f".*{META}.tmp-*", f".*{recipe.SUFFIX}{recipe.HIDDEN}")
STAMP = re.compile(r"\d{8}T\d{6}\.\d{3}Z")
META_FORMAT = "kerrickpt-snapshot-meta"
VERIFIED, UNVERIFIED, CORRUPT = "verified", "unverified", "corrupt"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One published snapshot of a container, as `snapshots list` shows it."""

    name: str
    path: Path
    time: datetime
    archive_bytes: int
    frozen_s: float | None
    node: str
    status: str
    checked: str | None = None
    error: str | None = None
    layer: dict[str, str] | None = None  # see Manifest.layer
    layer_base: dict[str, str] | None = None  # see Manifest.layer_base: set, it carries only what changed
    key: str | None = None  # the id of the key it is sealed with (its store's), None if plain

    @property
    def base(self) -> str | None:
        """The id of the snapshot whose layer this one's builds on; None if it carries its whole layer."""
        return self.layer_base["snapshot"] if self.layer_base else None

    @property
    def id(self) -> str:
        """Its time in UTC, e.g. 20250102T030405.678Z: the file name without `.kckpt` (or `.recipe`)."""
        return _id_of(self.path)

    @property
    def verified(self) -> bool:
        return self.status == VERIFIED

    @property
    def corrupt(self) -> bool:
        return self.status == CORRUPT

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "path": str(self.path),
            "time": self.time.isoformat(timespec="milliseconds"),
            "archive_bytes": self.archive_bytes,
            "frozen_s": self.frozen_s,
            "node": self.node,
            "status": self.status,
            "checked": self.checked,
            "error": self.error,
            "layer": self.layer,
            "layer_base": self.layer_base,
            "encrypted": self.key is not None,
            "key_id": self.key,
        }


@dataclass
class Intake:
    """A snapshot being taken into a deduplicating store (see Store.taking_in): a checkpoint writes it to `writer`;
    `snapshot` is what was published, once the writer's commit linked it in."""

    writer: recipewriter.Writer
    snapshot: Snapshot | None = None


def stamp(created: str) -> str:
    """A manifest's creation time as a snapshot id."""
    when = datetime.fromisoformat(created).astimezone(UTC)
    return when.strftime("%Y%m%dT%H%M%S.") + f"{when.microsecond // 1000:03d}Z"


def _id_of(path: Path) -> str:
    return path.name.rsplit(".", 1)[0]


def _time_of(path: Path) -> datetime:
    return datetime.fromisoformat(_id_of(path))


def _summary(
    name: str, path: Path, size: int, manifest: Manifest, status: str, checked: str | None, key: str | None
) -> Snapshot:
    node = manifest.source.hostname or f"{manifest.source.arch} {manifest.source.kernel}"
    frozen = manifest.timings.get("frozen_s")
    return Snapshot(
        name, path, _time_of(path), size, frozen, node, status, checked, None, manifest.layer, manifest.layer_base, key
    )


class Store:
    """A directory holding, per container, `ID.kckpt` archives, their `ID.meta` records and a lock.

    An archive appears under its final name only complete, fsynced and verified, and only
    runs holding the container's lock write into its directory, so whatever such a run
    leaves behind when it dies (hidden temporary files, an unmatched record) is removed
    by the next run, under the lock.
    """

    def __init__(self, root: Path | str, key: keys.Key | None = None) -> None:
        """Open the store at `root`, with `key` if it is encrypted: the wrong key is refused here (KeyUnusableError),
        a key for a store that says it is plain too (ArchiveCorruptError, see dedupstore.refuse_key); without one, only
        its listing can be read."""
        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise UsageError(f"snapshot store {self.root} is not a directory; create it first")
        # Root restores what it finds here: nobody else may have been able to put it there.
        trust.check_tree(self.root, "snapshot store")
        # A store of whole archives, or of recipes over chunks shared by all (see dedupstore); a newer one refused.
        self.marker = dedupstore.marker(self.root)
        self.deduplicates = self.marker is not None
        self.suffix = recipe.SUFFIX if self.deduplicates else SUFFIX
        self.key = key
        if self.marker is None:
            dedupstore.refuse_key(self.root, key)
        self._seal = self.marker.seal(key) if self.marker else storeseal.PLAIN_SEAL

    @classmethod
    def deduplicating(cls, root: Path | str, key: keys.Key | None = None) -> Store:
        """Make the empty store at `root` (an existing directory) a deduplicating one (see dedupstore), encrypted
        with `key` if given (see storeseal)."""
        store = cls(root)
        if store.deduplicates:
            raise UsageError(f"{store.root} is a deduplicating store already")
        if store.list():
            raise UsageError(f"{store.root} holds snapshots as whole archives; start the deduplicating store elsewhere")
        dedupstore.create(store.root, key)
        return cls(root, key)

    @property
    def key_id(self) -> str | None:
        """The id of the key an encrypted store is sealed with; None for a plain one."""
        return self.marker.key if self.marker else None

    def seal(self) -> storeseal.Seal:
        """How the store's content is sealed and read; KeyUnusableError if it is encrypted and no key was given."""
        if self._seal is None:
            assert self.marker is not None
            raise self.marker.needed()
        return self._seal

    def directory(self, name: str) -> Path:
        """Where the snapshots of container `name` live."""
        return self.root / containers.check_name(name)

    def _series(self, name: str) -> Path | None:
        """The directory of `name`'s snapshots, checked as the store was; None if there is none."""
        directory = self.directory(name)
        if not directory.is_dir():
            return None
        trust.check(directory, "snapshot series")
        return directory

    def names(self) -> list[str]:
        """The containers with a directory in the store."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and containers.NAME_PATTERN.fullmatch(p.name))

    def list(self, name: str | None = None) -> list[Snapshot]:
        """Published snapshots, per container oldest first; a snapshot removed meanwhile is left out."""
        found = []
        for container in [name] if name else self.names():
            directory = self._series(container)
            for path in self._published(directory) if directory else []:
                with contextlib.suppress(FileNotFoundError):
                    found.append(self._load(container, path))
        return found

    def _published(self, directory: Path) -> list[Path]:
        """The snapshots' files in the series `directory`, oldest first: those named by their time (no other)."""
        return sorted(path for path in directory.glob("*" + self.suffix) if STAMP.fullmatch(_id_of(path)))

    def at(self, name: str, when: datetime | None = None, *, allow_unverified: bool = False) -> Snapshot:
        """The newest verified snapshot taken at or before `when` (default: the latest) that can be restored: a
        snapshot that carries only what changed in its layer needs its whole chain (see `chain`). Without `when`,
        one whose chain is broken is passed over; with it, it is refused (an older one is not what was asked for).

        With `allow_unverified`, also one whose checksums no run has checked yet (copied in).
        """
        return self.restorable(name, when, allow_unverified=allow_unverified)[-1]

    def restorable(self, name: str, when: datetime | None = None, *, allow_unverified: bool = False) -> list[Snapshot]:
        """The snapshot `at` picks, with the chain a restore of it reads: the whole layer first, it last."""
        listed = self.list(name)
        series = {s.id: s for s in listed}
        taken = [s for s in listed if when is None or s.time <= when]
        usable = [s for s in taken if s.verified or (allow_unverified and not s.corrupt)]
        if when is not None and usable:
            return self.chain(usable[-1], series)
        for snap in reversed(usable):  # the newest whose chain holds
            with contextlib.suppress(SnapshotNotFoundError):
                return self.chain(snap, series)
        limit = f" taken at or before {when.isoformat()}" if when else ""
        unverified = [s.id for s in taken if s.status == UNVERIFIED]
        hint = f" (unverified: {', '.join(unverified)}; run `kerrickpt snapshots verify` or allow them)"
        raise SnapshotNotFoundError(f"no usable snapshot of {name}{limit} in {self.root}{hint if unverified else ''}")

    def chain(self, snap: Snapshot, series: dict[str, Snapshot] | None = None) -> list[Snapshot]:
        """The snapshots a restore of `snap` reads, the one with the whole layer first and `snap` last; `series`:
        its container's snapshots by id, if listed already.

        Raises SnapshotNotFoundError if one it builds on is gone, known corrupt, or not the layer it names.
        """
        if series is None:
            series = {s.id: s for s in self.list(snap.name)}
        found = [snap]
        while (wanted := found[-1].layer_base) is not None:
            top, below = found[-1], series.get(wanted["snapshot"])
            if below is None:
                why = "is gone from the store"
            elif below.corrupt:
                why = "is corrupt"
            elif below.time >= top.time or not is_layer(below.layer, wanted):
                why = "is not the layer it was taken on"
            else:
                found.append(below)
                continue
            raise SnapshotNotFoundError(
                f"snapshot {snap.id} of {snap.name} in {self.root} is not usable: it carries only what changed "
                f"in its file-system layer since snapshot {wanted['snapshot']}, which {why}"
            )
        return found[::-1]

    def broken(self, snapshots: list[Snapshot]) -> dict[Path, str]:
        """Of `snapshots`, those that cannot be restored for want of one they build on (by path), and why."""
        series: dict[str, dict[str, Snapshot]] = {}
        found = {}
        for snap in snapshots:
            if snap.name not in series:
                series[snap.name] = {s.id: s for s in self.list(snap.name)}
            try:
                self.chain(snap, series[snap.name])
            except SnapshotNotFoundError as exc:
                found[snap.path] = exc.message
        return found

    def latest(self, name: str) -> Snapshot:
        return self.at(name)

    def lock(self, name: str, *, wait: float = 0.0) -> contextlib.AbstractContextManager[Holder | None]:
        """The container's lock (see `lock.held`); creates its directory."""
        directory = self.directory(name)
        directory.mkdir(mode=0o700, exist_ok=True)
        trust.check(directory, "snapshot series")
        return held(directory / LOCK, wait=wait, what=f"the snapshots of {name} in {self.root}")

    def claim(self, name: str, source: str) -> None:
        """Tie the series `name` to what it snapshots; refuse another source under the same name.

        Two cgroups with the same last path component would otherwise share a series,
        and one's retention would prune the other's snapshots. Call with the lock held.
        """
        path = self.directory(name) / SOURCE
        try:
            held_by = path.read_text().strip()
        except FileNotFoundError:
            containers.write_atomic(path, source + "\n")
            return
        if held_by != source:
            raise UsageError(
                f"the snapshots named {name} in {self.root} are of {held_by}, not of {source}; "
                "use another store for it, or remove that series first"
            )

    def incoming(self, name: str) -> Path:
        """Where a run writes its archive before `publish`."""
        return self.directory(name) / INCOMING

    def clean(self, name: str) -> list[Path]:
        """Remove what runs that died left behind; call with the lock held."""
        directory = self.directory(name)
        archives = {_id_of(p) for p in directory.glob("*" + self.suffix)}
        leftovers = [
            p
            for p in sorted(directory.iterdir())
            if any(fnmatch(p.name, pattern) for pattern in TEMPORARY) or (p.suffix == META and p.stem not in archives)
        ]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def publish(self, name: str) -> Snapshot:
        """Verify the incoming archive of a store of whole archives, record it and link it in under its id; call with
        the lock held. (A deduplicating store takes a snapshot in as it is written: see `taking_in`.)"""
        incoming = self.incoming(name)
        try:
            manifest = archive.verify(incoming)
            final = self.directory(name) / f"{stamp(manifest.created)}{SUFFIX}"
            with self._placing(name, final, manifest, incoming, None) as snap:
                os.link(incoming, final)  # never over an existing file
            archivewriter.fsync_dir(final.parent)
        except OSError as exc:
            raise DumpFailed(f"publishing the snapshot of {name} in {self.root} failed: {exc}") from exc
        finally:
            incoming.unlink(missing_ok=True)
        return snap

    @contextlib.contextmanager
    def _placing(self, name: str, final: Path, manifest: Manifest, staged: Path, key: str | None) -> Iterator[Snapshot]:
        """Record the snapshot that `staged` becomes once the block links it in as `final` (never over a file); its
        record goes again if the block fails."""
        if final.exists():
            raise FileExistsError(errno.EEXIST, "a snapshot with this id exists already", str(final))
        size, mtime = _identity(staged)  # the link shares them
        snap = _summary(name, final, size, manifest, VERIFIED, containers.utc_now(), key)
        self._record(snap, mtime)
        faults.inject("store-before-link")
        try:
            yield snap
        except BaseException:
            _meta_path(final).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def taking_in(self, name: str, *, level: int = zstdframe.DEFAULT_LEVEL) -> Iterator[Intake]:
        """A deduplicating store's writer for a snapshot of `name` (see recipewriter): what a checkpoint writes to it
        is cut into chunks as it comes, the new ones compressed at zstd `level`; its commit records the snapshot and
        links it in (`Intake.snapshot`). Call with the lock held. An encrypted store's key is needed
        (KeyUnusableError), and its chunks' index must be whole (StoreDamagedError), before anything is written."""

        def final(manifest: Manifest) -> Path:
            return self.directory(name) / f"{stamp(manifest.created)}{recipe.SUFFIX}"

        @contextlib.contextmanager
        def place(path: Path, manifest: Manifest, staged: Path) -> Iterator[None]:
            with self._placing(name, path, manifest, staged, self.key_id) as snap:
                yield
            intake.snapshot = snap  # linked in

        published = self._published(self.directory(name))
        with self.chunks() as store, recipewriter.Writer(store, self.directory(name), final, place, level) as writer:
            writer.prepare(published[-1] if published else None)
            intake = Intake(writer)
            yield intake

    def chunks(self) -> chunks.Chunks:
        """The chunks of a deduplicating store, open (KeyUnusableError if it is encrypted and no key was given)."""
        return chunks.Chunks(self.root / chunks.DIRECTORY, seal=self.seal())

    def recipes(self) -> list[Path]:
        """Every recipe in a deduplicating store's folders, whatever its name (a restore reads any): what a sweep
        keeps. A folder that cannot be read raises StoreUnreadableError: a sweep that missed its recipes would
        free chunks they need."""
        found = []
        try:
            with os.scandir(self.root) as folders:
                for folder in folders:
                    if folder.is_dir(follow_symlinks=False):
                        with os.scandir(folder.path) as entries:
                            found += [Path(e.path) for e in entries if e.name.endswith(recipe.SUFFIX)]
        except OSError as exc:
            raise StoreUnreadableError(f"cannot list the recipes of {self.root}: {exc}") from exc
        return found

    def verify(self, name: str | None = None, *, wait: float = 0.0) -> list[Snapshot]:
        """Check every archive's checksums and record the verdict; a snapshot pruned meanwhile is left out.

        In a deduplicating store, a chunk found damaged is marked so in the index (see `Chunks.mark_damaged`: the
        next snapshot holding its content stores it again and heals every snapshot that needs it), and a warning
        names those snapshots. A failure of the store's index as a whole stops it, judging no snapshot.
        """
        seal = self.seal()  # an encrypted store's key, before anything is read
        checked = []
        damaged: set[int] = set()
        for snap in self.list(name):
            with contextlib.suppress(FileNotFoundError):
                before = _identity(snap.path)
                try:
                    with sources.opened(snap.path, key=self.key) as source:
                        manifest = source.extract(None)
                    now = _summary(
                        snap.name, snap.path, before[0], manifest, VERIFIED, containers.utc_now(), seal.key_id
                    )
                except StoreUnreadableError:
                    raise  # the store's index as a whole: no snapshot is judged by it
                except ArchiveUnreadableError as exc:
                    # An I/O error says nothing of the archive: record nothing, so no prune takes it for corrupt.
                    checked.append(replace(snap, error=exc.message))
                    continue
                except RecipeSealError as exc:
                    # Maybe only moved: refused, and unverified, but never corrupt, which a prune would remove.
                    now = replace(snap, status=UNVERIFIED, checked=containers.utc_now(), error=exc.message)
                except ChunkDamagedError as exc:
                    damaged |= self._mark_damaged(snap.path)
                    now = replace(snap, status=CORRUPT, checked=containers.utc_now(), error=exc.message)
                except ArchiveCorruptError as exc:
                    now = replace(snap, status=CORRUPT, checked=containers.utc_now(), error=exc.message)
                with self.lock(snap.name, wait=wait):
                    # Record only what was read: not an archive that was pruned or replaced meanwhile.
                    if _identity(snap.path) == before:
                        self._record(now, before[1])
                        checked.append(now)
        if damaged:
            needing = [p for p in self.recipes() if not damaged.isdisjoint(_ids_of(p, seal))]
            log.warning(
                "%d damaged chunk(s) found; %d snapshot(s) need them and are corrupt until a later snapshot holding "
                "the same content stores them again (run verify after it; a prune removes corrupt snapshots "
                "meanwhile): %s",
                len(damaged),
                len(needing),
                ", ".join(f"{p.parent.name} {_id_of(p)}" for p in needing),
            )
        return checked

    def _mark_damaged(self, path: Path) -> set[int]:
        """Mark every damaged chunk the recipe at `path` names as such (see `Chunks.mark_damaged`); their ids."""
        runs = [run for runs in recipe.read(path, self.seal()).files.values() for run in runs]
        with self.chunks() as store, store.lock(exclusive=False):
            found = store.damaged(runs)
            for chunk in found:
                store.mark_damaged(chunk)
        return set(found)

    def plan(self, name: str, policy: Policy, now: datetime | None = None) -> Plan[Snapshot]:
        """What `prune` would keep and remove, and why: the rules, and what a kept snapshot builds on."""
        series = self.list(name)
        by_id = {s.id: s for s in series}
        plan = policy.thin(series, now or datetime.now(UTC))
        return keep_bases(plan, lambda s: by_id.get(s.base) if s.base else None, lambda s: s.id)

    def remove(self, snapshots: list[Snapshot], *, sweep: bool = False) -> dedupstore.Swept | None:
        """Delete snapshots, archive first (a record without its archive is ignored); call with the lock held.

        In a deduplicating store, recipes first, then the chunks no recipe left names (see dedupstore.sweep): if
        any was removed, or with `sweep` (what a prune killed before its sweep left is freed by the next prune).
        An encrypted store's key is needed for that (KeyUnusableError before anything is removed).
        """
        if self.deduplicates:
            self.seal()
        self._delete(snapshots)
        if not self.deduplicates or not (snapshots or sweep):
            return None
        return self._sweep()

    def _delete(self, snapshots: list[Snapshot]) -> None:
        """Delete snapshots, archive first, and (in a deduplicating store) make that durable before any sweep."""
        corrupt = [s for s in snapshots if s.corrupt]
        if corrupt:
            # Many at once may share one damaged chunk in a deduplicating store: never without a word.
            log.warning(
                "removing %d snapshot(s) that verify found corrupt: %s",
                len(corrupt),
                "; ".join(f"{s.name} {s.id}: {s.error}" for s in corrupt),
            )
        for snap in snapshots:
            snap.path.unlink(missing_ok=True)
            _meta_path(snap.path).unlink(missing_ok=True)
        if self.deduplicates:
            for directory in {snap.path.parent for snap in snapshots}:
                archivewriter.fsync_dir(directory)

    def _sweep(self) -> dedupstore.Swept:
        """Free the chunks of a deduplicating store that no recipe names (see dedupstore.sweep); safe without a
        container's lock, for it holds the store's lock exclusive and reads every container's recipes."""
        faults.inject("store-before-sweep")
        with self.chunks() as store:
            return dedupstore.sweep(store, self.recipes)

    def prune(
        self,
        name: str | None,
        policy: Policy,
        *,
        now: datetime | None = None,
        dry_run: bool = False,
        wait: float = 0.0,
    ) -> dict[str, Plan[Snapshot]]:
        """Remove the snapshots of `name` (default: of every container) that no rule keeps.

        With `dry_run`, only say what would go and which rule keeps each of the others.
        """
        if policy.is_empty:
            raise UsageError("give at least one --keep-* rule; without one, prune would have nothing to go by")
        if self.deduplicates and not dry_run:
            self.seal()  # its sweep reads every recipe: an encrypted store's key, before anything is removed
        plans = {}
        try:
            for container in [name] if name else self.names():
                if dry_run:
                    plans[container] = self.plan(container, policy, now)
                    continue
                with self.lock(container, wait=wait):
                    plans[container] = self.plan(container, policy, now)
                    self._delete(plans[container].removed)
        finally:
            # Once for all the containers (a sweep reads every recipe of the store), and after a failure too: what
            # the containers before it gave up is freed, as when each container's removal swept.
            if plans and not dry_run and self.deduplicates:
                self._sweep()
        return plans

    def _load(self, name: str, path: Path) -> Snapshot:
        size, mtime = _identity(path)
        record = _read_meta(path)
        if record and record.get("archive_bytes") == size and record.get("archive_mtime_ns") == mtime:
            fields = ("frozen_s", "node", "status", "checked", "error", "layer", "layer_base")
            # The key is the store's: every snapshot in an encrypted store is sealed with it, or refused.
            return Snapshot(name, path, _time_of(path), size, **{k: record.get(k) for k in fields}, key=self.key_id)
        # No record that matches (an archive copied in, or changed since): read the manifest,
        # which shows that the archive is whole, not that its checksums hold.
        try:
            if self._seal is None:  # an encrypted store listed without its key: what the recipe shows unsealed
                shown = storeseal.listed(recipe.read_bytes(path), str(path))
                return Snapshot(
                    name, path, _time_of(path), size, shown.get("frozen_s"), shown.get("node") or "", UNVERIFIED,
                    key=self.key_id,
                )  # fmt: skip
            return _summary(name, path, size, self._manifest_of(path), UNVERIFIED, None, self.key_id)
        except ArchiveCorruptError as exc:
            # Unrecorded, so maybe still being copied in: only `verify` may call it corrupt (and so prunable).
            return Snapshot(name, path, _time_of(path), size, None, "", UNVERIFIED, None, exc.message, key=self.key_id)

    def _manifest_of(self, path: Path) -> Manifest:
        """A snapshot's manifest, read without reading its files."""
        if path.name.endswith(recipe.SUFFIX):
            return Manifest.from_json(recipe.read(path, self.seal()).manifest)
        return archive.read_manifest(path)

    def _record(self, snap: Snapshot, mtime: int) -> None:
        """Write the snapshot's record atomically; call with the lock held."""
        body = {"format": META_FORMAT, "version": 1, "archive_mtime_ns": mtime, **snap.to_dict()}
        del body["path"]
        containers.write_atomic(_meta_path(snap.path), json.dumps(body, indent=2))


def _ids_of(path: Path, seal: storeseal.Seal) -> set[int]:
    """The chunks a recipe names; none if it went meanwhile or cannot be read (verify says so for it)."""
    try:
        return recipe.read(path, seal).ids()
    except (FileNotFoundError, ArchiveCorruptError):
        return set()


def _meta_path(path: Path) -> Path:
    return path.with_name(_id_of(path) + META)


def _identity(path: Path) -> tuple[int, int]:
    """Size and modification time: a record that no longer matches them describes another file."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(_meta_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == META_FORMAT else None
