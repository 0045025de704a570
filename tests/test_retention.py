"""Retention keeps exactly what the rules say, over weeks of synthetic timestamps, with `now` passed in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from kerrickpt.errors import UsageError
from kerrickpt.retention import CORRUPT, FUTURE, NEWEST_GOOD, UNCLAIMED, Plan, Policy, keep_bases

MONDAY = datetime(2025, 1, 6, tzinfo=UTC)  # the first day of ISO week 2


@dataclass(frozen=True, eq=False)
class Snap:
    time: datetime
    verified: bool = True
    corrupt: bool = False


def hourly(start: datetime, hours: int) -> list[Snap]:
    return [Snap(start + timedelta(hours=h)) for h in range(hours)]


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """Day 0 is Monday 6 January 2025; times are UTC."""
    return MONDAY + timedelta(days=day, hours=hour, minutes=minute)


def kept(plan: Plan[Snap]) -> list[datetime]:
    return sorted(s.time for s in plan.kept)


def reasons(plan: Plan[Snap]) -> dict[datetime, tuple[str, ...]]:
    return {d.item.time: d.reasons for d in plan.decisions}


def test_five_weeks_of_hourly_snapshots() -> None:
    items = hourly(MONDAY, 35 * 24)  # Monday 6 January 00:00 to Sunday 9 February 23:00
    now = items[-1].time + timedelta(minutes=30)

    plan = Policy(last=3, hourly=6, daily=7, weekly=4).thin(items, now, tz=UTC)

    last_day = 34
    expected = [at(last_day, h) for h in range(18, 24)]  # hourly 6 (and last 3)
    expected += [at(day, 23) for day in range(last_day - 6, last_day)]  # daily 7
    expected += [at(day, 23) for day in (13, 20, 27)]  # weekly 4: the Sundays ending weeks 3, 4, 5
    assert kept(plan) == sorted(expected)
    why = reasons(plan)
    assert why[at(34, 23)] == ("last #1", "hourly #1", "daily #1", "weekly #1")
    assert why[at(34, 21)] == ("last #3", "hourly #3")
    assert why[at(34, 18)] == ("hourly #6",)
    assert why[at(28, 23)] == ("daily #7",)
    assert why[at(27, 23)] == ("weekly #2",)
    assert why[at(13, 23)] == ("weekly #4",)
    assert why[at(12, 23)] == why[at(34, 17)] == (UNCLAIMED,)
    assert len(plan.removed) == len(items) - len(expected)
    assert [d.item.time for d in plan.decisions] == sorted((s.time for s in items), reverse=True)


def test_pruning_after_every_run_keeps_what_one_prune_at_the_end_would() -> None:
    policy = Policy(last=2, hourly=12, daily=5, weekly=3)
    history = hourly(MONDAY + timedelta(minutes=17), 6 * 7 * 24)
    store: list[Snap] = []
    for snap in history:  # cron: snapshot, then prune
        store = policy.thin([*store, snap], snap.time, tz=UTC).kept

    at_end = policy.thin(history, history[-1].time, tz=UTC)
    assert sorted(s.time for s in store) == kept(at_end)
    again = policy.thin(store, history[-1].time, tz=UTC)
    assert again.removed == [], "thinning what was kept removes nothing more"


def test_periods_without_snapshots_do_not_count() -> None:
    days = [0, 1, 2, 13, 14]  # a holiday with the job stopped from day 3 to 12
    items = [Snap(at(day, h)) for day in days for h in (9, 17)]

    plan = Policy(daily=3, weekly=2).thin(items, at(14, 18), tz=UTC)

    assert kept(plan) == [at(2, 17), at(13, 17), at(14, 17)]
    assert reasons(plan)[at(2, 17)] == ("daily #3",)
    assert reasons(plan)[at(13, 17)] == ("daily #2", "weekly #2"), "day 13 is a Sunday: the end of the earlier week"


def test_the_newest_verified_snapshot_is_never_removed() -> None:
    items = [Snap(at(0, h), verified=h < 2) for h in range(5)]  # hours 2, 3, 4 not verified yet

    plan = Policy(last=2).thin(items, at(0, 5), tz=UTC)

    assert kept(plan) == [at(0, 1), at(0, 3), at(0, 4)]
    assert reasons(plan)[at(0, 1)] == (NEWEST_GOOD,)


def test_corrupt_snapshots_are_removed_and_count_for_no_rule() -> None:
    items = [Snap(at(0, h), corrupt=h in (3, 4)) for h in range(5)]

    plan = Policy(last=2, hourly=1).thin(items, at(0, 5), tz=UTC)

    assert kept(plan) == [at(0, 1), at(0, 2)]
    assert reasons(plan)[at(0, 2)] == ("last #1", "hourly #1")
    assert reasons(plan)[at(0, 4)] == reasons(plan)[at(0, 3)] == (CORRUPT,)


def test_snapshots_dated_after_now_are_kept_and_count_for_no_rule() -> None:
    items = [Snap(at(1, 0)), Snap(at(0, 22)), Snap(at(0, 23))]  # the clock went back an hour and more

    plan = Policy(last=1).thin(items, at(0, 23, 30), tz=UTC)

    assert kept(plan) == [at(0, 23), at(1, 0)]
    assert reasons(plan)[at(1, 0)] == (FUTURE,)
    assert reasons(plan)[at(0, 23)] == ("last #1",)


def test_days_are_counted_in_the_given_time_zone() -> None:
    items = [Snap(at(0, 21)), Snap(at(0, 23, 30)), Snap(at(1, 0, 30))]
    now = at(1, 1)

    assert kept(Policy(daily=2).thin(items, now, tz=UTC)) == [at(0, 23, 30), at(1, 0, 30)]
    plus_two = timezone(timedelta(hours=2))  # 23:30 UTC is already the next day there
    assert kept(Policy(daily=2).thin(items, now, tz=plus_two)) == [at(0, 21), at(1, 0, 30)]


def test_the_hour_repeated_when_summer_time_ends_counts_twice() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    first = datetime(2025, 10, 26, 0, 30, tzinfo=UTC)  # 02:30 CEST, then 02:30 CET an hour later
    items = [Snap(first), Snap(first + timedelta(hours=1))]

    plan = Policy(hourly=2).thin(items, first + timedelta(hours=2), tz=berlin)

    assert plan.removed == []


def test_no_rule_keeps_everything() -> None:
    items = hourly(MONDAY, 48)
    plan = Policy().thin(items, at(3, 0))
    assert Policy().is_empty and plan.removed == [] and len(plan.kept) == 48


def test_negative_counts_are_refused() -> None:
    with pytest.raises(UsageError, match="--keep-daily"):
        Policy(daily=-1)


def test_rules_and_decisions_explain_themselves_in_words() -> None:
    assert Policy(last=1, daily=7, weekly=1).describe() == [
        "keep the newest snapshot",
        "keep the newest snapshot of each of the 7 most recent days that have one",
        "keep the newest snapshot of the most recent week that has one",
        "always keep the newest verified snapshot",
    ]
    assert Policy().describe() == ["keep every snapshot (no --keep-* rule given)"]
    plan = Policy(last=1).thin(hourly(MONDAY, 2), at(0, 2), tz=UTC)
    assert [d.explain() for d in plan.decisions] == ["kept: last #1", "removed: no rule keeps it"]


def test_what_a_kept_snapshot_builds_on_is_kept_but_a_corrupt_base_goes() -> None:
    items = hourly(MONDAY, 6)  # 0 whole, 1-3 each on the one before, 4 whole, 5 on 4, whose base 4 is corrupt
    items[4] = Snap(items[4].time, corrupt=True)
    base_of = {1: 0, 2: 1, 3: 2, 5: 4}
    index = {id(item): number for number, item in enumerate(items)}

    def base(item: Snap) -> Snap | None:
        number = base_of.get(index[id(item)])
        return None if number is None else items[number]

    plan = keep_bases(Policy(last=3).thin(items, items[-1].time), base, lambda item: f"#{index[id(item)]}")

    assert kept(plan) == [items[n].time for n in (0, 1, 2, 3, 5)]
    why = reasons(plan)
    assert why[items[3].time] == ("last #2",)
    assert why[items[2].time] == ("last #3", "base of #3")
    assert why[items[1].time] == ("base of #2",) and why[items[0].time] == ("base of #1",)
    assert why[items[4].time] == (CORRUPT,)
