"""Owns a container's network of its own (`--net own`): its identity on the node network (address, MAC, published
ports), claimed without collisions among the node's containers (claim files in STATE/network: see claims), and
the making and removal of what carries it on this node (see netlinks, portfilter, firewall)."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerrickpt import arp, claims, firewall, netlinks, netnsmaker, netports, netsettings, portfilter
from kerrickpt.errors import HostError, NotCheckpointable, UsageError
from kerrickpt.idmap import IdMap
from kerrickpt.netports import Port

log = logging.getLogger(__name__)

HOST, OWN = "host", "own"  # `--net`: the node's network namespace, or one of its own on the node's bridge
MODES = (HOST, OWN)
DIRECTORY = "network"
ADDRESS = "address"


@dataclass(frozen=True)
class Identity:
    """What a container's network is wherever it runs, and what its archive carries: its address (with the node
    subnet's prefix), its MAC, and the node ports forwarded to it."""

    address: str
    mac: str
    ports: tuple[Port, ...] = ()

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "mac": self.mac, "ports": [p.to_dict() for p in self.ports]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        return cls(data["address"], data["mac"], tuple(Port(**p) for p in data.get("ports", ())))


@dataclass(frozen=True)
class Network(Identity):
    """A container's network on this node: its identity, and this node's names of its network namespace (in
    netlinks.NETNS_DIR) and of its veth's node end, made anew wherever it is restored (see `names`)."""

    netns: str = ""
    veth: str = ""

    @property
    def pin(self) -> Path:
        return netlinks.NETNS_DIR / self.netns

    @property
    def unplaced(self) -> str:
        """The name its veth's container end has on the node until a confined container's restore moves it into
        its network namespace (see create_unplaced)."""
        return f"kpc{self.veth.removeprefix('kpn')}"

    @property
    def chain(self) -> str:
        """Its chains: in iptables' nat table (see firewall), and in ebtables' nat table (see portfilter)."""
        return _chain(self.netns)

    def identity(self) -> Identity:
        return Identity(self.address, self.mac, self.ports)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "netns": self.netns, "veth": self.veth}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        carried = Identity.from_dict(data)
        return cls(carried.address, carried.mac, carried.ports, data["netns"], data["veth"])


def mac_of(address: ipaddress.IPv4Address) -> str:
    """A locally administered MAC that follows the address (as Kubernetes' bridge plugin makes them): a
    container restored with its address answers with its MAC, so neighbours' caches stay right."""
    return ":".join(f"{b:02x}" for b in (0x0A, 0x58, *address.packed))


def names(registry: claims.State, name: str) -> tuple[str, str]:
    """This node's names of `name`'s network namespace and veth end: unique among state directories (two
    nodes on one machine share /run/netns), short enough for an interface (15) and a chain (28)."""
    digest = hashlib.sha256(f"{registry.root.resolve()}\0{name}".encode()).hexdigest()[:10]
    return f"kpn-{digest}", f"kpn{digest}"


def plan(
    registry: claims.State,
    name: str,
    address: str | None,
    ports: Sequence[Port],
    *,
    fall_back: bool = False,
    ask_segment: bool = True,
    migration: str | None = None,
) -> tuple[Network, netsettings.Settings]:
    """Claim `name`'s network on this node: `address` (ADDR/PREFIX from `--ip`, or an archive's ADDR), else the
    first free one of the node's pool (also when `address` is taken and `fall_back`), and `ports`; with the node
    network's settings it was claimed in, for `create`. Free means: neither the node nor another of its containers
    holds it, and, on a node joined to a segment, no machine answers for it there (asked with ARP probes, see
    `_segment_holders`; a container that migrated away from this node holds an address of its pool on another
    node) unless not `ask_segment` (a migration's target, whose pre-flight asked). The restore of a `migration`
    claims for the container that migration brings, so it takes over what its pre-flight claimed (see `reserve`).
    UsageError, with nothing claimed but what `migration` held already, for an address outside the subnet or in
    use, a port taken, a subnet the node's own addresses overlap."""
    settings = netsettings.load(registry)
    net = settings.subnet
    used = _node_own(settings)
    directory = _directory(registry)
    holder = claims.Holder(name, migration)
    holders = functools.partial(_segment_holders, registry, settings) if ask_segment else lambda _: set()
    try:
        wanted = _address(address, net) if address is not None else None
        if wanted is not None and wanted in used:
            if not fall_back:
                raise UsageError(f"address {wanted} is in use on this node (the node's own)")
            wanted = None
        if wanted is not None and not claims.take(registry, directory / f"{ADDRESS}-{wanted}", holder):
            if not fall_back:
                raise _held(wanted, claims.blocking(registry, directory / f"{ADDRESS}-{wanted}", holder))
            wanted = None
        if wanted is not None and (others := holders(wanted)):
            claims.drop(directory / f"{ADDRESS}-{wanted}", holder)
            if not fall_back:
                raise _on_segment(wanted, settings, others)
            wanted = None
        if wanted is None:
            wanted = _allocate(registry, directory, settings, used, holder, holders)
        bound = functools.cache(netports.bound)  # /proc/net read once per protocol, not once per port
        for port in ports:
            _claim_port(registry, directory, port, bound, holder)
    except BaseException:
        release(registry, name)
        raise
    netns, veth = names(registry, name)
    return Network(f"{wanted}/{net.prefixlen}", mac_of(wanted), tuple(ports), netns, veth), settings


def _segment_holders(
    registry: claims.State, settings: netsettings.Settings, address: ipaddress.IPv4Address
) -> set[str]:
    """The MACs of the machines that answer for `address` on the node network's segment (none without one): the
    question goes out on the bridge, made if missing."""
    if settings.segment is None:
        return set()
    _bridge(registry, settings)
    netlinks.wait_bridge_carrying(settings.bridge)  # if it never does, no one answers: the claims alone judged
    return arp.probe(settings.bridge, str(address)).macs


def _on_segment(address: ipaddress.IPv4Address, settings: netsettings.Settings, macs: set[str]) -> UsageError:
    return UsageError(
        f"address {address} is in use on this node's segment {settings.segment}, by {', '.join(sorted(macs))}"
    )


def reserve(registry: claims.State, holder: claims.Holder, carried: Identity, *, remap: bool) -> None:
    """Claim for `holder`, a container that a migration brings here with the network `carried`, what it needs here,
    before its source freezes it (a migration's pre-flight): its published ports, free here; with `remap` (it gets
    an address of this node's), check that this node's pool has one free (claimed by its restore, which asks the
    segment); else its address, which must be this node's subnet's, free on this node, and on a segment that
    reaches the source: the container answers for it there (from the source node), and no other machine does.
    So the container keeps its address and connections here, and no other run, restore or migration takes them
    before its restore does (see `plan`). Makes the node network's bridge, which the question goes out on.
    NotCheckpointable if the address cannot live here (`--net-remap` can move the container), UsageError if it or
    a port is taken. What it claimed stays `holder`'s, whatever it raises, until its migration lets go (`let_go`)."""
    settings = netsettings.load(registry)
    used = _node_own(settings)
    directory = _directory(registry)
    bound = functools.cache(netports.bound)
    for port in carried.ports:
        _claim_port(registry, directory, port, bound, holder)
    if remap:
        if next(_candidates(registry, directory, settings, used, holder), None) is None:
            raise _pool_full(settings)
        return
    address = ipaddress.IPv4Interface(carried.address)
    where = netsettings.describe(settings)
    remedy = "migrate it with --net-remap to give it an address of the target's (its connections are closed)"
    if address.network != settings.subnet:
        raise NotCheckpointable(f"its address {address} is not of this node's network ({where}): {remedy}")
    if settings.segment is None:
        raise NotCheckpointable(
            f"this node's network ({where}) is joined to no segment (${netsettings.SEGMENT_ENV}), so the source's "
            f"peers would not reach {address.ip} here: {remedy}"
        )
    if address.ip in used:
        raise UsageError(f"address {address.ip} is in use on this node (the node's own)")
    claim = directory / f"{ADDRESS}-{address.ip}"
    if not claims.take(registry, claim, holder):
        raise _held(address.ip, claims.blocking(registry, claim, holder))
    _bridge(registry, settings)
    netlinks.wait_bridge_carrying(settings.bridge)  # if it never does, no one answers: said below
    answers = arp.probe(settings.bridge, str(address.ip))
    if answers.macs - {carried.mac}:
        raise _on_segment(address.ip, settings, answers.macs - {carried.mac})
    if carried.mac not in answers.macs:
        raise NotCheckpointable(
            f"the container does not answer at {address.ip} on this node's segment {settings.segment}: the segment "
            f"does not reach the source's node network, so its peers would not reach it here: {remedy}"
        )
    if carried.mac in answers.doubled():
        raise UsageError(
            f"address {address.ip} is in use on this node's segment {settings.segment} twice, with the container's "
            f"own MAC {carried.mac}: another machine holds a copy of it (a restore of its archive?)"
        )


def _node_own(settings: netsettings.Settings) -> set[ipaddress.IPv4Address]:
    """The addresses the node itself holds, its gateway's among them. UsageError if an address of another of its
    interfaces overlaps the node network: which of the two a packet is for could not be told."""
    own = netlinks.node_addresses()
    for ifname, interface in own:
        if ifname != settings.bridge and interface.network.overlaps(settings.subnet):
            raise UsageError(
                f"the node network {settings.subnet} overlaps this node's own address {interface} on {ifname}: "
                f"give the node network another subnet (see README, Network)"
            )
    return {interface.ip for _, interface in own} | {settings.gateway.ip}


def _held(address: ipaddress.IPv4Address, holder: str | None) -> UsageError:
    """`holder`: see claims.blocking (None: the claim was released just after `take` found it another's)."""
    return UsageError(f"address {address} is in use on this node (by {holder or 'another container'})")


def _address(text: str, net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The address `text` (ADDR or ADDR/PREFIX) names, if the node's subnet holds it."""
    try:
        interface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise UsageError(f"address {text}: give an IPv4 ADDR/PREFIX") from None
    if interface.ip not in net or ("/" in text and interface.network.prefixlen != net.prefixlen):
        raise UsageError(f"address {text} is outside this node's network {net}")
    if interface.ip in (net.network_address, net.broadcast_address):
        raise UsageError(f"address {text} is the network {net}'s own (its network or broadcast address)")
    return interface.ip


def _allocate(
    registry: claims.State,
    directory: Path,
    settings: netsettings.Settings,
    used: set[ipaddress.IPv4Address],
    holder: claims.Holder,
    holders: Callable[[ipaddress.IPv4Address], set[str]],
) -> ipaddress.IPv4Address:
    """The first address of the node's pool (see `_candidates`) that `holder` can claim (claims.take judges an
    existing claim) and no machine of the segment answers for (`holders`)."""
    for candidate in _candidates(registry, directory, settings, used, holder):
        filename = f"{ADDRESS}-{candidate}"
        if claims.take(registry, directory / filename, holder):
            if not holders(candidate):
                return candidate
            claims.drop(directory / filename, holder)
    raise _pool_full(settings)


def _candidates(
    registry: claims.State,
    directory: Path,
    settings: netsettings.Settings,
    used: set[ipaddress.IPv4Address],
    holder: claims.Holder,
) -> Iterator[ipaddress.IPv4Address]:
    """The addresses of the node's pool that are neither in `used` nor, when looked, another live container's."""
    # Read once: an address another live container holds is passed over without trying (each try writes and
    # fsyncs a claim file aside); claims.take still judges the rest, claimed or not meanwhile.
    taken = {path.name: owner for path, owner in claims.held(directory, _is_claim)}
    net = settings.subnet
    for candidate in settings.pool:
        if candidate in (net.network_address, net.broadcast_address) or candidate in used:
            continue
        filename = f"{ADDRESS}-{candidate}"
        if not (filename in taken and claims.refuses(registry, taken[filename], holder)):
            yield candidate


def _pool_full(settings: netsettings.Settings) -> UsageError:
    return UsageError(
        f"no free address left in this node's pool {settings.pool}: containers (of this node, or of its segment) "
        "hold them all"
    )


def _claim_port(
    registry: claims.State, directory: Path, port: Port, bound: Callable[[str], set[int]], holder: claims.Holder
) -> None:
    """Claim the node port `port` for `holder`: no program of the node may listen on it, nor another container
    publish it (else UsageError)."""
    if port.host in bound(port.protocol):
        raise UsageError(f"--publish {port}: node port {port.host}/{port.protocol} is in use on this node")
    path = directory / f"{port.protocol}-{port.host}"
    if not claims.take(registry, path, holder):
        raise _published(port, claims.blocking(registry, path, holder))


def _published(port: Port, holder: str | None) -> UsageError:
    """`holder`: see claims.blocking (None: the claim was released just after `take` found it another's)."""
    who = holder or "another container"
    return UsageError(f"--publish {port}: {who} publishes node port {port.host}/{port.protocol}")


def release(registry: claims.State, name: str) -> None:
    """Drop `name`'s claims (its address, its node ports), but those a migration still arriving holds for it: call
    it before the name is freed (see claims)."""
    claims.release(registry, _directory(registry), _is_claim, name)


def let_go(registry: claims.State, migration: str) -> None:
    """Drop what `migration` claimed for the container it brings (see `reserve`) once no one holds it: no pre-flight
    or receiver of it lives, and it did not bring that container here (see claims.let_go)."""
    claims.let_go(registry, _directory(registry), _is_claim, migration)


def stale(registry: claims.State) -> list[Path]:
    """Claims whose holder is gone, and claims a run that died left half written: what `gc` removes."""
    return claims.stale(registry, _directory(registry), _is_claim)


def _is_claim(filename: str) -> bool:
    kind, _, _ = filename.partition("-")
    return kind in (ADDRESS, *netports.PROTOCOLS)


def _directory(registry: claims.State) -> Path:
    return claims.directory(registry, DIRECTORY)


def create(
    registry: claims.State,
    net: Network,
    settings: netsettings.Settings,
    *,
    connected: bool = True,
    owner: IdMap | None = None,
) -> None:
    """Make `net` in the node network `settings` (both as `plan` gave them): the node's bridge if it has none, the
    container's network namespace and veth (see netlinks.make; with `owner`, a confined container's id map, in a
    user namespace of its own that the container joins: see netnsmaker), its port filter (see portfilter), made
    before its veth, and its published ports; `connected`, it is connected and announced as `reconnect` does, else it
    stays cut off until then. On failure, what was made stays: the caller removes it (`destroy`)."""
    _prepare(registry, net, settings)
    if owner is None:
        netlinks.add_netns(net.netns)
    else:
        netnsmaker.make(net.netns, owner)
    netlinks.make(net.netns, net.veth, net.mac, net.address, settings, connected=False)
    _publish(net)
    if connected:
        # Announced as a container that arrives is: its address (and so its MAC) may have lived behind another port
        # of the segment a moment ago, where switches would still send its frames, and the port filter drops the
        # IPv6 chatter of a new interface that used to teach them where it is now.
        reconnect(net)


def create_unplaced(registry: claims.State, net: Network, settings: netsettings.Settings) -> None:
    """Make `net` in the node network `settings` for a restore of a confined container, whose network namespace
    CRIU restores from the images (it owns none of the node's): as `create`, cut off, but with no namespace yet,
    the container's end of its veth on the node (as net.unplaced) for CRIU to move in. `adopt` finishes it."""
    _prepare(registry, net, settings)
    netlinks.make_unplaced(net.veth, net.unplaced, net.mac, settings)
    _publish(net)


def adopt(net: Network, settings: netsettings.Settings, pid: int) -> None:
    """Finish `net` (see create_unplaced) once CRIU has restored its network namespace, that of host PID `pid`:
    pinned as net.pin, its address, MAC and default route those of `net` on this node, whatever the images had."""
    netlinks.attach(net.netns, pid)
    netlinks.settle(net.netns, net.mac, net.address, settings.gateway.ip)


def _prepare(registry: claims.State, net: Network, settings: netsettings.Settings) -> None:
    # What a run of this name that died left: its name is this one's now. Its port filter is left to install, which
    # makes the chain anew and keeps the jump (the same veth's): one ebtables listing less, within a migration's
    # downtime.
    _remove(net.netns, net.veth, net.chain, port_filter=False)
    _bridge(registry, settings)
    # Before its port is made: no frame of the container's passes unfiltered, whatever happens to its veth.
    portfilter.install(net.chain, net.veth, net.mac, net.ip)


def _publish(net: Network) -> None:
    if net.ports:
        firewall.publish(net.chain, net.ip, [(p.host, p.container, p.protocol) for p in net.ports])


def _bridge(registry: claims.State, settings: netsettings.Settings) -> None:
    """The node network's bridge, made if missing (see netlinks.bridge), and `settings` this node's from now on."""
    netlinks.bridge(settings, str(registry.root.resolve()))
    netsettings.keep(registry, settings)


def reconnect(net: Network) -> float:
    """Connect `net` to the node network again (see netlinks.connect) and announce its address from it (see
    arp.announce): a segment that learned it behind another node's port (a migration's source) learns at once that
    it lives here now, not when the container next sends. The announcement is a courtesy: should it fail, the
    segment learns from the container's next frame, and a warning says so. Returns when (time.monotonic) it was
    connected: the end of its network lock."""
    netlinks.connect(net.veth)
    connected_at = time.monotonic()
    try:
        if not netlinks.wait_carrying(net.netns, net.veth):
            log.warning("%s's link was not up after %.0f s: announcing its address anyway", net.ip, netlinks.CARRY_WAIT)
        arp.announce(net.pin, netlinks.INSIDE, net.ip, net.mac)
    except HostError as exc:
        log.warning("%s: the network learns where it lives from its next frame", exc.message)
    return connected_at


def cut_off(net: Network) -> None:
    """Cut `net` off the node network (see netlinks.cut_off), if its veth is there: before its container is killed
    where a copy of it elsewhere may hold its connections (a migration's other side), which what its dying sockets
    send (FIN, RST) would end."""
    if netlinks.exists(net.veth):
        netlinks.cut_off(net.veth)


def destroy(net: Network) -> None:
    """Remove what `create` made for `net`, whatever is left of it (the bridge stays: other containers use it):
    every part is tried; HostError afterwards if one could not go."""
    _remove(net.netns, net.veth, net.chain if net.ports else None, port_filter=True)


def sweep(netns: str, veth: str) -> None:
    """`destroy` by this node's names alone, published ports included (for a run that died before recording its
    network: see `names`)."""
    _remove(netns, veth, _chain(netns), port_filter=True)


def _chain(netns: str) -> str:
    """The chains of the network whose namespace is `netns` (see Network.chain)."""
    return netns.upper()


def _remove(netns: str, veth: str, chain: str | None, *, port_filter: bool) -> None:
    """Remove the network of namespace `netns` and veth `veth`, with its published ports (`chain`, if any) and its
    port filter (if `port_filter`): the filter last, so that a veth which could not go keeps it."""
    steps: list[tuple[str, Callable[[], None]]] = [
        (f"its published ports (chain {chain})", lambda: firewall.unpublish(chain) if chain else None),
        (f"its veth {veth}", lambda: netlinks.remove_veth(veth)),
        (f"its network namespace {netns}", lambda: netlinks.remove_netns(netns)),
        (f"its port filter (chain {_chain(netns)})", lambda: portfilter.remove(_chain(netns)) if port_filter else None),
    ]
    failed = []
    for what, step in steps:
        try:
            step()
        except HostError as exc:
            failed.append(f"{what}: {exc.message}" + (f" ({exc.log_tail})" if exc.log_tail else ""))
    if failed:
        raise HostError(f"could not remove all of a container's network: {'; '.join(failed)}")
