"""Owns finding processes caught mid-vfork: a child still sharing its parent's memory, before it execs or exits."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass

from kerrickpt import procs
from kerrickpt.errors import HostError

KCMP_VM = 1
# kcmp(2) has no libc wrapper: its number on the architectures CRIU runs on (it needs kcmp itself).
SYS_KCMP = {"x86_64": 312, "aarch64": 272, "riscv64": 272, "loongarch64": 272, "ppc64le": 354, "s390x": 343}
# s: a vfork lasts microseconds to milliseconds; frozen again soon after, its shell is not yet in the next one.
POLL_INTERVAL = 0.001

_libc = ctypes.CDLL(None, use_errno=True)
# Variadic: without its types, ctypes would pass each argument as an int and read the result as one.
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long] * 6


@dataclass(frozen=True)
class Vfork:
    """A parent asleep in vfork (uninterruptibly, state D) until its child execs or exits."""

    parent: procs.Process
    child: procs.Process

    def is_ongoing(self) -> bool:
        return _same_memory(self.child.host_pid, self.parent.host_pid)

    def __str__(self) -> str:
        return f"process {self.parent} waits in vfork for its child {self.child.host_pid} to exec or exit"


def caught(pids: Iterable[int]) -> list[Vfork]:
    """The vforks among `pids` (parent and child both in it) whose child has not exec'd or exited yet: the parent
    asleep in vfork, sharing its memory with the child. (A child of clone(CLONE_VM) without CLONE_VFORK shares it
    too, but its parent runs on, and ptrace seizes both.)"""
    processes = {p.host_pid: p for p in procs.read_all(pids)}
    return [
        Vfork(processes[p.host_ppid], p)
        for p in processes.values()
        if p.host_ppid in processes and _may_be_in_vfork(p.host_ppid) and _same_memory(p.host_pid, p.host_ppid)
    ]


def wait_out(vforks: Iterable[Vfork], timeout: float) -> None:
    """Wait until every one of `vforks` is over (its child exec'd or exited), or `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while any(v.is_ongoing() for v in vforks) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)


def _may_be_in_vfork(pid: int) -> bool:
    """Whether the process sleeps uninterruptibly (state D) where it was, as a parent in vfork does, frozen or not.
    The v1 freezer shows each task it stopped as D, but one that was running, or asleep interruptibly, sleeps in
    __refrigerator, where no parent in vfork goes: that one is frozen in place."""
    return procs.state(pid) == "D" and procs.wchan(pid) != "__refrigerator"


def _same_memory(pid: int, other: int) -> bool:
    """Whether two processes share one address space (kcmp KCMP_VM); False once either is gone."""
    number = SYS_KCMP.get(platform.machine())
    if number is None:
        return False  # this kernel's kcmp is unknown: no vfork is told apart, as before
    result = _libc.syscall(number, pid, other, KCMP_VM, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            return False
        # Refused (EPERM: a caller without ptrace rights over them) or worse: no vfork can be told apart, and a
        # freeze that goes on might leave one frozen, which CRIU cannot seize.
        raise HostError(
            f"could not tell whether process {pid} waits in vfork for {other}: kcmp failed: {os.strerror(err)}"
        )
    return result == 0
