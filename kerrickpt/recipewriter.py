"""Owns writing a snapshot into a deduplicating store: files cut into chunks as they come, the recipe linked in last."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import logging
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kerrickpt import archivewriter, chunks, faults, pagehash, progress, recipe
from kerrickpt.errors import ArchiveCorruptError, BusyError, KerrickptError
from kerrickpt.manifest import Manifest, Member

# Cut and handed on at a time: enough for every thread to hash and compress a share.
ADD_BYTES = 8 << 20

log = logging.getLogger(__name__)

Place = Callable[[Path, Manifest, Path], contextlib.AbstractContextManager[None]]


class Writer(archivewriter.Target):
    """A snapshot written into a deduplicating store's open `store` of chunks (see store.Store.taking_in), as a
    checkpoint writes an archive: each file cut into chunks at its own offsets as it comes (CRIU's pages stay
    page-aligned), only the chunks the store lacks compressed (at zstd `level`) into a new pack, each file's size and
    checksum taken as an archive's are. `commit` puts the new chunks in the index, stages the recipe in `directory`
    (sealed, in an encrypted store, to the path `final` gives), and links it in there inside `place` (given that
    path, the manifest and the staged recipe, whose size and time the snapshot has): a context that records it, and
    undoes that if the link fails.

    The chunk lock is held shared from `prepare` (before the freeze) to the block's end, so no sweep frees a chunk it
    shares meanwhile; whatever a run that dies leaves (a hidden pack, chunks no recipe names, a hidden recipe) is never
    a snapshot. The chunks it shares with older snapshots are taken on the index's word, as borg and restic take theirs
    (`verify` finds damage in them and marks it, and the next snapshot holding the content stores it again); the new
    ones are read back and checked before the recipe names them, so a snapshot is recorded verified only once what it
    wrote reads back right, and none it shares was marked damaged since it looked it up.
    """

    errors = (ArchiveCorruptError, BusyError)  # the store's, as a snapshot's publishing raised them

    def __init__(
        self, store: chunks.Chunks, directory: Path, final: Callable[[Manifest], Path], place: Place, level: int
    ) -> None:
        super().__init__(level)
        self.store = store
        self.directory = directory
        self.final = final
        self.place = place
        self.pending: dict[str, archivewriter.Held] = {}  # each open file's bytes not cut yet: under ADD_BYTES
        self.refs: dict[str, array[int]] = {}  # each file's chunks, as Adding.add gives them
        self.addresses: dict[str, Any] = {}  # each file's chunk addresses, hashed (sha256) in order
        self.path: Path | None = None  # the recipe, once committed
        self.stack = contextlib.ExitStack()
        self._adding: chunks.Adding | None = None
        self.finding: concurrent.futures.Future[dict[bytes, int]] | None = None  # see `prepare`
        self.known: dict[bytes, int] | None = None
        self.hashing: pagehash.Hashing | None = None  # see `hashing_ahead`
        self.progress = progress.current()  # here: bytes may come from the streamer's thread

    def prepare(self, last: Path | None) -> None:
        """Take the chunk lock shared, before the freeze, and start finding the chunks of `last`, the recipe of the
        container's newest snapshot (if any), on another thread while the checkpoint takes its reserve (`ready` waits
        for them): the lock is held to the block's end, so that no sweep frees them before the recipe names them."""
        self.stack.enter_context(self.store.lock(exclusive=False))
        self.finding = self.store.pool.submit(self._previous, last)

    def ready(self) -> None:
        if self.known is None:
            assert self.finding is not None, "prepare first"
            self.known = self.finding.result()

    def __exit__(self, *exc: object) -> None:
        if self.finding is not None:
            self.finding.cancel()  # a run that failed before it began waits for no table walk
        self.stack.close()

    def _previous(self, last: Path | None) -> dict[bytes, int]:
        """The address and id of each chunk of the recipe `last` that the index holds whole: most of a snapshot's
        pages are the last one's, and finding them by their ids costs a quarter of looking each up by its address
        after the thaw. Empty if there is none, or it does not read (each of this run's chunks is then looked up)."""
        if last is None:
            return {}
        try:
            runs = recipe.read(last, self.store.seal).files.values()
        except (KerrickptError, OSError) as exc:
            log.info("the chunks of %s are looked up one by one: %s", last, exc)
            return {}
        return self.store.known(itertools.chain.from_iterable(runs))

    @property
    def linking(self) -> None:
        return None  # a recipe's name comes with its manifest, at the end: a snapshot thaws before it is written

    @property
    def adding(self) -> chunks.Adding:
        """The new pack, opened with the first bytes under the chunk lock: a run that dies before leaves nothing."""
        if self._adding is None:
            self.ready()
            assert self.known is not None
            self.started = time.monotonic()
            self._adding = self.stack.enter_context(self.store.adding(self.level, self.known))
        return self._adding

    @contextlib.contextmanager
    def hashing_ahead(self, path: Path, files: dict[str, pagehash.Pieces]) -> Iterator[None]:
        """Their chunks' addresses hashed by workers on the other cores (see pagehash) while `files` are written."""
        workers = pagehash.workers()
        if not workers:
            yield
            return
        self.hashing = pagehash.Hashing(path, files, self.store.seal.address_key, workers)
        try:
            yield
        finally:
            self.hashing.close()
            self.hashing = None

    def _put(self, name: str, data: bytes) -> None:
        pending = self.pending.setdefault(name, archivewriter.Held())
        pending.add(data)
        if pending.held >= ADD_BYTES:
            self._add(name, pending.take(pending.held - pending.held % chunks.CHUNK))

    def _close(self, member: Member) -> None:
        pending = self.pending.pop(member.name, None)
        if pending and pending.held:  # its tail, now: a snapshot has many files, whose tails are not held to its end
            self._add(member.name, pending.take(pending.held))

    def _add(self, name: str, pieces: list[bytes | memoryview]) -> None:
        """Cut `pieces`, the next bytes of the file `name`, into chunks; store those the store lacks."""
        data = memoryview(b"".join(pieces))
        seen = self.addresses.setdefault(name, hashlib.sha256())
        hashed = self.hashing.take(name, -(-len(data) // chunks.CHUNK)) if self.hashing is not None else None
        self.refs.setdefault(name, array("q")).extend(self.adding.add(data, seen.update, hashed))
        self.progress.advance(len(data))
        faults.inject("dedup-cutting")

    def _read_back(self, adding: chunks.Adding) -> None:
        """Read back and check the chunks this run stored, committed; any that does not read back is marked damaged
        (the next snapshot holding its content stores it again) and the snapshot is not published
        (ArchiveCorruptError), as an archive that does not read back is not."""
        assert adding.ids is not None
        faults.inject("dedup-before-read-back")
        damaged = self.store.damaged(recipe.runs_of(array("q", sorted(adding.ids))))
        for chunk in damaged:
            self.store.mark_damaged(chunk)
        if damaged:
            raise ArchiveCorruptError(
                f"{len(damaged)} chunk(s) this snapshot stored did not read back ({', '.join(map(str, damaged[:10]))}):"
                " it was not published; the next snapshot stores them again"
            )

    def _refuse_marked(self, files: dict[str, recipe.Runs]) -> None:
        """Refuse the snapshot (ArchiveCorruptError) if a chunk it names was marked damaged since it looked it up, by
        `verify` or another run's read-back: published, it would be recorded verified and refused at restore. The run
        no longer holds that content to store it again; the next one does, as a lookup leaves marked chunks out."""
        marked = self.store.marked([run for runs in files.values() for run in runs])
        if marked:
            raise ArchiveCorruptError(
                f"{len(marked)} chunk(s) this snapshot names were marked damaged while it was taken, by verify or"
                f" another run ({', '.join(map(str, marked[:10]))}): it was not published; the next snapshot stores"
                " them again"
            )

    def commit(self, manifest: Manifest, finalize: Callable[[Manifest], None] | None = None) -> Manifest:
        adding = self.adding  # opened here if no file came before
        self._complete(manifest, finalize)
        adding.commit()
        self._read_back(adding)
        faults.inject("dedup-before-recipe")
        files = {m.name: recipe.runs_of(adding.resolve(self.refs.get(m.name, array("q")))) for m in manifest.members}
        seal = self.store.seal
        addresses = {}
        if seal.key_id is not None:
            addresses = {m.name: self.addresses.get(m.name, hashlib.sha256()).digest() for m in manifest.members}
        made = recipe.Recipe(manifest.to_json(), files, seal.key_id, addresses)
        path = self.final(manifest)
        listed = {"node": manifest.source.hostname, "frozen_s": manifest.timings.get("frozen_s")}
        with (
            recipe.staged(self.directory, made, seal, path, listed) as hidden,
            self.place(path, manifest, hidden),
            self.store.transaction(),  # for writing: no chunk is marked damaged between the look below and the link
        ):
            self._refuse_marked(files)
            recipe.link(hidden, path)
        self.path = path
        return manifest
