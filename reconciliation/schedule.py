"""When the nightly reconciliation is due: pure date arithmetic in the business time zone.

Day D is due once `run_at` has passed on D + 1 (local time): the bank closes D's statement
overnight, and `run_at` is when it is reliably published. A gateway that was down catches up
every due day it missed, at most `catch_up_days` back and never before the funder's first
order.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, time, timedelta


def latest_due_day(now_local: datetime, run_at: time) -> date:
    """The most recent day whose statement is due at `now_local` (a local, aware time)."""
    today = now_local.date()
    if now_local.timetz().replace(tzinfo=None) >= run_at:
        return today - timedelta(days=1)
    return today - timedelta(days=2)


def due_days(
    latest: date,
    *,
    first_activity: date | None,
    catch_up_days: int,
    done: Iterable[date],
) -> list[date]:
    """Days to reconcile now, oldest first: from `catch_up_days` before `latest` (or the
    first day with activity, if later) to `latest`, less those already done."""
    if first_activity is None:
        return []
    start = max(first_activity, latest - timedelta(days=catch_up_days - 1))
    finished = set(done)
    out = []
    day = start
    while day <= latest:
        if day not in finished:
            out.append(day)
        day += timedelta(days=1)
    return out


def next_run(now_local: datetime, run_at: time) -> datetime:
    """The next local time at which `run_at` strikes, strictly after `now_local`."""
    candidate = datetime.combine(now_local.date(), run_at, tzinfo=now_local.tzinfo)
    if candidate <= now_local:
        candidate = datetime.combine(
            now_local.date() + timedelta(days=1), run_at, tzinfo=now_local.tzinfo
        )
    return candidate
