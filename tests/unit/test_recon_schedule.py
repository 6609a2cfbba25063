"""The nightly schedule: when a day is due, and which missed days are caught up."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from reconciliation.schedule import due_days, latest_due_day, next_run

ZONE = ZoneInfo("Asia/Shanghai")
RUN_AT = time(2, 0)
D = date(2026, 3, 10)


def local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=ZONE)


def test_yesterday_is_due_once_run_at_has_passed() -> None:
    assert latest_due_day(local(D, 1, 59), RUN_AT) == D - timedelta(days=2)
    assert latest_due_day(local(D, 2, 0), RUN_AT) == D - timedelta(days=1)
    assert latest_due_day(local(D, 23, 0), RUN_AT) == D - timedelta(days=1)


def test_missed_days_are_caught_up_oldest_first_within_the_limit() -> None:
    latest = D
    got = due_days(latest, first_activity=D - timedelta(days=30), catch_up_days=3, done=[])
    assert got == [D - timedelta(days=2), D - timedelta(days=1), D]
    done = [D - timedelta(days=1)]
    got = due_days(latest, first_activity=D - timedelta(days=30), catch_up_days=3, done=done)
    assert got == [D - timedelta(days=2), D]


def test_nothing_is_due_before_the_first_order() -> None:
    assert due_days(D, first_activity=None, catch_up_days=7, done=[]) == []
    assert due_days(D, first_activity=D, catch_up_days=7, done=[]) == [D]
    assert due_days(D, first_activity=D + timedelta(days=1), catch_up_days=7, done=[]) == []


def test_the_next_run_is_tonight_or_tomorrow() -> None:
    assert next_run(local(D, 1), RUN_AT) == local(D, 2)
    assert next_run(local(D, 2), RUN_AT) == local(D + timedelta(days=1), 2)
