"""State transitions in one statement (`fg_move`, migration 0013): a move decided from an
attempt read without a lock is written only if the attempt has not moved meanwhile, and
whatever races, each state change happens once, with one voucher, one ledger posting, one
limit release and one webhook."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from connectors.base import BankStatus, PayoutResult
from gateway import outcomes
from gateway.disbursements import load_resource
from gateway.dispatcher import Dispatcher
from gateway.store import queries as q
from tests.integration.conftest import Harness, StartGateway, eventually

pytestmark = pytest.mark.integration


async def _accepted(start_gateway: StartGateway, txn_no: str) -> tuple[Harness, asyncpg.Record]:
    """An accepted disbursement nobody dispatches (api role), and its attempt as read now."""
    h = await start_gateway(role="api")
    await h.register()
    await h.accepted(txn_no)
    async with h.pool.acquire() as conn:
        d = await q.find_by_txn(conn, txn_no)
        assert d is not None
        a = await conn.fetchrow("SELECT id FROM attempts WHERE disbursement_id = $1", d["id"])
        assert a is not None
        row = await q.load_attempt(conn, a["id"])
    assert row is not None
    return h, row


async def _counts(h: Harness, a: asyncpg.Record) -> dict[str, Any]:
    async with h.pool.acquire() as conn:
        kinds = await conn.fetch(
            "SELECT kind, count(*) AS n FROM voucher_events WHERE txn_no = $1 GROUP BY kind",
            a["txn_no"],
        )
        ledger = await conn.fetch(
            "SELECT kind, count(*) AS n FROM ledger_transactions WHERE txn_no = $1 GROUP BY kind",
            a["txn_no"],
        )
        webhooks = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE kind = 'webhook' AND ref_id = $1",
            a["disbursement_id"],
        )
        status = await conn.fetchval("SELECT status FROM attempts WHERE id = $1", a["id"])
        d_status = await conn.fetchval(
            "SELECT status FROM disbursements WHERE id = $1", a["disbursement_id"]
        )
    return {
        "vouchers": {r["kind"]: r["n"] for r in kinds},
        "ledger": {r["kind"]: r["n"] for r in ledger},
        "webhooks": webhooks,
        "status": (status, d_status),
    }


async def _nonces(h: Harness) -> set[str]:
    async with h.pool.acquire() as conn:
        return {r["nonce"] for r in await conn.fetch("SELECT nonce FROM callback_nonces")}


@pytest.mark.asyncio
async def test_a_move_decided_from_a_stale_read_writes_nothing_and_is_decided_again(
    start_gateway: StartGateway,
) -> None:
    h, stale = await _accepted(start_gateway, "T-TR-STALE")
    svc = h.svc
    async with h.pool.acquire() as conn:
        async with conn.transaction():  # someone else records the bank's acceptance first
            locked = await q.lock_attempt(conn, stale["id"])
            assert locked is not None
            assert await outcomes.move(conn, svc, locked, "sent", source="test")
        before = await _counts(h, stale)

        settle = outcomes.Settle(nonce=("bank-a", "n-stale"))
        with pytest.raises(outcomes.Stale):
            await outcomes.apply_bank_status(
                conn, svc, stale, BankStatus.SUCCEEDED, bank_ref="R1", source="test",
                settle=settle,
            )  # fmt: skip
        assert await _counts(h, stale) == before
        assert "n-stale" not in await _nonces(h)  # a stale decision spends no nonce

        async def decide(a: asyncpg.Record) -> bool:
            return await outcomes.apply_bank_status(
                conn, svc, a, BankStatus.SUCCEEDED, bank_ref="R1", source="test", settle=settle
            )

        assert await outcomes.retry_stale(conn, stale, decide) is True
        after = await _counts(h, stale)
        assert after["status"] == ("succeeded", "succeeded")
        assert after["vouchers"]["disbursement.succeeded"] == 1
        assert after["vouchers"]["disbursement.sent"] == 1
        assert after["ledger"]["disbursement.paid"] == 1
        assert after["webhooks"] == 1
        assert "n-stale" in await _nonces(h)

        # the same nonce again, on an up-to-date read: refused, nothing written
        fresh = await q.load_attempt(conn, stale["id"])
        assert fresh is not None
        with pytest.raises(outcomes.Replayed):
            await outcomes.apply_bank_status(
                conn, svc, fresh, BankStatus.FAILED, bank_ref="R1", source="test", settle=settle
            )
        assert await _counts(h, stale) == after


@pytest.mark.asyncio
async def test_the_dispatchers_record_after_the_callback_only_settles_its_outbox_row(
    start_gateway: StartGateway,
) -> None:
    h, before_call = await _accepted(start_gateway, "T-TR-LATE")
    svc = h.svc
    async with h.pool.acquire() as conn:
        [row] = await q.claim(conn, "dispatch", 10, 30)
        # the bank's callback of success overtakes the answer to the payout request
        fresh = await q.load_attempt(conn, before_call["id"])
        assert fresh is not None
        assert await outcomes.apply_bank_status(
            conn, svc, fresh, BankStatus.SUCCEEDED, bank_ref="R2", source="callback",
            settle=outcomes.Settle(nonce=("bank-a", "n-late")),
        )  # fmt: skip
    answer = PayoutResult(order_no=before_call["order_no"], status=BankStatus.ACCEPTED)
    await Dispatcher(svc)._record(row, before_call, answer)

    counts = await _counts(h, before_call)
    assert counts["status"] == ("succeeded", "succeeded")
    assert "disbursement.sent" not in counts["vouchers"]
    assert counts["vouchers"]["disbursement.succeeded"] == 1
    assert counts["webhooks"] == 1
    assert await h.outbox("dispatch") == []


@pytest.mark.parametrize("statuses", [["succeeded"] * 8, ["succeeded", "failed"] * 4])
@pytest.mark.asyncio
async def test_racing_reports_move_the_attempt_once(
    start_gateway: StartGateway, statuses: list[str]
) -> None:
    h, stale = await _accepted(start_gateway, f"T-TR-RACE-{len(set(statuses))}")
    svc = h.svc
    usage_accepted = await h.usage()
    bank = {"succeeded": BankStatus.SUCCEEDED, "failed": BankStatus.FAILED}

    async def report(i: int, status: str) -> bool:
        async with h.pool.acquire() as conn:

            async def decide(a: asyncpg.Record) -> bool:
                return await outcomes.apply_bank_status(
                    conn, svc, a, bank[status], bank_ref=f"R{i}", source="test",
                    settle=outcomes.Settle(nonce=("bank-a", f"n-race-{i}")),
                )  # fmt: skip

            return await outcomes.retry_stale(conn, stale, decide)

    moved = await asyncio.gather(*(report(i, s) for i, s in enumerate(statuses)))
    assert sum(moved) == 1
    counts = await _counts(h, stale)
    final = counts["status"][0]
    assert counts["status"] == (final, final)
    assert counts["vouchers"][f"disbursement.{final}"] == 1
    assert counts["webhooks"] == 1
    ledger_kind = "disbursement.paid" if final == "succeeded" else "disbursement.released"
    assert counts["ledger"] == {"disbursement.accepted": 1, ledger_kind: 1}
    usage = await h.usage()
    if final == "failed":  # released exactly once: back to nothing used
        assert all(v == 0 for v in usage.values()), usage
    else:
        assert usage == usage_accepted
    assert len(await _nonces(h)) == len(statuses)  # every report's nonce is spent


@pytest.mark.asyncio
async def test_the_webhook_body_rendered_in_sql_is_the_api_resource(
    start_gateway: StartGateway,
) -> None:
    h, a = await _accepted(start_gateway, "T-TR-RENDER")
    svc = h.svc
    async with h.pool.acquire() as conn:
        assert await outcomes.move(
            conn, svc, a, "failed", bank_ref="R3", source="test",
            error={"code": "ACCOUNT_FROZEN", "message": "frozen 冻结", "pre_execution": False},
        )  # fmt: skip
        payload = await conn.fetchval(
            "SELECT payload FROM outbox WHERE kind = 'webhook' AND ref_id = $1",
            a["disbursement_id"],
        )
        assert payload == await load_resource(conn, a["disbursement_id"])
        assert payload["status"] == "failed"
        assert payload["failure"]["code"] == "ACCOUNT_FROZEN"
        # timestamps with and without a fraction of a second, as Python's isoformat writes them
        for at in ("2026-11-25 01:02:03+00", "2026-11-25 01:02:03.000450+00"):
            await conn.execute(
                "UPDATE disbursements SET created_at = $2::text::timestamptz,"
                " updated_at = $2::text::timestamptz WHERE id = $1",
                a["disbursement_id"],
                at,
            )
            rendered = await conn.fetchval("SELECT fg_resource($1)", a["disbursement_id"])
            expected = await load_resource(conn, a["disbursement_id"])
            assert json.dumps(rendered, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert expected["created_at"] == "2026-11-25T01:02:03.000450Z"


@pytest.mark.asyncio
async def test_a_callback_and_the_webhook_it_causes_go_end_to_end(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway()
    await h.register()
    await h.accepted("T-TR-E2E")
    d = await h.wait_status("T-TR-E2E", "sent")
    order_no = d["attempts"][0]["order_no"]
    assert await h.callback("bank-a", *h.banks["bank-a"].callback(order_no, BankStatus.FAILED))
    await eventually(lambda: _delivered(h), "the outcome webhook")
    [delivery] = h.core.deliveries
    assert json.loads(delivery.body) == await h.get("T-TR-E2E")


async def _delivered(h: Harness) -> bool:
    return bool(h.core.deliveries) and await h.outbox("webhook") == []
