"""Owns SysV message queues and semaphore sets of jobs in the host's IPC namespace: find, save, recreate, remove.

The job uses a queue when its last sender or last receiver (lspid, lrpid in
/proc/sysvipc/msg) is one of the job's processes, a semaphore set when the last
process that changed one of its semaphores (semctl GETPID) is. The kernel keeps
no creator PID for either (only shared memory has cpid), so a used object counts
as the job's own when every last-operation PID it has is the job's and it was made
(ctime) no earlier than the job's oldest process started; any other the job uses
may be shared with the host, and the job is refused.
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kerrickpt import procs
from kerrickpt.errors import ArchiveCorruptError

IPC_CREAT, IPC_EXCL, IPC_NOWAIT, IPC_RMID = 0o1000, 0o2000, 0o4000, 0
MSG_COPY = 0o40000
GETPID, GETALL, SETALL = 11, 13, 17
ENOMSG = 42
SYSVIPC = Path("/proc/sysvipc")
KERNEL = Path("/proc/sys/kernel")
# Per-IPC-namespace limits: a fresh namespace starts with the defaults, not the host's tuning.
LIMITS = ("msgmax", "msgmnb", "msgmni", "sem")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
_libc.msgrcv.restype = ctypes.c_ssize_t
_libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


@dataclass
class Queue:
    key: int
    id: int
    mode: int
    messages: list[tuple[int, bytes]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["messages"] = [[kind, base64.b64encode(text).decode()] for kind, text in self.messages]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Queue:
        messages = [(int(kind), base64.b64decode(text)) for kind, text in data["messages"]]
        return cls(key=int(data["key"]), id=int(data["id"]), mode=int(data["mode"]), messages=messages)


@dataclass
class Semaphores:
    key: int
    id: int
    mode: int
    values: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Semaphores:
        values = [int(v) for v in data["values"]]
        return cls(key=int(data["key"]), id=int(data["id"]), mode=int(data["mode"]), values=values)


@dataclass
class JobIpc:
    """The SysV objects a job uses, with their contents, and the host's limits they were made under."""

    queues: list[Queue] = field(default_factory=list)
    semaphores: list[Semaphores] = field(default_factory=list)
    limits: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": [q.to_dict() for q in self.queues],
            "semaphores": [s.to_dict() for s in self.semaphores],
            "limits": self.limits,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobIpc:
        limits = dict(data.get("limits", {}))
        check_limits(limits)
        return cls(
            [Queue.from_dict(q) for q in data.get("queues", [])],
            [Semaphores.from_dict(s) for s in data.get("semaphores", [])],
            limits,
        )


def check_limits(limits: dict[str, Any]) -> None:
    """Names and values come from an archive and go to /proc/sys: only LIMITS, only numbers."""
    for name, value in limits.items():
        if name not in LIMITS or not isinstance(value, str) or not re.fullmatch(r"[0-9]+([ \t]+[0-9]+)*", value):
            raise ArchiveCorruptError(f"refusing IPC limit {name}={value!r} from the archive")


def table(kind: str) -> list[dict[str, int]]:
    """/proc/sysvipc/{msg,sem,shm} as rows of numbers keyed by the header's names."""
    lines = (SYSVIPC / kind).read_text().splitlines()
    header = lines[0].split()
    rows = []
    for line in lines[1:]:
        if line.strip():
            # The kernel prints perms in octal (%4o), everything else in decimal.
            values = (int(v, 8) if name == "perms" else int(v) for name, v in zip(header, line.split(), strict=False))
            rows.append(dict(zip(header, values, strict=False)))
    return rows


def shared_memory_of(pids: Iterable[int]) -> list[str]:
    """SysV shared memory the job created, last used or has attached: CRIU cannot carry it from the host."""
    job = set(pids)
    found = [f"segment key {row['key']} id {row['shmid']}" for row in table("shm") if {row["cpid"], row["lpid"]} & job]
    for pid in job:
        try:
            maps = (Path("/proc") / str(pid) / "maps").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "/SYSV" in maps:
            found.append(f"a segment attached by process {pid}")
    return found


def _semaphore_pids(semid: int, count: int) -> set[int]:
    return {_libc.semctl(semid, i, GETPID) for i in range(count)}


@dataclass(frozen=True)
class Use:
    """A queue or semaphore set the job used last, and whether it counts as the job's own."""

    kind: str  # "msg" or "sem", as /proc/sysvipc names them
    row: dict[str, int]
    own: bool

    def __str__(self) -> str:
        what = "queue" if self.kind == "msg" else "semaphore set"
        return f"{what} key {self.row['key']} id {self.row['msqid' if self.kind == 'msg' else 'semid']}"


def _started(pids: set[int]) -> int:
    """When the job's oldest process started, in whole seconds since the epoch, never later than it did.

    /proc/stat's btime is whole seconds, rounded down: so is this, like the objects' ctime.
    """
    lines = Path("/proc/stat").read_text().splitlines()
    btime = next(int(line.split()[1]) for line in lines if line.startswith("btime "))
    ticks = min((t for t in map(procs.start_time, pids) if t is not None), default=0)
    return btime + ticks // os.sysconf("SC_CLK_TCK")


def uses(pids: Iterable[int]) -> list[Use]:
    """The queues and semaphore sets the job used last, each judged its own or maybe shared."""
    job = set(pids)
    started = _started(job)
    found = []
    for row in table("msg"):
        last = {row["lspid"], row["lrpid"]} - {0}
        if last & job:
            found.append(Use("msg", row, last <= job and row["ctime"] >= started))
    for row in table("sem"):
        last = _semaphore_pids(row["semid"], row["nsems"]) - {0}
        if last & job:
            found.append(Use("sem", row, last <= job and row["ctime"] >= started))
    return found


def save(pids: Iterable[int]) -> JobIpc:
    """The job's own queues (messages read with MSG_COPY, left in place) and semaphore sets; call it frozen."""
    msgmax = int((KERNEL / "msgmax").read_text())
    queues: list[Queue] = []
    semaphores: list[Semaphores] = []
    for use in (u for u in uses(pids) if u.own):
        row = use.row
        if use.kind == "msg":
            queues.append(Queue(row["key"], row["msqid"], row["perms"], _peek(row["msqid"], msgmax)))
        else:
            values = (ctypes.c_ushort * row["nsems"])()
            _check(_libc.semctl(row["semid"], 0, GETALL, ctypes.byref(values)), "semctl GETALL")
            semaphores.append(Semaphores(row["key"], row["semid"], row["perms"], list(values)))
    limits = {name: (KERNEL / name).read_text().strip() for name in LIMITS}
    return JobIpc(queues, semaphores, limits)


def _peek(msqid: int, msgmax: int) -> list[tuple[int, bytes]]:
    buffer = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + msgmax)
    messages = []
    index = 0
    while True:
        size = _libc.msgrcv(msqid, buffer, msgmax, index, IPC_NOWAIT | MSG_COPY)
        if size < 0:
            if ctypes.get_errno() == ENOMSG:
                return messages
            _check(-1, "msgrcv MSG_COPY")
        kind = ctypes.c_long.from_buffer(buffer).value
        messages.append((kind, buffer.raw[ctypes.sizeof(ctypes.c_long) : ctypes.sizeof(ctypes.c_long) + size]))
        index += 1


def recreate(ipc: JobIpc) -> None:
    """Make the objects, with their keys, ids and contents, in this process's (fresh) IPC namespace."""
    check_limits(ipc.limits)
    for name, value in ipc.limits.items():
        (KERNEL / name).write_text(value)
    for queue in ipc.queues:
        (KERNEL / "msg_next_id").write_text(str(queue.id))
        made = _check(_libc.msgget(queue.key, IPC_CREAT | IPC_EXCL | (queue.mode & 0o777)), "msgget")
        if made != queue.id:
            raise OSError(f"queue key {queue.key} came back as id {made}, not {queue.id}")
        for kind, text in queue.messages:
            buffer = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + len(text))
            ctypes.c_long.from_buffer(buffer).value = kind
            ctypes.memmove(ctypes.addressof(buffer) + ctypes.sizeof(ctypes.c_long), text, len(text))
            _check(_libc.msgsnd(made, buffer, len(text), IPC_NOWAIT), "msgsnd")
    for sems in ipc.semaphores:
        (KERNEL / "sem_next_id").write_text(str(sems.id))
        made = _check(_libc.semget(sems.key, len(sems.values), IPC_CREAT | IPC_EXCL | (sems.mode & 0o777)), "semget")
        if made != sems.id:
            raise OSError(f"semaphore set key {sems.key} came back as id {made}, not {sems.id}")
        values = (ctypes.c_ushort * len(sems.values))(*sems.values)
        _check(_libc.semctl(made, 0, SETALL, ctypes.byref(values)), "semctl SETALL")


def remove(ipc: JobIpc) -> None:
    """Remove the objects from this IPC namespace (the host's, once the job is archived and ended)."""
    for queue in ipc.queues:
        _libc.msgctl(queue.id, IPC_RMID, None)
    for sems in ipc.semaphores:
        _libc.semctl(sems.id, 0, IPC_RMID)
