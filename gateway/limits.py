"""Daily limits and the co-lending prefund, as every state change moves them.

A scope's daily usage lives in `[gateway] limit_buckets` rows whose shares never sum past the
cap (migration 0011), so concurrent intakes lock different rows instead of queueing on one.
A reservation remembers its bucket (`disbursements.platform_bucket`, `attempts.limit_bucket`)
and is given back to the same bucket. Lock order, in every transaction that moves limits:
the platform's bucket before any funder's, so no two can deadlock on each other.
"""

from __future__ import annotations

import random
from datetime import date

import asyncpg

from config.models import Funder
from gateway.context import Services
from gateway.store import queries as q


def pick_bucket(svc: Services) -> int:
    return random.randrange(svc.cfg.gateway.limit_buckets)


def _funder_cap(svc: Services, funder_id: str) -> int:
    f = svc.cfg.funder(funder_id)
    return 0 if f is None else f.daily_limit  # a funder no longer configured takes nothing


async def reserve_funder(
    conn: q.Conn, svc: Services, funder: Funder, day: date, bucket: int, amount: int,
    platform_amount: int,
) -> int | None:  # fmt: skip
    """The funder's daily limit and, for co-lending, the platform's prefund there; the bucket
    holding the reservation, or None. As in fg_intake (migration 0018), a prefund refusal
    rolls the reservation back in a savepoint: the usage rows it locked are not held while
    the caller tries the next funder, which could deadlock with an intake trying them in the
    opposite order."""
    scope = q.funder_scope(funder.id)
    n = svc.cfg.gateway.limit_buckets
    if not platform_amount:
        return await q.reserve(conn, scope, day, bucket, amount, funder.daily_limit, n)
    try:
        async with conn.transaction():
            held = await q.reserve(conn, scope, day, bucket, amount, funder.daily_limit, n)
            if held is not None and not await q.take_prefund(conn, funder.id, platform_amount):
                raise _PrefundRefused
    except _PrefundRefused:
        return None
    return held


class _PrefundRefused(Exception):
    """Rolls back a reservation whose platform share the prefund cannot cover."""


async def lock_platform(conn: q.Conn, day: date, bucket: int) -> None:
    await q.lock_usage(conn, q.PLATFORM_SCOPE, day, bucket)


async def release_platform(conn: q.Conn, day: date, bucket: int, amount: int) -> None:
    await q.release(conn, q.PLATFORM_SCOPE, day, bucket, amount)


async def release_funder(
    conn: q.Conn, funder_id: str, day: date, bucket: int, amount: int, platform_amount: int
) -> None:
    await q.release(conn, q.funder_scope(funder_id), day, bucket, amount)
    await q.return_prefund(conn, funder_id, platform_amount)


def releases(a: asyncpg.Record) -> list[tuple[str, int, int]]:
    """The usage an attempt holds, as (scope, bucket, amount) in lock order (the platform's
    first): what `release` gives back, and what a transition written in one statement
    (migration 0013) is handed; the platform's share goes back to the prefund too
    (`a["alloc_platform"]`)."""
    amount = a["amount"]
    return [
        (q.PLATFORM_SCOPE, a["platform_bucket"], amount),
        (q.funder_scope(a["funder_id"]), a["limit_bucket"], amount),
    ]


async def release(conn: q.Conn, a: asyncpg.Record) -> None:
    """Give back everything an attempt (a `queries.lock_attempt` row) holds: the platform's
    usage, then the funder's and its prefund, each in the bucket it was reserved in."""
    for scope, bucket, amount in releases(a):
        await q.release(conn, scope, a["business_day"], bucket, amount)
    await q.return_prefund(conn, a["funder_id"], a["alloc_platform"])


async def record(
    conn: q.Conn, svc: Services, funder_id: str, day: date, buckets: tuple[int, int], amount: int
) -> None:
    """Usage of money that moved after all (a correction): platform, then funder, past the caps
    if need be; the (platform, funder) buckets are the disbursement's and the attempt's."""
    n = svc.cfg.gateway.limit_buckets
    platform_cap = svc.cfg.gateway.platform_daily_limit
    await q.record_usage(conn, q.PLATFORM_SCOPE, day, buckets[0], amount, platform_cap, n)
    scope = q.funder_scope(funder_id)
    await q.record_usage(conn, scope, day, buckets[1], amount, _funder_cap(svc, funder_id), n)
