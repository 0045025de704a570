"""cgroup layout detection, sizes, and real cgroups with limits."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from kerrickpt import cgroups
from tests.helpers import freezer_roots, unique_name, wait_for

HYBRID = """\
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,nosuid,nodev,noexec,relatime,freezer 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0
"""
PURE_V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"


@pytest.mark.parametrize(("mounts", "kind"), [(HYBRID, "hybrid"), (PURE_V2, "v2"), (HYBRID.split("\n", 1)[1], "v1")])
def test_detect(tmp_path: Path, mounts: str, kind: str) -> None:
    table = tmp_path / "mounts"
    table.write_text(mounts)
    assert cgroups.detect(table).kind == kind


def test_detect_keeps_the_hosts_hierarchies_while_another_criu_mounts_its_cgroup_yard(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    yard = "/dev/shm/x/restore/.criu.cgyard.ItaVhF"
    table.write_text(HYBRID + f"none {yard} tmpfs rw 0 0\n" + "".join(
        f"none {yard}/{name} cgroup rw,{name} 0 0\n" for name in ("freezer", "memory")
    ) + f"none {yard}/unified cgroup2 rw 0 0\n")  # fmt: skip
    layout = cgroups.detect(table)
    assert layout.roots() == [Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/freezer"),
                              Path("/sys/fs/cgroup/memory")]  # fmt: skip


def test_parse_size() -> None:
    assert cgroups.parse_size("512M") == 512 * 2**20
    assert cgroups.parse_size("2G") == 2 * 2**30
    assert cgroups.parse_size("1.5GiB") == 3 * 2**29
    assert cgroups.parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        cgroups.parse_size("lots")


@pytest.mark.root
def test_create_with_memory_limit_and_remove() -> None:
    name = unique_name("cg")
    group = cgroups.create(cgroups.detect(), name, memory_limit=64 * 2**20)
    try:
        assert group.memory_limit() == 64 * 2**20
        assert group.pids() == []
        with pytest.raises(FileExistsError):
            cgroups.create(cgroups.detect(), name)
    finally:
        group.remove()
    assert not any(d.exists() for d in group.dirs)


@pytest.mark.root
@pytest.mark.parametrize("root", freezer_roots(), ids=lambda r: r.name)
def test_kill_never_signals_a_process_outside_the_cgroup(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PID read from cgroup.procs may have exited and been reused by the time it is signalled:
    here the first read is stale, naming an unrelated process, and that process must survive."""
    group = cgroups.Cgroup((root / unique_name("cg"),))
    group.dirs[0].mkdir()
    inside = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; exec sleep 600"])
    outsider = subprocess.Popen(["sleep", "600"])
    try:
        wait_for(lambda: group.pids() == [inside.pid], what="the member")
        real = cgroups.Cgroup.pids
        reads: list[int] = []

        def stale_once(self: cgroups.Cgroup) -> list[int]:
            reads.append(1)
            return sorted({*real(self), outsider.pid}) if len(reads) == 1 else real(self)

        monkeypatch.setattr(cgroups.Cgroup, "pids", stale_once)
        group.kill()
        monkeypatch.undo()

        assert inside.wait(timeout=10) == -signal.SIGKILL
        assert outsider.poll() is None, "the unrelated process was killed"
    finally:
        outsider.kill()
        outsider.wait()
        group.remove()
        inside.wait()
