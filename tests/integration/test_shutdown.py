"""Stopping a gateway hands unfinished work back at once instead of leaving it to the lease."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from connectors.base import PayoutOrder, PayoutResult
from gateway.dispatcher import Dispatcher
from tests.fakes import FakeBank, reject
from tests.integration.conftest import StartGateway, eventually

pytestmark = pytest.mark.integration


class HangingBank(FakeBank):
    """A bank that never answers a payout (until cancelled)."""

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


@pytest.mark.asyncio
async def test_sigterm_hands_a_hanging_bank_call_back_for_the_next_process(
    start_gateway: StartGateway,
) -> None:
    banks = {"bank-a": HangingBank("bank-a"), "bank-b": FakeBank("bank-b")}
    h = await start_gateway(banks=banks, dispatch={"drain_seconds": 0.2, "lease_seconds": 600})
    await h.register()
    await h.accepted("SHUT-1")

    async def claimed() -> bool:
        rows = await h.outbox("dispatch")
        return bool(rows) and rows[0]["leased_until"] is not None

    await eventually(claimed, "the dispatcher to claim the payout")
    await h.client.close()  # the app's shutdown: workers drain, then release

    rows = await h.outbox("dispatch")
    assert len(rows) == 1
    assert rows[0]["leased_until"] is None  # free for the next process now, not in 10 minutes
    assert rows[0]["tries"] == 1  # the try still counts: that call may have reached the bank


@pytest.mark.asyncio
async def test_a_claim_that_lands_as_the_gateway_stops_is_handed_back_too(
    start_gateway: StartGateway,
) -> None:
    # the stop comes between the claim's commit and the start of its tasks: the drain lets
    # the loop finish that claim, then hands the rows back like any other in flight
    banks = {"bank-a": HangingBank("bank-a"), "bank-b": FakeBank("bank-b")}
    h = await start_gateway(
        role="api", banks=banks, dispatch={"drain_seconds": 0.2, "lease_seconds": 600}
    )  # no dispatcher of its own: this test drives one
    await h.register()
    await h.accepted("SHUT-2")
    claimed, hold = asyncio.Event(), asyncio.Event()

    class SlowClaim(Dispatcher):
        async def claim(self, conn: Any, n: int) -> list[Any]:
            rows = await super().claim(conn, n)
            if rows:
                claimed.set()
                await hold.wait()
            return rows

    dispatcher, stop = SlowClaim(h.svc), asyncio.Event()
    loop = asyncio.create_task(dispatcher.run(stop))
    await asyncio.wait_for(claimed.wait(), 10)
    stop.set()
    drain = asyncio.create_task(dispatcher.drain(0.2))
    await asyncio.sleep(0.05)  # the drain has begun; now the claim returns
    hold.set()
    await asyncio.wait_for(drain, 10)
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)

    [row] = await h.outbox("dispatch")
    assert row["leased_until"] is None
    assert row["tries"] == 1


@pytest.mark.asyncio
async def test_a_payout_that_never_reached_the_bank_is_handed_back_without_a_try(
    start_gateway: StartGateway,
) -> None:
    # one call at a time to bank-a: the second payout waits for the first, which hangs, and
    # is still waiting when the gateway stops. Its request never left, so the next process
    # may fail it over after a refusal; the first one's may have reached the bank
    banks = {"bank-a": HangingBank("bank-a"), "bank-b": FakeBank("bank-b")}
    h = await start_gateway(
        banks=banks,
        dispatch={"drain_seconds": 0.2, "lease_seconds": 600, "max_in_flight_per_funder": 1},
    )
    await h.register()
    first = await h.accepted("SHUT-3")
    second = await h.accepted("SHUT-4")

    async def both_claimed() -> bool:
        rows = await h.outbox("dispatch")
        return len(rows) == 2 and all(r["leased_until"] is not None for r in rows)

    await eventually(both_claimed, "the dispatcher to claim both payouts")
    await h.client.close()

    tries = {r["ref_id"]: r["tries"] for r in await h.outbox("dispatch")}
    ids = {}
    async with h.pool.acquire() as conn:
        for body in (first, second):
            ids[body["txn_no"]] = await conn.fetchval(
                "SELECT id FROM attempts WHERE order_no = $1", body["attempts"][0]["order_no"]
            )
    assert sorted(tries.values()) == [0, 1]  # one was at the bank, the other never left

    # the next process: bank-a now refuses every payout before executing it
    banks2 = {
        "bank-a": FakeBank("bank-a", default=reject(pre_execution=True)),
        "bank-b": banks["bank-b"],
    }
    h2 = await start_gateway(banks=banks2)
    never_sent = next(t for t, i in ids.items() if tries[i] == 0)
    d = await h2.wait_status(never_sent, "sent")
    assert [(a["funder_id"], a["status"]) for a in d["attempts"]] == [
        ("bank-a", "failed"),
        ("bank-b", "sent"),
    ]
