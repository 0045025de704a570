"""Owns the DMTCP baseline of the job case: its build, its private network and cgroup, launch, checkpoint, restart.

DMTCP is never part of kerrickpt: `bench/dmtcp-build` builds the pinned source from
../shared/anchors (or $KERRICKPT_DMTCP_TARBALL) once into the CI cache. Its coordinator
listens on every address it has and has no option to bind one, so all of DMTCP runs in a
network namespace of its own whose only interface is lo: nothing outside reaches it. Every
process it starts runs in one cgroup, killed whole when the baseline closes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.lab import BenchError, Runner, run, wait_for
from kerrickpt import cgroups, command

BUILD = Path(__file__).with_name("dmtcp-build")
IMAGE_GLOB = "ckpt_*.dmtcp"  # its images; the restart script beside them is no part of the size


def build() -> Path:
    """DMTCP's install prefix, built first if the cache lacks it; BenchError with the script's words if it fails."""
    result = command.run([str(BUILD)], timeout=900)
    if result.returncode != 0:
        raise BenchError(f"{BUILD.name} failed:\n{command.tail(result.stderr)}")
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass
class Dmtcp:
    """The built DMTCP, its network namespace and its cgroup (one directory in each hierarchy)."""

    prefix: Path
    netns: str
    group: cgroups.Cgroup

    def argv(self, program: str, *args: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", str(self.prefix / "bin" / program), *args]

    def start(self, argv: Sequence[str], log: Path, cwd: Path) -> Runner:
        """Start `argv` in the cgroup, its output appended to `log`."""
        with log.open("ab") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                       preexec_fn=self._join, start_new_session=True)  # fmt: skip
        return Runner(process, log)

    def _join(self) -> None:  # pragma: no cover - runs in the child before exec
        self.group.add(os.getpid())

    def kill_all(self) -> None:
        """End every process DMTCP runs (coordinators, workloads, restarts); the cgroup stays for the next."""
        self.group.kill()


@contextlib.contextmanager
def baseline() -> Iterator[Dmtcp]:
    """DMTCP, built if needed, with its namespace and cgroup; both removed when the block ends."""
    prefix = build()
    name = f"kerrickpt-bench-dmtcp-{os.getpid()}"  # of its namespace and cgroup: two runs never share them
    with contextlib.ExitStack() as cleanup:
        run(["ip", "netns", "add", name], timeout=30)
        cleanup.callback(run, ["ip", "netns", "del", name], timeout=30)
        run(["ip", "-n", name, "link", "set", "lo", "up"], timeout=30)
        dirs = []
        for root in cgroups.detect().roots():
            (root / name).mkdir()
            dirs.append(root / name)
            cleanup.callback(cgroups.Cgroup((root / name,)).remove)
        yield Dmtcp(prefix, name, cgroups.Cgroup(tuple(dirs)))


@dataclass
class Session:
    """One workload under DMTCP: launched with a coordinator of its own on a free port, images in `work`."""

    dmtcp: Dmtcp
    work: Path  # 0700: the images hold the workload's memory

    @property
    def images(self) -> Path:
        return self.work / "images"

    def launch(self, workload: Sequence[str], log: Path) -> Runner:
        """`dmtcp_launch` of the workload (gzip images, DMTCP's default) with a new coordinator on a free port."""
        self.images.mkdir(mode=0o700)
        (self.work / "tmp").mkdir(mode=0o700)
        return self.dmtcp.start(self.dmtcp.argv("dmtcp_launch", *self._coordinator("launch"),
                                                "--ckptdir", str(self.images), *workload), log, self.work)  # fmt: skip

    def checkpoint(self, timeout: float) -> float:
        """`dmtcp_command --bcheckpoint`: seconds until it returns, when the images are complete."""
        return run(self.dmtcp.argv("dmtcp_command", *self._port("launch"), "--bcheckpoint"), timeout=timeout)

    def image_bytes(self) -> int:
        images = list(self.images.rglob(IMAGE_GLOB))
        if not images:
            raise BenchError(f"DMTCP wrote no {IMAGE_GLOB} into {self.images}")
        return sum(p.stat().st_size for p in images)

    def restart(self, log: Path) -> Runner:
        """`dmtcp_restart` of the images with a new coordinator, as a requeued job would run it."""
        images = [str(p) for p in sorted(self.images.rglob(IMAGE_GLOB))]
        return self.dmtcp.start(self.dmtcp.argv("dmtcp_restart", *self._coordinator("restart"), *images), log,
                                self.work)  # fmt: skip

    def _coordinator(self, what: str) -> list[str]:
        return ["--new-coordinator", "--coord-host", "127.0.0.1", "--coord-port", "0",
                "--port-file", str(self.work / f"{what}.port"), "--tmpdir", str(self.work / "tmp")]  # fmt: skip

    def _port(self, what: str) -> list[str]:
        port = wait_for(lambda: _read_port(self.work / f"{what}.port"), 60, f"DMTCP's coordinator port ({what})")
        return ["--coord-host", "127.0.0.1", "--coord-port", str(port)]


def _read_port(path: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return int(path.read_text())
    return None
