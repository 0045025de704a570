"""Owns the node's packet rules for containers: the DNAT of their published ports, through iptables (one place,
with timeouts)."""

from __future__ import annotations

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
    the rules live in the nat chain `chain` (at most 28 characters, made anew), which HOOKS jump to once each."""
    try:
        present = _listing()
    except FileNotFoundError:
        raise HostError("publishing ports needs iptables, which this node lacks (see README, Dependencies)") from None
    rules = [f":{chain} - [0:0]"]  # under --noflush, emptied if it was there
    rules += [
        f"-A {chain} -p {proto} -m {proto} --dport {host} -j DNAT --to-destination {address}:{inside}"
        for host, inside, proto in ports
    ]
    rules += [f"-A {hook} {JUMP.format(chain=chain)}" for hook in HOOKS if _jump(hook, chain) not in present]
    _restore(rules, f"publishing ports to {address}")


def unpublish(chain: str) -> None:
    """Remove `chain` and every jump to it, if they are there. A node without iptables has none: kerrickpt
    could not have made them."""
    try:
        present = _listing()
    except FileNotFoundError:
        return
    jumps = [f"-D {line.removeprefix('-A ')}" for line in present if line in {_jump(h, chain) for h in HOOKS}]
    made = f"-N {chain}" in present
    if jumps or made:
        _restore([*jumps, *([f"-F {chain}", f"-X {chain}"] if made else [])], f"removing the rules of {chain}")


def _jump(hook: str, chain: str) -> str:
    """A jump to `chain` from `hook`, as `iptables -S` lists it."""
    return f"-A {hook} {JUMP.format(chain=chain)}"


def _listing() -> list[str]:
    """The nat table's chains and rules, as `iptables -S` lists them (exact: never judged from an error's words).
    FileNotFoundError if iptables is not installed."""
    argv = ["iptables", "-w", str(int(TIMEOUT)), "-t", "nat", "-S"]
    try:
        result = command.run(argv, timeout=TIMEOUT + 5)
    except FileNotFoundError:
        raise  # not installed: the caller says what that means
    except (OSError, CommandTimeout) as exc:
        raise HostError(f"iptables -t nat -S failed: {exc}") from exc
    if result.returncode != 0:
        failed = f"iptables -t nat -S failed (exit code {result.returncode})"
        raise HostError(failed, log_tail=command.tail(result.stderr))
    return result.stdout.splitlines()


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
