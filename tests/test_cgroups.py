"""cgroup layout detection, sizes, and real cgroups with limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from kerrickpt import cgroups
from tests.helpers import unique_name

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
