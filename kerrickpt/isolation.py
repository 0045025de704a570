"""Owns probing what this node offers containers with their own root and users: overlayfs, userns, id ranges."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kerrickpt import command, helper, namespaces, rootfs
from kerrickpt.confinement import HOST_ROOT, RANGE, Confinement, lower_dir
from kerrickpt.errors import CommandTimeout, UsageError
from kerrickpt.idmap import LOWEST, IdMap

PROBE_TIMEOUT = 10.0
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
    grow: str = "give root more ranges of 65536 ids in /etc/subuid and /etc/subgid"  # how to make it hold more

    def first(self) -> tuple[int, int] | None:
        """The host uid and gid the first container range starts at."""
        return (self.uids[0][0], self.gids[0][0]) if self.ranges else None

    def holding(self, uids: Iterable[int], gids: Iterable[int]) -> list[str]:
        """Those of host uids `uids` and gids `gids` that are the pool's, as `uid N` and `gid N`."""
        found = [f"uid {uid}" for uid in sorted(set(uids)) if _within(uid, self.uids)]
        return found + [f"gid {gid}" for gid in sorted(set(gids)) if _within(gid, self.gids)]

    def overlaps(self, other: IdPool) -> bool:
        """Whether any id of `other`'s is one of this pool's (uids with uids, gids with gids)."""
        return _meet(self.uids, other.uids) or _meet(self.gids, other.gids)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        del data["grow"]
        data["uids"] = [list(span) for span in self.uids]
        data["gids"] = [list(span) for span in self.gids]
        return data


def _within(value: int, spans: tuple[tuple[int, int], ...]) -> bool:
    return any(first <= value < first + count for first, count in spans)


def _meet(spans: Sequence[tuple[int, int]], others: Sequence[tuple[int, int]]) -> bool:
    """Whether an id of `spans` (first, count) is one of `others`."""
    return any(
        first < o_first + o_count and o_first < first + count for first, count in spans for o_first, o_count in others
    )


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
    """The RANGE-sized blocks in `spans` that overlap no span in `taken` and hold no id below LOWEST (a root:0:N
    entry would make a container's root host root again), merged back into spans."""
    free: list[tuple[int, int]] = []
    for first, count in spans:
        for start in range(first, first + count - RANGE + 1, RANGE):
            if start < LOWEST or _meet([(start, RANGE)], taken):
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
    return _pool(source, uids, gids)


def declared_pool(first: int, count: int, source: str) -> IdPool:
    """The pool users' jobs take their ranges from, as the site declares it: host ids first..first+count-1, for
    uids and gids alike (its whole ranges of ids from LOWEST on)."""
    spans = _whole_ranges([(first, count)], [])
    return replace(_pool(source, spans, spans), grow=f"widen the {source}")


def _pool(source: str, uids: list[tuple[int, int]], gids: list[tuple[int, int]]) -> IdPool:
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
    # Programs, not a forked Python: the library stays safe to call from threads (see helper). The
    # shell is unmapped when it execs, so only --keep-caps (ambient) lets it become root once mapped.
    with subprocess.Popen(
        ["unshare", "--user", "--keep-caps", "--", "sh", "-c", _BECOME_ROOT],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    ) as child:
        try:
            why_not = _map_once_unshared(child.pid, first)
            if why_not:
                child.kill()
                child.wait()
                return Probe(False, why_not)
            _, err = child.communicate("go\n", timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return Probe(False, "the user namespace probe did not finish")
    if child.returncode != 0:
        detail = command.tail(err, 3)
        return Probe(False, f"could not become root in a user namespace mapped to host uid/gid {first}: {detail}")
    return Probe(True)


# Once its maps are written (the parent says "go"), become root inside, as a container's init will:
# a host id from the pool.
_BECOME_ROOT = "read go && exec setpriv --reuid=0 --regid=0 --clear-groups true"


def _map_once_unshared(pid: int, first: tuple[int, int]) -> str:
    """Map the pool's first range into `pid`'s user namespace once unshare(1) made it; why not, if not."""
    ours = os.readlink("/proc/self/ns/user")
    deadline = time.monotonic() + PROBE_TIMEOUT
    while True:
        try:
            if os.readlink(f"/proc/{pid}/ns/user") != ours:
                break
        except FileNotFoundError:
            return "could not make a user namespace (unshare --user exited)"
        if time.monotonic() > deadline:
            return "the user namespace probe did not answer"
        time.sleep(0.005)
    try:
        namespaces.map_ids(pid, IdMap.shifted(*first, RANGE))
    except OSError as exc:
        return f"mapping {RANGE} ids from host uid/gid {first} into a user namespace failed: {exc}"
    return ""


def idmapped_lower(pool: IdPool, scratch: Path) -> Probe:
    """Can a container's root be staged as rootfs.stage does, an overlay whose lower layer (the host's root) is
    seen through the pool's first range, its writable layer in `scratch` (a fresh directory, removed here)?

    It needs a process that makes a user namespace and idmapped mounts, which no program here does (util-linux
    2.39's mount does; Debian 12 has 2.38): a helper program (see helper), never a forked copy of this one.
    """
    first = pool.first()
    if first is None:
        return Probe(False, "no id range to map: see id_ranges")
    order = {"scratch": str(scratch), "uid_base": first[0], "gid_base": first[1]}
    try:
        answer = helper.ask("idmap-probe", order, timeout=PROBE_TIMEOUT, what="the idmapped lower layer probe")
        return Probe(**answer)
    except CommandTimeout:
        return Probe(False, "the idmapped lower layer probe did not finish")
    except TypeError:  # its answer was no Probe's: {"error": ...}
        return Probe(False, f"the idmapped lower layer probe failed: {answer.get('error')}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(order: dict[str, object]) -> None:  # pragma: no cover - the helper program "idmap-probe"
    """Stage a container's root over the host's as `idmapped_lower` asks, in this helper's own mount namespace
    (gone when it exits); print the Probe as JSON: host root's /etc must show as the range's first ids."""
    base = (int(str(order["uid_base"])), int(str(order["gid_base"])))
    confined = Confinement(HOST_ROOT, *base, idmapped_lower=True)
    try:
        layer = rootfs.Layer(Path(str(order["scratch"])) / "layer")
        layer.create(confined)
        rootfs.stage(confined, layer)
        seen = (rootfs.ROOT / "etc").stat()
        works = (seen.st_uid, seen.st_gid) == base
        probe = Probe(works, "" if works else f"host root's /etc showed as {seen.st_uid}:{seen.st_gid}, not {base}")
    except OSError as exc:
        probe = Probe(False, str(exc))
    print(json.dumps(asdict(probe)), flush=True)


NEEDED = ("overlay", "user_namespaces")  # the `check` features a confined container needs


def lacking(confinement: Confinement, features: dict[str, bool]) -> list[str]:
    """What this node (its `check` features) lacks to run a container confined so: why it cannot, if it cannot."""
    needed = (*NEEDED, "idmapped_lower") if confinement.idmapped_lower else NEEDED
    missing = [f"no {what} here (see `kerrickpt check`)" for what in needed if not features.get(what)]
    try:
        lower_dir(confinement.rootfs)
    except UsageError:
        missing.append(f"its root file system {confinement.rootfs} is not here")
    missing += [f"its volume {v.source} is not here" for v in confinement.volumes if not os.path.exists(v.source)]
    return missing
