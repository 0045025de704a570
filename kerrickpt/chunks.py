"""Owns a store's chunks: 4 KiB pieces kept once, compressed (and sealed if encrypted) in packs, found by an index."""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import fcntl
import itertools
import logging
import operator
import os
import re
import secrets
import sqlite3
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import quote

import zstandard

from kerrickpt import archive, archivewriter, faults, pagehash, storeseal, trust, zstdbatch, zstdframe
from kerrickpt.errors import (
    ArchiveCorruptError,
    ArchiveUnreadableError,
    BusyError,
    ChunkDamagedError,
    StoreDamagedError,
    StoreFormatError,
    StoreUnreadableError,
)

if TYPE_CHECKING:
    # Imported where a read needs it, not here: every kerrickpt process imports this module, and numpy's import
    # costs a tenth of a second (and a thread) that most commands, which never read a store, need not pay.
    import numpy as np
    import numpy.typing as npt

CHUNK = pagehash.CHUNK  # a memory page: CRIU's pages-*.img hold whole pages at page-aligned offsets
DIRECTORY = ".chunks"
PACKS = "packs"
INDEX = "index.sqlite"
LOCK = "lock"
PACK_SUFFIX = ".pack"
PACK_NAME = re.compile(r"[0-9a-f]{32}\.pack")  # as _NewPack names one: an index naming another is not the store's
DAMAGED = ""  # the pack of a chunk found damaged: its id and digest kept, for a later run to store it again
INDEX_VERSION = 1
# Each chunk in a pack: magic, its address (sha256 of the plain chunk, or in an encrypted store its keyed address),
# how it is sealed (see storeseal), the bytes that follow.
ADDRESS = pagehash.DIGEST  # bytes: a sha256, plain or keyed
ENTRY = struct.Struct(f"<4s{ADDRESS}sBI")
SEALING_AT = ENTRY.size - 5  # an entry's sealing byte: after its magic and address, before its length
MAGIC = b"KCH1"
LOOKUP_BATCH = 500  # digests per query: below SQLite's limit of bound parameters
BATCH = 256  # chunks a thread compresses at a time
CHECK_EVERY = 32  # of the addresses hashed ahead (see pagehash), one chunk in this many is hashed again to check
READ_BATCH = 1024  # chunks a read locates, checks and decodes at a time: the fewer batches, the less Python per chunk
LOCATE_RUNS = 499  # runs located by one query at the most: two bound parameters each, within the 999 of older SQLites
SPAN_BYTES = 4 << 20  # the most read from a pack at once
GAP_BYTES = 8 << 10  # the most a read of a pack reads over between two entries it wants (dead or another's)
OPEN_PACKS = 64  # packs a read keeps open: months of hourly packs would pass the limit of open files
REWRITE_DEAD = 0.2  # a pack is rewritten once this share of its bytes is no live chunk's
LOCK_WAIT = 600.0  # s a run waits for a prune's sweep, or a prune for the runs adding chunks
POLL = 0.05

log = logging.getLogger(__name__)

Seen = Callable[[bytes], None]  # given the addresses of chunks, in order, as they are cut or read
Decoded = tuple[bytes | bytearray, bytes]  # a batch's plain bytes, and its chunks' addresses


class Located(NamedTuple):
    """Where a chunk is: its pack, the offset of its entry there, the entry's whole length; and its address."""

    id: int
    digest: bytes
    pack: str
    offset: int
    length: int


class Batch(NamedTuple):
    """Chunks located, in the order a read wants them, as columns (the fields of a Located): a read takes a quarter
    of a million a GiB, and each of its steps goes over whole columns at once (numpy's loops, not Python's)."""

    ids: npt.NDArray[np.int64]
    addresses: bytes  # ADDRESS bytes a chunk, back to back
    packs: list[str]
    offsets: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]

    def located(self) -> list[Located]:
        """The chunks one by one, for a read that checks each on its own."""
        columns = (self.ids.tolist(), _split(self.addresses), self.packs, self.offsets.tolist(), self.lengths.tolist())
        return list(map(Located, *columns))


_COUNT = operator.itemgetter(1)
# A read sorts entries by their pack's number shifted past any offset, plus the offset (see `_Packs.gather`).
_PACK_SHIFT = 40
_OFFSET = (1 << _PACK_SHIFT) - 1


class _Unchecked(Exception):
    """A batch of chunks failed a check as a whole: which chunk failed, a read chunk by chunk tells."""


class Chunks:
    """The chunks of one store under `root` (`STORE/.chunks`), shared by every container in it.

    Chunks are only added by an `Adding` (a run holding the lock shared) and only forgotten by
    `sweep` (the lock held exclusive), so what the index names is always whole in a pack on disk.
    """

    def __init__(self, root: Path, *, create: bool = False, seal: storeseal.Seal = storeseal.PLAIN_SEAL) -> None:
        """Open the chunks under `root`, named and sealed by `seal`; only `create` (`snapshots init`) makes them. Any
        other open refuses an index that is missing, empty or not kerrickpt's (StoreDamagedError): a new one would
        number chunks again from 1, the ids the recipes name, and a prune would then take every pack for dead."""
        self.root = root
        self.seal = seal
        self.packs = root / PACKS
        self.index = root / INDEX
        if create:
            for directory in (root, self.packs):
                directory.mkdir(mode=0o700)
            # Its own file first, 0600: SQLite would create it (and its journal, which copies its mode) 0644.
            os.close(os.open(self.index, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        elif not self.index.is_file() or self.index.stat().st_size == 0:
            raise StoreDamagedError(
                f"the store's chunk index {self.index} is missing or empty: its snapshots cannot be read, and nothing "
                "in the store is changed (restore the index from a backup of the store)"
            )
        for directory in (root, self.packs):
            trust.check(directory, "snapshot store's chunks")
        self.db = self._connect()
        try:
            with _index_errors(self.index):
                if create:
                    self._create()
                self._check_version()
                self.db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            self.db.close()
            raise
        self.threads = os.cpu_count() or 1
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, "kerrickpt-chunks")
        # Per thread: a zstd context (making one costs more than a chunk's compression), a connection to the index.
        self.local = threading.local()
        self.readers: list[sqlite3.Connection] = []  # the pool's own connections to the index (see `_reader`)
        self.readers_lock = threading.Lock()

    def _reader(self) -> sqlite3.Connection:
        """This thread's connection to the index, to locate chunks on the pool: a connection serves one thread at a
        time. It sees what is committed, as a read needs (a run reads back its chunks once they are)."""
        reader: sqlite3.Connection | None = getattr(self.local, "db", None)
        if reader is None:
            reader = self.local.db = self._connect(check_same_thread=False)  # closed by `close`, on another thread
            with self.readers_lock:
                self.readers.append(reader)
        return reader

    def _connect(self, *, check_same_thread: bool = True) -> sqlite3.Connection:
        with _index_errors(self.index):
            # mode=rw: never made anew here, should it go between the check in __init__ and this.
            return sqlite3.connect(
                f"file:{quote(str(self.index))}?mode=rw",
                uri=True,
                isolation_level=None,
                timeout=LOCK_WAIT,
                check_same_thread=check_same_thread,
            )

    def _create(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")  # kept in the file: every later open uses it
        with self.transaction():
            self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self.db.execute(
                "CREATE TABLE chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, digest BLOB NOT NULL "
                "UNIQUE, pack TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL)"
            )
            self.db.execute("CREATE INDEX chunks_pack ON chunks (pack)")
            self.db.execute("INSERT INTO meta VALUES ('version', ?)", (INDEX_VERSION,))

    def _check_version(self) -> None:
        """Refuse an index of a newer format, or one that is not kerrickpt's, before anything is written to it."""
        tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        row = self.db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone() if "meta" in tables else None
        if row is None or "chunks" not in tables or type(row[0]) is not int:
            raise StoreDamagedError(
                f"the store's chunk index {self.index} is not a kerrickpt chunk index (its tables or version are "
                "missing): nothing in the store is changed (restore the index from a backup of the store)"
            )
        if row[0] > INDEX_VERSION:
            raise StoreFormatError(
                f"the chunk index {self.index} is of format version {row[0]}; this kerrickpt reads up to "
                f"{INDEX_VERSION}: use the kerrickpt that wrote it, or a newer one"
            )

    def close(self) -> None:
        self.pool.shutdown()
        for reader in self.readers:
            reader.close()
        self.db.close()

    def __enter__(self) -> Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One SQLite transaction, taken for writing at once: concurrent runs queue rather than deadlock."""
        with _index_errors(self.index):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool) -> Iterator[None]:
        """The store's chunk lock: shared by runs adding chunks and publishing, exclusive for a sweep."""
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + LOCK_WAIT
            how = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            while True:
                try:
                    fcntl.flock(fd, how | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        what = "a prune's sweep" if not exclusive else "snapshot runs adding chunks"
                        raise BusyError(f"the chunks of {self.root.parent} are held by {what}") from None
                    time.sleep(POLL)
            yield
        finally:
            os.close(fd)

    def adding(self, level: int = zstdframe.DEFAULT_LEVEL, known: dict[bytes, int] | None = None) -> Adding:
        """A new pack for the chunks a run adds, compressed at zstd `level`, sharing those `known` (address -> id, as
        the method `known` gives them) without looking them up; hold `lock` shared from before `known` was found to
        the recipe's publishing."""
        return Adding(self, level, known)

    def lookup(self, digests: list[bytes]) -> dict[bytes, int]:
        """The ids of those of `digests` the index holds whole (a damaged one's content is stored again)."""
        found: dict[bytes, int] = {}
        if not digests:
            return found
        with _index_errors(self.index):
            # Digest and id only, both in the digest's own index: no table row is read for each. The few chunks
            # marked damaged are left out afterwards, found by their pack's index.
            for start in range(0, len(digests), LOOKUP_BATCH):
                batch = digests[start : start + LOOKUP_BATCH]
                marks = ",".join("?" * len(batch))
                found.update(self.db.execute(f"SELECT digest, id FROM chunks WHERE digest IN ({marks})", batch))
            for (digest,) in self.db.execute("SELECT digest FROM chunks WHERE pack = ?", (DAMAGED,)):
                found.pop(digest, None)
        return found

    def known(self, runs: Iterable[tuple[int, int]]) -> dict[bytes, int]:
        """The address and id of each chunk `runs` (first id, count) name that the index holds whole: what `lookup`
        would find of them, read along the ids (each run a walk of the table) rather than found address by address
        in the address's index, some four times faster for a snapshot's worth. On a connection of its own: any thread
        may call it."""
        found: dict[bytes, int] = {}
        runs = list(runs)
        db = self._connect()
        with contextlib.closing(db), _index_errors(self.index):
            for start in range(0, len(runs), LOCATE_RUNS):
                group = runs[start : start + LOCATE_RUNS]
                values = ",".join(["(?, ?)"] * len(group))
                bounds = [bound for first, count in group for bound in (first, first + count - 1)]
                found.update(
                    db.execute(
                        f"WITH runs (first, last) AS (VALUES {values}) SELECT digest, id FROM runs CROSS JOIN chunks "
                        "ON id BETWEEN first AND last WHERE pack != ?",
                        [*bounds, DAMAGED],
                    )
                )
        return found

    def locate(self, runs: list[tuple[int, int]]) -> Batch:
        """The chunks `runs` (first id, count) name, in that order, found by one query (runs: up to LOCATE_RUNS);
        ChunkDamagedError if the index lacks one or holds it as damaged."""
        import numpy as np

        values = ",".join(["(?, ?)"] * len(runs))
        bounds = [bound for first, count in runs for bound in (first, first + count - 1)]
        with _index_errors(self.index):
            # One row for the whole batch, each field's values joined: a row per chunk lets go of the GIL and takes
            # it again per chunk, each time behind the threads decompressing (see `_decompress`). Joined with the runs,
            # not `id BETWEEN ? AND ? OR ...`, which makes SQLite gather and sort the ids found to drop doubles. CROSS
            # JOIN keeps the runs the outer loop: each run looked up in turn, its ids in order, one named twice given
            # twice; the values come in the order the read wants them (as checked below).
            reader = self._reader()
            ids, digests, packs, offsets, lengths, count = reader.execute(
                f"WITH runs (first, last) AS (VALUES {values}) SELECT group_concat(id), group_concat(hex(digest), ''),"
                " group_concat(pack), group_concat(offset), group_concat(length), count(*) "
                "FROM runs CROSS JOIN chunks ON id BETWEEN first AND last",
                bounds,
            ).fetchone()
        names = [] if packs is None else packs.split(",")
        malformed = f"the store's chunk index {self.index} holds a chunk row with a missing or malformed field"
        # group_concat skips a NULL, and a comma in a pack's name splits it: either leaves the fields out of step.
        if len(names) != count or len(digests or "") != count * 2 * ADDRESS:
            raise StoreDamagedError(malformed)
        try:
            numbers = _numbers(ids, count), _numbers(offsets, count), _numbers(lengths, count)
        except ValueError:  # a changed index: text where a number belongs
            raise StoreDamagedError(malformed) from None
        batch = Batch(numbers[0], bytes.fromhex(digests or ""), names, *numbers[1:])
        firsts, counts = (np.array(column, dtype=np.int64) for column in zip(*runs, strict=True))
        # Each run's ids, back to back: its first id, then one more for each chunk after it.
        starts = np.repeat(firsts - np.cumsum(counts) + counts, counts)
        wanted = starts + np.arange(len(starts))
        if not np.array_equal(batch.ids, wanted):  # one missing (or, should SQLite change its plan, another order)
            found = dict(zip(batch.ids.tolist(), itertools.count()))
            chunk = next((i for i in wanted.tolist() if i not in found), None)
            if chunk is not None:
                raise ChunkDamagedError(f"chunk {chunk} is missing from the index of {self.root}", chunk=chunk)
            order = np.array(list(map(found.__getitem__, wanted.tolist())), dtype=np.int64)
            addresses = _split(batch.addresses)
            batch = Batch(
                batch.ids[order],
                b"".join(map(addresses.__getitem__, order.tolist())),
                list(map(names.__getitem__, order.tolist())),
                batch.offsets[order],
                batch.lengths[order],
            )
        if DAMAGED in batch.packs:
            chunk = min(itertools.compress(batch.ids.tolist(), map(DAMAGED.__eq__, batch.packs)))
            raise ChunkDamagedError(
                f"chunk {chunk} was found damaged; a later snapshot holding its content stores it again", chunk=chunk
            )
        return batch

    def read(self, runs: Iterable[tuple[int, int]], seen: Seen | None = None) -> Iterator[bytes | bytearray]:
        """The plain bytes of the chunks `runs` (first id, count) name, in order, in pieces of up to READ_BATCH
        chunks; `seen` is given each piece's chunk addresses before it is yielded.

        Each is checked: its header names the address the index has for it, its seal (in an encrypted store)
        opens bound to that address, and its zstd frame's own checksum holds (its address is not computed
        again: it would double the cost of a read, and each file's digest is checked against the manifest at
        its end anyway). Raises ArchiveCorruptError for a chunk missing or damaged, ChunkDamagedError naming it.

        A batch of chunks is located, read, its headers checked and its seals opened on a thread of the pool, each
        step for the whole batch at once, then decompressed by one call into zstd, which runs without the GIL for
        the whole batch: one call per 4 KiB chunk spent as much in Python as in zstd, and Python runs on one core
        at a time. A batch that fails any check is decoded again chunk by chunk (see `_decode`), which
        names the damaged chunk for `verify` to mark and the next snapshot to heal. Every chunk is a whole page
        but a file's last (a run cuts its files at whole pages: see `recipewriter.Writer._put`): the decoder is told
        what the batch comes to, and libzstd holds each frame to the size its header gives. Two frames of a plain
        store changed to hold other sizes that add up are not caught by the batch, but by the file's digest at its
        end, as any other content is that a writer of the store puts there with a valid checksum.
        """
        return self._read(self._groups(runs), seen)

    def _read(self, groups: Iterator[list[tuple[int, int]]], seen: Seen | None) -> Iterator[bytes | bytearray]:
        """`read` of the runs in `groups` (see `_groups`): a piece for each group."""
        with _Packs(self.packs) as packs:
            # Each batch is located, read, checked and decoded on the pool, a batch a thread, as many at once as there
            # are cores: this thread only hands the pieces on, in order (to CRIU, on a restore). Its query, read and
            # checks of each batch, done here before, made the read wait on one core.
            pending: collections.deque[concurrent.futures.Future[Decoded]] = collections.deque()
            try:
                group = next(groups, None)
                while group is not None:
                    following = next(groups, None)
                    pending.append(self.pool.submit(self._batch, packs, group, following is None))
                    group = following
                    if len(pending) > self.threads:
                        yield self._taken(pending.popleft(), seen)
                while pending:
                    yield self._taken(pending.popleft(), seen)
            finally:
                # Read no further (closed early, or failed): nothing is left decompressing for a read that is gone.
                for future in pending:
                    future.cancel()
                concurrent.futures.wait(pending)

    @staticmethod
    def _taken(decoded: concurrent.futures.Future[Decoded], seen: Seen | None) -> bytes | bytearray:
        plain, addresses = decoded.result()
        if seen is not None:
            seen(addresses)
        return plain

    def _batch(self, packs: _Packs, group: list[tuple[int, int]], last: bool) -> Decoded:
        """The plain bytes and the addresses of the chunks `group` names (the `last` group of its read, or not): its
        entries read, their headers checked, their seals opened and their frames decoded at once. One that fails a
        check makes the batch decoded chunk by chunk (see `_decode`), which names it."""
        batch = self.locate(group)
        try:
            if not zstdbatch.available():
                raise _Unchecked
            entries, starts = packs.gather(batch)
            sealings = _checked(entries, starts, batch, self.seal.sealings)
            view = memoryview(entries)
            bodies = starts + ENTRY.size
            frames: list[bytes] | list[memoryview]
            frames = list(map(view.__getitem__, map(slice, bodies.tolist(), (starts + batch.lengths).tolist())))
            if self.seal.key_id is not None:
                frames = self.seal.open_chunks(_split(batch.addresses), sealings, frames)
            size = CHUNK * len(batch.ids)
            if last:  # a file's last chunk may hold less: what its frame says, a page at the most (decoding checks it)
                end = zstandard.frame_content_size(frames[-1])
                if not 0 < end <= CHUNK:
                    raise _Unchecked
                size += end - CHUNK
            # The frames back to back, without the headers between them: a copy of what zstd reads, a fraction of a
            # page each, for one call that decodes them all (see zstdbatch).
            return zstdbatch.decode(b"".join(frames), size), batch.addresses
        except (_Unchecked, ArchiveCorruptError, zstandard.ZstdError, zstdbatch.FrameError):
            return self._decode(packs, batch), batch.addresses

    def _unzstd(self) -> zstandard.ZstdDecompressor:
        local = self.local
        if not hasattr(local, "unzstd"):
            local.unzstd = zstandard.ZstdDecompressor()
        return local.unzstd

    @staticmethod
    def _groups(runs: Iterable[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
        """`runs` in groups that one query locates: up to LOCATE_RUNS runs of up to READ_BATCH chunks in all (a
        longer run in pieces). Cut by bisection, a step per group, not per run: a GiB is tens of thousands."""
        runs = list(runs)
        if runs and max(map(_COUNT, runs)) > READ_BATCH:
            runs = [(s, min(READ_BATCH, f + n - s)) for f, n in runs for s in range(f, f + n, READ_BATCH)]
        ends = [0, *itertools.accumulate(map(_COUNT, runs))]
        start = 0
        while start < len(runs):
            stop = min(start + LOCATE_RUNS, bisect.bisect_right(ends, ends[start] + READ_BATCH) - 1)
            yield runs[start:stop]
            start = stop

    def _decode(self, packs: _Packs, batch: Batch) -> bytes:
        """The plain bytes of `batch`, chunk by chunk, each entry checked on its own: ChunkDamagedError names the
        first that fails. Entries that follow one another in a pack in one read."""
        unzstd = self._unzstd()
        plain = []
        for span in _spans(batch.located()):
            data = memoryview(packs.read(span))
            at = 0
            for chunk in span:
                entry = data[at : at + chunk.length]
                at += chunk.length
                sealing = _check_header(entry, chunk, self.seal.sealings)
                try:
                    body = self.seal.open_chunk(chunk.digest, sealing, entry[ENTRY.size :], "it")
                    piece = unzstd.decompress(body, max_output_size=CHUNK)
                    if not 0 < len(piece) <= CHUNK:  # a frame that says it holds nothing is decoded to nothing
                        raise zstandard.ZstdError(f"it holds {len(piece)} bytes")
                    plain.append(piece)
                except zstandard.ZstdError as exc:
                    raise ChunkDamagedError(
                        f"chunk {chunk.id} in pack {chunk.pack} is damaged: {exc}", chunk=chunk.id
                    ) from exc
                except ArchiveCorruptError as exc:  # its seal: damaged or changed, as a flipped byte in a plain one
                    raise ChunkDamagedError(
                        f"chunk {chunk.id} in pack {chunk.pack}: {exc.message}", chunk=chunk.id
                    ) from exc
        return b"".join(plain)

    def damaged(self, runs: Iterable[tuple[int, int]]) -> list[int]:
        """Those of the chunks `runs` name that are damaged or gone, each read and checked as `read` does: read as one
        read (a run's read-back, a verify), each batch decoded while the next is read; from a group that fails on,
        group by group, and chunk by chunk in each group that fails, to name every one."""
        groups = list(self._groups(runs))
        whole = 0  # groups read whole: `_read` gives a piece for each
        try:
            for _ in self._read(iter(groups), None):
                whole += 1
            return []
        except ChunkDamagedError:
            pass
        found = []
        for group in groups[whole:]:
            try:
                for _ in self.read(group):
                    pass
            except ChunkDamagedError:
                for first, count in group:  # one by one, to name every one
                    for chunk in range(first, first + count):
                        try:
                            for _ in self.read([(chunk, 1)]):
                                pass
                        except ChunkDamagedError:
                            found.append(chunk)
        return found

    def mark_damaged(self, chunk: int) -> None:
        """Take chunk `chunk` for damaged: the index keeps its id and digest but no place, so no run reuses it and
        the next run whose content holds it stores it again, under this id, which heals every snapshot naming it.
        Its pack's bytes go at a prune's rewrite or clean. Hold `lock` (shared will do)."""
        with self.transaction():
            self.db.execute("UPDATE chunks SET pack = ?, offset = 0, length = 0 WHERE id = ?", (DAMAGED, chunk))

    def marked(self, runs: Iterable[tuple[int, int]]) -> list[int]:
        """Those of the chunks `runs` name that the index holds as damaged (see `mark_damaged`), without reading any:
        the few marked ones, found by their pack's index, then looked for among `runs`."""
        with _index_errors(self.index):
            found = [chunk for (chunk,) in self.db.execute("SELECT id FROM chunks WHERE pack = ?", (DAMAGED,))]
        if not found:
            return []
        named = set(itertools.chain.from_iterable(range(first, first + count) for first, count in runs))
        return sorted(named.intersection(found))

    def sweep(self, live: set[int]) -> int:
        """Forget every chunk not in `live`; how many were forgotten. Hold `lock` exclusive."""
        with self.transaction():
            self.db.execute("CREATE TEMP TABLE live (id INTEGER PRIMARY KEY)")
            self.db.executemany("INSERT INTO live VALUES (?)", ((i,) for i in live))
            gone = self.db.execute("DELETE FROM chunks WHERE id NOT IN (SELECT id FROM live)").rowcount
            self.db.execute("DROP TABLE live")
        return gone

    def rewrite(self) -> list[str]:
        """Rewrite the packs whose dead chunks passed REWRITE_DEAD into new packs; the old ones' names.

        Each new pack is whole on disk before the index names it, the old one removed only
        once the index no longer does: a kill at any point loses nothing the index names. A pack that cannot be
        read whole is left as it is, with a warning (`verify` finds what it damages), so that it stops no prune.
        An index naming a pack as kerrickpt names none is damaged: StoreDamagedError, nothing of it looked at.
        Copied SPAN_BYTES at a time. Hold `lock` exclusive.
        """
        rewritten = []
        with _index_errors(self.index):
            packs = self.db.execute("SELECT pack, SUM(length) FROM chunks WHERE pack != '' GROUP BY pack").fetchall()
        for pack, live in packs:
            if not PACK_NAME.fullmatch(pack):  # a changed index could lead anywhere: refused, as a read refuses it
                raise StoreDamagedError(f"the store's chunk index {self.index} names {pack!r} as a pack")
            try:
                size = (self.packs / pack).stat().st_size
            except FileNotFoundError:
                continue  # lost: what needs it is corrupt (`verify` says so), and there is nothing to move
            if size - live < REWRITE_DEAD * size:
                continue
            with _index_errors(self.index):
                rows = [
                    Located(*row)
                    for row in self.db.execute(
                        "SELECT id, digest, pack, offset, length FROM chunks WHERE pack = ? ORDER BY offset", (pack,)
                    )
                ]
            try:
                new = self._copy(rows)
            except ArchiveCorruptError as exc:  # unreadable too
                log.warning("pack %s was not rewritten, its dead chunks stay: %s", pack, exc.message)
                continue
            faults.inject("chunks-rewrite-before-index")
            with self.transaction():
                self.db.executemany("UPDATE chunks SET pack = ?, offset = ? WHERE id = ?", new)
            faults.inject("chunks-rewrite-before-unlink")
            (self.packs / pack).unlink()
            rewritten.append(pack)
        archivewriter.fsync_dir(self.packs)
        return rewritten

    def _copy(self, rows: list[Located]) -> list[tuple[str, int, int]]:
        """The entries of `rows` copied span by span into a new pack, on disk; each one's new (pack, offset, id)."""
        moved: list[tuple[str, int, int]] = []
        with _NewPack(self.packs) as new, _Packs(self.packs) as packs:
            for span in _spans(rows):
                offsets = new.append(packs.entries(span, self.seal.sealings))
                moved += ((new.name, offset, row.id) for offset, row in zip(offsets, span, strict=True))
            faults.inject("chunks-rewrite-before-rename")
            new.publish()
        return moved

    def clean(self, *, needed: bool) -> list[Path]:
        """Remove packs the index does not name and the hidden files of runs that died. Hold `lock` exclusive.

        `needed`: snapshots name chunks. Then an index that names no pack while packs exist has lost them (a
        store's packs are the only copy of its snapshots): StoreDamagedError, and nothing is removed.
        """
        with _index_errors(self.index):
            named = {row[0] for row in self.db.execute("SELECT DISTINCT pack FROM chunks WHERE pack != ''")}
        present = sorted(self.packs.iterdir())
        if needed and not named and any(p.name.endswith(PACK_SUFFIX) and not p.name.startswith(".") for p in present):
            raise StoreDamagedError(
                f"the store's chunk index {self.index} names no chunk while its snapshots need some and "
                f"{self.packs} holds packs: the index was lost or replaced; no pack was removed "
                "(restore the index from a backup of the store)"
            )
        gone = [p for p in present if p.name not in named]
        for path in gone:
            path.unlink(missing_ok=True)
        return gone


class Adding:
    """The chunks one run adds: new ones go into a new pack, and into the index only at `commit`.

    `add` gives each chunk a reference: its id if the index holds it, else -(k+1) for the
    k-th new chunk of this pack; `resolve` turns references into ids once committed.
    """

    def __init__(self, chunks: Chunks, level: int, known: dict[bytes, int] | None = None) -> None:
        self.chunks = chunks
        self.level = level
        # Address -> id of chunks the index holds whole, found before the run (see Chunks.known).
        self.known: dict[bytes, int] = known if known is not None else {}
        self.pack = _NewPack(chunks.packs)
        self.new: dict[bytes, int] = {}  # digest -> k, in pack order
        self.offsets: list[tuple[int, int]] = []  # the new chunks' entries: offset, length
        self.ids: array[int] | None = None

    def __enter__(self) -> Adding:
        self.pack.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.pack.__exit__(kind, value, traceback)

    def add(self, data: memoryview, seen: Seen | None = None, addresses: bytes | None = None) -> array[int]:
        """References to the chunks of `data`, cut every CHUNK bytes (the last may be shorter); `seen` is given
        their addresses. `addresses`: theirs, back to back, if already hashed elsewhere (see pagehash)."""
        pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        address = self.chunks.seal.address
        if addresses is not None and not _alike(pieces, addresses, address):
            log.warning("the addresses hashed ahead are not those of the chunks cut: they are hashed again here")
            addresses = None
        if addresses is None:
            # Hashed on this thread: hashlib lets go of the GIL for each 4 KiB page and takes it back, and threads
            # doing that wait on each other at every page (two threads of the pool hashed at 0.75x the speed of this
            # one).
            digests = list(map(address, pieces))
            addresses = b"".join(digests)
        else:
            digests = _split(addresses)
        if seen is not None:
            seen(addresses)
        known, new = self.known, self.new
        # Kept for this piece only: kept for the run, a GiB's lookups would take some 40 MiB more.
        found = self.chunks.lookup([d for d in digests if d not in known and d not in new])
        fresh: dict[bytes, memoryview] = {}
        for digest, piece in zip(digests, pieces, strict=True):
            if digest not in known and digest not in found and digest not in new and digest not in fresh:
                fresh[digest] = piece
        items = list(fresh.items())
        sealed = self.chunks.pool.map(
            lambda b: [self._entry(d, p) for d, p in b], [items[i : i + BATCH] for i in range(0, len(items), BATCH)]
        )
        for entries in sealed:
            self.offsets += zip(self.pack.append(entries), map(len, entries), strict=True)
        for digest in fresh:
            new[digest] = len(new)
        return array("q", (known[d] if d in known else found[d] if d in found else -1 - new[d] for d in digests))

    def _entry(self, digest: bytes, piece: memoryview) -> bytes:
        local = self.chunks.local
        if getattr(local, "level", None) != self.level:
            # Its frame's checksum is what a read checks (see `Chunks.read`).
            local.zstd = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
            local.level = self.level
        seal = self.chunks.seal
        body = seal.seal_chunk(digest, local.zstd.compress(piece))
        return ENTRY.pack(MAGIC, digest, seal.sealing, len(body)) + body

    def commit(self) -> None:
        """Put the pack on disk under its name, then its chunks into the index, in one transaction."""
        if not self.new:
            self.pack.discard()
            self.ids = array("q")
            return
        self.pack.publish()
        faults.inject("chunks-before-index")
        db = self.chunks.db
        digests = list(self.new)
        with self.chunks.transaction():
            # Another run may have stored one of them meanwhile: the index keeps its, ours is dead weight. One found
            # damaged takes ours, under its own id: every snapshot that names it is whole again.
            db.executemany(
                "INSERT INTO chunks (digest, pack, offset, length) VALUES (?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE "
                "SET pack = excluded.pack, offset = excluded.offset, length = excluded.length WHERE chunks.pack = ''",
                ((d, self.pack.name, o, n) for d, (o, n) in zip(digests, self.offsets, strict=True)),
            )
            ids = self.chunks.lookup(digests)
        self.ids = array("q", (ids[d] for d in digests))

    def resolve(self, refs: array[int]) -> array[int]:
        """The ids of references `add` gave, once committed."""
        assert self.ids is not None, "commit first"
        ids = self.ids
        return array("q", (r if r > 0 else ids[-1 - r] for r in refs))


class _NewPack:
    """A pack being written under a hidden name, renamed into place whole and on disk, or removed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = secrets.token_hex(16) + PACK_SUFFIX
        self.hidden = directory / f".{self.name}.tmp"
        self.fd: int | None = None
        self.size = 0

    def __enter__(self) -> _NewPack:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.hidden, flags, 0o600)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.hidden.unlink(missing_ok=True)

    def append(self, entries: list[bytes]) -> list[int]:
        """Write entries at the pack's end, in one write; their offsets."""
        assert self.fd is not None
        offsets = []
        for entry in entries:
            offsets.append(self.size)
            self.size += len(entry)
        archive.write_all(self.fd, memoryview(b"".join(entries)))
        return offsets

    def publish(self) -> None:
        assert self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.rename(self.hidden, self.directory / self.name)  # a random name: never over another pack
        archivewriter.fsync_dir(self.directory)

    def discard(self) -> None:
        self.__exit__()


class _Packs:
    """Packs open for reading, each opened once while it is in use, at most OPEN_PACKS kept open at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fds: collections.OrderedDict[str, int] = collections.OrderedDict()  # least recently used first
        self.users: collections.Counter[str] = collections.Counter()
        self.opening = threading.Lock()  # threads read at once; each pack is opened once

    def __enter__(self) -> _Packs:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    @contextlib.contextmanager
    def _open(self, name: str, chunk: int) -> Iterator[int]:
        """Pack `name`, of chunk `chunk`, open; closed later only once no thread reads it and OPEN_PACKS others are
        open."""
        with self.opening:
            fd = self.fds.get(name)
            if fd is None:
                if not PACK_NAME.fullmatch(name):  # a changed index could lead a read anywhere: it opens only packs
                    raise StoreDamagedError(f"the store's chunk index names {name!r} as the pack of chunk {chunk}")
                try:
                    fd = os.open(self.directory / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                except FileNotFoundError:
                    raise ChunkDamagedError(
                        f"pack {name} of chunk {chunk} is gone from the store", chunk=chunk
                    ) from None
                self.fds[name] = fd
            self.fds.move_to_end(name)
            self.users[name] += 1
            idle = [pack for pack in self.fds if not self.users[pack]]
            for pack in idle[: max(0, len(self.fds) - OPEN_PACKS)]:
                os.close(self.fds.pop(pack))
        try:
            yield fd
        finally:
            with self.opening:
                self.users[name] -= 1

    def read(self, span: list[Located]) -> bytes:
        """The entries of `span`, which follow one another in one pack, in one read."""
        first = span[0]
        size = span[-1].offset + span[-1].length - first.offset
        with self._open(first.pack, first.id) as fd, _reading(first.pack):
            data = os.pread(fd, size, first.offset)
        if len(data) != size:
            ends = next(c for c in span if c.offset + c.length > first.offset + len(data))
            raise ChunkDamagedError(f"pack {first.pack} is truncated (chunk {ends.id} ends early)", chunk=ends.id)
        return data

    def gather(self, batch: Batch) -> tuple[bytearray, npt.NDArray[np.int64]]:
        """The entries of `batch`'s chunks in one buffer, and where each starts in it. Each pack's entries are read in
        offset order, in as few reads as gaps of up to GAP_BYTES between them allow: a snapshot's chunks alternate
        between the packs of the runs that stored them, and one read per run of them took a system call per few
        chunks. _Unchecked if one is shorter than a header, an offset is out of range or a pack ends early."""
        import numpy as np

        offsets, lengths = batch.offsets, batch.lengths
        if lengths.min() < ENTRY.size or offsets.min() < 0 or (offsets + lengths).max() > _OFFSET:
            raise _Unchecked
        # Sorted by a number that is the pack's, then the offset: one pack's entries follow another's by more than
        # GAP_BYTES, so a read ends where its pack does.
        numbers = {name: number for number, name in enumerate(dict.fromkeys(batch.packs))}
        packs = np.fromiter(map(numbers.__getitem__, batch.packs), dtype=np.int64, count=len(batch.packs))
        keys = (packs << _PACK_SHIFT) + offsets
        order = np.argsort(keys, kind="stable")
        firsts = keys[order]
        reach = np.maximum.accumulate(firsts + lengths[order])  # a changed index could have entries overlap
        cuts = np.concatenate(([0], np.flatnonzero(firsts[1:] > reach[:-1] + GAP_BYTES) + 1, [len(order)]))
        begins, stops = firsts[cuts[:-1]], reach[cuts[1:] - 1]
        into = np.concatenate(([0], np.cumsum(stops - begins)))
        buffer = bytearray(int(into[-1]))
        view = memoryview(buffer)
        for read, (begin, stop, at) in enumerate(zip(begins.tolist(), stops.tolist(), into[:-1].tolist(), strict=True)):
            first = int(order[cuts[read]])
            name = batch.packs[first]
            with self._open(name, int(batch.ids[first])) as fd, _reading(name):
                if os.preadv(fd, [view[at : at + stop - begin]], begin & _OFFSET) != stop - begin:
                    raise _Unchecked
        reads = np.repeat(np.arange(len(begins)), np.diff(cuts))
        starts = np.empty(len(order), dtype=np.int64)
        starts[order] = firsts - begins[reads] + into[reads]
        return buffer, starts

    def entries(self, span: list[Located], sealings: frozenset[int]) -> list[bytes]:
        """The whole entries of `span` (as `read` takes it) as stored, each one's header checked against the index
        (sealed in one of `sealings`)."""
        data = memoryview(self.read(span))
        entries = []
        for chunk in span:
            entry, data = data[: chunk.length], data[chunk.length :]
            _check_header(entry, chunk, sealings)
            entries.append(bytes(entry))
        return entries


@contextlib.contextmanager
def _index_errors(path: Path) -> Iterator[None]:
    """SQLite's failures as the store's: only its word that the index is damaged or not a database says so
    (StoreDamagedError); any other (an I/O error, a full disk, a file it cannot open) says nothing of what the
    index holds (StoreUnreadableError); held by another past the wait, BusyError."""
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            raise StoreDamagedError(f"the store's chunk index {path} is damaged: {exc}") from exc
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise BusyError(f"the store's chunk index {path} is held by another kerrickpt: {exc}") from exc
        raise StoreUnreadableError(f"the store's chunk index {path} could not be used: {exc}") from exc


@contextlib.contextmanager
def _reading(pack: str) -> Iterator[None]:
    """A failure to read pack `pack` as what it is: an I/O error, which says nothing of what the pack holds."""
    try:
        yield
    except OSError as exc:
        raise ArchiveUnreadableError(f"reading pack {pack} failed: {exc.strerror}") from exc


def _checked(entries: bytearray, starts: npt.NDArray[np.int64], batch: Batch, sealings: frozenset[int]) -> bytes:
    """The sealing byte of each of `batch`'s entries (at `starts` in `entries`, each at least a header), once every
    header is the one the index says it must be (as `_check_header` checks one): all at once. _Unchecked if one is
    not."""
    import numpy as np

    count = len(starts)
    headers = np.frombuffer(entries, dtype=np.uint8)[starts[:, None] + np.arange(ENTRY.size)]
    expected = np.empty_like(headers)
    expected[:, : len(MAGIC)] = np.frombuffer(MAGIC, dtype=np.uint8)
    expected[:, len(MAGIC) : SEALING_AT] = np.frombuffer(batch.addresses, dtype=np.uint8).reshape(count, ADDRESS)
    expected[:, SEALING_AT] = headers[:, SEALING_AT]
    expected[:, SEALING_AT + 1 :] = (batch.lengths - ENTRY.size).astype("<u4").view(np.uint8).reshape(count, 4)
    sealing = headers[:, SEALING_AT].tobytes()
    if not np.array_equal(headers, expected) or not sealings.issuperset(sealing):
        raise _Unchecked
    return sealing


def _numbers(joined: str | None, count: int) -> npt.NDArray[np.int64]:
    """The `count` numbers SQLite's group_concat joined (None: it found none); ValueError unless each is a whole
    number's digits (a changed index: text, or a negative or fractional number, where a number belongs)."""
    import numpy as np

    if joined is None:
        numbers = np.empty(0, dtype=np.int64)
    # Digits and commas only: numpy's parse stops, with a warning, at anything else.
    elif joined.isascii() and joined.replace(",", "").isdigit():
        numbers = np.fromstring(joined, dtype=np.int64, sep=",")
    else:
        raise ValueError(joined)
    if len(numbers) != count:
        raise ValueError(joined)
    return numbers


def _alike(pieces: list[memoryview], addresses: bytes, address: Callable[[memoryview], bytes]) -> bool:
    """Whether `addresses` are those of `pieces`, as far as their count and every CHECK_EVERY-th piece's and the
    last's tell: a shift in where they were cut (a run cuts each file at whole pages of its own) shows over more than
    CHECK_EVERY pages, for the cost of hashing one chunk in CHECK_EVERY again."""
    if len(addresses) != len(pieces) * ADDRESS:
        return False
    picked = [*range(0, len(pieces), CHECK_EVERY), len(pieces) - 1] if pieces else []
    return all(address(pieces[i]) == addresses[i * ADDRESS : (i + 1) * ADDRESS] for i in picked)


def _split(addresses: bytes) -> list[bytes]:
    """Chunk addresses, back to back, one by one."""
    return list(
        map(
            addresses.__getitem__,
            map(slice, range(0, len(addresses), ADDRESS), range(ADDRESS, len(addresses) + 1, ADDRESS)),
        )
    )


def _spans(chunks: list[Located]) -> Iterator[list[Located]]:
    """`chunks` in runs whose entries follow one another in a pack, of SPAN_BYTES at the most."""
    span: list[Located] = []
    for chunk in chunks:
        if span and (
            chunk.pack != span[-1].pack
            or chunk.offset != span[-1].offset + span[-1].length
            or chunk.offset + chunk.length - span[0].offset > SPAN_BYTES
        ):
            yield span
            span = []
        span.append(chunk)
    if span:
        yield span


def _check_header(entry: memoryview, chunk: Located, sealings: frozenset[int]) -> int:
    """The entry's sealing, one of `sealings`, once its header is the one the index says it must be."""
    # One comparison with the header it must be: this runs once per 4 KiB read.
    sealing = entry[SEALING_AT] if len(entry) >= ENTRY.size else -1
    if sealing in sealings and entry[: ENTRY.size] == ENTRY.pack(
        MAGIC, chunk.digest, sealing, chunk.length - ENTRY.size
    ):
        return sealing
    # A sealing byte this store does not use is damage like any other (its entry was written by this store, as the
    # index says): so verify marks the chunk and the next snapshot of its content stores it again.
    raise ChunkDamagedError(f"chunk {chunk.id} in pack {chunk.pack} is damaged (its header)", chunk=chunk.id)
