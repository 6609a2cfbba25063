"""The outbox worker that sends payouts, and the poller that asks banks about open attempts.

Work is claimed with `FOR UPDATE SKIP LOCKED` and a lease: a process that dies mid-call loses
its lease and another process re-sends the same order number, which the bank treats as the
same order. The state change and the removal of the outbox row commit together.

Batching: rows claimed together for a funder whose connector batches (`connectors.base.
BatchingConnector`, e.g. iso20022 with `batch_size` > 1) go to the bank in one call of up to
`max_batch` orders; every other row is a call of its own. A batch is one bank call for the
funder's in-flight limit and its circuit breaker, and one `disburse` observation per order in
the metrics. Each order's outcome is then recorded exactly as for a single call, in its own
transaction, with the same rules: a claim whose earlier send has no recorded outcome is never
failed over, and a whole-call failure is `NotSent` or `OutcomeUnknown` for every order in it.
Batching is opportunistic: it takes what one claim found ready, it never waits to fill up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from connectors.base import BankStatus, BatchingConnector, PayoutOrder, PayoutResult, max_batch
from connectors.errors import NotSent, OutcomeUnknown, Rejected
from gateway import pii, states
from gateway.context import Services
from gateway.metrics import ConnectorOutcome
from gateway.outcomes import (
    BANK_TO_STATE,
    Settle,
    apply_bank_status,
    fail_over,
    move,
    query_delay,
    retry_stale,
)
from gateway.store import queries as q

log = structlog.get_logger("fundgate.dispatcher")

Result = PayoutResult | Rejected | NotSent | OutcomeUnknown

# a deadlock victim's transaction is rolled back whole and done again (as intake's are)
RECORD_DEADLOCK_RETRIES = 3


def _error(e: Exception) -> dict[str, Any]:
    code = getattr(e, "code", None) or type(e).__name__
    return {"code": str(code), "message": str(getattr(e, "message", e))[:300]}


def payout_order(svc: Services, a: asyncpg.Record) -> PayoutOrder:
    """The instruction for one attempt (from `queries.load_attempt`), payee decrypted."""
    account_no, account_name = pii.payee(svc.vault, a)
    return PayoutOrder(
        order_no=a["order_no"],
        txn_no=a["txn_no"],
        funder_id=a["funder_id"],
        amount=a["amount"],
        currency=a["currency"],
        account_no=account_no,
        account_name=account_name,
        bank_code=a["payee_bank_code"],
        mode=a["mode"],
        funder_amount=a["alloc_funder"],
        platform_amount=a["alloc_platform"],
        callback_url=svc.callback_url(a["funder_id"]),
    )


def outcome_of(result: Result | None) -> ConnectorOutcome:
    if isinstance(result, PayoutResult):
        return "ok"
    if isinstance(result, Rejected):
        return "rejected"
    if isinstance(result, NotSent):
        return "not_sent"
    return "unknown"


def call_outcome(results: list[Result]) -> ConnectorOutcome:
    """The circuit breaker's view of one bank call that carried several orders: an answer
    about any order shows the bank up; only a call that failed for all is a failure."""
    outcomes = {outcome_of(r) for r in results}
    for answered in ("ok", "rejected"):
        if answered in outcomes:
            return answered
    return "not_sent" if outcomes == {"not_sent"} else "unknown"


async def note_circuit(conn: q.Conn, svc: Services, funder_id: str) -> None:
    """Publish a circuit transition of this process's breaker to every process."""
    b = svc.breakers[funder_id]
    if not b.changed:
        return
    b.changed = False
    await q.save_circuit(conn, funder_id, b.state, b.failures, b.open_until(svc.clock()))
    svc.metrics.set_circuit_state(funder_id, b.state)
    log.warning("circuit." + b.state, funder_id=funder_id, failures=b.failures)


def _checked(order: PayoutOrder, r: object) -> Result:
    """One order's outcome from a batch call, distrusting what is not plainly about it."""
    if isinstance(r, PayoutResult):
        if r.order_no == order.order_no:
            return r
        return OutcomeUnknown(f"the connector answered about {r.order_no!r}", code="mismatch")
    if isinstance(r, Rejected | NotSent | OutcomeUnknown):
        return r
    return OutcomeUnknown(f"the connector answered {type(r).__name__}", code="mismatch")


class _Loop:
    """A claim-and-handle loop with bounded concurrency, woken early by `wake()`."""

    name = "loop"

    def __init__(self, svc: Services, capacity: int) -> None:
        self.svc = svc
        self.capacity = capacity
        self.tasks: set[asyncio.Task[None]] = set()
        self.claimed: dict[asyncio.Task[None], list[int]] = {}  # task -> its outbox row ids
        self._wake = asyncio.Event()
        self._running = False  # `run` is between its start and its end
        self._ended = asyncio.Event()

    def wake(self, *_: Any) -> None:
        self._wake.set()

    async def claim(self, conn: q.Conn, n: int) -> list[asyncpg.Record]:
        raise NotImplementedError

    async def handle(self, row: asyncpg.Record) -> None:
        raise NotImplementedError

    def units(self, rows: list[asyncpg.Record]) -> list[list[asyncpg.Record]]:
        """Claimed rows grouped into units of work, one task each: a row each by default."""
        return [[row] for row in rows]

    async def handle_unit(self, rows: list[asyncpg.Record]) -> None:
        for row in rows:
            await self.handle(row)

    async def release(self, conn: q.Conn, ids: list[int], untried: dict[int, int]) -> None:
        """Hand claimed work back at once (shutdown) instead of waiting for the lease;
        `untried` (of `untried_of`) is the part whose work never began."""
        raise NotImplementedError

    def untried_of(self, ids: list[int]) -> dict[int, int]:
        """Of the claimed `ids`, those whose work has not begun, with what their claim
        counted; read before the drain cancels anything. None by default."""
        return {}

    async def _guarded(self, rows: list[asyncpg.Record]) -> None:
        try:
            await self.handle_unit(rows)
        except asyncio.CancelledError:
            raise
        except Exception:  # the lease brings the rows back; the loop must live on
            log.exception(f"{self.name}.failed", row_ids=[r["id"] for r in rows])

    @property
    def in_flight(self) -> int:
        """Claimed rows not yet handled (capacity counts rows, not tasks)."""
        return sum(len(ids) for ids in self.claimed.values())

    async def run(self, stop: asyncio.Event) -> None:
        self._running = True
        try:
            await self._run(stop)
        finally:
            self._running = False
            self._ended.set()

    async def _run(self, stop: asyncio.Event) -> None:
        interval = self.svc.cfg.dispatch.poll_interval_seconds
        while not stop.is_set():
            free = self.capacity - self.in_flight
            rows: list[asyncpg.Record] = []
            if free > 0:
                try:
                    async with self.svc.pool.acquire() as conn:
                        rows = await self.claim(conn, free)
                except (TimeoutError, OSError, asyncpg.PostgresError) as e:
                    log.warning(f"{self.name}.claim_failed", error=str(e))
            for unit in self.units(rows):
                t = asyncio.create_task(self._guarded(unit))
                self.tasks.add(t)
                self.claimed[t] = [row["id"] for row in unit]
                t.add_done_callback(self._done)
            if rows and len(rows) == free:
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wait(stop), timeout=interval)

    def _done(self, t: asyncio.Task[None]) -> None:
        self.tasks.discard(t)
        self.claimed.pop(t, None)
        self._wake.set()

    async def _wait(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def drain(self, timeout: float) -> None:
        """Let in-flight calls finish; what does not is cancelled and handed back for another
        process (or the restart) to take at once. A cancelled bank call may have reached the
        bank: the re-send carries the same order number, and a claim without a recorded
        outcome is never failed over.

        The loop is let finish first: rows it claimed just before the stop (the claim
        committed, their tasks not yet started) become tasks, drained like the others,
        instead of waiting out their lease when the loop is cancelled mid-claim."""
        if self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), timeout)
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        ids = [i for t in pending for i in self.claimed.get(t, [])]
        untried = self.untried_of(ids)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1)
        if ids:
            try:
                async with self.svc.pool.acquire(timeout=2) as conn:
                    await self.release(conn, ids, untried)
                log.info(f"{self.name}.released", rows=len(ids))
            except (TimeoutError, OSError, asyncpg.PostgresError) as e:
                log.warning(f"{self.name}.release_failed", error=str(e), rows=len(ids))


class Dispatcher(_Loop):
    name = "dispatcher"

    def __init__(self, svc: Services) -> None:
        per_funder = svc.cfg.dispatch.max_in_flight_per_funder
        # orders one bank call may carry, per funder (1 unless its connector batches)
        self.batch = {f: max_batch(c) for f, c in svc.connectors.items()}
        # `max_in_flight_per_funder` bank calls per funder, each with up to a batch of rows
        rows = sum(per_funder * self.batch.get(f, 1) for f in svc.funders)
        super().__init__(svc, capacity=max(per_funder, rows))
        self.limits = {f: asyncio.Semaphore(per_funder) for f in svc.funders}
        # outbox row id -> its attempt, read with the claim (one query for all claimed rows
        # instead of one per row); taken by the row's handler, dropped when its task ends
        self.attempts: dict[int, asyncpg.Record] = {}
        # outbox row id -> the tries its claim counted, while claimed; and the claimed rows
        # whose bank call has begun (the others are handed back at shutdown as not tried)
        self.tries: dict[int, int] = {}
        self.calling: set[int] = set()

    async def claim(self, conn: q.Conn, n: int) -> list[asyncpg.Record]:
        rows = await q.claim(conn, "dispatch", n, self.svc.cfg.dispatch.lease_seconds)
        self.tries.update((r["id"], r["tries"]) for r in rows)
        if rows:
            found = await q.load_attempts(conn, [r["ref_id"] for r in rows])
            self.attempts.update(
                {r["id"]: found[r["ref_id"]] for r in rows if r["ref_id"] in found}
            )
        return rows

    async def _attempt(self, conn: q.Conn, row: asyncpg.Record) -> asyncpg.Record | None:
        """The row's attempt as read with the claim (as `queries.load_attempt` reads it: no
        lock), or read now."""
        a = self.attempts.pop(row["id"], None)
        return a if a is not None else await q.load_attempt(conn, row["ref_id"])

    def _done(self, t: asyncio.Task[None]) -> None:
        for row_id in self.claimed.get(t, ()):
            self.attempts.pop(row_id, None)
            self.tries.pop(row_id, None)
            self.calling.discard(row_id)
        super()._done(t)

    def untried_of(self, ids: list[int]) -> dict[int, int]:
        return {i: self.tries[i] for i in ids if i not in self.calling and i in self.tries}

    async def release(self, conn: q.Conn, ids: list[int], untried: dict[int, int]) -> None:
        # a row whose bank call began keeps its try: that request may have reached the bank
        await q.release_leases(conn, [i for i in ids if i not in untried])
        await q.release_untried(conn, untried)

    def units(self, rows: list[asyncpg.Record]) -> list[list[asyncpg.Record]]:
        """Rows of one batching funder travel together, up to its batch size; a row whose
        attempt is already in the batch (two rows for one order) goes alone."""
        out: list[list[asyncpg.Record]] = []
        filling: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            size = self.batch.get(row["funder_id"], 1)
            unit = filling.get(row["funder_id"])
            if size <= 1 or (unit is not None and any(r["ref_id"] == row["ref_id"] for r in unit)):
                out.append([row])
                continue
            if unit is None or len(unit) >= size:
                unit = filling[row["funder_id"]] = []
                out.append(unit)
            unit.append(row)
        return out

    async def handle_unit(self, rows: list[asyncpg.Record]) -> None:
        if len(rows) == 1:
            await self.handle(rows[0])
        else:
            await self._handle_batch(rows)

    async def handle(self, row: asyncpg.Record) -> None:
        svc = self.svc
        a = self.attempts.pop(row["id"], None)
        if a is None:
            async with svc.pool.acquire() as conn:
                a = await q.load_attempt(conn, row["ref_id"])
        if a is None or a["status"] not in ("accepted", "unknown"):
            async with svc.pool.acquire() as conn:
                await q.finish_outbox(conn, row["id"])
            return
        connector = svc.connectors[a["funder_id"]]
        breaker = svc.breakers[a["funder_id"]]
        # built before `allow()`: once the half-open circuit's one probe is handed out, only
        # `record()` gives it back, so nothing may fail between the two
        order = payout_order(svc, a)
        if not breaker.allow():
            # the funder's circuit is open: hold the payout without calling, not a try
            async with svc.pool.acquire() as conn:
                await q.defer_outbox(conn, row["id"], breaker.retry_in())
            return
        async with self.limits[a["funder_id"]]:
            self.calling.add(row["id"])
            result = await self._call(connector.name, order)
        breaker.record(outcome_of(result))
        await self._record(row, a, result)

    async def _handle_batch(self, rows: list[asyncpg.Record]) -> None:
        """Several rows of one funder: one bank call, then each order's outcome on its own."""
        svc = self.svc
        funder_id = rows[0]["funder_id"]
        ready: list[tuple[asyncpg.Record, asyncpg.Record]] = []
        strays: list[asyncpg.Record] = []
        async with svc.pool.acquire() as conn:
            for row in rows:
                a = await self._attempt(conn, row)
                if a is None or a["status"] not in ("accepted", "unknown"):
                    await q.finish_outbox(conn, row["id"])
                elif a["funder_id"] != funder_id:
                    strays.append(row)  # the row's funder is not the attempt's: alone, then
                else:
                    ready.append((row, a))
        for row in strays:
            await self.handle(row)
        if not ready:
            return
        connector = svc.connectors[funder_id]
        breaker = svc.breakers[funder_id]
        orders = [payout_order(svc, a) for _, a in ready]  # before `allow()`, as in `handle`
        if not breaker.allow():
            async with svc.pool.acquire() as conn:
                for row, _ in ready:
                    await q.defer_outbox(conn, row["id"], breaker.retry_in())
            return
        async with self.limits[funder_id]:
            self.calling.update(row["id"] for row, _ in ready)
            results = await self._call_batch(connector.name, orders)
        breaker.record(call_outcome(results))
        for (row, a), result in zip(ready, results, strict=True):
            try:
                await self._record(row, a, result)
            except asyncio.CancelledError:
                raise
            except Exception:  # its lease brings the row back; record the others
                log.exception("dispatcher.record_failed", row_id=row["id"], order_no=a["order_no"])

    async def _record(self, row: asyncpg.Record, a: asyncpg.Record, result: Result) -> None:
        """Apply one order's outcome and settle its outbox row, in one transaction (an answer
        of the bank: in one statement, `_record_answer`)."""
        if isinstance(result, PayoutResult):
            await self._record_answer(row, a, result)
            return
        for retry in range(RECORD_DEADLOCK_RETRIES + 1):
            try:
                await self._record_other(row, a, result)
                return
            except asyncpg.DeadlockDetectedError:
                # a fail-over reserves the next funder while holding the first's rows, and
                # may meet an intake taking them in the other order. Rolled back whole, it is
                # simply done again: left to its lease, the row would come back as an earlier
                # send without a recorded outcome, which is never failed over
                if retry == RECORD_DEADLOCK_RETRIES:
                    raise
                # the circuit published in the rolled-back transaction is published again
                self.svc.breakers[a["funder_id"]].changed = True
                log.warning("dispatcher.deadlock_retried", order_no=a["order_no"], retry=retry + 1)

    async def _record_other(self, row: asyncpg.Record, a: asyncpg.Record, result: Result) -> None:
        """`_record` of a refusal, a request not sent or an unknown outcome: one transaction."""
        svc = self.svc
        async with svc.pool.acquire() as conn, conn.transaction():
            await note_circuit(conn, svc, a["funder_id"])
            locked = await q.lock_attempt(conn, a["id"])
            assert locked is not None
            held = await q.lock_outbox(conn, row["id"])
            # this call outlived its lease: the row was claimed again (or settled) since, and
            # that claim's request may be at the bank now, its outcome not recorded yet
            superseded = held is None or held["tries"] != row["tries"]
            if superseded and (
                isinstance(result, NotSent)
                or (isinstance(result, Rejected) and result.pre_execution)
            ):
                # "not sent" or "refused before execution" speaks for this request alone: it
                # neither counts towards a fail-over nor settles the row of the later claim
                log.warning("dispatcher.superseded", order_no=a["order_no"], detail=_error(result))
                return
            earlier_unrecorded = row["tries"] > locked["not_sent_count"] + 1
            if (
                earlier_unrecorded
                and isinstance(result, NotSent | Rejected)
                and (isinstance(result, NotSent) or result.pre_execution)
            ):
                # an earlier claim of this row ended without a recorded outcome (its process
                # died or its lease ran out mid-call): that request may have reached the bank,
                # and "not sent" or "refused before execution" speaks only for this one, so
                # this attempt can no longer be failed over, only asked about
                result = OutcomeUnknown(
                    f"{result.message}; an earlier send of this order has no recorded outcome"
                )
            finished = await self._apply(conn, locked, result)
            if superseded:
                return  # the row is its later claim's to settle
            if finished:
                await q.finish_outbox(conn, row["id"])
            else:
                delay = svc.cfg.dispatch.not_sent_backoff_seconds * max(1, row["tries"])
                await q.retry_outbox(conn, row["id"], delay, str(result))

    async def _record_answer(
        self, row: asyncpg.Record, a: asyncpg.Record, result: PayoutResult
    ) -> None:
        """The bank answered about the order (the common case): the move and the outbox row in
        one statement (`outcomes.move`), no transaction held open. `a` was read before the
        call; when a callback or a query moved the attempt meanwhile, it is read again and the
        answer applied to what it is now."""
        svc = self.svc
        settle = Settle(outbox_id=row["id"])

        async def apply(a: asyncpg.Record) -> None:
            if result.status in BANK_TO_STATE:
                await apply_bank_status(
                    conn, svc, a, result.status, bank_ref=result.bank_ref,
                    fail_code=result.fail_code, fail_reason=result.fail_reason,
                    source="dispatch", settle=settle,
                )  # fmt: skip
            else:  # an answer the mapping does not know: only a query can tell
                await move(
                    conn, svc, a, "unknown", bank_ref=result.bank_ref, source="dispatch",
                    settle=settle,
                )  # fmt: skip

        async with svc.pool.acquire() as conn:
            await note_circuit(conn, svc, a["funder_id"])
            await retry_stale(conn, a, apply)

    async def _call_batch(self, connector_name: str, orders: list[PayoutOrder]) -> list[Result]:
        """One `disburse_batch` call: an outcome per order, whatever the connector does."""
        svc = self.svc
        funder_id = orders[0].funder_id
        connector = svc.connectors[funder_id]
        started = time.perf_counter()
        results: list[Result]
        try:
            if not isinstance(connector, BatchingConnector):
                raise TypeError(f"connector {connector_name!r} does not batch")
            got = list(await connector.disburse_batch(orders))
            if len(got) != len(orders):
                raise ValueError(f"{len(got)} outcomes for {len(orders)} orders")
            results = [_checked(order, r) for order, r in zip(orders, got, strict=True)]
        except (Rejected, NotSent, OutcomeUnknown) as e:
            results = [e] * len(orders)
        except Exception as e:  # a connector bug after the request may have left: assume sent
            log.exception("connector.unexpected_error", order_nos=[o.order_no for o in orders][:20])
            results = [OutcomeUnknown(f"unexpected connector error: {e!r}")] * len(orders)
        elapsed = time.perf_counter() - started
        for order, result in zip(orders, results, strict=True):
            outcome = outcome_of(result)
            svc.metrics.observe_connector_call(
                funder_id, connector_name, "disburse", outcome, elapsed
            )
            log.info(
                "bank.disburse",
                order_no=order.order_no,
                txn_no=order.txn_no,
                funder_id=funder_id,
                outcome=outcome,
                batch=len(orders),
                detail=None if isinstance(result, PayoutResult) else _error(result),
            )
        return results

    async def _call(self, connector_name: str, order: PayoutOrder) -> Result:
        svc = self.svc
        started = time.perf_counter()
        outcome: ConnectorOutcome = "ok"
        result: Result
        try:
            result = await svc.connectors[order.funder_id].disburse(order)
        except Rejected as e:
            result, outcome = e, "rejected"
        except NotSent as e:
            result, outcome = e, "not_sent"
        except OutcomeUnknown as e:
            result, outcome = e, "unknown"
        except Exception as e:  # a connector bug after the request may have left: assume sent
            log.exception("connector.unexpected_error", order_no=order.order_no)
            result, outcome = OutcomeUnknown(f"unexpected connector error: {e!r}"), "unknown"
        svc.metrics.observe_connector_call(
            order.funder_id, connector_name, "disburse", outcome, time.perf_counter() - started
        )
        log.info(
            "bank.disburse",
            order_no=order.order_no,
            txn_no=order.txn_no,
            funder_id=order.funder_id,
            outcome=outcome,
            detail=None if isinstance(result, PayoutResult) else _error(result),
        )
        return result

    async def _apply(self, conn: q.Conn, a: asyncpg.Record, result: Result) -> bool:
        """Apply a disburse outcome; False when the outbox row should be retried later."""
        svc = self.svc
        if isinstance(result, PayoutResult):
            if result.status in BANK_TO_STATE:
                await apply_bank_status(
                    conn, svc, a, result.status, bank_ref=result.bank_ref,
                    fail_code=result.fail_code, fail_reason=result.fail_reason, source="dispatch",
                )  # fmt: skip
            else:  # an answer the mapping does not know: only a query can tell
                await move(conn, svc, a, "unknown", bank_ref=result.bank_ref, source="dispatch")
            return True
        if isinstance(result, Rejected):
            err = {**_error(result), "pre_execution": result.pre_execution}
            if result.pre_execution and a["status"] == "accepted":
                await fail_over(conn, svc, a, err, source="dispatch")
            elif result.pre_execution and a["status"] in states.QUERYABLE:
                # a re-send of an order sent before (the poller's NOT_FOUND re-send): refused
                # before execution, it moved no money itself but says nothing about the first
                # request, whose outcome is not known. Only the bank's answer about the order
                # (a query, the statement) settles it; the attempt stays scheduled for those
                await q.update_attempt(
                    conn,
                    a["id"],
                    svc.clock(),
                    error=err,
                    next_query_at=a["next_query_at"]
                    or svc.clock() + timedelta(seconds=query_delay(svc, 0)),
                )
            else:
                await move(conn, svc, a, "failed", error=err, source="dispatch")
            return True
        if isinstance(result, NotSent):
            if a["status"] != "accepted":
                return False  # an unknown attempt stays with the poller; retry the re-send
            count = a["not_sent_count"] + 1
            if count > svc.cfg.dispatch.not_sent_retries:
                await fail_over(
                    conn, svc, a, {**_error(result), "not_sent": count}, source="dispatch"
                )
                return True
            await q.update_attempt(conn, a["id"], svc.clock(), not_sent_count=count)
            return False
        # OutcomeUnknown: the bank may have paid. Never fail over, never fail: ask it later.
        if not await move(conn, svc, a, "unknown", error=_error(result), source="dispatch"):
            await q.update_attempt(
                conn,
                a["id"],
                svc.clock(),
                next_query_at=svc.clock() + timedelta(seconds=query_delay(svc, 0)),
            )
        return True


class Poller(_Loop):
    """Asks banks about `sent`, `processing` and `unknown` attempts on a back-off schedule."""

    name = "poller"

    def __init__(self, svc: Services) -> None:
        super().__init__(svc, capacity=svc.cfg.dispatch.max_in_flight_per_funder)

    async def claim(self, conn: q.Conn, n: int) -> list[asyncpg.Record]:
        return await q.claim_queries(conn, n, self.svc.cfg.dispatch.lease_seconds)

    async def release(self, conn: q.Conn, ids: list[int], untried: dict[int, int]) -> None:
        await q.release_queries(conn, ids)

    async def handle(self, row: asyncpg.Record) -> None:
        svc = self.svc
        connector = svc.connectors[row["funder_id"]]
        started = time.perf_counter()
        outcome: ConnectorOutcome = "ok"
        result: PayoutResult | None = None
        try:
            result = await connector.query(row["order_no"])
        except NotSent:
            outcome = "not_sent"
        except OutcomeUnknown:
            outcome = "unknown"
        except Rejected:
            outcome = "rejected"
        except Exception:
            log.exception("connector.unexpected_error", order_no=row["order_no"])
            outcome = "unknown"
        svc.metrics.observe_connector_call(
            row["funder_id"], connector.name, "query", outcome, time.perf_counter() - started
        )
        svc.breakers[row["funder_id"]].record(outcome)
        async with svc.pool.acquire() as conn, conn.transaction():
            await note_circuit(conn, svc, row["funder_id"])
            a = await q.lock_attempt(conn, row["id"])
            if a is None or a["status"] not in states.QUERYABLE:
                return
            moved = False
            if result is not None and result.status in BANK_TO_STATE:
                moved = await apply_bank_status(
                    conn, svc, a, result.status, bank_ref=result.bank_ref,
                    fail_code=result.fail_code, fail_reason=result.fail_reason, source="query",
                )  # fmt: skip
            elif result is not None and result.status == BankStatus.NOT_FOUND:
                if a["status"] != "unknown":
                    # the bank had taken the order (accepted, processing) and now does not find
                    # it: what became of it is not known. The dispatcher re-sends only orders
                    # it has not got or whose outcome is unknown; left `sent`, the re-send
                    # would be dropped at every query, and the attempt never escalated
                    moved = await move(
                        conn, svc, a, "unknown", source="query",
                        error={"code": "not_found", "message": "the bank no longer finds it"},
                    )  # fmt: skip
                # the bank never executed it: re-send the same order number (idempotent there)
                if not await conn.fetchval(
                    "SELECT 1 FROM outbox WHERE kind = 'dispatch' AND ref_id = $1", a["id"]
                ):
                    await q.enqueue(conn, "dispatch", a["id"], funder_id=a["funder_id"])
                    log.info("bank.not_found_resend", order_no=a["order_no"])
            if moved:
                return
            count = a["query_count"] + 1
            now = svc.clock()
            fields: dict[str, Any] = {
                "query_count": count,
                "next_query_at": now + timedelta(seconds=query_delay(svc, count)),
            }
            if (
                a["status"] == "unknown"
                and a["escalated_at"] is None
                and a["unknown_since"] is not None
                and (now - a["unknown_since"]).total_seconds()
                >= svc.cfg.dispatch.escalate_after_seconds
            ):
                fields["escalated_at"] = now
                await q.voucher(
                    conn,
                    "attempt.escalated",
                    {"txn_no": a["txn_no"], "order_no": a["order_no"], "status": "unknown"},
                    a["txn_no"],
                )
                svc.metrics.attempt_escalated(a["funder_id"])
                log.error("attempt.escalated", order_no=a["order_no"], txn_no=a["txn_no"])
            await q.update_attempt(conn, a["id"], now, **fields)
