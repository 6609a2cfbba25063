"""Daily limits under concurrency: two gateway processes on one database never overshoot.

Every test gets a fresh database and fresh processes: limits are per business day, so
whatever one test reserved would be in the way of the next.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.harness import FunderSpec, Stack, bank_a, bank_b, error_of, run_stack

pytestmark = pytest.mark.e2e

AMOUNT = 1_000_000  # every disbursement here is 10,000 CNY
REQUESTS = 40


def _stack(tmp_path: Path, db: str, funders: list[FunderSpec], **kw: Any) -> Any:
    return run_stack(tmp_path, db, funders=funders, gateways=2, **kw)


@pytest.fixture
def funder_limited(clean_db: str, tmp_path: Path) -> Iterator[Stack]:
    """bank-a may take 6 disbursements a day, bank-b 4: 10 in all; the platform is roomy."""
    funders = [
        bank_a(single_max=AMOUNT, daily_limit=6 * AMOUNT),
        bank_b(single_max=AMOUNT, daily_limit=4 * AMOUNT),
    ]
    with _stack(tmp_path, clean_db, funders) as stack:
        yield stack


@pytest.fixture
def platform_limited(clean_db: str, tmp_path: Path) -> Iterator[Stack]:
    """Both funders are roomy; the platform-wide daily limit allows 7 disbursements."""
    with _stack(
        tmp_path, clean_db, [bank_a(), bank_b()], gateway={"platform_daily_limit": 7 * AMOUNT}
    ) as stack:
        yield stack


# one statement, one snapshot: the sum over a scope's buckets at one instant
USAGE = "SELECT scope, sum(used) AS used FROM limit_usage GROUP BY scope, business_day"


@contextlib.asynccontextmanager
async def _watch_usage(url: str) -> AsyncIterator[dict[str, int]]:
    """The highest `limit_usage.used` seen per scope while the block runs (sampled)."""
    peak: dict[str, int] = {}
    conn = await asyncpg.connect(url)

    async def sample() -> None:
        while True:
            for r in await conn.fetch(USAGE):
                peak[r["scope"]] = max(peak.get(r["scope"], 0), r["used"])
            await asyncio.sleep(0.005)

    task = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for r in await conn.fetch(USAGE):
            peak[r["scope"]] = max(peak.get(r["scope"], 0), r["used"])
        await conn.close()


async def _burst(stack: Stack) -> tuple[list[str], list[httpx.Response], dict[str, int]]:
    """REQUESTS distinct disbursements fired at once, alternating between the two gateways."""
    clients = [stack.api(g) for g in stack.gateways]
    try:
        bodies = [await clients[0].new_disbursement(amount=AMOUNT) for _ in range(REQUESTS)]
        async with _watch_usage(stack.database_url) as peak:
            answers = await asyncio.gather(*(clients[i % 2].post(b) for i, b in enumerate(bodies)))
    finally:
        for c in clients:
            await c.aclose()
    for r in answers:
        assert r.status_code in (201, 422), f"{r.status_code}: {r.text[:300]}"
        if r.status_code == 422:
            error_of(r, 422, "limit_exceeded")
    accepted = [b["txn_no"] for b, r in zip(bodies, answers, strict=True) if r.status_code == 201]
    return accepted, answers, peak


async def _money_moved(stack: Stack) -> dict[str, int]:
    """Per bank, the sum of amounts whose money left (executions counted)."""
    return {
        fid: sum(p["amount"] * p["executions"] for p in (await bank.payouts()).values())
        for fid, bank in stack.banks.items()
    }


@pytest.mark.asyncio
async def test_funder_daily_limits_hold_under_concurrent_requests_on_two_gateways(
    funder_limited: Stack,
) -> None:
    stack = funder_limited
    limits = {"bank-a": 6 * AMOUNT, "bank-b": 4 * AMOUNT}

    accepted, _, peak = await _burst(stack)

    assert 0 < len(accepted) * AMOUNT <= sum(limits.values()), len(accepted)
    for fid, limit in limits.items():
        assert peak.get(f"funder:{fid}", 0) <= limit, peak
    async with stack.api() as api:
        final = await api.wait_terminal(accepted, timeout=20)
        assert all(r["status"] == "succeeded" for r in final.values())
        routed = {
            fid: sum(r["amount"] for r in final.values() if r["funder_id"] == fid) for fid in limits
        }
        for fid, limit in limits.items():
            assert routed[fid] <= limit, routed
        funders = {f["id"]: f for f in (await api.funders())["items"]}
        for fid, limit in limits.items():
            assert funders[fid]["used_today"] <= limit
    moved = await _money_moved(stack)
    for fid, limit in limits.items():
        assert moved[fid] <= limit, moved
    assert sum(moved.values()) == len(accepted) * AMOUNT


@pytest.mark.asyncio
async def test_platform_daily_limit_holds_under_concurrent_requests_on_two_gateways(
    platform_limited: Stack,
) -> None:
    stack = platform_limited
    limit = 7 * AMOUNT

    accepted, _, peak = await _burst(stack)

    assert 0 < len(accepted) * AMOUNT <= limit, len(accepted)
    platform_peak = max((v for k, v in peak.items() if not k.startswith("funder:")), default=0)
    assert platform_peak <= limit, peak
    async with stack.api() as api:
        final = await api.wait_terminal(accepted, timeout=20)
        assert all(r["status"] == "succeeded" for r in final.values())
        assert (await api.funders())["platform"]["used_today"] <= limit
    moved = await _money_moved(stack)
    assert sum(moved.values()) == len(accepted) * AMOUNT <= limit


@pytest.fixture
def one_small_funder(clean_db: str, tmp_path: Path) -> Iterator[Stack]:
    with run_stack(
        tmp_path, clean_db, funders=[bank_a(single_max=AMOUNT, daily_limit=2 * AMOUNT)]
    ) as stack:
        yield stack


@pytest.mark.asyncio
async def test_limit_exceeded_once_the_daily_limit_is_used_up(one_small_funder: Stack) -> None:
    async with one_small_funder.api() as api:
        for _ in range(2):
            created = await api.post(await api.new_disbursement(amount=AMOUNT))
            assert created.status_code == 201, created.text
        body = await api.new_disbursement(amount=AMOUNT)

        err = error_of(await api.post(body), 422, "limit_exceeded")

        assert "bank-a" in str(err["details"])
        await api.assert_absent(body["txn_no"])
