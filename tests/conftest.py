"""Shared fixtures: machine capabilities, a private state directory, the compiled workload, cleanup."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

import kerrickpt
from bench.lab import pipe_max_size
from kerrickpt import containers, criu, limits, netsettings, node, testmode
from kerrickpt.localnodes import Cluster
from tests.helpers import Workload, ipc_keys, unique_name, wait_for

WORKLOAD_SOURCE = Path(__file__).parent / "workload" / "ipcworkload.c"
JOBCOUNT_SOURCE = Path(__file__).parent / "workload" / "jobcount.c"
STUCKVFORK_SOURCE = Path(__file__).parent / "workload" / "stuckvfork.c"
MEMLOAD_SOURCE = Path(__file__).parent.parent / "bench" / "memload.c"


@cache
def capabilities() -> dict[str, str | None]:
    """What this machine can do for the tests, probed once; None means available."""
    if os.geteuid() != 0:
        reason: str | None = "not root"
    else:
        try:
            ok, text = criu.check(criu.locate())
            reason = None if ok else f"criu check failed: {text[-200:]}"
        except kerrickpt.KerrickptError as exc:
            reason = str(exc)
    return {"root+criu": reason}


def pytest_report_header(config: pytest.Config) -> list[str]:
    caps = capabilities()
    return [f"kerrickpt capabilities: {k}={'yes' if v is None else 'NO (' + v + ')'}" for k, v in caps.items()]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root"):
        reason = capabilities()["root+criu"]
        if reason is not None:
            pytest.skip(f"needs root and a working CRIU: {reason}")


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # In CI nothing may skip: the root/CRIU tests are the heart of the suite.
    if (os.environ.get("CI") or os.environ.get("KERRICKPT_REQUIRE_ALL")) and _skipped:
        print(f"\nCI: {len(_skipped)} test(s) skipped, which CI does not allow: {', '.join(_skipped)}")
        session.exitstatus = 1


@pytest.fixture(scope="session", autouse=True)
def _test_mode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests run in test mode, and so does every kerrickpt they start with this environment."""
    entered = testmode.write_marker(tmp_path_factory.mktemp("test-mode") / "marker")
    os.environ.update(entered)
    yield
    os.environ.pop(testmode.ENV, None)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KERRICKPT_STATE_DIR", "KERRICKPT_FAULT", "KERRICKPT_CGROUP_PARENT", "KERRICKPT_TEST_FINGERPRINT"):
        monkeypatch.delenv(name, raising=False)
    for name in netsettings.ENVS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A private state directory; every container left in it is killed afterwards, and `gc` run."""
    path = tmp_path / "state"
    yield path
    if (path / "containers").exists():
        registry = containers.Registry(path)
        with contextlib.ExitStack() as cleanup:  # every container, even if one of them fails to go
            cleanup.callback(kerrickpt.gc, path)  # and what a run the test killed left
            for container in registry.all():
                cleanup.callback(containers.remove, registry, container)


@pytest.fixture(scope="session")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C test workload, compiled for this run."""
    return _compiled(tmp_path_factory, WORKLOAD_SOURCE, "-pthread")


@pytest.fixture(scope="session")
def memload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's workload (fills N MiB and verifies them on SIGUSR1), compiled for this run."""
    return _compiled(tmp_path_factory, MEMLOAD_SOURCE, "-static")


@pytest.fixture(scope="session")
def jobcount(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The counting job of the job tests (memory, SysV shm and a semaphore in step), compiled for this run."""
    return _compiled(tmp_path_factory, JOBCOUNT_SOURCE, "-static")


@pytest.fixture(scope="session")
def stuck_vfork(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parent whose vfork child never execs or exits, compiled for this run."""
    return _compiled(tmp_path_factory, STUCKVFORK_SOURCE)


def _compiled(tmp_path_factory: pytest.TempPathFactory, source: Path, *flags: str) -> Path:
    binary = tmp_path_factory.mktemp(source.stem) / source.stem
    subprocess.run(["gcc", "-O2", *flags, "-o", str(binary), str(source)], check=True)
    return binary


@pytest.fixture
def start_workload(state_dir: Path, workload: Path) -> Callable[..., Workload]:
    def start(name: str | None = None) -> Workload:
        name = name or unique_name()
        keys = ipc_keys()
        kerrickpt.run(name, [str(workload), "run", *map(str, keys)], state_dir=state_dir)
        w = Workload(name, keys, state_dir, workload)
        wait_for(lambda: "ready threads" in w.log, what="workload ready")
        w.wait_ticking()
        return w

    return start


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Two local nodes (network namespaces with their own sshd, state and cgroups), removed afterwards."""
    with Cluster(2, test_mode=True) as nodes:
        yield nodes


@pytest.fixture
def big_pipes() -> Iterator[None]:
    """Pipes big enough for CRIU's lazy pages (root here lacks CAP_SYS_RESOURCE)."""
    with pipe_max_size(node.LAZY_PIPE_SIZE):
        yield


@pytest.fixture
def userfaultfd_in_user_namespaces() -> Iterator[None]:
    """vm.unprivileged_userfaultfd=1, which a confined container's post-copy needs, put back afterwards."""
    with _unprivileged_userfaultfd("1"):
        yield


@pytest.fixture
def no_userfaultfd_in_user_namespaces() -> Iterator[None]:
    """vm.unprivileged_userfaultfd=0, which refuses a confined container's post-copy, put back afterwards."""
    with _unprivileged_userfaultfd("0"):
        yield


@contextlib.contextmanager
def _unprivileged_userfaultfd(value: str) -> Iterator[None]:
    path = node.UNPRIVILEGED_USERFAULTFD
    before = path.read_text()
    path.write_text(value)
    try:
        yield
    finally:
        path.write_text(before)


@pytest.fixture(autouse=True)
def _default_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every time limit at its default, whatever the environment running the tests sets."""
    for limit in vars(limits).values():
        if isinstance(limit, limits.Limit):
            monkeypatch.delenv(limit.env, raising=False)
