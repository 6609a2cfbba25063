"""Intake idempotency on real PostgreSQL: `txn_no` is the key, even under concurrency."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store import queries as q
from tests.fakes import SUCCEED
from tests.integration.conftest import AMOUNT, AUTH, StartGateway

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_concurrent_duplicates_create_one_disbursement_and_replay_its_first_answer(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(role="api")
    await h.register()
    results = await asyncio.gather(*(h.disburse("T-DUP") for _ in range(12)))

    assert sorted(s for s, _ in results) == [200] * 11 + [201]
    first = next(b for s, b in results if s == 201)
    assert all(b == first for _, b in results)
    usage = await h.usage()
    assert usage[q.PLATFORM_SCOPE] == AMOUNT
    async with h.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM attempts") == 1
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'dispatch'") == 1


@pytest.mark.asyncio
async def test_a_replay_after_the_payout_finished_returns_the_first_answer(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway()
    await h.register()
    h.banks["bank-a"].script(SUCCEED)
    created = await h.client.post("/v1/disbursements", json=h.request("T-REPLAY"), headers=AUTH)
    assert created.status == 201
    first = await created.read()
    await h.wait_status("T-REPLAY", "succeeded")

    resp = await h.client.post(
        "/v1/disbursements", json=h.request("T-REPLAY", apr="0.18"), headers=AUTH
    )
    assert resp.status == 200
    assert resp.headers.get("Idempotent-Replay") == "true"
    assert await resp.read() == first  # the first answer, byte for byte


@pytest.mark.asyncio
async def test_the_same_txn_no_with_another_payload_is_409_even_concurrently(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(role="api")
    await h.register()
    results = await asyncio.gather(
        *(h.disburse("T-CONFLICT", AMOUNT + i) for i in range(6)),
    )
    assert sorted(s for s, _ in results) == [201] + [409] * 5
    assert {b["error"]["code"] for s, b in results if s == 409} == {"txn_no_conflict"}
    assert (await h.usage())[q.PLATFORM_SCOPE] in {AMOUNT + i for i in range(6)}
