"""A dispatch outbox row held by a worker that died is picked up after its lease expires, and
the order, re-sent under the same order number, executes once."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from connectors.base import PayoutOrder
from gateway.dispatcher import payout_order
from gateway.store import queries as q
from tests.fakes import REFUSE_REQUEST
from tests.integration.conftest import Harness, StartGateway, eventually

pytestmark = pytest.mark.integration

DEAD_LEASE_SECONDS = 0.5
# PostgreSQL's now() and the test's clock are the same host clock; allow scheduling jitter
CLOCK_SLACK = timedelta(milliseconds=50)


async def _claimed_by_a_dead_worker(api: Harness) -> tuple[int, datetime]:
    """Claim the disbursement's dispatch row as a worker would, then never finish it."""
    async with api.pool.acquire() as conn:
        rows = await q.claim(conn, "dispatch", 10, DEAD_LEASE_SECONDS)
        leased_until = await conn.fetchval(
            "SELECT leased_until FROM outbox WHERE id = $1", rows[0]["id"]
        )
    assert len(rows) == 1
    return rows[0]["ref_id"], leased_until


async def _dispatched(api: Harness) -> bool:
    return await api.outbox("dispatch") == []


async def _order_as_the_dispatcher_builds_it(api: Harness, attempt_id: int) -> PayoutOrder:
    async with api.pool.acquire() as conn:
        a = await q.load_attempt(conn, attempt_id)
    assert a is not None
    return payout_order(api.svc, a)


@pytest.mark.asyncio
async def test_a_row_claimed_by_a_dead_worker_is_dispatched_after_its_lease(
    start_gateway: StartGateway,
) -> None:
    api = await start_gateway(role="api")
    await api.register()
    body = await api.accepted("T-LEASE")
    _, leased_until = await _claimed_by_a_dead_worker(api)

    worker = await start_gateway(role="worker", banks=api.banks)
    d = await api.wait_status("T-LEASE", "sent")
    order_no = body["attempts"][0]["order_no"]
    bank = worker.banks["bank-a"]
    calls = bank.calls_for(order_no)
    assert len(calls) == 1
    assert calls[0].at >= leased_until - CLOCK_SLACK  # not before the dead lease ran out
    assert bank.executions == {order_no: 1}
    assert d["attempts"][0]["status"] == "sent"
    assert await api.outbox("dispatch") == []


@pytest.mark.asyncio
async def test_a_dead_worker_that_had_already_sent_the_order_does_not_cause_a_second_payment(
    start_gateway: StartGateway,
) -> None:
    api = await start_gateway(role="api")
    await api.register()
    await api.accepted("T-LEASE-SENT")
    attempt_id, leased_until = await _claimed_by_a_dead_worker(api)
    bank = api.banks["bank-a"]
    order = await _order_as_the_dispatcher_builds_it(api, attempt_id)
    await bank.disburse(order)  # the dead worker's call reached the bank before it died

    await start_gateway(role="worker", banks=api.banks)
    await api.wait_status("T-LEASE-SENT", "sent")
    calls = bank.calls_for(order.order_no)
    assert len(calls) == 2  # re-sent under the same order number ...
    assert calls[1].at >= leased_until - CLOCK_SLACK
    assert bank.executions == {order.order_no: 1}  # ... and executed once
    assert api.banks["bank-b"].calls == []


@pytest.mark.asyncio
async def test_a_refused_resend_after_a_dead_worker_is_asked_about_never_failed_over(
    start_gateway: StartGateway,
) -> None:
    """The re-send is refused before the bank looks at the order (a request-level 4xx, say),
    but the dead worker's call may have executed it: only a status query may decide."""
    api = await start_gateway(role="api")
    await api.register()
    await api.accepted("T-LEASE-REFUSED")
    attempt_id, _ = await _claimed_by_a_dead_worker(api)
    bank = api.banks["bank-a"]
    order = await _order_as_the_dispatcher_builds_it(api, attempt_id)
    await bank.disburse(order)  # executed by the dead worker's call
    bank.default = REFUSE_REQUEST  # every later request refused, unread

    await start_gateway(role="worker", banks=api.banks)
    await eventually(lambda: _dispatched(api), "the re-send to be tried and recorded")
    d = await api.get("T-LEASE-REFUSED")
    assert [(a["funder_id"], a["status"]) for a in d["attempts"]] == [("bank-a", "unknown")]
    assert bank.executions == {order.order_no: 1}
    assert api.banks["bank-b"].calls == []
