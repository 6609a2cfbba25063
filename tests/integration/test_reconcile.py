"""Nightly reconciliation on real PostgreSQL: the statement streamed in with COPY, matched in
SQL, breaks persisted idempotently per (funder, day), certain answers applied through the
state machine, the rest resolved by a person, and the schedule under an advisory lock.

Records are written straight into the store (a disbursement and its attempt in the state a
test needs), and the bank is a fake connector whose statement each test scripts per day.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from config.models import FileConfig, StatementConfig
from connectors.base import BankStatus, StatementLine
from connectors.errors import OutcomeUnknown
from gateway import ledger, outcomes
from gateway.app import create_app
from gateway.context import Services
from gateway.metrics import Metrics
from gateway.reconcile import (
    SCHEDULER_LOCK_KEY,
    ResolveError,
    RunInProgress,
    reconcile_day,
    resolve_break,
    run_due,
    run_scheduler,
)
from gateway.store import db
from gateway.store import queries as q
from gateway.store import recon_queries as rq
from gateway.vouchers import seal_once, verify
from tests.integration.conftest import AUTH, make_config

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

ZONE = ZoneInfo("Asia/Shanghai")
D = date(2026, 3, 10)
AMOUNT = 1_000_000
LEDGER_BREAK = "(ledger total)/ledger_total_mismatch"


def at(day: date, hour: int = 12) -> datetime:
    return datetime.combine(day, time(hour), tzinfo=ZONE)


@dataclass
class StatementBank:
    """A connector whose only job here is to publish scripted statements."""

    funder_id: str
    name: str = "statement-fake"
    days: dict[date, list[StatementLine]] = field(default_factory=dict)
    broken: dict[date, Exception] = field(default_factory=dict)
    fetched: list[date] = field(default_factory=list)

    def add(
        self, day: date, order_no: str, status: str = "succeeded", amount: int = AMOUNT,
        bank_ref: str | None = None,
    ) -> None:  # fmt: skip
        lines = self.days.setdefault(day, [])
        ref = bank_ref or f"R{len(lines) + 1:04d}-{order_no}"
        lines.append(StatementLine(order_no, ref, amount, status, at(day, 18)))

    async def fetch_statement(self, day: date) -> AsyncIterator[StatementLine]:
        self.fetched.append(day)
        for line in self.days.get(day, []):
            yield line
        if day in self.broken:
            raise self.broken[day]

    async def aclose(self) -> None:
        return None


@dataclass
class World:
    svc: Services
    pool: asyncpg.Pool
    banks: dict[str, StatementBank]
    now: list[datetime]

    @property
    def bank(self) -> StatementBank:
        return self.banks["bank-a"]

    async def record(
        self,
        order_no: str,
        status: str,
        *,
        day: date = D,
        amount: int = AMOUNT,
        funder_id: str = "bank-a",
        reserve: bool = True,
        settle: bool = True,
    ) -> int:
        """A disbursement with one attempt in `status`, its limits reserved; the attempt id."""
        platform = amount * 3 // 10 if funder_id == "bank-b" else 0
        created = at(day)
        async with self.pool.acquire() as conn, conn.transaction():
            columns = {
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_name = 'disbursements'"
                )
            }
            # the payee in clear, where the schema still stores it so (personal data is
            # encrypted at rest from migration 0007 on; reconciliation never reads it)
            payee = {
                k: v
                for k, v in (("payee_account_no", "6222020200112233445"),
                             ("payee_account_name", "张三"))
                if k in columns
            }  # fmt: skip
            d_id = await q.insert_disbursement(
                conn,
                {
                    **payee,
                    "txn_no": f"T{order_no}",
                    "request_hash": hashlib.sha256(order_no.encode()).digest(),
                    "client": "lending-core",
                    "loan_id": f"L{order_no}",
                    "borrower_id": "B1",
                    "amount": amount,
                    "currency": "CNY",
                    "term_unit": "month",
                    "term_count": 12,
                    "apr": "0.18",
                    "product": "consumer-standard",
                    "repayment": "equal_installment",
                    "payee_bank_code": "ICBC",
                    "status": status,
                    "funder_id": funder_id,
                    "mode": "co_lending" if platform else "direct",
                    "alloc_funder": amount - platform,
                    "alloc_platform": platform,
                    "business_day": day,
                    "created_at": created,
                    "updated_at": created,
                },
            )
            assert d_id is not None
            attempt_id = await q.insert_attempt(
                conn,
                {
                    "disbursement_id": d_id,
                    "n": 1,
                    "funder_id": funder_id,
                    "order_no": order_no,
                    "status": status,
                    "mode": "co_lending" if platform else "direct",
                    "alloc_funder": amount - platform,
                    "alloc_platform": platform,
                    "created_at": created,
                    "updated_at": created,
                },
            )
            if reserve:
                scope = q.funder_scope(funder_id)
                assert await q.reserve(conn, scope, day, 0, amount, 10**12, 16) is not None
                held = await q.reserve(conn, q.PLATFORM_SCOPE, day, 0, amount, 10**12, 16)
                assert held is not None
            # the journal as the gateway keeps it: reserved on acceptance, paid on success
            txn_no = f"T{order_no}"
            await ledger.reserve(conn, txn_no, funder_id, amount - platform, platform, day)
            if status == "succeeded" and settle:
                await ledger.settle(conn, txn_no, funder_id, amount, day)
        return attempt_id

    async def status(self, order_no: str) -> tuple[str, str]:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT a.status, d.status AS d_status FROM attempts a"
                " JOIN disbursements d ON d.id = a.disbursement_id WHERE a.order_no = $1",
                order_no,
            )
        assert row is not None
        return row["status"], row["d_status"]

    async def breaks(self, run_id: int | None = None) -> dict[str, asyncpg.Record]:
        async with self.pool.acquire() as conn:
            rows = await rq.list_breaks(
                conn, run_id=run_id, funder_id=None, kind=None, status=None, after_id=None,
                limit=1000,
            )  # fmt: skip
        out = {f"{r['order_no']}/{r['type']}": r for r in rows}
        assert len(out) == len(rows), "the same order and type reported twice"
        return out

    async def usage(self, day: date = D) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            return await q.usage(conn, day)


def services(pool: asyncpg.Pool, cfg: FileConfig, banks: dict[str, Any], now: list[datetime],
             http: httpx.AsyncClient) -> Services:  # fmt: skip
    svc = Services(cfg=cfg, pool=pool, connectors=banks, metrics=Metrics(), http=http)
    svc.clock = lambda: now[0]
    return svc


def config(window_days: int = 3, webhook: str | None = "http://127.0.0.1:9/events",
           **statement: Any) -> FileConfig:  # fmt: skip
    cfg = make_config(webhook)
    recon = cfg.reconciliation.model_copy(update={"window_days": window_days})
    funders = [
        f.model_copy(
            update={"statement": StatementConfig.model_validate(
                {**f.statement.model_dump(), **statement})}
        )
        for f in cfg.funders
    ]  # fmt: skip
    return cfg.model_copy(update={"reconciliation": recon, "funders": funders})


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest_asyncio.fixture
async def world(pool: asyncpg.Pool, http: httpx.AsyncClient) -> World:
    banks = {f: StatementBank(f) for f in ("bank-a", "bank-b")}
    now = [at(D + timedelta(days=1), 3)]
    return World(services(pool, config(), dict(banks), now, http), pool, banks, now)


def with_window(w: World, window_days: int, **statement: Any) -> World:
    svc = services(w.pool, config(window_days, **statement), dict(w.banks), w.now, w.svc.http)
    return World(svc, w.pool, w.banks, w.now)


# ---------------------------------------------------------------- matching and breaks


async def test_every_break_type_is_found_and_plain_matches_are_counted(world: World) -> None:
    w = with_window(world, 0)
    bank = w.bank
    await w.record("OK1", "succeeded")
    bank.add(D, "OK1")
    await w.record("OK2", "failed")
    bank.add(D, "OK2", "failed")
    await w.record("AMT", "succeeded")
    bank.add(D, "AMT", amount=AMOUNT - 1)
    await w.record("WEFAILED", "failed")
    bank.add(D, "WEFAILED")
    await w.record("BANKFAILED", "succeeded")
    bank.add(D, "BANKFAILED", "failed")
    await w.record("TWICE", "succeeded")
    bank.add(D, "TWICE", bank_ref="X1")
    bank.add(D, "TWICE", bank_ref="X2")
    bank.add(D, "STRANGER")
    await w.record("NOWHERE", "succeeded")

    result = await reconcile_day(w.svc, "bank-a", D, trigger="test")

    assert result.ok, result.error
    s = result.summary
    assert (s.lines, s.matched.count, s.matched.amount) == (8, 2, 2 * AMOUNT)
    breaks = await w.breaks(result.run_id)
    assert {k: b["status"] for k, b in breaks.items()} == {
        "AMT/amount_mismatch": "open",
        "WEFAILED/status_mismatch_bank_succeeded": "open",
        "BANKFAILED/status_mismatch_bank_failed": "open",
        "TWICE/duplicate_at_bank": "open",
        "STRANGER/missing_at_gateway": "open",
        "NOWHERE/missing_at_bank": "open",
        LEDGER_BREAK: "open",
    }
    assert breaks["STRANGER/missing_at_gateway"]["severity"] == "critical"
    assert breaks["AMT/amount_mismatch"]["bank_amount"] == AMOUNT - 1
    assert breaks["TWICE/duplicate_at_bank"]["bank_lines"] == 2
    assert s.open == 7
    assert {t: v.count for t, v in s.breaks.items() if v.count} == {
        "ledger_total_mismatch": 1,
        "amount_mismatch": 1,
        "status_mismatch_bank_succeeded": 1,
        "status_mismatch_bank_failed": 1,
        "duplicate_at_bank": 1,
        "missing_at_gateway": 1,
        "missing_at_bank": 1,
    }
    # terminal records are never rewritten by a run
    assert await w.status("WEFAILED") == ("failed", "failed")
    assert await w.status("BANKFAILED") == ("succeeded", "succeeded")
    # an order of another funder is not this statement's business
    assert bank.fetched == [D]


async def test_the_unlisted_orders_and_the_resolutions_are_read_a_page_at_a_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of one: every order no statement listed and every automatic resolution is read
    back exactly once, and an order reported missing by an earlier day's run is not reported
    again on a later page."""
    import gateway.reconcile as reconcile

    monkeypatch.setattr(reconcile, "ABSENT_PAGE", 1)
    monkeypatch.setattr(reconcile, "AUTO_CHUNK", 1)
    w = with_window(world, 0)
    for order_no in ("M1", "M2", "M3"):
        await w.record(order_no, "succeeded")  # never listed: missing at the bank
    for order_no in ("U1", "U2", "U3"):
        await w.record(order_no, "unknown")
        w.bank.add(D, order_no)  # the bank paid: resolved through the state machine

    first = await reconcile_day(w.svc, "bank-a", D)
    later = await reconcile_day(w.svc, "bank-a", D + timedelta(days=1))

    assert first.ok, first.error
    assert first.summary.breaks["missing_at_bank"].count == 3
    assert first.summary.auto_resolved["status_mismatch_bank_succeeded"].count == 3
    assert [await w.status(o) for o in ("U1", "U2", "U3")] == [("succeeded", "succeeded")] * 3
    assert sorted(k for k in await w.breaks(first.run_id) if "missing" in k) == [
        "M1/missing_at_bank",
        "M2/missing_at_bank",
        "M3/missing_at_bank",
    ]
    assert later.ok, later.error
    assert not later.summary.breaks["missing_at_bank"].count  # reported once, by day D


async def _rows_read(conn: asyncpg.Connection, table: str) -> int:
    """Rows this transaction has read from `table` so far (plus, possibly, what an earlier
    transaction of the backend counted and has not flushed yet: take differences)."""
    n = await conn.fetchval(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
        " FROM pg_stat_xact_user_tables WHERE relname = $1",
        table,
    )
    return int(n)


async def test_the_unlisted_orders_are_read_by_one_query_whatever_the_page(
    world: World,
) -> None:
    """Each unlisted order is read once however small the page: pages asked for again from
    the last order read each read the rest of the pool again (quadratic in a pool that holds
    a whole day when a bank leaves one out)."""
    w = with_window(world, 0)
    orders = [f"M{i:02}" for i in range(40)]
    for order_no in orders:
        await w.record(order_no, "succeeded")  # never listed
    assert (await reconcile_day(w.svc, "bank-a", D)).ok  # the pool, committed

    async with w.pool.acquire() as conn, conn.transaction():
        before = await _rows_read(conn, "recon_pending")  # the view may hold earlier counts
        pages = [p async for p in rq.absent(conn, "bank-a", D, D, 1)]
        read = await _rows_read(conn, "recon_pending") - before

    assert [r["order_no"] for p in pages for r in p] == orders
    assert len(pages) == len(orders)
    assert read <= len(orders) + 1


async def test_the_automatic_resolutions_read_each_waiting_break_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of the breaks awaiting their automatic resolution reads those of the chunk,
    not every break still waiting (quadratic when an outage leaves a day unknown)."""
    import gateway.reconcile as reconcile

    async def later(*args: Any) -> None:
        return None

    monkeypatch.setattr(reconcile, "_auto_resolve", later)  # the breaks stay waiting
    w = with_window(world, 0)
    orders = [f"U{i:02}" for i in range(30)]
    for order_no in orders:
        await w.record(order_no, "unknown")
        w.bank.add(D, order_no)
    run = await reconcile_day(w.svc, "bank-a", D)
    assert run.ok, run.error
    async with w.pool.acquire() as conn:
        # other breaks around them, as in a table of many nights: a plan reading every
        # break is no longer the cheapest by far
        await conn.execute(
            """INSERT INTO recon_breaks (run_id, funder_id, business_day, order_no, type,
                                         status, severity, reason)
               SELECT $1, 'bank-a', $2, 'F' || i, 'missing_at_bank', 'open', 'high', 'filler'
                 FROM generate_series(1, 5000) i""",
            run.run_id,
            D,
        )
        await conn.execute("ANALYZE recon_breaks")

    async with w.pool.acquire() as conn, conn.transaction():
        before = await _rows_read(conn, "recon_breaks")  # the view may hold earlier counts
        got, after = [], 0
        while chunk := await rq.auto_pending(conn, run.run_id, after, 1):
            got += [r["order_no"] for r in chunk]
            after = chunk[-1]["id"]
        read = await _rows_read(conn, "recon_breaks") - before

    assert sorted(got) == orders
    assert read <= 2 * len(orders)  # each chunk's break, and a few look-ups besides


async def test_unknown_and_processing_orders_are_resolved_by_the_statement(world: World) -> None:
    w = world
    await w.record("U1", "unknown")
    w.bank.add(D, "U1")
    await w.record("P1", "processing")
    w.bank.add(D, "P1", "failed")
    before = await w.usage()

    result = await reconcile_day(w.svc, "bank-a", D, trigger="test")

    assert result.ok, result.error
    assert await w.status("U1") == ("succeeded", "succeeded")
    assert await w.status("P1") == ("failed", "failed")
    after = await w.usage()
    # succeeded: the reservation is settled (stays used); failed: released
    assert after[q.funder_scope("bank-a")] == before[q.funder_scope("bank-a")] - AMOUNT
    assert after[q.PLATFORM_SCOPE] == before[q.PLATFORM_SCOPE] - AMOUNT
    breaks = await w.breaks(result.run_id)
    auto = breaks["U1/status_mismatch_bank_succeeded"]
    assert (auto["status"], auto["resolution"], auto["resolved_by"]) == (
        "auto_resolved",
        "auto",
        "reconciliation",
    )
    assert auto["evidence"]["statement_day"] == D.isoformat()
    assert breaks["P1/status_mismatch_bank_failed"]["status"] == "auto_resolved"
    assert result.summary.open == 0
    assert result.summary.auto_resolved["status_mismatch_bank_succeeded"].count == 1
    async with w.pool.acquire() as conn:
        webhooks = await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'webhook'")
        kinds = [r["kind"] for r in await q.vouchers_of(conn, "TU1")]
    assert webhooks == 2  # the lending core hears of both outcomes
    assert "disbursement.succeeded" in kinds
    assert "recon.auto_resolved" in kinds


async def test_co_lending_prefund_comes_back_when_the_bank_failed_it(world: World) -> None:
    w = world
    async with w.pool.acquire() as conn:
        await q.seed_prefund(conn, {"bank-b": 10_000_000})
        await conn.execute("UPDATE prefund SET balance = balance - $1", AMOUNT * 3 // 10)
    await w.record("B1", "unknown", funder_id="bank-b")
    w.banks["bank-b"].add(D, "B1", "failed")

    assert (await reconcile_day(w.svc, "bank-b", D, trigger="test")).ok
    async with w.pool.acquire() as conn:
        assert (await q.prefund_balances(conn))["bank-b"] == 10_000_000
    assert await w.status("B1") == ("failed", "failed")


async def test_automatic_resolutions_run_a_few_at_once_and_apply_each_exactly_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.reconcile as reconcile

    w = world
    paid = [f"UP{i}" for i in range(9)]
    failed = [f"UF{i}" for i in range(6)]
    for order_no in paid:
        await w.record(order_no, "unknown")
        w.bank.add(D, order_no)
    for order_no in failed:
        await w.record(order_no, "processing")
        w.bank.add(D, order_no, "failed")
    before = await w.usage()
    running = [0, 0]  # now, most at once
    real = reconcile._auto_resolve_one

    async def spy(*args: Any) -> None:
        running[0] += 1
        running[1] = max(running)
        try:
            await asyncio.sleep(0.01)  # long enough for the other workers to start theirs
            await real(*args)
        finally:
            running[0] -= 1

    monkeypatch.setattr(reconcile, "_auto_resolve_one", spy)
    result = await reconcile_day(w.svc, "bank-a", D, trigger="test")

    assert result.ok, result.error
    assert running[1] == reconcile.AUTO_WORKERS
    assert [await w.status(o) for o in paid] == [("succeeded", "succeeded")] * len(paid)
    assert [await w.status(o) for o in failed] == [("failed", "failed")] * len(failed)
    s = result.summary
    assert s.auto_resolved["status_mismatch_bank_succeeded"].count == len(paid)
    assert s.auto_resolved["status_mismatch_bank_failed"].count == len(failed)
    assert s.open == 0
    after = await w.usage()
    released = len(failed) * AMOUNT  # failed payouts give their limits back, once
    assert after[q.funder_scope("bank-a")] == before[q.funder_scope("bank-a")] - released
    assert after[q.PLATFORM_SCOPE] == before[q.PLATFORM_SCOPE] - released
    async with w.pool.acquire() as conn:
        vouchers = await conn.fetch(
            "SELECT kind, txn_no FROM voucher_events"
            " WHERE kind IN ('recon.auto_resolved', 'disbursement.succeeded',"
            " 'disbursement.failed')"
        )
        webhooks = await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'webhook'")
    kinds: dict[str, int] = {}
    for v in vouchers:
        kinds[v["kind"]] = kinds.get(v["kind"], 0) + 1
    assert kinds == {
        "recon.auto_resolved": len(paid) + len(failed),
        "disbursement.succeeded": len(paid),
        "disbursement.failed": len(failed),
    }
    assert len({v["txn_no"] for v in vouchers}) == len(paid) + len(failed)
    assert webhooks == len(paid) + len(failed)  # one outcome webhook per order

    # a re-run finds them resolved: nothing moves twice
    again = await reconcile_day(w.svc, "bank-a", D, trigger="test")
    assert again.summary.auto_resolved == s.auto_resolved
    async with w.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'webhook'") == (
            webhooks
        )


async def test_an_attempt_that_moved_after_it_was_read_is_decided_again_under_its_lock(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The automatic resolutions read their attempts without a lock; a bank callback that
    lands between that read and the resolution wins, and the resolution records what it
    found instead of moving the order a second time."""
    import gateway.reconcile as reconcile

    w = world
    await w.record("RACE", "unknown")
    w.bank.add(D, "RACE")
    await w.record("CALM", "unknown")
    w.bank.add(D, "CALM")
    real = reconcile._auto_resolve_one

    async def callback_first(*args: Any) -> None:
        brk = args[5]
        if brk["order_no"] == "RACE":  # the attempt was read as unknown; the callback lands
            async with w.pool.acquire() as conn, conn.transaction():
                a = await q.lock_attempt(conn, brk["attempt_id"])
                assert a is not None
                assert await outcomes.apply_bank_status(
                    conn, w.svc, a, BankStatus.SUCCEEDED, bank_ref="CB", source="callback"
                )
        await real(*args)

    monkeypatch.setattr(reconcile, "_auto_resolve_one", callback_first)
    result = await reconcile_day(w.svc, "bank-a", D, trigger="test")

    assert result.ok, result.error
    assert await w.status("RACE") == ("succeeded", "succeeded")
    assert await w.status("CALM") == ("succeeded", "succeeded")
    breaks = await w.breaks(result.run_id)
    race = breaks["RACE/status_mismatch_bank_succeeded"]
    assert race["status"] == "auto_resolved"
    assert race["note"] == "already succeeded when the run applied the statement"
    assert breaks["CALM/status_mismatch_bank_succeeded"]["note"].startswith("set to succeeded")
    async with w.pool.acquire() as conn:
        moved = await conn.fetch(
            "SELECT txn_no, event::jsonb->>'source' AS source FROM voucher_events"
            " WHERE kind = 'disbursement.succeeded' ORDER BY txn_no"
        )
    # one move each: the callback's for RACE, the statement's for CALM
    assert [(v["txn_no"], v["source"]) for v in moved] == [
        ("TCALM", "reconciliation"),
        ("TRACE", "callback"),
    ]


async def test_a_break_resolved_meanwhile_takes_its_move_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.reconcile as reconcile

    w = world
    await w.record("GONE", "unknown")
    w.bank.add(D, "GONE")
    real = reconcile._auto_resolve_one

    async def resolved_first(*args: Any) -> None:
        async with w.pool.acquire() as conn:
            await conn.execute("UPDATE recon_breaks SET status = 'resolved' WHERE id = $1",
                               args[5]["id"])  # fmt: skip
        await real(*args)

    monkeypatch.setattr(reconcile, "_auto_resolve_one", resolved_first)
    with capture_logs() as logs:
        result = await reconcile_day(w.svc, "bank-a", D, trigger="test")

    assert result.ok, result.error
    assert await w.status("GONE") == ("unknown", "unknown")  # the move rolled back with it
    assert [e["event"] for e in logs if e["event"].startswith("recon.auto_")] == [
        "recon.auto_skipped"
    ]
    assert not result.summary.auto_resolved["status_mismatch_bank_succeeded"].count


@dataclass
class SlowStatementBank(StatementBank):
    """Its statement's lines come `pause` seconds apart, as a big download or a slow parser
    delivers them."""

    pause: float = 0.0

    async def fetch_statement(self, day: date) -> AsyncIterator[StatementLine]:
        async for line in super().fetch_statement(day):
            await asyncio.sleep(self.pause)
            yield line


async def test_a_statement_slower_than_the_pools_request_timeout_is_still_reconciled(
    clean_db: str, http: httpx.AsyncClient
) -> None:
    """The pool cancels a query after `command_timeout` (30 s: meant for requests). Staging
    lasts as long as the statement takes to arrive and be parsed (a million camt.053 entries
    take about a minute to parse), and a run's big statements as long as its data: they set
    their own timeout. Here the pool's is 2 s (the run's other statements take milliseconds)
    and the statement takes 3 s to arrive."""
    pool = await db.create_pool(clean_db, min_size=1, max_size=4, command_timeout=2.0)
    try:
        banks = {f: SlowStatementBank(f, pause=1.0) for f in ("bank-a", "bank-b")}
        now = [at(D + timedelta(days=1), 3)]
        w = World(services(pool, config(), dict(banks), now, http), pool, dict(banks), now)
        for order_no in ("S1", "S2", "S3"):
            await w.record(order_no, "succeeded")
            w.bank.add(D, order_no)

        result = await reconcile_day(w.svc, "bank-a", D)

        assert result.ok, result.error
        assert result.summary.matched.count == 3
    finally:
        await pool.close()


# ---------------------------------------------------------------- idempotence


async def test_rerunning_a_day_updates_its_run_and_never_duplicates_breaks(world: World) -> None:
    w = with_window(world, 0)
    await w.record("A", "succeeded")
    w.bank.add(D, "A", amount=1)
    w.bank.add(D, "STRANGER")
    await w.record("U", "unknown")
    w.bank.add(D, "U")

    first = await reconcile_day(w.svc, "bank-a", D, trigger="test")
    second = await reconcile_day(w.svc, "bank-a", D, trigger="test")

    assert first.run_id == second.run_id
    assert first.summary.to_json() == second.summary.to_json()
    async with w.pool.acquire() as conn:
        run = await rq.get_run(conn, first.run_id)
        assert run is not None
        assert run["runs"] == 2
        assert run["status"] == "succeeded"
        assert await conn.fetchval("SELECT count(*) FROM recon_runs") == 1
    breaks = await w.breaks()
    assert set(breaks) == {
        "A/amount_mismatch",
        "STRANGER/missing_at_gateway",
        "U/status_mismatch_bank_succeeded",
        LEDGER_BREAK,  # the bank's total differs from the ledger's by the two breaks above
    }
    ledger_break_id = breaks[LEDGER_BREAK]["id"]

    # a break the file no longer shows disappears; a resolved one keeps its resolution
    await resolve_break(w.svc, breaks["A/amount_mismatch"]["id"], "gateway_is_right", "ok", "ops")
    w.bank.days[D] = [line for line in w.bank.days[D] if line.order_no != "STRANGER"]
    third = await reconcile_day(w.svc, "bank-a", D, trigger="test")
    breaks = await w.breaks()
    assert set(breaks) == {"A/amount_mismatch", "U/status_mismatch_bank_succeeded", LEDGER_BREAK}
    assert breaks["A/amount_mismatch"]["status"] == "resolved"
    assert breaks[LEDGER_BREAK]["id"] == ledger_break_id  # updated, never duplicated
    assert breaks[LEDGER_BREAK]["evidence"]["unexplained"] == 1 - AMOUNT
    assert third.summary.open == 1


async def test_rerunning_a_day_leaves_a_resolved_break_as_it_was_resolved(world: World) -> None:
    """A resolution records what it did to our record in the break's evidence (the
    correction applied, or refused with the reason for a manual adjustment); a re-run of the
    day that finds the same break again keeps that record and the evidence it was decided
    on, as it keeps the resolution."""
    w = with_window(world, 0)
    await w.record("KEEP", "succeeded")
    first = await reconcile_day(w.svc, "bank-a", D, trigger="test")
    breaks = await w.breaks(first.run_id)
    resolved = {
        key: await resolve_break(w.svc, breaks[key]["id"], "gateway_is_right", "late file", "ops")
        for key in ("KEEP/missing_at_bank", LEDGER_BREAK)
    }
    assert all("correction" in row["evidence"] for row in resolved.values())

    w.now[0] += timedelta(hours=1)
    await reconcile_day(w.svc, "bank-a", D, trigger="test")

    breaks = await w.breaks(first.run_id)
    for key, row in resolved.items():
        kept = breaks[key]
        assert (kept["status"], kept["resolution"], kept["note"]) == (
            "resolved", "gateway_is_right", "late file",
        )  # fmt: skip
        assert kept["evidence"] == row["evidence"], key
        assert kept["updated_at"] == row["updated_at"], key


# ---------------------------------------------------------------- the ledger against the statement


async def test_the_ledger_and_the_statement_agree_on_a_matching_day(world: World) -> None:
    w = world  # window 3 days
    await w.record("OK1", "succeeded")
    w.bank.add(D, "OK1")
    await w.record("NO", "failed")
    w.bank.add(D, "NO", "failed")
    await w.record("U", "unknown")  # paid: settled into the ledger by the run itself
    w.bank.add(D, "U")
    await w.record("LATE", "succeeded", day=D - timedelta(days=1))  # the day before's order
    w.bank.add(D, "LATE")
    await w.record("BACK", "succeeded")  # paid, then reversed by the bank: we say failed
    async with w.pool.acquire() as conn:
        await conn.execute("UPDATE attempts SET status = 'failed' WHERE order_no = 'BACK'")
        await ledger.post(
            conn, "disbursement.corrected_failed",
            [(ledger.PAYOUTS, -AMOUNT), (ledger.funder_account("bank-a"), AMOUNT)],
            day=D, txn_no="TBACK", funder_id="bank-a",
        )  # fmt: skip
    w.bank.add(D, "BACK", bank_ref="B1")
    w.bank.add(D, "BACK", "reversed", bank_ref="B2")

    result = await reconcile_day(w.svc, "bank-a", D, trigger="test")

    assert result.ok, result.error
    totals = result.summary.ledger
    assert totals.to_json() == {
        "ledger_paid": 2 * AMOUNT,  # OK1 and U; BACK paid and corrected
        "statement_paid": 3 * AMOUNT,  # OK1, U, LATE; BACK paid and reversed
        "other_days": AMOUNT,  # LATE belongs to the day before's comparison
        "compared": 2 * AMOUNT,
        "awaiting": 0,
        "difference": 0,
        "unexplained": 0,
        "ok": True,
    }
    assert LEDGER_BREAK not in await w.breaks(result.run_id)
    async with w.pool.acquire() as conn:
        run = await rq.get_run(conn, result.run_id)
    assert run is not None
    assert run["summary"]["ledger"]["difference"] == 0


async def test_a_payout_the_bank_does_not_list_makes_the_totals_differ(world: World) -> None:
    await world.record("OK1", "succeeded")
    world.bank.add(D, "OK1")
    await world.record("GONE", "succeeded")  # settled in our ledger, not on the statement

    # within the window the order may still come on a later statement: the difference is
    # recorded and explained by it, nothing is raised yet
    waiting = await reconcile_day(world.svc, "bank-a", D, trigger="test")
    totals = waiting.summary.ledger
    assert (totals.ledger_paid, totals.compared, totals.difference) == (2 * AMOUNT, AMOUNT, -AMOUNT)
    assert (totals.awaiting, totals.unexplained) == (AMOUNT, 0)
    assert LEDGER_BREAK not in await world.breaks()

    # without a window the payout is simply not on the bank's statement: a critical break
    w = with_window(world, 0)
    result = await reconcile_day(w.svc, "bank-a", D, trigger="test")
    assert result.run_id == waiting.run_id
    totals = result.summary.ledger
    assert (totals.difference, totals.awaiting, totals.unexplained) == (-AMOUNT, 0, -AMOUNT)
    assert result.summary.breaks["ledger_total_mismatch"].count == 1
    breaks = await w.breaks(result.run_id)
    b = breaks[LEDGER_BREAK]
    assert (b["status"], b["severity"], b["our_amount"], b["bank_amount"]) == (
        "open", "critical", 2 * AMOUNT, AMOUNT,
    )  # fmt: skip
    assert b["evidence"]["difference"] == -AMOUNT
    assert "GONE/missing_at_bank" in breaks

    # a person finds the bank right: the payout is corrected in the ledger, and the next
    # run of the day finds the totals equal and removes its open ledger break
    await resolve_break(w.svc, breaks["GONE/missing_at_bank"]["id"], "bank_is_right", "n", "ops")
    again = await reconcile_day(w.svc, "bank-a", D, trigger="test")
    assert again.summary.ledger.ok
    assert again.summary.ledger.ledger_paid == AMOUNT
    assert LEDGER_BREAK not in await w.breaks(again.run_id)


# ---------------------------------------------------------------- the cross-day window


async def test_an_order_listed_late_is_found_within_the_window(world: World) -> None:
    w = world  # window 3 days
    await w.record("LATE", "succeeded")
    await w.record("NEVER", "succeeded")
    await w.record("EARLY", "succeeded")
    w.bank.add(D, "EARLY")
    w.bank.add(D + timedelta(days=2), "LATE")

    results = [await reconcile_day(w.svc, "bank-a", D + timedelta(days=i)) for i in range(5)]

    # looked for on D + 1 .. D + 3; still absent from D + 3's statement: a break then
    assert [r.summary.pending.count for r in results] == [2, 2, 1, 0, 0]
    assert results[2].summary.matched.count == 1
    breaks = await w.breaks()
    assert list(breaks) == ["NEVER/missing_at_bank"]  # once, by the run of D + 3
    assert breaks["NEVER/missing_at_bank"]["business_day"] == D + timedelta(days=3)
    assert results[4].summary.total_breaks == 0


async def fail_over_after_midnight(w: World, order_no: str) -> None:
    """A disbursement of day D paid by its second funder (bank-b), the fail-over sent at
    00:30 the next day, after bank-a refused it before executing: the ledger books the
    payout on D."""
    a_id = await w.record(order_no, "succeeded", funder_id="bank-b")
    async with w.pool.acquire() as conn:
        d_id = await conn.fetchval(
            "UPDATE attempts SET n = 2, created_at = $2 WHERE id = $1 RETURNING disbursement_id",
            a_id, at(D + timedelta(days=1), 0) + timedelta(minutes=30),
        )  # fmt: skip
        await q.insert_attempt(
            conn,
            {
                "disbursement_id": d_id, "n": 1, "funder_id": "bank-a",
                "order_no": f"{order_no}-1", "status": "failed", "mode": "direct",
                "alloc_funder": AMOUNT, "alloc_platform": 0,
                "created_at": at(D, 23), "updated_at": at(D, 23),
            },
        )  # fmt: skip


@pytest.mark.parametrize("listed_after", [1, 2])
async def test_a_fail_over_sent_after_midnight_counts_on_its_disbursements_day(
    world: World, listed_after: int
) -> None:
    """The ledger books the payout on the disbursement's day D, and the pending pool expects
    the order from D too: D's run awaits it (no false ledger break that never clears), and
    the statement that lists it, on D + 1 or later, counts it for D (`other_days`) and
    awaits nothing of it for its own day."""
    w = world  # window 3 days
    await fail_over_after_midnight(w, "FO")
    w.banks["bank-b"].add(D + timedelta(days=listed_after), "FO")

    runs = [await reconcile_day(w.svc, "bank-b", D + timedelta(days=i)) for i in range(4)]

    assert all(r.ok for r in runs)
    assert [r.summary.ledger.ok for r in runs] == [True] * 4
    assert [r.summary.ledger.awaiting for r in runs] == [AMOUNT, 0, 0, 0]
    assert runs[0].summary.ledger.ledger_paid == AMOUNT
    assert [r.summary.ledger.other_days for r in runs] == [
        AMOUNT if i == listed_after else 0 for i in range(4)
    ]
    assert [r.summary.pending.count for r in runs] == [1] * listed_after + [0] * (4 - listed_after)
    assert await w.breaks() == {}
    async with w.pool.acquire() as conn:
        pool = await conn.fetchrow("SELECT * FROM recon_pending WHERE order_no = 'FO'")
    assert pool is not None
    assert (pool["expected_day"], pool["seen_day"]) == (D, D + timedelta(days=listed_after))


async def test_a_fail_over_sent_after_midnight_that_no_statement_lists_is_a_break(
    world: World,
) -> None:
    """Awaited by its disbursement's day, not excused: still unlisted once the window from
    that day is over, it is a `missing_at_bank` break, reported once."""
    w = world  # window 3 days
    await fail_over_after_midnight(w, "FO")

    runs = [await reconcile_day(w.svc, "bank-b", D + timedelta(days=i)) for i in range(5)]

    assert [r.summary.ledger.awaiting for r in runs] == [AMOUNT, 0, 0, 0, 0]
    assert [r.summary.ledger.ok for r in runs] == [True] * 5
    assert [r.summary.pending.count for r in runs] == [1, 1, 1, 0, 0]
    breaks = await w.breaks()
    assert list(breaks) == ["FO/missing_at_bank"]
    assert breaks["FO/missing_at_bank"]["business_day"] == D + timedelta(days=3)
    assert breaks["FO/missing_at_bank"]["evidence"]["expected_day"] == D.isoformat()

    # without a window the payout the ledger booked on D and no statement lists is a
    # difference of D's totals at once
    again = await reconcile_day(with_window(w, 0).svc, "bank-b", D)
    assert again.summary.ledger.unexplained == -AMOUNT
    assert (await w.breaks(again.run_id))[LEDGER_BREAK]["status"] == "open"


async def test_an_order_sent_weeks_before_its_statement_is_still_ours(world: World) -> None:
    # the run hashes only the attempts of the day and the day before; older ones are looked
    # up one by one
    w = with_window(world, 0)
    long_ago = D - timedelta(days=30)
    await w.record("OLD-UNKNOWN", "unknown", day=long_ago)
    await w.record("OLD-PAID", "succeeded", day=long_ago)
    await w.record("OLD-OFF", "succeeded", day=long_ago, amount=AMOUNT + 1)
    await w.record("TODAY", "succeeded")
    for order_no in ("OLD-UNKNOWN", "OLD-PAID", "OLD-OFF", "TODAY"):
        w.bank.add(D, order_no)

    result = await reconcile_day(w.svc, "bank-a", D)

    assert result.ok, result.error
    breaks = await w.breaks(result.run_id)
    assert "OLD-UNKNOWN/missing_at_gateway" not in breaks  # found, not a stranger's payout
    assert breaks["OLD-UNKNOWN/status_mismatch_bank_succeeded"]["status"] == "auto_resolved"
    assert await w.status("OLD-UNKNOWN") == ("succeeded", "succeeded")
    assert breaks["OLD-OFF/amount_mismatch"]["attempt_id"] is not None
    assert set(breaks) == {"OLD-UNKNOWN/status_mismatch_bank_succeeded", "OLD-OFF/amount_mismatch"}
    assert result.summary.matched.count == 2  # OLD-PAID (another day's order) and TODAY
    # the old orders are not the day's: not awaited, not in the pending pool
    assert result.summary.pending.count == 0


async def test_a_late_line_closes_the_missing_at_bank_break_of_an_earlier_day(
    world: World,
) -> None:
    w = with_window(world, 0)
    await w.record("SLOW", "succeeded")
    first = await reconcile_day(w.svc, "bank-a", D)
    assert (await w.breaks(first.run_id))["SLOW/missing_at_bank"]["status"] == "open"

    w.bank.add(D + timedelta(days=5), "SLOW")
    late = await reconcile_day(w.svc, "bank-a", D + timedelta(days=5))

    assert late.summary.matched.count == 1
    found = (await w.breaks(first.run_id))["SLOW/missing_at_bank"]
    assert (found["status"], found["resolution"]) == ("auto_resolved", "auto")
    assert "listed late" in found["note"]


async def test_a_payout_listed_again_on_a_later_day_is_a_duplicate(world: World) -> None:
    w = world
    await w.record("AGAIN", "succeeded")
    w.bank.add(D, "AGAIN", bank_ref="P1")
    w.bank.add(D + timedelta(days=1), "AGAIN", bank_ref="P2")

    first = await reconcile_day(w.svc, "bank-a", D)
    second = await reconcile_day(w.svc, "bank-a", D + timedelta(days=1))

    assert first.summary.matched.count == 1
    assert list(await w.breaks(second.run_id)) == ["AGAIN/duplicate_at_bank"]

    # a reversal of the payout on a later day: the bank now says the money came back
    w.bank.add(D + timedelta(days=2), "AGAIN", "reversed", bank_ref="P3")
    third = await reconcile_day(w.svc, "bank-a", D + timedelta(days=2))
    assert third.summary.matched.count == 1  # paid once, net: as we say


async def test_a_repeat_payout_days_later_is_found_beyond_the_day_before(world: World) -> None:
    """The match reads the day before's statement for every order, and the older ones only
    for orders not sent that day: a repeat three days later, of ours or of an order we do not
    know, is still a duplicate, and an order of the day is still a plain match."""
    w = world
    await w.record("AGAIN", "succeeded")
    w.bank.add(D, "AGAIN", bank_ref="P1")
    w.bank.add(D, "STRANGER", bank_ref="S1")  # not ours: missing at the gateway, on day D
    later = D + timedelta(days=3)
    w.bank.add(later, "AGAIN", bank_ref="P2")
    w.bank.add(later, "STRANGER", bank_ref="S2")
    await w.record("TODAY", "succeeded", day=later)
    w.bank.add(later, "TODAY")

    first = await reconcile_day(w.svc, "bank-a", D)
    assert sorted(await w.breaks(first.run_id)) == [LEDGER_BREAK, "STRANGER/missing_at_gateway"]
    again = await reconcile_day(w.svc, "bank-a", later)

    assert sorted(await w.breaks(again.run_id)) == [
        LEDGER_BREAK,
        "AGAIN/duplicate_at_bank",
        "STRANGER/duplicate_at_bank",
    ]
    assert again.summary.matched.count == 1  # TODAY


async def test_listed_orders_are_kept_per_funder_and_day_and_dropped_after_the_window(
    world: World,
) -> None:
    w = with_window(world, 0)  # kept: the window plus 7 days plus 1
    later = D + timedelta(days=9)
    w.bank.add(D, "OLD")
    w.banks["bank-b"].add(D, "OTHER")
    w.bank.add(later, "NEW")

    async def seen() -> list[tuple[str, str, date]]:
        async with w.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tableoid::regclass::text AS part, funder_id, business_day"
                " FROM recon_seen ORDER BY business_day, funder_id"
            )
        return [(r["part"], r["funder_id"], r["business_day"]) for r in rows]

    assert (await reconcile_day(w.svc, "bank-a", D)).ok
    assert (await reconcile_day(w.svc, "bank-b", D)).ok
    again = await reconcile_day(w.svc, "bank-a", D)  # a re-run refills its own partition
    assert again.ok
    first = await seen()
    assert [(f, d) for _, f, d in first] == [("bank-a", D), ("bank-b", D)]
    assert len({p for p, _, _ in first}) == 2  # one partition per funder and day

    assert (await reconcile_day(w.svc, "bank-a", later)).ok

    # bank-a's day D fell out of what a run of `later` looks back on; bank-b's is its own
    assert [(f, d) for _, f, d in await seen()] == [("bank-b", D), ("bank-a", later)]
    async with w.pool.acquire() as conn:
        kept = [
            await conn.fetchval(
                "SELECT to_regclass(quote_ident(recon_seen_partition($1, $2))) IS NOT NULL", f, d
            )
            for f, d in (("bank-a", D), ("bank-b", D), ("bank-a", later))
        ]
    assert kept == [False, True, True]  # the table itself is dropped


async def test_pruning_reads_no_other_relation_name_as_a_day(world: World) -> None:
    """With nested loops off the planner hashes the join and tests the day condition on every
    relation of pg_class, TOAST tables included: a name that is no date must not fail it."""
    w = with_window(world, 0)
    w.bank.add(D, "OLD")
    assert (await reconcile_day(w.svc, "bank-a", D)).ok
    async with w.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_nestloop = off")
        assert await rq.prune_seen(conn, "bank-a", D) == []  # nothing older than D
        dropped = await rq.prune_seen(conn, "bank-a", D + timedelta(days=1))
        assert dropped == [await conn.fetchval("SELECT recon_seen_partition('bank-a', $1)", D)]


async def test_a_failed_pruning_is_logged_and_does_not_fail_the_committed_run(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    await w.record("PAID", "succeeded")
    w.bank.add(D, "PAID")

    async def broken(*_: object) -> list[str]:
        raise asyncpg.exceptions.InvalidDatetimeFormatError("invalid value for YYYY")

    monkeypatch.setattr(rq, "prune_seen", broken)
    with capture_logs() as logs:
        result = await reconcile_day(w.svc, "bank-a", D)
    assert result.ok
    assert result.summary.matched.count == 1
    assert [e["error"] for e in logs if e["event"] == "recon.prune_failed"] == [
        "invalid value for YYYY"
    ]
    async with w.pool.acquire() as conn:
        run = await rq.get_run(conn, result.run_id)
    assert run is not None
    assert run["status"] == "succeeded"


async def test_order_numbers_beyond_ascii_are_matched_remembered_and_found_late(
    world: World,
) -> None:
    # the run compares order numbers bytewise, our tables in their own collation: every place
    # the two meet (attempts, earlier statements, the pending pool, earlier breaks) must agree
    w = with_window(world, 0)
    await w.record("Ö-2", "succeeded")
    await w.record("Ä-1", "succeeded")  # not on its day's statement: missing at the bank
    w.bank.add(D, "Ö-2")
    w.bank.add(D, "订单-X")  # an order we do not know
    w.bank.add(D + timedelta(days=1), "Ä-1")  # listed a day late
    w.bank.add(D + timedelta(days=1), "订单-X")  # and paid again

    first = await reconcile_day(w.svc, "bank-a", D)
    second = await reconcile_day(w.svc, "bank-a", D + timedelta(days=1))

    assert first.ok, first.error
    assert second.ok, second.error
    assert (first.summary.matched.count, second.summary.matched.count) == (1, 1)
    breaks = await w.breaks()
    assert {k: b["status"] for k, b in breaks.items() if k != LEDGER_BREAK} == {
        "Ä-1/missing_at_bank": "auto_resolved",  # closed by the late line
        "订单-X/missing_at_gateway": "open",
        "订单-X/duplicate_at_bank": "open",
    }
    async with w.pool.acquire() as conn:
        pool = await conn.fetchrow("SELECT * FROM recon_pending WHERE order_no = 'Ä-1'")
    assert pool is not None
    assert pool["seen_day"] == D + timedelta(days=1)


# ---------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


async def test_a_bad_file_fails_the_run_with_its_line_and_applies_nothing(
    world: World, tmp_path: Path
) -> None:
    w = with_window(world, 0, path=str(tmp_path / "{funder}-{day}.csv"))
    await w.record("U1", "unknown")
    await w.record("OK", "succeeded")
    file = tmp_path / f"bank-a-{D}.csv"

    missing = await reconcile_day(w.svc, "bank-a", D)
    assert not missing.ok
    assert "no statement file" in (missing.error or "")

    header = "order_no,bank_ref,amount,status,finished_at\n"
    _write(file, header + "U1,R1,1000000,SUCCESS,2026-03-10T18:00:00+08:00\nOK,R2,12x,SUCCESS,\n")
    bad = await reconcile_day(w.svc, "bank-a", D)

    assert (bad.ok, bad.error) == (False, "line 3: invalid literal for int() with base 10: '12x'")
    async with w.pool.acquire() as conn:
        run = await rq.run_of(conn, "bank-a", D)
        assert run is not None
        assert (run["status"], run["error"]) == ("failed", bad.error)
        assert await conn.fetchval("SELECT count(*) FROM recon_seen") == 0
    assert await w.status("U1") == ("unknown", "unknown")  # nothing half-applied
    assert await w.breaks() == {}

    _write(file, header + "U1,R1,1000000,SUCCESS,\nOK,R2,1000000,SUCCESS,\n")
    fixed = await reconcile_day(w.svc, "bank-a", D)
    assert fixed.ok
    assert fixed.run_id == bad.run_id
    assert await w.status("U1") == ("succeeded", "succeeded")


_HEAD = b"order_no,bank_ref,amount,status,finished_at\n"
_OK = b"OK,R1,1000000,SUCCESS,2026-03-10T18:00:00+08:00\n"
_U = b"U1,R2,1000000,FAILED,2026-03-10T18:00:00Z\n"


async def _run_tables(w: World) -> list[str]:
    """Tables a run made for itself (its staged statement, its match) still in the catalog."""
    async with w.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname ~ '^recon_(raw|lines|joined)_[0-9]+$'"
        )
    return [r["relname"] for r in rows]


def _spy_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each run took the fast path (`_copy_file_raw`), in order."""
    import gateway.reconcile as reconcile

    taken: list[bool] = []
    real = reconcile._copy_file_raw

    async def spy(*args: Any) -> Any:
        staged = await real(*args)  # the staged file's totals, None when it declined
        taken.append(staged is not None)
        return staged

    monkeypatch.setattr(reconcile, "_copy_file_raw", spy)
    return taken


@pytest.mark.parametrize(
    ("body", "fast"),
    [
        (_HEAD + _OK + _U, True),  # plain: COPYed as it is, checked in SQL
        # digits with underscores: PostgreSQL 16+ reads them as int() does, 15 refuses them and
        # the parser takes over; either way the result must be the parser's
        (_HEAD + _OK + b"U1,R2,1_000_000,FAILED,\n", None),
        (_HEAD + _OK + b"U1,R2,x,FAILED,\n", False),
        (_HEAD + _OK + b"U1,R2,1000000,FAILED,2026-03-10\n", False),
        (_HEAD + _OK + b",R2,1000000,FAILED,\n", False),
        (_HEAD + _OK + b'"U1","R2",1000000,"FAILED",\n', False),  # quoted: to the parser
        (_HEAD + _OK + _U + b"ST,,5,REVERSED,\n", True),
        (b"\xef\xbb\xbf" + _HEAD + _OK + _U, False),  # anything else goes to the parser
        (_HEAD + _OK + b"\n" + _U, False),  # a blank line
        (_HEAD.replace(b"\n", b"\r\n") + _OK.replace(b"\n", b"\r\n"), False),
        (_HEAD + _OK + b"U1, R2 ,1000000,FAILED,2026-03-10T18:00:00\n", False),
        (_HEAD + _OK + _U[:-1], False),  # truncated
        (_HEAD + _OK + b"U1,R2,1000000,FAILED,2026-02-30T18:00:00+08:00\n", False),
        (_HEAD + _OK + b"U1,R2,-5,FAILED,\n", False),
        (_HEAD + _OK + b"U1,R2,1000000,PAID,\n", False),
        (_HEAD + _OK + b"U1,R2,1000000,FAILED\n", False),
        (_HEAD + _OK + b'U1,"R\n2",1000000,FAILED,\n', False),  # a field across lines
        (_HEAD + _OK + b"U1,R\xff,1000000,FAILED,\n", False),  # not UTF-8
        (_HEAD + _OK + b"U1,R\x002,1000000,FAILED,\n", False),
        (b"order_no,bank_ref,amount,state,finished_at\n" + _OK, False),
        (_HEAD, False),
        (b"", False),
        (_HEAD + _OK + _OK, True),  # a repeated line: refused in SQL either way
        # an order on several lines that differ is no repeated line; empty fields compare
        # equal when the rest repeats
        (_HEAD + _OK + _OK.replace(b"SUCCESS", b"REVERSED"), True),
        (_HEAD + _OK + b"ST,,5,REVERSED,\nST,,5,FAILED,\n", True),
        (_HEAD + _OK + b"ST,,5,REVERSED,\nST,,5,REVERSED,\n", True),
    ],
)
async def test_a_sandbox_file_reads_the_same_on_the_fast_path_and_through_the_parser(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: bytes, fast: bool | None
) -> None:
    import gateway.reconcile as reconcile

    w = with_window(world, 0, path=str(tmp_path / "{funder}-{day}.csv"))
    await w.record("OK", "succeeded")
    await w.record("U1", "failed")
    (tmp_path / f"bank-a-{D}.csv").write_bytes(body)
    taken = _spy_on_the_fast_path(monkeypatch)
    got = await reconcile_day(w.svc, "bank-a", D, trigger="test")
    async with w.pool.acquire() as conn:
        seen = [tuple(r) for r in await conn.fetch("SELECT * FROM recon_seen ORDER BY order_no")]
    if fast is not None:
        assert taken == [fast]

    # the same file through the parser alone, after a clean slate
    async def never(*args: Any) -> None:
        return None

    monkeypatch.setattr(reconcile, "_copy_file_raw", never)
    async with w.pool.acquire() as conn:
        await conn.execute("TRUNCATE recon_runs, recon_breaks, recon_seen, recon_pending CASCADE")
    want = await reconcile_day(w.svc, "bank-a", D, trigger="test")
    async with w.pool.acquire() as conn:
        seen_parser = [
            tuple(r) for r in await conn.fetch("SELECT * FROM recon_seen ORDER BY order_no")
        ]
    assert (got.status, got.error) == (want.status, want.error)
    assert got.summary.to_json() == want.summary.to_json()
    assert seen == seen_parser


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (_HEAD + _OK + _OK, "line 3: duplicate line: repeats line 2"),
        (
            _HEAD + b"ST,,5,REVERSED,\n" + _OK + b"ST,,5,REVERSED,\n",
            "line 4: duplicate line: repeats line 2",
        ),
        (_HEAD + _OK + b"ST,,5,REVERSED,\nST,,5,FAILED,\n", None),
        (_HEAD + _OK + _OK.replace(b"SUCCESS", b"REVERSED"), None),
    ],
)
async def test_a_repeated_line_fails_the_run_and_an_order_on_several_lines_does_not(
    world: World, tmp_path: Path, body: bytes, error: str | None
) -> None:
    w = with_window(world, 0, path=str(tmp_path / "{funder}-{day}.csv"))
    await w.record("OK", "succeeded")
    (tmp_path / f"bank-a-{D}.csv").write_bytes(body)

    result = await reconcile_day(w.svc, "bank-a", D)

    assert (result.status, result.error) == ("failed" if error else "succeeded", error)
    assert await _run_tables(w) == []  # the staged lines went with the run, either way


async def test_line_numbers_stay_exact_past_the_line_counters_first_block(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the fast path numbers lines from a sequence that hands them out 100,000 at a time
    taken = _spy_on_the_fast_path(monkeypatch)
    w = with_window(world, 0, path=str(tmp_path / "{funder}-{day}.csv"))
    first = b"O1,R1,5,SUCCESS,2026-03-10T18:00:00+08:00\n"
    lines = [first] + [b"O%d,R%d,5,SUCCESS,\n" % (i, i) for i in range(2, 100_003)]
    (tmp_path / f"bank-a-{D}.csv").write_bytes(_HEAD + b"".join(lines) + first)

    result = await reconcile_day(w.svc, "bank-a", D)

    assert (result.status, result.error) == (
        "failed",
        "line 100004: duplicate line: repeats line 2",
    )
    assert taken == [True]  # read on the fast path


async def test_the_staging_check_runs_with_parallel_workers(pool: asyncpg.Pool) -> None:
    # the check reads every staged line; asked for one row (`fetchrow`), PostgreSQL runs a
    # plan without its parallel workers
    async def body() -> AsyncIterator[bytes]:
        yield _HEAD + b"".join(b"O%d,R%d,5,SUCCESS,\n" % (i, i) for i in range(1, 2_001))

    async def launched(conn: asyncpg.Connection) -> int:
        await conn.execute("SELECT pg_stat_force_next_flush()")
        n = await conn.fetchval(
            "SELECT parallel_workers_launched FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
        return int(n)

    async with pool.acquire() as conn:
        if conn.get_server_version().major < 18:
            pytest.skip("pg_stat_database counts parallel workers from PostgreSQL 18 on")
        before = await launched(conn)
        async with conn.transaction():
            # a parallel plan for a small table
            for cost in (
                "parallel_setup_cost",
                "parallel_tuple_cost",
                "min_parallel_table_scan_size",
            ):
                await conn.execute(f"SET LOCAL {cost} = 0")
            await rq.create_raw(conn, 1)
            assert await rq.copy_raw(conn, 1, body()) == 2_000
            totals = await rq.stage_raw(conn, 1)
            await rq.drop_stage(conn, 1)
        assert totals == rq.StageTotals(2_000, 10_000, 10_000)
        assert await launched(conn) > before


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (["A", "A"], "line 2: duplicate line: repeats line 1"),
        (["A", "B!"], "line 2: status 'paid' is not one of ['failed', 'reversed', 'succeeded']"),
    ],
)
async def test_a_connector_statement_with_a_bad_line_fails_the_run(
    world: World, lines: list[str], error: str
) -> None:
    stamp = at(D, 18)
    for name in lines:
        status = "paid" if name.endswith("!") else "succeeded"
        w_line = StatementLine(name.rstrip("!"), "R", AMOUNT, status, stamp)
        world.bank.days.setdefault(D, []).append(w_line)

    result = await reconcile_day(world.svc, "bank-a", D)

    assert (result.status, result.error) == ("failed", error)
    assert await _run_tables(world) == []


async def test_a_statement_the_bank_cannot_deliver_fails_the_run(world: World) -> None:
    world.bank.broken[D] = OutcomeUnknown("sandbox statement: read timeout")
    result = await reconcile_day(world.svc, "bank-a", D)
    assert (result.status, result.error) == ("failed", "sandbox statement: read timeout")


async def test_a_generic_gbk_csv_with_a_summary_row_is_reconciled(
    world: World, tmp_path: Path
) -> None:
    w = with_window(
        world,
        0,
        path=str(tmp_path / "{day}.csv"),
        format="csv",
        encoding="gbk",
        amount_unit="yuan",
        columns={
            "order_no": "商户订单号",
            "bank_ref": "银行流水号",
            "amount": "金额",
            "status": "状态",
            "booked_at": "完成时间",
        },
        status_map={"成功": "succeeded", "失败": "failed"},
        summary={"position": "last", "marker": "合计", "count_field": 1, "total_field": 2},
    )
    await w.record("G1", "succeeded")
    await w.record("G2", "processing")
    text = (
        "商户订单号,银行流水号,金额,状态,完成时间\n"
        "G1,B001,10000.00,成功,2026-03-10 18:00:00\n"
        "G2,B002,10000.00,失败,2026-03-10 18:05:00\n"
        "合计,2,20000.00\n"
    )
    (tmp_path / f"{D}.csv").write_bytes(text.encode("gbk"))

    result = await reconcile_day(w.svc, "bank-a", D)

    assert result.ok, result.error
    assert result.summary.matched.count == 1
    assert await w.status("G2") == ("failed", "failed")


# ---------------------------------------------------------------- resolution by a person


async def test_bank_is_right_moves_an_open_record_through_the_state_machine(world: World) -> None:
    w = with_window(world, 0)
    await w.record("ACC", "accepted")  # never sent, yet the bank paid it: not certain
    w.bank.add(D, "ACC")
    result = await reconcile_day(w.svc, "bank-a", D)
    brk = (await w.breaks(result.run_id))["ACC/status_mismatch_bank_succeeded"]
    assert brk["status"] == "open"

    row = await resolve_break(w.svc, brk["id"], "bank_is_right", "bank confirmed by phone", "ops")

    assert (row["status"], row["resolution"], row["resolved_by"], row["note"]) == (
        "resolved",
        "bank_is_right",
        "ops",
        "bank confirmed by phone",
    )
    assert row["evidence"]["correction"] == {"applied": True, "from": "accepted",
                                              "to": "succeeded"}  # fmt: skip
    assert await w.status("ACC") == ("succeeded", "succeeded")
    async with w.pool.acquire() as conn:
        events = [r["event"] for r in await q.vouchers_of(conn, "TACC")]
    assert any('"resolution":"bank_is_right"' in e and '"by":"ops"' in e for e in events)


async def test_bank_is_right_reverses_a_final_outcome_the_bank_contradicts(
    world: World,
) -> None:
    w = with_window(world, 0)
    await w.record("GONE", "succeeded")
    result = await reconcile_day(w.svc, "bank-a", D)
    brk = (await w.breaks(result.run_id))["GONE/missing_at_bank"]

    row = await resolve_break(w.svc, brk["id"], "bank_is_right", "bank never paid", "ops")

    assert row["status"] == "resolved"
    assert row["evidence"]["correction"]["applied"] is True
    assert await w.status("GONE") == ("failed", "failed")
    async with w.pool.acquire() as conn:
        kinds = [r["kind"] for r in await q.vouchers_of(conn, "TGONE")]
    assert "disbursement.corrected" in kinds
    assert "ledger.disbursement.corrected_failed" in kinds


async def test_a_final_outcome_is_not_reversed_while_its_funders_statement_is_reconciled(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run reads our records when it matches and writes its verdicts at its commit,
    minutes later for a large statement. A payout a person fails in between (the bank never
    paid it, says a `missing_at_bank` break) which the run's statement lists late, paid, was
    matched as paid: the money moved, the disbursement says failed, and no break says so.
    Such a reversal waits for the run: refused, nothing written, the break left open."""
    w = with_window(world, 0)
    await w.record("SLOW", "succeeded")
    first = await reconcile_day(w.svc, "bank-a", D)
    brk = (await w.breaks(first.run_id))["SLOW/missing_at_bank"]
    late = D + timedelta(days=5)
    w.bank.add(late, "SLOW")
    usage = await w.usage()
    refused: list[tuple[str, int]] = []
    real = rq.sweep_pending

    async def person_meanwhile(*args: Any, **kwargs: Any) -> None:
        # the run has matched the statement against our records, not yet committed
        try:
            await resolve_break(w.svc, brk["id"], "bank_is_right", "bank never paid", "ops")
        except ResolveError as e:
            refused.append((e.code, e.status))
        await real(*args, **kwargs)

    monkeypatch.setattr(rq, "sweep_pending", person_meanwhile)
    result = await reconcile_day(w.svc, "bank-a", late)

    assert result.ok, result.error
    assert await w.status("SLOW") == ("succeeded", "succeeded")  # as the bank paid it
    assert refused == [("reconciliation_running", 409)]
    assert await w.usage() == usage
    found = (await w.breaks(first.run_id))["SLOW/missing_at_bank"]
    assert (found["status"], found["resolution"]) == ("auto_resolved", "auto")
    async with w.pool.acquire() as conn:
        kinds = [r["kind"] for r in await q.vouchers_of(conn, "TSLOW")]
        check = await ledger.verify(conn)
    assert "disbursement.corrected" not in kinds
    assert "recon.break_resolved" not in kinds
    assert check.ok, check.problems

    # after the run a reversal goes through again (here: the break is closed, so refused)
    with pytest.raises(ResolveError) as closed:
        await resolve_break(w.svc, brk["id"], "bank_is_right", "bank never paid", "ops")
    assert closed.value.code == "break_not_open"


async def test_reconciliation_vouchers_name_the_disbursement_they_are_listed_under(
    world: World,
) -> None:
    """Automatic and manual resolutions name the disbursement in the event as in the txn_no
    column, so the chain's check of that column holds them too; a break of no gateway
    record names none."""
    w = with_window(world, 0)
    await w.record("AUTO", "unknown")
    w.bank.add(D, "AUTO")
    await w.record("ACC", "accepted")
    w.bank.add(D, "ACC")
    await w.record("KEEP", "succeeded")
    w.bank.add(D, "STRANGER")
    result = await reconcile_day(w.svc, "bank-a", D)
    breaks = await w.breaks(result.run_id)
    assert breaks["AUTO/status_mismatch_bank_succeeded"]["status"] == "auto_resolved"
    for key, resolution in (
        ("ACC/status_mismatch_bank_succeeded", "bank_is_right"),
        ("KEEP/missing_at_bank", "gateway_is_right"),
    ):
        await resolve_break(w.svc, breaks[key]["id"], resolution, "checked", "ops")
    stranger = next(b for k, b in breaks.items() if k.startswith("STRANGER/"))
    await resolve_break(w.svc, stranger["id"], "gateway_is_right", "not ours", "ops")

    async with w.pool.acquire() as conn:
        while await seal_once(conn):
            pass
        check = await verify(conn)
        rows = await conn.fetch(
            "SELECT txn_no, event::jsonb ->> 'order_no' AS order_no,"
            " event::jsonb ->> 'txn_no' AS named, event::jsonb ? 'txn_no' AS has_key"
            " FROM voucher_events WHERE kind LIKE 'recon.%' ORDER BY id"
        )
    assert check.ok, check.problem
    listed = {r["order_no"]: r["txn_no"] for r in rows}
    assert listed == {"AUTO": "TAUTO", "ACC": "TACC", "KEEP": "TKEEP", "STRANGER": None}
    assert all(r["has_key"] and r["named"] == r["txn_no"] for r in rows), rows


async def test_gateway_is_right_leaves_the_record_as_it_is(world: World) -> None:
    w = with_window(world, 0)
    await w.record("KEEP", "succeeded")
    result = await reconcile_day(w.svc, "bank-a", D)
    brk = (await w.breaks(result.run_id))["KEEP/missing_at_bank"]

    row = await resolve_break(w.svc, brk["id"], "gateway_is_right", "bank file was late", "ops")

    assert row["status"] == "resolved"
    assert row["evidence"]["correction"]["applied"] is False
    assert await w.status("KEEP") == ("succeeded", "succeeded")


async def test_the_http_api_lists_runs_and_breaks_and_resolves(
    pool: asyncpg.Pool, world: World
) -> None:
    w = with_window(world, 0)
    await w.record("H1", "succeeded")
    w.bank.add(D, "H1", amount=5)
    w.bank.add(D, "H2")
    result = await reconcile_day(w.svc, "bank-a", D)
    app = create_app(w.svc.cfg, pool=pool, connectors=dict(w.banks), role="api")
    async with TestClient(TestServer(app)) as client:
        runs = await (await client.get(f"/v1/reconciliation/runs?date={D}", headers=AUTH)).json()
        assert [r["id"] for r in runs["items"]] == [result.run_id]
        assert runs["items"][0]["summary"]["breaks"]["missing_at_gateway"]["count"] == 1
        one = await client.get(f"/v1/reconciliation/runs/{result.run_id}", headers=AUTH)
        assert (await one.json())["status"] == "succeeded"
        page = await client.get(
            f"/v1/reconciliation/runs/{result.run_id}/breaks?type=amount_mismatch", headers=AUTH
        )
        items = (await page.json())["items"]
        assert [b["order_no"] for b in items] == ["H1"]
        listed = await client.get(
            f"/v1/reconciliation/breaks?run={result.run_id}&status=open&limit=1", headers=AUTH
        )
        body = await listed.json()
        assert len(body["items"]) == 1
        assert body["next_cursor"] is not None
        bad = await client.get("/v1/reconciliation/breaks?type=nonsense", headers=AUTH)
        assert bad.status == 422
        assert (await client.get("/v1/reconciliation/runs/999", headers=AUTH)).status == 404
        assert (await client.get("/v1/reconciliation/runs")).status == 401

        url = f"/v1/reconciliation/breaks/{items[0]['id']}/resolve"
        resp = await client.post(
            url, json={"resolution": "gateway_is_right", "note": "bank typo"}, headers=AUTH
        )
        assert resp.status == 200, await resp.text()
        done = await resp.json()
        assert (done["status"], done["resolved_by"], done["note"]) == (
            "resolved",
            "lending-core",
            "bank typo",
        )
        again = await client.post(
            url, json={"resolution": "gateway_is_right", "note": "x"}, headers=AUTH
        )
        assert again.status == 409
        invalid = await client.post(url, json={"resolution": "maybe", "note": "x"}, headers=AUTH)
        assert invalid.status == 422
        doc = await (await client.get("/openapi.json")).json()
        assert "/v1/reconciliation/breaks/{id}/resolve" in doc["paths"]


# ---------------------------------------------------------------- the schedule


async def test_the_scheduler_catches_up_missed_days_once(world: World) -> None:
    w = world
    for i in range(3):
        await w.record(f"S{i}", "succeeded", day=D + timedelta(days=i))
        w.bank.add(D + timedelta(days=i), f"S{i}")
    # 02:30 on D + 3: D, D + 1 and D + 2 are due; before 02:00 D + 2 would not be
    w.now[0] = at(D + timedelta(days=3), 1)
    early = await run_due(w.svc)
    assert [(r.funder_id, r.day) for r in early] == [
        ("bank-a", D),
        ("bank-a", D + timedelta(days=1)),
    ]
    w.now[0] = datetime.combine(D + timedelta(days=3), time(2, 30), tzinfo=ZONE)
    later = await run_due(w.svc)
    assert [(r.funder_id, r.day, r.ok) for r in later] == [("bank-a", D + timedelta(days=2), True)]
    assert await run_due(w.svc) == []
    assert w.bank.fetched == [D, D + timedelta(days=1), D + timedelta(days=2)]


async def test_only_the_process_holding_the_lock_runs_the_schedule(world: World) -> None:
    w = world
    await w.record("L1", "succeeded")
    w.bank.add(D, "L1")
    async with w.pool.acquire() as other:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", SCHEDULER_LOCK_KEY)
        assert await run_due(w.svc) == []
        await other.execute("SELECT pg_advisory_unlock($1)", SCHEDULER_LOCK_KEY)
    assert [r.day for r in await run_due(w.svc)] == [D]


async def test_one_funder_and_day_is_reconciled_by_one_process_at_a_time(world: World) -> None:
    from gateway.reconcile import RUN_LOCK_CLASS

    async with world.pool.acquire() as other:
        await other.execute(
            "SELECT pg_advisory_lock($1::int, hashtext($2))", RUN_LOCK_CLASS, f"bank-a:{D}"
        )
        with pytest.raises(RunInProgress):
            await reconcile_day(world.svc, "bank-a", D)
        await other.execute(
            "SELECT pg_advisory_unlock($1::int, hashtext($2))", RUN_LOCK_CLASS, f"bank-a:{D}"
        )


async def test_the_scheduler_loop_runs_at_start_and_stops(world: World) -> None:
    await world.record("Z", "succeeded")
    world.bank.add(D, "Z")
    stop = asyncio.Event()
    task = asyncio.create_task(run_scheduler(world.svc, stop, poll_seconds=0.05))

    async def ran() -> bool:
        async with world.pool.acquire() as conn:
            return await rq.run_of(conn, "bank-a", D) is not None

    for _ in range(200):
        if await ran():
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert await ran()
    text = world.svc.metrics.render()[0].decode()
    assert 'fundgate_recon_runs_total{funder="bank-a",outcome="succeeded"} 1.0' in text
    assert 'fundgate_recon_breaks{funder="bank-a",type="missing_at_bank"} 0.0' in text
