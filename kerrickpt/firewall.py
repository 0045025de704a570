"""Owns the node's packet rules for containers: the DNAT of their published ports, through iptables (one place,
with timeouts)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from kerrickpt import command
from kerrickpt.errors import CommandTimeout, HostError

TIMEOUT = 30.0  # iptables waits for the xtables lock (-w) at most this long too
# Where a container's rules hang: the nat table's chains that see packets to a local address, arriving or
# sent from the node itself (a client on the node reaches a published port at any of its addresses but loopback).
HOOKS = ("PREROUTING", "OUTPUT")
JUMP = "-m addrtype --dst-type LOCAL -j {chain}"


def publish(chain: str, address: str, ports: Sequence[tuple[int, int, str]]) -> None:
    """Forward each (node port, container port, protocol) of `ports` to `address`, in one transaction:
    the rules live in the nat chain `chain` (at most 28 characters), which jumps from HOOKS."""
    rules = [f":{chain} - [0:0]"]
    rules += [
        f"-A {chain} -p {proto} -m {proto} --dport {host} -j DNAT --to-destination {address}:{inside}"
        for host, inside, proto in ports
    ]
    rules += [f"-A {hook} {JUMP.format(chain=chain)}" for hook in HOOKS]
    _restore(rules, f"publishing ports to {address}")


def unpublish(chain: str) -> None:
    """Remove `chain` and the jumps to it, if they are there."""
    if _iptables("-t", "nat", "-S", chain).returncode != 0:
        return  # never made, or removed already
    jumps = [f"-D {hook} {JUMP.format(chain=chain)}" for hook in HOOKS if _has_jump(hook, chain)]
    _restore([*jumps, f"-F {chain}", f"-X {chain}"], f"removing the rules of {chain}")


def _has_jump(hook: str, chain: str) -> bool:
    return _iptables("-t", "nat", "-C", hook, *JUMP.format(chain=chain).split()).returncode == 0


def _restore(rules: list[str], what: str) -> None:
    text = "\n".join(["*nat", *rules, "COMMIT", ""])
    try:
        argv = ["iptables-restore", "-w", str(int(TIMEOUT)), "--noflush"]
        result = command.run(argv, timeout=TIMEOUT + 5, input_bytes=text.encode())
    except (OSError, CommandTimeout) as exc:
        raise HostError(f"{what} failed: iptables-restore: {exc}") from exc
    if result.returncode != 0:
        failed = f"{what} failed: iptables-restore exited with {result.returncode}"
        raise HostError(failed, log_tail=command.tail(result.stderr))


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return command.run(["iptables", "-w", str(int(TIMEOUT)), *args], timeout=TIMEOUT + 5)
    except (OSError, CommandTimeout) as exc:
        raise HostError(f"iptables {' '.join(args)} failed: {exc}") from exc
