"""Applying what a bank said to an attempt, in one transaction with the limit movement, the
outbox row and the voucher. Used by the dispatcher, the poller and the callback handler alike,
so the state machine has exactly one implementation.

Every function here expects the attempt row locked by `queries.lock_attempt` in the caller's
transaction, except `move` (and `apply_bank_status`), which may also take a row read without
a lock: it then writes in one statement only if the attempt has not moved meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg
import structlog

from config.models import Term
from connectors.base import BankStatus
from gateway import ledger, limits, states
from gateway.context import Services
from gateway.disbursements import funder_states, load_resource, order_no
from gateway.store import queries as q
from routing import LoanTerms, allocate, candidates

log = structlog.get_logger("fundgate.outcomes")

BANK_TO_STATE: dict[BankStatus, str] = {
    BankStatus.ACCEPTED: "sent",
    BankStatus.PROCESSING: "processing",
    BankStatus.SUCCEEDED: "succeeded",
    BankStatus.FAILED: "failed",
}


def query_delay(svc: Services, query_count: int) -> float:
    """Back-off for status queries: the configured steps, then the last step forever."""
    steps = svc.cfg.dispatch.query_backoff_seconds
    return steps[min(query_count, len(steps) - 1)]


async def _event(conn: q.Conn, kind: str, a: asyncpg.Record, status: str, **extra: Any) -> None:
    await q.voucher(conn, kind, _event_of(a, status, **extra), a["txn_no"])


def _event_of(a: asyncpg.Record, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "txn_no": a["txn_no"],
        "order_no": a["order_no"],
        "attempt": a["n"],
        "funder_id": a["funder_id"],
        "status": status,
        "amount": a["amount"],
        **extra,
    }


class Stale(Exception):
    """The attempt moved on since it was read without a lock; nothing was written. Read it
    again and decide again (`retry_stale`)."""


class Replayed(Exception):
    """The callback's nonce was seen before; nothing was written."""


@dataclass(frozen=True, slots=True)
class Settle:
    """What commits with a bank's report, whether or not it moves the attempt."""

    outbox_id: int | None = None  # the dispatch row the bank's answer settles
    nonce: tuple[str, str] | None = None  # (funder_id, nonce) of the callback that brought it


# each stale read follows a change of the attempt by someone else: a few at most
STALE_RETRIES = 10

T = TypeVar("T")


async def retry_stale(
    conn: q.Conn, a: asyncpg.Record, decide: Callable[[asyncpg.Record], Awaitable[T]]
) -> T:
    """`decide(a)` for an attempt read without a lock, read again while it raises `Stale`."""
    for _ in range(STALE_RETRIES):
        try:
            return await decide(a)
        except Stale:
            fresh = await q.load_attempt(conn, a["id"])
            if fresh is None:
                raise
            a = fresh
    raise Stale(f"attempt {a['id']} kept changing: {STALE_RETRIES} tries")


def _checked(outcome: str) -> None:
    if outcome == "replayed":
        raise Replayed("nonce already used")
    if outcome in ("stale", "missing"):
        raise Stale(outcome)


async def settle_only(conn: q.Conn, a: asyncpg.Record, settle: Settle) -> None:
    """Commit `settle` without moving the attempt (a late, duplicate or untrusted report)."""
    outcome = await q.move(
        conn, a["id"], a["status"], None, a["updated_at"],  # the time is unused: no move
        finish_outbox=settle.outbox_id, nonce=settle.nonce,
    )  # fmt: skip
    _checked(outcome)


async def move(
    conn: q.Conn,
    svc: Services,
    a: asyncpg.Record,
    new: str,
    *,
    bank_ref: str | None = None,
    error: dict[str, Any] | None = None,
    source: str,
    settle: Settle | None = None,
) -> bool:
    """Move an attempt (and its disbursement) to `new`, with its limit release or ledger
    posting, its voucher and, when terminal, the outcome webhook, all in one statement
    (`fg_move`); False when that would not be a forward step (a late or duplicate report):
    then nothing changes but `settle`.

    `a` is a `queries.load_attempt`/`lock_attempt` row. Locked in the caller's transaction, it
    is the truth. Read without a lock, the change is written only if the attempt's status is
    still `a["status"]`; otherwise nothing is and `Stale` is raised (see `retry_stale`)."""
    if not states.can_move(a["status"], new):
        if settle is not None:
            await settle_only(conn, a, settle)
        return False
    now = svc.clock()
    next_query_at, query_count, unknown_since = None, None, None
    if new in states.QUERYABLE:
        next_query_at = now + timedelta(seconds=query_delay(svc, 0))
        query_count = 0
        if new == "unknown":
            unknown_since = now  # unless it has one: it was unknown before
    failure: dict[str, Any] | None = None
    releases: list[tuple[str, int, int]] = []
    prefund_return = 0
    ledger_kind: str | None = None
    ledger_entries: list[tuple[str, int]] = []
    if new == "failed":
        failure = error or {"code": "failed", "message": "the bank failed the payout"}
        releases = limits.releases(a)  # platform first: intake's lock order, never a deadlock
        prefund_return = a["alloc_platform"]
        ledger_kind = ledger.RELEASED
        ledger_entries = ledger.release_entries(
            a["funder_id"], a["alloc_funder"], a["alloc_platform"]
        )
    elif new == "succeeded":
        ledger_kind = ledger.PAID
        ledger_entries = ledger.settle_entries(a["funder_id"], a["amount"])
    lines = ledger.lines_of(ledger_kind, ledger_entries) if ledger_kind else []
    ledger_voucher = (
        q.canonical(ledger.voucher_event(-1, ledger_kind, lines, a["txn_no"], None))
        if ledger_kind
        else None
    )
    webhook = new in states.TERMINAL and svc.cfg.lending_core is not None
    outcome = await q.move(
        conn,
        a["id"],
        a["status"],
        new,
        now,
        bank_ref=bank_ref,
        error=error,
        failure=failure,
        next_query_at=next_query_at,
        query_count=query_count,
        unknown_since=unknown_since,
        releases=releases,
        prefund_return=prefund_return,
        ledger_kind=ledger_kind,
        ledger_lines=lines,
        ledger_voucher=ledger_voucher,
        voucher_kind=f"disbursement.{new}",
        voucher=q.canonical(_event_of(a, new, source=source, bank_ref=bank_ref)),
        webhook=webhook,
        finish_outbox=None if settle is None else settle.outbox_id,
        nonce=None if settle is None else settle.nonce,
    )
    _checked(outcome)
    svc.recent.moved(a, new)
    if webhook:  # after the commit, or soon enough after it: the notifiers also poll
        svc.wakeups.wake_notifiers()
    svc.metrics.disbursement_transition(a["funder_id"], new, a["amount"])
    log.info(
        "disbursement.state",
        txn_no=a["txn_no"],
        order_no=a["order_no"],
        funder_id=a["funder_id"],
        previous=a["status"],
        status=new,
        source=source,
    )
    return True


async def _notify_lending_core(conn: q.Conn, svc: Services, disbursement_id: int) -> None:
    if svc.cfg.lending_core is None:
        return
    body = await load_resource(conn, disbursement_id)
    await q.enqueue(conn, "webhook", disbursement_id, payload=body)


async def apply_bank_status(
    conn: q.Conn,
    svc: Services,
    a: asyncpg.Record,
    status: BankStatus,
    *,
    bank_ref: str | None,
    fail_code: str | None = None,
    fail_reason: str | None = None,
    source: str,
    settle: Settle | None = None,
) -> bool:
    """A definite bank status (accepted/processing/succeeded/failed) for this order; see
    `move` for `settle` and an attempt read without a lock."""
    new = BANK_TO_STATE.get(status)
    if new is None:
        if settle is not None:
            await settle_only(conn, a, settle)
        return False
    if new == "sent" and a["status"] == "unknown":
        new = "processing"  # the bank has the order after all: it is working on it
    error = None
    if new == "failed":
        error = {"code": fail_code or "bank_failed", "message": fail_reason or "failed at bank"}
    return await move(
        conn, svc, a, new, bank_ref=bank_ref, error=error, source=source, settle=settle
    )


async def fail_over(
    conn: q.Conn, svc: Services, a: asyncpg.Record, error: dict[str, Any], *, source: str
) -> str:
    """The attempt definitely moved no money: close it and route to the next eligible funder,
    or fail the disbursement when none is left. Returns the new funder id or "failed"."""
    if not states.can_move(a["status"], "failed") or a["status"] != "accepted":
        raise AssertionError(f"fail-over from {a['status']} would risk a double payment")
    now = svc.clock()
    day = a["business_day"]
    await q.update_attempt(conn, a["id"], now, status="failed", error=error, next_query_at=None)
    # platform first, as intake does: every limit-moving transaction locks in one order
    await limits.lock_platform(conn, day, a["platform_bucket"])
    await limits.release_funder(
        conn, a["funder_id"], day, a["limit_bucket"], a["amount"], a["alloc_platform"]
    )
    await ledger.release(
        conn, a["txn_no"], a["funder_id"], a["alloc_funder"], a["alloc_platform"], day
    )
    await _event(conn, "attempt.failed", a, "failed", source=source, error=error)
    svc.metrics.disbursement_transition(a["funder_id"], "rerouted")

    d = await q.get_disbursement_by_id(conn, a["disbursement_id"])
    assert d is not None
    tried = {r["funder_id"] for r in (await q.attempts_of(conn, [d["id"]]))[d["id"]]}
    loan = LoanTerms(
        amount=d["amount"],
        term=Term(unit=d["term_unit"], count=d["term_count"]),
        apr=d["apr"],
        product=d["product"],
        repayment=d["repayment"],
    )
    usage = await q.usage(conn, day)
    prefund = await q.prefund_balances(conn)
    # funders whose circuit is closed first, as intake routes; then those whose circuit is
    # open: their payout waits for the cool-down, which beats failing the disbursement
    circuits = await svc.circuits(conn)
    closed, _ = candidates(
        svc.cfg.funders, loan, funder_states(svc, usage, prefund, circuits),
        exclude=frozenset(tried),
    )  # fmt: skip
    rest, _ = candidates(
        svc.cfg.funders, loan, funder_states(svc, usage, prefund),
        exclude=frozenset(tried) | {f.id for f in closed},
    )  # fmt: skip
    for f in [*closed, *rest]:
        alloc = allocate(d["amount"], f.platform_share)
        bucket = await limits.reserve_funder(
            conn, svc, f, day, limits.pick_bucket(svc), d["amount"], alloc.platform
        )
        if bucket is None:
            continue
        n = a["n"] + 1
        await q.route_disbursement(
            conn, d["id"], funder_id=f.id, mode=f.mode, alloc_funder=alloc.funder,
            alloc_platform=alloc.platform, now=now,
        )  # fmt: skip
        new_id = await q.insert_attempt(
            conn,
            {
                "disbursement_id": d["id"],
                "n": n,
                "funder_id": f.id,
                "order_no": order_no(d["txn_no"], n),
                "status": "accepted",
                "mode": f.mode,
                "alloc_funder": alloc.funder,
                "alloc_platform": alloc.platform,
                "limit_bucket": bucket,
                "created_at": now,
                "updated_at": now,
            },
        )
        await q.enqueue(conn, "dispatch", new_id, funder_id=f.id)
        await ledger.reserve(conn, d["txn_no"], f.id, alloc.funder, alloc.platform, day)
        await q.voucher(
            conn,
            "disbursement.rerouted",
            {
                "txn_no": d["txn_no"],
                "from_funder": a["funder_id"],
                "funder_id": f.id,
                "order_no": order_no(d["txn_no"], n),
                "attempt": n,
                "amount": d["amount"],
                "allocation": {"funder": alloc.funder, "platform": alloc.platform},
            },
            d["txn_no"],
        )
        log.warning(
            "disbursement.rerouted",
            txn_no=d["txn_no"],
            from_funder=a["funder_id"],
            funder_id=f.id,
            reason=error.get("code"),
        )
        return f.id

    # nobody else can take it: the disbursement fails and the platform limit comes back
    await limits.release_platform(conn, day, d["platform_bucket"], d["amount"])
    failure = {
        **error,
        "code": "no_funder_left",
        "message": "every eligible funder refused",
        "last_error": error,
    }
    await q.update_disbursement(conn, d["id"], now, status="failed", failure=failure)
    await q.voucher(
        conn,
        "disbursement.failed",
        {"txn_no": d["txn_no"], "status": "failed", "amount": d["amount"], "failure": failure},
        d["txn_no"],
    )
    await _notify_lending_core(conn, svc, d["id"])
    svc.metrics.disbursement_transition(a["funder_id"], "failed", d["amount"])
    log.warning("disbursement.failed", txn_no=d["txn_no"], reason=failure["code"])
    return "failed"


class CorrectionRefused(Exception):
    """A correction that cannot be applied automatically; the reason is for the person."""


async def correct_terminal(
    conn: q.Conn, svc: Services, a: asyncpg.Record, new: str, *, by: str, reason: str
) -> None:
    """A person, with the bank's statement as evidence, reverses a final outcome:
    `succeeded → failed` (the bank never paid) or `failed → succeeded` (the bank paid).

    The one place a state moves "backwards", so it is explicit: limits, prefund and ledger
    follow the bank's truth, a voucher names who and why, and the lending core is told the
    new outcome. Refused when the attempt is not the disbursement's current one (a bank that
    paid an attempt we had failed over from is a double payment for people to recover).
    """
    if (a["status"], new) not in (("succeeded", "failed"), ("failed", "succeeded")):
        raise CorrectionRefused(f"only a final outcome can be reversed, not {a['status']}")
    d = await q.get_disbursement_by_id(conn, a["disbursement_id"])
    assert d is not None
    latest = max(r["n"] for r in (await q.attempts_of(conn, [d["id"]]))[d["id"]])
    if a["n"] != latest or d["status"] != a["status"]:
        raise CorrectionRefused(
            f"attempt {a['n']} is not the current attempt of {d['txn_no']}: "
            "recover the double payment by hand"
        )
    if await q.was_corrected(conn, a["txn_no"]):
        # back to an outcome the lending core was already told: it dedups the outcome
        # webhooks by txn_no and status (CONTRACT.md), so it would drop this one
        raise CorrectionRefused(
            f"{a['txn_no']} was reversed once already: the lending core would take a second "
            "reversal for a duplicate outcome; settle it with the lending core by hand"
        )
    now = svc.clock()
    day = a["business_day"]
    amount, fshare, pshare = a["amount"], a["alloc_funder"], a["alloc_platform"]
    if new == "failed":
        await limits.release(conn, a)
        entries = [
            (ledger.PAYOUTS, -amount),
            (ledger.funder_account(a["funder_id"]), fshare),
            (ledger.custody_account(a["funder_id"]), pshare),
        ]
    else:
        # platform first (every bucket of it, in order), then the funder's, then the prefund:
        # the lock order of every transaction. In a savepoint, because a refusal is caught
        # and its transaction commits (resolve_break): the usage recorded must go with it.
        async with conn.transaction():
            await limits.record(
                conn, svc, a["funder_id"], day, (a["platform_bucket"], a["limit_bucket"]), amount
            )
            if not await q.take_prefund(conn, a["funder_id"], pshare):
                raise CorrectionRefused("the prefund no longer covers the platform share")
        entries = [
            (ledger.PAYOUTS, amount),
            (ledger.funder_account(a["funder_id"]), -fshare),
            (ledger.custody_account(a["funder_id"]), -pshare),
        ]
    await ledger.post(
        conn, f"disbursement.corrected_{new}", entries, day=day, txn_no=a["txn_no"],
        funder_id=a["funder_id"],
    )  # fmt: skip
    failure = {"code": "corrected", "message": reason} if new == "failed" else None
    await q.update_attempt(conn, a["id"], now, status=new)
    await q.update_disbursement(conn, d["id"], now, status=new, failure=failure)
    await _event(conn, "disbursement.corrected", a, new, previous=a["status"], by=by, reason=reason)
    await _notify_lending_core(conn, svc, d["id"])
    svc.metrics.disbursement_transition(a["funder_id"], new, amount)
    log.warning(
        "disbursement.corrected", txn_no=a["txn_no"], previous=a["status"], status=new, by=by
    )
