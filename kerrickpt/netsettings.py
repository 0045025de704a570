"""Owns the node network's settings (see network): its subnet and bridge, the node's address on it, the part of
the subnet it hands out, and the interface that joins it to a segment other nodes share; chosen once per node, at
the first container with a network of its own (from $KERRICKPT_SUBNET, $KERRICKPT_BRIDGE, $KERRICKPT_GATEWAY,
$KERRICKPT_POOL and $KERRICKPT_SEGMENT, else the defaults), and stored in STATE/network.json, which every later
command reads: a migration's agent, `gc` or cron see the node's network whatever their environment says."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kerrickpt import claims
from kerrickpt.errors import StateDamagedError, UsageError

BRIDGE_ENV, SUBNET_ENV = "KERRICKPT_BRIDGE", "KERRICKPT_SUBNET"
GATEWAY_ENV, POOL_ENV, SEGMENT_ENV = "KERRICKPT_GATEWAY", "KERRICKPT_POOL", "KERRICKPT_SEGMENT"
ENVS = (BRIDGE_ENV, SUBNET_ENV, GATEWAY_ENV, POOL_ENV, SEGMENT_ENV)
KEYS = dict(zip(("bridge", "subnet", "gateway", "pool", "segment"), ENVS, strict=True))  # in network.json
DEFAULT_BRIDGE = "kerrickpt0"
# Set aside for benchmarking (RFC 2544), so never a real network's; the local test nodes take 198.18.0.0/16.
DEFAULT_SUBNET = "198.19.0.0/16"
FILE = "network.json"
# An interface name the kernel takes (IFNAMSIZ: 15 characters) and that no `ip` argument mistakes for an option.
IFNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


@dataclass(frozen=True)
class Settings:
    """The node network: its bridge and subnet; the node's own address on the bridge, the containers' default
    route (by default the subnet's first); the part of the subnet whose addresses this node hands out (`pool`, by
    default all of it); and `segment`, an interface of the node joined to the bridge, through which the bridge is
    one layer-2 segment with other nodes' (None: the bridge is this node's alone).

    Nodes that share a segment share its subnet, each with a gateway and a pool of its own: a container's address
    is then good on any of them, and two nodes never hand out one address."""

    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Interface
    pool: ipaddress.IPv4Network
    segment: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "bridge": self.bridge,
            "subnet": str(self.subnet),
            "gateway": str(self.gateway.ip),
            "pool": str(self.pool),
            "segment": self.segment,
        }


def load(registry: claims.State) -> Settings:
    """This node's settings: as stored, else as the environment (or the defaults) choose them, to be kept once its
    bridge is made (`keep`). UsageError for a bad choice, or an environment that asks for other settings than
    the stored ones."""
    path = registry.root / FILE
    asked, stored = _asked(), _read(path)
    if stored is None:
        return asked or _checked({}, KEYS)
    if asked is not None and asked != stored:
        raise _differ(path, stored, asked)
    return stored


def keep(registry: claims.State, settings: Settings) -> None:
    """Store `settings` as this node's, unless they are already; UsageError if another command stored others."""
    path = registry.root / FILE
    if _read(path) == settings:
        return  # the usual case: nothing written aside and fsynced
    data = json.dumps(settings.to_dict()).encode()
    if not claims.write_new(path, data):
        stored = _read(path)
        if stored != settings:
            assert stored is not None  # never removed by kerrickpt
            raise _differ(path, stored, settings)


def _differ(path: Path, stored: Settings, asked: Settings) -> UsageError:
    return UsageError(
        f"this node's network is {describe(stored)} (chosen at its first container with a network of its own, "
        f"kept in {path}); the environment ({', '.join('$' + e for e in ENVS)}) asks for {describe(asked)}: "
        f"unset them, or remove {path} while no container has a network of its own"
    )


def describe(settings: Settings) -> str:
    """The settings in words, as a message gives them."""
    words = f"{settings.subnet} on bridge {settings.bridge}"
    if settings.gateway != _first(settings.subnet):
        words += f" at {settings.gateway.ip}"
    if settings.pool != settings.subnet:
        words += f", handing out {settings.pool}"
    return words + (f", joined to segment {settings.segment}" if settings.segment else "")


def _asked() -> Settings | None:
    """The settings the environment asks for; None if it names none."""
    given = {key: value for key, env in KEYS.items() if (value := os.environ.get(env))}
    return _checked(given, KEYS) if given else None


def _checked(given: dict[str, str], names: dict[str, str]) -> Settings:
    """Settings from `given` (by the file's keys; a missing one takes its default), each named in a refusal as
    `names` says (the environment's variable, or the file's key)."""
    bridge = given.get("bridge") or DEFAULT_BRIDGE
    segment = given.get("segment") or None
    for key, name in (("bridge", bridge), ("segment", segment)):
        if name is not None and not IFNAME_PATTERN.fullmatch(name):
            raise UsageError(f"{names[key]}={name}: give an interface name of 1 to 15 letters, digits, '_', '.', '-'")
    if segment == bridge:
        raise UsageError(f"{names['segment']}={segment}: the segment's interface cannot be the bridge itself")
    net = _network(names["subnet"], given.get("subnet") or DEFAULT_SUBNET)
    if net.prefixlen > 30:
        raise UsageError(f"{names['subnet']}={net}: too small for a gateway and a container")
    pool = _network(names["pool"], given.get("pool") or str(net))
    if not pool.subnet_of(net):
        raise UsageError(f"{names['pool']}={pool}: not a part of the node network {net}")
    gateway = _first(net)
    if given.get("gateway"):
        try:
            gateway = ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(given['gateway'])}/{net.prefixlen}")
        except ValueError as exc:
            raise UsageError(f"{names['gateway']}={given['gateway']}: not an IPv4 address ({exc})") from None
        if gateway.ip not in net or gateway.ip in (net.network_address, net.broadcast_address):
            raise UsageError(f"{names['gateway']}={gateway.ip}: not an address of the node network {net}")
    return Settings(bridge, net, gateway, pool, segment)


def _network(key: str, text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise UsageError(f"{key}={text}: not an IPv4 subnet ({exc})") from None


def _first(net: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(f"{next(net.hosts())}/{net.prefixlen}")


def _read(path: Path) -> Settings | None:
    try:
        data = json.loads(path.read_bytes())
        # A file of a kerrickpt before segments names the bridge and subnet only: the rest takes its defaults.
        given = {key: data[key] for key in KEYS if data.get(key) is not None}
        odd = [key for key, value in given.items() if not isinstance(value, str)]
        if odd:  # ipaddress would take a number for an address
            raise TypeError(f"{', '.join(odd)}: not a string")
        return _checked(given, {key: key for key in KEYS})
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError, UsageError) as exc:
        raise StateDamagedError(f"{path} is damaged ({exc}): remove it to choose the node network again") from None
