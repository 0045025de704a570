"""The snapshot store: only whole, recorded archives are listed; leftovers of dead runs are swept; rot is found."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kerrickpt import archivewriter
from kerrickpt import store as snapshot_store
from kerrickpt.errors import (
    ArchiveCorruptError,
    BusyError,
    DumpFailed,
    SnapshotNotFoundError,
    UntrustedStoreError,
    UsageError,
)
from kerrickpt.manifest import Manifest
from kerrickpt.node import Fingerprint
from kerrickpt.retention import CORRUPT, Policy
from kerrickpt.store import Snapshot, Store
from tests.helpers import cli

SOURCE = Fingerprint("x86_64", "6.1.0", "debian 12", "4.2.1", ("fpu",), 4096, "v2", hostname="node-a")
T0 = datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    (tmp_path / "store").mkdir()
    return Store(tmp_path / "store")


def write_incoming(store: Store, name: str, when: datetime) -> Path:
    """What a run's checkpoint leaves for `publish`: a complete archive under the incoming name."""
    image = store.root.parent / "pages.img"
    image.write_bytes(os.urandom(50_000))
    manifest = Manifest(
        name=name,
        created=when.isoformat(timespec="milliseconds"),
        source=SOURCE,
        processes=[],
        command=["sh"],
        timings={"frozen_s": 0.05},
    )
    store.directory(name).mkdir(exist_ok=True)
    archivewriter.write(store.incoming(name), manifest, {"images/pages-1.img": image})
    return store.incoming(name)


def take(store: Store, name: str, when: datetime) -> Snapshot:
    with store.lock(name):
        write_incoming(store, name, when)
        return store.publish(name)


def flip_byte_keeping_mtime(path: Path) -> None:
    """Damage no record can see: same size, same modification time."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_published_snapshots_are_listed_with_what_operators_need(store: Store) -> None:
    taken = [take(store, "job1", T0 + timedelta(hours=h)) for h in range(3)]
    take(store, "job2", T0)

    listed = store.list("job1")

    assert listed == taken
    assert [s.id for s in listed] == ["20250301T120000.123Z", "20250301T130000.123Z", "20250301T140000.123Z"]
    first = listed[0]
    assert first.time == T0 and first.node == "node-a" and first.frozen_s == 0.05
    assert first.verified and first.archive_bytes == first.path.stat().st_size
    assert first.path.stat().st_mode & 0o777 == 0o600
    assert [s.name for s in store.list()] == ["job1"] * 3 + ["job2"]
    assert store.names() == ["job1", "job2"]
    assert store.latest("job1") == taken[2]
    assert store.at("job1", T0 + timedelta(hours=1, minutes=30)) == taken[1]
    assert store.at("job1", taken[1].time) == taken[1], "an id as a time picks exactly that snapshot"
    with pytest.raises(SnapshotNotFoundError) as none:
        store.at("job1", T0 - timedelta(seconds=1))
    assert none.value.exit_code == 20
    with pytest.raises(SnapshotNotFoundError):
        store.latest("job3")


def test_leftovers_of_dead_runs_are_never_listed_and_are_cleaned_under_the_lock(store: Store) -> None:
    kept = take(store, "job1", T0)
    directory = store.directory("job1")
    with store.lock("job1"):
        write_incoming(store, "job1", T0 + timedelta(hours=1))  # died before publishing
    leftovers = [
        directory / "..incoming.kckpt.partial-4242-99",  # died while compressing
        directory / "20250301T130000.123Z.meta",  # died between the record and the link
        directory / ".20250301T130000.123Z.meta.tmp-4242",  # died while writing the record
    ]
    for path in leftovers:
        path.write_text("{")
    (directory / ".nfs000123").write_text("")  # not kerrickpt's: left alone

    assert store.list() == [kept]
    with store.lock("job1"):
        cleaned = store.clean("job1")

    assert sorted(cleaned) == sorted([*leftovers, store.incoming("job1")])
    assert sorted(p.name for p in directory.iterdir()) == [".lock", ".nfs000123", f"{kept.id}.kckpt", f"{kept.id}.meta"]


def test_an_archive_without_its_record_is_listed_unverified_until_verified(store: Store) -> None:
    taken = take(store, "job1", T0)
    copied = store.directory("job1") / "20250302T000000.000Z.kckpt"
    shutil.copyfile(taken.path, copied)

    listed = store.list("job1")

    assert [(s.id, s.status, s.node) for s in listed] == [
        (taken.id, "verified", "node-a"),
        ("20250302T000000.000Z", "unverified", "node-a"),
    ]
    assert [s.status for s in store.verify("job1")] == ["verified", "verified"]
    assert [s.status for s in store.list("job1")] == ["verified", "verified"]


def test_verify_finds_damage_and_a_damaged_snapshot_is_never_picked(store: Store) -> None:
    older, newer = take(store, "job1", T0), take(store, "job1", T0 + timedelta(hours=1))
    flip_byte_keeping_mtime(newer.path)
    assert store.latest("job1") == newer, "until verified, the record vouches for the archive"

    checked = store.verify()

    assert [s.status for s in checked] == ["verified", "corrupt"]
    assert f"{newer.path} is corrupt" in str(checked[1].error)
    assert [s.status for s in store.list("job1")] == ["verified", "corrupt"]
    assert store.latest("job1").id == older.id
    plan = store.plan("job1", Policy(last=1), now=T0 + timedelta(hours=2))
    assert [(d.item.id, d.keep, d.reasons) for d in plan.decisions] == [
        (newer.id, False, (CORRUPT,)),
        (older.id, True, ("last #1",)),
    ]


def test_publish_never_replaces_a_snapshot(store: Store) -> None:
    first = take(store, "job1", T0)
    record = first.path.with_suffix(".meta").read_bytes()
    with store.lock("job1"):
        write_incoming(store, "job1", T0)
        with pytest.raises(DumpFailed, match="exists already"):
            store.publish("job1")
    assert store.list("job1") == [first] and first.path.with_suffix(".meta").read_bytes() == record


def test_a_damaged_incoming_archive_is_not_published(store: Store) -> None:
    with store.lock("job1"):
        flip_byte_keeping_mtime(write_incoming(store, "job1", T0))
        with pytest.raises(ArchiveCorruptError):
            store.publish("job1")
    assert [p.name for p in store.directory("job1").iterdir()] == [".lock"]


def test_prune_removes_what_no_rule_keeps_and_dry_run_removes_nothing(store: Store) -> None:
    taken = [take(store, "job1", T0 + timedelta(hours=h)) for h in range(3)]
    other = take(store, "job2", T0)
    later = T0 + timedelta(hours=3)

    dry = store.prune(None, Policy(last=1), now=later, dry_run=True)

    assert {name: [s.id for s in plan.removed] for name, plan in dry.items()} == {
        "job1": [taken[1].id, taken[0].id],
        "job2": [],
    }
    assert len(store.list()) == 4
    store.prune("job1", Policy(last=1), now=later)
    assert store.list() == [taken[2], other]
    assert sorted(p.name for p in store.directory("job1").iterdir()) == [
        ".lock",
        f"{taken[2].id}.kckpt",
        f"{taken[2].id}.meta",
    ]
    with pytest.raises(UsageError, match="--keep"):
        store.prune("job1", Policy())


def test_prune_waits_for_a_run_holding_the_lock(store: Store) -> None:
    take(store, "job1", T0)
    with store.lock("job1"), pytest.raises(BusyError, match="is working on the snapshots of job1"):
        store.prune("job1", Policy(last=1), wait=0.1)


def test_the_store_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="create it first"):
        Store(tmp_path / "missing")


def test_a_series_stays_tied_to_its_source(store: Store) -> None:
    # Two cgroups named job under different parents must not share one series (and its pruning).
    with store.lock("job"):
        store.claim("job", "cgroup /sys/fs/cgroup/a/job")
        store.claim("job", "cgroup /sys/fs/cgroup/a/job")
        with pytest.raises(UsageError, match="are of cgroup /sys/fs/cgroup/a/job"):
            store.claim("job", "cgroup /sys/fs/cgroup/b/job")


def test_an_unverified_snapshot_is_never_picked_unless_allowed(store: Store) -> None:
    verified = take(store, "job1", T0)
    planted = store.directory("job1") / "20250302T000000.000Z.kckpt"
    shutil.copyfile(verified.path, planted)

    assert store.latest("job1") == verified
    assert store.at("job1", allow_unverified=True).path == planted
    shutil.copyfile(planted, store.directory("job1") / "20250101T000000.000Z.kckpt")
    with pytest.raises(SnapshotNotFoundError, match=r"unverified: 20250101T000000\.000Z"):
        store.at("job1", T0 - timedelta(days=1))


@pytest.mark.parametrize(
    ("mode", "owner"),
    [(0o770, 0), (0o757, 0), (0o1777, 0), (0o700, 65534)],
    ids=["group-writable", "others-writable", "sticky-world-writable", "not-roots"],
)
def test_a_store_or_series_others_may_write_in_is_refused(tmp_path: Path, mode: int, owner: int) -> None:
    if owner != os.geteuid() and os.geteuid() != 0:
        pytest.skip("needs root, to give a directory away")
    (tmp_path / "trusted").mkdir()
    trusted = Store(tmp_path / "trusted")
    take(trusted, "job1", T0)
    for untrusted in (trusted.root, trusted.directory("job1")):
        os.chmod(untrusted, mode)
        os.chown(untrusted, owner, -1)

        with pytest.raises(UntrustedStoreError, match=f"refusing snapshot (store|series) {untrusted}") as refused:
            Store(trusted.root).at("job1", allow_unverified=True)

        assert refused.value.exit_code == 21
        os.chmod(untrusted, 0o700)
        os.chown(untrusted, os.geteuid(), -1)


def test_a_store_under_a_directory_others_may_write_in_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "store").mkdir(parents=True)
    shared.chmod(0o777)  # anyone could move the store aside and put another in its place

    with pytest.raises(UntrustedStoreError, match=f"{shared} above it is writable by group or others"):
        Store(shared / "store")


def test_a_series_that_is_a_symlink_is_refused(store: Store, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    store.directory("job1").symlink_to(elsewhere)

    with pytest.raises(UntrustedStoreError, match="is a symbolic link"):
        store.list("job1")
    with pytest.raises(UntrustedStoreError):
        store.lock("job1")


def test_a_record_is_never_written_through_a_planted_symlink(store: Store, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    with store.lock("job1"):
        # Where a record's temporary file used to go, a name anyone could tell beforehand.
        (store.directory("job1") / f".{snapshot_store.SOURCE}.tmp-{os.getpid()}").symlink_to(victim)
        store.claim("job1", "container job1")

    assert victim.read_text() == "precious\n"
    assert (store.directory("job1") / snapshot_store.SOURCE).read_text() == "container job1\n"


def test_the_command_refuses_an_untrusted_store_with_exit_21(store: Store) -> None:
    take(store, "job1", T0)
    store.root.chmod(0o777)

    listed = cli("snapshots", "list", "--store", str(store.root), "--json")
    restored = cli("restore", "--store", str(store.root), "job1")

    assert listed.returncode == 21 and json.loads(listed.stdout)["error"] == "UntrustedStoreError"
    assert restored.returncode == 21 and "writable by group or others" in restored.stderr
