"""Nightly reconciliation, the I/O half: fetch a funder's statement, stream it into
PostgreSQL, match it there, persist the run and its breaks, resolve what is certain through
the state machine (`gateway.outcomes`), and let a person resolve the rest.

One run per (funder, statement day), idempotent: re-running a day updates the same run and
never duplicates a break. A run happens in three steps:

1. one transaction: COPY the statement into an unlogged table of the run's own, dropped
   before the commit (`rq.drop_stage`; a plain sandbox-CSV file as
   its raw bytes, checked in SQL; anything else through its parser; a bad file raises
   `StatementError` and the transaction rolls back: nothing is half-applied, the run is
   marked failed with the reason and its line, and can be re-run once the file is fixed),
   record what the statement listed, match the recorded orders in SQL (plain matches only
   counted), refuse duplicated lines, classify the rest (`reconciliation.classify`), sweep the
   pending pool, write the breaks; then, in a short transaction of its own, drop the
   funder's partitions of `recon_seen` that no later run looks back on;
2. each automatic resolution in its own short transaction with the attempt locked, so
   limits, prefund and callbacks are never blocked for the length of a run. A run that dies
   here is finished by re-running the day;
3. one short transaction: the ledger's settled payouts of the day against the statement's
   total of the day's orders (`_check_ledger`), a `ledger_total_mismatch` break when they
   differ beyond what the window still awaits.

`run_scheduler` runs yesterday's reconciliation for every funder at `[reconciliation]
run_at` (business time zone), under an advisory lock so one process does it, and catches up
days missed while no gateway was running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import structlog

from config.models import Funder
from connectors.base import BankStatus, StatementLine
from connectors.errors import ConnectorError, NotSent, Rejected
from connectors.sandbox.wire import STATEMENT_COLUMNS
from gateway import outcomes
from gateway.context import Services
from gateway.metrics import ConnectorOutcome, ReconOutcome
from gateway.store import db
from gateway.store import queries as q
from gateway.store import recon_queries as rq
from reconciliation import schedule
from reconciliation.classify import (
    SEVERITY,
    Bank,
    BreakType,
    Decision,
    Ours,
    Verdict,
    classify,
    classify_absent,
)
from reconciliation.errors import StatementError
from reconciliation.parsers import check_line, parse
from reconciliation.report import Summary

log = structlog.get_logger("fundgate.reconcile")

# advisory lock classes (two-int form, apart from the one-bigint keys of migrations/vouchers)
RUN_LOCK_CLASS = 0x7265636E  # "recn": one run of a (funder, day) at a time
# "recf", per funder: held shared by each of its runs, taken exclusively by a person's reversal
# of a final outcome of its orders. A run's verdicts stand on the final outcomes it read (a
# match is final on both sides), so none may be reversed until the run has committed them
FUNDER_LOCK_CLASS = 0x72656366
SCHEDULER_LOCK_KEY = 0x7265636F6E63696C  # "reconcil": one process runs the schedule
# a bank repeats or reverses an order within days; statements older than this are not
# searched for an earlier payout, and the pending pool looks back this much past the window
EARLIER_DAYS = 7
# a statement lists the orders sent that day, and a few sent the day before (overnight, a
# bank's earlier cut-off): the match hashes the funder's attempts sent from this many days
# before the statement day on, and looks up an older order by its number, one by one
HASHED_DAYS_BEFORE = 1
ODD_PAGE = 5000  # orders read back per round trip for one-by-one classification
ABSENT_PAGE = 5000  # orders no statement has listed yet, read back per round trip
# automatic resolutions applied at once, each its own transaction on its own connection: a
# resolution is a handful of short round trips, so a few overlap their waits
AUTO_WORKERS = 4
AUTO_CHUNK = 1000  # automatic resolutions whose attempts are read in one query
COPY_CHUNK = 1 << 20  # bytes of a statement file per COPY message (the fast path)
PROGRESS_EVERY = 2000  # statement lines between progress reports (and event-loop yields)
SCHEDULER_POLL_SECONDS = 60.0
# a failed day is retried by the scheduler after this long (the bank may republish)
RETRY_FAILED_SECONDS = 1800.0
SOURCE = "reconciliation"

Progress = Callable[[int], None]


class Laps:
    """Seconds per phase of a run, for the `recon.finished` log line (where the time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._t, 3)
        self._t = now


class RunInProgress(Exception):
    """Another process is reconciling this funder and day right now."""


@dataclass
class RunResult:
    run_id: int
    funder_id: str
    day: date
    status: str  # succeeded | failed
    error: str | None
    summary: Summary
    seconds: float
    breaks: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (`Laps`)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


# ---------------------------------------------------------------- the statement


async def _file_lines(path: Path, funder: Funder) -> AsyncIterator[tuple[int, StatementLine]]:
    try:
        handle = path.open("rb")
    except OSError as e:
        raise StatementError(f"no statement file at {path}: {e.strerror}") from e
    with handle:
        for n, (line_no, line) in enumerate(
            parse(handle, funder.statement.format, funder.statement), start=1
        ):
            yield line_no, line
            if n % PROGRESS_EVERY == 0:
                await asyncio.sleep(0)  # a long file must not starve the event loop


async def _connector_lines(
    svc: Services, funder: Funder, day: date
) -> AsyncIterator[tuple[int, StatementLine]]:
    connector = svc.connectors.get(funder.id)
    if connector is None:
        raise StatementError(f"funder {funder.id} has no connector")
    started = time.perf_counter()
    outcome: ConnectorOutcome = "ok"
    n = 0
    try:
        async for line in connector.fetch_statement(day):
            n += 1
            yield n, line
    except NotSent:
        outcome = "not_sent"
        raise
    except Rejected:
        outcome = "rejected"
        raise
    except ConnectorError:
        outcome = "unknown"
        raise
    finally:
        svc.metrics.observe_connector_call(
            funder.id, connector.name, "fetch_statement", outcome, time.perf_counter() - started
        )


def statement_path(funder: Funder, day: date) -> Path | None:
    if not funder.statement.path:
        return None
    return Path(funder.statement.path.format(funder=funder.id, day=day.isoformat()))


def statement_lines(
    svc: Services, funder: Funder, day: date
) -> AsyncIterator[tuple[int, StatementLine]]:
    """The funder's statement of `day`, numbered: from `[funders.statement] path` when set
    (file line numbers), else from its connector (statement line numbers)."""
    path = statement_path(funder, day)
    if path is not None:
        return _file_lines(path, funder)
    return _connector_lines(svc, funder, day)


class _NotFast(Exception):
    """The file is not in the fast path's shape: the savepoint takes back what it staged."""


# every byte a plain sandbox-CSV file is made of: no quote, no space, no other line end, no
# byte of a multi-byte character, so COPY and the parser cannot read a line differently
_PLAIN = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_.:/=+-,\n"
_HEADER = (",".join(STATEMENT_COLUMNS) + "\n").encode()


async def _chunks(handle: Any, progress: Progress | None) -> AsyncIterator[bytes]:
    """The file in chunks, refused (`_NotFast`) at the first byte outside `_PLAIN`, a first
    line other than the header, a blank line, or a last line without its line end."""
    lines = 0
    prev = b"\n"
    first = True
    while chunk := handle.read(COPY_CHUNK):
        if first:
            if not chunk.startswith(_HEADER):
                raise _NotFast("header")
            first = False
        if chunk.translate(None, _PLAIN) or b"\n\n" in chunk or prev + chunk[:1] == b"\n\n":
            raise _NotFast("shape")
        prev = chunk[-1:]
        lines += chunk.count(b"\n")
        if progress is not None:
            progress(max(lines - 1, 0))
        yield chunk
        await asyncio.sleep(0)  # a long file must not starve the event loop
    if prev != b"\n":
        raise _NotFast("no line end at the end")


async def _copy_file_raw(
    conn: q.Conn, run_id: int, path: Path, progress: Progress | None
) -> rq.StageTotals | None:
    """The fast path of a sandbox-CSV file: its bytes COPYed as they are into `recon_raw`
    (PostgreSQL parses the CSV and the amounts in C), checked in SQL (`rq.stage_raw`), and
    seen as `recon_stage`; its totals. None, with nothing staged, when the file is anything
    but plain: the Python parser then reads it, and accepts it or names the bad line and the
    reason."""
    try:
        handle = path.open("rb")
    except OSError:
        return None  # the parser says why, with the path
    with handle:
        try:
            async with conn.transaction():  # a savepoint
                await rq.create_raw(conn, run_id)
                rows = await rq.copy_raw(conn, run_id, _chunks(handle, progress))
                totals = await rq.stage_raw(conn, run_id) if rows else None
                if totals is None:
                    raise _NotFast("lines")
        except (_NotFast, asyncpg.DataError) as e:
            log.info("recon.fast_path_declined", path=str(path), reason=str(e) or repr(e))
            return None
    return totals


async def _records(
    lines: AsyncIterator[tuple[int, StatementLine]],
    totals: rq.StageTotals,
    progress: Progress | None,
) -> AsyncIterator[tuple[Any, ...]]:
    async for line_no, line in lines:
        check_line(line_no, line)
        totals.add(line.amount, line.status)
        if progress is not None and totals.lines % PROGRESS_EVERY == 0:
            progress(totals.lines)
        # an order number the bank left out gets a key of its own, so such lines do not
        # collapse into one "order" listed many times
        order_no = line.order_no or f"(none: line {line_no})"
        yield (line_no, order_no, line.bank_ref, line.amount, line.status, line.booked_at)


# ---------------------------------------------------------------- one run


def _keep_from(svc: Services, day: date) -> date:
    """The oldest statement day whose listed orders and pending pool a run of `day` keeps."""
    return day - timedelta(days=svc.cfg.reconciliation.window_days + EARLIER_DAYS + 1)


def _day_bounds(svc: Services, day: date) -> tuple[datetime, datetime]:
    zone = svc.cfg.gateway.zone
    start = datetime.combine(day, datetime.min.time(), tzinfo=zone)
    return start, datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=zone)


def _evidence(day: str, r: Any) -> tuple[dict[str, Any], Bank]:
    """What the statement says of an odd order (`rq.odd_rows`): the evidence its break keeps
    (`day`, the statement day in ISO form) and the same as the classifier's `Bank`."""
    low, high, earlier = r["amount_min"], r["amount_max"], r["earlier_paid"]
    amounts = [low] if low == high else [low, high]
    evidence = {
        "statement_day": day,
        "line_no": r["line_no"],
        "bank_ref": r["bank_ref"],
        "succeeded": r["succeeded"],
        "failed": r["failed"],
        "reversed": r["reversed"],
        "amounts": amounts,
        "earlier_paid": earlier or 0,
        "earlier_seen": earlier is not None,
    }
    bank = Bank(r["succeeded"], r["failed"], r["reversed"], tuple(amounts), earlier or 0,
                earlier is not None)  # fmt: skip
    return evidence, bank


def _bank_of(e: dict[str, Any]) -> Bank:
    return Bank(
        succeeded=int(e["succeeded"]),
        failed=int(e["failed"]),
        reversed=int(e["reversed"]),
        amounts=tuple(int(a) for a in e["amounts"]),
        earlier_paid=int(e["earlier_paid"]),
        earlier_seen=bool(e["earlier_seen"]),
    )


def _break_row(
    d: Decision,
    order_no: str,
    *,
    attempt_id: int | None,
    txn_no: str | None,
    our_status: str | None,
    our_amount: int | None,
    bank_status: str | None,
    bank_amount: int | None,
    bank_ref: str | None,
    bank_lines: int,
    line_no: int | None,
    evidence: dict[str, Any],
) -> tuple[Any, ...]:
    assert d.type is not None
    status = "auto_pending" if d.bank_status is not None else "open"
    return (
        order_no, d.type.value, status, SEVERITY[d.type], d.reason, attempt_id, txn_no,
        our_status, our_amount, bank_status, bank_amount, bank_ref, bank_lines, line_no,
        orjson.dumps(evidence).decode(),
    )  # fmt: skip


def _classify_page(rows: list[Any], day: date, summary: Summary) -> list[tuple[Any, ...]]:
    """One page of the odd orders (`rq.odd_rows`) classified and counted into `summary`; the
    rows of its breaks (`BREAK_COLUMNS` order)."""
    iso_day = day.isoformat()
    batch = []
    for r in rows:
        if r["ledger_day"] is not None and r["ledger_day"] != day:
            summary.ledger.other_days += r["net_paid"]  # paid for another day's order
        evidence, bank = _evidence(iso_day, r)
        ours = None
        if r["attempt_id"] is not None:
            ours = Ours(r["our_status"], r["our_amount"], r["our_day"])
        d = classify(ours, bank)
        if d.verdict is Verdict.MATCHED and r["auto_type"] is not None:
            # resolved by an earlier run of this day: still counted as what it was
            summary.breaks[r["auto_type"]].add(r["our_amount"])
            summary.auto_resolved[r["auto_type"]].add(r["our_amount"])
            continue
        summary.count(d, bank.amount if ours is None else r["our_amount"])
        if d.is_break:
            batch.append(
                _break_row(
                    d,
                    r["order_no"],
                    attempt_id=r["attempt_id"],
                    txn_no=r["txn_no"],
                    our_status=r["our_status"],
                    our_amount=r["our_amount"],
                    bank_status=bank.status,
                    bank_amount=bank.amount,
                    bank_ref=r["bank_ref"],
                    bank_lines=r["lines"],
                    line_no=r["line_no"],
                    evidence=evidence,
                )
            )
    return batch


async def _absent_page(
    conn: q.Conn,
    funder_id: str,
    run_id: int,
    day: date,
    window: int,
    rows: list[Any],
    summary: Summary,
) -> list[tuple[Any, ...]]:
    """A page of the orders no statement has listed yet (`rq.absent`), classified and counted
    into `summary`; the rows of their breaks (`BREAK_COLUMNS` order)."""
    decided = [
        (r, classify_absent(Ours(r["our_status"], r["our_amount"], r["expected_day"]), day, window))
        for r in rows
    ]
    missing = [r["order_no"] for r, d in decided if d.type is BreakType.MISSING_AT_BANK]
    already = await rq.missing_reported_elsewhere(conn, funder_id, run_id, missing)
    batch = []
    for r, d in decided:
        if d.type is BreakType.MISSING_AT_BANK and r["order_no"] in already:
            continue  # reported by the run of an earlier day: never twice
        summary.count(d, r["our_amount"])
        if d.verdict is Verdict.PENDING and r["expected_day"] == day:
            if r["our_status"] == "succeeded":  # settled in the ledger, not listed yet
                summary.ledger.awaiting += r["our_amount"]
        if d.is_break:
            batch.append(
                _break_row(
                    d,
                    r["order_no"],
                    attempt_id=r["attempt_id"],
                    txn_no=r["txn_no"],
                    our_status=r["our_status"],
                    our_amount=r["our_amount"],
                    bank_status=None,
                    bank_amount=None,
                    bank_ref=None,
                    bank_lines=0,
                    line_no=None,
                    evidence={
                        "expected_day": r["expected_day"].isoformat(),
                        "statement_day": day.isoformat(),
                        "window_days": window,
                    },
                )
            )
    return batch


async def _classify(
    conn: q.Conn,
    svc: Services,
    funder: Funder,
    day: date,
    run_id: int,
    progress: Progress | None,
    lap: Laps | None = None,
) -> Summary:
    """Step 1, inside the caller's transaction."""
    lap = lap or Laps()
    window = svc.cfg.reconciliation.window_days
    earlier_from = day - timedelta(days=EARLIER_DAYS)
    keep_from = _keep_from(svc, day)
    summary = Summary()

    path = statement_path(funder, day)
    staged = None
    if path is not None and funder.statement.format == "sandbox-csv":
        staged = await _copy_file_raw(conn, run_id, path, progress)
    if staged is None:
        staged = rq.StageTotals()
        await rq.create_stage(conn, run_id)
        await rq.copy_stage(
            conn, run_id, _records(statement_lines(svc, funder, day), staged, progress)
        )
        if progress is not None:
            progress(staged.lines)
    lap("stage")
    orders = await rq.record_seen(conn, funder.id, day)
    lap("seen")
    zone = svc.cfg.gateway.timezone
    start, end = _day_bounds(svc, day)
    sent_from = start - timedelta(days=HASHED_DAYS_BEFORE)
    totals = await rq.match(
        conn, funder.id, day, (start, end), sent_from, earlier_from, run_id, zone, staged, orders
    )
    summary.lines, summary.amount = totals.lines, totals.amount
    summary.matched.add(totals.matched_amount, totals.matched)
    summary.ledger.statement_paid = totals.paid
    lap("match")
    dup = await rq.duplicate_line(conn)
    lap("duplicates")
    if dup is not None:  # the transaction rolls back: nothing the match wrote stays
        raise StatementError(f"duplicate line: repeats line {dup[0]}", dup[1])

    await rq.create_new_breaks(conn)
    # a page is classified while PostgreSQL reads the next: the read is sent first and its
    # answer awaited after, so the two halves of the work overlap on the two sides
    rows = await rq.odd_rows(conn, 0, ODD_PAGE)
    while rows:
        following = asyncio.ensure_future(rq.odd_rows(conn, rows[-1]["i"], ODD_PAGE))
        await asyncio.sleep(0)  # the read goes out before the classification holds the loop
        try:
            batch = _classify_page(rows, day, summary)
        finally:  # the connection is free again only once the read has answered
            rows = await following
        if batch:
            await rq.copy_new_breaks(conn, batch)

    lap("classify")
    await rq.sweep_pending(conn, funder.id, day, keep_from)
    lap("pending")
    await rq.close_found_late(conn, funder.id, run_id, day)
    lap("found_late")

    since = day - timedelta(days=window + EARLIER_DAYS)
    async for absent in rq.absent(conn, funder.id, day, since, ABSENT_PAGE):
        batch = await _absent_page(conn, funder.id, run_id, day, window, absent, summary)
        if batch:
            await rq.copy_new_breaks(conn, batch)
    lap("absent")
    await rq.save_breaks(conn, run_id, funder.id, day)
    await rq.drop_stage(conn, run_id)
    lap("breaks")
    return summary


class _NoLongerPending(Exception):
    """The break was resolved meanwhile: its transaction rolls back, the move with it."""


@dataclass(frozen=True, slots=True)
class _Applied:
    a: Any  # the attempt the decision was made on
    decision: Decision
    moved: bool


async def _auto_resolve(
    svc: Services, funder_id: str, day: date, run_id: int, summary: Summary
) -> None:
    """Step 2: each certain answer applied through the state machine, one attempt per
    transaction (limits, prefund, ledger, voucher and webhook with it, as for a bank
    callback), by up to `AUTO_WORKERS` transactions at once on their own connections, as
    concurrent bank callbacks are: they touch different attempts, the limit rows they share
    are locked in the one order every limit-moving transaction uses (`outcomes.move`), and
    none depends on another's outcome.

    The breaks and their attempts are read `AUTO_CHUNK` at a time (memory stays flat when
    an outage leaves thousands unknown), the attempts without a lock, and each
    move is written only if its attempt is still as read (`fg_move` locks it and checks);
    an attempt that moved meanwhile, or whose answer writes nothing, is decided again under
    its lock. A resolution is then four round trips instead of seven."""
    # the caller holds one connection of the pool for the run: leave it one to spare
    workers = max(1, min(AUTO_WORKERS, svc.pool.get_max_size() - 1))
    after = 0
    while True:
        async with svc.pool.acquire() as conn:
            chunk = await rq.auto_pending(conn, run_id, after, AUTO_CHUNK)
            if not chunk:
                return
            attempts = await q.load_attempts(conn, [b["attempt_id"] for b in chunk])
        after = chunk[-1]["id"]
        queue = iter(chunk)

        async def work(queue: Iterator[Any] = queue, attempts: dict[int, Any] = attempts) -> None:
            for b in queue:  # one shared iterator: each break is taken by exactly one worker
                a = attempts.get(b["attempt_id"])
                await _auto_resolve_one(svc, funder_id, day, run_id, summary, b, a)

        tasks = [asyncio.create_task(work()) for _ in range(min(workers, len(chunk)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def _apply_auto(conn: q.Conn, svc: Services, day: date, brk: Any, a: Any) -> _Applied:
    """The statement's answer for this break, decided on `a` and applied through the state
    machine (`outcomes.Stale` when `a` was read without a lock and has moved since)."""
    bank = _bank_of(brk["evidence"] or {})
    d = classify(Ours(a["status"], a["amount"], svc.business_day(a["created_at"])), bank)
    status = d.bank_status
    if status is None:
        return _Applied(a, d, moved=False)
    failed = status is BankStatus.FAILED
    moved = await outcomes.apply_bank_status(
        conn,
        svc,
        a,
        status,
        bank_ref=brk["bank_ref"],
        fail_code="failed_on_statement" if failed else None,
        fail_reason=f"the bank's statement of {day} lists it as failed" if failed else None,
        source=SOURCE,
    )
    return _Applied(a, d, moved)


async def _auto_resolve_one(
    svc: Services,
    funder_id: str,
    day: date,
    run_id: int,
    summary: Summary,
    brk: Any,
    read: Any | None,
) -> None:
    """One break of `rq.auto_pending`, with its attempt as read without a lock (None: read
    it under the lock)."""
    t = brk["type"]
    try:
        async with svc.pool.acquire() as conn, conn.transaction():
            applied = None
            if read is not None:
                with contextlib.suppress(outcomes.Stale):
                    applied = await _apply_auto(conn, svc, day, brk, read)
            if applied is None or not applied.moved:
                # nothing written on what was read: decide on the attempt as it is, locked
                a = await q.lock_attempt(conn, brk["attempt_id"])
                if a is None:
                    return
                applied = await _apply_auto(conn, svc, day, brk, a)
            a, d, moved = applied.a, applied.decision, applied.moved
            if d.bank_status is None and d.verdict is not Verdict.MATCHED:
                # the gateway moved meanwhile and now disagrees for good: a person decides
                reopened = await rq.settle_auto(
                    conn, brk["id"], status="open", reason=d.reason, note=None, at=None,
                    voucher=None, txn_no=None,
                )  # fmt: skip
                if not reopened:
                    raise _NoLongerPending
                return
            status = d.bank_status
            note = (
                f"set to {status.value} from the statement of {day} line {brk['line_no']}"
                if moved and status is not None
                else f"already {a['status']} when the run applied the statement"
            )
            event = {
                "break_id": brk["id"],
                "run_id": run_id,
                "funder_id": funder_id,
                "order_no": brk["order_no"],
                "txn_no": a["txn_no"],
                "type": t,
                "from": a["status"],
                "to": status.value if moved and status is not None else a["status"],
                "evidence": brk["evidence"] or {},
            }
            resolved = await rq.settle_auto(
                conn, brk["id"], status="auto_resolved", reason=None, note=note,
                at=svc.clock(), voucher=q.canonical(event), txn_no=a["txn_no"],
            )  # fmt: skip
            if not resolved:
                raise _NoLongerPending
    except _NoLongerPending:
        log.warning("recon.auto_skipped", funder_id=funder_id, break_id=brk["id"])
        return
    summary.auto_resolved[t].add(brk["our_amount"] or 0)
    log.info(
        "recon.auto_resolved",
        funder_id=funder_id,
        order_no=brk["order_no"],
        type=t,
        moved=moved,
    )


async def _check_ledger(
    conn: q.Conn, funder_id: str, day: date, run_id: int, summary: Summary
) -> None:
    """Step 3, after the automatic resolutions (they settle payouts into the ledger): the
    ledger's settled payouts of the day against the statement's total of the day's orders
    (`reconciliation.report.LedgerTotals`); a `ledger_total_mismatch` break when the
    difference is not explained by orders still awaited within the window."""
    totals = summary.ledger
    totals.ledger_paid = await rq.ledger_paid(conn, funder_id, day)
    row = None
    if not totals.ok:
        t = BreakType.LEDGER_TOTAL_MISMATCH
        d = Decision(
            Verdict.BREAK,
            f"the ledger settled {totals.ledger_paid} fen of payouts for {day}, the statement "
            f"lists {totals.compared} fen for that day's orders ({totals.awaiting} fen awaited "
            f"on later statements): {totals.unexplained:+d} fen unexplained",
            t,
        )
        summary.breaks[t].add(abs(totals.unexplained))
        row = _break_row(
            d,
            rq.LEDGER_ORDER_NO,
            attempt_id=None,
            txn_no=None,
            our_status=None,
            our_amount=totals.ledger_paid,
            bank_status=None,
            bank_amount=totals.compared,
            bank_ref=None,
            bank_lines=summary.lines,
            line_no=None,
            evidence={"statement_day": day.isoformat(), **totals.to_json()},
        )
    await rq.save_ledger_break(conn, run_id, funder_id, day, row)
    emit = log.info if totals.ok else log.error
    emit("recon.ledger_totals", funder_id=funder_id, day=day.isoformat(), **totals.to_json())


async def reconcile_day(
    svc: Services,
    funder_id: str,
    day: date,
    *,
    trigger: str = "cli",
    progress: Progress | None = None,
) -> RunResult:
    """Reconcile one funder's statement of one business day. Raises `RunInProgress` when
    another process holds this (funder, day); a bad statement is a failed run, not an
    exception."""
    funder = svc.funders.get(funder_id)
    if funder is None:
        raise ValueError(f"unknown funder {funder_id!r}")
    started = time.perf_counter()
    lap = Laps()
    log.info("recon.started", funder_id=funder_id, day=day.isoformat(), trigger=trigger)
    async with svc.pool.acquire() as conn:
        db.holds_session_state(conn)  # a session advisory lock: reset it when released
        key = f"{funder_id}:{day.isoformat()}"
        got = await conn.fetchval(
            "SELECT pg_try_advisory_lock($1::int, hashtext($2))", RUN_LOCK_CLASS, key
        )
        if not got:
            raise RunInProgress(f"{funder_id} {day} is being reconciled by another process")
        try:
            # waits only for a reversal being committed (one short transaction)
            await conn.execute(
                "SELECT pg_advisory_lock_shared($1::int, hashtext($2))", FUNDER_LOCK_CLASS,
                funder_id,
            )  # fmt: skip
            run = await rq.start_run(conn, funder_id, day, trigger)
            run_id = int(run["id"])
            try:
                async with conn.transaction():
                    await rq.tune_run(conn)
                    summary = await _classify(conn, svc, funder, day, run_id, progress, lap)
            except (StatementError, ConnectorError) as e:
                reason = str(e)
                await rq.fail_run(conn, run_id, reason)
                seconds = time.perf_counter() - started
                _observe(svc, funder_id, "failed", seconds, 0)
                log.error("recon.failed", funder_id=funder_id, day=day.isoformat(), error=reason)
                return RunResult(run_id, funder_id, day, "failed", reason, Summary(), seconds)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    await rq.fail_run(conn, run_id, f"internal error: {type(e).__name__}: {e}")
                raise
            lap("commit")
            await _prune(conn, funder_id, _keep_from(svc, day))
            lap("prune")
            await _auto_resolve(svc, funder_id, day, run_id, summary)
            lap("auto_resolve")
            async with conn.transaction():
                await _check_ledger(conn, funder_id, day, run_id, summary)
            lap("ledger")
            summary.open = await rq.open_breaks(conn, run_id)
            await rq.finish_run(conn, run_id, summary.lines, summary.amount, summary.to_json())
            await refresh_break_gauges(svc, conn, funder_id)
        finally:
            await conn.execute(
                "SELECT pg_advisory_unlock_shared($1::int, hashtext($2)),"
                " pg_advisory_unlock($3::int, hashtext($4))",
                FUNDER_LOCK_CLASS, funder_id, RUN_LOCK_CLASS, key,
            )  # fmt: skip
    seconds = time.perf_counter() - started
    _observe(svc, funder_id, "succeeded", seconds, summary.lines)
    log.info(
        "recon.finished",
        funder_id=funder_id,
        day=day.isoformat(),
        lines=summary.lines,
        matched=summary.matched.count,
        breaks=summary.total_breaks,
        auto_resolved=summary.total_auto_resolved,
        open=summary.open,
        pending=summary.pending.count,
        seconds=round(seconds, 3),
        phases=lap.seconds,
    )
    return RunResult(
        run_id, funder_id, day, "succeeded", None, summary, seconds, phases=lap.seconds
    )


async def _prune(conn: q.Conn, funder_id: str, keep_from: date) -> None:
    """Housekeeping after the run's commit: the funder's partitions of `recon_seen` no run
    looks back on. A failure is logged and left to the next run; it never fails this one,
    whose results are committed."""
    try:
        pruned = await rq.prune_seen(conn, funder_id, keep_from)
    except asyncpg.PostgresError as e:
        log.error("recon.prune_failed", funder_id=funder_id, error=str(e))
        return
    if pruned:
        log.info("recon.seen_pruned", funder_id=funder_id, tables=pruned)


def _observe(
    svc: Services, funder_id: str, outcome: ReconOutcome, seconds: float, lines: int
) -> None:
    svc.metrics.recon_run(funder_id, outcome, seconds, lines)


async def refresh_break_gauges(svc: Services, conn: q.Conn, funder_id: str) -> None:
    """`fundgate_recon_breaks{funder,type}` from the database: every type, 0 when none."""
    counts = await rq.open_by_type(conn, funder_id)
    svc.metrics.set_recon_breaks(funder_id, {t.value: counts.get(t.value, 0) for t in BreakType})


# ---------------------------------------------------------------- resolving a break


class ResolveError(Exception):
    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# bank_is_right: the status the bank's answer means for our record, per break type
_BANK_TRUTH: dict[str, BankStatus | None] = {
    BreakType.STATUS_MISMATCH_BANK_SUCCEEDED: BankStatus.SUCCEEDED,
    BreakType.STATUS_MISMATCH_BANK_FAILED: BankStatus.FAILED,
    BreakType.MISSING_AT_BANK: BankStatus.FAILED,
    BreakType.AMOUNT_MISMATCH: None,
    BreakType.MISSING_AT_GATEWAY: None,
    BreakType.DUPLICATE_AT_BANK: None,
    BreakType.LEDGER_TOTAL_MISMATCH: None,
}


async def resolve_break(
    svc: Services, break_id: int, resolution: str, note: str, who: str
) -> dict[str, Any]:
    """A person's decision on an open break, with an audit trail (who, when, why) and a
    voucher. `bank_is_right` applies the bank's answer through the state machine where it
    can move our record forward (an open attempt), and reverses a final outcome the bank
    contradicts through `outcomes.correct_terminal` (limits, prefund, ledger and webhook
    follow); `correction.applied` and `correction.reason` say what happened."""
    if resolution not in ("bank_is_right", "gateway_is_right"):
        raise ResolveError("invalid_resolution", "resolution must be bank_is_right or "
                           "gateway_is_right", 422)  # fmt: skip
    async with svc.pool.acquire() as conn, conn.transaction():
        brk = await rq.lock_break(conn, break_id)
        if brk is None:
            raise ResolveError("not_found", f"no break {break_id}", 404)
        if brk["status"] not in ("open",):
            raise ResolveError(
                "break_not_open", f"break {break_id} is {brk['status']}, not open", 409
            )
        correction: dict[str, Any] = {"applied": False, "from": brk["our_status"], "to": None}
        txn_no = brk["txn_no"]
        if resolution == "bank_is_right":
            target = _BANK_TRUTH.get(brk["type"])
            if target is not None and brk["attempt_id"] is not None:
                a = await q.lock_attempt(conn, brk["attempt_id"])
                assert a is not None
                txn_no = a["txn_no"]
                correction["from"] = a["status"]
                correction["to"] = target.value
                moved = await outcomes.apply_bank_status(
                    conn,
                    svc,
                    a,
                    target,
                    bank_ref=brk["bank_ref"],
                    fail_code="failed_on_statement" if target is BankStatus.FAILED else None,
                    fail_reason=note or None,
                    source=f"{SOURCE}:resolve",
                )
                if not moved and a["status"] in ("succeeded", "failed"):
                    # a final outcome the bank contradicts: the person's decision reverses it,
                    # but not under a run of the funder that has read it as final (its match
                    # would stand for a record that no longer says so): nothing is written,
                    # the break stays open, and the person resolves it again after the run
                    if not await conn.fetchval(
                        "SELECT pg_try_advisory_xact_lock($1::int, hashtext($2))",
                        FUNDER_LOCK_CLASS, a["funder_id"],
                    ):  # fmt: skip
                        raise ResolveError(
                            "reconciliation_running",
                            f"{a['funder_id']}'s statements are being reconciled: resolve "
                            "again once the run has finished",
                            409,
                        )
                    try:
                        await outcomes.correct_terminal(
                            conn, svc, a, target.value, by=who, reason=note or brk["type"]
                        )
                        moved = True
                    except outcomes.CorrectionRefused as e:
                        correction["reason"] = str(e)
                correction["applied"] = moved
                if not moved and "reason" not in correction:
                    correction["reason"] = (
                        f"the state machine does not move {a['status']} to {target.value}; "
                        "the bank's answer is recorded for a manual adjustment"
                    )
            else:
                correction["reason"] = "no gateway record to correct; recorded for follow-up"
        now = svc.clock()
        row = await rq.update_break(
            conn,
            break_id,
            status="resolved",
            resolution=resolution,
            resolved_by=who,
            resolved_at=now,
            note=note,
            evidence={**(brk["evidence"] or {}), "correction": correction},
        )
        await q.voucher(
            conn,
            "recon.break_resolved",
            {
                "break_id": break_id,
                "run_id": brk["run_id"],
                "funder_id": brk["funder_id"],
                "order_no": brk["order_no"],
                "txn_no": txn_no,
                "type": brk["type"],
                "resolution": resolution,
                "by": who,
                "at": now.isoformat(),
                "note": note,
                "correction": correction,
            },
            txn_no,
        )
        await refresh_break_gauges(svc, conn, brk["funder_id"])
    log.info(
        "recon.break_resolved",
        break_id=break_id,
        type=brk["type"],
        resolution=resolution,
        by=who,
        applied=correction["applied"],
    )
    return dict(row)


# ---------------------------------------------------------------- the schedule


async def _due(svc: Services, conn: q.Conn, funder: Funder, latest: date) -> list[date]:
    cfg = svc.cfg.reconciliation
    first = await rq.first_attempt_at(conn, funder.id)
    since = latest - timedelta(days=cfg.catch_up_days)
    runs = await rq.done_days(conn, funder.id, since)
    now = svc.clock()
    done = set()
    for day, r in runs.items():
        if r["status"] == "succeeded":
            done.add(day)
        elif r["status"] == "running":
            done.add(day)  # under way elsewhere (or died: the run lock tells, below)
            if r["started_at"] < now - timedelta(seconds=RETRY_FAILED_SECONDS):
                done.discard(day)
        elif r["finished_at"] and r["finished_at"] > now - timedelta(seconds=RETRY_FAILED_SECONDS):
            done.add(day)  # failed a moment ago: give the bank time to republish
    return schedule.due_days(
        latest,
        first_activity=None if first is None else svc.business_day(first),
        catch_up_days=cfg.catch_up_days,
        done=done,
    )


async def run_due(svc: Services, *, trigger: str = "scheduler") -> list[RunResult]:
    """Every due (funder, day), oldest first, if this process wins the scheduler lock."""
    results: list[RunResult] = []
    now_local = svc.clock().astimezone(svc.cfg.gateway.zone)
    latest = schedule.latest_due_day(now_local, svc.cfg.reconciliation.run_at)
    async with svc.pool.acquire() as conn:
        db.holds_session_state(conn)
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SCHEDULER_LOCK_KEY):
            return results
        try:
            for funder in svc.cfg.funders:
                for day in await _due(svc, conn, funder, latest):
                    try:
                        results.append(await reconcile_day(svc, funder.id, day, trigger=trigger))
                    except RunInProgress:
                        log.info("recon.skipped_in_progress", funder_id=funder.id, day=str(day))
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", SCHEDULER_LOCK_KEY)
    return results


async def run_scheduler(
    svc: Services, stop: asyncio.Event, *, poll_seconds: float = SCHEDULER_POLL_SECONDS
) -> None:
    """Inside `fundgate serve`: catch up at start, then reconcile yesterday at `run_at`."""
    while not stop.is_set():
        try:
            await run_due(svc)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("recon.scheduler_failed", error=str(e))
        except Exception:
            log.exception("recon.scheduler_crashed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_seconds)
