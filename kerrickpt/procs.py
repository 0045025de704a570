"""Owns reading processes from /proc: PIDs in and out of namespaces, parents, command lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    host_pid: int
    ns_pid: int
    host_ppid: int
    cmdline: tuple[str, ...]
    threads: int
    uid: int

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["cmdline"] = list(self.cmdline)
        return data


def read(pid: int) -> Process:
    """One process; raises FileNotFoundError/ProcessLookupError if it is gone."""
    fields: dict[str, str] = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    raw = (PROC / str(pid) / "cmdline").read_bytes()
    return Process(
        host_pid=pid,
        ns_pid=int(fields["NSpid"].split()[-1]),
        host_ppid=int(fields["PPid"]),
        cmdline=tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part),
        threads=int(fields["Threads"]),
        uid=int(fields["Uid"].split()[0]),
    )


def read_all(pids: Iterable[int]) -> list[Process]:
    """The processes still alive among `pids`, ordered by their PID inside the namespace."""
    found = []
    for pid in pids:
        try:
            found.append(read(pid))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(found, key=lambda p: p.ns_pid)


def roots(processes: Iterable[Process]) -> list[Process]:
    """The processes whose parent is not among them: a single tree has exactly one."""
    procs = list(processes)
    pids = {p.host_pid for p in procs}
    return [p for p in procs if p.host_ppid not in pids]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, which tells a reused PID apart; None if gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    after_comm = stat.rsplit(")", 1)[1].split()
    if after_comm[0] == "Z":
        return None
    return int(after_comm[19])


def is_alive(pid: int, started: int) -> bool:
    return start_time(pid) == started
