"""Owns published ports (`--publish HOSTPORT:PORT[/tcp|udp]`): parsing them, and which node ports programs of
this node hold already (/proc/net)."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerrickpt.errors import UsageError

PROTOCOLS = ("tcp", "udp")
TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"  # states as /proc/net/tcp writes them
PATTERN = re.compile(r"(\d{1,5}):(\d{1,5})(?:/(tcp|udp))?")


@dataclass(frozen=True)
class Port:
    """A node port forwarded to a port of the container."""

    host: int
    container: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host}:{self.container}/{self.protocol}"

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "container": self.container, "protocol": self.protocol}


def parse(items: Sequence[str]) -> tuple[Port, ...]:
    """`--publish` values; UsageError for a bad one or a node port given twice."""
    ports: list[Port] = []
    for item in items:
        match = PATTERN.fullmatch(item)
        numbers = [int(n) for n in match.groups()[:2]] if match else []
        if not match or not all(1 <= n <= 65535 for n in numbers):
            raise UsageError(f"--publish {item}: give HOSTPORT:PORT[/tcp|udp], ports 1 to 65535")
        port = Port(numbers[0], numbers[1], match.group(3) or "tcp")
        if any((p.host, p.protocol) == (port.host, port.protocol) for p in ports):
            raise UsageError(f"--publish {item}: node port {port.host}/{port.protocol} is given twice")
        ports.append(port)
    return tuple(ports)


def bound(protocol: str) -> set[int]:
    """The ports of `protocol` a socket of this network namespace listens on (tcp) or is bound to (udp)."""
    return {
        int(fields[1].rsplit(":", 1)[1], 16)
        for fields in _sockets(Path("/proc/net"), protocol)
        if protocol == "udp" or fields[3] == TCP_LISTEN
    }


def established(pid: int) -> list[str]:
    """The established TCP connections of the network namespace of process `pid`, each "LOCAL:PORT PEER:PORT"."""
    return [f"{_endpoint(fields[1])} {_endpoint(fields[2])}" for fields in _tcp(pid, TCP_ESTABLISHED)]


def listening(pid: int) -> list[str]:
    """The TCP listeners of the network namespace of process `pid`, each "ADDRESS:PORT"."""
    return [_endpoint(fields[1]) for fields in _tcp(pid, TCP_LISTEN)]


def _tcp(pid: int, state: str) -> Iterator[list[str]]:
    return (fields for fields in _sockets(Path(f"/proc/{pid}/net"), "tcp") if fields[3] == state)


def _sockets(directory: Path, protocol: str) -> Iterator[list[str]]:
    """The fields of each socket line of `directory`/`protocol` and its IPv6 table."""
    for suffix in ("", "6"):
        with contextlib.suppress(FileNotFoundError):
            for line in (directory / f"{protocol}{suffix}").read_text().splitlines()[1:]:
                yield line.split()


def _endpoint(text: str) -> str:
    """An address:port of /proc/net/tcp (the address in 32-bit words of the host's byte order), as people write
    it."""
    address, port = text.split(":")
    order = -1 if sys.byteorder == "little" else 1
    raw = b"".join(bytes.fromhex(address[i : i + 8])[::order] for i in range(0, len(address), 8))
    shown = ipaddress.ip_address(raw)
    return f"{shown}:{int(port, 16)}" if shown.version == 4 else f"[{shown}]:{int(port, 16)}"
