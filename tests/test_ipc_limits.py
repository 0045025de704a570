"""The IPC limits a host-namespace job's archive hands to the kernel: only the listed sysctls, only numbers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import archive, archivewriter, cgroups, sysvipc
from kerrickpt.manifest import Manifest
from tests.helpers import cli, unique_name
from tests.test_restorer import host_job  # noqa: F401 - the fixture

pytestmark = pytest.mark.root

KERNEL = Path("/proc/sys/kernel")


def _with_limits(original: Path, limits: dict[str, str], dest: Path) -> Path:
    """`original` with the manifest's IPC limits replaced: a sound archive, as whoever made it chose."""
    unpacked = dest.with_suffix(".d")
    unpacked.mkdir()
    manifest: Manifest = archive.extract(original, unpacked)
    assert manifest.ipc is not None
    manifest.ipc["limits"] = limits
    files = {f"images/{p.name}": p for p in (unpacked / "images").iterdir()} | {"log": unpacked / "log"}
    archivewriter.write(dest, manifest, files)
    return dest


def _host_job_archive(host_job, tmp_path: Path) -> Path:  # noqa: F811
    job = host_job()
    taken = tmp_path / "job.kckpt"
    kerrickpt.checkpoint(None, taken, cgroup=job.cgroup, leave_running=True)
    return taken


@pytest.mark.parametrize(
    "limits",
    [
        {"core_pattern": "|/bin/false"},  # a sysctl not on the list
        {"../kernel/core_pattern": "|/bin/false"},  # a path out of the list's directory
        {"msgmax": "8192\n|/bin/false"},  # not only numbers
        {"msgmax": "-1"},
        {"sem": "250 32000 32 128 x"},
    ],
    ids=["unlisted", "path", "newline", "negative", "word"],
)
def test_an_archive_asking_for_other_limits_is_refused_before_anything_is_made(
    host_job,  # noqa: F811
    state_dir: Path,
    tmp_path: Path,
    limits: dict[str, str],
) -> None:
    bad = _with_limits(_host_job_archive(host_job, tmp_path), limits, tmp_path / "bad.kckpt")
    before = {p.name: p.read_text() for p in KERNEL.iterdir() if p.name in ("core_pattern", *sysvipc.LIMITS)}
    name = unique_name("ipc")

    result = cli("restore", str(bad), "--name", name, "--json", state_dir=state_dir)

    assert result.returncode == 6, result.stdout + result.stderr
    said = json.loads(result.stdout)["message"]
    assert "refusing IPC limit" in said or "$.ipc.limits" in said, said
    assert {p: (KERNEL / p).read_text() for p in before} == before
    assert kerrickpt.ps(state_dir) == [] and cgroups.existing(cgroups.detect(), name).dirs == ()


def test_the_listed_limits_are_set_in_the_jobs_new_ipc_namespace_only(
    host_job,  # noqa: F811
    state_dir: Path,
    tmp_path: Path,
) -> None:
    host_msgmax = (KERNEL / "msgmax").read_text()
    wanted = str(int(host_msgmax) + 1234)
    sem = "251\t32001\t33\t129"
    good = _with_limits(_host_job_archive(host_job, tmp_path), {"msgmax": wanted, "sem": sem}, tmp_path / "g.kckpt")

    restored = kerrickpt.restore(good, name=unique_name("ipc"), state_dir=state_dir)

    def inside(name: str) -> str:
        argv = ["nsenter", "-t", str(restored.init_pid), "-i", "cat", str(KERNEL / name)]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()

    assert inside("msgmax") == wanted and inside("sem") == sem
    assert (KERNEL / "msgmax").read_text() == host_msgmax, "the host's own limit is untouched"
