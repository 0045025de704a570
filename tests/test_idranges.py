"""Host id ranges: each container holds one no other container on the node shares, and CRIU's images follow it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import containers, idranges
from kerrickpt.errors import ArchiveCorruptError, NoIdRangeError
from kerrickpt.idmap import IdMap
from kerrickpt.isolation import RANGE, IdPool, declared_pool
from tests.helpers import finished, wait_for

UID_FIRST, GID_FIRST = 0x40000000, 0x50000000  # never mapped here: the claims are only files


def pool(ranges: int) -> IdPool:
    return IdPool("test", ((UID_FIRST, ranges * RANGE),), ((GID_FIRST, ranges * RANGE),), ranges)


def in_pool(pair: tuple[int, int], ranges: int) -> bool:
    blocks = [i * RANGE for i in range(ranges)]
    return pair[0] - UID_FIRST in blocks and pair[1] - GID_FIRST in blocks


def reserved(registry: containers.Registry, *names: str) -> containers.Registry:
    for name in names:
        registry.reserve(name)
    return registry


@pytest.mark.root
def test_containers_get_ranges_no_other_holds_and_keep_them(state_dir: Path) -> None:
    registry = reserved(containers.Registry(state_dir), "a", "b", "c")
    got = {name: idranges.claim(registry, name, pool(3)) for name in ("a", "b", "c")}
    assert len(set(got.values())) == 3 and all(in_pool(pair, 3) for pair in got.values())
    assert idranges.claim(registry, "b", pool(3)) == got["b"]  # asking again: the one it holds
    assert idranges.held(registry) == got
    directory = state_dir / idranges.DIRECTORY
    assert directory.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        f"{kind}-{base}" for uid, gid in got.values() for kind, base in (("uid", uid), ("gid", gid))
    )


@pytest.mark.root
def test_a_node_without_a_free_range_refuses_with_exit_3_and_says_how_to_fix_it(state_dir: Path) -> None:
    registry = reserved(containers.Registry(state_dir), "a", "b")
    held = idranges.claim(registry, "a", pool(1))
    with pytest.raises(NoIdRangeError) as full:
        idranges.claim(registry, "b", pool(1))  # "a" is only reserved, not yet recorded: its claim is live
    assert full.value.exit_code == 3 and "/etc/subuid" in str(full.value) and "hold all 1" in str(full.value)
    with pytest.raises(NoIdRangeError) as empty:
        idranges.claim(registry, "b", IdPool("default", (), (), 0))
    assert "no host id range" in str(empty.value) and "root:" in str(empty.value)
    with pytest.raises(NoIdRangeError) as jobs_full:  # users' jobs' pool, the site's: the site widens it
        idranges.claim(registry, "b", declared_pool(UID_FIRST, RANGE, "ids of jobs.toml"))
    assert "widen the ids of jobs.toml" in str(jobs_full.value) and "/etc/subuid" not in str(jobs_full.value)
    assert idranges.held(registry) == {"a": held}


def claim_names(pair: tuple[int, int]) -> set[str]:
    return {f"uid-{pair[0]}", f"gid-{pair[1]}"}


def gc_names(state_dir: Path, *, dry_run: bool = False) -> set[str]:
    return {Path(p.path).name for p in kerrickpt.gc(state_dir, dry_run=dry_run) if p.kind == "id-range"}


@pytest.mark.root
def test_the_range_of_a_container_that_is_gone_is_taken_and_gc_drops_such_claims(state_dir: Path) -> None:
    registry = reserved(containers.Registry(state_dir), "gone", "other")
    taken = idranges.claim(registry, "gone", pool(2))
    other = idranges.claim(registry, "other", pool(2))
    shutil.rmtree(registry.path("gone"))  # its state went without its claims (a crash, an operator's rm)
    assert gc_names(state_dir, dry_run=True) == claim_names(taken)
    registry.reserve("new")
    assert idranges.claim(registry, "new", pool(2)) == taken
    assert idranges.held(registry) == {"new": taken, "other": other}
    assert gc_names(state_dir, dry_run=True) == set()
    shutil.rmtree(registry.path("other"))
    assert gc_names(state_dir) == claim_names(other)
    assert idranges.held(registry) == {"new": taken}
    assert {p.name for p in (state_dir / idranges.DIRECTORY).iterdir()} == claim_names(taken)


@pytest.mark.root
def test_gc_removes_a_claim_whose_writer_died_half_way_but_not_one_being_written(state_dir: Path) -> None:
    registry = containers.Registry(state_dir)
    writer = subprocess.Popen(["true"])
    writer.wait()  # reaped: its pid names no process (unless reused at once, which the kernel avoids)
    directory = state_dir / idranges.DIRECTORY
    directory.mkdir(mode=0o700)
    (directory / f".claim-{writer.pid}-1").write_text("")
    (directory / f".claim-{os.getpid()}-2").write_text("")
    assert gc_names(state_dir) == {f".claim-{writer.pid}-1"}
    assert [p.name for p in directory.iterdir()] == [f".claim-{os.getpid()}-2"]
    assert idranges.held(registry) == {}


@pytest.mark.root
def test_a_container_keeps_the_range_it_prefers_when_free_and_gets_another_when_not(state_dir: Path) -> None:
    registry = reserved(containers.Registry(state_dir), "moved", "second", "crossed", "odd")
    wanted = (UID_FIRST + 2 * RANGE, GID_FIRST + 2 * RANGE)
    assert idranges.claim(registry, "moved", pool(4), prefer=wanted) == wanted
    second = idranges.claim(registry, "second", pool(4), prefer=wanted)
    assert second[0] != wanted[0] and second[1] != wanted[1] and in_pool(second, 4)
    # Any uid range with any gid range of the pool: the node it came from may pair them otherwise.
    free_uids = sorted({UID_FIRST + i * RANGE for i in range(4)} - {wanted[0], second[0]})
    free_gids = sorted({GID_FIRST + i * RANGE for i in range(4)} - {wanted[1], second[1]})
    crossed = (free_uids[0], free_gids[1])
    assert idranges.claim(registry, "crossed", pool(4), prefer=crossed) == crossed
    # Not a range of this pool (cut elsewhere): never taken; what the pool has left is.
    assert idranges.claim(registry, "odd", pool(4), prefer=(UID_FIRST + RANGE // 2, GID_FIRST + RANGE // 2)) == (
        free_uids[1],
        free_gids[0],
    )
    assert len({pair[0] for pair in idranges.held(registry).values()}) == 4


@pytest.mark.root
def test_release_drops_only_that_containers_claims_and_may_be_repeated(state_dir: Path) -> None:
    registry = reserved(containers.Registry(state_dir), "a", "b")
    idranges.claim(registry, "a", pool(2))
    b = idranges.claim(registry, "b", pool(2))
    idranges.release(registry, "a")
    idranges.release(registry, "a")
    idranges.release(registry, "never-claimed")
    assert idranges.held(registry) == {"b": b}
    assert len(list((state_dir / idranges.DIRECTORY).iterdir())) == 2


@pytest.mark.root
def test_threads_claiming_at_once_never_share_a_range(state_dir: Path) -> None:
    names = [f"t{i}" for i in range(12)]
    registry = reserved(containers.Registry(state_dir), *names)
    start = threading.Barrier(len(names))
    got: dict[str, tuple[int, int]] = {}

    def claim(name: str) -> None:
        start.wait()
        got[name] = idranges.claim(registry, name, pool(len(names)))

    threads = [threading.Thread(target=claim, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(got) == len(names) and len(set(got.values())) == len(names)
    assert idranges.held(registry) == got


# Each process claims for its container once the start file exists, and prints the range or the error.
_CLAIMER = """
import json, os, sys, time
from pathlib import Path
from kerrickpt import containers, idranges
from kerrickpt.errors import NoIdRangeError
from kerrickpt.isolation import IdPool
state, name, go, pool = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
registry = containers.Registry(state)
while not go.exists():
    time.sleep(0.001)
try:
    print(json.dumps(idranges.claim(registry, name, IdPool(**pool))))
except NoIdRangeError:
    print("null")
"""


def _claim_at_once(
    state_dir: Path, names: list[str], shared: IdPool, *, held_back: Path | None = None
) -> dict[str, tuple[int, int] | None]:
    """Claim for each of `names` in a process of its own, all at once: with `held_back`, a claim whose flock
    this test holds until every process waits for it, so that they all go for it together."""
    go = state_dir / "go"
    argv = [sys.executable, "-c", _CLAIMER, str(state_dir)]
    held = None if held_back is None else os.open(held_back, os.O_RDONLY)
    claimers: dict[str, subprocess.Popen[str]] = {}
    try:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_EX)
        for name in names:
            spec = json.dumps(shared.to_dict())
            claimers[name] = subprocess.Popen([*argv, name, str(go), spec], stdout=subprocess.PIPE, text=True)
        go.touch()
        if held is not None and held_back is not None:
            wait_for(lambda: _waiting_for(held_back) == len(names), timeout=120, what="every claimer waiting")
            os.close(held)
            held = None
        answers = {name: finished(claimer, 120)[0] for name, claimer in claimers.items()}
    finally:
        if held is not None:
            os.close(held)
        for claimer in claimers.values():
            if claimer.poll() is None:
                claimer.kill()
                claimer.wait()
    assert all(claimer.returncode == 0 for claimer in claimers.values())
    return {name: tuple(pair) if (pair := json.loads(answer)) else None for name, answer in answers.items()}


def _waiting_for(path: Path) -> int:
    """How many processes wait for the flock of `path` (/proc/locks marks waiters with `->`)."""
    inode = f":{path.stat().st_ino}"
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line.split() and any(f.endswith(inode) for f in line.split()))


@pytest.mark.root
def test_processes_claiming_at_once_never_share_a_range(state_dir: Path) -> None:
    names = [f"p{i}" for i in range(8)]
    registry = reserved(containers.Registry(state_dir), *names)
    got = _claim_at_once(state_dir, names, pool(len(names)))
    assert None not in got.values() and len(set(got.values())) == len(names)
    assert idranges.held(registry) == got


@pytest.mark.root
def test_processes_racing_for_the_one_range_a_gone_container_held_leave_it_to_exactly_one(state_dir: Path) -> None:
    registry = reserved(containers.Registry(state_dir), "gone")
    freed = idranges.claim(registry, "gone", pool(1))
    shutil.rmtree(registry.path("gone"))  # gone without releasing its claims
    names = [f"r{i}" for i in range(8)]
    reserved(registry, *names)
    got = _claim_at_once(state_dir, names, pool(1), held_back=state_dir / idranges.DIRECTORY / f"uid-{freed[0]}")
    assert list(got.values()).count(freed) == 1 and list(got.values()).count(None) == len(names) - 1
    winner = next(name for name, pair in got.items() if pair)
    assert idranges.held(registry) == {winner: freed}


def _userns_image(path: Path, uid_map: list[dict[str, int]], gid_map: list[dict[str, int]]) -> None:
    """A user namespace image as CRIU 4.2.1 writes it (userns-N.img of a dumped task in its own user namespace)."""
    from pycriu import images

    with open(path, "wb") as fh:
        images.dump({"magic": "USERNS", "entries": [{"uid_map": uid_map, "gid_map": gid_map}]}, fh)


def _load(path: Path) -> dict[str, object]:
    from pycriu import images

    with open(path, "rb") as fh:
        return images.load(fh)


def test_remapped_images_get_the_map_of_the_new_range(tmp_path: Path) -> None:
    image = tmp_path / "userns-13.img"
    user = 1000  # a user's job: their uid the host's own, every other id the range's
    archived = IdMap.keeping(524288, 589824, RANGE, [user], [user])
    restored = IdMap.keeping(1048576, 2097152, RANGE, [user], [user])
    _userns_image(image, _as_criu(archived.uids), _as_criu(archived.gids))
    os.chmod(image, 0o600)
    (tmp_path / "core-1.img").write_bytes(b"untouched")
    assert idranges.remap_images(tmp_path, archived, restored)
    assert _load(image)["entries"] == [
        {
            "uid_map": [
                {"first": 0, "lower_first": 1048576, "count": 1000},
                {"first": 1000, "lower_first": 1000, "count": 1},
                {"first": 1001, "lower_first": 1049577, "count": 64535},
            ],
            "gid_map": _as_criu(restored.gids),
        }
    ]
    assert image.stat().st_mode & 0o7777 == 0o600 and image.stat().st_uid == os.geteuid()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["core-1.img", "userns-13.img"]  # nothing left aside
    written = image.stat().st_ino
    assert not idranges.remap_images(tmp_path, restored, restored)  # already there: not rewritten
    assert image.stat().st_ino == written


def test_an_image_that_maps_otherwise_than_the_recorded_confinement_is_refused(tmp_path: Path) -> None:
    recorded = IdMap.keeping(524288, 589824, RANGE, [1000], [1000])
    other = 1001  # the image keeps another user's uid the host's own, which the archive does not say
    for uid_map in (
        _as_criu(IdMap.keeping(524288, 589824, RANGE, [other], [1000]).uids),
        _as_criu(IdMap.shifted(524288, 589824, RANGE).uids),
        [{"first": 0, "lower_first": 0, "count": 4294967295}],  # every id itself: host root
    ):
        _userns_image(tmp_path / "userns-13.img", uid_map, _as_criu(recorded.gids))
        with pytest.raises(ArchiveCorruptError) as refused:
            idranges.remap_images(tmp_path, recorded, IdMap.keeping(1048576, 2097152, RANGE, [1000], [1000]))
        assert refused.value.exit_code == 6 and "otherwise than its recorded confinement" in str(refused.value)


def _as_criu(extents: tuple[tuple[int, int, int], ...]) -> list[dict[str, int]]:
    return [{"first": first, "lower_first": lower, "count": count} for first, lower, count in extents]


# userns-12.img as CRIU 4.2.1 wrote it here, dumping a task whose user namespace mapped ids 0-65535 to
# host ids 1610612736-1610678271 (uid and gid).
CRIU_USERNS_IMAGE = bytes.fromhex("19435654064947551c0000000a0c080010808080800618808004120c080010808080800618808004")
CRIU_MAP = IdMap.shifted(1610612736, 1610612736, RANGE)


def test_an_image_criu_wrote_is_moved_to_the_new_range(tmp_path: Path) -> None:
    image = tmp_path / "userns-12.img"
    image.write_bytes(CRIU_USERNS_IMAGE)
    moved = IdMap.shifted(524288, 589824, RANGE)
    assert idranges.remap_images(tmp_path, CRIU_MAP, moved)
    assert _load(image) == {
        "magic": "USERNS",
        "entries": [
            {
                "uid_map": [{"first": 0, "lower_first": 524288, "count": 65536}],
                "gid_map": [{"first": 0, "lower_first": 589824, "count": 65536}],
            }
        ],
    }
    assert idranges.remap_images(tmp_path, moved, CRIU_MAP)
    assert image.read_bytes() == CRIU_USERNS_IMAGE  # and back, byte for byte


def test_images_without_a_user_namespace_are_left_as_they_are(tmp_path: Path) -> None:
    assert not idranges.remap_images(tmp_path, CRIU_MAP, IdMap.shifted(1048576, 1048576, RANGE))


def test_a_damaged_user_namespace_image_is_a_corrupt_archive(tmp_path: Path) -> None:
    (tmp_path / "userns-13.img").write_bytes(b"not an image at all")
    with pytest.raises(ArchiveCorruptError) as refused:
        idranges.remap_images(tmp_path, CRIU_MAP, IdMap.shifted(1048576, 1048576, RANGE))
    assert refused.value.exit_code == 6 and "userns-13.img" in str(refused.value)
