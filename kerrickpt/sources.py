"""Owns where a restore reads a checkpoint's files from: an archive (a file or a stream) or a store's recipe."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from kerrickpt import archive, archiveindex, chunks, dedupstore, keys, recipe, trust
from kerrickpt.errors import ArchiveCorruptError
from kerrickpt.manifest import Manifest, Member

Into = Callable[[str, memoryview], None]


class Reader(Protocol):
    """One file as a file object; `finish` reads it to its end and checks it whole."""

    def read(self, size: int = -1, /) -> bytes: ...

    def finish(self) -> None: ...

    def __enter__(self) -> Reader: ...

    def __exit__(self, *exc: object) -> None: ...


class Source(Protocol):
    """A checkpoint's files, every one checked against the manifest as it is read."""

    @property
    def label(self) -> str: ...

    @property
    def size(self) -> int:
        """What reading it all reads, for time limits (0: unknown)."""

    def read_index(self) -> archiveindex.Index | None:
        """The manifest and the small images, read first; None if they come only with the rest."""

    def extract(self, dest: Path | None, into: Into | None = None) -> Manifest:
        """Every file into `dest` (None: nowhere) or piece by piece `into`; see archive.extract."""

    def member(self, expected: Member, checksum: str) -> Reader:
        """One file (`checksum`: the manifest's), read from the source's start as far as it takes."""


class ArchiveSource:
    """An archive file (sealed with `key`, if given: see sealed.opened), or one arriving on a stream."""

    def __init__(self, source: Path | BinaryIO, key: keys.Key | None = None) -> None:
        self.source = source
        self.key = key

    @property
    def label(self) -> str:
        return archive.label(self.source)

    @property
    def size(self) -> int:
        return self.source.stat().st_size if isinstance(self.source, Path) else 0

    def read_index(self) -> archiveindex.Index | None:
        return archive.read_index(self.source, self.key) if isinstance(self.source, Path) else None

    def extract(self, dest: Path | None, into: Into | None = None) -> Manifest:
        return archive.extract(self.source, dest, into=into, key=self.key)

    def member(self, expected: Member, checksum: str) -> Reader:
        assert isinstance(self.source, Path), "a stream is read once"
        return archive.MemberReader(self.source, expected, checksum, self.key)


@contextlib.contextmanager
def opened(source: Path | BinaryIO, key: keys.Key | None = None) -> Iterator[Source]:
    """`source` as a Source: a `*.recipe` in a deduplicating store is read from the store's chunks, under their
    lock held shared (no prune frees or moves a chunk meanwhile), with `key` if the store is encrypted (missing or
    wrong: KeyUnusableError; given for a plain store: UsageError); anything else is an archive, opened with `key`
    (see sealed.opened)."""
    if isinstance(source, Path) and source.name.endswith(recipe.SUFFIX):
        series = Path(os.path.realpath(source.absolute().parent))
        root = series.parent
        trust.check_tree(root, "snapshot store")  # root restores what it finds there
        trust.check(series, "snapshot series")  # as the store's: whoever writes there could plant a recipe
        marker = dedupstore.marker(root)  # a newer store is refused here, before anything is read
        if marker is None:
            raise ArchiveCorruptError(f"{source} is a recipe outside a deduplicating store")
        seal = marker.seal(key)
        if seal is None:
            raise marker.needed()
        with chunks.Chunks(root / chunks.DIRECTORY, seal=seal) as store, store.lock(exclusive=False):
            yield dedupstore.Source(store, series / source.name)  # sealed to its series and id: by its real place
        return
    yield ArchiveSource(source, key)
