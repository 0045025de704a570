"""Owns retention: which snapshots the --keep-* rules keep, which they remove, and why, in words."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, tzinfo
from typing import Generic, Protocol, TypeVar

from kerrickpt.errors import UsageError


class Dated(Protocol):
    """What retention needs to know of a snapshot."""

    @property
    def time(self) -> datetime: ...

    @property
    def verified(self) -> bool: ...

    @property
    def corrupt(self) -> bool: ...


T = TypeVar("T", bound=Dated)

# Each period rule keeps the newest snapshot of each of the N most recent periods that
# have one, in local time (as operators count days). The offset is part of the hour so
# that the repeated hour when summer time ends counts as two hours.
PERIODS: dict[str, tuple[str, Callable[[datetime], Hashable]]] = {
    "hourly": ("hour", lambda t: (t.date(), t.hour, t.utcoffset())),
    "daily": ("day", lambda t: t.date()),
    "weekly": ("week", lambda t: t.isocalendar()[:2]),
}
NEWEST_GOOD = "newest verified snapshot"
FUTURE = "newer than now (has the clock gone back?)"
CORRUPT = "corrupt (verify failed)"
UNCLAIMED = "no rule keeps it"


@dataclass(frozen=True)
class Decision(Generic[T]):
    """One snapshot, whether it stays, and the rules that keep it (or why it goes)."""

    item: T
    keep: bool
    reasons: tuple[str, ...]

    def explain(self) -> str:
        return ("kept: " if self.keep else "removed: ") + ", ".join(self.reasons)


@dataclass(frozen=True)
class Plan(Generic[T]):
    """The outcome of thinning, newest snapshot first."""

    decisions: tuple[Decision[T], ...]

    @property
    def kept(self) -> list[T]:
        return [d.item for d in self.decisions if d.keep]

    @property
    def removed(self) -> list[T]:
        return [d.item for d in self.decisions if not d.keep]


@dataclass(frozen=True)
class Policy:
    """The --keep-* rules; a rule of 0 is off, and no rule at all keeps everything.

    Rules are independent: a snapshot stays if any rule keeps it. On top of the rules,
    the newest verified snapshot always stays, and so does one dated in the future.
    Known-corrupt snapshots are removed and never count for a rule.
    """

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0

    def __post_init__(self) -> None:
        for rule in fields(self):
            if getattr(self, rule.name) < 0:
                raise UsageError(f"--keep-{rule.name} must be 0 or more, not {getattr(self, rule.name)}")

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, rule.name) for rule in fields(self))

    def to_dict(self) -> dict[str, int]:
        return {rule.name: getattr(self, rule.name) for rule in fields(self)}

    def describe(self) -> list[str]:
        """The rules in words, one sentence each."""
        if self.is_empty:
            return ["keep every snapshot (no --keep-* rule given)"]
        words = []
        if self.last:
            words.append("keep the newest snapshot" if self.last == 1 else f"keep the {self.last} newest snapshots")
        for rule, (unit, _) in PERIODS.items():
            count = getattr(self, rule)
            if count == 1:
                words.append(f"keep the newest snapshot of the most recent {unit} that has one")
            elif count:
                words.append(f"keep the newest snapshot of each of the {count} most recent {unit}s that have one")
        words.append(f"always keep the {NEWEST_GOOD}")
        return words

    def thin(self, items: Sequence[T], now: datetime, tz: tzinfo | None = None) -> Plan[T]:
        """Decide for each item; `now` must be timezone-aware, `tz` (default: local) sets the periods."""
        ordered = sorted(items, key=lambda item: item.time, reverse=True)
        if self.is_empty:
            return Plan(tuple(Decision(item, True, ("no retention rule",)) for item in ordered))
        reasons: dict[int, list[str]] = {id(item): [] for item in ordered}
        future = [item for item in ordered if item.time > now and not item.corrupt]
        for item in future:
            reasons[id(item)].append(FUTURE)
        counted = [item for item in ordered if item.time <= now and not item.corrupt]
        for number, item in enumerate(counted[: self.last], 1):
            reasons[id(item)].append(f"last #{number}")
        for rule, (_, period_of) in PERIODS.items():
            for number, item in enumerate(_newest_per_period(counted, period_of, tz, getattr(self, rule)), 1):
                reasons[id(item)].append(f"{rule} #{number}")
        good = next((item for item in ordered if item.verified and not item.corrupt), None)
        if good is not None and not reasons[id(good)]:
            reasons[id(good)].append(NEWEST_GOOD)
        decisions = []
        for item in ordered:
            why = tuple(reasons[id(item)])
            gone = (CORRUPT,) if item.corrupt else (UNCLAIMED,)
            decisions.append(Decision(item, bool(why), why or gone))
        return Plan(tuple(decisions))


def _newest_per_period(
    newest_first: list[T], period_of: Callable[[datetime], Hashable], tz: tzinfo | None, count: int
) -> list[T]:
    chosen: list[T] = []
    seen: set[Hashable] = set()
    for item in newest_first:
        if len(chosen) == count:
            break
        period = period_of(item.time.astimezone(tz))
        if period not in seen:
            seen.add(period)
            chosen.append(item)
    return chosen


def keep_bases(plan: Plan[T], base_of: Callable[[T], T | None], label: Callable[[T], str]) -> Plan[T]:
    """`plan`, keeping also what a kept item builds on (a snapshot that carries only what changed is of no use
    without its base), with the reason "base of ID". A corrupt base is not kept: it is of no use either."""
    reasons = {id(d.item): list(d.reasons) if d.keep else [] for d in plan.decisions}
    for decision in plan.decisions:  # newest first, and a base is older than what builds on it
        base = base_of(decision.item) if reasons[id(decision.item)] else None
        if base is not None and id(base) in reasons and not base.corrupt:
            reasons[id(base)].append(f"base of {label(decision.item)}")
    return Plan(
        tuple(Decision(d.item, True, tuple(reasons[id(d.item)])) if reasons[id(d.item)] else d for d in plan.decisions)
    )
