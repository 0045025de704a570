"""Owns fault injection for tests: in test mode, $KERRICKPT_FAULT names points where this process fails."""

from __future__ import annotations

import os
import signal
import sys

from kerrickpt import testmode
from kerrickpt.errors import KerrickptError

ENV = "KERRICKPT_FAULT"


class InjectedFault(KerrickptError):
    """A failure injected through $KERRICKPT_FAULT."""


def _actions(point: str) -> list[str]:
    entries = (e.strip().partition(":") for e in testmode.hook(ENV).split(","))
    return [action for name, _, action in entries if name == point]


def is_set(point: str) -> bool:
    """Whether $KERRICKPT_FAULT names `point`, for faults the caller acts out itself."""
    return bool(_actions(point))


def inject(point: str) -> None:
    """Fail here if $KERRICKPT_FAULT lists `point:kill`, `point:exit`, `point:fail` or `point:pause`.

    kill: SIGKILL this process, as a crash would; exit: leave at once without cleaning
    up, as a dropped connection looks to the peer; fail: raise InjectedFault; pause: stop
    with SIGSTOP, so that a test can look around, then kill it or let it go on (SIGCONT).
    """
    for action in _actions(point):
        if action == "pause":
            print(f"kerrickpt: fault injection: pid {os.getpid()} stops at {point}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "exit":
            os._exit(70)
        raise InjectedFault(f"fault injected at {point}")
