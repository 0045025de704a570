"""Owns probing what this node offers containers with their own root and users: overlayfs, userns, id ranges."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

from kerrickpt import command, namespaces
from kerrickpt.errors import CommandTimeout

PROBE_TIMEOUT = 10.0
# A container gets the POSIX id range: root (0) to nobody (65534) and 65535.
RANGE = 65536
# Without an entry for root in /etc/subuid and /etc/subgid: systemd's range for containers' ids
# (systemd.io/UIDS-GIDS, the one systemd-nspawn picks from), less what those files give other users.
DEFAULT_POOL = (0x80000, 0x6FFFFFFF + 1 - 0x80000)
PROBE_FILE = "kerrickpt-overlay-probe"


@dataclass(frozen=True)
class Probe:
    """Whether a kernel facility works here, and if not, why."""

    works: bool
    why_not: str = ""


@dataclass(frozen=True)
class IdPool:
    """The host ids kerrickpt may map into containers, as (first id, count) spans, and how many ranges they hold."""

    source: str
    uids: tuple[tuple[int, int], ...]
    gids: tuple[tuple[int, int], ...]
    ranges: int

    def first(self) -> tuple[int, int] | None:
        """The host uid and gid the first container range starts at."""
        return (self.uids[0][0], self.gids[0][0]) if self.ranges else None

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["uids"] = [list(span) for span in self.uids]
        data["gids"] = [list(span) for span in self.gids]
        return data


def _subordinate(path: Path) -> dict[str, list[tuple[int, int]]]:
    """`name:first:count` lines of /etc/subuid or /etc/subgid, by owner; a missing file gives none."""
    owners: dict[str, list[tuple[int, int]]] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                owners.setdefault(fields[0], []).append((int(fields[1]), int(fields[2])))
    return owners


def _whole_ranges(spans: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The RANGE-sized blocks in `spans` that overlap no span in `taken`, merged back into spans."""
    free: list[tuple[int, int]] = []
    for first, count in spans:
        for start in range(first, first + count - RANGE + 1, RANGE):
            if any(start < t_first + t_count and t_first < start + RANGE for t_first, t_count in taken):
                continue
            if free and free[-1][0] + free[-1][1] == start:
                free[-1] = (free[-1][0], free[-1][1] + RANGE)
            else:
                free.append((start, RANGE))
    return free


def id_pool(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> IdPool:
    """root's entries in /etc/subuid and /etc/subgid, or else the default pool less other users' entries."""
    uid_owners, gid_owners = _subordinate(subuid), _subordinate(subgid)
    root_uids = uid_owners.get("root", []) + uid_owners.get("0", [])
    root_gids = gid_owners.get("root", []) + gid_owners.get("0", [])
    if root_uids and root_gids:
        uids, gids = _whole_ranges(root_uids, []), _whole_ranges(root_gids, [])
        source = f"{subuid} and {subgid}"
    else:
        others = [span for owners in (uid_owners, gid_owners) for spans in owners.values() for span in spans]
        uids = gids = _whole_ranges([DEFAULT_POOL], others)
        source = "default"
    count = min(sum(c for _, c in uids), sum(c for _, c in gids)) // RANGE
    return IdPool(source=source, uids=tuple(uids), gids=tuple(gids), ranges=count)


def _kernel_lists(fs_type: str) -> bool:
    lines = Path("/proc/filesystems").read_text().splitlines()
    return any(line.split()[-1:] == [fs_type] for line in lines)


# In a private mount namespace that dies with the shell: an overlay of the host's root whose upper
# layer is in $1, and a file written through it, which must land in the upper layer.
_OVERLAY_SCRIPT = (
    'mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$1/merged" && '
    f': > "$1/merged/{PROBE_FILE}"'
)


def overlay(scratch: Path) -> Probe:
    """Can an overlay of the host's root, its writable layer in `scratch` (a fresh directory, removed here), be made?"""
    try:
        for part in ("upper", "work", "merged"):
            (scratch / part).mkdir()
        result = command.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _OVERLAY_SCRIPT, "sh", str(scratch)],
            timeout=PROBE_TIMEOUT,
        )
        if result.returncode == 0 and (scratch / "upper" / PROBE_FILE).exists():
            return Probe(True)
        # Mounting asks the kernel to load the module: only now does a missing overlay mean it has none.
        if not _kernel_lists("overlay"):
            return Probe(False, "the kernel offers no overlayfs (not in /proc/filesystems, and no module loaded)")
        return Probe(
            False,
            f"an overlay of / with its writable layer in {scratch.parent} failed (that file system may not "
            f"hold an upper layer): {command.tail(result.stderr, 3) or 'the write did not reach the upper layer'}",
        )
    except (OSError, CommandTimeout) as exc:
        return Probe(False, f"overlay probe failed: {exc}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def user_namespaces(pool: IdPool, max_path: Path = Path("/proc/sys/user/max_user_namespaces")) -> Probe:
    """Can a user namespace be made and given the pool's first range, so that its root is a host id from it?"""
    try:
        allowed = int(max_path.read_text())
    except FileNotFoundError:
        return Probe(False, f"no {max_path}: this kernel was built without user namespaces")
    if allowed == 0:
        return Probe(False, f"{max_path} is 0: this kernel makes no user namespaces")
    first = pool.first()
    if first is None:
        return Probe(False, "no id range to map: see id_ranges")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _user_namespace_child(ready_w, go_r)
    os.close(ready_w)
    os.close(go_r)
    pidfd = os.pidfd_open(pid)
    try:
        why_not = _map_when_ready(pid, ready_r, go_w, first)
        if not why_not and not select.select([pidfd], [], [], PROBE_TIMEOUT)[0]:
            why_not = "the user namespace probe did not finish"
    finally:
        os.close(ready_r)
        os.close(go_w)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # only one that overran is still alive
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
    if why_not:
        return Probe(False, why_not)
    if os.waitstatus_to_exitcode(status) != 0:
        return Probe(False, f"could not become root in a user namespace mapped to host uid/gid {first}")
    return Probe(True)


def _map_when_ready(pid: int, ready_r: int, go_w: int, first: tuple[int, int]) -> str:
    """Map the pool's first range into the child's user namespace once it has one; why not, if not."""
    if not select.select([ready_r], [], [], PROBE_TIMEOUT)[0]:
        return "the user namespace probe did not answer"
    error = os.read(ready_r, 4096).decode(errors="replace")
    if error:
        return error
    try:
        namespaces.map_ids(pid, *first, RANGE)
    except OSError as exc:
        return f"mapping {RANGE} ids from host uid/gid {first} into a user namespace failed: {exc}"
    os.write(go_w, b"go")
    return ""


def _user_namespace_child(ready_w: int, go_r: int) -> None:  # pragma: no cover - the child
    """Make a user namespace, say so by closing `ready_w`, wait for the maps, and exit 0 if it became root inside."""
    code = 1
    try:
        try:
            namespaces.unshare(namespaces.CLONE_NEWUSER)
        except OSError as exc:
            os.write(ready_w, f"could not make a user namespace: {exc}".encode())
            return
        os.close(ready_w)
        os.read(go_r, 2)
        # As a container's init will: become root inside, which is a host id from the pool.
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        code = 0
    finally:
        os._exit(code)
