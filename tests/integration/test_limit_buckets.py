"""Daily limits spread over buckets (migration 0011): concurrent reservations in many rows
that together never pass the cap, reach it exactly, follow a changed cap, and give back what
is released; and the coalesced dispatch wake-ups."""

from __future__ import annotations

import asyncio
import random
from datetime import date

import asyncpg
import pytest

from gateway.store import queries as q
from gateway.wakeups import Wakeups

pytestmark = pytest.mark.integration

DAY = date(2026, 11, 25)
SCOPE = "funder:bank-a"
BUCKETS = 8


async def _used(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return int(
            await conn.fetchval(
                "SELECT coalesce(sum(used), 0) FROM limit_usage WHERE scope = $1", SCOPE
            )
        )


async def _reserve(pool: asyncpg.Pool, amount: int, cap: int, bucket: int | None = None) -> bool:
    b = random.randrange(BUCKETS) if bucket is None else bucket
    async with pool.acquire() as conn, conn.transaction():
        return await q.reserve(conn, SCOPE, DAY, b, amount, cap, BUCKETS) is not None


async def _invariants(pool: asyncpg.Pool, cap: int) -> None:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM limit_usage WHERE scope = $1", SCOPE)
    assert all(0 <= r["used"] <= r["share"] for r in rows)
    assert sum(r["share"] for r in rows) <= max(cap, sum(r["used"] for r in rows))


@pytest.mark.asyncio
async def test_concurrent_reservations_over_many_buckets_fill_the_cap_exactly(
    pool: asyncpg.Pool,
) -> None:
    cap = 1000
    amounts = [random.choice((1, 3, 7, 10)) for _ in range(400)]  # ~2,100 asked, 1,000 fit
    results = await asyncio.gather(*(_reserve(pool, a, cap) for a in amounts))

    taken = sum(a for a, ok in zip(amounts, results, strict=True) if ok)
    assert taken == await _used(pool)
    assert taken <= cap
    # refused only when the whole day, not just one bucket, had no room for it
    smallest_refused = min(a for a, ok in zip(amounts, results, strict=True) if not ok)
    assert cap - taken < smallest_refused
    await _invariants(pool, cap)
    async with pool.acquire() as conn:
        rows = await conn.fetchval("SELECT count(*) FROM limit_usage WHERE scope = $1", SCOPE)
    assert rows == BUCKETS


@pytest.mark.asyncio
async def test_a_full_bucket_borrows_room_from_the_others(pool: asyncpg.Pool) -> None:
    cap = 80  # 10 per bucket at the first split
    assert await _reserve(pool, 10, cap, bucket=3)
    # bucket 3 is full; 70 is left elsewhere, so 70 more in bucket 3 must still fit
    assert await _reserve(pool, 70, cap, bucket=3)
    assert not await _reserve(pool, 1, cap, bucket=5)
    assert await _used(pool) == cap
    await _invariants(pool, cap)


@pytest.mark.asyncio
async def test_released_room_returns_to_the_scope(pool: asyncpg.Pool) -> None:
    cap = 80
    for b in range(BUCKETS):
        assert await _reserve(pool, 10, cap, bucket=b)
    async with pool.acquire() as conn:
        await q.release(conn, SCOPE, DAY, 2, 10)
    # the room freed in bucket 2 is the scope's: another bucket may take it
    assert await _reserve(pool, 10, cap, bucket=6)
    assert not await _reserve(pool, 1, cap, bucket=2)
    await _invariants(pool, cap)


@pytest.mark.asyncio
async def test_a_lower_cap_applies_at_once_to_every_bucket(pool: asyncpg.Pool) -> None:
    assert await _reserve(pool, 50, 1000, bucket=0)
    # a new config lowers the cap to 60: only 10 more, whichever bucket asks
    assert not await _reserve(pool, 11, 60, bucket=4)
    assert await _reserve(pool, 10, 60, bucket=4)
    assert not await _reserve(pool, 1, 60, bucket=0)
    assert await _used(pool) == 60
    await _invariants(pool, 60)


@pytest.mark.asyncio
async def test_usage_recorded_past_the_cap_leaves_no_room(pool: asyncpg.Pool) -> None:
    cap = 100
    assert await _reserve(pool, 90, cap, bucket=1)
    async with pool.acquire() as conn:
        await q.record_usage(conn, SCOPE, DAY, 2, 30, cap, BUCKETS)  # money that moved anyway
        await q.release(conn, SCOPE, DAY, 1, 5)
    assert await _used(pool) == 115
    # still over the cap after the release: nothing may be reserved anywhere
    for b in range(BUCKETS):
        assert not await _reserve(pool, 1, cap, bucket=b)
    await _invariants(pool, cap)


@pytest.mark.asyncio
async def test_usage_sums_the_buckets(pool: asyncpg.Pool) -> None:
    for b, amount in enumerate((5, 6, 7)):
        assert await _reserve(pool, amount, 1000, bucket=b)
    async with pool.acquire() as conn:
        assert (await q.usage(conn, DAY))[SCOPE] == 18


@pytest.mark.asyncio
async def test_wakeups_send_one_notify_per_funder_for_a_burst(
    pool: asyncpg.Pool, clean_db: str
) -> None:
    heard: list[str] = []
    listener = await asyncpg.connect(clean_db)
    await listener.add_listener(q.DISPATCH_CHANNEL, lambda *a: heard.append(a[3]))
    try:
        w = Wakeups()
        for i in range(200):
            w.wake("bank-a" if i % 2 else "bank-b")
        await w.flush(pool)
        for _ in range(100):
            if len(heard) >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert sorted(heard) == ["bank-a", "bank-b"]
        await w.flush(pool)  # nothing new: nothing sent
        await asyncio.sleep(0.05)
        assert len(heard) == 2
    finally:
        await listener.close()
