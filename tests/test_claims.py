"""What a migration's pre-flight claims on its target for a container with a network of its own (its address, its
published node ports): refused to any other container there while the migration is under way, with a reason that
names the migration; free again once the migration failed or its source was killed; the container's once it
arrived. Real local nodes, namespaces and migrations; the rule itself on a state directory of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import claims, containers, network
from kerrickpt.localnodes import Cluster, Node, kerrickpt_path
from tests.helpers import finished, unique_name, wait_for
from tests.test_garbage import dead_pid

PORT = "18093"  # the node port the migrating container publishes


def _start(node: Node) -> tuple[str, str]:
    """A container with a network of its own on `node`, publishing PORT: its name and ADDR/PREFIX."""
    name = unique_name("claim")
    started = node.kerrickpt("run", "--json", "--name", name, "--net", "own", "--publish", f"{PORT}:7000", "--",
                             "sleep", "600")  # fmt: skip
    assert started.returncode == 0, started.stderr
    return name, str(json.loads(started.stdout)["address"])


def _run(node: Node, *net: str) -> subprocess.CompletedProcess[str]:
    """`run` on `node` of another container that wants what `net` says (an --ip or a --publish)."""
    return node.kerrickpt("run", "--name", unique_name("other"), "--net", "own", *net, "--", "sleep", "600")


@contextmanager
def _paused_after_preflight(cluster: Cluster, name: str) -> Iterator[subprocess.Popen[str]]:
    """`migrate` of `name` from the first node to the second, stopped once the target answered its pre-flight;
    SIGCONT afterwards (a test that killed it finds it gone), and waited for, whatever happened."""
    a, b = cluster.nodes
    env = {**os.environ, **a.env(), "KERRICKPT_FAULT": "source-after-preflight:pause"}
    argv = ["nsenter", f"--net=/run/netns/{a.netns}", kerrickpt_path(), "migrate", name, "--json"]
    run = subprocess.Popen(
        [*argv, *cluster.migrate_args(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        _, status = os.waitpid(run.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the source stops once the target answered its pre-flight"
        yield run
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGCONT)
            finished(run, 300)


def _holding(node: Node, address: str) -> list[str]:
    """The containers of `node` at `address`."""
    return [row["name"] for row in node.json("ps") if row.get("address") == address]


@pytest.mark.root
def test_what_the_pre_flight_claimed_is_refused_to_others_until_the_migrated_container_holds_it(
    cluster: Cluster,
) -> None:
    a, b = cluster.nodes
    name, address = _start(a)
    ip = address.split("/")[0]

    with _paused_after_preflight(cluster, name) as run:
        taken = _run(b, "--ip", address)
        published = _run(b, "--publish", f"{PORT}:80")

        assert taken.returncode == 2, taken.stderr
        assert f"address {ip} is in use on this node (by the container {name} that migration " in taken.stderr
        assert " brings here)" in taken.stderr
        assert published.returncode == 2, published.stderr
        assert f"the container {name} that migration " in published.stderr
        assert f" brings here publishes node port {PORT}/tcp" in published.stderr
        os.kill(run.pid, signal.SIGCONT)
        _, err = finished(run, 300)

    assert run.returncode == 0, err
    assert _holding(b, address) == [name]
    # It holds them now as any container does: still refused, to it, no longer to a migration.
    again = _run(b, "--ip", address)
    assert again.returncode == 2, again.stderr
    assert f"address {ip} is in use on this node (by container {name})" in again.stderr
    assert _run(b, "--publish", f"{PORT}:80").returncode == 2


@pytest.mark.root
def test_a_failed_migration_leaves_the_address_and_ports_free_on_its_target(cluster: Cluster) -> None:
    a, b = cluster.nodes
    name, address = _start(a)

    failed = a.kerrickpt("migrate", name, *cluster.migrate_args(b), env={"KERRICKPT_FAULT": "restore-after-criu:fail"})

    assert failed.returncode == 8, failed.stderr
    assert "runs on here again" in failed.stderr
    published = _run(b, "--publish", f"{PORT}:80")
    assert published.returncode == 0, published.stderr
    # The address is the source's container's again; once that is gone, b gives it out.
    killed = a.kerrickpt("kill", name)
    assert killed.returncode == 0, killed.stderr
    taken = _run(b, "--ip", address)
    assert taken.returncode == 0, taken.stderr


@pytest.mark.root
def test_a_source_killed_after_the_pre_flight_leaves_nothing_claimed_on_its_target(cluster: Cluster) -> None:
    a, b = cluster.nodes
    name, _ = _start(a)

    with _paused_after_preflight(cluster, name) as run:
        assert _run(b, "--publish", f"{PORT}:80").returncode == 2
        run.kill()  # its ssh sees its end close, and so does the target's pre-flight
        run.wait(timeout=30)

    # The pre-flight on b lets go once its end of the connection closes, a moment later.
    wait_for(lambda: _run(b, "--publish", f"{PORT}:80").returncode == 0, timeout=30, what="the port free on b")
    assert not [row for row in b.json("ps") if row["name"] == name]
    assert [row["state"] for row in a.json("ps") if row["name"] == name] == ["running"]


@dataclass
class State:
    """A node's state as claims see it: the containers it has, and the migrations arriving."""

    root: Path
    containers: set[str] = field(default_factory=set)
    arriving: set[str] = field(default_factory=set)

    def is_gone(self, holder: claims.Holder) -> bool:
        came = holder.container in self.containers
        return not came if holder.migration is None else not came and not self.is_arriving(holder.migration)

    def is_arriving(self, migration: str) -> bool:
        return migration in self.arriving


def _any(filename: str) -> bool:
    return True


def test_a_claim_for_an_arriving_container_outlives_a_failed_restore_and_goes_once_its_migration_ends(
    tmp_path: Path,
) -> None:
    state = State(tmp_path, arriving={"m1"})
    path = tmp_path / "address-198.19.0.5"
    other = claims.Holder("other")

    assert claims.take(state, path, claims.Holder("web", "m1"))
    assert not claims.take(state, path, other)
    assert claims.blocking(state, path, other) == "the container web that migration m1 brings here"
    claims.release(state, tmp_path, _any, "web")  # a restore that failed: the migration may try again
    assert claims.blocking(state, path, other) is not None
    claims.let_go(state, tmp_path, _any, "m1")  # its pre-flight ends, its receiver lives on
    assert claims.blocking(state, path, other) is not None

    state.arriving.clear()
    claims.let_go(state, tmp_path, _any, "m1")

    assert claims.take(state, path, other)


def test_a_claim_for_a_container_that_arrived_stays_its_own(tmp_path: Path) -> None:
    state = State(tmp_path, arriving={"m1"})
    path = tmp_path / "address-198.19.0.5"
    assert claims.take(state, path, claims.Holder("web", "m1"))

    state.containers.add("web")
    state.arriving.clear()
    claims.let_go(state, tmp_path, _any, "m1")

    assert claims.blocking(state, path, claims.Holder("other")) == "container web"
    claims.release(state, tmp_path, _any, "web")  # it leaves
    assert claims.take(state, path, claims.Holder("other"))


@pytest.mark.root
def test_gc_removes_what_a_killed_pre_flight_claimed_and_its_mark(state_dir: Path) -> None:
    registry = containers.Registry(state_dir)
    migration = uuid.uuid4().hex
    # A pre-flight killed while it held a claim for the container its migration brings, which never came.
    mark = registry.incoming(migration).with_name(f"{migration}.{dead_pid()}{containers.PREFLIGHT}")
    mark.write_text(json.dumps({"pid": dead_pid(), "start": 1}))
    claim = claims.directory(registry, network.DIRECTORY) / "address-198.19.0.5"
    assert claims.take(registry, claim, claims.Holder("web", migration))

    removed = kerrickpt.gc(state_dir)

    assert sorted((x.kind, x.path) for x in removed) == [("marker", str(mark)), ("network", str(claim))]
    assert not claim.exists() and not mark.exists()
