"""Owns the time limits an operator (or a test) may set in the environment: read when they apply, not at import."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from kerrickpt.errors import UsageError


@dataclass(frozen=True)
class Limit:
    """A number of seconds, `default` unless the environment variable `env` sets it."""

    env: str
    default: float

    def seconds(self) -> float:
        text = os.environ.get(self.env, "").strip()
        if not text:
            return self.default
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{self.env}={text!r}: give a positive number of seconds (default {self.default:g})")
        return value


# CRIU's dump: in all for the RPC dump; a streamed dump goes at the archive's pace, so it may go
# on as long as its images keep coming, and this is how long it may send none.
DUMP = Limit("KERRICKPT_DUMP_TIMEOUT", 600.0)
# CRIU's restore; a streamed restore adds a second for every feeder.READ_FLOOR bytes of archive.
RESTORE = Limit("KERRICKPT_RESTORE_TIMEOUT", 600.0)
# For CRIU to let go of the tree once its image stream has ended or broken, before it is stopped.
LET_GO = Limit("KERRICKPT_CRIU_LET_GO", 60.0)
# Between SIGTERM and SIGKILL, for a program stopped at its time limit.
STOP_GRACE = Limit("KERRICKPT_STOP_GRACE", 5.0)
# A migration's target that takes no byte for this long is given up: the container is frozen meanwhile.
SEND_STALL = Limit("KERRICKPT_SEND_STALL", 60.0)
# A source may legitimately send nothing for a while (freezing, CRIU collecting the tree, fsyncing
# its copy before the END frame); a receiver waits this long before it takes the link for dead.
RECEIVE_STALL = Limit("KERRICKPT_RECEIVE_STALL", 600.0)
