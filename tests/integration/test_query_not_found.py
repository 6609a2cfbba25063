"""A status query that finds no order for an attempt the bank had taken (`sent` or
`processing`): the bank contradicts itself, so what became of the order is not known. The
order is re-sent under its own number, and the attempt is `unknown` (queried, escalated when
it stays so), never left `sent` for good."""

from __future__ import annotations

import pytest

from gateway.dispatcher import Dispatcher, Poller
from tests.integration.conftest import StartGateway, dispatch_one, query_now

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_an_accepted_order_the_bank_no_longer_finds_is_resent_not_left_sent(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(role="api")  # the test drives the dispatcher and the poller
    await h.register()
    body = await h.accepted("T-LOST-AT-BANK")
    order_no = body["attempts"][0]["order_no"]
    bank = h.banks["bank-a"]
    dispatcher, poller = Dispatcher(h.svc), Poller(h.svc)

    await dispatch_one(h, dispatcher)
    assert (await h.get("T-LOST-AT-BANK"))["status"] == "sent"
    del bank.ledger[order_no]  # the bank's query no longer knows the order it accepted

    await query_now(h, poller)
    await dispatch_one(h, dispatcher)  # the re-send the query asked for
    assert len(bank.calls_for(order_no)) == 2
    assert order_no in bank.ledger
    await query_now(h, poller)
    assert (await h.get("T-LOST-AT-BANK"))["status"] == "processing"
