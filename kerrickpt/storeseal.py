"""Owns how a deduplicating store seals what it keeps (chunk addresses, chunks, recipes) and binds each to its place."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kerrickpt import keys, pagehash, schema
from kerrickpt.errors import ArchiveCorruptError, RecipeSealError

PLAIN = 0  # a chunk's sealing byte in a plain store; an encrypted store's name keys.AES_GCM or CHACHA20_POLY1305
SEALED_FORMAT = "kerrickpt-sealed-recipe"
SEALED_VERSION = 1
# What a sealed recipe shows without the key, for `snapshots list` when the snapshot's record does not match it.
LISTED = ("node", "frozen_s")


class Plain:
    """A plain store's: chunks named by their sha256, nothing sealed (checksums guard against accidents only)."""

    key_id: str | None = None
    sealing = PLAIN
    sealings = frozenset({PLAIN})
    address_key: bytes | None = None
    address = staticmethod(pagehash.addresser(None))

    def seal_chunk(self, address: bytes, body: bytes) -> bytes:
        return body

    def open_chunk(self, address: bytes, sealing: int, body: memoryview, what: str) -> memoryview:
        return body

    def seal_recipe(self, coded: bytes, place: str, listed: dict[str, Any]) -> bytes:
        return coded

    def open_recipe(self, data: bytes, place: str, label: str) -> bytes:
        if data[:1] == b"{":
            raise ArchiveCorruptError(
                f"{label} is sealed (with key {_header(data, label).get('key')}) in a store whose marker says it is "
                "plain: the marker was changed, or the recipe was put there"
            )
        return data


PLAIN_SEAL = Plain()


@dataclass(frozen=True)
class Sealed:
    """An encrypted store's: chunks named by a keyed address (`Key.address`), compressed then sealed; recipes sealed
    whole behind a plain header. All with the store's own key (`key`, derived from the key file's `key_id` and the
    store's random id `store`), and every seal bound to the store and to the piece's place: a chunk to its address,
    a recipe to its container and snapshot id (see `place`)."""

    key: keys.Key
    key_id: str
    store: str

    @classmethod
    def of(cls, key: keys.Key, store: str) -> Sealed:
        """The seal of the store `store` (its id) that `key` (already checked against it) encrypts."""
        return cls(key.derived(bytes.fromhex(store)), key.id, store)

    @property
    def sealing(self) -> int:
        return self.key.sealing

    sealings = frozenset(keys.NAMES)

    @property
    def address_key(self) -> bytes:
        return self.key.address_key

    def address(self, data: bytes | memoryview) -> bytes:
        return self.key.address(data)

    @cached_property
    def _chunk_place(self) -> bytes:
        return b"kerrickpt chunk\0" + self.store.encode() + b"\0"

    def _chunk_bound(self, address: bytes) -> bytes:
        return self._chunk_place + address

    def seal_chunk(self, address: bytes, body: bytes) -> bytes:
        return self.key.seal(body, self._chunk_bound(address))

    def open_chunk(self, address: bytes, sealing: int, body: memoryview, what: str) -> bytes:
        return self.key.open(body, self._chunk_bound(address), sealing, what)

    def open_chunks(self, addresses: Sequence[bytes], sealings: bytes, bodies: list[memoryview]) -> list[bytes]:
        """`open_chunk` for many chunks at once (their `sealings`, a byte each); ArchiveCorruptError if one does not
        open, without saying which (`open_chunk` each to tell)."""
        bounds = map(self._chunk_place.__add__, addresses)
        return self.key.open_many(bodies, bounds, sealings, "one of the chunks")

    def _recipe_bound(self, place: str, header: bytes) -> bytes:
        return b"kerrickpt recipe\0" + self.store.encode() + b"\0" + place.encode() + b"\0" + header

    def seal_recipe(self, coded: bytes, place: str, listed: dict[str, Any]) -> bytes:
        """A plain JSON line (format, version, key id, sealing, and what `snapshots list` shows: LISTED), then the
        coded recipe sealed, bound to that line, the store and `place`."""
        head = {"format": SEALED_FORMAT, "version": SEALED_VERSION, "key": self.key_id, "sealing": self.sealing}
        header = json.dumps({**head, **{k: listed.get(k) for k in LISTED}}).encode()
        return header + b"\n" + self.key.seal(coded, self._recipe_bound(place, header))

    def open_recipe(self, data: bytes, place: str, label: str) -> bytes:
        if data[:1] != b"{":
            raise ArchiveCorruptError(
                f"{label} is not sealed, in an encrypted store: anyone could have written it, it is refused"
            )
        head = _header(data, label)
        if head.get("key") != self.key_id:
            raise ArchiveCorruptError(
                f"{label} is sealed with key {head.get('key')}, not with its store's key {self.key_id}: it was put "
                "there"
            )
        header, _, sealed = data.partition(b"\n")
        try:
            return self.key.open(sealed, self._recipe_bound(place, header), head["sealing"], label)
        except ArchiveCorruptError as exc:
            raise RecipeSealError(
                f"{label} fails its authentication with key {self.key_id} as {place}: it was moved or renamed (a "
                "recipe is sealed to its series directory and file name: rename it back), changed or damaged"
            ) from exc


Seal = Plain | Sealed


def listed(data: bytes, label: str) -> dict[str, Any]:
    """What a sealed recipe shows without the key (LISTED); nothing for a plain one."""
    if data[:1] != b"{":
        return {}
    head = _header(data, label)
    node, frozen_s = head.get("node"), head.get("frozen_s")
    # Anyone may have written the header: what it shows is taken only if it is of the kind the listing prints.
    if not (node is None or isinstance(node, str)) or not (
        frozen_s is None or (isinstance(frozen_s, int | float) and not isinstance(frozen_s, bool))
    ):
        raise ArchiveCorruptError(f"{label} is damaged: its header's node or frozen time is not one")
    return {"node": node, "frozen_s": frozen_s}


def _header(data: bytes, label: str) -> dict[str, Any]:
    """A sealed recipe's plain header; ArchiveCorruptError if damaged, StoreFormatError if of a newer format."""
    try:
        head = json.loads(data.partition(b"\n")[0])
        schema.header_version(head, SEALED_FORMAT, SEALED_VERSION, label, "a sealed kerrickpt recipe")
    except ValueError as exc:
        raise ArchiveCorruptError(f"{label} is damaged: {exc}") from exc
    if type(head.get("sealing")) is not int:
        raise ArchiveCorruptError(f"{label} is damaged: its header names no sealing method")
    return head
