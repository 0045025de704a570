"""Owns the node's network plumbing, through `ip` and `bridge` (one place, with timeouts): the node network's bridge, a
container's network namespace and veth, and cutting a container off its network and connecting it again."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kerrickpt import command, procs
from kerrickpt.errors import CommandTimeout, HostError, UsageError
from kerrickpt.netsettings import FILE, Settings

NETNS_DIR = Path("/run/netns")  # where `ip netns` pins a namespace: the container's outlives its processes there
INSIDE = "eth0"  # the container's end of its veth
# And the PID and start time of the `kerrickpt check` that probes with it (see `probes`): a network namespace of
# cut_off_fails.
PROBE = "kpn-probe-"
TIMEOUT = 10.0
BRIDGE = "bridge"  # the program that sets a bridge port's state
# A bridge port's states, as `bridge link set dev PORT state` takes them (see cut_off).
DISABLED, FORWARDING = "0", "3"
CARRY_WAIT = 2.0  # the kernel brings a link up within milliseconds; this is only a bound


def node_addresses() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """Each IPv4 address of this network namespace, with its interface's name."""
    return [(link["ifname"], address) for link in _links("-4", "addr", "show") for address in _inet(link)]


def bridge(settings: Settings, owner: str) -> None:
    """The node network's bridge, up, with the node's address on it, marked as `owner`'s (a state directory's:
    its alias): made if missing (another command may make it meanwhile). UsageError if an interface of that name
    is not a bridge, runs the kernel's spanning tree (see cut_off), carries another address, or is the node network
    of another state directory that still has one (its claims are its own: the two would hand out one address
    twice)."""
    name, gateway = settings.bridge, settings.gateway
    if not exists(name):
        try:
            _ip("link", "add", name, "type", "bridge")
        except HostError:
            if not exists(name):
                raise
    link = _link(name, "-d", "addr", "show")
    other = link.get("ifalias") or ""
    if other not in ("", owner) and Path(other, FILE).exists():
        raise UsageError(
            f"bridge {name} is the node network of state directory {other}: give this one ({owner}) another "
            "bridge and subnet (see README, Network)"
        )
    kind = link.get("linkinfo", {}).get("info_kind")
    if kind != "bridge":
        raise UsageError(
            f"the node network's bridge {name} is a {kind or 'plain'} interface of this node, not a bridge: "
            "choose another name (see README, Network)"
        )
    if link["linkinfo"].get("info_data", {}).get("stp_state"):
        raise UsageError(
            f"bridge {name} runs the kernel's spanning tree protocol, under which the kernel refuses to disable a "
            f"port: no container on it could be cut off its network for a checkpoint; turn it off (`ip link set {name} "
            "type bridge stp_state 0`) or choose another bridge (see README, Network)"
        )
    others = [str(address) for address in _inet(link) if address != gateway]
    if others:
        raise UsageError(
            f"bridge {name} carries {', '.join(others)}, not only the node network's gateway {gateway}: "
            "another network uses it; choose another bridge or subnet (see README, Network)"
        )
    if gateway not in _inet(link):
        _ip("addr", "add", str(gateway), "dev", name)
    if other != owner:
        _ip("link", "set", name, "alias", owner)
    _ip("link", "set", name, "up")
    if settings.segment is not None:
        _join(settings.segment, name)


def _join(segment: str, bridge: str) -> None:
    """`segment`, an interface of the node, joined to `bridge` and up: the bridge is one layer-2 segment with what
    lies beyond it (other nodes' bridges). UsageError if there is no such interface, another bridge has it, or it
    carries addresses of the node's own (IPv4, or IPv6 beyond its link): a port of a bridge takes no traffic of the
    node's, so joining it would cut the node off that network, ssh sessions included."""
    if not exists(segment):
        raise UsageError(
            f"the node network's segment {segment} is no interface of this node: give the interface that reaches "
            "the other nodes (see README, Network)"
        )
    link = _link(segment, "addr", "show")
    own = [
        f"{info['local']}/{info['prefixlen']}"
        for info in link.get("addr_info", [])
        if info.get("family") == "inet" or (info.get("family") == "inet6" and info.get("scope") != "link")
    ]
    if own:
        raise UsageError(
            f"the node network's segment {segment} carries this node's own addresses ({', '.join(own)}): joined to "
            "the bridge it would carry no traffic of the node's; give an interface without addresses (a second NIC, "
            "a VLAN, a VXLAN; see README, Network)"
        )
    master = link.get("master")
    if master not in (None, bridge):
        raise UsageError(f"the node network's segment {segment} belongs to bridge {master} already, not {bridge}")
    if master is None:
        _ip("link", "set", segment, "master", bridge)
    _ip("link", "set", segment, "up")


def add_netns(netns: str) -> None:
    """The network namespace `netns`, of the node's user namespace, pinned in NETNS_DIR (a confined container's is
    made by netnsmaker)."""
    _ip("netns", "add", netns)


def make(netns: str, veth: str, mac: str, address: str, settings: Settings, *, connected: bool) -> None:
    """In the network namespace `netns`, made and pinned already (see add_netns), loopback up and one veth, INSIDE
    with `mac` and `address` and its default route the node's address, its node end `veth` on the bridge, up if
    `connected`."""
    _ip("link", "add", veth, "type", "veth", "peer", "name", INSIDE, "address", mac, "netns", netns)
    _ip("-n", netns, "link", "set", "lo", "up")
    _ip("-n", netns, "addr", "add", address, "dev", INSIDE)
    _ip("-n", netns, "link", "set", INSIDE, "up")
    _ip("-n", netns, "route", "add", "default", "via", str(settings.gateway.ip))
    _ip("link", "set", veth, "master", settings.bridge, *(["up"] if connected else []))


def make_unplaced(veth: str, end: str, mac: str, settings: Settings) -> None:
    """A veth without a network namespace: its node end `veth` on the bridge and down, its other end `end`, with
    `mac`, left on the node for CRIU's restore of a confined container to move into the network namespace it
    restores, as INSIDE (see criuopts.netdev_external)."""
    _ip("link", "add", veth, "type", "veth", "peer", "name", end, "address", mac)
    _ip("link", "set", veth, "master", settings.bridge)


def attach(netns: str, pid: int) -> None:
    """Pin the network namespace of host PID `pid` as `netns` in NETNS_DIR."""
    _ip("netns", "attach", netns, str(pid))


def settle(netns: str, mac: str, address: str, gateway: ipaddress.IPv4Address) -> None:
    """Make INSIDE of `netns`, as CRIU restored it from the images, have `mac` and `address` (ADDR/PREFIX) alone,
    and the default route through `gateway`: a copy restored next to its source, or remapped, has another address
    (and so MAC) than its images say, and a container that migrated here has this node's gateway."""
    link = _link(INSIDE, "-n", netns, "addr", "show")
    if link.get("address") != mac or _inet(link) != [ipaddress.IPv4Interface(address)]:
        # Down, flushed, and up with the new MAC: the kernel then makes the IPv6 link-local address anew from it
        # (the images had the old one's). Such a container's connections were restored closed (see restore).
        _ip("-n", netns, "link", "set", INSIDE, "down")
        _ip("-n", netns, "addr", "flush", "dev", INSIDE)
        _ip("-n", netns, "link", "set", INSIDE, "address", mac, "up")
        _ip("-n", netns, "addr", "add", address, "dev", INSIDE)
    _ip("-n", netns, "route", "replace", "default", "via", str(gateway))


def remove_veth(veth: str) -> None:
    if exists(veth):
        _ip("link", "del", veth)  # both ends: the container's goes with it


def remove_netns(netns: str) -> None:
    if (NETNS_DIR / netns).exists():
        _ip("netns", "del", netns)


def cut_off(veth: str, *where: str) -> None:
    """Cut a container off the node network: its veth's port on the bridge disabled, nothing it sends leaves, nothing
    reaches it (a peer's packets are lost, and the peer retransmits). The veth stays up, so the container's link keeps
    its carrier and its routes stay as they were: CRIU dumps a confined container's routes (see criuopts), and the
    kernel refuses to restore a route marked linkdown, as a veth whose other end is down marks them. A veth that is
    down (a restore made it so, or an older kerrickpt cut it off) is cut off already: the kernel refuses to set its
    port's state (ENETDOWN), and it is left as it is. `where`: options naming another network namespace (the
    probe's)."""
    try:
        _port(veth, DISABLED, *where)
    except HostError:
        # Asked only on failure: a checkpoint cuts off within the freeze, where each `ip` costs milliseconds.
        if _is_up(veth, *where):
            raise


def connect(veth: str, *where: str) -> None:
    """Connect a container cut off (see cut_off), or made so (its veth down), to the node network again."""
    program, *args = connecting(veth, *where)
    _ip(*args, program=program)


def connecting(veth: str, *where: str) -> list[str]:
    """The command (argv, to run within TIMEOUT) that connects a container cut off (see cut_off), or made so (its veth
    `veth` down), to the node network again: its port set forwarding, or the veth, down, set up (its port forwards
    once the link is up: see wait_carrying). A checkpoint asks for it before the freeze, for the guardian, which runs
    it without this package (see guard.Guardian): cut_off leaves the veth up or down as it was."""
    if _is_up(veth, *where):
        return [BRIDGE, *_port_args(veth, FORWARDING, *where)]
    return ["ip", *where, "link", "set", veth, "up"]


def _port(veth: str, state: str, *where: str) -> None:
    """Put `veth`'s bridge port in `state`, through `bridge` (`ip link set ... type bridge_slave state 0` leaves a
    port as it was)."""
    _ip(*_port_args(veth, state, *where), program=BRIDGE)


def _port_args(veth: str, state: str, *where: str) -> list[str]:
    return [*where, "link", "set", "dev", veth, "state", state]


def _is_up(veth: str, *where: str) -> bool:
    return "UP" in _link(veth, *where, "link", "show").get("flags", [])


def wait_carrying(netns: str, veth: str) -> bool:
    """Whether, within CARRY_WAIT, a container just connected can send: its INSIDE end up (the kernel starts its
    queue only then) and the bridge forwarding through `veth`. A frame sent before is lost."""

    def carrying() -> bool:
        inside = _link(INSIDE, "-n", netns, "link", "show")
        port = _link(veth, "-d", "link", "show")
        return inside.get("operstate") == "UP" and _port_state(port) == "forwarding"

    return _until(carrying)


def wait_bridge_carrying(bridge: str) -> bool:
    """Whether, within CARRY_WAIT, the bridge can send: its operational state up, which it reaches a moment after
    it is made or joined to its segment (a port's own forwarding state is not waited for). A frame sent before is
    lost."""

    def carrying() -> bool:
        link = _link(bridge, "link", "show")
        return link.get("operstate") == "UP"

    return _until(carrying)


def _until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + CARRY_WAIT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def is_cut_off(veth: str) -> bool:
    """Whether `veth` is there and down, or its port disabled (see cut_off)."""
    if not exists(veth):
        return False
    port = _link(veth, "-d", "link", "show")
    return "UP" not in port.get("flags", []) or _port_state(port) == "disabled"


def _port_state(link: dict[str, Any]) -> str | None:
    """The bridge port state of `link` (as `ip -d -j link show` gives it): forwarding, disabled, ..."""
    state: str | None = link.get("linkinfo", {}).get("info_slave_data", {}).get("state")
    return state


def cut_off_fails() -> str | None:
    """Why a container could not be cut off its network on this node, None if it can: tried on a veth on a bridge
    made in a network namespace of its own (gone afterwards), cut off and connected again as a checkpoint does."""
    me = os.getpid()
    netns = f"{PROBE}{me}-{procs.start_time(me)}"
    where = ("-n", netns)
    try:
        add_netns(netns)
        try:
            _ip(*where, "link", "add", "kpbprobe", "type", "bridge")
            _ip(*where, "link", "add", "kpnprobe", "type", "veth", "peer", "name", INSIDE)
            _ip(*where, "link", "set", "kpnprobe", "master", "kpbprobe")
            for link in ("kpbprobe", INSIDE, "kpnprobe"):
                _ip(*where, "link", "set", link, "up")
            if not _until(lambda: _port_state(_link("kpnprobe", *where, "-d", "link", "show")) == "forwarding"):
                return "a veth on a bridge did not start forwarding"
            cut_off("kpnprobe", *where)
            connect("kpnprobe", *where)
        finally:
            remove_netns(netns)
    except HostError as exc:
        return f"{exc.message}: {exc.log_tail}" if exc.log_tail else exc.message
    return None


def probes() -> list[tuple[str, int, int | None]]:
    """The network namespaces `cut_off_fails` made that are still there (one killed mid-probe cannot remove its own),
    each with the PID and start time of the process that made it: the start time tells a PID reused since from its
    maker (None: named by a kerrickpt from before, with the PID alone)."""
    names = sorted(path.name for path in NETNS_DIR.glob(f"{PROBE}*")) if NETNS_DIR.is_dir() else []
    found = []
    for name in names:
        pid, _, start = name.removeprefix(PROBE).partition("-")
        if pid.isdigit() and (start.isdigit() or not start):
            found.append((name, int(pid), int(start) if start else None))
    return found


def exists(ifname: str) -> bool:
    return _run("link", "show", "dev", ifname).returncode == 0


def _inet(link: dict[str, Any]) -> list[ipaddress.IPv4Interface]:
    return [
        ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
        for info in link.get("addr_info", [])
        if info.get("family") == "inet"
    ]


def _link(ifname: str, *args: str) -> dict[str, Any]:
    """The interface `ifname`, as `ip -j ARGS dev IFNAME` shows it. HostError, naming it, if that shows none (or
    several): a restored network namespace without INSIDE, say."""
    links = _links(*args, "dev", ifname)
    if len(links) != 1:
        raise HostError(f"interface {ifname} is not there: `ip {' '.join(args)} dev {ifname}` shows {len(links)}")
    return links[0]


def _links(*args: str) -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = json.loads(_ip("-j", *args) or "[]")
    return links


def _ip(*args: str, program: str = "ip") -> str:
    result = _run(*args, program=program)
    if result.returncode != 0:
        said = f"{program} {' '.join(args)} failed (exit code {result.returncode})"
        raise HostError(said, log_tail=result.stderr.strip())
    return result.stdout


def _run(*args: str, program: str = "ip") -> subprocess.CompletedProcess[str]:
    try:
        return command.run([program, *args], timeout=TIMEOUT)
    except (OSError, CommandTimeout) as exc:
        raise HostError(f"{program} {' '.join(args)} failed: {exc}") from exc
