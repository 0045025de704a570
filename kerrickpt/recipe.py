"""Owns a snapshot's recipe: its manifest and each file's chunks as runs of chunk ids, coded compactly."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from kerrickpt import archivewriter, schema, storeseal, zstdframe
from kerrickpt.errors import ArchiveCorruptError, ArchiveUnreadableError

SUFFIX = ".recipe"
HIDDEN = ".tmp"  # a recipe being written: `.RANDOM.recipe.tmp`
FORMAT = "kerrickpt-recipe"
VERSION = 1
MAX_BYTES = 1 << 30  # a recipe's plain size at the most: some 3 bytes a run, a run per page at worst

Runs = list[tuple[int, int]]  # (first chunk id, count)


def runs_of(ids: array[int]) -> Runs:
    """`ids` as runs of consecutive ids."""
    runs: Runs = []
    for i in ids:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


@dataclass(frozen=True)
class Recipe:
    """A snapshot: the manifest as written (JSON) and, for each of its files, the chunks that hold its bytes.

    `key` names the key its chunks are sealed with (None: plain). In an encrypted store, `addresses` holds, for each
    file, the sha256 of its chunks' addresses in order: what a read checks the chunks the index led it to against,
    so that an index changed to name other chunks for these ids is caught (see dedupstore.Source).
    """

    manifest: bytes
    files: dict[str, Runs]
    key: str | None = None
    addresses: dict[str, bytes] = field(default_factory=dict)

    def ids(self) -> set[int]:
        """Every chunk it names."""
        return {i for runs in self.files.values() for first, n in runs for i in range(first, first + n)}

    def encode(self) -> bytes:
        """JSON (format, version, key, manifest, each file's name and number of runs), a newline, then the runs:
        each as the signed distance of its first id from the previous run's end and its count, as varints."""
        head: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "key": self.key,
            "manifest": self.manifest.decode(),
            "files": [[name, len(runs)] for name, runs in self.files.items()],
        }
        if self.addresses:  # an encrypted store's only: a plain recipe stays as older kerrickpts read it
            head["addresses"] = {name: digest.hex() for name, digest in self.addresses.items()}
        body = bytearray(json.dumps(head).encode() + b"\n")
        end = 0
        for runs in self.files.values():
            for first, count in runs:
                distance = first - end
                _varint(body, distance * 2 if distance >= 0 else -distance * 2 - 1)
                _varint(body, count)
                end = first + count
        return zstandard.ZstdCompressor(level=zstdframe.DEFAULT_LEVEL, write_checksum=True).compress(bytes(body))

    @classmethod
    def decode(cls, data: bytes, label: str) -> Recipe:
        """The recipe in `data`; ArchiveCorruptError if damaged, StoreFormatError if of a newer format."""
        try:
            if not 0 <= zstandard.frame_content_size(data) <= MAX_BYTES:
                raise zstandard.ZstdError("its size is not given or too big")
            body = zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
            line, _, coded = body.partition(b"\n")
            head = json.loads(line)
            version = schema.header_version(head, FORMAT, VERSION, label, "a kerrickpt recipe")
            if version != VERSION:
                raise ValueError(f"version {version!r}")
            numbers = _varints(coded)
            files: dict[str, Runs] = {}
            at, end = 0, 0
            for name, count in head["files"]:
                runs = []
                for _ in range(count):
                    zigzag, n = numbers[at], numbers[at + 1]
                    at += 2
                    first = end + (zigzag // 2 if zigzag % 2 == 0 else -(zigzag + 1) // 2)
                    if first < 1 or n < 1:
                        raise ValueError("a run out of range")
                    runs.append((first, n))
                    end = first + n
                files[str(name)] = runs
            if at != len(numbers) or len(files) != len(head["files"]):
                raise ValueError("its runs do not add up")
            addresses = {str(name): bytes.fromhex(digest) for name, digest in head.get("addresses", {}).items()}
            return cls(str(head["manifest"]).encode(), files, head.get("key"), addresses)
        except (zstandard.ZstdError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            # AttributeError too: a field of another JSON kind (a list where a mapping belongs) is damage as well.
            raise ArchiveCorruptError(f"{label} is damaged: {exc}") from exc


def _varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _varints(data: bytes) -> list[int]:
    numbers, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            continue
        numbers.append(value)
        value, shift = 0, 0
    if shift:
        raise ValueError("it ends inside a number")
    return numbers


def place(path: Path) -> str:
    """What a recipe at `path` is sealed to: its container and snapshot id (`job1/20250131T130000.456Z`)."""
    return f"{path.parent.name}/{path.name.removesuffix(SUFFIX)}"


@contextlib.contextmanager
def staged(
    directory: Path, recipe: Recipe, seal: storeseal.Seal, final: Path, listed: dict[str, Any]
) -> Iterator[Path]:
    """`recipe` written whole and on disk under a hidden name in `directory`, sealed by `seal` for its `final` path
    (showing `listed` without the key), removed at the block's end (`link` it in first: a snapshot appears by that
    link)."""
    hidden = directory / f".{secrets.token_hex(8)}{SUFFIX}{HIDDEN}"
    fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(seal.seal_recipe(recipe.encode(), place(final), listed))
            out.flush()
            os.fsync(out.fileno())
        yield hidden
    finally:
        hidden.unlink(missing_ok=True)


def link(hidden: Path, path: Path) -> None:
    """Publish a staged recipe as `path`, never over a file (FileExistsError), and on disk."""
    os.link(hidden, path)
    archivewriter.fsync_dir(path.parent)


def read_bytes(path: Path) -> bytes:
    """The recipe file at `path` as stored; FileNotFoundError if it is gone (pruned meanwhile)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ArchiveUnreadableError(f"cannot read {path}: {exc.strerror}") from exc


def read(path: Path, seal: storeseal.Seal) -> Recipe:
    """The recipe at `path`, opened by `seal` (the store's) where it is sealed to; FileNotFoundError if it is gone
    (pruned meanwhile)."""
    label = str(path)
    made = Recipe.decode(seal.open_recipe(read_bytes(path), place(path), label), label)
    if made.key != seal.key_id:
        raise ArchiveCorruptError(f"{label} names key {made.key} for its chunks, not its store's ({seal.key_id})")
    return made


def check_files(recipe: Recipe, names: list[str]) -> None:
    """ArchiveCorruptError unless the recipe lists the files `names` (its manifest's) does."""
    if sorted(names) != sorted(recipe.files):
        raise ArchiveCorruptError("the recipe's files are not those its manifest lists")
