"""Owns running the node's packet-rule programs, iptables and ebtables (one place, with timeouts): a chain of
kerrickpt's, with the jumps to it, made anew or removed in one transaction of the program's -restore, judged from
what its -save lists (exact lines: never from an error's words)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kerrickpt import command
from kerrickpt.errors import CommandTimeout, HostError

TIMEOUT = 30.0  # iptables-restore waits for the xtables lock (-w) at most this long too


@dataclass(frozen=True)
class Table:
    """A table of one of the programs, where kerrickpt's chains live."""

    program: str  # iptables or ebtables, with its -save and -restore beside it
    name: str
    wait: tuple[str, ...] = ()  # -restore's options to wait for the program's lock
    declared: str = "-"  # how -restore declares a chain of its own: a user chain, whose policy is its caller's


# iptables (legacy) serializes its programs with a lock; ebtables' nf_tables programs take none (each -restore is one
# netlink transaction) and know no -w.
NAT = Table("iptables", "nat", ("-w", str(int(TIMEOUT))), "- [0:0]")
BRIDGE_NAT = Table("ebtables", "nat", declared="RETURN")


def replace(
    table: Table, chain: str, rules: Sequence[str], jumps: Sequence[str], what: str, *, first: bool = False
) -> None:
    """In one transaction: `chain` made anew (emptied if it was there) holding `rules` (each as -save lists it,
    "-A CHAIN ..."), and each of `jumps` to it ("-A HOOK ... -j CHAIN", as -save lists it) added unless it is there
    already: appended to its hook, or with `first` put before the hook's other rules (an ACCEPT of the node's own
    then cannot pass a frame by it). FileNotFoundError if the program is not installed."""
    present = _listing(table)
    added = [f"{'-I' if first else '-A'} {jump.removeprefix('-A ')}" for jump in jumps if jump not in present]
    lines = [f":{chain} {table.declared}", *rules, *added]
    _restore(table, lines, what)


def remove(table: Table, chain: str, what: str) -> None:
    """Remove `chain` and every jump to it, if they are there. A node without the program has none: kerrickpt could
    not have made them."""
    try:
        present = _listing(table)
    except FileNotFoundError:
        return
    jumps = [f"-D {line.removeprefix('-A ')}" for line in present if _jumps_to(line, chain)]
    made = any(line.startswith(f":{chain} ") for line in present)
    if jumps or made:
        _restore(table, [*jumps, *([f"-F {chain}", f"-X {chain}"] if made else [])], what)


def unusable(table: Table) -> str | None:
    """Why kerrickpt could make no chain in `table` on this node, None if it can: the table listed, as replace does
    first (the program missing, or the kernel's tables refused, fails it)."""
    try:
        _listing(table)
    except FileNotFoundError:
        return f"{table.program} is not installed"
    except HostError as exc:
        return f"{exc.message}: {exc.log_tail}" if exc.log_tail else exc.message
    return None


def _jumps_to(line: str, chain: str) -> bool:
    return line.startswith("-A ") and line.endswith(f" -j {chain}")


def _listing(table: Table) -> list[str]:
    """`table`'s chains (":CHAIN ...") and rules ("-A CHAIN ..."), as its -save lists them. FileNotFoundError if
    the program is not installed."""
    argv = [f"{table.program}-save", "-t", table.name]
    try:
        result = command.run(argv, timeout=TIMEOUT + 5)
    except FileNotFoundError:
        raise  # not installed: the caller says what that means
    except (OSError, CommandTimeout) as exc:
        raise HostError(f"{' '.join(argv)} failed: {exc}") from exc
    if result.returncode != 0:
        failed = f"{' '.join(argv)} failed (exit code {result.returncode})"
        raise HostError(failed, log_tail=command.tail(result.stderr))
    return result.stdout.splitlines()


def _restore(table: Table, lines: list[str], what: str) -> None:
    text = "\n".join([f"*{table.name}", *lines, "COMMIT", ""])
    program = f"{table.program}-restore"
    try:
        result = command.run([program, *table.wait, "--noflush"], timeout=TIMEOUT + 5, input_bytes=text.encode())
    except (OSError, CommandTimeout) as exc:
        raise HostError(f"{what} failed: {program}: {exc}") from exc
    if result.returncode != 0:
        failed = f"{what} failed: {program} exited with {result.returncode}"
        raise HostError(failed, log_tail=command.tail(result.stderr))
