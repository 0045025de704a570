"""Owns fault injection for tests: KERRICKPT_FAULT=pause:PHASE stops the process at PHASE, as CRIU_FAULT does."""

from __future__ import annotations

import os
import signal
import sys

ENV = "KERRICKPT_FAULT"


def point(phase: str) -> None:
    """Stop this process here with SIGSTOP when $KERRICKPT_FAULT is pause:PHASE; SIGCONT goes on."""
    if os.environ.get(ENV) == f"pause:{phase}":
        print(f"kerrickpt: fault injection: pid {os.getpid()} stops at {phase}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
