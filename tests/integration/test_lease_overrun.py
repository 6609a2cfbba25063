"""A bank call that outlives its lease: another process claims the row and re-sends the same
order number meanwhile. The first call's late answer speaks only for its own request and must
not act for a row it no longer holds."""

from __future__ import annotations

import asyncio

import pytest

from connectors.base import PayoutOrder, PayoutResult
from connectors.errors import NotSent
from gateway.dispatcher import Dispatcher, payout_order
from gateway.store import queries as q
from tests.fakes import FakeBank
from tests.integration.conftest import StartGateway

pytestmark = pytest.mark.integration

SHORT_LEASE_SECONDS = 0.3


class OverrunBank(FakeBank):
    """The first call hangs until `release`, then its connection turns out never to have
    reached the bank; every later call is answered as scripted (accepted by default)."""

    def __init__(self, funder_id: str) -> None:
        super().__init__(funder_id)
        self.hanging = asyncio.Event()
        self.release = asyncio.Event()
        self._first = True

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        if self._first:
            self._first = False
            self.hanging.set()
            await self.release.wait()
            raise NotSent(f"{self.funder_id}: connection refused")
        return await super().disburse(order)


@pytest.mark.asyncio
async def test_a_late_not_sent_after_the_lease_was_taken_over_never_fails_over(
    start_gateway: StartGateway,
) -> None:
    banks = {"bank-a": OverrunBank("bank-a"), "bank-b": FakeBank("bank-b")}
    # no dispatcher of its own: the test plays both processes; no NotSent re-sends, so the
    # first NotSent recorded for the attempt fails it over
    h = await start_gateway(
        role="api",
        banks=banks,
        dispatch={"not_sent_retries": 0, "lease_seconds": SHORT_LEASE_SECONDS},
    )
    await h.register()
    await h.accepted("T-OVERRUN")

    first = Dispatcher(h.svc)
    async with h.pool.acquire() as conn:
        [row_a] = await first.claim(conn, 10)
    call_a = asyncio.create_task(first.handle(row_a))
    await asyncio.wait_for(banks["bank-a"].hanging.wait(), 5)

    # the first call outlives its lease; a second process claims the row and sends the order,
    # which the bank takes; its outcome is not recorded yet (still on its way back)
    await asyncio.sleep(SHORT_LEASE_SECONDS + 0.2)
    async with h.pool.acquire() as conn:
        [row_b] = await q.claim(conn, "dispatch", 10, 600)
        a = await q.load_attempt(conn, row_b["ref_id"])
    assert row_b["id"] == row_a["id"]
    assert row_b["tries"] == 2
    assert a is not None
    answer_b = await banks["bank-a"].disburse(payout_order(h.svc, a))
    assert banks["bank-a"].executions == {a["order_no"]: 1}

    # now the first call's late "never reached the bank"
    banks["bank-a"].release.set()
    await asyncio.wait_for(call_a, 5)

    d = await h.get("T-OVERRUN")
    # neither failed over to bank-b nor counted: the second claim's send decides
    assert [(x["funder_id"], x["status"]) for x in d["attempts"]] == [("bank-a", "accepted")]
    [row] = await h.outbox("dispatch")
    assert row["leased_until"] is not None  # still the second process's claim
    assert row["tries"] == 2

    # the second process's answer arrives and settles it
    await Dispatcher(h.svc)._record(row_b, a, answer_b)
    d = await h.get("T-OVERRUN")
    assert [(x["funder_id"], x["status"]) for x in d["attempts"]] == [("bank-a", "sent")]
    assert await h.outbox("dispatch") == []
