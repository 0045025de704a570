"""What `kerrickpt check` says about containers with their own root and users: overlayfs, user namespaces, id ranges."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kerrickpt import containers, isolation
from tests.helpers import KERRICKPT, cli


@pytest.mark.root
def test_this_node_offers_overlayfs_user_namespaces_and_id_ranges(state_dir: Path) -> None:
    shown = cli("check", "--json", state_dir=state_dir)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["features"]["overlay"] is True and report["features"]["user_namespaces"] is True
    assert report["features"]["idmapped_lower"] is True
    assert report["id_ranges"]["ranges"] > 0
    missing = ("no overlay", "no user_namespaces", "no idmapped_lower")
    assert not [note for note in report["notes"] if note.startswith(missing)]
    assert "overlay=yes, user_namespaces=yes, idmapped_lower=yes" in cli("check", state_dir=state_dir).stdout


@pytest.mark.root
def test_the_overlay_probe_writes_to_its_own_layer_and_leaves_nothing_behind(state_dir: Path) -> None:
    scratch = containers.Registry(state_dir).scratch_dir("overlay-probe-")
    assert isolation.overlay(scratch).works
    assert not scratch.exists()
    assert str(state_dir) not in Path("/proc/self/mountinfo").read_text()
    assert not Path("/", isolation.PROBE_FILE).exists()  # written through the overlay: never in the host's root


@pytest.mark.root
def test_a_state_directory_where_no_overlay_upper_layer_can_live_is_reported_but_still_ready(tmp_path: Path) -> None:
    # The kernel refuses an overlay as another overlay's upper layer. The mounts live in a private
    # mount namespace that ends with the shell, so nothing outlives the test.
    script = (
        'set -e; mount -t tmpfs kerrickpt-test "$1"; cd "$1"; mkdir lower upper work merged; '
        "mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work merged; "
        'shift; exec "$@"'
    )
    fs = tmp_path / "fs"
    fs.mkdir()
    argv = [*KERRICKPT, "check", "--json", "--state-dir", str(fs / "merged" / "state")]
    shown = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(fs), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr  # today's plain containers do not need it
    report = json.loads(shown.stdout)
    assert report["ready"] is True and report["features"]["overlay"] is False
    assert report["features"]["user_namespaces"] is True and report["features"]["idmapped_lower"] is False
    why = [note for note in report["notes"] if note.startswith("no overlay:")]
    assert len(why) == 1 and "may not hold an upper layer" in why[0]
    assert not any(fs.iterdir())  # the tmpfs went with the namespace


@pytest.mark.root
def test_a_range_the_kernel_cannot_map_means_no_user_namespaces() -> None:
    beyond = ((2**32 - 2**10, isolation.RANGE),)  # runs past the last uid
    probe = isolation.user_namespaces(isolation.IdPool("test", beyond, beyond, 1))
    assert not probe.works and "mapping 65536 ids" in probe.why_not


def test_root_entries_in_subuid_and_subgid_make_the_pool(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\nroot:200000:131072\n0:400000:70000\n")
    subgid.write_text("root:300000:65536\n")
    pool = isolation.id_pool(subuid, subgid)
    assert pool.source == f"{subuid} and {subgid}"
    assert pool.uids == ((200000, 131072), (400000, 65536)) and pool.gids == ((300000, 65536),)
    assert pool.ranges == 1 and pool.first() == (200000, 300000)


def test_without_root_entries_the_default_pool_skips_other_users_ids(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    first, count = isolation.DEFAULT_POOL
    subuid.write_text(f"alice:{first + 10}:65536\n")  # overlaps the first two ranges of the pool
    pool = isolation.id_pool(subuid, tmp_path / "missing")
    assert pool.source == "default" and pool.uids == pool.gids
    assert pool.first() == (first + 2 * isolation.RANGE,) * 2
    assert pool.ranges == count // isolation.RANGE - 2
    subgid.write_text("root:1000:5\n")  # root needs entries in both files
    assert isolation.id_pool(subuid, subgid).source == "default"


def test_no_pool_holds_the_node_s_own_ids_below_65536(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("root:0:196608\n")  # its first range would make a container's root host root
    subgid.write_text("root:0:65536\nroot:65536:65536\n")
    pool = isolation.id_pool(subuid, subgid)
    assert pool.uids == ((65536, 131072),) and pool.gids == ((65536, 65536),) and pool.first() == (65536, 65536)
    assert isolation.declared_pool(0, 3 * isolation.RANGE, "test").uids == ((65536, 131072),)


def test_a_pool_says_which_ids_it_holds_and_whether_it_meets_another() -> None:
    jobs = isolation.declared_pool(0x70000000, 4 * isolation.RANGE, "test")
    assert jobs.ranges == 4 and jobs.uids == jobs.gids == ((0x70000000, 4 * isolation.RANGE),)
    assert jobs.holding([1000, 0x70000000], [0x70000000 + 4 * isolation.RANGE, 0x70000005]) == [
        f"uid {0x70000000}",
        f"gid {0x70000005}",
    ]
    first, count = isolation.DEFAULT_POOL
    assert not jobs.overlaps(isolation.declared_pool(first, count, "default"))
    assert jobs.overlaps(isolation.declared_pool(0x70000000 + 3 * isolation.RANGE, isolation.RANGE, "other"))
