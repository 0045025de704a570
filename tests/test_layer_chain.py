"""Snapshots of a confined container carry only what changed in its layer since the last one in the store: they
cost what changed, restore to exactly that moment's files, keep their bases through pruning, and a chain that
lost or damaged a base is refused, by the real kernel and CRIU."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import containers, layer, layerchain
from kerrickpt.errors import ArchiveCorruptError
from kerrickpt.store import Snapshot
from tests.helpers import cli, ticks, unique_name, wait_for
from tests.test_confined import STEPS, USER, log, steps_written, upper

pytestmark = pytest.mark.root

BIG_MIB = 8
# Its files first (8 MiB that do not compress, and three that will change), then a record every 50 ms.
SETUP = (
    f"head -c {BIG_MIB}M /dev/urandom > /var/tmp/big; echo old > /var/tmp/replaced; echo bye > /var/tmp/gone; "
    "echo mine > /var/tmp/mode; chmod 644 /var/tmp/mode; touch /var/tmp/ready; "
)
# What the container does between the first two snapshots.
CHANGES = "rm /var/tmp/gone; echo new > /var/tmp/replaced.new; mv /var/tmp/replaced.new /var/tmp/replaced; " + (
    "chmod 600 /var/tmp/mode"
)


def start(state_dir: Path, store: Path) -> str:
    """A container with its files written, and `store` made for its snapshots."""
    store.mkdir()
    name = unique_name("chain")
    kerrickpt.run(name, ["sh", "-c", SETUP + STEPS], state_dir=state_dir, rootfs="host", user=str(USER))
    wait_for(lambda: (upper(state_dir, name) / "var/tmp/ready").exists(), what="the container's files", timeout=60)
    time.sleep(layer.RACY_NS / 1e9)  # settled: files changed just before a snapshot's read are carried again
    return name


def snap(state_dir: Path, store: Path, name: str) -> Snapshot:
    return kerrickpt.snapshot(name, store, state_dir=state_dir).snapshot


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_snapshot_of_a_barely_changed_layer_costs_what_changed_and_restores_that_moment(
    state_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    name = start(state_dir, store)
    big = digest(upper(state_dir, name) / "var/tmp/big")
    first = snap(state_dir, store, name)
    changed = cli("exec", name, "--", "sh", "-c", CHANGES, state_dir=state_dir)
    assert changed.returncode == 0, changed.stderr
    second = snap(state_dir, store, name)
    written = len(steps_written(state_dir, name))

    assert first.base is None and second.base == first.id
    assert first.archive_bytes > BIG_MIB << 20
    assert second.archive_bytes < first.archive_bytes // 8, "the 8 MiB that did not change are not carried again"
    listed = cli("snapshots", "list", "--store", str(store), name, state_dir=state_dir)
    assert f"delta on {first.id}" in listed.stdout, listed.stdout

    refused = cli("restore", str(second.path), "--name", unique_name("copy"), state_dir=state_dir)
    assert refused.returncode == 2, refused.stderr
    assert first.id in refused.stderr and "--store" in refused.stderr

    kerrickpt.kill(name, state_dir)
    restored = cli("restore", "--store", str(store), name, state_dir=state_dir)
    assert restored.returncode == 0, restored.stderr
    assert str(second.path) in restored.stdout

    files = upper(state_dir, name) / "var/tmp"
    assert not (files / "gone").exists(), "a file deleted before the snapshot stays deleted"
    assert (files / "replaced").read_text() == "new\n"
    assert stat.S_IMODE(os.stat(files / "mode").st_mode) == 0o600
    assert digest(files / "big") == big
    seen = max(ticks(log(state_dir, name)))
    wait_for(lambda: max(ticks(log(state_dir, name))) > seen + 5, what="steps after the restore")
    steps = steps_written(state_dir, name)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > written, "each record once, going on"


def test_prune_keeps_bases_and_a_chain_without_its_base_is_not_usable(state_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    name = start(state_dir, store)
    taken = [snap(state_dir, store, name) for _ in range(3)]
    assert [s.base for s in taken] == [None, taken[0].id, taken[1].id]

    plan = kerrickpt.Store(store).prune(name, kerrickpt.Policy(last=1))[name]

    assert [(d.item.id, d.keep, d.reasons) for d in plan.decisions] == [
        (taken[2].id, True, ("last #1",)),
        (taken[1].id, True, (f"base of {taken[2].id}",)),
        (taken[0].id, True, (f"base of {taken[1].id}",)),
    ]
    assert [s.id for s in kerrickpt.Store(store).list(name)] == [s.id for s in taken]
    with pytest.raises(ArchiveCorruptError, match="does not hold together"):  # the third on the first, skipping one
        kerrickpt.restore(taken[2].path, name=unique_name("copy"), state_dir=state_dir, bases=[taken[0].path])

    # Bit rot in the whole layer's archive, its record unchanged: only reading it shows it.
    whole = taken[0].path
    mtime = whole.stat().st_mtime_ns
    with whole.open("r+b") as fh:
        fh.seek(whole.stat().st_size // 2)
        piece = fh.read(64)
        fh.seek(-64, os.SEEK_CUR)
        fh.write(bytes(b ^ 0xFF for b in piece))
    os.utime(whole, ns=(mtime, mtime))
    copy = unique_name("copy")

    corrupt = cli("restore", "--store", str(store), name, "--name", copy, state_dir=state_dir)

    assert corrupt.returncode == 6, corrupt.stderr
    assert copy not in [c.name for c in containers.Registry(state_dir).all()]
    assert not (state_dir / "containers" / copy).exists(), "nothing of it was made, nothing ran"

    whole.unlink()
    listed = cli("snapshots", "list", "--store", str(store), name, state_dir=state_dir)
    assert listed.stdout.count("unusable") == 2, listed.stdout
    latest = cli("restore", "--store", str(store), name, "--name", copy, state_dir=state_dir)
    assert latest.returncode == 20 and "no usable snapshot" in latest.stderr, latest.stderr
    at = taken[2].time.isoformat()
    asked = cli("restore", "--store", str(store), name, "--at", at, "--name", copy, state_dir=state_dir)
    assert asked.returncode == 20, asked.stderr
    assert f"since snapshot {taken[0].id}, which is gone" in asked.stderr

    shutil.copy(taken[1].path, whole)  # another layer under the base's name
    swapped = cli("restore", "--store", str(store), name, "--at", at, "--allow-unverified", state_dir=state_dir)
    assert swapped.returncode == 20, swapped.stderr
    assert "is not the layer it was taken on" in swapped.stderr


def test_past_the_longest_chain_a_snapshot_carries_its_whole_layer_again(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layerchain, "MAX_DELTAS", 2)
    store = tmp_path / "store"
    name = start(state_dir, store)

    taken = [snap(state_dir, store, name) for _ in range(5)]

    assert [s.base for s in taken] == [None, taken[0].id, taken[1].id, None, taken[3].id]
    assert taken[3].archive_bytes > BIG_MIB << 20
