"""Confined containers with host ids (`run --ids host`): the user they run as keeps their host uid and groups, so
a job's files on its volumes belong to it, while their root and every other id are of a range of their own, which
has no power over the host's files; they keep their ids through checkpoint, restore and snapshots, and their root
and volumes are nosuid, by the real kernel and CRIU."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import archive, containers, idranges, layer, schema
from kerrickpt.confinement import HOST, RANGE, Confinement
from kerrickpt.errors import ArchiveCorruptError, NoIdRangeError, StateDamagedError, UsageError
from kerrickpt.idmap import IdMap
from tests.helpers import assert_consecutive, cli, ticks, unique_name, wait_for
from tests.test_confined import log, upper
from tests.test_schema import rewrite

pytestmark = pytest.mark.root

USER = 1000
BIG = 1_000_000  # a uid as LDAP gives them: beyond any container range of its own
# Counts in its log and in a volume's file; first leaves a file of its own in its layer.
COUNT = (
    "echo mine > /var/tmp/mine; i=0; "
    'while :; do i=$((i+1)); echo $i > /v/count; echo "tick $i pid $$"; sleep 0.05; done'
)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A host directory any user of a container may write in."""
    directory = tmp_path / "v"
    directory.mkdir()
    directory.chmod(0o777)
    return directory


def run_host_ids(state_dir: Path, argv: list[str], user: str, volume: Path) -> kerrickpt.ContainerStatus:
    name = unique_name("hostids")
    return kerrickpt.run(name, argv, state_dir=state_dir, rootfs="host", user=user, volumes=[f"{volume}:/v"], ids=HOST)


def mount_options(pid: int) -> dict[str, list[str]]:
    """Each mount point of `pid`'s mount namespace and its per-mount options."""
    lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return {line.split()[4]: line.split()[5].split(",") for line in lines}


def claims_of(state_dir: Path, name: str) -> list[str]:
    """The id range claims in STATE/idranges that name the container."""
    directory = state_dir / idranges.DIRECTORY
    found = sorted(directory.iterdir()) if directory.is_dir() else []
    return [path.name for path in found if name in path.read_text()]


def ranged(state_dir: Path, name: str) -> tuple[int, int]:
    """The (uid_base, gid_base) container `name` claimed."""
    return idranges.held(containers.Registry(state_dir))[name]


def test_a_host_ids_container_writes_volume_files_its_user_owns_on_the_host(state_dir: Path, volume: Path) -> None:
    secret = volume / "secret"
    secret.write_text("root's alone\n")
    secret.chmod(0o600)
    status = run_host_ids(state_dir, ["sh", "-c", "id -u > /v/uid; exec sleep 600"], f"{USER}:{USER}", volume)
    wait_for(lambda: (volume / "uid").exists() and (volume / "uid").read_text(), what="the job's file")

    written = (volume / "uid").stat()
    assert (written.st_uid, written.st_gid) == (USER, USER), "the host sees the file as its user's"
    assert (volume / "uid").read_text().strip() == str(USER)
    uid_base, gid_base = ranged(state_dir, status.name)
    uid_map = [line.split() for line in Path(f"/proc/{status.init_pid}/uid_map").read_text().splitlines()]
    assert uid_map == [
        ["0", str(uid_base), str(USER)],
        [str(USER), str(USER), "1"],
        [str(USER + 1), str(uid_base + USER + 1), str(RANGE - USER - 1)],
    ], "its root and other ids its range's, its user the host's own"
    assert Path(f"/proc/{status.init_pid}/gid_map").read_text().split()[:3] == ["0", str(gid_base), str(USER)]
    as_root = cli("exec", status.name, "--", "cat", "/v/secret", state_dir=state_dir)
    assert "Permission denied" in as_root.stderr and "root's alone" not in as_root.stdout, "root: not host root"
    record = containers.Registry(state_dir).get(status.name).confinement
    assert record is not None and record.host_ids and not record.idmapped_lower
    shown = json.loads(cli("ps", "--json", state_dir=state_dir).stdout)
    assert next(row for row in shown if row["name"] == status.name)["ids"] == HOST


def test_a_large_uid_is_checkpointed_and_restored_keeping_its_files(
    state_dir: Path, volume: Path, tmp_path: Path
) -> None:
    status = run_host_ids(state_dir, ["sh", "-c", COUNT], f"{BIG}:{BIG}", volume)
    name = status.name
    wait_for(lambda: len(ticks(log(state_dir, name))) > 3, what="ticks")
    archive = tmp_path / "big.kckpt"

    kerrickpt.checkpoint(name, archive, state_dir=state_dir)
    before = int((volume / "count").read_text())  # where the job stopped
    shown = cli("inspect", str(archive), state_dir=state_dir)
    assert "ids host" in shown.stdout, shown.stdout
    restored = kerrickpt.restore(archive, state_dir=state_dir)

    uid_base, _ = ranged(state_dir, name)
    uid_map = [line.split() for line in Path(f"/proc/{restored.init_pid}/uid_map").read_text().splitlines()]
    assert uid_map == [["0", str(uid_base), str(RANGE)], [str(BIG), str(BIG), "1"]], "its range and its own uid"
    wait_for(lambda: int((volume / "count").read_text() or 0) > before + 3, what="the count to go on")
    assert_consecutive(ticks(log(state_dir, name)))  # from where it stopped: not from 1 again
    written = (volume / "count").stat()
    assert (written.st_uid, written.st_gid) == (BIG, BIG)
    mine = (upper(state_dir, name) / "var/tmp/mine").stat()
    assert (mine.st_uid, mine.st_gid) == (BIG, BIG), "the layer's file kept its true owner"
    said = dict(line.split(":\t", 1) for line in Path(f"/proc/{restored.init_pid}/status").read_text().splitlines())
    assert said["Uid"].split() == [str(BIG)] * 4
    options = mount_options(restored.init_pid)
    assert "nosuid" in options["/"] and "nosuid" in options["/v"], "the restore kept its mounts nosuid"


def test_an_archive_whose_recorded_ids_are_not_what_its_images_map_is_refused_with_exit_6(
    state_dir: Path, volume: Path, tmp_path: Path
) -> None:
    status = run_host_ids(state_dir, ["sh", "-c", COUNT], f"{BIG}:{BIG}", volume)
    wait_for(lambda: len(ticks(log(state_dir, status.name))) > 3, what="ticks")
    checkpointed = tmp_path / "big.kckpt"
    kerrickpt.checkpoint(status.name, checkpointed, state_dir=state_dir)
    body = json.loads(archive.read_index(checkpointed).body)  # type: ignore[union-attr]
    said = {
        # What a user's restore checks is the record: the images must map what it says, nothing else.
        "otherwise than its recorded confinement": {"groups": [BIG + 9]},
        "recorded id map cannot be given": {"uid_base": 4096},  # its root would be a host user's
    }
    for why, change in said.items():
        recorded = json.dumps({**body, "confinement": {**body["confinement"], **change}}).encode()
        bad = tmp_path / "bad.kckpt"
        rewrite(checkpointed, bad, frame=recorded, index=recorded)
        name = unique_name("bad")
        result = cli("restore", str(bad), "--name", name, state_dir=state_dir)
        assert result.returncode == 6 and why in result.stderr, result.stderr
        assert name not in [c.name for c in kerrickpt.ps(state_dir)] and name not in idranges.held(
            containers.Registry(state_dir)
        )
        bad.unlink()
    assert kerrickpt.restore(checkpointed, state_dir=state_dir).name == status.name, "the archive as it was restores"


@pytest.fixture
def setuid_id(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Setuid-root copies of id(1): one in a volume's source, one in the host's /var/tmp, which the container
    sees through its root's lower layer (its own /tmp hides the host's)."""
    volume = tmp_path / "suid"
    volume.mkdir()
    volume.chmod(0o777)
    lower = Path(f"/var/tmp/kerrickpt-suid-{uuid.uuid4().hex[:10]}")
    lower.mkdir(mode=0o755)
    try:
        for directory in (volume, lower):
            shutil.copy("/usr/bin/id", directory / "id")
            os.chown(directory / "id", 0, 0)
            os.chmod(directory / "id", 0o4755)
        yield volume, lower
    finally:
        shutil.rmtree(lower)


def test_a_setuid_root_binary_gives_a_host_ids_container_user_nothing(
    state_dir: Path, setuid_id: tuple[Path, Path]
) -> None:
    volume, lower = setuid_id
    control = subprocess.run(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", str(volume / "id"), "-u"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    assert control.stdout.strip() == "0", "on the host the copy does make its user root"
    script = f"/v/id -u > /v/volume; {lower}/id -u > /v/root; exec sleep 600"

    status = run_host_ids(state_dir, ["sh", "-c", script], f"{USER}:{USER}", volume)
    wait_for(lambda: (volume / "root").exists() and (volume / "root").read_text(), what="both ids to be said")

    assert (volume / "volume").read_text().strip() == str(USER), "a volume is nosuid"
    assert (volume / "root").read_text().strip() == str(USER), "the container's root is nosuid"
    assert "nosuid" in mount_options(status.init_pid)["/v"]


def test_a_snapshot_chain_carries_a_large_uid_layer_and_restores_it(
    state_dir: Path, volume: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    name = run_host_ids(state_dir, ["sh", "-c", COUNT], f"{BIG}:{BIG}", volume).name
    wait_for(lambda: (upper(state_dir, name) / "var/tmp/mine").exists(), what="the job's file")
    first = kerrickpt.snapshot(name, store, state_dir=state_dir).snapshot
    added = cli(
        "exec", name, "--user", f"{BIG}:{BIG}", "--", "sh", "-c", "echo later > /var/tmp/later", state_dir=state_dir
    )
    assert added.returncode == 0, added.stderr
    second = kerrickpt.snapshot(name, store, state_dir=state_dir).snapshot
    assert second.base == first.id, "the second snapshot is a delta"
    kerrickpt.kill(name, state_dir)

    restored = cli("restore", "--store", str(store), name, state_dir=state_dir)

    assert restored.returncode == 0, restored.stderr
    assert len(claims_of(state_dir, name)) == 2, "a uid and a gid range"
    for file in ("mine", "later"):
        owned = (upper(state_dir, name) / "var/tmp" / file).stat()
        assert (owned.st_uid, owned.st_gid) == (BIG, BIG), file


def test_host_ids_need_a_root_of_its_own_and_lift_the_range_limit_on_users(state_dir: Path) -> None:
    alone = cli("run", "--name", unique_name("hostids"), "--ids", HOST, "--", "true", state_dir=state_dir)
    assert alone.returncode == 2 and "--rootfs" in alone.stderr, alone.stderr
    big = ["--rootfs", "host", "--user", str(BIG), "--", "sleep", "600"]
    own = cli("run", "--name", unique_name("hostids"), *big, state_dir=state_dir)
    assert own.returncode == 2 and f"up to {RANGE - 1}" in own.stderr, own.stderr
    host = cli("run", "--name", unique_name("hostids"), "--ids", HOST, *big, state_dir=state_dir)
    assert host.returncode == 0, host.stderr


SOURCE, TARGET = (3_000_000, 3_200_000), (5_000_000, 5_200_000)  # ranges of the node that packs, and that unpacks


def test_a_layer_of_host_ids_packs_and_unpacks_its_true_owners(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    for file, owner in (("user", (BIG, BIG + 1)), ("root", SOURCE), ("host-root", (0, 0))):
        (source / file).write_text("data")
        os.chown(source / file, *owner)
    pieces: list[bytes] = []
    layer.pack(source, IdMap.keeping(*SOURCE, RANGE, [BIG], [BIG + 1]), pieces.append)
    data = b"".join(pieces)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        carried = {m.name: (m.uid, m.gid) for m in tar.getmembers()}
    assert carried["user"] == (BIG, BIG + 1) and carried["root"] == (0, 0)
    assert carried["host-root"] == (layer.NOBODY, layer.NOBODY), "host root is none of the container's"

    target.mkdir()
    layer.unpack(io.BytesIO(data), target, IdMap.keeping(*TARGET, RANGE, [BIG], [BIG + 1]))

    assert [(target / f).stat().st_uid for f in ("user", "root")] == [BIG, TARGET[0]]
    assert [(target / f).stat().st_gid for f in ("user", "root")] == [BIG + 1, TARGET[1]]


def test_the_map_keeps_its_users_ids_and_its_range_around_them() -> None:
    ids = IdMap.keeping(SOURCE[0], SOURCE[1], RANGE, [USER], [0, USER, 27, 28, BIG])
    assert ids.uids == ((0, SOURCE[0], USER), (USER, USER, 1), (USER + 1, SOURCE[0] + USER + 1, RANGE - USER - 1))
    assert ids.gids == (
        (0, SOURCE[1], 27),
        (27, 27, 2),  # consecutive ids: one extent
        (29, SOURCE[1] + 29, USER - 29),
        (USER, USER, 1),
        (USER + 1, SOURCE[1] + USER + 1, RANGE - USER - 1),
        (BIG, BIG, 1),
    )
    assert ids.root == SOURCE and ids.host_gid(0) == SOURCE[1], "root and its group stay the range's"
    assert ids.container_uid(SOURCE[0] + USER) is None, "the range's id the user's stands on is no one"
    assert ids.container_uid(0) is None and ids.host_uid(RANGE) is None
    with pytest.raises(NoIdRangeError) as clash:
        IdMap.keeping(*SOURCE, RANGE, [SOURCE[0] + 5], [USER])
    assert f"uid {SOURCE[0] + 5}" in str(clash.value)


def test_a_range_among_the_node_s_own_ids_is_refused_for_a_user_s_map() -> None:
    for base in (0, 1000, 65535):
        with pytest.raises(NoIdRangeError) as refused:
            IdMap.keeping(base, SOURCE[1], RANGE, [USER], [USER])
        assert f"starts at host uid {base}" in str(refused.value) and refused.value.exit_code == 3
    assert IdMap.keeping(65536, 65536, RANGE, [USER], [USER]).root == (65536, 65536)


def test_a_map_the_kernel_would_not_take_is_refused_before_anything_runs() -> None:
    lines = [(i, 65536 + i, 1) for i in range(341)]  # short lines: under a page, one line too many
    assert len(IdMap(tuple(lines[:340]), ()).uids) == 340
    with pytest.raises(UsageError) as refused:
        IdMap(tuple(lines), ())
    assert "341 lines" in str(refused.value) and "too many groups" in str(refused.value)
    long_ids = [4_000_000_000 + 2 * i for i in range(200)]  # 10 digits each: over a page before 340 lines
    with pytest.raises(UsageError, match="bytes"):
        IdMap.keeping(*SOURCE, RANGE, [USER], long_ids)


def test_old_confinements_are_their_own_ids_and_the_first_host_ids_are_refused() -> None:
    old = {"rootfs": "host", "uid_base": 1_000_000, "gid_base": 1_000_000}
    assert not Confinement.from_dict(old).host_ids
    assert schema.from_archive(old, schema.Confinement, "its confinement").ids == RANGE
    first = {"rootfs": "host", "uid_base": 0, "gid_base": 0, "ids": schema.LEGACY_HOST_IDS}
    with pytest.raises(ArchiveCorruptError) as refused:
        schema.from_archive(first, schema.Confinement, "its confinement")
    assert "maps every id to itself" in str(refused.value) and "neither restores nor keeps" in str(refused.value)
    seen_mapped = {**old, "host_ids": True, "idmapped_lower": True}
    last = 2**32 - 2  # (uid_t) -1 is no one's
    top = {**old, "uid_base": last + 1 - RANGE, "uid": last, "groups": [last]}
    assert schema.from_archive(top, schema.Confinement, "its confinement").uid_base == last + 1 - RANGE
    beyond = [{**top, "uid_base": last + 2 - RANGE}, {**old, "uid": last + 1}, {**old, "groups": [last + 1]}]
    for bad in (seen_mapped, {**old, "ids": RANGE + 1}, *beyond):
        with pytest.raises(ArchiveCorruptError):
            schema.from_archive(bad, schema.Confinement, "its confinement")


def test_a_record_of_the_first_host_ids_is_refused_and_shown_damaged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    registry = containers.Registry(state)
    now = {"rootfs": "host", "uid_base": 1_000_000, "gid_base": 1_000_000}
    first = {"rootfs": "host", "uid_base": 0, "gid_base": 0, "ids": schema.LEGACY_HOST_IDS}
    for name, confinement in (("now", now), ("first", first)):
        registry.reserve(name)
        record = {"name": name, "cgroup": [], "init_pid": 1, "init_start": 1, "command": ["sh"], "created": "x"}
        (registry.path(name) / containers.RECORD).write_text(json.dumps({**record, "confinement": confinement}))
    assert registry.get("now").confinement == Confinement("host", 1_000_000, 1_000_000)
    with pytest.raises(StateDamagedError) as refused:
        registry.get("first")
    assert "maps every id to itself" in str(refused.value) and "`kerrickpt kill first`" in str(refused.value)
    assert {row.name: row.state for row in kerrickpt.ps(state)}["first"] == "damaged"
