"""An encrypted deduplicating store: nothing of a snapshot's memory or manifest in its files, the key checked before
anything is read or written, and anything changed, moved or swapped without the key refused."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import zstandard

from kerrickpt import chunks, keys, recipe
from kerrickpt.errors import ArchiveCorruptError, KeyUnusableError, StoreDamagedError
from kerrickpt.retention import Policy
from kerrickpt.store import VERIFIED, Snapshot, Store
from tests import tampering
from tests.helpers import cli
from tests.test_dedup_store import (
    PAGE,
    PAGES,
    T0,
    images,
    memory,
    read_back,
    rewrite,
    stored,
    take,
    take_in_process,
)

SECRET = b"kerrickpt-test-secret-in-memory:"  # what a workload holds: it must appear in no file of the store


@pytest.fixture
def key(tmp_path: Path) -> keys.Key:
    return keys.create(tmp_path / "store.key")


@pytest.fixture
def store(tmp_path: Path, key: keys.Key) -> Store:
    (tmp_path / "store").mkdir()
    return Store.deduplicating(tmp_path / "store", key)


def secret_memory(seed: int) -> bytearray:
    """Random pages, every tenth one holding SECRET over and over (compressible, as a heap of strings is)."""
    pages = memory(seed)
    for page in range(0, PAGES, 10):
        pages[page * PAGE : (page + 1) * PAGE] = (SECRET * (PAGE // len(SECRET) + 1))[:PAGE]
    return pages


def files_of(store: Store) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}


def test_an_encrypted_store_keeps_no_memory_or_manifest_in_the_clear_and_reads_back_with_its_key(
    store: Store, key: keys.Key, tmp_path: Path
) -> None:
    pages = secret_memory(1)
    first = take(store, "job1", T0, pages)
    second_pages = rewrite(pages, 0.05, 2)
    before = stored(store)
    second = take(store, "job1", T0 + timedelta(hours=1), second_pages)

    held = b"".join(files_of(store).values())
    assert SECRET not in held and b"inventory of job1" not in held
    assert b'"command"' not in held  # the manifest is sealed; only the snapshot's record shows what list does
    plain_addresses = {hashlib.sha256(pages[i : i + PAGE]).digest() for i in range(0, len(pages), PAGE)}
    with sqlite3.connect(store.root / ".chunks" / "index.sqlite") as db:
        named = {row[0] for row in db.execute("SELECT digest FROM chunks")}
    assert not named & plain_addresses, "the index names chunks by keyed address, not by sha256"
    assert stored(store) - before < 0.15 * PAGE * PAGES  # sealing keeps deduplication
    assert read_back(first, tmp_path / "a", key) == pages
    assert read_back(second, tmp_path / "b", key) == second_pages
    assert all(s.status == VERIFIED and s.key == key.id for s in store.verify("job1"))


def test_list_needs_no_key_and_shows_it_every_other_command_needs_it(
    store: Store, key: keys.Key, tmp_path: Path
) -> None:
    snap = take(store, "job1", T0, memory(3))
    unkeyed = Store(store.root)
    before = files_of(store)

    assert [(s.id, s.key, s.status) for s in unkeyed.list()] == [(snap.id, key.id, VERIFIED)]
    listed = cli("snapshots", "list", "--store", str(store.root), "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["encrypted"] is True and row["key_id"] == key.id and row["frozen_s"] is None
    snap.path.with_suffix(".meta").unlink()  # no record: list reads what the recipe shows unsealed
    (bare,) = unkeyed.list()
    assert (bare.key, bare.node, bare.status) == (key.id, snap.node, "unverified")

    for run in (
        lambda: unkeyed.verify(),
        lambda: unkeyed.prune(None, Policy(last=0, hourly=1)),
        lambda: read_back(snap, tmp_path / "out", None),
    ):
        with pytest.raises(KeyUnusableError, match=f"encrypted with key {key.id}"):
            run()
    other = keys.create(tmp_path / "other.key")
    with pytest.raises(KeyUnusableError, match=f"{key.id}.*{other.id}"):
        Store(store.root, other)
    with pytest.raises(KeyUnusableError, match=f"{key.id}.*{other.id}"):
        read_back(snap, tmp_path / "out2", other)
    for args in (("snapshots", "verify"), ("snapshots", "prune", "--keep-last", "1")):
        done = cli(*args, "--store", str(store.root))
        assert done.returncode == 23 and key.id in done.stderr, done.stderr
        done = cli(*args, "--store", str(store.root), "--key-file", str(tmp_path / "other.key"))
        assert done.returncode == 23 and key.id in done.stderr and other.id in done.stderr, done.stderr
    del before[snap.path.with_suffix(".meta")]
    assert files_of(store) == before


def test_a_wrong_passphrase_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    made = cli("key", "create", str(tmp_path / "k"), "--passphrase", KERRICKPT_PASSPHRASE="right horse")
    assert made.returncode == 0, made.stderr
    init = ("snapshots", "init", "--store", str(tmp_path / "store"), "--encrypt", "--key-file", str(tmp_path / "k"))
    wrong = cli(*init, KERRICKPT_PASSPHRASE="wrong horse")
    assert wrong.returncode == 23 and "wrong passphrase" in wrong.stderr
    assert not list((tmp_path / "store").iterdir())
    done = cli(*init, KERRICKPT_PASSPHRASE="right horse")
    assert done.returncode == 0, done.stderr
    verify = ("snapshots", "verify", "--store", str(tmp_path / "store"), "--key-file", str(tmp_path / "k"))
    assert cli(*verify, KERRICKPT_PASSPHRASE="wrong horse").returncode == 23
    assert cli(*verify, KERRICKPT_PASSPHRASE="right horse").returncode == 0
    # A listing loads no key, even one in the environment: a wrong passphrase does not get in its way.
    store = str(tmp_path / "store")
    listed = cli(
        "snapshots", "list", "--store", store, KERRICKPT_KEY_FILE=str(tmp_path / "k"), KERRICKPT_PASSPHRASE="x"
    )
    assert listed.returncode == 0, listed.stderr


def test_a_key_for_a_plain_store_and_encrypt_for_one_not_made_so_are_refused(tmp_path: Path, key: keys.Key) -> None:
    (tmp_path / "dedup").mkdir()
    (tmp_path / "archives").mkdir()
    Store.deduplicating(tmp_path / "dedup")
    for root in (tmp_path / "dedup", tmp_path / "archives"):
        with pytest.raises(ArchiveCorruptError, match="marker was changed or removed"):
            Store(root, key)
        done = cli("snapshot", "job1", "--store", str(root), "--encrypt")
        assert done.returncode == 2 and "snapshots init --store DIR --encrypt" in done.stderr, done.stderr
        verified = cli("snapshots", "verify", "--store", str(root), "--key-file", str(tmp_path / "store.key"))
        assert verified.returncode == 6 and "says it is not encrypted" in verified.stderr, verified.stderr
    (tmp_path / "fresh").mkdir()
    # As `checkpoint --encrypt` without a key (see test_sealed): a usage error, whatever else is wrong.
    done = cli("snapshots", "init", "--store", str(tmp_path / "fresh"), "--encrypt", KERRICKPT_KEY_FILE="")
    assert done.returncode == 2 and "--encrypt needs a key: --key-file FILE" in done.stderr, done.stderr
    unsaid = cli("snapshots", "init", "--store", str(tmp_path / "fresh"), KERRICKPT_KEY_FILE=str(tmp_path / "none"))
    assert unsaid.returncode == 2 and "add --encrypt" in unsaid.stderr, unsaid.stderr
    assert not list((tmp_path / "fresh").iterdir())


@pytest.mark.parametrize("how", ["version 2", "no marker"])
def test_an_encrypted_store_whose_marker_is_made_to_say_plain_is_refused_with_the_key_and_without(
    store: Store, key: keys.Key, tmp_path: Path, how: str
) -> None:
    snap = take(store, "job1", T0, memory(12))
    marker = store.root / ".kerrickpt-store"
    if how == "no marker":
        marker.unlink()
    else:
        marker.write_text(json.dumps({"format": "kerrickpt-store", "version": 2, "engine": "chunks"}))

    given = cli("snapshots", "verify", "--store", str(store.root), "--key-file", str(tmp_path / "store.key"))
    assert given.returncode == 6 and "marker was changed or removed" in given.stderr, given.stderr
    if how == "version 2":  # without a key it is read as plain: its sealed recipes are refused
        with pytest.raises(ArchiveCorruptError, match="marker says it is plain"):
            read_back(Store(store.root).list("job1")[0], tmp_path / "out", None)
    else:  # a store of whole archives: it holds none, the recipe is not one
        assert not Store(store.root).list("job1")
    assert snap.path.exists()


def flip_in_pack(store: Store, snaps: list[Snapshot]) -> None:
    tampering.flip_in_packs(store.root)


def flip_in_recipe(store: Store, snaps: list[Snapshot]) -> None:
    tampering.flip_in_recipes(store.root)


def swap_chunks_in_index(store: Store, snaps: list[Snapshot]) -> None:
    tampering.swap_chunks_in_index(store.root, at=7)


def truncate_pack(store: Store, snaps: list[Snapshot]) -> None:
    for pack in (store.root / ".chunks" / "packs").iterdir():
        os.truncate(pack, pack.stat().st_size // 2)


def truncate_recipe(store: Store, snaps: list[Snapshot]) -> None:
    os.truncate(snaps[0].path, snaps[0].path.stat().st_size - 5)


def point_chunk_at_another(store: Store, snaps: list[Snapshot]) -> None:
    with sqlite3.connect(store.root / ".chunks" / "index.sqlite") as db:
        a, b = (row[0] for row in db.execute("SELECT id FROM chunks ORDER BY id LIMIT 2 OFFSET 7"))
        db.execute(
            "UPDATE chunks SET (pack, offset, length) = (SELECT pack, offset, length FROM chunks WHERE id = ?) "
            "WHERE id = ?",
            (b, a),
        )


def swap_recipes(store: Store, snaps: list[Snapshot]) -> None:
    first, second = (s.path.read_bytes() for s in snaps)
    snaps[0].path.write_bytes(second)
    snaps[1].path.write_bytes(first)


def plant_plain_recipe(store: Store, snaps: list[Snapshot]) -> None:
    made = recipe.read(snaps[0].path, store.seal())
    snaps[0].path.write_bytes(recipe.Recipe(made.manifest, made.files).encode())


@pytest.mark.parametrize(
    ("tamper", "said"),
    [
        (flip_in_pack, "fails its authentication"),
        (flip_in_recipe, "fails its authentication"),
        (swap_chunks_in_index, "index leads to other chunks than its sealed recipe names"),
        (point_chunk_at_another, "damaged"),
        (truncate_pack, "is truncated"),
        (truncate_recipe, "fails its authentication"),
        (swap_recipes, "fails its authentication"),
        (plant_plain_recipe, "not sealed"),
    ],
)
def test_anything_changed_moved_or_swapped_without_the_key_is_refused(
    store: Store, key: keys.Key, tmp_path: Path, tamper: Callable[[Store, list[Snapshot]], None], said: str
) -> None:
    pages = memory(5)
    snaps = [take(store, "job1", T0, pages), take(store, "job1", T0 + timedelta(hours=1), rewrite(pages, 0.5, 6))]
    tamper(store, snaps)

    with pytest.raises(ArchiveCorruptError, match=said):
        read_back(snaps[0], tmp_path / "out", key)
    done = cli("snapshots", "verify", "--store", str(store.root), "--key-file", str(tmp_path / "store.key"))
    assert done.returncode == 6 and said in done.stderr, done.stderr


def test_a_renamed_series_is_refused_as_moved_kept_by_prune_and_whole_once_named_back(
    store: Store, key: keys.Key, tmp_path: Path
) -> None:
    pages = memory(15)
    snaps = [take(store, "job1", T0 + timedelta(hours=h), rewrite(pages, 0.5, 16 + h)) for h in range(2)]
    (store.root / "job1").rename(store.root / "job2")
    keyed = ("--store", str(store.root), "--key-file", str(tmp_path / "store.key"))

    verified = cli("snapshots", "verify", *keyed)
    assert verified.returncode == 6 and "moved or renamed" in verified.stderr, verified.stderr
    assert "job2/" in verified.stderr and "corrupt" not in verified.stderr
    pruned = cli("snapshots", "prune", *keyed, "--keep-last", "5")
    assert pruned.returncode == 0 and "removed" not in pruned.stdout, pruned.stdout
    assert len(store.list("job2")) == 2

    (store.root / "job2").rename(store.root / "job1")
    assert [read_back(snap, tmp_path / snap.id, key) for snap in snaps] == [
        rewrite(pages, 0.5, 16 + h) for h in range(2)
    ]


def test_a_recipe_copied_by_hand_under_another_name_frees_no_chunk_and_stops_no_prune(
    store: Store, key: keys.Key, tmp_path: Path
) -> None:
    base = memory(17)
    first = take(store, "job1", T0, base)
    os.link(first.path, store.directory("job1") / "keep-me.recipe")
    take(store, "job1", T0 + timedelta(hours=1), memory(18))
    packs = {p: p.read_bytes() for p in (store.root / ".chunks" / "packs").iterdir()}

    pruned = cli(
        "snapshots", "prune", "--store", str(store.root), "--keep-last", "1", "--key-file", str(tmp_path / "store.key")
    )
    assert pruned.returncode == 0 and "no chunk freed" in pruned.stderr and "keep-me" in pruned.stderr, pruned.stderr
    assert not first.path.exists()
    assert {p: p.read_bytes() for p in (store.root / ".chunks" / "packs").iterdir()} == packs
    assert read_back(store.list("job1")[0], tmp_path / "kept", key) == memory(18)


def rewrite_header(path: Path, **fields: object) -> None:
    """The sealed recipe at `path` with its plain header's `fields` changed, as anyone who can write it can."""
    header, _, sealed = path.read_bytes().partition(b"\n")
    path.write_bytes(json.dumps({**json.loads(header), **fields}).encode() + b"\n" + sealed)


@pytest.mark.parametrize("fields", [{"frozen_s": "abc"}, {"node": ["x"]}, {"frozen_s": True}])
def test_a_listing_takes_no_header_field_of_the_wrong_kind(store: Store, tmp_path: Path, fields: dict) -> None:
    snap = take(store, "job1", T0, memory(13))
    snap.path.with_suffix(".meta").unlink()  # no record: list reads what the recipe shows unsealed
    rewrite_header(snap.path, **fields)

    listed = cli("snapshots", "list", "--store", str(store.root), "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["status"], row["frozen_s"], row["node"]) == ("unverified", None, ""), row


def test_a_header_naming_its_sealing_with_no_number_is_corrupt(store: Store, key: keys.Key, tmp_path: Path) -> None:
    snap = take(store, "job1", T0, memory(14))
    rewrite_header(snap.path, sealing=[1])

    with pytest.raises(ArchiveCorruptError, match="names no sealing"):
        read_back(snap, tmp_path / "out", key)
    done = cli("snapshots", "verify", "--store", str(store.root), "--key-file", str(tmp_path / "store.key"))
    assert done.returncode == 6 and "names no sealing" in done.stderr, done.stderr


def test_a_recipe_whose_addresses_are_not_a_mapping_is_damaged() -> None:
    head = {"format": recipe.FORMAT, "version": recipe.VERSION, "key": "k", "manifest": "{}", "files": []}
    coded = zstandard.ZstdCompressor().compress(json.dumps({**head, "addresses": ["x"]}).encode() + b"\n")
    with pytest.raises(ArchiveCorruptError, match="damaged"):
        recipe.Recipe.decode(coded, "a recipe")


def test_a_recipe_copied_from_another_store_with_the_same_key_is_refused(
    store: Store, key: keys.Key, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    other = Store.deduplicating(tmp_path / "other", key)
    pages = memory(7)
    ours = take(store, "job1", T0, pages)
    theirs = take(other, "job1", T0, pages)
    ours.path.write_bytes(theirs.path.read_bytes())

    with pytest.raises(ArchiveCorruptError, match="authentication"):
        read_back(ours, tmp_path / "out", key)


def test_two_stores_with_one_key_name_equal_content_differently(store: Store, key: keys.Key, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = Store.deduplicating(tmp_path / "other", key)
    pages = memory(11)
    take(store, "job1", T0, pages)
    take(other, "job1", T0, pages)

    def addresses(root: Path) -> set[bytes]:
        with sqlite3.connect(root / ".chunks" / "index.sqlite") as db:
            return {row[0] for row in db.execute("SELECT digest FROM chunks")}

    assert addresses(store.root) and not addresses(store.root) & addresses(other.root)


def test_a_marker_whose_store_id_is_not_one_is_refused(store: Store, key: keys.Key) -> None:
    marker = store.root / ".kerrickpt-store"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "store": "../x"}))
    with pytest.raises(StoreDamagedError, match="store id"):
        Store(store.root, key)


def test_prune_with_the_key_keeps_every_kept_snapshot_whole_and_frees_the_rest(
    store: Store, key: keys.Key, tmp_path: Path
) -> None:
    base = memory(8)
    contents = [rewrite(base, 0.5, 9 + i) for i in range(3)]
    for i, content in enumerate(contents):
        take(store, "job1", T0 + timedelta(hours=i), content)
    full = stored(store)

    done = cli(
        "snapshots", "prune", "--store", str(store.root), "--keep-last", "1", "--key-file", str(tmp_path / "store.key")
    )
    assert done.returncode == 0, done.stderr

    (kept,) = store.list("job1")
    assert full - stored(store) > 0.3 * PAGE * PAGES
    assert read_back(kept, tmp_path / "kept", key) == contents[-1]


def test_two_runs_at_once_into_an_encrypted_store_both_publish_whole(
    store: Store, key: keys.Key, tmp_path: Path
) -> None:
    base = memory(20)
    contents = {"job1": rewrite(base, 0.05, 21), "job2": rewrite(base, 0.05, 22)}
    keyed = ("--key-file", str(tmp_path / "store.key"))
    runs = [take_in_process(store, n, images(store, n, T0, content), *keyed) for n, content in contents.items()]
    assert [run.wait(timeout=120) for run in runs] == [0, 0]

    for name, content in contents.items():
        (snap,) = store.list(name)
        assert read_back(snap, tmp_path / name, key) == content
    assert store.prune(None, Policy(last=1))
    for name, content in contents.items():
        (snap,) = store.list(name)
        assert read_back(snap, tmp_path / f"{name}-pruned", key) == content


def test_a_chunk_whose_sealing_byte_names_no_sealing_is_damage_that_the_next_snapshot_heals(
    store: Store, key: keys.Key, tmp_path: Path
) -> None:
    base = memory(35)
    older = take(store, "job1", T0, base)
    with chunks.Chunks(store.root / chunks.DIRECTORY) as opened:
        pack, offset = opened.db.execute("SELECT pack, offset FROM chunks WHERE id = 100").fetchone()
    path = store.root / chunks.DIRECTORY / chunks.PACKS / pack
    data = bytearray(path.read_bytes())
    data[offset + chunks.ENTRY.size - 5] = 3  # a sealing no kerrickpt writes
    path.write_bytes(bytes(data))

    verified = cli("snapshots", "verify", "--store", str(store.root), "--key-file", str(tmp_path / "store.key"))
    assert verified.returncode == 6 and "1 damaged chunk(s) found" in verified.stderr, verified.stderr
    newer = take(store, "job1", T0 + timedelta(hours=1), base)

    assert read_back(newer, tmp_path / "newer", key) == base
    assert read_back(older, tmp_path / "older", key) == base
