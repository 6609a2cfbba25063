"""An `unknown` attempt whose order the bank could not find is re-sent under the same order
number. A refusal of that re-send speaks for the re-send alone: the first request, whose
outcome is unknown, may still have reached the bank. Only the bank's answer about the order
settles it."""

from __future__ import annotations

import pytest

from connectors.base import BankStatus
from gateway.dispatcher import Dispatcher, Poller, payout_order
from gateway.store import queries as q
from tests.fakes import PROCESS, REFUSE_REQUEST, unknown
from tests.integration.conftest import StartGateway, dispatch_one, query_now

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_a_refused_resend_of_an_unknown_order_leaves_it_to_the_bank_to_settle(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(role="api")  # the test drives the dispatcher and the poller
    await h.register()
    body = await h.accepted("T-UNKNOWN-REFUSED")
    order_no = body["attempts"][0]["order_no"]
    bank = h.banks["bank-a"]
    dispatcher, poller = Dispatcher(h.svc), Poller(h.svc)

    bank.script(unknown(executed=False))  # the answer is lost, the bank has not got it (yet)
    await dispatch_one(h, dispatcher)
    assert (await h.get("T-UNKNOWN-REFUSED"))["status"] == "unknown"
    await query_now(h, poller)  # NOT_FOUND: the order is queued for a re-send
    assert len(await h.outbox("dispatch")) == 1

    # the first request reaches the bank late, and the bank executes it ...
    async with h.pool.acquire() as conn:
        a = await q.attempt_by_order(conn, order_no)
    assert a is not None
    bank.script(PROCESS, order_no=order_no)
    await bank.disburse(payout_order(h.svc, a))
    # ... while the re-send is refused before the bank reads it (an HTTP 401, say)
    bank.default = REFUSE_REQUEST
    await dispatch_one(h, dispatcher)

    d = await h.get("T-UNKNOWN-REFUSED")
    assert d["status"] == "unknown", d  # not failed on the re-send's refusal
    assert await h.outbox("dispatch") == []

    await query_now(h, poller)  # the bank's own answer about the order
    assert (await h.get("T-UNKNOWN-REFUSED"))["status"] == "processing"
    bank.settle(order_no, BankStatus.SUCCEEDED)
    await query_now(h, poller)
    d = await h.get("T-UNKNOWN-REFUSED")
    assert d["status"] == "succeeded"
    assert bank.executions == {order_no: 1}
    assert h.banks["bank-b"].calls == []
