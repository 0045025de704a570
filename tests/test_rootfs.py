"""What a confined container sees of its lower layer's owners: the host's ids through its id map (an idmapped
lower layer), kept through a checkpoint and restore, and the layer as is where the node refuses that."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import containers, isolation
from kerrickpt.confinement import Confinement
from kerrickpt.localnodes import Cluster
from tests.helpers import cli, ticks, unique_name, wait_for
from tests.test_confined import log, upper

pytestmark = pytest.mark.root

POSTGRES_LIKE = (101, 104)  # a host system user's ids, as Debian's postgres has
COUNT = 'i=0; while :; do i=$((i+1)); echo "tick $i pid $$"; sleep 0.05; done'


def confinement(state_dir: Path, name: str) -> Confinement:
    record = containers.Registry(state_dir).get(name).confinement
    assert record is not None
    return record


@pytest.fixture
def host_fixture() -> Iterator[Path]:
    """A directory on the host's root file system (so in a `--rootfs host` container's lower layer), owned by
    a system user's ids."""
    path = Path("/var/tmp", unique_name("kerrickpt-idmap"))
    path.mkdir()
    try:
        os.chown(path, *POSTGRES_LIKE)
        yield path
    finally:
        shutil.rmtree(path)


def test_host_owners_are_the_containers_own_and_stay_so_through_a_restore(
    state_dir: Path, host_fixture: Path, tmp_path: Path
) -> None:
    name = unique_name("idm")
    made = f"/var/lib/{name}"
    script = f"mkdir {made} && stat -c %u:%g /etc/hostname {host_fixture} > {made}/owners; {COUNT}"
    kerrickpt.run(name, ["sh", "-c", script], state_dir=state_dir, rootfs="host")
    wait_for(lambda: len(ticks(log(state_dir, name))) > 2, what="ticks")
    record = confinement(state_dir, name)
    assert record.idmapped_lower
    layer = upper(state_dir, name)
    assert (layer / made.lstrip("/") / "owners").read_text().split() == ["0:0", "101:104"]
    # Host root's /var/lib was copied up as the container root's, and its new directory is its root's:
    # container ids, as the checkpoint packs them (a host root's file would be nobody's).
    assert (layer / "var/lib").stat().st_uid == record.uid_base
    assert (layer / made.lstrip("/")).stat().st_uid == record.uid_base

    archive = tmp_path / "idm.kckpt"
    kerrickpt.checkpoint(name, archive, state_dir=state_dir)
    assert "its lower layer seen through its id map" in cli("inspect", str(archive)).stdout
    kerrickpt.restore(archive, state_dir=state_dir)

    after = confinement(state_dir, name)
    assert after.idmapped_lower
    seen = max(ticks(log(state_dir, name)))
    wait_for(lambda: max(ticks(log(state_dir, name))) > seen + 2, what="ticks after the restore")
    script = f"touch {host_fixture}/by-101 && stat -c %u:%g /etc/hostname && cat {made}/owners"
    shown = cli("exec", name, "--user", "101", "--", "sh", "-c", script, state_dir=state_dir)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["0:0", "0:0", "101:104"]
    written = upper(state_dir, name) / host_fixture.relative_to("/") / "by-101"
    assert written.stat().st_uid == after.uid_base + 101, "uid 101's directory is uid 101's inside"
    assert not (host_fixture / "by-101").exists(), "the host's directory is untouched"


def test_a_migrated_container_sees_the_hosts_owners_as_its_own_on_the_target(cluster: Cluster) -> None:
    source, target = cluster.nodes
    name = unique_name("idmig")
    made = f"/var/lib/{name}"
    started = source.kerrickpt("run", "--name", name, "--rootfs", "host", "--", "sh", "-c", f"mkdir {made}; {COUNT}")
    assert started.returncode == 0, started.stderr
    wait_for(lambda: len(ticks(log(source.state_dir, name))) > 2, what="ticks")

    moved = source.kerrickpt("migrate", name, *cluster.migrate_args(target), "--json")

    assert moved.returncode == 0, moved.stderr
    shown = target.kerrickpt("exec", name, "--", "stat", "-c", "%u:%g", "/etc/hostname", made)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["0:0", "0:0"], "host root's file and its own directory are its root's there"
    assert confinement(target.state_dir, name).idmapped_lower


def busybox_root(root: Path) -> Path:
    """A tiny image: a static busybox and a few of its commands, owned by host root but `srv/data`."""
    for directory in ("bin", "etc", "var/lib", "srv/data"):
        (root / directory).mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "stat", "mkdir", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    os.chown(root / "srv/data", *POSTGRES_LIKE)
    return root


IMAGE_SCRIPT = "stat -c %u:%g /etc /srv/data > /owners; mkdir /var/lib/made 2>/made-error; exec sleep 600"


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox to make an image of")
def test_an_image_directory_owned_by_host_root_is_the_containers_root(state_dir: Path, tmp_path: Path) -> None:
    root = busybox_root(tmp_path / "image")
    name = unique_name("img")
    kerrickpt.run(name, ["sh", "-c", IMAGE_SCRIPT], state_dir=state_dir, rootfs=str(root))
    layer = upper(state_dir, name)
    wait_for(lambda: (layer / "made-error").exists(), what="the script")
    assert confinement(state_dir, name).idmapped_lower
    assert (layer / "owners").read_text().split() == ["0:0", "101:104"]
    assert (layer / "var/lib/made").is_dir() and not (root / "var/lib/made").exists()


@contextlib.contextmanager
def ramfs(path: Path) -> Iterator[Path]:
    """A ramfs at `path`: a file system without idmapped mounts."""
    path.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "kerrickpt-test", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox to make an image of")
def test_a_root_without_idmapped_mounts_runs_as_is_and_says_so(state_dir: Path, tmp_path: Path) -> None:
    with ramfs(tmp_path / "ram") as ram:
        root = busybox_root(ram)
        name = unique_name("ram")
        kerrickpt.run(name, ["sh", "-c", IMAGE_SCRIPT], state_dir=state_dir, rootfs=str(root))
        layer = upper(state_dir, name)
        wait_for(lambda: (layer / "made-error").exists(), what="the script")
        record = confinement(state_dir, name)
        assert not record.idmapped_lower
        assert (layer / "owners").read_text().split() == ["65534:65534", "65534:65534"], "nobody's, as before"
        assert "Permission denied" in (layer / "made-error").read_text()
        kerrickpt.kill(name, state_dir)


def test_a_target_without_idmapped_lower_layers_cannot_take_an_idmapped_container() -> None:
    confined = Confinement("host", 1 << 20, 1 << 20, idmapped_lower=True)
    features = {"overlay": True, "user_namespaces": True, "idmapped_lower": False}
    assert isolation.lacking(confined, features) == ["no idmapped_lower here (see `kerrickpt check`)"]
    plain = Confinement("host", 1 << 20, 1 << 20)
    assert isolation.lacking(plain, features) == [], "one that ran with its lower layer as is needs none"


def test_the_idmapped_lower_probe_stages_a_root_and_leaves_nothing_behind(state_dir: Path) -> None:
    scratch = containers.Registry(state_dir).scratch_dir("idmap-probe-")
    assert isolation.idmapped_lower(isolation.id_pool(), scratch) == isolation.Probe(True)
    assert not scratch.exists()
    assert str(state_dir) not in Path("/proc/self/mountinfo").read_text()


def test_a_range_the_kernel_cannot_map_means_no_idmapped_lower(state_dir: Path) -> None:
    beyond = ((2**32 - 2**10, isolation.RANGE),)  # runs past the last uid
    scratch = containers.Registry(state_dir).scratch_dir("idmap-probe-")
    probe = isolation.idmapped_lower(isolation.IdPool("test", beyond, beyond, 1), scratch)
    assert not probe.works and "id map" in probe.why_not
    assert not scratch.exists()
