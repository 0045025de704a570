"""Asking changes nothing: `ps`, a migration's status and post-copy's outcome only look; `gc`, `kill`
and the agent's `reap` remove what kerrickpt processes that died left behind."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import cgroups, containers, netlinks, postcopy, procs, receiver
from tests.helpers import cli, unique_name, wait_for

pytestmark = pytest.mark.root


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def half_made(state_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], cgroups.Cgroup]]:
    """A name whose run died before registering it, with a process it had started in its cgroup."""
    registry = containers.Registry(state_dir)
    name = unique_name("half")
    registry.reserve(name)
    (registry.path(name) / containers.OWNER).write_text(json.dumps({"pid": dead_pid(), "start": 1}))
    group = cgroups.create(cgroups.detect(), name)
    orphan = subprocess.Popen(["sh", "-c", f"echo 0 > {group.dirs[0]}/cgroup.procs; exec sleep 600"])
    try:
        wait_for(lambda: group.pids() == [orphan.pid], what="the half-restored process in its cgroup")
        yield name, orphan, group
    finally:
        orphan.kill()
        orphan.wait()
        group.remove()


def test_ps_shows_a_run_that_died_before_registering_as_abandoned_and_only_gc_removes_it(
    state_dir: Path, half_made: tuple[str, subprocess.Popen[bytes], cgroups.Cgroup]
) -> None:
    name, orphan, group = half_made
    scratch = state_dir / "tmp" / f"restore-{dead_pid()}-x1"
    scratch.mkdir()
    (scratch / "pages-1.img").write_bytes(b"memory")

    rows = kerrickpt.ps(state_dir)
    shown = cli("ps", "--json", state_dir=state_dir)
    dry = cli("gc", "--dry-run", "--json", state_dir=state_dir)

    assert [(r.name, r.state, r.processes, r.init_pid) for r in rows] == [(name, "abandoned", 1, None)]
    assert shown.returncode == 0, shown.stderr
    assert [(r["name"], r["state"]) for r in json.loads(shown.stdout)] == [(name, "abandoned")]
    assert dry.returncode == 0, dry.stderr
    would = json.loads(dry.stdout)
    assert would["dry_run"] is True
    assert sorted((x["kind"], x["path"]) for x in would["removed"]) == [
        ("container", str(state_dir / "containers" / name)),
        ("scratch", str(scratch)),
    ]
    assert orphan.poll() is None, "asking killed nothing"
    assert group.pids() == [orphan.pid] and (state_dir / "containers" / name).is_dir() and scratch.is_dir()

    removed = kerrickpt.gc(state_dir)

    assert sorted(x.kind for x in removed) == ["container", "scratch"]
    assert orphan.wait(timeout=10) == -9
    assert not (state_dir / "containers" / name).exists() and not scratch.exists()
    assert not any(d.exists() for d in group.dirs)
    assert kerrickpt.ps(state_dir) == [] and kerrickpt.gc(state_dir) == []


def test_kill_removes_what_an_abandoned_run_left(
    state_dir: Path, half_made: tuple[str, subprocess.Popen[bytes], cgroups.Cgroup]
) -> None:
    name, orphan, group = half_made

    killed = cli("kill", name, state_dir=state_dir)

    assert killed.returncode == 0, killed.stderr
    assert orphan.wait(timeout=10) == -9
    assert not any(d.exists() for d in group.dirs)
    assert kerrickpt.run(name, ["sleep", "600"], state_dir=state_dir).state == "running", "the name is free"


def test_a_name_held_by_a_dead_run_says_how_to_free_it(
    state_dir: Path, half_made: tuple[str, subprocess.Popen[bytes], cgroups.Cgroup]
) -> None:
    name, orphan, _ = half_made

    with pytest.raises(kerrickpt.ContainerExistsError, match="kerrickpt gc"):
        kerrickpt.run(name, ["true"], state_dir=state_dir)
    assert orphan.poll() is None


@pytest.fixture
def arrived(state_dir: Path) -> Iterator[tuple[str, str]]:
    """A container that came here by post-copy migration (its id returned too); its memory still coming."""
    name, migration_id = unique_name("lazy"), uuid.uuid4().hex
    kerrickpt.run(name, ["sleep", "600"], state_dir=state_dir)
    registry = containers.Registry(state_dir)
    container = registry.get(name)
    container.migration = migration_id
    registry.save(container)
    yield name, migration_id


def _record(state_dir: Path, name: str, migration_id: str, watcher: int) -> Path:
    registry = containers.Registry(state_dir)
    path = registry.incoming(migration_id).with_suffix(".postcopy")
    record = {"state": postcopy.IN_FLIGHT, "pid": watcher, "start": procs.start_time(watcher) or 1}
    record |= {"cgroup": registry.get(name).cgroup, "state_dir": str(state_dir), "name": name}
    path.write_text(json.dumps(record))
    return path


def states(state_dir: Path) -> list[str]:
    return [row.state for row in kerrickpt.ps(state_dir)]


def test_asking_about_a_post_copy_in_flight_leaves_it_running(state_dir: Path, arrived: tuple[str, str]) -> None:
    name, migration_id = arrived
    _record(state_dir, name, migration_id, watcher=os.getpid())  # a watcher that lives

    answer = receiver.status(migration_id, state_dir)

    assert answer == {"state": "in-progress"}
    assert states(state_dir) == ["running"], "the copy whose memory is still coming was left alone"


def test_a_post_copy_whose_watcher_died_is_abandoned_until_reaped(state_dir: Path, arrived: tuple[str, str]) -> None:
    name, migration_id = arrived
    record = _record(state_dir, name, migration_id, watcher=dead_pid())

    answer = receiver.status(migration_id, state_dir)
    outcome = postcopy.outcome(containers.Registry(state_dir), migration_id)
    would = [x.kind for x in kerrickpt.gc(state_dir, dry_run=True)]

    assert answer["state"] == "abandoned" and outcome is not None and outcome["state"] == "abandoned"
    assert would == ["post-copy"]
    assert states(state_dir) == ["running"], "asking killed nothing"
    assert json.loads(record.read_text())["state"] == postcopy.IN_FLIGHT

    reaped = receiver.reap(migration_id, state_dir)

    assert reaped["state"] == "failed" and reaped["why"] == "its watcher died"
    assert kerrickpt.ps(state_dir) == [], "the copy whose memory stopped coming is gone"
    assert receiver.status(migration_id, state_dir)["state"] == "failed", "and the target says so for good"


def test_a_receiver_that_died_is_abandoned_until_reaped(state_dir: Path) -> None:
    migration_id = uuid.uuid4().hex
    marker = containers.Registry(state_dir).incoming(migration_id)
    marker.write_text(json.dumps({"pid": dead_pid(), "start": 1}))

    assert receiver.status(migration_id, state_dir)["state"] == "abandoned"
    assert marker.exists(), "asking removed nothing"
    assert receiver.reap(migration_id, state_dir) == {"state": "absent"}
    assert not marker.exists()


@pytest.fixture
def probes() -> Iterator[tuple[list[str], str]]:
    """The network lock's probe namespaces of `kerrickpt check`s killed mid-probe (one whose PID is gone, one whose
    PID this process has since: another start time) and of one still probing (this process); whichever gc leaves is
    removed afterwards."""
    me = os.getpid()
    start = procs.start_time(me)
    assert start is not None
    dead = [f"{netlinks.PROBE}{dead_pid()}-{start}", f"{netlinks.PROBE}{me}-{start - 1}"]
    alive = f"{netlinks.PROBE}{me}-{start}"
    try:
        for netns in (*dead, alive):
            subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
        yield dead, alive
    finally:
        for netns in (*dead, alive):
            netlinks.remove_netns(netns)


def test_gc_removes_the_probe_namespaces_of_checks_that_died_and_leaves_one_probing(
    state_dir: Path, probes: tuple[list[str], str]
) -> None:
    dead, alive = probes

    would = cli("gc", "--dry-run", "--json", state_dir=state_dir)

    assert would.returncode == 0, would.stderr
    listed = [(x["kind"], x["path"]) for x in json.loads(would.stdout)["removed"]]
    assert sorted(listed) == sorted(("probe", f"/run/netns/{netns}") for netns in dead)
    assert all((netlinks.NETNS_DIR / netns).exists() for netns in dead), "asking removed nothing"

    removed = kerrickpt.gc(state_dir)

    assert [x.kind for x in removed] == ["probe", "probe"]
    assert not any((netlinks.NETNS_DIR / netns).exists() for netns in dead)
    assert (netlinks.NETNS_DIR / alive).exists()
    assert kerrickpt.gc(state_dir) == []


def test_gc_leaves_a_name_reserved_anew_after_it_looked_and_one_another_command_holds(
    state_dir: Path, half_made: tuple[str, subprocess.Popen[bytes], cgroups.Cgroup]
) -> None:
    name, orphan, group = half_made
    registry = containers.Registry(state_dir)
    with registry.lock(name):  # `kill` or a migration's pre-flight at it
        assert not containers.remove_if_abandoned(registry, name)
    assert orphan.poll() is None and registry.path(name).exists()
    # Removed by another command after gc had seen it abandoned, then reserved by a live run before gc came to it.
    containers.remove_abandoned(registry, name)
    registry.reserve(name)
    try:
        assert not containers.remove_if_abandoned(registry, name)
        assert registry.path(name).exists() and not registry.is_abandoned(name)
    finally:
        registry.release(name)
    assert orphan.wait(timeout=10) == -9 and not any(d.exists() for d in group.dirs)
