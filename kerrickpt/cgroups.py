"""Owns container cgroups: layout detection, creation with limits, membership, usage, kill and removal."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kerrickpt.errors import ContainerNotFoundError, KerrickptError
from kerrickpt.freezer import Freezer

PARENT_ENV = "KERRICKPT_CGROUP_PARENT"
DEFAULT_PARENT = "kerrickpt"
MOUNTS = Path("/proc/self/mounts")
EMPTY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Layout:
    """Where the cgroup hierarchies of this host are mounted."""

    unified: Path | None
    freezer: Path | None
    memory: Path | None

    def roots(self) -> list[Path]:
        """The hierarchies kerrickpt puts a container's cgroup in."""
        return [r for r in (self.unified, self.freezer, self.memory) if r is not None]

    @property
    def kind(self) -> str:
        if self.unified and not (self.freezer or self.memory):
            return "v2"
        if self.unified:
            return "hybrid"
        return "v1" if self.freezer or self.memory else "none"

    def to_dict(self) -> dict[str, str | None]:
        return {
            "kind": self.kind,
            "unified": str(self.unified) if self.unified else None,
            "v1_freezer": str(self.freezer) if self.freezer else None,
            "v1_memory": str(self.memory) if self.memory else None,
        }


def detect(mounts: Path = MOUNTS) -> Layout:
    """Read the mount table: cgroup2 and the v1 freezer and memory hierarchies."""
    unified = freezer = memory = None
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        fstype, mountpoint, options = fields[2], Path(fields[1]), fields[3].split(",")
        # The first mount of each wins: the host's are mounted at boot. Later ones come and go, as the cgroup
        # yard a CRIU run by runc mounts in the host's mount namespace while it restores.
        if fstype == "cgroup2" and unified is None:
            unified = mountpoint
        elif fstype == "cgroup":
            if "freezer" in options and freezer is None:
                freezer = mountpoint
            if "memory" in options and memory is None:
                memory = mountpoint
    return Layout(unified=unified, freezer=freezer, memory=memory)


@dataclass(frozen=True)
class Cgroup:
    """One container's cgroup: a directory in each hierarchy the host has."""

    dirs: tuple[Path, ...]

    @property
    def freezer(self) -> Freezer:
        """The v2 freezer where there is one, else the v1 freezer."""
        for path in self.dirs:
            if (path / "cgroup.freeze").exists():
                return Freezer(path)
        for path in self.dirs:
            if (path / "freezer.state").exists():
                return Freezer(path)
        raise KerrickptError(f"no freezer among {', '.join(map(str, self.dirs))}")

    def pids(self) -> list[int]:
        """Every process in the cgroup (the union over its hierarchies)."""
        return sorted({pid for path in self.dirs for pid in _members(path)})

    def memory_usage(self) -> int | None:
        for path, name in ((d, f) for d in self.dirs for f in ("memory.current", "memory.usage_in_bytes")):
            if (path / name).exists():
                return int((path / name).read_text())
        return None

    def memory_limit(self) -> int | None:
        for path in self.dirs:
            if (path / "memory.max").exists():
                value = (path / "memory.max").read_text().strip()
                return None if value == "max" else int(value)
            if (path / "memory.limit_in_bytes").exists():
                value_int = int((path / "memory.limit_in_bytes").read_text())
                return None if value_int >= 2**62 else value_int
        return None

    def add(self, pid: int) -> None:
        for path in self.dirs:
            (path / "cgroup.procs").write_text(str(pid))

    def kill(self) -> None:
        """End every process and wait until the cgroup is empty, never signalling one outside it.

        cgroup v2's `cgroup.kill` ends the whole tree in the kernel. Without it, the cgroup is
        frozen (nothing forks or exits meanwhile) and each process is signalled through a pidfd
        opened while it was still a member, so a PID reused by another process is never hit;
        then it is thawed, for frozen v1 tasks die only once thawed.
        """
        kill_files = [d / "cgroup.kill" for d in self.dirs if (d / "cgroup.kill").exists()]
        for path in kill_files:
            path.write_text("1")
        deadline = time.monotonic() + EMPTY_TIMEOUT
        while pids := self.pids():
            if not kill_files:
                self._kill_by_pidfd(pids)
            if time.monotonic() > deadline:
                raise KerrickptError(f"processes {pids} of {self.dirs[0]} did not die")
            time.sleep(0.01)

    def _kill_by_pidfd(self, pids: list[int]) -> None:
        freezer = self._freezer_or_none()
        if freezer is not None:
            freezer.request(frozen=True)
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                # Opened first, checked after: if it is a member now, the pidfd is that process.
                if any(pid in _members(path) for path in self.dirs):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)
        if freezer is not None:
            freezer.thaw()

    def _freezer_or_none(self) -> Freezer | None:
        try:
            return self.freezer
        except KerrickptError:
            return None

    def remove(self) -> None:
        """Kill what is left and remove the directories."""
        existing = Cgroup(tuple(d for d in self.dirs if d.exists()))
        if existing.dirs:
            existing.kill()
        for path in existing.dirs:
            _rmdir(path)

    def to_list(self) -> list[str]:
        return [str(d) for d in self.dirs]


def remove_tree(group: Cgroup) -> None:
    """Remove a cgroup with every cgroup beneath it, deepest first: a daemon's (slurmd's) holds the containers of
    the batch jobs it started (see `own`), which a test's teardown removes with it."""
    for path in group.dirs:
        if path.is_dir():
            for child in [p for p in path.iterdir() if p.is_dir()]:
                remove_tree(Cgroup((child,)))
    group.remove()


def _members(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _rmdir(path: Path) -> None:
    """Remove an emptied cgroup; the kernel may report it busy for a moment after its last task exits."""
    deadline = time.monotonic() + EMPTY_TIMEOUT
    while True:
        try:
            path.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def parent_name() -> str:
    """The cgroup under which this node's containers live ($KERRICKPT_CGROUP_PARENT, default kerrickpt).

    Two kerrickpt nodes sharing one kernel (test nodes) need different parents.
    """
    return os.environ.get(PARENT_ENV) or DEFAULT_PARENT


def create(
    layout: Layout, name: str, memory_limit: int | None = None, parents: Mapping[Path, Path] | None = None
) -> Cgroup:
    """Make the container's cgroup in every hierarchy used, with its memory limit: beneath this node's
    parent, or beneath `parents` (hierarchy root -> cgroup there, see `own`)."""
    roots = layout.roots()
    if not roots:
        raise KerrickptError("no cgroup hierarchy is mounted on this host")
    dirs: list[Path] = []
    try:
        for root in roots:
            parent = parents[root] if parents is not None else root / parent_name()
            parent.mkdir(exist_ok=True)
            if root == layout.unified and memory_limit is not None and layout.memory is None:
                _enable_controller(root, parent, "memory")
            path = parent / name
            path.mkdir()
            dirs.append(path)
        group = Cgroup(tuple(dirs))
        if memory_limit is not None:
            _set_memory_limit(group, memory_limit)
        return group
    except BaseException:
        for path in reversed(dirs):
            path.rmdir()
        raise


def own(layout: Layout, table: Path = Path("/proc/self/cgroup")) -> dict[Path, Path]:
    """The cgroup this process is in, in each hierarchy kerrickpt uses: a batch job's own, which the
    scheduler accounts, limits and ends (containers made beneath them stay the job's)."""
    paths: dict[str, str] = {}
    for line in table.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    wanted = {layout.unified: "", layout.freezer: "freezer", layout.memory: "memory"}
    found: dict[Path, Path] = {}
    for root, controller in wanted.items():
        if root is None:
            continue
        if controller not in paths:
            raise KerrickptError(f"this process is in no cgroup of the {controller or 'unified'} hierarchy")
        found[root] = root / paths[controller].lstrip("/")
    return found


def _enable_controller(root: Path, parent: Path, controller: str) -> None:
    for path in (root, parent):
        control = path / "cgroup.subtree_control"
        if controller not in control.read_text().split():
            control.write_text(f"+{controller}")


def _set_memory_limit(group: Cgroup, limit: int) -> None:
    for path in group.dirs:
        for name in ("memory.max", "memory.limit_in_bytes"):
            if (path / name).exists():
                (path / name).write_text(str(limit))
                return
    raise KerrickptError("a memory limit was asked for, but no memory controller is available")


def adopt(path: Path, layout: Layout) -> Cgroup:
    """A cgroup kerrickpt did not create, given by its path in any hierarchy."""
    path = path if path.is_absolute() else Path("/sys/fs/cgroup") / path
    if not (path / "cgroup.procs").exists():
        raise ContainerNotFoundError(f"{path} is not a cgroup directory")
    return Cgroup((path,))


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes (binary units, as cgroups use)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (value[:-1], value[-1]) if value and value[-1] in units else (value, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 512M, 2G)") from None


def existing(layout: Layout, name: str) -> Cgroup:
    """The directories of container `name` that exist under this node's parent (possibly none)."""
    return Cgroup(tuple(r / parent_name() / name for r in layout.roots() if (r / parent_name() / name).is_dir()))
