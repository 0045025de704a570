"""The restore's routes the README describes: CRIU failing before the archive is read, and unpacking first
where CRIU could not run the streamed restore's gate."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import kerrickpt
from bench.lab import READY
from kerrickpt import cgroups, containers
from tests.helpers import archived_log, assert_consecutive, cli, ticks, unique_name, wait_for

pytestmark = pytest.mark.root

# CRIU's own fault point FI_RESTORE_ROOT_ONLY: the tree's root kills itself once its own memory is
# restored, before its children are made, so CRIU fails with their memory not yet asked for.
ROOT_ONLY = "2"
CHILD_MIB = 160  # far beyond what the feeder reads ahead (feeder.MEMORY) while CRIU is alive


def _memload_processes(binary: Path) -> int:
    out = subprocess.run(["pgrep", "-c", "-f", f"^{binary} "], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


@pytest.mark.parametrize(("damaged", "code"), [(True, 6), (False, 8)], ids=["damaged-6", "sound-8"])
def test_criu_failing_first_exits_6_for_a_damaged_archive_and_8_for_a_sound_one(
    memload: Path, state_dir: Path, tmp_path: Path, damaged: bool, code: int
) -> None:
    name = unique_name("first")
    kerrickpt.run(name, ["/bin/sh", "-c", f"{memload} {CHILD_MIB} mixed & wait"], state_dir=state_dir)
    wait_for(lambda: READY.search((state_dir / "containers" / name / "log").read_text()), timeout=60, what="fill")
    archive = tmp_path / "tree.kckpt"
    kerrickpt.checkpoint(name, archive, state_dir=state_dir)
    if damaged:
        # The frame's last byte (zstd's content checksum): only reading the whole archive finds it,
        # long after CRIU has failed.
        data = bytearray(archive.read_bytes())
        data[len(data) - int.from_bytes(data[-16:-8], "little") - 1] ^= 0x01
        archive.write_bytes(bytes(data))
    running = _memload_processes(memload)

    result = cli("restore", str(archive), "--json", state_dir=state_dir, CRIU_FAULT=ROOT_ONLY)

    assert result.returncode == code, result.stdout + result.stderr
    error = json.loads(result.stdout)
    if damaged:
        assert error["error"] == "ArchiveCorruptError", error
    else:
        assert error["error"] == "RestoreFailed", error
        assert "Restore root task failure" in error["log_tail"], "CRIU's own error, with its log's tail"
    assert kerrickpt.ps(state_dir) == []
    assert cgroups.existing(cgroups.detect(), name).dirs == ()
    assert _memload_processes(memload) == running, "no restored process is left"


@contextlib.contextmanager
def _noexec_mount(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,mode=0700,size=256m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        registry = containers.Registry(path / "state")
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(subprocess.run, ["umount", "-l", str(path)], check=False)
            for container in registry.all() if (path / "state" / "containers").exists() else []:
                cleanup.callback(containers.remove, registry, container)


def test_a_state_directory_on_a_noexec_mount_restores_by_unpacking_first(
    start_workload, state_dir: Path, tmp_path: Path
) -> None:
    # The streamed restore's gate is a script CRIU runs from the state directory, which noexec forbids:
    # had kerrickpt streamed anyway, CRIU could not run it and the restore would fail.
    w = start_workload()
    archive = tmp_path / "w.kckpt"
    kerrickpt.checkpoint(w.name, archive, state_dir=state_dir)
    last_archived = max(ticks(archived_log(archive)))

    with _noexec_mount(tmp_path / "noexec") as mount:
        noexec_state = mount / "state"
        restored = kerrickpt.restore(archive, state_dir=noexec_state)

        assert sorted(restored.pid_map) == [1, 2, 3]
        copy = type(w)(w.name, w.keys, noexec_state, w.binary)
        copy.wait_ticking(beyond=last_archived)
        assert_consecutive(ticks(copy.log))
        assert not list((noexec_state / "tmp").iterdir()), "the unpacked images are gone"
