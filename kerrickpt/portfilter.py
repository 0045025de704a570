"""Owns what a container's port on the node network passes from it: frames with its own MAC as their source, and of
those only IPv4 from its own address and ARP that speaks for its own address and MAC. Every other frame it sends
(another address or MAC, IPv6, any other protocol) is dropped as it enters the bridge from its veth's node end, in
ebtables' nat table (see xtables)."""

from __future__ import annotations

from kerrickpt import xtables
from kerrickpt.errors import HostError

# Where a container's frames meet its chain: as they enter the bridge, before it learns their source MAC (a frame
# dropped by the filter table, after, would still teach the bridge that another's MAC lives behind this port, which
# then gets that one's frames) and before it passes them to the node or on to its other ports.
HOOK = "PREROUTING"


def install(chain: str, veth: str, mac: str, ip: str) -> None:
    """Let through the bridge port `veth` (it need not exist yet) only frames from `mac`: IPv4 from `ip`, and ARP
    whose sender is `ip` at `mac`; the rules live in the chain `chain` (made anew), which HOOK jumps to first for
    frames that came in through `veth`."""
    rules = [
        f"-A {chain} -p ARP -s {mac} --arp-ip-src {ip} --arp-mac-src {mac} -j RETURN",
        f"-A {chain} -p IPv4 -s {mac} --ip-src {ip} -j RETURN",
        f"-A {chain} -j DROP",
    ]
    jump = f"-A {HOOK} -i {veth} -j {chain}"
    try:
        xtables.replace(xtables.BRIDGE_NAT, chain, rules, [jump], f"filtering the port {veth}", first=True)
    except FileNotFoundError:
        raise HostError(
            "a container's own network needs ebtables (Debian's iptables package), which this node lacks: without it "
            "the container could take any address on the node network (see README, Dependencies)"
        ) from None


def unusable() -> str | None:
    """Why this node could not filter a container's port, None if it can (see xtables.unusable)."""
    return xtables.unusable(xtables.BRIDGE_NAT)


def remove(chain: str) -> None:
    """Remove `chain` and every jump to it, if they are there (see xtables.remove)."""
    xtables.remove(xtables.BRIDGE_NAT, chain, f"removing the port filter {chain}")
