"""`kerrickpt exec` and `kerrickpt logs`: a command inside a running container, and its output, as Podman's."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import cgroups, containers, procs, users
from kerrickpt.errors import UsageError
from kerrickpt.freezer import frozen
from tests.helpers import KERRICKPT, cli, cli_env, unique_name, wait_for

COUNTER = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.2; done"
LINE = re.compile(rb"^line (\d+)$", re.M)

pytestmark = pytest.mark.root


def _start(state_dir: Path) -> str:
    name = unique_name("exec")
    kerrickpt.run(name, ["sh", "-c", COUNTER], state_dir=state_dir)
    wait_for(lambda: _last_line(state_dir, name) >= 0, what="the counter's first line")
    return name


def _last_line(state_dir: Path, name: str) -> int:
    log = containers.Registry(state_dir).log_path(name)
    return max((int(n) for n in LINE.findall(log.read_bytes())), default=-1)


def _sleepers(group: cgroups.Cgroup) -> list[int]:
    """The host PIDs of `sleep 1000` in the container's cgroup: an exec session's command."""
    return [p.host_pid for p in procs.read_all(group.pids()) if p.cmdline == ("sleep", "1000")]


@contextlib.contextmanager
def _session(state_dir: Path, name: str) -> Iterator[tuple[subprocess.Popen[str], cgroups.Cgroup]]:
    """`kerrickpt exec NAME -- sleep 1000` in the background, and the container's cgroup; ended afterwards
    whatever happens."""
    argv = [*KERRICKPT, "exec", name, "--", "sleep", "1000"]
    env = cli_env(state_dir)
    group = containers.Registry(state_dir).get(name).group
    with subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as session:
        try:
            wait_for(lambda: _sleepers(group) or session.poll() is not None, 30, "the exec session")
            yield session, group
        finally:
            for pid in _sleepers(group):  # read from the cgroup just now: not a reused PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            session.wait(timeout=30)


def test_exec_runs_in_the_containers_namespaces_and_cgroup_and_passes_its_exit_code(state_dir: Path) -> None:
    name = _start(state_dir)
    shown = "hostname; grep NSpid /proc/self/status; cat /proc/self/cgroup"
    inside = cli("exec", name, "--", "sh", "-c", shown, state_dir=state_dir)
    assert inside.returncode == 0, inside.stderr
    hostname, nspid, *groups = inside.stdout.splitlines()
    assert hostname == name
    assert len(nspid.split()) == 3  # "NSpid:", the host's PID and the container's
    assert any(line.endswith(f"/{name}") for line in groups)
    assert cli("exec", name, "--", "sh", "-c", "exit 7", state_dir=state_dir).returncode == 7
    assert cli("exec", name, "--", "sh", "-c", "kill -TERM $$", state_dir=state_dir).returncode == 128 + 15
    assert cli("exec", name, "--", "/no/such/program", state_dir=state_dir).returncode == 127
    with ThreadPoolExecutor() as pool:  # the library from a thread: no signal handling, same result
        assert pool.submit(kerrickpt.exec_in, name, ["sh", "-c", "exit 3"], state_dir=state_dir).result() == 3
    with frozen(containers.Registry(state_dir).get(name).group.freezer):
        assert cli("exec", name, "--", "true", state_dir=state_dir).returncode == 13
    missing = cli("exec", unique_name(), "--", "true", state_dir=state_dir)
    assert missing.returncode == 4
    assert "no container named" in missing.stderr


def test_exec_as_another_user_in_another_directory_with_more_environment(state_dir: Path) -> None:
    name = _start(state_dir)
    shown = cli(
        "exec", name, "--user", "nobody", "--workdir", "/tmp", "--env", "GREETING=hi there",
        "--", "sh", "-c", 'id -u; id -g; pwd; echo "$GREETING"',
        state_dir=state_dir,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    nobody = users.resolve("nobody", Path("/"))
    assert shown.stdout.splitlines() == [str(nobody.uid), str(nobody.gid), "/tmp", "hi there"]
    before_name = cli("exec", "--user", "1234:5", name, "--", "sh", "-c", "id -u; id -g", state_dir=state_dir)
    assert before_name.stdout == "1234\n5\n"
    assert cli("exec", name, "sh", "-c", 'echo "$@"', "sh", "--", "x", state_dir=state_dir).stdout == "-- x\n"
    for bad in (["--user", unique_name()], ["--workdir", "tmp"], ["--workdir", "/no/such/dir"], ["--env", "X"]):
        refused = cli("exec", name, *bad, "--", "true", state_dir=state_dir)
        assert refused.returncode == 2, (bad, refused.stderr)
    assert cli("exec", name, "--user", "nobody", "true", state_dir=state_dir).returncode == 2  # no `--`


def test_kill_ends_an_exec_session_that_joined_the_cgroup(state_dir: Path) -> None:
    name = _start(state_dir)
    with _session(state_dir, name) as (session, group):
        assert _sleepers(group), session.stderr
        assert cli("kill", name, state_dir=state_dir).returncode == 0
        assert session.wait(timeout=60) == 128 + signal.SIGKILL


def test_checkpoint_is_refused_while_an_exec_session_runs_and_the_container_counts_on(
    state_dir: Path, tmp_path: Path
) -> None:
    name = _start(state_dir)
    archive = tmp_path / "c.kckpt"
    with _session(state_dir, name) as (session, group):
        (sleeper,) = _sleepers(group)
        refused = cli("checkpoint", name, "-o", str(archive), state_dir=state_dir)
        assert refused.returncode == 14, refused.stderr
        assert f"{sleeper} (sleep 1000)" in refused.stderr
        assert not archive.exists()
        seen = _last_line(state_dir, name)
        wait_for(lambda: _last_line(state_dir, name) > seen + 2, 30, "the counter to go on")
        # SIGTERM to kerrickpt exec goes on to the command; it ends with the command's status.
        session.send_signal(signal.SIGTERM)
        assert session.wait(timeout=60) == 128 + signal.SIGTERM
        assert not _sleepers(group)
    done = cli("checkpoint", name, "-o", str(archive), state_dir=state_dir)
    assert done.returncode == 0, done.stderr


def test_logs_prints_and_follows_a_restored_container_until_it_is_killed(state_dir: Path, tmp_path: Path) -> None:
    name = _start(state_dir)
    wait_for(lambda: _last_line(state_dir, name) >= 3, 30, "a few lines")
    printed = cli("logs", name, state_dir=state_dir)
    assert printed.returncode == 0
    assert printed.stdout.startswith("line 0\nline 1\nline 2\n")
    archive = tmp_path / "c.kckpt"
    assert cli("checkpoint", name, "-o", str(archive), state_dir=state_dir).returncode == 0
    assert cli("restore", str(archive), state_dir=state_dir).returncode == 0
    before = _last_line(state_dir, name)
    env = cli_env(state_dir)
    with subprocess.Popen([*KERRICKPT, "logs", "-f", name], env=env, stdout=subprocess.PIPE) as follower:
        try:
            assert follower.stdout is not None
            numbers = []
            for line in follower.stdout:  # what the restored counter writes after the follow began
                numbers += [int(n) for n in LINE.findall(line)]
                if numbers[-1:] and numbers[-1] > before + 2:
                    break
            assert numbers[: before + 1] == list(range(before + 1))  # what the log held first, in order
            assert cli("kill", name, state_dir=state_dir).returncode == 0
            assert follower.wait(timeout=60) == 0
        finally:
            follower.kill()
    assert cli("logs", name, state_dir=state_dir).returncode == 4


def test_user_names_are_read_in_the_containers_root(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\npostgres:x:101:103::/var/lib/postgresql:/bin/sh\nbad\n")
    (etc / "group").write_text("root:x:0:\nssl-cert:x:104:postgres\n")
    assert users.resolve("postgres", tmp_path) == users.Account(101, 103, (103, 104), "/var/lib/postgresql")
    assert users.resolve("postgres:ssl-cert", tmp_path) == users.Account(101, 104, (104,), "/var/lib/postgresql")
    assert users.resolve("101", tmp_path).gid == 103
    assert users.resolve("4242", tmp_path) == users.Account(4242, 0, (0,), "/")
    assert (users.resolve("4242:7", tmp_path).uid, users.resolve("4242:7", tmp_path).gid) == (4242, 7)
    for bad in ("nobody", "postgres:nogroup", "", ":5", "postgres:"):
        with pytest.raises(UsageError):
            users.resolve(bad, tmp_path)
    (etc / "passwd").unlink()
    (etc / "passwd").symlink_to("/etc/passwd")  # resolved within the root: itself, a loop; never the host's
    with pytest.raises(UsageError):
        users.resolve("root", tmp_path)
