"""Owns the node network's settings (see network): its subnet and bridge, chosen once per node, at the first
container with a network of its own (from $KERRICKPT_SUBNET and $KERRICKPT_BRIDGE, else the defaults), and
stored in STATE/network.json, which every later command reads: a migration's agent, `gc` or cron see the
node's network whatever their environment says."""

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
DEFAULT_BRIDGE = "kerrickpt0"
# Set aside for benchmarking (RFC 2544), so never a real network's; the local test nodes take 198.18.0.0/16.
DEFAULT_SUBNET = "198.19.0.0/16"
FILE = "network.json"
# An interface name the kernel takes (IFNAMSIZ: 15 characters) and that no `ip` argument mistakes for an option.
BRIDGE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


@dataclass(frozen=True)
class Settings:
    """The node network: its bridge, and its subnet, whose first address is the node's own on the bridge."""

    bridge: str
    subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        """The node's own address on its bridge, the containers' default route: the subnet's first."""
        return ipaddress.IPv4Interface(f"{next(self.subnet.hosts())}/{self.subnet.prefixlen}")


def load(registry: claims.State) -> Settings:
    """This node's settings: as stored, else as the environment (or the defaults) choose them, to be kept once its
    bridge is made (`keep`). UsageError for a bad choice, or an environment that asks for other settings than
    the stored ones."""
    path = registry.root / FILE
    asked, stored = _asked(), _read(path)
    if stored is None:
        return asked or Settings(DEFAULT_BRIDGE, ipaddress.IPv4Network(DEFAULT_SUBNET))
    if asked is not None and asked != stored:
        raise _differ(path, stored, asked)
    return stored


def keep(registry: claims.State, settings: Settings) -> None:
    """Store `settings` as this node's, unless they are already; UsageError if another command stored others."""
    path = registry.root / FILE
    if _read(path) == settings:
        return  # the usual case: nothing written aside and fsynced
    data = json.dumps({"bridge": settings.bridge, "subnet": str(settings.subnet)}).encode()
    if not claims.write_new(path, data):
        stored = _read(path)
        if stored != settings:
            assert stored is not None  # never removed by kerrickpt
            raise _differ(path, stored, settings)


def _differ(path: Path, stored: Settings, asked: Settings) -> UsageError:
    return UsageError(
        f"this node's network is {stored.subnet} on bridge {stored.bridge} (chosen at its first container with a "
        f"network of its own, kept in {path}); ${SUBNET_ENV} and ${BRIDGE_ENV} ask for {asked.subnet} on "
        f"{asked.bridge}: unset them, or remove {path} while no container has a network of its own"
    )


def _asked() -> Settings | None:
    """The settings the environment asks for; None if it names neither."""
    bridge, subnet = os.environ.get(BRIDGE_ENV) or None, os.environ.get(SUBNET_ENV) or None
    if bridge is None and subnet is None:
        return None
    return _checked(bridge or DEFAULT_BRIDGE, subnet or DEFAULT_SUBNET)


def _checked(bridge: str, text: str) -> Settings:
    if not BRIDGE_PATTERN.fullmatch(bridge):
        raise UsageError(f"{BRIDGE_ENV}={bridge}: give an interface name of 1 to 15 letters, digits, '_', '.', '-'")
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise UsageError(f"{SUBNET_ENV}={text}: not an IPv4 subnet ({exc})") from None
    if net.prefixlen > 30:
        raise UsageError(f"{SUBNET_ENV}={text}: too small for a gateway and a container")
    return Settings(bridge, net)


def _read(path: Path) -> Settings | None:
    try:
        data = json.loads(path.read_bytes())
        return _checked(data["bridge"], data["subnet"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, UsageError) as exc:
        raise StateDamagedError(f"{path} is damaged ({exc}): remove it to choose the node network again") from None
