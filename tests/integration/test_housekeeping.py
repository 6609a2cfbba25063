"""Housekeeping on real PostgreSQL: old callback nonces forgotten in bounded batches, and the
gauges refreshed even when that purge fails."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from gateway import housekeeping
from gateway.context import Services
from gateway.metrics import Metrics
from gateway.store import queries as q
from tests.integration.conftest import make_config

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def svc(pool: asyncpg.Pool) -> AsyncIterator[Services]:
    async with httpx.AsyncClient() as http:
        yield Services(
            cfg=make_config(None), pool=pool, connectors={}, metrics=Metrics(), http=http
        )


async def _nonces(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        return [
            r["nonce"] for r in await conn.fetch("SELECT nonce FROM callback_nonces ORDER BY 1")
        ]


async def test_old_nonces_are_forgotten_a_batch_at_a_time_and_recent_ones_kept(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO callback_nonces (funder_id, nonce, seen_at)"
            " SELECT 'bank-a', 'old' || i, now() - interval '1 hour' FROM generate_series(1, 5) i"
        )
        await conn.execute(
            "INSERT INTO callback_nonces (funder_id, nonce) VALUES ('bank-a', 'new')"
        )
        gone = [await q.forget_nonces(conn, 900, 2) for _ in range(4)]

    assert gone == [2, 2, 1, 0]
    assert await _nonces(pool) == ["new"]


async def test_a_failing_purge_does_not_keep_the_gauges_from_refreshing(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object) -> int:
        raise asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout")

    monkeypatch.setattr(q, "forget_nonces", broken)
    async with svc.pool.acquire() as conn:
        await q.enqueue(conn, "webhook", 1, payload={"n": 1})

    with capture_logs() as logs:
        await housekeeping.refresh(svc)

    assert [e["event"] for e in logs] == ["housekeeping.nonces_failed"]
    depth = svc.metrics.registry.get_sample_value("fundgate_outbox_depth", {"kind": "webhook"})
    assert depth == 1
