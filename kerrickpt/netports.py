"""Owns published ports (`--publish HOSTPORT:PORT[/tcp|udp]`): parsing them, and which node ports programs of
this node hold already (/proc/net)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerrickpt.errors import UsageError

PROTOCOLS = ("tcp", "udp")
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
    ports: set[int] = set()
    for suffix in ("", "6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/net/{protocol}{suffix}").read_text().splitlines()[1:]:
                fields = line.split()
                if protocol == "udp" or fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
