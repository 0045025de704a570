"""Freezing stops a real process and thawing resumes it, through both the v1 and v2 freezer."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kerrickpt import cgroups
from kerrickpt.freezer import Freezer, frozen
from tests.helpers import freezer_roots, unique_name, wait_for

pytestmark = pytest.mark.root


@pytest.fixture(params=freezer_roots(), ids=lambda r: r.name)
def counting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Freezer, Path]]:
    """A shell loop writing a growing number to a file, in a fresh cgroup of one hierarchy."""
    group = cgroups.Cgroup((request.param / unique_name("frz"),))
    group.dirs[0].mkdir()
    counter = tmp_path / "n"
    loop = f"i=0; while :; do i=$((i+1)); echo $i > {counter}; sleep 0.01; done"
    script = f"echo 0 > {group.dirs[0]}/cgroup.procs; {loop}"
    proc = subprocess.Popen(["sh", "-c", script])
    try:
        wait_for(lambda: counter.exists() and counter.read_text().strip() not in ("", "0", "1"), what="counting")
        yield group.freezer, counter
    finally:
        group.remove()
        proc.wait()


def test_freeze_stops_and_thaw_resumes(counting: tuple[Freezer, Path]) -> None:
    freezer, counter = counting
    freezer.freeze()
    assert freezer.is_frozen()
    held = counter.read_text()
    time.sleep(0.3)
    assert counter.read_text() == held
    freezer.thaw()
    wait_for(lambda: counter.read_text() not in ("", held), what="counting again")


def test_frozen_block_thaws_on_failure(counting: tuple[Freezer, Path]) -> None:
    freezer, _ = counting
    with pytest.raises(RuntimeError), frozen(freezer):
        assert freezer.is_frozen()
        raise RuntimeError("dump failed")
    assert not freezer.is_frozen()
