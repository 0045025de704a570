"""A container's standard output and error in files its caller holds open (a Slurm job's output file): they
grow on until the checkpoint, and a restore continues them in the files it is handed, or in the container's log."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import containers, criuopts
from kerrickpt.localnodes import Cluster
from tests.helpers import assert_consecutive, unique_name, wait_for

pytestmark = pytest.mark.root

COUNT = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"
RUN_ON_NODE = """
import os, sys, kerrickpt
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
kerrickpt.run(sys.argv[1], ["sh", "-c", sys.argv[3]], stdout=fd, stderr=fd)
"""
KINDS = pytest.mark.parametrize("rootfs", [None, "host"], ids=["plain", "confined"])


def counted(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().splitlines() if line.isdigit()]


@contextmanager
def opened(path: Path) -> Iterator[int]:
    """`path` opened as Slurm opens a job's output file with --open-mode=append."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def growing(path: Path, beyond: int = 0) -> None:
    wait_for(lambda: len(counted(path)) > beyond + 3, what=f"counting on in {path.name}")


def run_counter(state_dir: Path, out: Path, rootfs: str | None) -> str:
    name = unique_name("io")
    with opened(out) as fd:
        kerrickpt.run(name, ["sh", "-c", COUNT], state_dir=state_dir, rootfs=rootfs, stdout=fd, stderr=fd)
    growing(out)
    return name


def restore_into(archive: Path, state_dir: Path, out: Path, *, unpacked: bool = False) -> None:
    """Restore with `out` as the container's output: streamed into CRIU from the archive file (CRIU's command
    line), or `unpacked` first, as an archive that comes on a stream is (CRIU's RPC)."""
    with opened(out) as fd, archive.open("rb") as stream:
        kerrickpt.restore(stream if unpacked else archive, state_dir=state_dir, stdout=fd, stderr=fd)


def log_of(state_dir: Path, name: str) -> Path:
    return state_dir / "containers" / name / "log"


@KINDS
def test_output_goes_on_in_the_files_a_restore_hands_in(state_dir: Path, tmp_path: Path, rootfs: str | None) -> None:
    a, b, c = tmp_path / "a.out", tmp_path / "b.out", tmp_path / "c.out"
    name = run_counter(state_dir, a, rootfs)
    assert log_of(state_dir, name).read_text() == "", "nothing goes to its log"

    kerrickpt.checkpoint(name, tmp_path / "1.kckpt", state_dir=state_dir)
    before = counted(a)
    restore_into(tmp_path / "1.kckpt", state_dir, b)
    growing(b)
    assert_consecutive(before + counted(b))  # no gap, no repeat
    assert counted(a) == before, "the first file got nothing after the checkpoint"
    record = containers.Registry(state_dir).get(name).stdio
    assert record is not None and record.stdout == record.stderr == criuopts.file_key(b)

    # The restored container names its new file to the next checkpoint.
    kerrickpt.checkpoint(name, tmp_path / "2.kckpt", state_dir=state_dir)
    middle = counted(b)
    restore_into(tmp_path / "2.kckpt", state_dir, c, unpacked=True)
    growing(c)
    assert_consecutive(before + middle + counted(c))
    assert counted(b) == middle


@KINDS
def test_restored_without_files_it_writes_on_into_its_log(state_dir: Path, tmp_path: Path, rootfs: str | None) -> None:
    a = tmp_path / "a.out"
    name = run_counter(state_dir, a, rootfs)
    kerrickpt.checkpoint(name, tmp_path / "c.kckpt", state_dir=state_dir)
    before = counted(a)

    result = kerrickpt.restore(tmp_path / "c.kckpt", state_dir=state_dir)
    log = log_of(state_dir, name)
    growing(log)
    assert_consecutive(before + counted(log))
    assert counted(a) == before
    assert containers.Registry(state_dir).get(name).stdio is None, "its output is its log now"
    assert result.warnings == []


@KINDS
def test_a_snapshot_leaves_the_file_to_the_container_and_its_copy_takes_another(
    state_dir: Path, tmp_path: Path, rootfs: str | None
) -> None:
    a, b = tmp_path / "a.out", tmp_path / "b.out"
    name = run_counter(state_dir, a, rootfs)
    (tmp_path / "store").mkdir()
    taken = kerrickpt.snapshot(name, tmp_path / "store", state_dir=state_dir).snapshot
    with opened(b) as fd:
        kerrickpt.restore(taken.path, name=f"{name}-copy", state_dir=state_dir, stdout=fd, stderr=fd)
    growing(b)

    copied = counted(b)
    assert_consecutive(copied)
    assert copied[0] - 1 in counted(a), "the copy counts on from the snapshot"
    growing(a, beyond=copied[0])  # and the container, running on, into its own file
    assert_consecutive(counted(a))


def test_a_file_appended_to_between_checkpoint_and_restore_takes_the_rest(state_dir: Path, tmp_path: Path) -> None:
    a = tmp_path / "a.out"
    name = run_counter(state_dir, a, None)
    kerrickpt.checkpoint(name, tmp_path / "c.kckpt", state_dir=state_dir)
    before = counted(a)
    with a.open("a") as requeued:  # as Slurm's note that the job was requeued
        requeued.write("slurmstepd: job requeued\n")

    restore_into(tmp_path / "c.kckpt", state_dir, a)
    growing(a, beyond=len(before))
    lines = a.read_text().splitlines()
    at = lines.index("slurmstepd: job requeued")
    assert_consecutive([int(n) for n in lines[:at] + lines[at + 1 :]])
    assert [int(n) for n in lines[:at]] == before


def test_a_pipe_is_refused_as_output(state_dir: Path, tmp_path: Path) -> None:
    reader, writer = os.pipe()
    try:
        with pytest.raises(kerrickpt.UsageError) as refused:
            kerrickpt.run(unique_name("io"), ["true"], state_dir=state_dir, stdout=writer)
        assert refused.value.exit_code == 2
        assert "not a regular file" in str(refused.value)
        assert kerrickpt.ps(state_dir) == [], "nothing was started"
        with pytest.raises(kerrickpt.UsageError):
            kerrickpt.restore(tmp_path / "none.kckpt", state_dir=state_dir, stderr=writer)
    finally:
        os.close(reader)
        os.close(writer)


def test_a_migrated_container_writes_on_into_its_log_on_the_target(cluster: Cluster, tmp_path: Path) -> None:
    a, b = cluster.nodes
    out = tmp_path / "a.out"
    name = unique_name("io")
    started = subprocess.run(
        # A caller of the Python API on node a (in its network namespace: CRIU dumps no other).
        ["nsenter", f"--net=/run/netns/{a.netns}", sys.executable, "-c", RUN_ON_NODE, name, str(out), COUNT],
        env={**os.environ, **a.env()},
        capture_output=True,
        text=True,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    growing(out)

    # The source's file keeps growing as the target's preflight looks: it is none of the target's business.
    moved = a.kerrickpt("migrate", name, *cluster.migrate_args(b), "--json")

    assert moved.returncode == 0, moved.stderr
    log = log_of(b.state_dir, name)
    growing(log)
    assert_consecutive(counted(out) + counted(log))
