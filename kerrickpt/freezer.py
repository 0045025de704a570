"""Owns freezing and thawing a cgroup, through cgroup v2 `cgroup.freeze` or the v1 freezer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kerrickpt import vfork
from kerrickpt.errors import KerrickptError

FREEZE_TIMEOUT = 30.0
POLL_INTERVAL = 0.005
V1_REQUEST_AGAIN = 0.1  # s
VFORK_ATTEMPTS = 20  # freezes that may each catch a task mid-vfork, before giving up
VFORK_WAIT = 1.0  # s: how long a thawed vfork gets to end (its child to exec or exit) before the next freeze


class FreezeTimeout(KerrickptError):
    """The cgroup did not reach the frozen state in time."""


class VforkTimeout(FreezeTimeout):
    """Every freeze caught a task in vfork, which ptrace (so CRIU) cannot seize; the cgroup was thawed."""


class Freezer:
    """Freezes one cgroup directory; v1 or v2 is chosen by the control file it has."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if (path / "cgroup.freeze").exists():
            self.version = 2
        elif (path / "freezer.state").exists():
            self.version = 1
        else:
            raise KerrickptError(f"{path} has neither cgroup.freeze nor freezer.state: it cannot be frozen")

    def is_frozen(self) -> bool:
        if self.version == 2:
            return "frozen 1" in (self.path / "cgroup.events").read_text().splitlines()
        return (self.path / "freezer.state").read_text().strip() == "FROZEN"

    def freeze(self, timeout: float | None = None, *, thaw_on_timeout: bool = True) -> None:
        """Freeze and wait until every task in the cgroup is frozen (FREEZE_TIMEOUT by default).

        On a timeout the cgroup is thawed again, unless `thaw_on_timeout` is false: then the
        freeze stays requested, and a task that could not stop yet (one in uninterruptible
        sleep) stops before it runs any code of its own again.
        """
        timeout = FREEZE_TIMEOUT if timeout is None else timeout
        self._write(frozen=True)
        started = time.monotonic()
        deadline = started + timeout
        while not self.is_frozen():
            if self.version == 1 and time.monotonic() - started > V1_REQUEST_AGAIN:
                # The v1 freezer looks at each task once, when asked: one that went to sleep freezable after that
                # (a parent entering vfork) is never counted frozen until it is asked again.
                self._write(frozen=True)
                started = time.monotonic()
            if time.monotonic() > deadline:
                if not thaw_on_timeout:
                    raise FreezeTimeout(
                        f"{self.path} did not freeze within {timeout:.0f} s; the freeze stays requested, "
                        "so none of its tasks runs again"
                    )
                self.thaw()
                raise FreezeTimeout(f"{self.path} did not freeze within {timeout:.0f} s; it was thawed again")
            time.sleep(POLL_INTERVAL)

    def freeze_for_ptrace(self, attempts: int = VFORK_ATTEMPTS) -> float:
        """Freeze with no task caught in vfork, so that ptrace can seize every one (CRIU dumps through it); return
        the time.monotonic() at which the freeze that held was asked for (the thawed retries are no downtime).

        A parent in vfork sleeps uninterruptibly until its child execs or exits, and the kernel counts it frozen.
        ptrace cannot stop it, and once its child is stopped too it never wakes: CRIU's seize fails ("Unseizable
        non-zombie ... state D"). So such a freeze is undone, the vfork waited out, and the freeze done again, up
        to `attempts` times; then VforkTimeout names the task, the cgroup thawed. Without a vfork, one freeze.
        Whatever fails, the cgroup is thawed again.
        """
        if attempts < 1:
            raise ValueError(f"a freeze takes at least one attempt, not {attempts}")
        for _ in range(attempts):
            asked = time.monotonic()
            self.freeze()
            try:
                caught = vfork.caught(self._members())
            except BaseException:
                self.thaw()  # a frozen container must not outlive a failed look at it
                raise
            if not caught:
                return asked
            self.thaw()
            vfork.wait_out(caught, VFORK_WAIT)
        raise VforkTimeout(
            f"{self.path}: {caught[0]} at each of {attempts} freezes; ptrace cannot seize a task mid-vfork, so "
            "CRIU could not dump it. It was thawed again"
        )

    def thaw(self) -> None:
        self._write(frozen=False)

    def request(self, *, frozen: bool) -> None:
        """Ask for the state without waiting for it (a killer freezing what it is about to end)."""
        self._write(frozen=frozen)

    def control(self, *, frozen: bool) -> tuple[Path, str]:
        """The control file, and what to write into it to freeze (or thaw) the cgroup."""
        if self.version == 2:
            return self.path / "cgroup.freeze", "1" if frozen else "0"
        return self.path / "freezer.state", "FROZEN" if frozen else "THAWED"

    def _write(self, *, frozen: bool) -> None:
        control, value = self.control(frozen=frozen)
        control.write_text(value)

    def _members(self) -> list[int]:
        """Every process this freezer freezes: those of its cgroup and of the cgroups below it."""
        return [int(pid) for procs in self.path.rglob("cgroup.procs") for pid in procs.read_text().split()]


@contextmanager
def frozen(freezer: Freezer) -> Iterator[float]:
    """Freeze for the block, ready for ptrace (see Freezer.freeze_for_ptrace), giving it the time.monotonic() of
    the freeze that held; thaw again if the block raises (the caller thaws or kills on success), unless what it
    raised says the processes must stay frozen (errors.ContainerDamaged)."""
    frozen_at = freezer.freeze_for_ptrace()
    try:
        yield frozen_at
    except BaseException as exc:
        if not getattr(exc, "keeps_frozen", False):
            freezer.thaw()
        raise
