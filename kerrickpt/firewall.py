"""Owns the node's packet rules for containers' published ports: their DNAT, in iptables' nat table (see
xtables)."""

from __future__ import annotations

from collections.abc import Sequence

from kerrickpt import xtables
from kerrickpt.errors import HostError

# Where a container's rules hang: the nat table's chains that see packets to a local address, arriving or
# sent from the node itself (a client on the node reaches a published port at any of its addresses but loopback).
HOOKS = ("PREROUTING", "OUTPUT")


def publish(chain: str, address: str, ports: Sequence[tuple[int, int, str]]) -> None:
    """Forward each (node port, container port, protocol) of `ports` to `address`, in one transaction:
    the rules live in the nat chain `chain` (at most 28 characters, made anew), which HOOKS jump to once each."""
    rules = [
        f"-A {chain} -p {proto} -m {proto} --dport {host} -j DNAT --to-destination {address}:{inside}"
        for host, inside, proto in ports
    ]
    jumps = [f"-A {hook} -m addrtype --dst-type LOCAL -j {chain}" for hook in HOOKS]
    try:
        xtables.replace(xtables.NAT, chain, rules, jumps, f"publishing ports to {address}")
    except FileNotFoundError:
        raise HostError("publishing ports needs iptables, which this node lacks (see README, Dependencies)") from None


def unpublish(chain: str) -> None:
    """Remove `chain` and every jump to it, if they are there (see xtables.remove)."""
    xtables.remove(xtables.NAT, chain, f"removing the rules of {chain}")
