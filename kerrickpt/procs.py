"""Owns reading processes from /proc: PIDs in and out of namespaces, parents, command lines."""

from __future__ import annotations

import os
import stat
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
    sid: int = 0
    tids: tuple[int, ...] = ()

    def __str__(self) -> str:
        """Its PID and command line, shortened, for a message."""
        return f"{self.host_pid} ({' '.join(self.cmdline)[:80] or '?'})"

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["cmdline"] = list(self.cmdline)
        data["tids"] = list(self.tids)
        return data


def read(pid: int) -> Process:
    """One process; raises FileNotFoundError/ProcessLookupError if it is gone."""
    fields: dict[str, str] = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    raw = (PROC / str(pid) / "cmdline").read_bytes()
    stat_fields = _after_comm((PROC / str(pid) / "stat").read_text())
    return Process(
        host_pid=pid,
        ns_pid=int(fields["NSpid"].split()[-1]),
        host_ppid=int(fields["PPid"]),
        cmdline=tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part),
        threads=int(fields["Threads"]),
        uid=int(fields["Uid"].split()[0]),
        sid=int(stat_fields[3]),
        tids=tuple(sorted(int(t.name) for t in (PROC / str(pid) / "task").iterdir())),
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


def tree(processes: Iterable[Process], root: int) -> list[Process]:
    """`root` and its descendants among `processes`, in their order."""
    procs = list(processes)
    members = {root}
    grew = True
    while grew:
        before = len(members)
        members |= {p.host_pid for p in procs if p.host_ppid in members}
        grew = len(members) > before
    return [p for p in procs if p.host_pid in members]


def rss(pid: int) -> int:
    """Resident memory of a process in bytes (0 if it is gone)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def state(pid: int) -> str | None:
    """The process's state letter (R, S, D, Z, ...); None if it is gone."""
    after_comm = _stat(pid)
    return after_comm[0] if after_comm else None


def wchan(pid: int) -> str:
    """The kernel function the process sleeps in ("0" where this caller may not know); empty if it is gone."""
    try:
        return (PROC / str(pid) / "wchan").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, which tells a reused PID apart; None if gone."""
    after_comm = _stat(pid)
    if not after_comm or after_comm[0] == "Z":
        return None
    return int(after_comm[19])


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after its command name (which may hold spaces); empty if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return _after_comm(text)


def _after_comm(text: str) -> list[str]:
    return text.rsplit(")", 1)[1].split()


def is_alive(pid: int, started: int) -> bool:
    return start_time(pid) == started


def open_files(pids: Iterable[int], exclude: Iterable[str] = ()) -> dict[str, int]:
    """Regular files the processes have open, mapped or run, with their sizes: what a restore needs to find."""
    skip = set(exclude)
    found: dict[str, int] = {}

    def note(path: str, stat_path: str) -> None:
        if not path.startswith("/") or path.endswith(" (deleted)") or path in skip or path in found:
            return
        try:
            st = os.stat(stat_path)
        except OSError:
            return
        if stat.S_ISREG(st.st_mode):
            found[path] = st.st_size

    for pid in pids:
        base = PROC / str(pid)
        try:
            note(os.readlink(base / "exe"), str(base / "exe"))
            for fd in (base / "fd").iterdir():
                note(os.readlink(fd), str(fd))
            for line in (base / "maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    note(parts[5], parts[5])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return dict(sorted(found.items()))


def shares_namespace(pid: int, kind: str) -> bool:
    """Whether `pid` is in the same `kind` namespace (pid, ipc, ...) as this process."""
    return os.readlink(PROC / str(pid) / "ns" / kind) == os.readlink(PROC / "self" / "ns" / kind)


def stdout_file(pid: int) -> str | None:
    """The regular file a process writes its standard output to, if it is one."""
    try:
        target = os.readlink(PROC / str(pid) / "fd" / "1")
        is_file = stat.S_ISREG(os.stat(PROC / str(pid) / "fd" / "1").st_mode)
    except OSError:
        return None
    return target if is_file and target.startswith("/") and not target.endswith(" (deleted)") else None


def is_free(pid: int) -> bool:
    """No process or thread of this PID namespace has this number."""
    return not (PROC / str(pid)).exists()
