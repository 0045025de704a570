"""A deduplicating store: snapshots share their chunks, removing one frees only its own, damage and kills lose none."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard

from kerrickpt import archivewriter, chunks, dedupstore, keys, recipe, sources
from kerrickpt.errors import (
    ArchiveCorruptError,
    StoreDamagedError,
    StoreFormatError,
    StoreUnreadableError,
    UntrustedStoreError,
)
from kerrickpt.manifest import Manifest
from kerrickpt.store import VERIFIED, Snapshot, Store
from tests.helpers import cli
from tests.test_store import SOURCE

T0 = datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
PAGE = 4096
PAGES = 1024  # 4 MiB of memory


@pytest.fixture
def store(tmp_path: Path) -> Store:
    (tmp_path / "store").mkdir()
    return Store.deduplicating(tmp_path / "store")


@pytest.fixture(params=["plain", "encrypted"])
def either(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, keys.Key | None, tuple[str, ...]]:
    """A plain store, then an encrypted one: the store, its key, and the options that give it to a command."""
    (tmp_path / "store").mkdir()
    if request.param == "plain":
        return Store.deduplicating(tmp_path / "store"), None, ()
    key = keys.create(tmp_path / "store.key")
    return Store.deduplicating(tmp_path / "store", key), key, ("--key-file", str(tmp_path / "store.key"))


def memory(seed: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(PAGE * PAGES))


def rewrite(pages: bytearray, share: float, seed: int) -> bytearray:
    """`pages` with `share` of its pages rewritten, scattered, as a program rewriting keys over its heap does."""
    rng = random.Random(seed)
    changed = bytearray(pages)
    for page in rng.sample(range(PAGES), int(PAGES * share)):
        changed[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    return changed


def images(store: Store, name: str, when: datetime, pages: bytes) -> Path:
    """What a run's checkpoint gives the store, in a folder of its own: its manifest, and images of `pages` and a
    small inventory (see `taken_in`)."""
    work = store.root.parent / f"images-{name}"
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "images" / "pages-1.img").write_bytes(pages)
    (work / "images" / "inventory.img").write_bytes(b"inventory of " + name.encode())
    manifest = Manifest(
        name=name, created=when.isoformat(timespec="milliseconds"), source=SOURCE, processes=[], command=["sh"]
    )
    (work / "manifest.json").write_bytes(manifest.to_json())
    return work


def taken_in(store: Store, name: str, work: Path) -> Snapshot:
    """The images in `work` (see `images`) taken into the store as a run's checkpoint writes them: the pages first,
    the inventory last, as CRIU does."""
    with store.lock(name, wait=60), store.taking_in(name) as intake:
        for image in ("pages-1.img", "inventory.img"):
            intake.writer.add_file(f"images/{image}", work / "images" / image)
        intake.writer.commit(Manifest.from_json((work / "manifest.json").read_bytes()))
    assert intake.snapshot is not None
    return intake.snapshot


def take(store: Store, name: str, when: datetime, pages: bytes) -> Snapshot:
    return taken_in(store, name, images(store, name, when, pages))


def read_back(snap: Snapshot, dest: Path, key: keys.Key | None = None) -> bytes:
    """The memory a snapshot holds, read from the store's chunks (with `key` if encrypted), every chunk and file
    checked."""
    dest.mkdir()
    with sources.opened(snap.path, key) as source:
        source.extract(dest)
    return (dest / "images" / "pages-1.img").read_bytes()


def stored(store: Store) -> int:
    """What the store takes: its packs, its index and its recipes."""
    return sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file() and not p.name.endswith(".meta"))


def test_a_second_snapshot_of_barely_changed_memory_grows_the_store_by_a_small_fraction(
    store: Store, tmp_path: Path
) -> None:
    before = stored(store)
    first_pages = memory(1)
    first = take(store, "job1", T0, first_pages)
    after_first = stored(store) - before
    second_pages = rewrite(first_pages, 0.05, 2)
    second = take(store, "job1", T0 + timedelta(hours=1), second_pages)
    growth = stored(store) - before - after_first

    assert after_first > PAGE * PAGES  # random memory does not compress: the first holds it all
    assert growth < 0.10 * after_first
    assert [s.id for s in store.list("job1")] == [first.id, second.id]
    assert all(s.status == VERIFIED for s in store.list("job1"))
    assert not [p.name for p in store.directory("job1").iterdir() if p.name.endswith(".kckpt")]
    assert read_back(first, tmp_path / "a") == first_pages
    assert read_back(second, tmp_path / "b") == second_pages


def test_a_snapshot_looks_up_only_the_pages_its_container_s_last_snapshot_lacks(
    either: tuple[Store, keys.Key | None, tuple[str, ...]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, key, _ = either
    first_pages = memory(40)
    take(store, "job1", T0, first_pages)
    # Not a snapshot's name, and after every one in order: the newest snapshot is found by its time stamp.
    (store.directory("job1") / "notes.recipe").write_bytes(b"not a recipe")
    looked_up: list[int] = []
    lookup = chunks.Chunks.lookup

    def counted(self: chunks.Chunks, digests: list[bytes]) -> dict[bytes, int]:
        looked_up.append(len(digests))
        return lookup(self, digests)

    monkeypatch.setattr(chunks.Chunks, "lookup", counted)
    second_pages = rewrite(first_pages, 0.05, 41)
    second = take(store, "job1", T0 + timedelta(hours=1), second_pages)
    with_last = sum(looked_up)
    looked_up.clear()
    other = take(store, "job2", T0, second_pages)  # no snapshot before: every page looked up, and found

    # The 51 rewritten pages (and the inventory, where it changed), looked up as they come and again, as new chunks,
    # for their ids: the rest came with the last snapshot.
    assert with_last <= 2 * (0.05 * PAGES + 1)
    assert sum(looked_up) >= PAGES
    assert read_back(second, tmp_path / "second", key) == second_pages
    assert read_back(other, tmp_path / "other", key) == second_pages


def test_the_chunks_of_a_snapshot_found_by_their_ids_are_what_a_lookup_finds_damaged_ones_left_out(
    store: Store,
) -> None:
    take(store, "job1", T0, memory(42))
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened:
        opened.mark_damaged(5)
        rows = opened.db.execute("SELECT digest FROM chunks ORDER BY id").fetchall()
        digests = [digest for (digest,) in rows]
        runs = [(1, 3), (4, 10), (1, 2), (20, PAGES - 19), (PAGES + 5, 3)]  # repeated, and past the last id

        found = opened.known(runs)

    named = {i for first, count in runs for i in range(first, first + count) if i <= len(digests)}
    assert found == {digests[i - 1]: i for i in named if i != 5}


def test_a_snapshot_whose_last_one_does_not_read_looks_every_page_up_and_still_shares_them(
    either: tuple[Store, keys.Key | None, tuple[str, ...]], tmp_path: Path
) -> None:
    store, key, _ = either
    first_pages = memory(43)
    first = take(store, "job1", T0, first_pages)
    size = stored(store)
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    first.path.write_bytes(bytes(data))

    second_pages = rewrite(first_pages, 0.05, 44)
    second = take(store, "job1", T0 + timedelta(hours=1), second_pages)

    assert second.status == VERIFIED and read_back(second, tmp_path / "second", key) == second_pages
    assert stored(store) - size < 0.10 * size


def test_snapshots_of_two_containers_share_the_store(store: Store, tmp_path: Path) -> None:
    pages = memory(3)
    take(store, "job1", T0, pages)
    one = stored(store)
    other = take(store, "job2", T0, pages)

    assert stored(store) - one < 0.02 * one
    assert read_back(other, tmp_path / "b") == pages


def test_removing_a_snapshot_frees_only_the_chunks_nobody_else_uses(store: Store, tmp_path: Path) -> None:
    base = memory(4)
    kept = [take(store, "job1", T0, base)]
    gone = take(store, "job1", T0 + timedelta(hours=1), rewrite(base, 0.5, 5))  # its own half
    kept.append(take(store, "job1", T0 + timedelta(hours=2), rewrite(base, 0.05, 6)))
    full = stored(store)

    with store.lock("job1"):
        swept = store.remove([gone])

    assert swept is not None and swept.forgotten >= PAGES // 2
    assert full - stored(store) > 0.4 * PAGE * PAGES  # its half went
    assert [s.id for s in store.list("job1")] == [s.id for s in kept]
    assert read_back(kept[0], tmp_path / "a") == base
    assert read_back(kept[1], tmp_path / "b") == rewrite(base, 0.05, 6)
    assert all(s.status == VERIFIED for s in store.verify("job1"))


def test_a_pack_mostly_dead_is_rewritten_and_what_it_kept_still_reads(store: Store, tmp_path: Path) -> None:
    first_pages = memory(7)
    first = take(store, "job1", T0, first_pages)
    second_pages = rewrite(first_pages, 0.6, 8)
    second = take(store, "job1", T0 + timedelta(hours=1), second_pages)
    packs = sorted(p.name for p in (store.root / ".chunks" / "packs").iterdir())

    with store.lock("job1"):
        swept = store.remove([first])

    assert swept is not None and swept.rewritten  # the first's pack, 60% dead, was copied whole into a new one
    assert not set(swept.rewritten) - set(packs)
    assert read_back(second, tmp_path / "b") == second_pages
    assert stored(store) < 1.2 * PAGE * PAGES + 64 * 1024


def test_a_flipped_byte_in_a_chunk_is_refused_and_verify_calls_it_corrupt(store: Store, tmp_path: Path) -> None:
    snap = take(store, "job1", T0, memory(9))
    (pack,) = (store.root / ".chunks" / "packs").iterdir()
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    pack.write_bytes(bytes(data))

    with pytest.raises(ArchiveCorruptError):
        read_back(snap, tmp_path / "out")
    (checked,) = store.verify("job1")
    assert checked.corrupt
    done = cli("snapshots", "verify", "--store", str(store.root))
    assert done.returncode == 6 and "corrupt" in done.stderr


def lose_pack(store: Store) -> None:
    for pack in (store.root / ".chunks" / "packs").iterdir():
        pack.unlink()


def truncate_pack(store: Store) -> None:
    for pack in (store.root / ".chunks" / "packs").iterdir():
        os.truncate(pack, pack.stat().st_size // 2)


def forget_chunks(store: Store) -> None:
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened, opened.transaction():
        opened.db.execute("DELETE FROM chunks WHERE id % 7 = 3")


@pytest.mark.parametrize("damage", [lose_pack, truncate_pack, forget_chunks])
def test_a_store_that_lost_part_of_its_chunks_is_refused(store: Store, tmp_path: Path, damage: Callable) -> None:
    snap = take(store, "job1", T0, memory(23))
    damage(store)

    with pytest.raises(ArchiveCorruptError, match=r"chunk|pack|index"):
        read_back(snap, tmp_path / "out")
    (checked,) = store.verify("job1")
    assert checked.corrupt
    pruned = cli("snapshots", "prune", "--store", str(store.root), "--keep-last", "1")  # a corrupt snapshot goes
    assert pruned.returncode == 0, pruned.stderr
    assert store.list("job1") == []


def index_files(store: Store) -> list[Path]:
    return sorted((store.root / chunks.DIRECTORY).glob(chunks.INDEX + "*"))


def remove_index(store: Store) -> None:
    for path in index_files(store):
        path.unlink()


def empty_index(store: Store) -> None:
    remove_index(store)
    (store.root / chunks.DIRECTORY / chunks.INDEX).write_bytes(b"")


def foreign_index(store: Store) -> None:
    remove_index(store)
    db = sqlite3.connect(store.root / chunks.DIRECTORY / chunks.INDEX)
    db.execute("CREATE TABLE other (x)")
    db.commit()
    db.close()


def scramble_index(store: Store) -> None:
    remove_index(store)
    (store.root / chunks.DIRECTORY / chunks.INDEX).write_bytes(b"not a database" * 100)


@pytest.mark.parametrize("damage", [remove_index, empty_index, foreign_index, scramble_index])
def test_a_lost_or_damaged_index_is_refused_and_no_snapshot_is_judged_or_removed(
    store: Store, tmp_path: Path, damage: Callable
) -> None:
    base = memory(26)
    snap = take(store, "job1", T0, base)
    packs = sorted((store.root / ".chunks" / "packs").iterdir())
    damage(store)
    damaged = [(p.name, p.read_bytes()) for p in index_files(store)]

    with pytest.raises(StoreDamagedError, match="chunk index"):
        read_back(snap, tmp_path / "out")
    with pytest.raises(StoreDamagedError):  # no new index numbering chunks from 1 again
        take(store, "job1", T0 + timedelta(hours=1), base)
    verified = cli("snapshots", "verify", "--store", str(store.root))
    assert verified.returncode == 6 and "chunk index" in verified.stderr and "corrupt:" not in verified.stderr
    pruned = cli("snapshots", "prune", "--store", str(store.root), "--keep-last", "1")
    assert pruned.returncode == 6 and "chunk index" in pruned.stderr

    assert [(p.name, p.read_bytes()) for p in index_files(store)] == damaged
    assert sorted((store.root / ".chunks" / "packs").iterdir()) == packs
    assert [(s.id, s.status) for s in store.list("job1")] == [(snap.id, VERIFIED)]


def test_a_prune_removes_no_pack_when_the_index_names_none_but_snapshots_need_some(store: Store) -> None:
    take(store, "job1", T0, memory(27))
    packs = sorted((store.root / ".chunks" / "packs").iterdir())
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened, opened.transaction():
        opened.db.execute("DELETE FROM chunks")

    with store.lock("job1"), pytest.raises(StoreDamagedError, match="no pack was removed"):
        store.remove([], sweep=True)
    assert sorted((store.root / ".chunks" / "packs").iterdir()) == packs


class FailingIndex(sqlite3.Connection):
    """An index whose reads of chunks fail as a disk failing does (SQLITE_IOERR)."""

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if re.search(r"\bchunks\b", sql):
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # type: ignore[attr-defined]
            raise error
        return super().execute(sql, *args)  # type: ignore[arg-type]


def test_an_index_that_cannot_be_read_stops_verify_and_judges_no_snapshot(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = take(store, "job1", T0, memory(28))
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: connect(*a, **k, factory=FailingIndex))

    with pytest.raises(StoreUnreadableError, match="disk I/O error") as raised:
        store.verify("job1")
    assert not isinstance(raised.value, StoreDamagedError)
    with pytest.raises(StoreUnreadableError):
        take(store, "job1", T0 + timedelta(hours=1), memory(28))
    with store.lock("job1"), pytest.raises(StoreUnreadableError):
        store.remove([], sweep=True)
    monkeypatch.undo()
    assert [(s.id, s.status) for s in store.list("job1")] == [(snap.id, VERIFIED)]
    assert read_back(snap, tmp_path / "out") == memory(28)


def test_a_damaged_recipe_is_refused(store: Store, tmp_path: Path) -> None:
    snap = take(store, "job1", T0, memory(10))
    data = bytearray(snap.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    snap.path.write_bytes(bytes(data))

    with pytest.raises(ArchiveCorruptError):
        read_back(snap, tmp_path / "out")


def test_a_store_index_or_recipe_of_a_newer_format_is_refused(store: Store, tmp_path: Path) -> None:
    snap = take(store, "job1", T0, memory(11))
    marker = store.root / dedupstore.MARKER
    saved = marker.read_text()
    marker.write_text(json.dumps({**json.loads(saved), "version": dedupstore.STORE_VERSION + 1}))
    with pytest.raises(StoreFormatError, match=f"format version {dedupstore.STORE_VERSION + 1}"):
        Store(store.root)
    done = cli("snapshots", "list", "--store", str(store.root))
    assert done.returncode == 7 and "newer" in done.stderr
    marker.write_text(saved)

    head = {"format": recipe.FORMAT, "version": recipe.VERSION + 1, "key": None, "manifest": "{}", "files": []}
    coded = zstandard.ZstdCompressor().compress(json.dumps(head).encode() + b"\n")
    with pytest.raises(StoreFormatError):
        recipe.Recipe.decode(coded, "a recipe")

    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened:
        opened.db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (chunks.INDEX_VERSION + 1,))
    with pytest.raises(StoreFormatError):
        read_back(snap, tmp_path / "out")


def test_recipes_are_compact(store: Store) -> None:
    first_pages = memory(12)
    take(store, "job1", T0, first_pages)
    second = take(store, "job1", T0 + timedelta(hours=1), rewrite(first_pages, 0.05, 13))

    # 32 bytes a page as a list of digests; as runs, a few bytes per changed page
    assert second.path.stat().st_size < 8 * PAGES * 0.05 + 1024


KILL_PRUNE = [
    "store-before-sweep",
    "dedup-before-sweep",
    "dedup-before-rewrite",
    "chunks-rewrite-before-rename",
    "chunks-rewrite-before-index",
    "chunks-rewrite-before-unlink",
]


@pytest.mark.parametrize("point", KILL_PRUNE)
def test_a_prune_killed_at_any_point_leaves_every_kept_snapshot_whole(
    either: tuple[Store, keys.Key | None, tuple[str, ...]], tmp_path: Path, point: str
) -> None:
    store, key, keyed = either
    base = memory(14)
    pages = [base, rewrite(base, 0.6, 15)]
    pages.append(rewrite(pages[1], 0.05, 16))
    for hour, content in enumerate(pages):
        take(store, "job1", T0 + timedelta(hours=hour), content)
    # The first goes: 60% of its pack is no other's, so the pack is rewritten after the sweep.
    args = ("snapshots", "prune", "--store", str(store.root), "job1", "--keep-last", "2", *keyed)

    killed = cli(*args, KERRICKPT_FAULT=f"{point}:kill")
    assert killed.returncode == -9

    kept = store.list("job1")
    assert len(kept) in (2, 3)
    for i, snap in enumerate(store.list("job1")[-2:]):
        assert read_back(snap, tmp_path / f"after-kill-{i}", key) == pages[i + 1]
    assert cli(*args).returncode == 0
    assert len(store.list("job1")) == 2
    for i, snap in enumerate(store.list("job1")):
        assert read_back(snap, tmp_path / f"after-prune-{i}", key) == pages[i + 1]
    assert not [p for p in (store.root / ".chunks" / "packs").iterdir() if p.name.startswith(".")]
    assert stored(store) < 1.2 * PAGE * PAGES  # 40% of the first's, 60% of the second's, 5% of the last's


# A run taking the images of `images` in, in a process of its own: STORE NAME WORK [KEY_FILE].
TAKE = """
import sys
from pathlib import Path
from kerrickpt import keys
from kerrickpt.store import Store
from tests.test_dedup_store import taken_in
taken_in(Store(sys.argv[1], keys.load(sys.argv[4]) if len(sys.argv) > 4 else None), sys.argv[2], Path(sys.argv[3]))
"""
REPO = Path(__file__).resolve().parent.parent


def take_in_process(store: Store, name: str, work: Path, *keyed: str, **env: str) -> subprocess.Popen[bytes]:
    """`taken_in` run in a process of its own (`keyed`: --key-file FILE, for an encrypted store), with `env` added."""
    argv = [sys.executable, "-c", TAKE, str(store.root), name, str(work), *keyed[1:]]
    return subprocess.Popen(argv, cwd=REPO, env=os.environ | env)


@contextlib.contextmanager
def take_paused(
    store: Store, name: str, work: Path, keyed: tuple[str, ...], point: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`take_in_process` stopped at the fault point `point` for the block, then let go on and waited for, whatever
    happened."""
    run = take_in_process(store, name, work, *keyed, KERRICKPT_FAULT=f"{point}:pause")
    try:
        _, status = os.waitpid(run.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the run stops at {point}"
        yield run
    finally:
        os.kill(run.pid, signal.SIGCONT)
        run.wait(timeout=120)


# Where a run taking a snapshot in dies: while it cuts chunks (its pack half written), with its pack whole but not
# indexed, with its chunks indexed but no recipe, with its record written but its recipe not linked.
KILL_TAKE = ["dedup-cutting", "chunks-before-index", "dedup-before-recipe", "store-before-link"]


@pytest.mark.parametrize("point", KILL_TAKE)
def test_a_snapshot_killed_while_taken_in_leaves_the_store_whole(
    either: tuple[Store, keys.Key | None, tuple[str, ...]], tmp_path: Path, point: str
) -> None:
    store, key, keyed = either
    base = memory(17)
    first = take(store, "job1", T0, base)
    work = images(store, "job1", T0 + timedelta(hours=1), rewrite(base, 0.3, 18))
    killed = take_in_process(store, "job1", work, *keyed, KERRICKPT_FAULT=f"{point}:kill")
    assert killed.wait(timeout=120) == -9

    assert [s.id for s in store.list("job1")] == [first.id]
    assert read_back(first, tmp_path / "a", key) == base
    later = rewrite(base, 0.05, 19)
    with store.lock("job1"):
        store.clean("job1")
    second = take(store, "job1", T0 + timedelta(hours=2), later)
    assert read_back(second, tmp_path / "b", key) == later
    assert cli("snapshots", "prune", "--store", str(store.root), "--keep-last", "2", *keyed).returncode == 0
    known = (".lock", ".source", dedupstore.MARKER, chunks.DIRECTORY)
    assert not [p for p in store.root.rglob(".*") if p.name not in known]
    assert stored(store) < 1.3 * PAGE * PAGES


def test_two_runs_at_once_into_one_store_both_publish_whole(store: Store, tmp_path: Path) -> None:
    base = memory(20)
    contents = {"job1": rewrite(base, 0.05, 21), "job2": rewrite(base, 0.05, 22)}
    runs = [take_in_process(store, name, images(store, name, T0, content)) for name, content in contents.items()]
    assert [run.wait(timeout=120) for run in runs] == [0, 0]

    for name, content in contents.items():
        (snap,) = store.list(name)
        assert read_back(snap, tmp_path / name) == content
    # Both may have stored the shared 95% at once; the index names one copy, the next prune drops the other.
    assert cli("snapshots", "prune", "--store", str(store.root), "--keep-last", "1").returncode == 0
    assert stored(store) < 1.3 * PAGE * PAGES
    for name, content in contents.items():
        (snap,) = store.list(name)
        assert read_back(snap, tmp_path / f"{name}-pruned") == content


def test_a_recipe_naming_a_file_outside_its_folder_is_refused_before_anything_is_written(
    store: Store, tmp_path: Path
) -> None:
    snap = take(store, "job1", T0, memory(24))
    made = recipe.read(snap.path, store.seal())
    escape = "images/../../escaped"
    manifest = json.loads(made.manifest)
    for member in manifest["members"]:
        if member["name"] == "images/inventory.img":
            member["name"] = escape
    files = {escape if name == "images/inventory.img" else name: runs for name, runs in made.files.items()}
    snap.path.write_bytes(recipe.Recipe(json.dumps(manifest).encode(), files).encode())
    (tmp_path / "out" / "deep").mkdir(parents=True)

    with pytest.raises(ArchiveCorruptError, match="never writes"), sources.opened(snap.path) as source:
        source.extract(tmp_path / "out" / "deep")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out" / "escaped").exists()
    assert not list((tmp_path / "out" / "deep").iterdir())


def test_a_recipe_in_a_series_folder_others_may_write_in_is_refused(store: Store, tmp_path: Path) -> None:
    snap = take(store, "job1", T0, memory(25))
    store.directory("job1").chmod(0o777)
    try:
        with pytest.raises(UntrustedStoreError, match="series"):
            read_back(snap, tmp_path / "out")
    finally:
        store.directory("job1").chmod(0o700)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_damaged_pack_a_prune_would_rewrite_is_left_with_a_warning_and_stops_no_prune(store: Store) -> None:
    first_pages = memory(29)
    take(store, "job1", T0, first_pages)
    (pack,) = (store.root / ".chunks" / "packs").iterdir()
    take(store, "job1", T0 + timedelta(hours=1), rewrite(first_pages, 0.6, 30))
    take(store, "job1", T0 + timedelta(hours=2), rewrite(first_pages, 0.6, 30))
    # The first's pack, 60% dead once it goes, so a rewrite is due: every entry's header damaged.
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened:
        offsets = [row[0] for row in opened.db.execute("SELECT offset FROM chunks WHERE pack = ?", (pack.name,))]
    data = bytearray(pack.read_bytes())
    for offset in offsets:
        data[offset] ^= 0xFF
    pack.write_bytes(bytes(data))
    args = ("snapshots", "prune", "--store", str(store.root), "job1", "--keep-last", "2")

    for _ in range(2):  # and again: the damaged pack stops no later prune either
        pruned = cli(*args)
        assert pruned.returncode == 0, pruned.stderr
        assert f"pack {pack.name} was not rewritten" in pruned.stderr and "damaged" in pruned.stderr
    assert pack.exists() and len(store.list("job1")) == 2


def damage_chunk(store: Store, chunk: int, bit: int = 0x01) -> None:
    """A flipped `bit` in chunk `chunk`'s zstd frame header, as a disk's bit rot does."""
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened:
        pack, offset = opened.db.execute("SELECT pack, offset FROM chunks WHERE id = ?", (chunk,)).fetchone()
    path = store.root / chunks.DIRECTORY / chunks.PACKS / pack
    data = bytearray(path.read_bytes())
    data[offset + chunks.ENTRY.size + 4] ^= bit
    path.write_bytes(bytes(data))


def test_verify_marks_a_damaged_chunk_and_the_next_snapshot_stores_it_again_healing_every_one_that_needs_it(
    store: Store, tmp_path: Path
) -> None:
    base = memory(31)
    older = take(store, "job1", T0, base)
    other = take(store, "job2", T0, base)
    damage_chunk(store, 100)
    # A run shares what the index holds without reading it back: this one names the damaged chunk too.
    trusting = take(store, "job1", T0 + timedelta(hours=1), base)
    with pytest.raises(ArchiveCorruptError, match="chunk 100"):
        read_back(trusting, tmp_path / "damaged")

    verified = cli("snapshots", "verify", "--store", str(store.root))
    assert verified.returncode == 6
    assert "1 damaged chunk(s) found; 3 snapshot(s) need them" in verified.stderr
    newer = take(store, "job1", T0 + timedelta(hours=2), base)

    assert newer.status == VERIFIED and read_back(newer, tmp_path / "newer") == base
    for snap in (older, other, trusting):  # the same chunk id, whole again
        assert read_back(snap, tmp_path / f"{snap.name}-{snap.id}") == base
    assert all(s.status == VERIFIED for s in store.verify())


def test_a_run_whose_new_chunks_do_not_read_back_publishes_nothing_and_the_next_stores_them_again(
    either: tuple[Store, keys.Key | None, tuple[str, ...]], tmp_path: Path
) -> None:
    store, key, keyed = either
    base = memory(36)
    first = take(store, "job1", T0, base)
    packs = store.root / chunks.DIRECTORY / chunks.PACKS
    before = set(packs.iterdir())
    later = rewrite(base, 0.3, 37)
    work = images(store, "job1", T0 + timedelta(hours=1), later)
    # Stopped once its new pack is in the index, before reading it back.
    with take_paused(store, "job1", work, keyed, "dedup-before-read-back") as run:
        (new,) = set(packs.iterdir()) - before
        data = bytearray(new.read_bytes())
        data[chunks.ENTRY.size + 4] ^= 0x01  # its first chunk's body, as a disk's bit rot does
        new.write_bytes(bytes(data))

    assert run.returncode != 0
    assert [s.id for s in store.list("job1")] == [first.id]
    again = take(store, "job1", T0 + timedelta(hours=2), later)
    assert again.status == VERIFIED and read_back(again, tmp_path / "again", key) == later
    assert read_back(first, tmp_path / "first", key) == base


def test_a_run_sharing_a_chunk_verify_marks_damaged_while_it_runs_publishes_nothing_and_the_next_heals_it(
    either: tuple[Store, keys.Key | None, tuple[str, ...]], tmp_path: Path
) -> None:
    store, key, keyed = either
    base = memory(38)
    first = take(store, "job1", T0, base)
    damage_chunk(store, 100)  # unseen by the next run's lookup: it takes the chunk on the index's word
    work = images(store, "job2", T0, base)
    # Stopped once it has looked up every chunk and read back its new ones, before its recipe is linked.
    with take_paused(store, "job2", work, keyed, "dedup-before-recipe") as run:
        verified = cli("snapshots", "verify", "--store", str(store.root), *keyed)
    assert verified.returncode == 6 and "1 damaged chunk(s) found" in verified.stderr

    assert run.returncode != 0
    assert store.list("job2") == []
    again = take(store, "job2", T0 + timedelta(hours=1), base)
    assert again.status == VERIFIED and read_back(again, tmp_path / "again", key) == base
    assert read_back(first, tmp_path / "first", key) == base  # chunk 100 stored again, under its id


# 0x40: the frame's size field shrinks to its first byte, which says the chunk holds nothing, and zstd decodes it to
# nothing without a complaint.
@pytest.mark.parametrize("bit", [0x01, 0x40], ids=["damaged", "says-it-holds-nothing"])
def test_verify_names_every_snapshot_a_damaged_chunk_breaks_and_a_prune_says_it_removes_them(
    store: Store, tmp_path: Path, bit: int
) -> None:
    base = memory(32)
    snaps = [take(store, "job1", T0 + timedelta(hours=h), base) for h in range(2)]
    snaps.append(take(store, "job2", T0, base))
    damage_chunk(store, 100, bit)

    verified = cli("snapshots", "verify", "--store", str(store.root))
    assert verified.returncode == 6
    assert "1 damaged chunk(s) found; 3 snapshot(s) need them" in verified.stderr
    assert all(f"{s.name} {s.id}" in verified.stderr for s in snaps)
    assert all(s.corrupt for s in store.list())

    pruned = cli("snapshots", "prune", "--store", str(store.root), "job1", "--keep-last", "5")
    assert pruned.returncode == 0
    assert "removing 2 snapshot(s) that verify found corrupt" in pruned.stderr and "chunk 100" in pruned.stderr
    # The damaged chunk is not reused: the next snapshot stores its content again and heals job2's.
    newer = take(store, "job1", T0 + timedelta(hours=3), base)
    assert read_back(newer, tmp_path / "newer") == base
    (kept,) = store.verify("job2")
    assert kept.status == VERIFIED


def test_a_sweep_keeps_the_chunks_of_every_recipe_and_frees_none_if_a_folder_cannot_be_read(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = memory(33)
    snap = take(store, "job1", T0, base)
    kept = store.directory("job1") / "kept-by-hand.recipe"
    os.link(snap.path, kept)
    take(store, "job2", T0, memory(34))
    packs = sorted((store.root / ".chunks" / "packs").iterdir())
    scandir = os.scandir

    def unreadable(path: object) -> object:
        if str(path) == str(store.directory("job2")):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", unreadable)
    with store.lock("job1"), pytest.raises(StoreUnreadableError, match="Permission denied"):
        store.remove([snap])
    monkeypatch.undo()
    assert sorted((store.root / ".chunks" / "packs").iterdir()) == packs
    (other,) = store.list("job2")
    assert read_back(other, tmp_path / "other") == memory(34)

    with store.lock("job1"):
        store.remove([], sweep=True)
    (tmp_path / "kept").mkdir()
    with sources.opened(kept) as source:
        source.extract(tmp_path / "kept")
    assert (tmp_path / "kept" / "images" / "pages-1.img").read_bytes() == base


def test_a_files_tail_is_stored_when_it_ends_not_held_to_the_snapshots_end(store: Store) -> None:
    with store.lock("job1"), store.taking_in("job1") as intake:
        writer = intake.writer
        writer.write("images/a.img", bytes(range(256)) * 20)  # a page and a tail
        writer.write("images/b.img", b"b")
        assert "images/a.img" not in writer.refs
        writer.end("images/a.img")
        assert len(writer.refs["images/a.img"]) == 2
        writer.end("images/b.img")
        assert len(writer.refs["images/b.img"]) == 1


def test_files_written_at_once_in_odd_pieces_still_share_their_pages(store: Store, tmp_path: Path) -> None:
    pages = memory(47)
    take(store, "job1", T0, pages)
    before = stored(store)
    manifest = Manifest(
        name="job1", created=(T0 + timedelta(hours=1)).isoformat(timespec="milliseconds"), source=SOURCE,
        processes=[], command=["sh"],
    )  # fmt: skip

    with store.lock("job1"), store.taking_in("job1") as intake:
        for at in range(0, len(pages), 1000):  # neither file's pieces fall on its pages
            intake.writer.write("images/pages-1.img", pages[at : at + 1000])
            intake.writer.write("images/other.img", b"x" * 333)
        intake.writer.end("images/other.img")
        intake.writer.end("images/pages-1.img")
        intake.writer.commit(manifest)

    assert intake.snapshot is not None and read_back(intake.snapshot, tmp_path / "b") == pages
    assert stored(store) - before < 0.02 * PAGE * PAGES


def test_a_recipe_lists_its_files_as_an_archive_of_them_does(store: Store, tmp_path: Path) -> None:
    work = images(store, "job1", T0, memory(48) * 3)  # 12 MiB: cut into members in an archive
    (work / "images" / "empty.img").write_bytes(b"")
    files = {f"images/{p.name}": p for p in (work / "images").iterdir()}
    manifest = Manifest.from_json((work / "manifest.json").read_bytes())
    written = archivewriter.write(tmp_path / "a.kckpt", manifest, files)

    with store.lock("job1"), store.taking_in("job1") as intake:
        intake.writer.commit_files(Manifest.from_json((work / "manifest.json").read_bytes()), files)

    assert intake.snapshot is not None
    with sources.opened(intake.snapshot.path) as source:
        listed = source.extract(None)
    assert listed.members == written.members and listed.checksum == written.checksum
    assert any(m.chunks for m in listed.members)


def packs_open() -> int:
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile by another thread
            found += f"/{chunks.PACKS}/" in os.readlink(f"/proc/self/fd/{fd}")
    return found


def test_a_read_over_many_packs_keeps_few_open(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pages = memory(35)
    for hour in range(8):  # each run's new pages in a pack of its own
        pages = rewrite(pages, 0.2, 36 + hour)
        last = take(store, "job1", T0 + timedelta(hours=hour), pages)
    assert len(list((store.root / ".chunks" / "packs").iterdir())) == 8
    most = []
    preadv = os.preadv

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        most.append(packs_open())
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(chunks, "OPEN_PACKS", 1)
    monkeypatch.setattr(os, "preadv", counted)
    assert read_back(last, tmp_path / "last") == pages
    assert max(most) <= 1 + (os.cpu_count() or 1)  # one kept, and one for each thread reading at that moment


def test_a_read_closed_early_leaves_no_thread_reading_the_packs(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    take(store, "job1", T0, memory(44))
    take(store, "job2", T0, memory(45))
    closed: list[bool] = []
    late: list[bool] = []
    exit_packs, decode = chunks._Packs.__exit__, chunks.Chunks._decode

    def exiting(packs: chunks._Packs, *exc: object) -> None:
        closed.append(True)
        exit_packs(packs, *exc)

    def decoding(self: chunks.Chunks, packs: chunks._Packs, located: list[chunks.Located]) -> bytes:
        late.append(bool(closed))
        return decode(self, packs, located)

    monkeypatch.setattr(chunks._Packs, "__exit__", exiting)
    monkeypatch.setattr(chunks.Chunks, "_decode", decoding)
    opened = store.chunks()
    pieces = opened.read([(1, 2 * PAGES)])
    next(pieces)
    pieces.close()
    opened.close()  # waits for what the threads were given

    assert closed and not any(late)


def test_init_after_one_that_died_before_its_marker_makes_a_whole_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / chunks.DIRECTORY / chunks.PACKS).mkdir(parents=True, mode=0o700)
    (root / chunks.DIRECTORY).chmod(0o700)
    (root / chunks.DIRECTORY / chunks.INDEX).write_bytes(b"")  # a dead init's index, never filled

    done = cli("snapshots", "init", "--store", str(root))

    assert done.returncode == 0, done.stderr
    store = Store(root)
    assert store.deduplicates
    take(store, "job1", T0, memory(46))
    assert [s.status for s in store.list("job1")] == [VERIFIED]


def test_a_read_gives_the_chunks_its_runs_name_in_their_order_each_as_often_as_named(
    either: tuple[Store, keys.Key | None, tuple[str, ...]],
) -> None:
    store, _, _ = either
    pages = memory(51)
    take(store, "job1", T0, pages)  # its pages are the first chunks, in order: chunk i holds page i - 1
    runs = [(900, 125), (5, 3), (1, 2), (5, 1), (1000, 1), (2, 1), (1, PAGES)]
    wanted = b"".join(pages[(first - 1) * PAGE : (first - 1 + count) * PAGE] for first, count in runs)

    with store.chunks() as opened:
        seen: list[bytes] = []
        read = b"".join(opened.read(runs, seen.append))
        addresses = b"".join(seen)

    assert read == wanted
    assert addresses == b"".join(opened.seal.address(wanted[i : i + PAGE]) for i in range(0, len(wanted), PAGE))


def test_a_read_of_a_sound_store_decodes_every_batch_at_once_never_chunk_by_chunk(
    either: tuple[Store, keys.Key | None, tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = either
    pages = memory(52)
    take(store, "job1", T0, pages)

    def by_chunk(*_: object) -> bytes:
        raise AssertionError("a sound batch was decoded chunk by chunk")

    monkeypatch.setattr(chunks.Chunks, "_decode", by_chunk)
    with store.chunks() as opened:
        assert b"".join(opened.read([(1, PAGES)])) == pages


def test_a_read_over_chunks_short_of_a_page_amid_whole_ones_gives_their_bytes(
    either: tuple[Store, keys.Key | None, tuple[str, ...]],
) -> None:
    store, _, _ = either
    # Three files, as a run's read-back reads them together: each one's last chunk short of a page, the second's its
    # only one, every batch of the read holding short ones amid whole pages.
    files = [bytes(memory(60)[: 1500 * PAGE + 100]), b"x" * 10, bytes(memory(61)[: 3 * PAGE + 1])]
    with store.chunks() as opened:
        with opened.lock(exclusive=False), opened.adding() as adding:
            refs = [adding.add(memoryview(data)) for data in files]
            adding.commit()
        each = [recipe.runs_of(adding.resolve(ref)) for ref in refs]

        assert [b"".join(opened.read(runs)) for runs in each] == files
        assert b"".join(opened.read([run for runs in each for run in runs])) == b"".join(files)
        assert opened.damaged([run for runs in each for run in runs]) == []


def test_a_check_of_chunks_names_every_damaged_one_in_batches_far_apart(store: Store) -> None:
    take(store, "job1", T0, memory(62))
    take(store, "job2", T0, memory(63))  # chunks 1 to 2 * PAGES, and some of the images' small files
    wrecked = [5, chunks.READ_BATCH + 7, 2 * PAGES - 3, 2 * PAGES - 2]
    for chunk in wrecked:
        damage_chunk(store, chunk)

    with store.chunks() as opened:
        assert opened.damaged([(1, 2 * PAGES)]) == wrecked
        assert opened.damaged([(1, wrecked[0] - 1), (wrecked[-1] + 1, 2)]) == []


def test_an_index_row_leading_a_chunk_to_another_chunks_entry_is_refused_naming_it(
    either: tuple[Store, keys.Key | None, tuple[str, ...]], tmp_path: Path
) -> None:
    store, key, options = either
    snap = take(store, "job1", T0, memory(52))
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened, opened.transaction():
        opened.db.execute(
            "UPDATE chunks SET (pack, offset, length) = (SELECT pack, offset, length FROM chunks WHERE id = 301) "
            "WHERE id = 300"
        )

    with pytest.raises(ArchiveCorruptError, match="chunk 300"):
        read_back(snap, tmp_path / "out", key)
    verified = cli("snapshots", "verify", "--store", str(store.root), *options)
    assert verified.returncode == 6 and "1 damaged chunk(s) found" in verified.stderr


@pytest.mark.parametrize(
    ("pack", "message"),
    [
        ("other,pack", "holds a chunk row with a missing or malformed field"),
        ("../outside.pack", "names '../outside.pack' as the pack"),
    ],
    ids=["comma", "outside"],
)
def test_an_index_naming_a_pack_no_kerrickpt_names_is_refused(
    store: Store, tmp_path: Path, pack: str, message: str
) -> None:
    snap = take(store, "job1", T0, memory(53))
    # A pack outside the packs' folder, whole and its own, that a read led there would take: it must never be opened.
    packs = store.root / chunks.DIRECTORY / chunks.PACKS
    own = next(p for p in packs.iterdir() if chunks.PACK_NAME.fullmatch(p.name))
    shutil.copyfile(own, packs.parent / "outside.pack")
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened, opened.transaction():
        opened.db.execute("UPDATE chunks SET pack = ? WHERE pack = ?", (pack, own.name))

    with pytest.raises(StoreDamagedError, match=re.escape(message)):
        read_back(snap, tmp_path / "out")


@pytest.mark.parametrize(("field", "value"), [("offset", "twelve"), ("digest", b"short")], ids=["text", "digest"])
def test_an_index_with_a_malformed_chunk_row_is_refused_as_damaged(
    store: Store, tmp_path: Path, field: str, value: str | bytes
) -> None:
    snap = take(store, "job1", T0, memory(54))
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened, opened.transaction():
        opened.db.execute(f"UPDATE chunks SET {field} = ? WHERE id = (SELECT MIN(id) FROM chunks)", (value,))

    with pytest.raises(StoreDamagedError, match="holds a chunk row with a missing or malformed field"):
        read_back(snap, tmp_path / "out")
