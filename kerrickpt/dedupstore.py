"""Owns a deduplicating store: its marker, a snapshot read back from its recipe checked, the sweep of dead chunks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerrickpt import (
    archive,
    archiveindex,
    archivewriter,
    chunks,
    faults,
    keys,
    members,
    recipe,
    schema,
    storeseal,
)
from kerrickpt.errors import ArchiveCorruptError, KeyUnusableError, RecipeSealError, StoreDamagedError
from kerrickpt.manifest import CHECKSUMS, Manifest, Member

MARKER = ".kerrickpt-store"
STORE_FORMAT = "kerrickpt-store"
# Version 1: a directory of whole archives, with no marker; 2: deduplicating; 3: deduplicating and encrypted, which a
# kerrickpt that reads up to 2 refuses rather than add plain chunks to it. A plain store stays version 2.
PLAIN_VERSION = 2
STORE_VERSION = 3
ENGINE = "chunks"
STORE_ID_DIGITS = 16  # an encrypted store's random id, which its own key is derived from
STORE_ID = f"[0-9a-f]{{{STORE_ID_DIGITS}}}"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marker:
    """What a deduplicating store's marker says: if it is encrypted, with which key (`key`, its id) and its own
    random id (`store`), which every seal in it is bound to."""

    root: Path
    key: str | None = None
    store: str | None = None

    def seal(self, key: keys.Key | None) -> storeseal.Seal | None:
        """How to read and write the store with `key`: None if it is encrypted and no key is given (only a listing
        works then). A key for a store whose marker says plain is refused (see `refuse_key`); the wrong key with
        KeyUnusableError naming both."""
        if self.key is None or self.store is None:
            refuse_key(self.root, key)
            return storeseal.PLAIN_SEAL
        if key is None:
            return None
        key.check(self.key, f"the snapshot store {self.root}")
        return storeseal.Sealed.of(key, self.store)

    def needed(self) -> KeyUnusableError:
        """The error for a command that reads or writes the snapshots of this encrypted store without its key."""
        return KeyUnusableError(
            f"the snapshot store {self.root} is encrypted with key {self.key}: give its key file (--key-file, or "
            "$KERRICKPT_KEY_FILE)"
        )


def refuse_key(root: Path, key: keys.Key | None) -> None:
    """ArchiveCorruptError if `key` is given for the store at `root` that says it is plain: whoever gives a key expects
    an encrypted store, and a marker changed (or removed) by anyone makes an encrypted store say plain. Taken as plain,
    what it holds could have been put there by anyone, and would be restored as root."""
    if key is not None:
        raise ArchiveCorruptError(
            f"the snapshot store {root} says it is not encrypted, but a key was given: if it was made encrypted, its "
            "marker was changed or removed and what it holds may have been put there by anyone, so it is refused; "
            "a store made plain (without `snapshots init --encrypt`) is used without a key: drop --key-file (and "
            "$KERRICKPT_KEY_FILE)"
        )


def marker(root: Path) -> Marker | None:
    """The marker of the store at `root`, or None for a store of whole archives (no marker).

    Raises StoreFormatError for a store a newer kerrickpt wrote, StoreDamagedError for a damaged marker.
    """
    try:
        marker = json.loads((root / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreDamagedError(f"the store's marker {root / MARKER} is unreadable: {exc}") from exc
    try:
        version = schema.header_version(marker, STORE_FORMAT, STORE_VERSION, str(root), "a kerrickpt snapshot store")
    except ValueError as exc:
        raise StoreDamagedError(f"{root / MARKER} is damaged: {exc}") from exc
    if marker.get("engine") != ENGINE:
        raise StoreDamagedError(f"{root / MARKER} names an engine unknown here: {marker.get('engine')!r}")
    key, store = marker.get("key"), marker.get("store")
    if (version >= STORE_VERSION) != (isinstance(key, str) and isinstance(store, str)):
        # Never taken for plain: that would read (and add) chunks unsealed.
        raise StoreDamagedError(f"{root / MARKER} is damaged: its version and its key id do not go together")
    if isinstance(store, str) and not re.fullmatch(STORE_ID, store):
        raise StoreDamagedError(
            f"{root / MARKER} is damaged: its store id {store!r} is not {STORE_ID_DIGITS} hex digits"
        )
    return Marker(root, key, store)


def create(root: Path, key: keys.Key | None = None) -> None:
    """Make the store at `root` (an existing directory, empty of snapshots, with no marker) a deduplicating one,
    encrypted with `key` if given.

    The chunks first, the marker last, each on disk: a store is deduplicating only once its index exists (no
    other command makes one). Chunks an `init` that died left without a marker are made again.
    """
    shutil.rmtree(root / chunks.DIRECTORY, ignore_errors=True)
    chunks.Chunks(root / chunks.DIRECTORY, create=True).close()
    archivewriter.fsync_dir(root / chunks.DIRECTORY)
    fields: dict[str, Any] = {"format": STORE_FORMAT, "version": PLAIN_VERSION, "engine": ENGINE}
    if key is not None:
        fields |= {"version": STORE_VERSION, "key": key.id, "store": secrets.token_hex(STORE_ID_DIGITS // 2)}
    body = json.dumps(fields) + "\n"
    fd = os.open(root / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    archivewriter.fsync_dir(root)


class Source:
    """A recipe as a source of files, as an archive is one: each file's bytes checked as they are read."""

    def __init__(self, store: chunks.Chunks, path: Path) -> None:
        self.store = store
        self.path = path
        self.recipe = recipe.read(path, store.seal)
        self.manifest = Manifest.from_json(self.recipe.manifest)
        recipe.check_files(self.recipe, [m.name for m in self.manifest.members])
        if self.recipe.key is not None and sorted(self.recipe.addresses) != sorted(self.recipe.files):
            raise ArchiveCorruptError(f"{path} does not give every file's chunk addresses, as a sealed recipe does")
        # Each becomes a file under the restore's scratch, written as root: as the archive's tar parser does.
        unsafe = [name for name in self.recipe.files if not members.allowed(name)]
        if unsafe:
            raise ArchiveCorruptError(f"{path} names files kerrickpt never writes: {', '.join(map(repr, unsafe))}")

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def size(self) -> int:
        return sum(m.size for m in self.manifest.members)

    def pieces(self, expected: Member) -> Iterator[bytes]:
        """The file's bytes, piece by piece; ArchiveCorruptError at its end if it is not what the manifest says."""
        digest = CHECKSUMS[self.manifest.checksum]()
        # A sealed recipe's only (a plain one names no addresses): hashing them took some 6% of a plain read's reading
        # thread, which lets go of the GIL for each batch's addresses and waits to get it back.
        seen = hashlib.sha256() if self.recipe.addresses else None
        size = 0
        for data in self.store.read(self.recipe.files[expected.name], seen.update if seen else None):
            digest.update(data)
            size += len(data)
            yield data
        # Each chunk's seal holds for the address the index gave; this holds those addresses to the sealed recipe's.
        if seen is not None and seen.digest() != self.recipe.addresses[expected.name]:
            raise ArchiveCorruptError(
                f"{expected.name} in {self.path}: the store's index leads to other chunks than its sealed recipe "
                "names (the index was changed)"
            )
        if (size, digest.hexdigest()) != (expected.size, expected.digest):
            raise ArchiveCorruptError(f"{expected.name} in {self.path} does not match its checksum")

    def extract(self, dest: Path | None, into: Callable[[str, memoryview], None] | None = None) -> Manifest:
        """As archive.extract: every file into `dest` (0600) or `into`, in the archive's order, each checked."""
        for expected in self.manifest.members:
            with archive.output(dest, expected.name, first=True) as fd:
                for data in self.pieces(expected):
                    if fd is not None:
                        archive.write_all(fd, memoryview(data))
                    elif into is not None:
                        into(expected.name, memoryview(data))
        return self.manifest

    def read_index(self) -> archiveindex.Index:
        """The manifest and the small images, as an archive's index holds them: read first, checked."""
        copies = archiveindex.Copies()
        for expected in self.manifest.members:
            if archiveindex.indexable(expected.name) and expected.size <= archiveindex.INDEX_BYTES:
                copies.add(expected.name, b"".join(self.pieces(expected)))
        return archiveindex.Index(self.manifest, self.recipe.manifest, copies.files, None)  # no zstd frame to digest

    def member(self, expected: Member, checksum: str) -> archive.PieceReader:
        """One file as a file object (`checksum` is the manifest's own), checked at its end (see `pieces`)."""
        return archive.PieceReader(self.pieces(expected))


@dataclass(frozen=True)
class Swept:
    """What a sweep did: chunks forgotten, packs rewritten, files of dead runs removed."""

    forgotten: int
    rewritten: list[str]
    cleaned: list[Path]


def sweep(store: chunks.Chunks, recipes: Callable[[], Iterable[Path]]) -> Swept:
    """Free the chunks no recipe in `recipes()` (every recipe in the store) names, under the chunk lock held
    exclusive: mark (every recipe read; one unreadable stops the sweep, freeing nothing), sweep, rewrite packs.
    A sealed recipe that does not open where it is (RecipeSealError: maybe only moved) frees nothing either, with a
    warning naming it, and stops no prune."""
    with store.lock(exclusive=True):
        live: set[int] = set()
        unopened = []
        for path in recipes():
            with contextlib.suppress(FileNotFoundError):
                try:
                    live |= recipe.read(path, store.seal).ids()
                except RecipeSealError as exc:
                    unopened.append(exc.message)
        if unopened:
            log.warning("no chunk freed: the chunks of these recipes are not known: %s", "; ".join(unopened))
            return Swept(0, [], [])
        faults.inject("dedup-before-sweep")
        forgotten = store.sweep(live)
        faults.inject("dedup-before-rewrite")
        rewritten = store.rewrite()
        return Swept(forgotten, rewritten, store.clean(needed=bool(live)))
