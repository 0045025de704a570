"""PostgreSQL 15 running as `postgres` in a `--rootfs host` container, checkpointed, restored, migrated and
rolled back to a snapshot by the real kernel, CRIU and server: the non-root workload of issue 13."""

from __future__ import annotations

import pwd
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import containers
from kerrickpt.localnodes import Cluster, Node
from tests.helpers import cli, host_status, unique_name
from tests.test_confined import upper

pytestmark = pytest.mark.root

WORKLOADS = Path(__file__).parent / "workload"
# The script, bound in read-only: the clone may live under /tmp, which the container's own /tmp hides.
BOUND = "/opt/kerrickpt-workload"
VOLUME = f"{WORKLOADS}:{BOUND}:ro"
SERVER = f"{BOUND}/postgres"
# In the container's layer (so the database travels and rolls back with it), where its root may write.
DATA = "/var/tmp/kerrickpt-pg"
SERVER_BINARY = b"/usr/lib/postgresql/15/bin/postgres"
POSTGRES = pwd.getpwnam("postgres").pw_uid  # the container's root is the host's, so is its /etc/passwd

Run = Callable[..., subprocess.CompletedProcess[str]]


def on_host(state_dir: Path) -> Run:
    """kerrickpt's command on this machine, with `state_dir`."""
    return lambda *args: cli(*args, state_dir=state_dir)


def on_node(node: Node) -> Run:
    """kerrickpt's command on a local node."""
    return lambda *args: node.kerrickpt(*args)


def sql(kerrickpt_cli: Run, name: str, statement: str) -> list[str]:
    """Rows of `statement`, run by psql inside the container (it has exited when this returns)."""
    result = kerrickpt_cli("exec", name, "--", SERVER, "sql", DATA, statement)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def wait_ready(kerrickpt_cli: Run, name: str) -> None:
    result = kerrickpt_cli("exec", name, "--", SERVER, "wait", DATA)
    assert result.returncode == 0, result.stderr


def start(kerrickpt_cli: Run) -> str:
    """A fresh cluster serving in a new container, with table `t` holding rows 1-3."""
    name = unique_name("pg")
    started = kerrickpt_cli("run", "--name", name, "--rootfs", "host", "--volume", VOLUME, "--", SERVER, "run", DATA)
    assert started.returncode == 0, started.stderr
    wait_ready(kerrickpt_cli, name)
    sql(kerrickpt_cli, name, "CREATE TABLE t (n int PRIMARY KEY, word text)")
    sql(kerrickpt_cli, name, "INSERT INTO t SELECT n, 'row ' || n FROM generate_series(1, 3) n")
    return name


def rows(kerrickpt_cli: Run, name: str) -> list[str]:
    return sql(kerrickpt_cli, name, "SELECT n || ' ' || word FROM t ORDER BY n")


def running(pid: int) -> bool:
    """Whether `pid` runs: an ended server's init may stay a zombie until the node's init reaps it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def host_uid(pid: int) -> int:
    return int(host_status(pid)["Uid"].split()[0])


ROWS = ["1 row 1", "2 row 2", "3 row 3"]


def test_postgres_checkpoints_and_restores_with_its_rows_running_as_postgres(state_dir: Path, tmp_path: Path) -> None:
    host = on_host(state_dir)
    name = start(host)
    archive = tmp_path / "pg.kckpt"

    (before,) = [c.init_pid for c in kerrickpt.ps(state_dir) if c.name == name]

    kerrickpt.checkpoint(name, archive, state_dir=state_dir)
    assert name not in [c.name for c in kerrickpt.ps(state_dir)], "the checkpoint ended it"
    assert not running(before), "its server is gone"
    restored = kerrickpt.restore(archive, state_dir=state_dir)

    assert rows(host, name) == ROWS
    record = containers.Registry(state_dir).get(name).confinement
    assert record is not None
    assert Path(f"/proc/{restored.init_pid}/cmdline").read_bytes().split(b"\0")[0] == SERVER_BINARY
    for pid in restored.pid_map.values():  # the postmaster and its workers
        assert host_uid(pid) == record.uid_base + POSTGRES != 0, "the server runs as postgres, not root"
    sql(host, name, "INSERT INTO t VALUES (4, 'row 4')")
    assert rows(host, name) == [*ROWS, "4 row 4"]


def test_postgres_migrates_to_another_node_with_its_rows(cluster: Cluster) -> None:
    a, b = cluster.nodes
    name = start(on_node(a))

    moved = a.kerrickpt("migrate", name, *cluster.migrate_args(b))

    assert moved.returncode == 0, moved.stderr
    assert rows(on_node(b), name) == ROWS
    (there,) = b.json("ps")
    record = containers.Registry(b.state_dir).get(name).confinement
    assert there["name"] == name and record is not None
    assert host_uid(int(there["init_pid"])) == record.uid_base + POSTGRES, "it runs as postgres on b"
    assert a.json("ps") == [] and not (a.state_dir / "containers" / name).exists(), "nothing left on a"
    assert not list((a.state_dir / "idranges").glob("[ug]id-*")), "a released its id range"
    sql(on_node(b), name, "INSERT INTO t VALUES (4, 'row 4')")
    assert rows(on_node(b), name) == [*ROWS, "4 row 4"]


def test_postgres_restored_from_an_older_snapshot_has_the_older_rows(state_dir: Path, tmp_path: Path) -> None:
    host = on_host(state_dir)
    name = start(host)
    snapshot = tmp_path / "older.kckpt"
    kerrickpt.checkpoint(name, snapshot, state_dir=state_dir, leave_running=True)
    sql(host, name, "INSERT INTO t SELECT n, 'later ' || n FROM generate_series(4, 6) n")
    # A table whose file the server writes out now: the snapshot's memory never knew it, only its files could.
    sql(host, name, "CREATE TABLE later AS SELECT * FROM t; CHECKPOINT")
    (later,) = sql(host, name, "SELECT pg_relation_filepath('later')")
    later_file = upper(state_dir, name) / DATA.lstrip("/") / later
    assert later_file.stat().st_size > 0 and len(rows(host, name)) == 6
    kerrickpt.kill(name, state_dir)

    kerrickpt.restore(snapshot, state_dir=state_dir)

    assert rows(host, name) == ROWS, "the rows of the snapshot, not those inserted after it"
    assert not later_file.exists(), "the server's files are those of the snapshot"
    sql(host, name, "INSERT INTO t VALUES (4, 'again 4'); CHECKPOINT")
    assert rows(host, name) == [*ROWS, "4 again 4"]
