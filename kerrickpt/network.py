"""Owns a container's network of its own (`--net own`): the node's bridge and subnet, the container's network
namespace and veth, and its address, MAC and published ports, claimed without collisions among the node's
containers (claim files under STATE/network, by idranges' means and rule for stale claims)."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kerrickpt import command, firewall, idranges
from kerrickpt.errors import CommandTimeout, HostError, UsageError

if TYPE_CHECKING:
    from kerrickpt.containers import Registry

HOST, OWN = "host", "own"  # `--net`: the node's network namespace, or one of its own on the node's bridge
MODES = (HOST, OWN)
BRIDGE_ENV, SUBNET_ENV = "KERRICKPT_BRIDGE", "KERRICKPT_SUBNET"
DEFAULT_BRIDGE = "kerrickpt0"
# Set aside for benchmarking (RFC 2544), so never a real network's; the local test nodes take 198.18.0.0/16.
DEFAULT_SUBNET = "198.19.0.0/16"
NETNS_DIR = Path("/run/netns")  # where `ip netns` pins a namespace: the container's outlives its processes there
DIRECTORY = "network"
ADDRESS = "address"
PROTOCOLS = ("tcp", "udp")
INSIDE = "eth0"  # the container's end of its veth
TIMEOUT = 10.0
PORT_PATTERN = re.compile(r"(\d{1,5}):(\d{1,5})(?:/(tcp|udp))?")


@dataclass(frozen=True)
class Port:
    """A node port forwarded to a port of the container."""

    host: int
    container: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host}:{self.container}/{self.protocol}"


@dataclass(frozen=True)
class Network:
    """A container's own network: its address (with the node subnet's prefix) and MAC on the node's bridge, the
    node ports forwarded to it, and this node's names of its network namespace (in NETNS_DIR) and of its veth's
    node end. The address, MAC and ports travel in its archive; the names are made anew where it is restored."""

    address: str
    mac: str
    netns: str
    veth: str
    ports: tuple[Port, ...] = ()

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)

    @property
    def pin(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def chain(self) -> str:
        """Its nat chain (see firewall)."""
        return self.netns.upper()

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "mac": self.mac,
            "netns": self.netns,
            "veth": self.veth,
            "ports": [{"host": p.host, "container": p.container, "protocol": p.protocol} for p in self.ports],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        ports = tuple(Port(**p) for p in data.get("ports", ()))
        return cls(data["address"], data["mac"], data["netns"], data["veth"], ports)


def parse_ports(items: Sequence[str]) -> tuple[Port, ...]:
    """`--publish HOSTPORT:PORT[/tcp|udp]` values; UsageError for a bad one or a node port given twice."""
    ports: list[Port] = []
    for item in items:
        match = PORT_PATTERN.fullmatch(item)
        numbers = [int(n) for n in match.groups()[:2]] if match else []
        if not match or not all(1 <= n <= 65535 for n in numbers):
            raise UsageError(f"--publish {item}: give HOSTPORT:PORT[/tcp|udp], ports 1 to 65535")
        port = Port(numbers[0], numbers[1], match.group(3) or "tcp")
        if any((p.host, p.protocol) == (port.host, port.protocol) for p in ports):
            raise UsageError(f"--publish {item}: node port {port.host}/{port.protocol} is given twice")
        ports.append(port)
    return tuple(ports)


def subnet() -> ipaddress.IPv4Network:
    """The node network's subnet: $KERRICKPT_SUBNET, else DEFAULT_SUBNET."""
    text = os.environ.get(SUBNET_ENV) or DEFAULT_SUBNET
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise UsageError(f"{SUBNET_ENV}={text}: not an IPv4 subnet ({exc})") from None
    if net.prefixlen > 30:
        raise UsageError(f"{SUBNET_ENV}={text}: too small for a gateway and a container")
    return net


def bridge() -> str:
    """The node network's bridge: $KERRICKPT_BRIDGE, else DEFAULT_BRIDGE."""
    return os.environ.get(BRIDGE_ENV) or DEFAULT_BRIDGE


def gateway(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The node's own address on its bridge, the containers' default route: the subnet's first."""
    return next(net.hosts())


def mac_of(address: ipaddress.IPv4Address) -> str:
    """A locally administered MAC that follows the address (as Kubernetes' bridge plugin makes them): a
    container restored with its address answers with its MAC, so neighbours' caches stay right."""
    return ":".join(f"{b:02x}" for b in (0x0A, 0x58, *address.packed))


def names(registry: Registry, name: str) -> tuple[str, str]:
    """This node's names of `name`'s network namespace and veth end: unique among state directories (two
    nodes on one machine share /run/netns), short enough for an interface (15) and a chain (28)."""
    digest = hashlib.sha256(f"{registry.root.resolve()}\0{name}".encode()).hexdigest()[:10]
    return f"kpn-{digest}", f"kpn{digest}"


def plan(
    registry: Registry,
    name: str,
    address: str | None,
    ports: Sequence[Port],
    *,
    fall_back: bool = False,
) -> Network:
    """Claim `name`'s network on this node: `address` (ADDR/PREFIX from `--ip`, or an archive's ADDR), else the
    first free one of the subnet (also when `address` is taken and `fall_back`), and `ports`. UsageError, with
    nothing claimed, for an address outside the subnet or in use, a port taken, a subnet the node's own
    addresses overlap."""
    net = subnet()
    own = node_addresses()
    ours = bridge()
    for ifname, interface in own:
        if ifname != ours and interface.network.overlaps(net):
            raise UsageError(
                f"the node network {net} overlaps this node's own address {interface} on {ifname}: "
                f"give the node network another subnet ({SUBNET_ENV})"
            )
    used = {interface.ip for _, interface in own} | {gateway(net)}
    directory = _directory(registry)
    try:
        wanted = _address(address, net) if address is not None else None
        if wanted is not None and wanted in used:
            if not fall_back:
                raise UsageError(f"address {wanted} is in use on this node (the node's own)")
            wanted = None
        if wanted is not None and not idranges.take(registry, directory / f"{ADDRESS}-{wanted}", name):
            holder = idranges.owner(directory / f"{ADDRESS}-{wanted}")
            if not fall_back:
                raise UsageError(f"address {wanted} is in use on this node (by container {holder})")
            wanted = None
        if wanted is None:
            wanted = _allocate(registry, directory, net, used, name)
        for port in ports:
            _claim_port(registry, directory, port, name)
    except BaseException:
        release(registry, name)
        raise
    netns, veth = names(registry, name)
    return Network(f"{wanted}/{net.prefixlen}", mac_of(wanted), netns, veth, tuple(ports))


def _address(text: str, net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The address `text` (ADDR or ADDR/PREFIX) names, if the node's subnet holds it."""
    try:
        interface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise UsageError(f"address {text}: give an IPv4 ADDR/PREFIX") from None
    if interface.ip not in net or ("/" in text and interface.network.prefixlen != net.prefixlen):
        raise UsageError(f"address {text} is outside this node's network {net} ({SUBNET_ENV})")
    if interface.ip in (net.network_address, net.broadcast_address):
        raise UsageError(f"address {text} is the network {net}'s own (its network or broadcast address)")
    return interface.ip


def _allocate(
    registry: Registry, directory: Path, net: ipaddress.IPv4Network, used: set[ipaddress.IPv4Address], name: str
) -> ipaddress.IPv4Address:
    claimed = {path.name for path in directory.iterdir()}
    for candidate in net.hosts():
        if candidate in used or f"{ADDRESS}-{candidate}" in claimed:
            continue
        if idranges.take(registry, directory / f"{ADDRESS}-{candidate}", name):
            return candidate
    raise UsageError(f"no free address left in this node's network {net}: containers hold them all")


def _claim_port(registry: Registry, directory: Path, port: Port, name: str) -> None:
    if port.host in bound(port.protocol):
        raise UsageError(f"--publish {port}: node port {port.host}/{port.protocol} is in use on this node")
    path = directory / f"{port.protocol}-{port.host}"
    if not idranges.take(registry, path, name):
        holder = idranges.owner(path)
        raise UsageError(f"--publish {port}: container {holder} publishes node port {port.host}/{port.protocol}")


def bound(protocol: str) -> set[int]:
    """The ports of `protocol` a socket of this network namespace listens on (tcp) or is bound to (udp)."""
    ports: set[int] = set()
    for suffix in ("", "6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/net/{protocol}{suffix}").read_text().splitlines()[1:]:
                fields = line.split()
                if protocol == "udp" or fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def release(registry: Registry, name: str) -> None:
    """Drop `name`'s claims (its address, its node ports): call it before the name is freed (see idranges)."""
    for path in _claims(_directory(registry)):
        if idranges.owner(path) == name:
            idranges.drop(path, name)


def _claims(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.iterdir()):
        kind, _, _ = path.name.partition("-")
        if kind in (ADDRESS, *PROTOCOLS):
            yield path


def _directory(registry: Registry) -> Path:
    return idranges.claims_directory(registry, DIRECTORY)


def node_addresses() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """Each IPv4 address of this network namespace, with its interface's name."""
    links = json.loads(_ip("-j", "-4", "addr", "show") or "[]")
    return [
        (link["ifname"], ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}"))
        for link in links
        for info in link.get("addr_info", [])
        if info.get("family") == "inet"
    ]


def create(net: Network, *, connected: bool = True) -> None:
    """Make `net`: the node's bridge if it has none, the container's network namespace with loopback up and
    its veth on the bridge (its address, MAC and default route), and its published ports; not `connected`, it
    stays cut off (see `lock`) until `unlock`. On failure, whatever was made goes."""
    node_net = subnet()
    via = gateway(node_net)
    sweep(net.netns, net.veth)  # what a run of this name that died left: its name is this one's now
    try:
        _bridge(bridge(), f"{via}/{node_net.prefixlen}")
        _ip("netns", "add", net.netns)
        _ip("link", "add", net.veth, "type", "veth", "peer", "name", INSIDE, "address", net.mac, "netns", net.netns)
        _ip("-n", net.netns, "link", "set", "lo", "up")
        _ip("-n", net.netns, "addr", "add", net.address, "dev", INSIDE)
        _ip("-n", net.netns, "link", "set", INSIDE, "up")
        _ip("-n", net.netns, "route", "add", "default", "via", str(via))
        _ip("link", "set", net.veth, "master", bridge(), *(["up"] if connected else []))
        if net.ports:
            firewall.publish(net.chain, net.ip, [(p.host, p.container, p.protocol) for p in net.ports])
    except BaseException:
        destroy(net)
        raise


def _bridge(name: str, address: str) -> None:
    """The node's bridge, with the node's address on it, up (made if missing; another run may make it meanwhile)."""
    if not _exists(name):
        try:
            _ip("link", "add", name, "type", "bridge")
        except HostError:
            if not _exists(name):
                raise
    _ip("addr", "replace", address, "dev", name)
    _ip("link", "set", name, "up")


def destroy(net: Network) -> None:
    """Remove what `create` made for `net` (the bridge stays: other containers use it), whatever is left of it."""
    sweep(net.netns, net.veth)


def sweep(netns: str, veth: str) -> None:
    """Remove the network namespace `netns`, the veth `veth` and their published ports, what is left of them
    (as for a run that died before recording its network: see `names`)."""
    if not (NETNS_DIR / netns).exists():
        return  # `create` makes it first and this removes it last: nothing else was made, or is left
    firewall.unpublish(netns.upper())
    if _exists(veth):
        _ip("link", "del", veth)  # both ends: the container's goes with it
    _ip("netns", "del", netns)


def lock(net: Network) -> None:
    """Cut the container off the node network: nothing it sends leaves, nothing reaches it."""
    _ip("link", "set", net.veth, "down")


def unlock(net: Network) -> None:
    _ip("link", "set", net.veth, "up")


def _exists(ifname: str) -> bool:
    return _run("link", "show", "dev", ifname).returncode == 0


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
