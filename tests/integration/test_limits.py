"""Daily limits under concurrency, their release on failure, co-lending prefund, and the
business day (Asia/Shanghai) that keys the usage."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.store import queries as q
from tests.fakes import SUCCEED, reject
from tests.integration.conftest import (
    ACCOUNT,
    AMOUNT,
    AUTH,
    Harness,
    StartGateway,
    eventually,
)

pytestmark = pytest.mark.integration

ODD_AMOUNT = 1_000_001  # ceil(1_000_001 × 0.30) = 300_001: the platform share rounds up
ODD_SHARE = 300_001
NO_PREFUND = {"bank-b": {"prefund_balance": 0}}


async def _gateway(start_gateway: StartGateway, **kw: Any) -> Harness:
    h = await start_gateway(**kw)
    await h.register()
    return h


async def _burst(
    h: Harness, prefix: str, n: int, amount: int = AMOUNT, **over: Any
) -> list[tuple[int, dict[str, Any]]]:
    return await asyncio.gather(
        *(h.disburse(f"{prefix}-{i:03d}", amount, **over) for i in range(n))
    )


async def _count_disbursements(h: Harness) -> int:
    async with h.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM disbursements"))


@pytest.mark.asyncio
async def test_concurrent_intake_never_overshoots_a_funders_daily_limit(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(
        start_gateway,
        role="api",
        funders={"bank-a": {"daily_limit": 10 * AMOUNT, "single_max": AMOUNT}, **NO_PREFUND},
    )
    results = await _burst(h, "T-FLIM", 60)

    accepted = [b for s, b in results if s == 201]
    refused = [b for s, b in results if s != 201]
    assert len(accepted) == 10
    assert {s for s, _ in results} == {201, 422}
    assert {b["error"]["code"] for b in refused} == {"limit_exceeded"}
    assert all(b["funder_id"] == "bank-a" for b in accepted)
    usage = await h.usage()
    assert usage[q.funder_scope("bank-a")] == 10 * AMOUNT
    assert usage[q.PLATFORM_SCOPE] == 10 * AMOUNT
    assert usage.get(q.funder_scope("bank-b"), 0) == 0
    assert await _count_disbursements(h) == 10  # a refused intake leaves no row behind


@pytest.mark.asyncio
async def test_concurrent_intake_never_overshoots_the_platform_daily_limit(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(start_gateway, role="api", gateway={"platform_daily_limit": 10 * AMOUNT})
    results = await _burst(h, "T-PLIM", 60)

    accepted = [b for s, b in results if s == 201]
    refused = [b for s, b in results if s != 201]
    assert len(accepted) == 10
    assert {b["error"]["code"] for b in refused} == {"limit_exceeded"}
    usage = await h.usage()
    assert usage[q.PLATFORM_SCOPE] == 10 * AMOUNT
    funders_used = sum(usage.get(q.funder_scope(f), 0) for f in ("bank-a", "bank-b"))
    assert funders_used == 10 * AMOUNT
    assert await _count_disbursements(h) == 10


@pytest.mark.asyncio
async def test_a_failed_disbursement_releases_funder_and_platform_usage_and_the_prefund(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(start_gateway)
    prefund = await h.prefund()
    h.banks["bank-b"].script(reject(pre_execution=False))
    body = await h.accepted("T-REL", ODD_AMOUNT, funder_hint="bank-b")
    assert body["funder_id"] == "bank-b"
    assert await h.prefund() == prefund - ODD_SHARE

    await h.wait_status("T-REL", "failed")
    usage = await h.usage()
    assert usage[q.funder_scope("bank-b")] == 0
    assert usage[q.PLATFORM_SCOPE] == 0
    assert await h.prefund() == prefund


@pytest.mark.asyncio
async def test_a_disbursement_every_funder_refused_releases_everything(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(start_gateway)
    prefund = await h.prefund()
    h.banks["bank-a"].script(reject(pre_execution=True))
    h.banks["bank-b"].script(reject(pre_execution=True))
    await h.accepted("T-NOBODY", ODD_AMOUNT)

    d = await h.wait_status("T-NOBODY", "failed")
    assert [a["funder_id"] for a in d["attempts"]] == ["bank-a", "bank-b"]
    usage = await h.usage()
    assert usage[q.funder_scope("bank-a")] == 0
    assert usage[q.funder_scope("bank-b")] == 0
    assert usage[q.PLATFORM_SCOPE] == 0
    assert await h.prefund() == prefund


@pytest.mark.asyncio
async def test_a_disbursement_no_funder_is_left_for_reports_no_funder_left(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(start_gateway)
    h.banks["bank-a"].script(reject(pre_execution=True))
    h.banks["bank-b"].script(reject(pre_execution=True))
    await h.accepted("T-NOBODY-CODE")

    d = await h.wait_status("T-NOBODY-CODE", "failed")
    assert d["failure"]["code"] == "no_funder_left"
    assert d["attempts"][-1]["error"]["code"] == "refused"  # the bank's own code stays there


@pytest.mark.asyncio
async def test_a_succeeded_disbursement_keeps_its_usage_and_prefund(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(start_gateway)
    prefund = await h.prefund()
    h.banks["bank-b"].script(SUCCEED)
    await h.accepted("T-KEEP", ODD_AMOUNT, funder_hint="bank-b")

    await h.wait_status("T-KEEP", "succeeded")
    usage = await h.usage()
    assert usage[q.funder_scope("bank-b")] == ODD_AMOUNT
    assert usage[q.PLATFORM_SCOPE] == ODD_AMOUNT
    assert await h.prefund() == prefund - ODD_SHARE


async def _lock_waiters(h: Harness) -> int:
    async with h.pool.acquire() as conn:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        )


@pytest.mark.asyncio
async def test_intake_alongside_a_failing_payout_never_deadlocks(
    start_gateway: StartGateway,
) -> None:
    """Intake reserves platform then funder; a failure releases them. Held in a deterministic
    interleaving (the funder's usage row locked by the test), both must still commit."""
    api = await _gateway(start_gateway, role="api")
    api.banks["bank-a"].default = reject(pre_execution=False)
    await api.accepted("T-DL-1")
    async with api.pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM limit_usage WHERE scope = $1 AND business_day = $2 FOR UPDATE",
            q.funder_scope("bank-a"),
            api.svc.business_day(),
        )
        # the worker fails T-DL-1 and waits for the funder row ...
        await start_gateway(role="worker", banks=api.banks)

        async def waiters(n: int) -> bool:
            return await _lock_waiters(api) >= n

        await eventually(lambda: waiters(1), "the failure to wait for the funder usage row")
        # ... then intake takes the platform row and waits for the funder row too
        intake = asyncio.create_task(api.disburse("T-DL-2"))
        await eventually(lambda: waiters(2), "the intake to wait for the funder usage row")
        await tx.rollback()

    status, body = await intake
    assert status == 201, body
    # well before the 5 s lease would bring a deadlock victim back
    await eventually(lambda: _failed(api, "T-DL-1"), "T-DL-1 to fail", timeout=3)
    await api.wait_status("T-DL-2", "failed")
    usage = await api.usage()
    assert usage[q.funder_scope("bank-a")] == 0
    assert usage[q.PLATFORM_SCOPE] == 0


async def _failed(h: Harness, txn_no: str) -> bool:
    return bool((await h.get(txn_no))["status"] == "failed")


# ---------------------------------------------------------------- co-lending


@pytest.mark.asyncio
async def test_co_lending_reserves_the_rounded_up_platform_share_from_the_prefund(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(start_gateway, role="api")
    prefund = await h.prefund()
    body = await h.accepted("T-CO", ODD_AMOUNT, funder_hint="bank-b")
    assert body["funder_id"] == "bank-b"
    assert body["mode"] == "co_lending"
    assert body["allocation"] == {"funder": ODD_AMOUNT - ODD_SHARE, "platform": ODD_SHARE}
    assert await h.prefund() == prefund - ODD_SHARE
    usage = await h.usage()
    assert usage[q.funder_scope("bank-b")] == ODD_AMOUNT
    assert usage.get(q.funder_scope("bank-a"), 0) == 0


@pytest.mark.asyncio
async def test_insufficient_prefund_makes_the_co_lending_funder_ineligible(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(
        start_gateway,
        role="api",
        funders={"bank-b": {"prefund_balance": ODD_SHARE - 1}},
    )
    body = await h.accepted("T-PREFUND-HINT", ODD_AMOUNT, funder_hint="bank-b")
    assert body["funder_id"] == "bank-a"  # the hint is ineligible: the next funder takes it
    assert await h.prefund() == ODD_SHARE - 1


@pytest.mark.asyncio
async def test_insufficient_prefund_is_a_limit_refusal_when_no_funder_is_left(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(
        start_gateway,
        role="api",
        funders={
            "bank-a": {"single_max": AMOUNT, "daily_limit": 100 * AMOUNT},
            "bank-b": {"prefund_balance": ODD_SHARE - 1},
        },
    )
    status, body = await h.disburse("T-PREFUND-LIMIT", ODD_AMOUNT)
    assert status == 422
    assert body["error"]["code"] == "limit_exceeded"
    reasons = {f: r["reason"] for f, r in body["error"]["details"]["funders"].items()}
    assert reasons == {"bank-a": "single_max", "bank-b": "prefund_insufficient"}


@pytest.mark.asyncio
async def test_insufficient_prefund_with_no_other_eligible_funder_is_no_eligible_funder(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(
        start_gateway,
        role="api",
        funders={"bank-a": {"min_amount": 2 * AMOUNT}, "bank-b": {"prefund_balance": 0}},
    )
    status, body = await h.disburse("T-PREFUND-NONE", AMOUNT)
    assert status == 422
    assert body["error"]["code"] == "no_eligible_funder"
    reasons = {f: r["reason"] for f, r in body["error"]["details"]["funders"].items()}
    assert reasons == {"bank-a": "amount_out_of_range", "bank-b": "prefund_insufficient"}


@pytest.mark.asyncio
async def test_concurrent_co_lending_intake_never_overdraws_the_prefund(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(
        start_gateway,
        role="api",
        funders={
            "bank-a": {"min_amount": 2 * ODD_AMOUNT},
            "bank-b": {"prefund_balance": 3 * ODD_SHARE},
        },
    )
    results = await _burst(h, "T-PFC", 12, ODD_AMOUNT)
    accepted = [b for s, b in results if s == 201]
    assert len(accepted) == 3
    assert all(b["funder_id"] == "bank-b" for b in accepted)
    assert {s for s, _ in results} == {201, 422}
    assert await h.prefund() == 0
    assert (await h.usage())[q.funder_scope("bank-b")] == 3 * ODD_AMOUNT


# ---------------------------------------------------------------- business day


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso).replace(tzinfo=UTC)


@pytest.mark.asyncio
async def test_usage_is_keyed_by_the_business_day_in_shanghai(
    start_gateway: StartGateway,
) -> None:
    h = await _gateway(
        start_gateway,
        role="api",
        funders={"bank-a": {"daily_limit": AMOUNT, "single_max": AMOUNT}, **NO_PREFUND},
    )
    h.svc.clock = lambda: _at("2026-03-10T15:59:59")  # 23:59:59 in Shanghai, March 10
    await h.accepted("T-DAY-1")
    status, body = await h.disburse("T-DAY-2")
    assert (status, body["error"]["code"]) == (422, "limit_exceeded")

    h.svc.clock = lambda: _at("2026-03-10T23:30:00")  # 07:30 in Shanghai, March 11
    await h.accepted("T-DAY-3")
    h.svc.clock = lambda: _at("2026-03-10T16:00:00")  # 00:00 in Shanghai, March 11
    status, body = await h.disburse("T-DAY-4")
    assert (status, body["error"]["code"]) == (422, "limit_exceeded")

    day1 = await h.usage(date(2026, 3, 10))
    day2 = await h.usage(date(2026, 3, 11))
    assert day1[q.funder_scope("bank-a")] == AMOUNT
    assert day2[q.funder_scope("bank-a")] == AMOUNT
    assert day1[q.PLATFORM_SCOPE] == day2[q.PLATFORM_SCOPE] == AMOUNT

    resp = await h.client.get("/v1/funders", headers={"Authorization": "Bearer demo-token"})
    funders = await resp.json()
    assert funders["business_day"] == "2026-03-11"
    bank_a = next(f for f in funders["items"] if f["id"] == "bank-a")
    assert (bank_a["used_today"], bank_a["remaining_today"]) == (AMOUNT, 0)


@pytest.mark.asyncio
async def test_a_payee_off_the_whitelist_is_refused_as_such_even_when_no_funder_could_pay(
    start_gateway: StartGateway,
) -> None:
    """The whitelist comes before routing: a lending core told `no_eligible_funder` or
    `limit_exceeded` would retry later a request that can never pass."""
    h = await _gateway(
        start_gateway,
        role="api",
        funders={"bank-a": {"min_amount": 2 * AMOUNT}, "bank-b": {"min_amount": 2 * AMOUNT}},
    )
    for txn_no, payee in (
        ("T-WL-ACCOUNT", {"account_no": "6222020200199999999"}),
        ("T-WL-NAME", {"account_name": "李四"}),
        ("T-WL-BANK", {"bank_code": "CCB"}),
    ):
        status, body = await h.disburse(txn_no, AMOUNT, payee={**ACCOUNT, **payee})
        assert (status, body["error"]["code"]) == (422, "payee_not_whitelisted"), txn_no
    status, body = await h.disburse("T-WL-OTHER-BORROWER", AMOUNT, borrower_id="B-UNKNOWN")
    assert (status, body["error"]["code"]) == (422, "payee_not_whitelisted")
    # the registered payee still gets the routing refusal, with its reasons
    status, body = await h.disburse("T-WL-REGISTERED", AMOUNT)
    assert (status, body["error"]["code"]) == (422, "no_eligible_funder")
    async with h.pool.acquire() as conn:
        await conn.execute("UPDATE borrower_accounts SET name_bidx = NULL")
    status, body = await h.disburse(
        "T-WL-OLD-ENTRY", AMOUNT, payee={**ACCOUNT, "account_name": "李四"}
    )
    assert (status, body["error"]["code"]) == (422, "payee_not_whitelisted")
    status, body = await h.disburse("T-WL-OLD-ENTRY-RIGHT", AMOUNT)
    assert (status, body["error"]["code"]) == (422, "no_eligible_funder")


@pytest.mark.asyncio
async def test_a_paused_funder_is_passed_by_at_intake(start_gateway: StartGateway) -> None:
    h = await _gateway(start_gateway, role="api", funders={"bank-a": {"paused": True}})
    body = await h.accepted("T-PAUSED-A", AMOUNT, funder_hint="bank-a")
    assert body["funder_id"] == "bank-b"
    resp = await h.client.get("/v1/funders", headers=AUTH)
    paused = {f["id"]: f["paused"] for f in (await resp.json())["items"]}
    assert paused == {"bank-a": True, "bank-b": False}
    h = await _gateway(
        start_gateway,
        role="api",
        funders={"bank-a": {"paused": True}, "bank-b": {"paused": True}},
    )
    status, body = await h.disburse("T-PAUSED-ALL", AMOUNT)
    assert (status, body["error"]["code"]) == (422, "no_eligible_funder")
    reasons = {f: r["reason"] for f, r in body["error"]["details"]["funders"].items()}
    assert reasons == {"bank-a": "paused", "bank-b": "paused"}


@pytest.mark.asyncio
async def test_intakes_trying_two_co_lending_funders_in_opposite_orders_never_deadlock(
    start_gateway: StartGateway,
) -> None:
    """A candidate refused for its prefund must hold none of its usage rows while the next
    candidate is tried. Held in a deterministic interleaving: each intake has reserved its
    first funder's limit and waits for that funder's prefund, which another transaction is
    drawing down; then both are refused there and go on to the other funder."""
    co = {"mode": "co_lending", "platform_share": "0.30", "prefund_balance": ODD_SHARE,
          "daily_limit": 3 * ODD_AMOUNT, "single_max": ODD_AMOUNT}  # fmt: skip
    h = await _gateway(start_gateway, role="api", funders={"bank-a": co, "bank-b": co})
    day, n = h.svc.business_day(), h.cfg.gateway.limit_buckets
    async with h.pool.acquire() as conn, conn.transaction():
        # the platform's buckets exist, so neither intake waits for the other there
        cap = h.cfg.gateway.platform_daily_limit
        b = await q.reserve(conn, q.PLATFORM_SCOPE, day, 0, 1, cap, n)
        assert b is not None
        await q.release(conn, q.PLATFORM_SCOPE, day, b, 1)

    with capture_logs() as logs:
        async with h.pool.acquire() as other:
            tx = other.transaction()
            await tx.start()
            await other.execute("UPDATE prefund SET balance = balance - 1")
            first = asyncio.create_task(h.disburse("T-OPP-1", ODD_AMOUNT))
            await eventually(lambda: _waiting(h, 1), "the first intake to wait for a prefund")
            second = asyncio.create_task(h.disburse("T-OPP-2", ODD_AMOUNT, funder_hint="bank-b"))
            await eventually(lambda: _waiting(h, 2), "the second intake to wait for a prefund")
            await tx.commit()
        results = [await first, await second]

    assert [(s, b["error"]["code"]) for s, b in results] == [(422, "limit_exceeded")] * 2
    assert [e for e in logs if e["event"] == "intake.deadlock_retried"] == []
    usage = await h.usage()
    assert usage.get(q.funder_scope("bank-a"), 0) == usage.get(q.funder_scope("bank-b"), 0) == 0


async def _waiting(h: Harness, n: int) -> bool:
    return await _lock_waiters(h) >= n
