"""Snapshots of running containers into a deduplicating store, with real CRIU: they share their memory, each
restores from its own point, after a prune killed anywhere too, and a damaged chunk runs nothing."""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import keys, sources
from kerrickpt.store import Snapshot
from tests.helpers import Workload, assert_consecutive, cli, ticks, unique_name, wait_for
from tests.test_confined import log, run_steps, steps_written
from tests.test_dedup_store import KILL_TAKE

pytestmark = pytest.mark.root

# 16 MiB of incompressible memory that never changes, and a counter.
STILL = textwrap.dedent(
    """
    import os, time
    ballast = os.urandom(16 << 20)
    i = 0
    while True:
        i += 1
        print(f"tick {i} pid 1", flush=True)
        time.sleep(0.05)
    """
)
# 8 MiB rewritten 256 KiB a tick, a page at a time, round and round: in two seconds every page changed.
CHURN = textwrap.dedent(
    """
    import os, time
    ballast = bytearray(os.urandom(8 << 20))
    i = 0
    while True:
        i += 1
        at = (i * (256 << 10)) % len(ballast)
        ballast[at : at + (256 << 10)] = os.urandom(256 << 10)
        print(f"tick {i} pid 1", flush=True)
        time.sleep(0.05)
    """
)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    done = cli("snapshots", "init", "--store", str(path))
    assert done.returncode == 0, done.stderr
    return path


def start(state_dir: Path, program: str) -> Workload:
    name = unique_name()
    kerrickpt.run(name, [sys.executable, "-c", program], state_dir=state_dir)
    w = Workload(name, (0, 0, 0), state_dir, Path(sys.executable))
    wait_for(lambda: ticks(w.log), what="ticks")
    return w


def stored(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file() and not p.name.endswith(".meta"))


def snapshot_ticks(snap: Snapshot, scratch: Path, key: keys.Key | None = None) -> list[int]:
    """The counter's ticks as the snapshot's log holds them, read from the store (with its `key`, if encrypted)."""
    scratch.mkdir()
    with sources.opened(snap.path, key) as source:
        source.extract(scratch)
    return ticks((scratch / "log").read_text())


def churned(state_dir: Path, store: Path, *keyed: str) -> Workload:
    """A workload of CHURN with three snapshots in `store` (`keyed`: --key-file FILE, for an encrypted store)."""
    w = start(state_dir, CHURN)
    for _ in range(3):
        w.wait_ticking(beyond=max(ticks(w.log)) + 20)  # a second or more: much of the memory changed
        done = cli("snapshot", w.name, "--store", str(store), *keyed, state_dir=state_dir)
        assert done.returncode == 0, done.stderr
    return w


def restores_from_its_point(store: Path, w: Workload, snap: Snapshot, point: list[int], *keyed: str) -> None:
    """A copy restored from `snap` (`keyed`: --key-file FILE, for an encrypted store) goes on from `point`."""
    copy = unique_name("copy")
    at = ("--at", snap.id, "--name", copy, *keyed)
    done = cli("restore", "--store", str(store), w.name, *at, state_dir=w.state_dir)
    assert done.returncode == 0, done.stderr
    c = Workload(copy, w.keys, w.state_dir, w.binary)
    c.wait_ticking(beyond=point[-1])
    numbers = ticks(c.log)
    assert numbers[: len(point)] == point, "the restored log is the snapshot's log"
    assert_consecutive(numbers)
    kerrickpt.kill(copy, w.state_dir)


def test_snapshots_share_unchanged_memory_and_each_restores_from_its_own_point(
    state_dir: Path, store: Path, tmp_path: Path
) -> None:
    w = start(state_dir, STILL)
    before = stored(store)
    taken = []
    sizes = []
    for _ in range(3):
        w.wait_ticking(beyond=max(ticks(w.log)))
        done = cli("snapshot", w.name, "--store", str(store), state_dir=state_dir)
        assert done.returncode == 0, done.stderr
        assert "hash" not in done.stderr  # its pages' addresses came from the workers (see pagehash), all taken
        sizes.append(stored(store))
    taken = kerrickpt.Store(store).list(w.name)
    first = sizes[0] - before
    growth = [b - a for a, b in itertools.pairwise(sizes)]

    assert len(taken) == 3 and all(s.verified for s in taken)
    assert first > 16 << 20
    assert all(g < 0.15 * first for g in growth), (first, growth)
    assert not list(store.rglob("*.kckpt"))
    points = [snapshot_ticks(s, tmp_path / s.id) for s in taken]
    assert points[0][-1] < points[1][-1] < points[2][-1]
    for snap, point in zip(taken, points, strict=True):
        restores_from_its_point(store, w, snap, point)
    w.wait_ticking(beyond=max(ticks(w.log)))


@pytest.mark.parametrize("point", ["dedup-before-sweep", "chunks-rewrite-before-index", "chunks-rewrite-before-unlink"])
def test_every_kept_snapshot_restores_after_a_prune_killed(
    state_dir: Path, store: Path, tmp_path: Path, point: str
) -> None:
    w = churned(state_dir, store)
    prune = ("snapshots", "prune", "--store", str(store), w.name, "--keep-last", "2")

    killed = cli(*prune, KERRICKPT_FAULT=f"{point}:kill")

    assert killed.returncode == -9, killed.stderr
    kept = kerrickpt.Store(store).list(w.name)[-2:]
    for snap in kept:
        restores_from_its_point(store, w, snap, snapshot_ticks(snap, tmp_path / snap.id))
    assert cli(*prune).returncode == 0
    assert kerrickpt.Store(store).list(w.name) == kept


@pytest.mark.parametrize("point", KILL_TAKE)
def test_a_snapshot_killed_while_stored_leaves_every_snapshot_restorable(
    state_dir: Path, store: Path, tmp_path: Path, point: str
) -> None:
    w = start(state_dir, CHURN)
    done = cli("snapshot", w.name, "--store", str(store), state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    w.wait_ticking(beyond=max(ticks(w.log)) + 20)

    killed = cli("snapshot", w.name, "--store", str(store), state_dir=state_dir, KERRICKPT_FAULT=f"{point}:kill")

    assert killed.returncode == -9, killed.stderr
    w.wait_ticking(beyond=max(ticks(w.log)))  # thawed, as the kill came after the dump
    (older,) = kerrickpt.Store(store).list(w.name)
    restores_from_its_point(store, w, older, snapshot_ticks(older, tmp_path / "older"))
    done = cli("snapshot", w.name, "--store", str(store), "--keep-last", "1", state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    (kept,) = kerrickpt.Store(store).list(w.name)
    restores_from_its_point(store, w, kept, snapshot_ticks(kept, tmp_path / "kept"))
    assert cli("snapshots", "prune", "--store", str(store), "--keep-last", "1").returncode == 0
    assert not [p for p in store.rglob(".*") if p.is_file() and p.name not in (".lock", ".source", ".kerrickpt-store")]


def test_a_flipped_byte_in_a_chunk_is_refused_before_anything_runs(
    state_dir: Path, store: Path, tmp_path: Path
) -> None:
    w = start(state_dir, STILL)
    done = cli("snapshot", w.name, "--store", str(store), state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    (pack,) = (store / ".chunks" / "packs").iterdir()
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    pack.write_bytes(bytes(data))
    copy = unique_name("copy")

    refused = cli("restore", "--store", str(store), w.name, "--name", copy, state_dir=state_dir)

    assert refused.returncode == 6, refused.stderr
    assert copy not in [c.name for c in kerrickpt.ps(state_dir)]
    w.wait_ticking(beyond=max(ticks(w.log)))


def test_a_confined_container_restored_from_an_older_snapshot_gets_that_snapshots_files(
    state_dir: Path, store: Path, tmp_path: Path
) -> None:
    name = run_steps(state_dir)
    older = kerrickpt.snapshot(name, store, state_dir=state_dir).snapshot
    seen = max(ticks(log(state_dir, name)))
    wait_for(lambda: max(ticks(log(state_dir, name))) > seen + 10, what="more steps after the older snapshot")
    newer = kerrickpt.snapshot(name, store, state_dir=state_dir).snapshot
    wait_for(lambda: max(ticks(log(state_dir, name))) > seen + 20, what="more steps after the newer snapshot")
    kerrickpt.kill(name, state_dir)

    restored = cli("restore", "--store", str(store), name, "--at", older.id, state_dir=state_dir)

    assert restored.returncode == 0, restored.stderr
    assert newer.layer_base is None  # a deduplicating store carries the layer whole, shared where unchanged
    point = max(snapshot_ticks(older, tmp_path / "older"))
    wait_for(lambda: max(ticks(log(state_dir, name))) > point + 5, what="steps after the restore")
    written = steps_written(state_dir, name)
    assert written == list(range(1, len(written) + 1)), "the file as it was at the older snapshot, going on from there"
