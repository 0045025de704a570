"""Owns fault injection for tests: $KERRICKPT_FAULT names points where this process fails on purpose."""

from __future__ import annotations

import os
import signal

from kerrickpt.errors import KerrickptError

ENV = "KERRICKPT_FAULT"


class InjectedFault(KerrickptError):
    """A failure injected through $KERRICKPT_FAULT."""


def _actions(point: str) -> list[str]:
    entries = (e.strip().partition(":") for e in os.environ.get(ENV, "").split(","))
    return [action for name, _, action in entries if name == point]


def is_set(point: str) -> bool:
    """Whether $KERRICKPT_FAULT names `point`, for faults the caller acts out itself."""
    return bool(_actions(point))


def inject(point: str) -> None:
    """Fail here if $KERRICKPT_FAULT lists `point:kill`, `point:exit` or `point:fail` (comma-separated).

    kill: SIGKILL this process, as a crash would; exit: leave at once without cleaning
    up, as a dropped connection looks to the peer; fail: raise InjectedFault.
    """
    for action in _actions(point):
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "exit":
            os._exit(70)
        raise InjectedFault(f"fault injected at {point}")
