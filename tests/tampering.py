"""What anyone who can write an encrypted store, but has not its key, can do to it: shared by its tests."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def flip_in_packs(store: Path) -> None:
    """A byte flipped in the middle of every pack."""
    for pack in (store / ".chunks" / "packs").iterdir():
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 0x01
        pack.write_bytes(bytes(data))


def flip_in_recipes(store: Path) -> None:
    """A byte flipped in the middle of every recipe, its time kept: its record still says verified, so restore
    picks it."""
    for recipe in store.rglob("*.recipe"):
        before = recipe.stat()
        data = bytearray(recipe.read_bytes())
        data[len(data) // 2] ^= 0x01
        recipe.write_bytes(bytes(data))
        os.utime(recipe, ns=(before.st_atime_ns, before.st_mtime_ns))


def swap_chunks_in_index(store: Path, at: int) -> None:
    """Two chunks' rows (the `at`th and the next) swap ids: each row still names its own entry, whose seal holds
    for its address."""
    with sqlite3.connect(store / ".chunks" / "index.sqlite") as db:
        a, b = (row[0] for row in db.execute("SELECT id FROM chunks ORDER BY id LIMIT 2 OFFSET ?", (at,)))
        for old, new in ((a, -a), (b, a), (-a, b)):
            db.execute("UPDATE chunks SET id = ? WHERE id = ?", (new, old))
