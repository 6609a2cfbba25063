"""Dispatch outcomes with the real dispatcher and poller: every bank answer class, fail-over
only after a pre-execution rejection, `unknown` resolved by querying, and money moving at
most once (the FakeBank ledger is the oracle)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from connectors.base import BankStatus
from gateway.store import queries as q
from tests.fakes import ACCEPT, NOT_SENT, SUCCEED, reject, unknown
from tests.integration.conftest import (
    AMOUNT,
    Harness,
    LendingCore,
    StartGateway,
    eventually,
    make_config,
)

pytestmark = pytest.mark.integration

SHARE_B = (AMOUNT * 3 + 9) // 10  # ceil(amount × 0.30), bank-b's platform share


async def _started(start_gateway: StartGateway, **kw: Any) -> Harness:
    h = await start_gateway(**kw)
    await h.register()
    return h


def kinds(vouchers: list[dict[str, object]]) -> list[object]:
    return [v["kind"] for v in vouchers]


@pytest.mark.asyncio
async def test_accepted_payout_is_sent_then_a_callback_makes_it_succeeded(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    body = await h.accepted("T-ACCEPT")
    assert body["status"] == "accepted"
    assert body["funder_id"] == "bank-a"
    sent = await h.wait_status("T-ACCEPT", "sent")
    order_no = sent["attempts"][0]["order_no"]
    assert sent["attempts"][0]["bank_ref"] == h.banks["bank-a"].ledger[order_no].bank_ref

    h.banks["bank-a"].settle(order_no, BankStatus.SUCCEEDED)
    headers, raw = h.banks["bank-a"].callback(order_no, BankStatus.SUCCEEDED)
    assert await h.callback("bank-a", headers, raw) == 200
    done = await h.wait_status("T-ACCEPT", "succeeded")
    assert done["attempts"][0]["status"] == "succeeded"
    assert h.banks["bank-a"].executions == {order_no: 1}
    assert h.banks["bank-b"].calls == []
    assert await h.outbox("dispatch") == []
    h.assert_paid_at_most_once()


@pytest.mark.asyncio
async def test_pre_execution_rejection_fails_over_to_the_next_funder_and_moves_the_limits(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    prefund_before = await h.prefund()
    h.banks["bank-a"].script(reject(pre_execution=True))
    h.banks["bank-b"].script(SUCCEED)
    await h.accepted("T-FAILOVER")

    d = await h.wait_status("T-FAILOVER", "succeeded")
    assert d["funder_id"] == "bank-b"
    assert d["mode"] == "co_lending"
    assert d["allocation"] == {"funder": AMOUNT - SHARE_B, "platform": SHARE_B}
    a1, a2 = d["attempts"]
    assert (a1["n"], a1["funder_id"], a1["status"]) == (1, "bank-a", "failed")
    assert a1["error"]["pre_execution"] is True
    assert (a2["n"], a2["funder_id"], a2["status"]) == (2, "bank-b", "succeeded")
    assert a2["order_no"] != a1["order_no"]

    usage = await h.usage()
    assert usage[q.funder_scope("bank-a")] == 0
    assert usage[q.funder_scope("bank-b")] == AMOUNT
    assert usage[q.PLATFORM_SCOPE] == AMOUNT
    assert await h.prefund() == prefund_before - SHARE_B
    assert h.banks["bank-a"].executions == {}
    assert h.banks["bank-b"].executions == {a2["order_no"]: 1}
    assert "disbursement.rerouted" in kinds(await h.vouchers("T-FAILOVER"))


async def _open_circuit(h: Harness, funder_id: str) -> None:
    """As another process publishes an open circuit (`dispatcher.note_circuit`)."""
    async with h.pool.acquire() as conn:
        await q.save_circuit(conn, funder_id, "open", 5, datetime.now(UTC) + timedelta(hours=1))


@pytest.mark.asyncio
async def test_fail_over_prefers_a_funder_whose_circuit_is_closed(
    start_gateway: StartGateway, lending_core: LendingCore
) -> None:
    base = make_config(lending_core.url)
    bank_c = base.funders[0].model_copy(update={"id": "bank-c", "priority": 3})
    cfg = base.model_copy(update={"funders": [*base.funders, bank_c]})
    h = await _started(start_gateway, cfg=cfg)
    await _open_circuit(h, "bank-b")  # next in priority, but its bank keeps failing
    h.banks["bank-a"].script(reject(pre_execution=True))
    h.banks["bank-c"].script(SUCCEED)
    await h.accepted("T-CIRCUIT")

    d = await h.wait_status("T-CIRCUIT", "succeeded")
    assert [a["funder_id"] for a in d["attempts"]] == ["bank-a", "bank-c"]
    assert h.banks["bank-b"].calls == []


@pytest.mark.asyncio
async def test_fail_over_to_an_open_circuit_rather_than_failing_the_disbursement(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    await _open_circuit(h, "bank-b")  # the only funder left: its payout waits, it is not lost
    h.banks["bank-a"].script(reject(pre_execution=True))
    h.banks["bank-b"].script(SUCCEED)
    await h.accepted("T-LAST-RESORT")

    d = await h.wait_status("T-LAST-RESORT", "succeeded")
    assert [a["funder_id"] for a in d["attempts"]] == ["bank-a", "bank-b"]


@pytest.mark.asyncio
async def test_rejection_after_execution_started_fails_without_fail_over(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    h.banks["bank-a"].script(reject(pre_execution=False))
    await h.accepted("T-REJECT-LATE")

    d = await h.wait_status("T-REJECT-LATE", "failed")
    assert d["funder_id"] == "bank-a"
    assert [a["status"] for a in d["attempts"]] == ["failed"]
    assert d["failure"]["pre_execution"] is False
    assert h.banks["bank-b"].calls == []
    usage = await h.usage()
    assert usage[q.funder_scope("bank-a")] == 0
    assert usage[q.PLATFORM_SCOPE] == 0


@pytest.mark.asyncio
async def test_not_sent_is_retried_at_the_same_funder_then_fails_over(
    start_gateway: StartGateway,
) -> None:
    retries = 2
    h = await _started(start_gateway, dispatch={"not_sent_retries": retries})
    h.banks["bank-a"].script(*[NOT_SENT] * (retries + 1))
    await h.accepted("T-NOTSENT")

    d = await h.wait_status("T-NOTSENT", "sent")
    assert d["funder_id"] == "bank-b"
    a1, a2 = d["attempts"]
    assert a1["status"] == "failed"
    assert a1["error"]["not_sent"] == retries + 1
    assert len(h.banks["bank-a"].calls_for(a1["order_no"])) == retries + 1
    assert h.banks["bank-a"].executions == {}
    assert h.banks["bank-b"].executions == {a2["order_no"]: 1}
    usage = await h.usage()
    assert usage[q.funder_scope("bank-a")] == 0
    assert usage[q.funder_scope("bank-b")] == AMOUNT


@pytest.mark.asyncio
async def test_not_sent_fewer_times_than_the_retries_stays_at_the_same_funder(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway, dispatch={"not_sent_retries": 2})
    h.banks["bank-a"].script(NOT_SENT, NOT_SENT, ACCEPT)
    await h.accepted("T-NOTSENT-2")

    d = await h.wait_status("T-NOTSENT-2", "sent")
    assert d["funder_id"] == "bank-a"
    assert len(d["attempts"]) == 1
    assert len(h.banks["bank-a"].calls_for(d["attempts"][0]["order_no"])) == 3
    assert h.banks["bank-b"].calls == []


@pytest.mark.asyncio
async def test_outcome_unknown_is_resolved_by_query_when_the_bank_executed(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    bank = h.banks["bank-a"]
    bank.script(unknown(executed=True, then=BankStatus.SUCCEEDED))
    await h.accepted("T-UNKNOWN-PAID")

    d = await h.wait_status("T-UNKNOWN-PAID", "succeeded")
    order_no = d["attempts"][0]["order_no"]
    assert d["funder_id"] == "bank-a"
    assert len(d["attempts"]) == 1
    events = [(v["kind"], v["event"].get("source")) for v in await h.vouchers("T-UNKNOWN-PAID")]
    assert ("disbursement.unknown", "dispatch") in events
    assert ("disbursement.succeeded", "query") in events
    assert len(bank.calls_for(order_no)) == 1  # resolved by asking, never by re-sending
    assert order_no in bank.queries
    assert bank.executions == {order_no: 1}
    assert h.banks["bank-b"].calls == []
    usage = await h.usage()
    assert usage[q.funder_scope("bank-a")] == AMOUNT


@pytest.mark.asyncio
async def test_outcome_unknown_never_fails_over_while_the_bank_is_still_processing(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    bank = h.banks["bank-a"]
    bank.script(unknown(executed=True, then=BankStatus.PROCESSING))
    await h.accepted("T-UNKNOWN-SLOW")

    d = await h.wait_status("T-UNKNOWN-SLOW", "processing", "unknown")
    order_no = d["attempts"][0]["order_no"]

    async def queried_thrice() -> bool:
        return bank.queries.count(order_no) >= 3

    await eventually(queried_thrice, "the poller to query three times")
    d = await h.get("T-UNKNOWN-SLOW")
    assert d["status"] == "processing"
    assert h.banks["bank-b"].calls == []
    assert len(d["attempts"]) == 1

    bank.settle(order_no, BankStatus.SUCCEEDED)
    await h.wait_status("T-UNKNOWN-SLOW", "succeeded")
    assert bank.executions == {order_no: 1}
    assert len(bank.calls_for(order_no)) == 1


@pytest.mark.asyncio
async def test_outcome_unknown_never_executed_is_resent_with_the_same_order_number(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    bank = h.banks["bank-a"]
    bank.script(unknown(executed=False))
    await h.accepted("T-UNKNOWN-LOST")

    async def resent() -> bool:
        return len(bank.calls) >= 2

    await eventually(resent, "the order to be re-sent after the bank said NOT_FOUND")
    d = await h.wait_status("T-UNKNOWN-LOST", "processing")
    order_no = d["attempts"][0]["order_no"]
    assert [c.order_no for c in bank.calls] == [order_no, order_no]
    assert len(d["attempts"]) == 1
    assert h.banks["bank-b"].calls == []
    assert bank.executions == {order_no: 1}

    bank.settle(order_no, BankStatus.SUCCEEDED)
    await h.wait_status("T-UNKNOWN-LOST", "succeeded")
    assert bank.executions == {order_no: 1}
    assert len(bank.calls_for(order_no)) == 2


@pytest.mark.asyncio
async def test_repeated_unknowns_on_resend_still_execute_the_order_once(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    bank = h.banks["bank-a"]
    bank.script(unknown(executed=False), unknown(executed=True, then=BankStatus.SUCCEEDED))
    await h.accepted("T-UNKNOWN-TWICE")
    d = await h.wait_status("T-UNKNOWN-TWICE", "succeeded")
    order_no = d["attempts"][0]["order_no"]
    assert bank.executions == {order_no: 1}
    assert h.banks["bank-b"].calls == []


@pytest.mark.asyncio
async def test_failed_query_answer_fails_the_disbursement_and_releases_its_limits(
    start_gateway: StartGateway,
) -> None:
    h = await _started(start_gateway)
    bank = h.banks["bank-a"]
    await h.accepted("T-QUERY-FAILED")
    d = await h.wait_status("T-QUERY-FAILED", "sent")
    bank.settle(d["attempts"][0]["order_no"], BankStatus.FAILED)
    d = await h.wait_status("T-QUERY-FAILED", "failed")
    assert d["failure"]["code"] == "refused"
    assert h.banks["bank-b"].calls == []
    usage = await h.usage()
    assert usage[q.funder_scope("bank-a")] == 0
    assert usage[q.PLATFORM_SCOPE] == 0


@pytest.mark.asyncio
async def test_many_disbursements_with_mixed_bank_answers_pay_each_at_most_once(
    start_gateway: StartGateway,
) -> None:
    # intake first, dispatch after: this proves the outcomes, not intake/failure concurrency
    # (test_limits.py::test_intake_alongside_a_failing_payout_never_deadlocks covers that)
    api = await _started(start_gateway, role="api", dispatch={"not_sent_retries": 1})
    a = api.banks["bank-a"]
    steps = [
        ACCEPT,
        SUCCEED,
        reject(pre_execution=True),
        reject(pre_execution=False),
        unknown(executed=True, then=BankStatus.SUCCEEDED),
        unknown(executed=False),
        NOT_SENT,
    ]
    txns = [f"T-MIX-{i:02d}" for i in range(28)]
    for i, txn in enumerate(txns):
        a.script(steps[i % len(steps)], order_no=f"{txn}-01")
    for txn in txns:
        await api.accepted(txn)
    h = await start_gateway(role="all", banks=api.banks, dispatch={"not_sent_retries": 1})

    async def all_settled() -> bool:
        for txn in txns:
            d = await h.get(txn)
            if d["status"] in ("sent", "processing"):
                order = d["attempts"][-1]
                bank = h.banks[order["funder_id"]]
                entry = bank.ledger.get(order["order_no"])
                if entry is not None and entry.status != BankStatus.SUCCEEDED:
                    bank.settle(order["order_no"], BankStatus.SUCCEEDED)
            if d["status"] not in ("succeeded", "failed"):
                return False
        return True

    await eventually(all_settled, "every disbursement to reach a terminal state")
    statuses = [(await h.get(t))["status"] for t in txns]
    assert statuses.count("failed") == 4  # the post-execution rejections only
    h.assert_paid_at_most_once()
    paid = {**a.executed_txns(), **h.banks["bank-b"].executed_txns()}
    assert sorted(t for t, n in paid.items() if n) == sorted(
        t for t, s in zip(txns, statuses, strict=True) if s == "succeeded"
    )


@pytest.mark.asyncio
async def test_a_fail_over_chosen_as_a_deadlock_victim_is_done_again_not_left_to_its_lease(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left to its lease, the row would come back as a send without a recorded outcome,
    which is never failed over: the disbursement would end failed with bank-b untried."""
    import asyncpg

    from gateway import dispatcher

    h = await _started(start_gateway)
    h.banks["bank-a"].script(reject(pre_execution=True))
    h.banks["bank-b"].script(SUCCEED)
    real = dispatcher.fail_over
    victims: list[str] = []

    async def deadlocked_once(*args: Any, **kw: Any) -> Any:
        if not victims:
            victims.append("once")
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return await real(*args, **kw)

    monkeypatch.setattr(dispatcher, "fail_over", deadlocked_once)
    await h.accepted("T-FO-DEADLOCK")
    d = await h.wait_status("T-FO-DEADLOCK", "succeeded")
    assert victims == ["once"]
    assert [(a["funder_id"], a["status"]) for a in d["attempts"]] == [
        ("bank-a", "failed"),
        ("bank-b", "succeeded"),
    ]
    usage = await h.usage()
    assert (usage[q.funder_scope("bank-a")], usage[q.funder_scope("bank-b")]) == (0, AMOUNT)


@pytest.mark.asyncio
async def test_a_payout_the_bank_holds_without_an_outcome_shows_its_age(
    start_gateway: StartGateway,
) -> None:
    """`fundgate_attempts_at_bank_oldest_age_seconds` (FundgatePayoutsWaitingAtBank): how
    long the oldest sent or processing payout has waited; 0 for a funder with none."""
    from gateway import housekeeping

    h = await _started(start_gateway)
    h.banks["bank-a"].script(ACCEPT)
    await h.accepted("T-AT-BANK")
    await h.wait_status("T-AT-BANK", "sent")
    async with h.pool.acquire() as conn:
        await conn.execute("UPDATE attempts SET updated_at = now() - interval '5 hours'")
    await housekeeping.refresh(h.svc)

    def age(funder: str) -> float | None:
        return h.svc.metrics.registry.get_sample_value(
            "fundgate_attempts_at_bank_oldest_age_seconds", {"funder": funder}
        )

    assert 5 * 3600 <= (age("bank-a") or 0) < 5 * 3600 + 60
    assert age("bank-b") == 0
    # a payout the bank holds is not an unknown one: that gauge, read in the same pass, is 0
    unknown = h.svc.metrics.registry.get_sample_value(
        "fundgate_attempts_unknown_oldest_age_seconds", {"funder": "bank-a"}
    )
    assert unknown == 0
