"""Owns this node's fingerprint and readiness report (`kerrickpt check`)."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from kerrickpt import cgroups, containers, criu, idranges, isolation, netlinks, portfilter, schema, testmode
from kerrickpt.errors import KerrickptError

CAP_SYS_RESOURCE = 24
# What CRIU's lazy-pages transfer was seen to need here (field notes): 4 MiB pipes.
LAZY_PIPE_SIZE = 4 * 2**20


@dataclass(frozen=True)
class Fingerprint:
    """What decides whether a checkpoint taken on one node can run on another."""

    arch: str
    kernel: str
    os_release: str
    criu_version: str
    cpu_flags: tuple[str, ...]
    page_size: int
    cgroup_layout: str
    hostname: str = ""  # names the node; never compared

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["cpu_flags"] = list(self.cpu_flags)
        return data

    @classmethod
    def of(cls, checked: schema.Fingerprint) -> Fingerprint:
        """The fingerprint an archive or a peer gave, once schema checked it."""
        return cls(**{**msgspec.structs.asdict(checked), "cpu_flags": tuple(checked.cpu_flags)})

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Fingerprint:
        values = dict(data)
        values["cpu_flags"] = tuple(values.get("cpu_flags") or ())  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def os_release(path: Path = Path("/etc/os-release")) -> str:
    """ID and VERSION_ID, e.g. 'debian 12'."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value.strip().strip('"')
    return f"{values.get('ID', 'unknown')} {values.get('VERSION_ID', '')}".strip()


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The first CPU's feature flags (x86 'flags', arm 'Features')."""
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return tuple(sorted(value.split()))
    return ()


TEST_FINGERPRINT_ENV = "KERRICKPT_TEST_FINGERPRINT"


def fingerprint(criu_version: str) -> Fingerprint:
    """This node's fingerprint; $KERRICKPT_TEST_FINGERPRINT (`field=value,...`) alters it in test mode."""
    real = Fingerprint(
        arch=platform.machine(),
        kernel=platform.release(),
        os_release=os_release(),
        criu_version=criu_version,
        cpu_flags=cpu_flags(),
        page_size=os.sysconf("SC_PAGE_SIZE"),
        cgroup_layout=cgroups.detect().kind,
        hostname=platform.node(),
    )
    override = testmode.hook(TEST_FINGERPRINT_ENV)
    if not override:
        return real
    values = real.to_dict()
    for item in override.split(","):
        key, _, value = item.partition("=")
        values[key] = value.split("+") if key == "cpu_flags" else int(value) if key == "page_size" else value
    return Fingerprint.from_dict(values)


def pipe_max_size() -> int:
    return int(Path("/proc/sys/fs/pipe-max-size").read_text())


def has_capability(bit: int, status: Path = Path("/proc/self/status")) -> bool:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


@dataclass
class Report:
    """The answer to `kerrickpt check`: can this node checkpoint and restore?"""

    ready: bool
    is_root: bool
    criu_path: str | None
    criu_version: str | None
    criu_check: str
    cgroups: dict[str, str | None]
    features: dict[str, bool]
    id_ranges: dict[str, object] | None  # isolation.IdPool: host ids for containers with their own users
    can_dump_other_users: bool
    fingerprint: Fingerprint | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["fingerprint"] = self.fingerprint.to_dict() if self.fingerprint else None
        return data


def pipes_allow_lazy_pages() -> bool:
    """CRIU's lazy pages need pipes it cannot grow past fs.pipe-max-size without CAP_SYS_RESOURCE."""
    return has_capability(CAP_SYS_RESOURCE) or pipe_max_size() >= LAZY_PIPE_SIZE


UNPRIVILEGED_USERFAULTFD = Path("/proc/sys/vm/unprivileged_userfaultfd")


def lazy_pages_confined(lazy: bool) -> bool:
    """Can this node take a confined container's post-copy (features.lazy_pages_confined of `check`)? CRIU opens
    the userfaultfd in the restored task, inside the container's user namespace: the kernel allows that only
    with vm.unprivileged_userfaultfd=1."""
    try:
        return lazy and UNPRIVILEGED_USERFAULTFD.read_text().strip() == "1"
    except OSError:
        return False


def lazy_pages(found: criu.Criu) -> bool:
    """Can this node serve or take a post-copy migration's memory (features.lazy_pages of `check`)?"""
    return criu.has_feature(found, "uffd-noncoop") and pipes_allow_lazy_pages()


def check(state_dir: Path | str | None = None) -> Report:
    """Probe this node: root, CRIU, cgroups, kernel features and its fingerprint.

    Overlayfs, user namespaces and id ranges are what containers with their own root and users
    need: reported, but today's plain containers run without them, so they never make it not ready.
    """
    problems: list[str] = []
    notes: list[str] = []
    is_root = os.geteuid() == 0
    if not is_root:
        problems.append("not running as root: CRIU, cgroups and namespaces need it")
    layout = cgroups.detect()
    if not (layout.unified or layout.freezer):
        problems.append("no cgroup freezer: neither cgroup v2 nor the v1 freezer is mounted")
    features = {"userfaultfd": False, "mem_dirty_track": False, "lazy_pages": False}
    criu_check_text = ""
    found: criu.Criu | None = None
    try:
        found = criu.locate()
        ok, criu_check_text = criu.check(found)
        if not ok:
            problems.append("`criu check` failed: this kernel or CRIU cannot checkpoint")
        features = {
            "userfaultfd": criu.has_feature(found, "uffd-noncoop"),
            "mem_dirty_track": criu.has_feature(found, "mem_dirty_track"),
        }
    except KerrickptError as exc:
        problems.append(str(exc))
    if not features["mem_dirty_track"]:
        notes.append("soft-dirty memory tracking is off: no pre-dump or incremental snapshots")
    features |= _network_features(found, criu_check_text, is_root, notes)
    can_dump_others = has_capability(CAP_SYS_RESOURCE)
    features["lazy_pages"] = features["userfaultfd"] and pipes_allow_lazy_pages()
    features["lazy_pages_confined"] = lazy_pages_confined(features["lazy_pages"])
    if features["userfaultfd"] and not features["lazy_pages"]:
        notes.append(
            f"lazy pages (post-copy) would fail: without CAP_SYS_RESOURCE CRIU cannot grow its pipes past "
            f"fs.pipe-max-size ({pipe_max_size()} bytes), and the transfer dies with "
            f'"page-pipe: splice: -1: Bad file descriptor"; sysctl -w fs.pipe-max-size={LAZY_PIPE_SIZE} allows it'
        )
    if not can_dump_others:
        notes.append(
            "root here lacks CAP_SYS_RESOURCE: outside a confined container (run --rootfs, whose user namespace "
            "root owns) only processes owned by root can be checkpointed (CRIU fails on other users' tasks with "
            '"Can\'t get rlimit")'
        )
    pool = isolation.id_pool() if is_root else None
    features |= _isolation_features(pool, state_dir, notes)
    return Report(
        ready=not problems,
        is_root=is_root,
        criu_path=found.path if found else None,
        criu_version=found.version if found else None,
        criu_check=criu_check_text,
        cgroups=layout.to_dict(),
        features=features,
        id_ranges=pool.to_dict() | {"held": _held(state_dir)} if pool else None,
        can_dump_other_users=can_dump_others,
        fingerprint=fingerprint(found.version) if found else None,
        problems=problems,
        notes=notes,
    )


_NETWORK_NEEDS = {  # what a restore of a container with a network of its own needs of a node: why, without it
    "tcp_repair": "no TCP repair (see `criu check`): a container's TCP connections cannot be carried",
    "external_net_ns": "CRIU here cannot restore into a network namespace kerrickpt made (external_net_ns)",
    "newifindex": "CRIU here cannot move an interface kerrickpt made into a network namespace it restores "
    "(newifindex), as a confined container's needs",
    "port_filter": "no port filter (ebtables' nat table, see README, Network): a container could send as any address "
    "on the node network",
}
_CONFINED_ONLY, _PLAIN_ONLY = "newifindex", "external_net_ns"  # whose network namespace CRIU restores, or not


def network_lacking(features: dict[str, bool], *, confined: bool) -> list[str]:
    """What a restore of a container with a network of its own (`confined`, or not) needs and a node whose
    `features` these are lacks, in words."""
    needs = [f for f in _NETWORK_NEEDS if f != (_PLAIN_ONLY if confined else _CONFINED_ONLY)]
    return [_NETWORK_NEEDS[feature] for feature in needs if not features.get(feature)]


def _network_features(
    found: criu.Criu | None, criu_check_text: str, is_root: bool, notes: list[str]
) -> dict[str, bool]:
    """features.tcp_repair, features.external_net_ns, features.newifindex, features.port_filter and
    features.network_lock: what a container with a network of its own needs to keep its connections and its port
    filtered (see README, Network), a note saying why for each one missing."""
    # TCP repair is among the checks `criu check` requires: its verdict is TCP repair's.
    features = {"tcp_repair": found is not None and "Looks good" in criu_check_text}
    if not features["tcp_repair"]:
        notes.append(_NETWORK_NEEDS["tcp_repair"])
    for name in (_PLAIN_ONLY, _CONFINED_ONLY):
        features[name] = found is not None and criu.has_feature(found, name)
        if found is not None and not features[name]:
            notes.append(_NETWORK_NEEDS[name])
    unfiltered = portfilter.unusable()
    if unfiltered is not None:
        notes.append(f"{_NETWORK_NEEDS['port_filter']}: {unfiltered}")
    features["port_filter"] = unfiltered is None
    why_not = netlinks.cut_off_fails() if is_root else "not root"
    if why_not is not None:
        notes.append(f"a container cannot be cut off its network while it is dumped (the network lock): {why_not}")
    return features | {"network_lock": why_not is None}


def _held(state_dir: Path | str | None) -> int:
    """How many of the pool's ranges containers of this node hold."""
    try:
        return len(idranges.held(containers.Registry(state_dir)))
    except OSError:  # a state directory kerrickpt cannot make: the features say so
        return 0


def _isolation_features(
    pool: isolation.IdPool | None, state_dir: Path | str | None, notes: list[str]
) -> dict[str, bool]:
    """features.overlay, features.user_namespaces and features.idmapped_lower, a note saying why for each one
    missing."""
    if pool is None:  # root only; not being root is already a problem
        return {"overlay": False, "user_namespaces": False, "idmapped_lower": False}
    if not pool.ranges:
        notes.append(f"no {isolation.RANGE}-id range is free for containers with their own users ({pool.source})")
    try:
        registry = containers.Registry(state_dir)
        overlay = isolation.overlay(registry.scratch_dir("overlay-probe-"))
        idmapped = isolation.idmapped_lower(pool, registry.scratch_dir("idmap-probe-"))
    except OSError as exc:
        overlay = idmapped = isolation.Probe(False, f"no room to try one in the state directory: {exc}")
    probes = {"overlay": overlay, "user_namespaces": isolation.user_namespaces(pool), "idmapped_lower": idmapped}
    notes.extend(f"no {name}: {probe.why_not}" for name, probe in probes.items() if not probe.works)
    if overlay.works and not idmapped.works:
        notes.append(
            "confined containers run here with their lower layer as is: the host's owners outside their id "
            "range (root's files among them) show as nobody inside"
        )
    return {name: probe.works for name, probe in probes.items()}
