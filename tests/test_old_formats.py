"""Archives that earlier kerrickpt versions wrote (formats 1-5) restore with today's code and real CRIU."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import cgroups
from tests.helpers import (
    Workload,
    archived_log,
    assert_consecutive,
    cli_env,
    ipc_keys,
    probe,
    ticks,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
# The last commit that wrote each format: the one before the commit that introduced the next.
# Format 5 (6 only for a layer delta) was written up to 93f4ea8, on which format 7, digests of every byte, was built.
LAST_WRITER = {1: "888dd47^", 2: "0ae6748^", 3: "e8e279e^", 4: "52eaba9^", 5: "93f4ea8"}


@pytest.fixture(scope="module")
def old_trees(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Path]]:
    """kerrickpt's source as each format's last writer had it, from git history."""
    trees = {}
    for version, commit in LAST_WRITER.items():
        tree = tmp_path_factory.mktemp(f"format{version}")
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "kerrickpt"], capture_output=True)
        if archive.returncode != 0:
            pytest.fail(f"git history is needed (a clone, not an export): {archive.stderr.decode()}")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        trees[version] = tree
    yield trees


def _old(tree: Path, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The old kerrickpt's command line, on a state directory of its own."""
    env = cli_env(state_dir, PYTHONPATH=str(tree))
    argv = [sys.executable, "-m", "kerrickpt.cli.main", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree, timeout=120)


def _any_pid(name: str) -> int:
    return cgroups.existing(cgroups.detect(), name).pids()[0]


@pytest.mark.parametrize("version", sorted(LAST_WRITER))
def test_an_archive_of_an_older_format_restores_and_the_workload_continues(
    old_trees: dict[int, Path], workload: Path, state_dir: Path, tmp_path: Path, version: int
) -> None:
    tree, old_state = old_trees[version], tmp_path / "old-state"
    name, keys = unique_name(f"v{version}"), ipc_keys()
    archive = tmp_path / f"v{version}.kckpt"
    try:
        started = _old(tree, old_state, "run", "--name", name, "--", str(workload), "run", *map(str, keys))
        assert started.returncode == 0, started.stderr
        log = old_state / "containers" / name / "log"
        wait_for(lambda: "ready threads" in log.read_text(), what="the old kerrickpt's workload")
        wait_for(lambda: len(ticks(log.read_text())) > 2, what="ticks")
        before = probe(workload, _any_pid(name), keys)
        taken = _old(tree, old_state, "checkpoint", name, "-o", str(archive))
        assert taken.returncode == 0, taken.stderr
    finally:
        _old(tree, old_state, "kill", name)  # if the checkpoint did not end it
    shown = subprocess.run(f"zstd -dc '{archive}' | tar -xO manifest.json", shell=True, capture_output=True)
    assert json.loads(shown.stdout)["version"] == version
    assert kerrickpt.inspect(archive).manifest.name == name, "today's code reads the old manifest"
    last_archived = max(ticks(archived_log(archive)))

    restored = kerrickpt.restore(archive, state_dir=state_dir)

    assert sorted(restored.pid_map) == [1, 2, 3]
    w = Workload(name, keys, state_dir, workload)
    w.wait_ticking(beyond=last_archived)
    after = w.probe()
    assert after["data_sha"] == before["data_sha"] and after["messages"] == before["messages"]
    assert after["sems"] == before["sems"]
    numbers = ticks(w.log)
    assert_consecutive(numbers)
    assert numbers[0] == 1, "the old archive's log came back whole, and the counter continued"
