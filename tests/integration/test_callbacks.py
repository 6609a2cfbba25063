"""Bank callbacks over HTTP: verified, applied once, never backwards, replays refused."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.base import BankStatus
from gateway.store import queries as q
from tests.integration.conftest import Harness, StartGateway, eventually

pytestmark = pytest.mark.integration


async def _sent(start_gateway: StartGateway, txn_no: str) -> tuple[Harness, str]:
    """A disbursement the bank accepted and still holds (its queries answer ACCEPTED)."""
    h = await start_gateway()
    await h.register()
    await h.accepted(txn_no)
    d = await h.wait_status(txn_no, "sent")
    return h, d["attempts"][0]["order_no"]


async def _post(h: Harness, funder_id: str, headers: dict[str, str], body: bytes) -> Any:
    resp = await h.client.post(f"/v1/callbacks/{funder_id}", data=body, headers=headers)
    text = await resp.text()
    return resp.status, text


def _applied(vouchers: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [v for v in vouchers if v["kind"] == kind]


@pytest.mark.asyncio
async def test_a_valid_callback_is_applied_once_and_acknowledged(
    start_gateway: StartGateway,
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB")
    bank = h.banks["bank-a"]
    headers, body = bank.callback(order_no, BankStatus.SUCCEEDED)
    assert await _post(h, "bank-a", headers, body) == (200, "SUCCESS")

    d = await h.get("T-CB")
    assert d["status"] == "succeeded"
    assert d["attempts"][0]["bank_ref"] == bank.ledger[order_no].bank_ref
    succeeded = _applied(await h.vouchers("T-CB"), "disbursement.succeeded")
    assert len(succeeded) == 1
    assert succeeded[0]["event"]["source"] == "callback"


@pytest.mark.asyncio
async def test_the_same_event_with_a_new_nonce_is_acknowledged_and_changes_nothing(
    start_gateway: StartGateway,
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-DUP")
    bank = h.banks["bank-a"]
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.SUCCEEDED)) == 200
    await eventually(lambda: _delivered(h), "the outcome webhook to be delivered")
    before = await h.get("T-CB-DUP")
    vouchers = await h.vouchers("T-CB-DUP")

    headers, body = bank.callback(order_no, BankStatus.SUCCEEDED)  # a fresh nonce
    assert await _post(h, "bank-a", headers, body) == (200, "SUCCESS")
    assert await h.get("T-CB-DUP") == before
    assert await h.vouchers("T-CB-DUP") == vouchers
    assert await h.outbox("webhook") == []
    assert len(h.core.deliveries) == 1


async def _delivered(h: Harness) -> bool:
    return bool(h.core.deliveries) and await h.outbox("webhook") == []


@pytest.mark.parametrize("late", [BankStatus.PROCESSING, BankStatus.ACCEPTED, BankStatus.FAILED])
@pytest.mark.asyncio
async def test_a_late_callback_never_moves_a_terminal_disbursement_backwards(
    start_gateway: StartGateway, late: BankStatus
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-LATE")
    bank = h.banks["bank-a"]
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.SUCCEEDED)) == 200
    before = await h.get("T-CB-LATE")
    usage = await h.usage()

    assert await _post(h, "bank-a", *bank.callback(order_no, late)) == (200, "SUCCESS")
    assert await h.get("T-CB-LATE") == before
    assert await h.usage() == usage


@pytest.mark.asyncio
async def test_a_stale_processing_callback_after_the_bank_reported_success_is_ignored(
    start_gateway: StartGateway,
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-ORDER")
    bank = h.banks["bank-a"]
    processing = bank.callback(order_no, BankStatus.PROCESSING)  # signed first, arrives last
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.SUCCEEDED)) == 200
    assert await h.callback("bank-a", *processing) == 200
    assert (await h.get("T-CB-ORDER"))["status"] == "succeeded"


@pytest.mark.asyncio
async def test_callbacks_move_forward_through_processing_to_succeeded(
    start_gateway: StartGateway,
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-FWD")
    bank = h.banks["bank-a"]
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.PROCESSING)) == 200
    assert (await h.get("T-CB-FWD"))["status"] == "processing"
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.SUCCEEDED)) == 200
    assert (await h.get("T-CB-FWD"))["status"] == "succeeded"


@pytest.mark.asyncio
async def test_a_replayed_nonce_is_refused_with_401_and_changes_nothing(
    start_gateway: StartGateway,
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-REPLAY")
    bank = h.banks["bank-a"]
    headers, body = bank.callback(order_no, BankStatus.PROCESSING, nonce="n-replay")
    assert await h.callback("bank-a", headers, body) == 200
    before = await h.get("T-CB-REPLAY")

    again, body2 = bank.callback(order_no, BankStatus.SUCCEEDED, nonce="n-replay")
    resp = await h.client.post("/v1/callbacks/bank-a", data=body2, headers=again)
    assert resp.status == 401
    error = (await resp.json())["error"]
    assert (error["code"], error["details"]["reason"]) == ("callback_refused", "replayed")
    assert await h.get("T-CB-REPLAY") == before


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        ({"secret": "not-the-bank"}, "bad_signature"),
        ({"timestamp": 1_000_000_000}, "stale"),
    ],
)
@pytest.mark.asyncio
async def test_an_untrusted_callback_is_refused_with_401_and_changes_nothing(
    start_gateway: StartGateway, forge: dict[str, Any], reason: str
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-FORGED")
    before = await h.get("T-CB-FORGED")
    headers, body = h.banks["bank-a"].callback(order_no, BankStatus.SUCCEEDED, **forge)
    resp = await h.client.post("/v1/callbacks/bank-a", data=body, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["details"]["reason"] == reason
    assert await h.get("T-CB-FORGED") == before


@pytest.mark.asyncio
async def test_a_refused_callback_does_not_burn_its_nonce(start_gateway: StartGateway) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-NONCE")
    bank = h.banks["bank-a"]
    headers, body = bank.callback(order_no, BankStatus.SUCCEEDED, nonce="n-1", secret="forged")
    assert await h.callback("bank-a", headers, body) == 401
    headers, body = bank.callback(order_no, BankStatus.SUCCEEDED, nonce="n-1")
    assert await h.callback("bank-a", headers, body) == 200
    assert (await h.get("T-CB-NONCE"))["status"] == "succeeded"


@pytest.mark.asyncio
async def test_a_callback_about_an_unknown_order_or_funder_is_404(
    start_gateway: StartGateway,
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-404")
    bank_a, bank_b = h.banks["bank-a"], h.banks["bank-b"]
    assert await h.callback("bank-a", *bank_a.callback("NO-SUCH-01", BankStatus.SUCCEEDED)) == 404
    # bank-b cannot settle bank-a's order, even when its own signature is valid
    assert await h.callback("bank-b", *bank_b.callback(order_no, BankStatus.SUCCEEDED)) == 404
    assert await h.callback("bank-z", *bank_a.callback(order_no, BankStatus.SUCCEEDED)) == 404
    assert (await h.get("T-CB-404"))["status"] == "sent"


@pytest.mark.asyncio
async def test_a_callback_with_another_amount_is_acknowledged_but_not_applied(
    start_gateway: StartGateway,
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-AMOUNT")
    headers, body = h.banks["bank-a"].callback(order_no, BankStatus.SUCCEEDED, amount=1)
    assert await _post(h, "bank-a", headers, body) == (200, "SUCCESS")
    assert (await h.get("T-CB-AMOUNT"))["status"] == "sent"


@pytest.mark.asyncio
async def test_a_paused_funder_still_settles_what_it_holds(start_gateway: StartGateway) -> None:
    """Pausing a funder (a restart with `paused = true`) stops new payouts to it; what it
    already holds is still settled by its callbacks."""
    h, order_no = await _sent(start_gateway, "T-CB-PAUSED")
    paused = await start_gateway(banks=h.banks, funders={"bank-a": {"paused": True}})
    bank = h.banks["bank-a"]
    assert await paused.callback("bank-a", *bank.callback(order_no, BankStatus.SUCCEEDED)) == 200
    assert (await paused.get("T-CB-PAUSED"))["status"] == "succeeded"
    assert (await paused.accepted("T-CB-AFTER", funder_hint="bank-a"))["funder_id"] == "bank-b"


@pytest.mark.asyncio
async def test_a_callback_about_an_order_this_process_sent_is_decided_without_reading_it(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, order_no = await _sent(start_gateway, "T-CB-RECENT")
    reads: list[str] = []
    read = q.attempt_by_order

    async def counted(conn: Any, order: str) -> Any:
        reads.append(order)
        return await read(conn, order)

    monkeypatch.setattr(q, "attempt_by_order", counted)
    bank = h.banks["bank-a"]
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.PROCESSING)) == 200
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.SUCCEEDED)) == 200
    assert reads == []
    assert (await h.get("T-CB-RECENT"))["status"] == "succeeded"
    # terminal: forgotten, so a late report reads the attempt (and changes nothing)
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.PROCESSING)) == 200
    assert reads == [order_no]
    assert (await h.get("T-CB-RECENT"))["status"] == "succeeded"


@pytest.mark.asyncio
async def test_a_remembered_attempt_another_process_moved_is_read_again(
    start_gateway: StartGateway,
) -> None:
    """The sender remembers the attempt as `sent`; another process applies `processing`;
    the sender's row is then stale, and its callback is decided from the attempt as it is."""
    h, order_no = await _sent(start_gateway, "T-CB-TWO")
    other = await start_gateway(banks=h.banks)
    bank = h.banks["bank-a"]
    assert h.svc.recent.get(order_no) is not None
    assert await other.callback("bank-a", *bank.callback(order_no, BankStatus.PROCESSING)) == 200
    assert h.svc.recent.get(order_no)["status"] == "sent"  # type: ignore[index]
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.SUCCEEDED)) == 200
    d = await h.get("T-CB-TWO")
    assert d["status"] == "succeeded"
    assert [a["status"] for a in d["attempts"]] == ["succeeded"]
    kinds = [
        v["event"]["status"]
        for v in await h.vouchers("T-CB-TWO")
        if v["kind"].startswith("disbursement.")
    ]
    assert kinds == ["accepted", "sent", "processing", "succeeded"]
    # a stale duplicate from the sender's memory changes nothing either
    assert await h.callback("bank-a", *bank.callback(order_no, BankStatus.PROCESSING)) == 200
    assert (await h.get("T-CB-TWO"))["status"] == "succeeded"


@pytest.mark.asyncio
async def test_a_bank_paying_an_order_failed_over_from_is_acknowledged_and_raised(
    start_gateway: StartGateway,
) -> None:
    """The report is stale (nothing moves, the bank gets its acknowledgement), but money may
    have moved twice: it is counted for the FundgateBankPaidAfterFailure alert."""
    from tests.fakes import SUCCEED, reject

    h = await start_gateway()
    await h.register()
    h.banks["bank-a"].script(reject(pre_execution=True))
    h.banks["bank-b"].script(SUCCEED)
    await h.accepted("T-CB-TWICE")
    d = await h.wait_status("T-CB-TWICE", "succeeded")
    first = d["attempts"][0]
    assert (first["funder_id"], first["status"]) == ("bank-a", "failed")

    def paid_after_failure() -> float:
        value = h.svc.metrics.registry.get_sample_value(
            "fundgate_callbacks_paid_after_failure_total", {"funder": "bank-a"}
        )
        return value or 0.0

    bank = h.banks["bank-a"]
    headers, body = bank.callback(first["order_no"], BankStatus.SUCCEEDED)
    assert await h.callback("bank-a", headers, body) == 200
    assert paid_after_failure() == 1
    d = await h.get("T-CB-TWICE")
    assert [(a["funder_id"], a["status"]) for a in d["attempts"]] == [
        ("bank-a", "failed"),
        ("bank-b", "succeeded"),
    ]
    # a report that the failed order failed is no such news
    assert await h.callback("bank-a", *bank.callback(first["order_no"], BankStatus.FAILED)) == 200
    assert paid_after_failure() == 1
