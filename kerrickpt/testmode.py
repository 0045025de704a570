"""Owns test mode: whether the test hooks ($KERRICKPT_FAULT, $KERRICKPT_TEST_FINGERPRINT) may act.

Test mode is on only when $KERRICKPT_TEST_MODE names, by absolute path, a regular file owned by
root (or this process's user) that nobody else may write and that holds MARKER: an operator's
environment does not enter it by accident, and an ordinary user cannot enter it for root.
"""

from __future__ import annotations

import os
import stat
import sys
from functools import cache
from pathlib import Path

ENV = "KERRICKPT_TEST_MODE"
MARKER = "kerrickpt test mode: fault injection and fingerprint overrides act in this process\n"
HOOKS = ("KERRICKPT_FAULT", "KERRICKPT_TEST_FINGERPRINT")


@cache
def _active(path: str) -> bool:
    if not os.path.isabs(path):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return False
        return os.read(fd, len(MARKER) + 1) == MARKER.encode()
    finally:
        os.close(fd)


def active() -> bool:
    """Whether this process runs in test mode."""
    return _active(os.environ.get(ENV, ""))


def hook(name: str) -> str:
    """The test hook `name`'s value in test mode; outside it, "" (with a warning if it was set)."""
    value = os.environ.get(name, "")
    if value and not active():
        _warn(name)
        return ""
    return value


@cache
def _warn(name: str) -> None:
    print(f"kerrickpt: ignoring ${name}: test hooks act only in test mode (README: Testing)", file=sys.stderr)


def write_marker(path: Path) -> dict[str, str]:
    """Write the marker file at `path` (this user's, mode 0644); returns the environment that enters test mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as file:
        file.write(MARKER)
    return {ENV: str(path.absolute())}
