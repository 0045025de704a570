"""Owns the node's network plumbing, through `ip` (one place, with timeouts): the node network's bridge, a
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
CARRY_WAIT = 2.0  # the kernel brings a link up within milliseconds; this is only a bound


def node_addresses() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """Each IPv4 address of this network namespace, with its interface's name."""
    return [(link["ifname"], address) for link in _links("-4", "addr", "show") for address in _inet(link)]


def bridge(settings: Settings, owner: str) -> None:
    """The node network's bridge, up, with the node's address on it, marked as `owner`'s (a state directory's:
    its alias): made if missing (another command may make it meanwhile). UsageError if an interface of that name
    is not a bridge, carries another address, or is the node network of another state directory that still has
    one (its claims are its own: the two would hand out one address twice)."""
    name, gateway = settings.bridge, settings.gateway
    if not exists(name):
        try:
            _ip("link", "add", name, "type", "bridge")
        except HostError:
            if not exists(name):
                raise
    (link,) = _links("-d", "addr", "show", "dev", name)
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
    (link,) = _links("addr", "show", "dev", segment)
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


def make(netns: str, veth: str, mac: str, address: str, settings: Settings, *, connected: bool) -> None:
    """The network namespace `netns` (pinned in NETNS_DIR) with loopback up and one veth, INSIDE with `mac` and
    `address` and its default route the node's address, its node end `veth` on the bridge, up if `connected`."""
    _ip("netns", "add", netns)
    _ip("link", "add", veth, "type", "veth", "peer", "name", INSIDE, "address", mac, "netns", netns)
    _ip("-n", netns, "link", "set", "lo", "up")
    _ip("-n", netns, "addr", "add", address, "dev", INSIDE)
    _ip("-n", netns, "link", "set", INSIDE, "up")
    _ip("-n", netns, "route", "add", "default", "via", str(settings.gateway.ip))
    _ip("link", "set", veth, "master", settings.bridge, *(["up"] if connected else []))


def remove_veth(veth: str) -> None:
    if exists(veth):
        _ip("link", "del", veth)  # both ends: the container's goes with it


def remove_netns(netns: str) -> None:
    if (NETNS_DIR / netns).exists():
        _ip("netns", "del", netns)


def cut_off(veth: str) -> None:
    """Cut a container off the node network: its veth's node end down, nothing it sends leaves, nothing reaches
    it (a peer's packets are lost, and the peer retransmits)."""
    _ip("link", "set", veth, "down")


def connect(veth: str) -> None:
    _ip("link", "set", veth, "up")


def wait_carrying(netns: str, veth: str) -> bool:
    """Whether, within CARRY_WAIT, a container just connected can send: its INSIDE end up (the kernel starts its
    queue only then) and the bridge forwarding through `veth`. A frame sent before is lost."""

    def carrying() -> bool:
        (inside,) = _links("-n", netns, "link", "show", "dev", INSIDE)
        (port,) = _links("-d", "link", "show", "dev", veth)
        state = port.get("linkinfo", {}).get("info_slave_data", {}).get("state")
        return inside.get("operstate") == "UP" and state == "forwarding"

    return _until(carrying)


def wait_bridge_carrying(bridge: str) -> bool:
    """Whether, within CARRY_WAIT, the bridge can send: its operational state up, which it reaches a moment after
    it is made or joined to its segment (a port's own forwarding state is not waited for). A frame sent before is
    lost."""

    def carrying() -> bool:
        (link,) = _links("link", "show", "dev", bridge)
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
    """Whether `veth` is there and down."""
    return exists(veth) and all("UP" not in link.get("flags", []) for link in _links("link", "show", "dev", veth))


def cut_off_fails() -> str | None:
    """Why a container could not be cut off its network on this node, None if it can: tried on a veth made in a
    network namespace of its own (gone afterwards), set down and up again as `cut_off` and `connect` do."""
    me = os.getpid()
    netns = f"{PROBE}{me}-{procs.start_time(me)}"
    try:
        _ip("netns", "add", netns)
        try:
            _ip("-n", netns, "link", "add", "kpnprobe", "type", "veth", "peer", "name", INSIDE)
            for state in ("up", "down", "up"):
                _ip("-n", netns, "link", "set", "kpnprobe", state)
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


def _links(*args: str) -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = json.loads(_ip("-j", *args) or "[]")
    return links


def _ip(*args: str) -> str:
    result = _run(*args)
    if result.returncode != 0:
        raise HostError(f"ip {' '.join(args)} failed (exit code {result.returncode})", log_tail=result.stderr.strip())
    return result.stdout


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return command.run(["ip", *args], timeout=TIMEOUT)
    except (OSError, CommandTimeout) as exc:
        raise HostError(f"ip {' '.join(args)} failed: {exc}") from exc
