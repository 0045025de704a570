"""Snapshots of running containers into an encrypted store, with real CRIU: they restore with the key and go on
counting, hold nothing of the container's memory in the clear, and without the key, with the wrong one, or after
anyone changed the store, nothing is written and nothing runs."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import keys
from tests import tampering
from tests.helpers import KERRICKPT, cli, cli_env, ticks, unique_name
from tests.test_snapshot_dedup import STILL, churned, restores_from_its_point, snapshot_ticks, start

pytestmark = pytest.mark.root

SECRET = b"kerrickpt-test-secret-in-memory"
# STILL's counter, with SECRET in memory, made at run time: the program's text (its command line) never holds it.
HOLDING = STILL.replace(
    "ballast =", 'secret = "-".join(["kerrickpt", "test", "secret", "in", "memory"]) * 1000\nballast =', 1
)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    keys.create(tmp_path / "store.key")
    return tmp_path / "store.key"


@pytest.fixture
def store(tmp_path: Path, key_file: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    done = cli("snapshots", "init", "--store", str(path), "--encrypt", "--key-file", str(key_file))
    assert done.returncode == 0, done.stderr
    return path


def contents(store: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}


def test_snapshots_into_an_encrypted_store_restore_with_the_key_and_hold_nothing_in_the_clear(
    state_dir: Path, store: Path, key_file: Path, tmp_path: Path
) -> None:
    w = start(state_dir, HOLDING)
    for _ in range(2):
        w.wait_ticking(beyond=max(ticks(w.log)))
        done = cli("snapshot", w.name, "--store", str(store), "--key-file", str(key_file), state_dir=state_dir)
        assert done.returncode == 0, done.stderr
    key = keys.load(key_file)
    taken = kerrickpt.Store(store, key).list(w.name)

    listed = cli("snapshots", "list", "--store", str(store), "--json")  # no key
    assert listed.returncode == 0, listed.stderr
    assert [(r["key_id"], r["encrypted"], r["status"]) for r in json.loads(listed.stdout)] == [
        (key.id, True, "verified")
    ] * 2
    assert SECRET not in b"".join(contents(store).values())
    points = [snapshot_ticks(s, tmp_path / s.id, key) for s in taken]
    images = list((tmp_path / taken[0].id).rglob("pages-*.img"))
    assert any(SECRET in p.read_bytes() for p in images), "the snapshot holds it: the store keeps it sealed"
    for snap, point in zip(taken, points, strict=True):
        restores_from_its_point(store, w, snap, point, "--key-file", str(key_file))
    w.wait_ticking(beyond=max(ticks(w.log)))


def test_a_snapshot_or_restore_without_its_key_or_with_the_wrong_one_changes_nothing(
    state_dir: Path, store: Path, key_file: Path, tmp_path: Path
) -> None:
    w = start(state_dir, HOLDING)
    done = cli("snapshot", w.name, "--store", str(store), "--key-file", str(key_file), state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    keys.create(tmp_path / "other.key")
    passphrased = cli("key", "create", str(tmp_path / "pass.key"), "--passphrase", KERRICKPT_PASSPHRASE="right")
    assert passphrased.returncode == 0, passphrased.stderr
    before = contents(store)
    key_id = keys.load(key_file).id

    for given, env in (
        ((), {}),
        (("--key-file", str(tmp_path / "other.key")), {}),
        (("--key-file", str(tmp_path / "pass.key")), {"KERRICKPT_PASSPHRASE": "wrong"}),
    ):
        copy = unique_name("copy")
        for args in (("snapshot", w.name), ("restore", w.name, "--name", copy)):
            refused = cli(*args, "--store", str(store), *given, state_dir=state_dir, **env)
            assert refused.returncode == 23, refused.stderr
            assert key_id in refused.stderr or "wrong passphrase" in refused.stderr, refused.stderr
        assert copy not in [c.name for c in kerrickpt.ps(state_dir)]
    assert contents(store) == before
    w.wait_ticking(beyond=max(ticks(w.log)))  # never left frozen


def swap_chunks_in_index(store: Path) -> None:
    tampering.swap_chunks_in_index(store, at=100)


@pytest.mark.parametrize("tamper", [tampering.flip_in_packs, tampering.flip_in_recipes, swap_chunks_in_index])
def test_an_encrypted_snapshot_changed_without_the_key_is_refused_before_anything_runs(
    state_dir: Path, store: Path, key_file: Path, tamper: Callable[[Path], None]
) -> None:
    w = start(state_dir, HOLDING)
    done = cli("snapshot", w.name, "--store", str(store), "--key-file", str(key_file), state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    tamper(store)
    copy = unique_name("copy")

    refused = cli(
        "restore", "--store", str(store), w.name, "--name", copy, "--key-file", str(key_file), state_dir=state_dir
    )

    assert refused.returncode == 6, refused.stderr
    assert copy not in [c.name for c in kerrickpt.ps(state_dir)]
    w.wait_ticking(beyond=max(ticks(w.log)))


def test_a_prune_with_the_key_keeps_every_kept_snapshot_restorable(
    state_dir: Path, store: Path, key_file: Path, tmp_path: Path
) -> None:
    w = churned(state_dir, store, "--key-file", str(key_file))

    done = cli("snapshots", "prune", "--store", str(store), "--keep-last", "2", "--key-file", str(key_file))

    assert done.returncode == 0, done.stderr
    key = keys.load(key_file)
    kept = kerrickpt.Store(store, key).list(w.name)
    assert len(kept) == 2
    for snap in kept:
        point = snapshot_ticks(snap, tmp_path / snap.id, key)
        restores_from_its_point(store, w, snap, point, "--key-file", str(key_file))


def test_two_snapshot_runs_at_once_into_an_encrypted_store_both_restore(
    state_dir: Path, store: Path, key_file: Path, tmp_path: Path
) -> None:
    workloads = [start(state_dir, HOLDING) for _ in range(2)]
    runs = [
        subprocess.Popen(
            [*KERRICKPT, "snapshot", w.name, "--store", str(store), "--key-file", str(key_file)],
            env=cli_env(state_dir),
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in workloads
    ]
    assert [run.wait(timeout=120) for run in runs] == [0, 0], [run.stderr.read() for run in runs if run.stderr]

    key = keys.load(key_file)
    for w in workloads:
        (snap,) = kerrickpt.Store(store, key).list(w.name)
        point = snapshot_ticks(snap, tmp_path / w.name, key)
        restores_from_its_point(store, w, snap, point, "--key-file", str(key_file))
