"""Owns what the benchmark sets up and tears down: a tmpfs, two local nodes, the workload, timed commands.

Everything lives on one tmpfs the lab mounts (images, archives, the nodes' state), so disk
speed never enters the numbers; closing the lab kills every container on both nodes,
removes their cgroups and namespaces and unmounts the tmpfs, whatever went wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kerrickpt import cgroups, command, criu
from kerrickpt.localnodes import Cluster, Node, kerrickpt_path

SOURCE = Path(__file__).with_name("memload.c")
ECHO = Path(__file__).with_name("echo.py")
ECHO_PORT = 7000
REDISLOAD = Path(__file__).with_name("redisload.py")
REDIS = "redis"  # the workload kind that is Debian's redis-server, not memload
REDIS_PORT = 6379
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: a rootfs of one file
CGROUP_FS = Path("/sys/fs/cgroup")
RUNC_CGROUP = "kerrickpt-bench-runc"
MIB = 2**20
VERIFY = re.compile(r"^verify (OK|BAD) sum=([0-9a-f]+)", re.M)
READY = re.compile(r"^ready mib=\d+ kind=\w+ sum=([0-9a-f]+)$", re.M)
CHURNED = re.compile(r"^churned pages=(\d+) sum=([0-9a-f]+)$", re.M)
CONNECTED = re.compile(r"^connected \d+$", re.M)  # bench/echo.py's clients, all connected
SAMPLE_INTERVAL = 0.02
ACTION_COMMANDS = ("key", "snapshots")  # kerrickpt commands whose first argument is an action
CHURN_PERCENT = 5  # of the pages the store cases' workload rewrites between snapshots (issue 16's share)
# Where a confined container finds the workload, bound read-only: its own /tmp and the lab's tmpfs (private to root)
# hide the host's path.
BIN = "/opt/kerrickpt-bench"
LAYER_FILE = "/var/tmp/layer"  # what a confined workload writes first, in its own layer


T = TypeVar("T")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and shows the program's words."""


def timeout_for(mib: int) -> float:
    """Generous limits for one external step: a stuck step fails the run instead of hanging it."""
    return 120.0 + 60.0 * mib / 1024


def run(argv: Sequence[str], *, timeout: float) -> float:
    """Run a program to completion, raising BenchError if it fails; returns its wall time in seconds."""
    started = time.monotonic()
    result = command.run(argv, timeout=timeout)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {result.returncode}:\n{command.tail(result.stderr)}")
    return elapsed


def shell(script: str, *, timeout: float) -> float:
    """A pipeline, as an operator would type it; pipefail so a failing stage fails the step."""
    return run(["bash", "-o", "pipefail", "-euc", script], timeout=timeout)


class PeakMemory:
    """Samples VmHWM of every kerrickpt process (CLI, forked helpers, the target's agent) while it runs.

    CRIU's own processes are not counted: this is kerrickpt's overhead on top of CRIU.
    """

    def __init__(self) -> None:
        self.peak_kib = 0
        # Processes older than the command are never kerrickpt's; a new one may still be
        # `nsenter` about to exec kerrickpt, so it is looked at again until it is.
        self._older = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak_kib / 1024, 1)

    def _loop(self) -> None:
        target = kerrickpt_path().encode()
        while not self._stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) not in self._older:
                    self._sample(int(entry), target)
            self._stop.wait(SAMPLE_INTERVAL)

    def _sample(self, pid: int, target: bytes) -> None:
        with contextlib.suppress(OSError):
            if target in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))


@dataclass
class Job:
    """One workload container on a node: its name, init's host PID and its log."""

    node: Node
    name: str
    pid: int
    cgroup: list[str]
    expected_sum: str
    address: str | None = None  # its network's address (ADDR/PREFIX), with a network of its own

    @property
    def log(self) -> Path:
        return self.node.state_dir / "containers" / self.name / "log"

    def moved(self, node: Node, name: str, pid: int) -> Job:
        """The same workload, restored as container `name` on `node` with init at host PID `pid`."""
        return dataclasses.replace(self, node=node, name=name, pid=pid, cgroup=[])

    def verify(self, mib: int) -> bool:
        """Ask the workload to hash its memory again; True if it matches what it wrote."""
        return verify(self.log, self.pid, self.expected_sum, mib)

    def churn(self, mib: int) -> int:
        """Have the workload rewrite its share of pages (see Lab.start's `churn`); the pages it rewrote."""
        offset = self.log.stat().st_size
        os.kill(self.pid, signal.SIGUSR2)
        match = wait_for_line(self.log, CHURNED, offset, timeout_for(mib))
        self.expected_sum = match.group(2)
        return int(match.group(1))


@dataclass
class RedisJob(Job):
    """Debian's redis-server (see redis_server) in a container with a network of its own, filled by
    bench/redisload.py; `churn` rewrites `percent`% of its keys, picked at random, and `verify` compares redis's
    digest of its data with the one taken after the last fill or churn."""

    percent: int = 0

    def redisload(self, verb: str, *args: str, mib: int) -> dict[str, str]:
        """bench/redisload.py's VERB ARGS against this redis, from its node (whose bridge reaches the container's
        address): the fields (`name=value`) of the line it printed."""
        assert self.address is not None
        argv = ["nsenter", f"--net=/run/netns/{self.node.netns}", sys.executable, str(REDISLOAD), verb,
                self.address.split("/")[0], str(REDIS_PORT), *args]  # fmt: skip
        done = command.run(argv, timeout=timeout_for(mib))
        if done.returncode != 0:
            raise BenchError(f"redisload {verb} exited {done.returncode}:\n{command.tail(done.stdout + done.stderr)}")
        return dict(field.split("=", 1) for field in done.stdout.split()[1:])

    def verify(self, mib: int) -> bool:
        return self.redisload("digest", mib=mib)["sum"] == self.expected_sum

    def churn(self, mib: int) -> int:
        """Have redis's keys rewritten, `percent`% of them; the keys rewritten."""
        done = self.redisload("churn", str(self.percent), mib=mib)
        self.expected_sum = done["sum"]
        return int(done["keys"])


def redis_server(port: int) -> list[str]:
    """The command of Debian's redis-server listening on `port` of every address of its container, keeping nothing on
    disk, DEBUG allowed (its DIGEST checks the data after the snapshots). It runs as root, not as the package's user
    `redis`: CRIU cannot dump another user's task where root lacks CAP_SYS_RESOURCE, as on the test machines. In a
    confined container (`--rootfs`, a user namespace that root owns) it may run as a user (`--user`): CRIU dumps it."""
    return ["redis-server", "--port", str(port), "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
            "--appendonly", "no", "--enable-debug-command", "yes"]  # fmt: skip


def verify(log: Path, pid: int, expected_sum: str, mib: int) -> bool:
    """Ask the workload (init `pid`, writing to `log`) to hash its memory again; True if it is as written."""
    offset = log.stat().st_size
    os.kill(pid, signal.SIGUSR1)
    match = wait_for_line(log, VERIFY, offset, timeout_for(mib))
    return match.group(1) == "OK" and match.group(2) == expected_sum


@dataclass
class EchoClients:
    """bench/echo.py's clients, running: the file that stops them, their report, and their output."""

    stop: Path
    report: Path
    runner: Runner

    def finish(self) -> dict[str, Any]:
        """Stop them (each gets a few more answers first) and read their report: every connection's answers, its
        longest wait between two, and the first wrong or missing answer (`error`, empty if none)."""
        self.stop.touch()
        self.runner.process.wait(timeout=120)
        if not self.report.exists():
            raise BenchError(f"the echo clients wrote no report:\n{command.tail_file(self.runner.log)}")
        report: dict[str, Any] = json.loads(self.report.read_text())
        return report


@dataclass
class RuncJob:
    """The workload in a busybox container run by runc, as operators run containers they checkpoint with runc."""

    name: str
    root: Path  # runc's state directory for this container alone
    bundle: Path
    criu: str
    expected_sum: str = ""

    @property
    def log(self) -> Path:
        return self.bundle / "rootfs" / "log"

    def runc(self, *args: str, timeout: float) -> float:
        """`runc ARGS` with the project's CRIU; wall time, or BenchError with runc's words."""
        return run(["runc", "--root", str(self.root), "--criu", self.criu, *args], timeout=timeout)

    def verify(self, mib: int) -> bool:
        state = command.run(["runc", "--root", str(self.root), "state", self.name], timeout=30)
        if state.returncode != 0:
            raise BenchError(f"runc state {self.name} failed:\n{command.tail(state.stderr)}")
        return verify(self.log, int(json.loads(state.stdout)["pid"]), self.expected_sum, mib)


class Lab:
    """The tmpfs, the two local nodes and the compiled workload of one benchmark run."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kerrickpt-bench-", dir="/dev/shm"))
        self.mounted = False
        self.cluster: Cluster | None = None
        self.criu = criu.locate()
        self._serial = 0
        self._baselines: dict[str, Any] = {}
        self._teardown = contextlib.ExitStack()

    def __enter__(self) -> Lab:
        try:
            total_kib = int(Path("/proc/meminfo").read_text().split()[1])
            run(["mount", "-t", "tmpfs", "-o", f"size={total_kib * 9 // 10}k,mode=0700", "bench", str(self.root)],
                timeout=30)  # fmt: skip
            self.mounted = True
            # The local nodes put their state under tempfile's directory: make that the tmpfs.
            tempfile.tempdir = str(self.root)
            (self.root / "bin").mkdir(mode=0o755)  # any user may read it: a confined container's root is not root
            self.binary = self.root / "bin" / "memload"
            run(["gcc", "-O2", "-static", "-o", str(self.binary), str(SOURCE)], timeout=120)
            # DMTCP preloads itself into the programs it runs: the job case's workload is linked dynamically.
            self.dynamic_binary = self.root / "bin" / "memload-dynamic"
            run(["gcc", "-O2", "-o", str(self.dynamic_binary), str(SOURCE)], timeout=120)
            self.cluster = Cluster(2)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._teardown.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            tempfile.tempdir = None
            if self.mounted:
                run(["umount", str(self.root)], timeout=60)
            os.rmdir(self.root)

    def baseline(self, name: str, setup: Callable[[], contextlib.AbstractContextManager[T]]) -> T:
        """A baseline tool (DMTCP) set up by `setup` on its first use in the run, torn down with the lab."""
        if name not in self._baselines:
            self._baselines[name] = self._teardown.enter_context(setup())
        value: T = self._baselines[name]
        return value

    @property
    def nodes(self) -> tuple[Node, Node]:
        assert self.cluster is not None
        a, b = self.cluster.nodes
        return a, b

    @contextlib.contextmanager
    def scratch(self, what: str) -> Iterator[Path]:
        """A fresh directory on the tmpfs, removed afterwards: images of GiBs must not pile up in memory."""
        self._serial += 1
        path = self.root / f"{what}-{self._serial}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def start(self, mib: int, kind: str, layer_mib: int | None = None, *, churn: tuple[int, int] | None = None) -> Job:
        """Start the workload as a kerrickpt container on node a; returns once its memory is filled.

        With `layer_mib`, a confined container (`--rootfs host`) that first writes that many MiB into its layer.
        With `churn` (percent, run of pages), it rewrites that share of its pages on SIGUSR2 (see memload.c).
        Kind `redis` is redis-server filled with keys instead (see start_redis; its churn rewrites whole keys).
        """
        if kind == REDIS:
            if layer_mib is not None or (churn and churn[1] != 1):
                raise BenchError("redis runs unconfined and rewrites whole keys: no layer, no runs of pages")
            return self.start_redis(mib, churn[0] if churn else 0)
        churning = ["--churn", *map(str, churn)] if churn else []
        if layer_mib is None:
            command = ["--", str(self.binary), *churning, str(mib), kind]
        else:
            bound = f"{self.binary.parent}:{BIN}:ro"
            command = ["--rootfs", "host", "--volume", bound, "--", f"{BIN}/{self.binary.name}", *churning, str(mib),
                       kind, LAYER_FILE, str(layer_mib)]  # fmt: skip
        return self._launch(f"bench-{kind}-{mib}", command, mib + (layer_mib or 0))

    def start_echo(self, mib: int) -> Job:
        """Start bench/echo.py's server, holding `mib` MiB, as a container with a network of its own on node a,
        listening on ECHO_PORT; returns once its memory is filled."""
        return self._launch(f"bench-echo-{mib}", ["--net", "own", "--", sys.executable, str(ECHO), "serve",
                            str(ECHO_PORT), str(mib)], mib)  # fmt: skip

    def start_redis(self, mib: int, percent: int = 0) -> RedisJob:
        """Start redis-server as a container with a network of its own on node a and fill it with keys until its
        used_memory reaches `mib` MiB; each churn rewrites `percent`% of them."""
        job = RedisJob(**vars(self._run(f"bench-redis-{mib}", ["--net", "own", "--", *redis_server(REDIS_PORT)])),
                       percent=percent)  # fmt: skip
        filled = job.redisload("fill", str(mib), mib=mib)
        job.expected_sum = filled["sum"]
        print(f"redis filled: {filled['keys']} keys, used_memory {filled['used_mib']} MiB", file=sys.stderr, flush=True)
        return job

    def _launch(self, stem: str, command: list[str], mib: int) -> Job:
        """Run `command` as a container named for `stem` on node a (see _run); returns once the workload said it is
        ready (memload.c's line), its `mib` MiB filled."""
        job = self._run(stem, command)
        job.expected_sum = wait_for_line(job.log, READY, 0, timeout_for(mib)).group(1)
        return job

    def _run(self, stem: str, command: list[str]) -> Job:
        """Run `command` (`kerrickpt run`'s arguments after the name) as a container named for `stem` on node a."""
        node = self.nodes[0]
        self._serial += 1
        name = f"{stem}-{self._serial}"
        kerrickpt(node, "run", "--name", name, *command, timeout=60)
        row = next(r for r in json_of(node, "ps") if r["name"] == name)
        return Job(node, name, int(row["init_pid"]), list(row["cgroup"]), "", row.get("address"))

    @contextlib.contextmanager
    def echo_clients(self, address: str, count: int) -> Iterator[EchoClients]:
        """bench/echo.py's `count` clients of the server at `address`, in one process on a machine of the nodes'
        segment (the local nodes' switch), once all are connected; killed when the block ends if they still run."""
        assert self.cluster is not None
        with self.scratch("clients") as work:
            stop, report, log = work / "stop", work / "report.json", work / "log"
            argv = ["nsenter", f"--net=/run/netns/{self.cluster.switch}", sys.executable, str(ECHO), "talk", address,
                    str(ECHO_PORT), str(count), str(stop), str(report)]  # fmt: skip
            with log.open("wb") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            clients = EchoClients(stop, report, Runner(process, log))
            try:
                wait_for_line(log, CONNECTED, 0, 60, runner=clients.runner)
                yield clients
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait()

    @contextlib.contextmanager
    def runc_container(self, mib: int, kind: str) -> Iterator[RuncJob]:
        """The workload in a busybox container under runc, its memory filled; deleted when the block ends."""
        if not shutil.which("runc") or not BUSYBOX.exists():
            raise BenchError("the runc case needs runc and busybox-static (ci/setup installs them)")
        self._serial += 1
        with self.scratch("runc") as work:
            job = RuncJob(f"bench-runc-{kind}-{mib}-{self._serial}", work / "state", work / "bundle", self.criu.path)
            rootfs = job.bundle / "rootfs"
            (rootfs / "bin").mkdir(parents=True)
            shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
            (rootfs / "bin" / "sh").symlink_to("busybox")
            shutil.copy2(self.binary, rootfs / "memload")
            run(["runc", "spec", "--bundle", str(job.bundle)], timeout=30)
            spec = json.loads((job.bundle / "config.json").read_text())
            spec["process"]["terminal"] = False
            # Its log in the container's own file system: runc carries that across a checkpoint.
            spec["process"]["args"] = ["/bin/sh", "-c", f"exec /memload {mib} {kind} >/log 2>&1"]
            spec["root"]["readonly"] = False
            # A known cgroup: whatever runc leaves behind (a restore that timed out) is killed from it.
            spec["linux"]["cgroupsPath"] = f"/{RUNC_CGROUP}/{job.name}"
            (job.bundle / "config.json").write_text(json.dumps(spec))
            try:
                job.runc("run", "--detach", "--bundle", str(job.bundle), job.name, timeout=60)
                job.expected_sum = wait_for_line(job.log, READY, 0, timeout_for(mib)).group(1)
                yield job
            finally:
                command.run(["runc", "--root", str(job.root), "delete", "--force", job.name], timeout=60)
                _remove_cgroups(job.name)

    def criu_dump(self, job: Job, images: Path, mib: int) -> dict[str, float]:
        """Raw `criu dump` of the job (which ends it), as an operator runs it; wall time and frozen window."""
        freezer = str(cgroups.Cgroup(tuple(Path(p) for p in job.cgroup)).freezer.path)
        wall = self._criu(job, "dump", images, mib, "-t", str(job.pid), "--freeze-cgroup", freezer)
        stats = _dump_stats(images / "stats-dump")
        # CRIU's own clock: from the start of freezing until the tree was killed.
        frozen = (stats["freezing_time"] + stats["frozen_time"]) / 1e6
        return {"dump_s": wall, "frozen_s": frozen}

    def criu_restore(self, job: Job, images: Path, mib: int) -> tuple[float, int]:
        """Raw `criu restore -d` into the job's cgroup; returns wall time and the restored init's host PID."""
        pidfile = images.parent / f"{images.name}.pid"
        dirs = [Path(p) for p in job.cgroup]

        def join_cgroup() -> None:  # pragma: no cover - runs in the child before exec
            for path in dirs:
                (path / "cgroup.procs").write_text(str(os.getpid()))

        wall = self._criu(job, "restore", images, mib, "-d", "--pidfile", str(pidfile), preexec=join_cgroup)
        return wall, int(pidfile.read_text())

    def _criu(
        self, job: Job, verb: str, images: Path, mib: int, *args: str, preexec: Callable[[], None] | None = None
    ) -> float:
        """Run `criu VERB` on `images` with its log there; wall time, or BenchError with the log's tail.

        CRIU runs in the job's node's network namespace, as kerrickpt does there: from another one
        it would try to dump and lock the container's network namespace.
        """
        started = time.monotonic()
        result = subprocess.run(
            ["nsenter", f"--net=/run/netns/{job.node.netns}", self.criu.path, verb, "-D", str(images),
             "-o", f"{verb}.log", "-v4", "--manage-cgroups=ignore", *args],
            capture_output=True, timeout=timeout_for(mib), preexec_fn=preexec, check=False,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            raise BenchError(f"criu {verb} failed:\n{command.tail_file(images / f'{verb}.log')}")
        return elapsed


def kerrickpt(node: Node, *args: str, timeout: float) -> tuple[Any, float, float]:
    """Run `kerrickpt ARGS --json` on `node`: its answer, wall time and the peak memory of kerrickpt's processes."""
    with PeakMemory() as peak:
        started = time.monotonic()
        # --json right after the command (and its action: `snapshots init`): after `run ... --` it would go to the
        # container's command.
        at = 2 if args[0] in ACTION_COMMANDS else 1
        result = node.kerrickpt(*args[:at], "--json", *args[at:], timeout=timeout)
        elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"kerrickpt {' '.join(args)} on node {node.name} exited {result.returncode}:\n"
                         f"{command.tail(result.stdout + result.stderr)}")  # fmt: skip
    return json.loads(result.stdout), elapsed, peak.peak_mib


def json_of(node: Node, *args: str) -> Any:
    return kerrickpt(node, *args, timeout=60)[0]


@dataclass
class Runner:
    """A program started in the background, its output going to `log` (through `copier` if it is not None)."""

    process: subprocess.Popen[bytes]
    log: Path
    copier: threading.Thread | None = None

    def check(self) -> None:
        """BenchError with the log's tail if the program has ended: what it was to start will never come."""
        if (code := self.process.poll()) is not None:
            if self.copier is not None:
                self.copier.join(timeout=10)
            raise BenchError(f"{self.process.args} exited {code} early:\n{command.tail_file(self.log)}")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, *, runner: Runner | None = None) -> T:
    """Poll `probe` every 5 ms until it gives a value; BenchError after `timeout`, or once `runner` has ended."""
    deadline = time.monotonic() + timeout
    while (value := probe()) is None:
        if runner is not None:
            runner.check()
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.005)
    return value


def wait_for_line(
    path: Path, pattern: re.Pattern[str], offset: int, timeout: float, *, runner: Runner | None = None
) -> re.Match[str]:
    """The first line matching `pattern` that `path` gains past byte `offset`; gives up early if `runner` (what
    runs the program writing `path`) ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError), path.open("rb") as fh:
            fh.seek(offset)
            if match := pattern.search(fh.read().decode(errors="replace")):
                return match
        if runner is not None:
            runner.check()
        time.sleep(0.05)
    raise BenchError(f"{path} did not show {pattern.pattern!r} within {timeout:.0f} s")


def _dump_stats(path: Path) -> dict[str, int]:
    import pycriu  # from the project's .venv, built with CRIU

    with path.open("rb") as fh:
        image = pycriu.images.load(fh)
    return dict(image["entries"][0]["dump"])


@contextlib.contextmanager
def pipe_max_size(size: int) -> Iterator[None]:
    """This kernel's fs.pipe-max-size for the block, put back afterwards."""
    path = Path("/proc/sys/fs/pipe-max-size")
    before = path.read_text()
    path.write_text(str(size))
    try:
        yield
    finally:
        path.write_text(before)


def _remove_cgroups(name: str) -> None:
    """Kill what is left in runc container `name`'s cgroups and remove them, in every hierarchy."""
    for path in [*CGROUP_FS.glob(f"*/{RUNC_CGROUP}/{name}"), CGROUP_FS / RUNC_CGROUP / name]:
        if path.is_dir():
            cgroups.Cgroup((path,)).remove()
    for parent in [*CGROUP_FS.glob(f"*/{RUNC_CGROUP}"), CGROUP_FS / RUNC_CGROUP]:
        with contextlib.suppress(OSError):
            parent.rmdir()  # once the last runc container of the run is gone


@contextlib.contextmanager
def removed(node: Node, name: str) -> Iterator[None]:
    """Kill container `name` on `node` when the block ends, however it ends."""
    try:
        yield
    finally:
        node.kerrickpt("kill", name, timeout=60)
