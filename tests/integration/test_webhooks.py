"""Outcome webhooks to the lending core: signed, one per terminal state, retried until a 2xx,
never sent for a state that is not terminal."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import socket
import time

import pytest

from connectors.base import BankStatus
from gateway.notifier import Notifier
from tests.fakes import SUCCEED, reject
from tests.integration.conftest import (
    WEBHOOK_SECRET,
    Delivery,
    Harness,
    StartGateway,
    eventually,
)

pytestmark = pytest.mark.integration


async def _quiet(h: Harness, deliveries: int) -> bool:
    """`deliveries` webhooks arrived and none is waiting in the outbox."""
    return len(h.core.deliveries) >= deliveries and await h.outbox("webhook") == []


async def _queue_webhook(h: Harness, body: dict[str, object]) -> None:
    """A webhook row in the outbox, as a terminal state leaves one (for its disbursement)."""
    async with h.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO outbox (kind, ref_id, payload)"
            " SELECT 'webhook', id, $2 FROM disbursements WHERE txn_no = $1",
            body["txn_no"],
            body,
        )


def _verified(d: Delivery) -> dict[str, object]:
    ts = d.headers["X-Fundgate-Timestamp"]
    expected = hmac.new(
        WEBHOOK_SECRET.encode(), ts.encode() + b"." + d.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(d.headers["X-Fundgate-Signature"], expected)
    assert abs(time.time() - int(ts)) < 60
    assert d.headers["Content-Type"].startswith("application/json")
    body: dict[str, object] = json.loads(d.body)
    return body


@pytest.mark.asyncio
async def test_a_succeeded_disbursement_is_announced_once_with_a_valid_signature(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway()
    await h.register()
    h.banks["bank-a"].script(SUCCEED)
    await h.accepted("T-WH")
    final = await h.wait_status("T-WH", "succeeded")

    await eventually(lambda: _quiet(h, 1), "the webhook to be delivered")
    assert len(h.core.deliveries) == 1
    body = _verified(h.core.deliveries[0])
    assert body == final


@pytest.mark.asyncio
async def test_a_failed_disbursement_is_announced_once(start_gateway: StartGateway) -> None:
    h = await start_gateway()
    await h.register()
    h.banks["bank-a"].script(reject(pre_execution=True))
    h.banks["bank-b"].script(reject(pre_execution=False))
    await h.accepted("T-WH-FAIL")
    final = await h.wait_status("T-WH-FAIL", "failed")

    await eventually(lambda: _quiet(h, 1), "the webhook to be delivered")
    assert [_verified(d) for d in h.core.deliveries] == [final]


@pytest.mark.parametrize("refusals", [2, 4])
@pytest.mark.asyncio
async def test_a_refused_webhook_is_retried_until_the_lending_core_answers_2xx(
    start_gateway: StartGateway, refusals: int
) -> None:
    h = await start_gateway()
    await h.register()
    h.core.answers.extend([500] * refusals)
    h.banks["bank-a"].script(SUCCEED)
    await h.accepted("T-WH-RETRY")

    await eventually(lambda: _quiet(h, 1), "the webhook to be delivered after retries")
    assert h.core.refused == refusals
    assert len(h.core.deliveries) == 1
    assert _verified(h.core.deliveries[0])["status"] == "succeeded"


@pytest.mark.asyncio
async def test_no_webhook_is_sent_for_a_state_that_is_not_terminal(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway()
    await h.register()
    await h.accepted("T-WH-OPEN")
    d = await h.wait_status("T-WH-OPEN", "sent")
    order_no = d["attempts"][0]["order_no"]
    bank = h.banks["bank-a"]
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.PROCESSING)) == 200

    async def polled_twice_more() -> bool:
        return bank.queries.count(order_no) >= 3

    await eventually(polled_twice_more, "the poller to look at the open payout")
    assert (await h.get("T-WH-OPEN"))["status"] == "processing"
    assert await h.outbox("webhook") == []
    assert h.core.deliveries == []
    assert h.core.refused == 0


@pytest.mark.asyncio
async def test_work_is_picked_up_on_notification_not_on_the_polling_interval(
    start_gateway: StartGateway,
) -> None:
    """With polling an hour apart, the payout is dispatched (intake's coalesced wake-up) and
    its webhook sent (the outcome's coalesced wake-up) within seconds."""
    h = await start_gateway(dispatch={"poll_interval_seconds": 3600})
    await h.register()
    h.banks["bank-a"].script(SUCCEED)
    await h.accepted("T-WH-NOTIFY")
    await h.wait_status("T-WH-NOTIFY", "succeeded")
    await eventually(lambda: _quiet(h, 1), "the webhook to be delivered")


@pytest.mark.asyncio
async def test_delivered_rows_are_deleted_together_by_the_next_claim_or_at_shutdown(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(role="api")  # no notifier of its own: this test drives one
    await h.register()
    for txn_no in ("T-WH-BATCH-1", "T-WH-BATCH-2", "T-WH-BATCH-3"):
        await _queue_webhook(h, await h.accepted(txn_no))
    notifier = Notifier(h.svc)
    async with h.pool.acquire() as conn:
        rows = await notifier.claim(conn, 2)
    for row in rows:
        await notifier.handle(row)
    assert len(h.core.deliveries) == 2
    assert len(await h.outbox("webhook")) == 3  # delivered, still leased, not yet deleted
    async with h.pool.acquire() as conn:
        [last] = await notifier.claim(conn, 2)  # deletes the two, claims the third
    assert [r["id"] for r in await h.outbox("webhook")] == [last["id"]]
    await notifier.handle(last)
    await notifier.drain(1)
    assert await h.outbox("webhook") == []
    assert len(h.core.deliveries) == 3


@pytest.mark.asyncio
async def test_an_unreachable_lending_core_leaves_the_webhook_waiting_in_the_outbox(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(role="api")  # no notifier of its own: this test drives one
    await h.register()
    await _queue_webhook(h, await h.accepted("T-WH-DOWN"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lc = h.svc.cfg.lending_core
    assert lc is not None
    down = lc.model_copy(update={"webhook_url": f"http://127.0.0.1:{port}/webhooks"})
    notifier = Notifier(dataclasses.replace(h.svc, cfg=h.svc.cfg.model_copy(
        update={"lending_core": down})))  # fmt: skip
    async with h.pool.acquire() as conn:
        [row] = await notifier.claim(conn, 1)

    await notifier.handle(row)  # three quick tries, then back to the outbox for later
    await notifier.drain(1)

    [kept] = await h.outbox("webhook")
    assert kept["id"] == row["id"]
    assert kept["leased_until"] is None
    assert kept["last_error"]
    assert kept["available_at"] > kept["created_at"]  # later, after a back-off
    assert h.core.deliveries == []


@pytest.mark.asyncio
async def test_a_reversal_reaches_the_lending_core_after_the_outcome_it_reverses(
    start_gateway: StartGateway,
) -> None:
    """The first outcome's webhook is waiting out a back-off when a person reverses it: the
    reversal must not overtake it, or the lending core (which dedups by txn_no + status)
    ends up holding the outcome that was reversed."""
    from gateway import outcomes
    from gateway.store import queries as q

    h = await start_gateway(dispatch={"webhook_backoff_seconds": [1.0]})
    await h.register()
    h.core.answers.extend([503] * 3)  # the first outcome's quick tries are all refused
    h.banks["bank-a"].script(SUCCEED)
    await h.accepted("T-WH-ORDER")
    await h.wait_status("T-WH-ORDER", "succeeded")

    async def backing_off() -> bool:
        rows = await h.outbox("webhook")
        return h.core.refused == 3 and len(rows) == 1 and rows[0]["leased_until"] is None

    await eventually(backing_off, "the first webhook to wait out its back-off")
    async with h.pool.acquire() as conn, conn.transaction():  # as resolve_break does
        d = await q.find_by_txn(conn, "T-WH-ORDER")
        assert d is not None
        attempt = (await q.attempts_of(conn, [d["id"]]))[d["id"]][-1]
        a = await q.lock_attempt(conn, attempt["id"])
        await outcomes.correct_terminal(conn, h.svc, a, "failed", by="ops", reason="not paid")

    await eventually(lambda: _quiet(h, 2), "both webhooks to be delivered")
    assert [_verified(d)["status"] for d in h.core.deliveries] == ["succeeded", "failed"]
