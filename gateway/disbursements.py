"""Intake: validation, idempotency, routing and limit reservation in one transaction."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import structlog

from config.models import Funder
from gateway import ledger, limits, pii
from gateway.context import Services
from gateway.errors import Conflict, Unprocessable
from gateway.schemas import DisbursementRequest
from gateway.store import queries as q
from routing import FunderState, LoanTerms, Refusal, allocate, candidates, check_loan
from routing.allocation import Allocation
from routing.eligibility import all_limit_refusals

log = structlog.get_logger("fundgate.intake")


def order_no(txn_no: str, n: int) -> str:
    """The bank's idempotency key: the same attempt always carries the same order number."""
    return f"{txn_no}-{n:02d}"


def iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


# a database row, or the same columns as a dict (intake renders before it writes)
Row = asyncpg.Record | Mapping[str, Any]


def render(d: Row, attempts: Sequence[Row]) -> dict[str, Any]:
    """The API resource of CONTRACT.md; personal data masked."""
    return {
        "txn_no": d["txn_no"],
        "status": d["status"],
        "funder_id": d["funder_id"],
        "mode": d["mode"],
        "allocation": {"funder": d["alloc_funder"], "platform": d["alloc_platform"]},
        "amount": d["amount"],
        "currency": d["currency"],
        "payee": {
            "account_no": d["payee_account_masked"],
            "account_name": d["payee_name_masked"],
            "bank_code": d["payee_bank_code"],
        },
        "attempts": [
            {
                "n": a["n"],
                "funder_id": a["funder_id"],
                "order_no": a["order_no"],
                "status": a["status"],
                "bank_ref": a["bank_ref"],
                "error": a["error"],
            }
            for a in attempts
        ],
        "failure": d["failure"],
        "created_at": iso(d["created_at"]),
        "updated_at": iso(d["updated_at"]),
    }


async def load_resource(conn: q.Conn, disbursement_id: int) -> dict[str, Any]:
    d = await q.get_disbursement_by_id(conn, disbursement_id)
    assert d is not None
    attempts = (await q.attempts_of(conn, [disbursement_id]))[disbursement_id]
    return render(d, attempts)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: dict[str, Any]
    replay: bool = False


def funder_states(
    svc: Services,
    usage: dict[str, int],
    prefund: dict[str, int],
    circuits: dict[str, str] | None = None,
) -> dict[str, FunderState]:
    return {
        f.id: FunderState(
            used_today=usage.get(q.funder_scope(f.id), 0),
            prefund_balance=prefund.get(f.id, 0),
            circuit_open=(circuits or {}).get(f.id) == "open",
        )
        for f in svc.cfg.funders
    }


def refusal_details(refusals: list[Refusal]) -> dict[str, Any]:
    return {"funders": {r.funder_id: {"reason": r.reason, "message": r.message} for r in refusals}}


# SQLSTATEs raised by fg_intake (migration 0011)
PLATFORM_LIMIT = "FG001"
ALL_REFUSED = "FG002"
# a deadlock (two intakes near their limits taking funders in opposite orders) is retried
DEADLOCK_RETRIES = 3


async def _refused(
    conn: q.Conn, req: DisbursementRequest, digest: bytes, refusal: Unprocessable
) -> Outcome:
    """Raise `refusal` for a request refused before fg_intake (which answers replays itself),
    unless its txn_no was seen before: a replay still gets its first answer, or 409."""
    row = await conn.fetchrow(
        "SELECT request_hash, first_response FROM disbursements WHERE txn_no = $1", req.txn_no
    )
    if row is None:
        raise refusal
    return _replay(req, digest, row["request_hash"], row["first_response"])


# the prefund is checked (and taken) by fg_intake; routing only looks at the funders' offers
_ANY_PREFUND = 2**62


def _replay(req: DisbursementRequest, digest: bytes, request_hash: bytes, body: Any) -> Outcome:
    if bytes(request_hash) != digest:
        raise Conflict(
            "txn_no_conflict",
            f"txn_no {req.txn_no} was already used with a different request",
        )
    return Outcome(200, body, replay=True)


def _hex(b: bytes) -> str:
    return "\\x" + b.hex()


async def submit(svc: Services, req: DisbursementRequest, client: str) -> Outcome:
    """Validate and route in Python, then accept in one statement: `fg_intake` answers a
    replay, checks the whitelist, reserves the limits and writes everything of the acceptance
    in one short transaction."""
    digest = svc.vault.keyed_digest(req.canonical_bytes())
    now = svc.clock()
    day = svc.business_day(now)
    async with svc.db() as conn:
        loan = LoanTerms(
            amount=req.amount,
            term=req.term.to_term(),
            apr=req.apr_decimal,
            product=req.product,
            repayment=req.repayment,
        )
        violation = check_loan(loan, svc.cfg.product(req.product), svc.cfg.gateway)
        if violation is not None:
            refusal = Unprocessable(violation.code, violation.message)
            return await _refused(conn, req, digest, refusal)
        circuits = await svc.circuits(conn)
        states = funder_states(svc, {}, {f.id: _ANY_PREFUND for f in svc.cfg.funders}, circuits)
        order, refusals = candidates(svc.cfg.funders, loan, states, hint=req.funder_hint)
        if not order:
            if not await _whitelisted(conn, svc, req):
                # the payee is checked before routing (fg_intake does too): a lending core
                # told "no funder" or "limit" would retry a request that can never pass
                return await _refused(conn, req, digest, _not_whitelisted())
            code = "limit_exceeded" if all_limit_refusals(refusals) else "no_eligible_funder"
            refusal = Unprocessable(code, "no funder can take this disbursement",
                                    details=refusal_details(refusals))  # fmt: skip
            return await _refused(conn, req, digest, refusal)

        plan = _Plan(svc, req, digest, client, now, day, order)
        row = await _intake(conn, plan, refusals)
        if row["outcome"] == "check_name":
            # a whitelist entry older than its name index: compare here, then go on
            if pii.account_name(svc.vault, row) != req.payee.account_name:
                raise _not_whitelisted()
            row = await _intake(conn, plan, refusals, name_checked=True)
    if row["outcome"] == "exists":
        return _replay(req, digest, row["request_hash"], row["first_response"])
    if row["outcome"] == "not_whitelisted":
        raise _not_whitelisted()

    chosen = order[row["chosen"] - 1]
    svc.wake_dispatch(chosen.id)
    svc.metrics.disbursement_transition(chosen.id, "accepted", req.amount)
    log.info(
        "disbursement.accepted",
        txn_no=req.txn_no,
        funder_id=chosen.id,
        amount=req.amount,
        mode=chosen.mode,
    )
    return Outcome(201, plan.bodies[row["chosen"] - 1])


async def _whitelisted(conn: q.Conn, svc: Services, req: DisbursementRequest) -> bool:
    """The payee's account, name and bank match the borrower's registration, as `fg_intake`
    checks them (an entry older than its name index is compared by decrypting the name)."""
    payee = req.payee
    row = await q.get_account(conn, req.borrower_id, pii.account_index(svc.vault, payee.account_no))
    if row is None or row["bank_code"] != payee.bank_code:
        return False
    if row["name_bidx"] is not None:
        return bytes(row["name_bidx"]) == pii.name_index(svc.vault, payee.account_name)
    return pii.account_name(svc.vault, row) == payee.account_name


def _not_whitelisted() -> Unprocessable:
    return Unprocessable(
        "payee_not_whitelisted", "the payee account is not registered for this borrower"
    )


async def _intake(
    conn: q.Conn, plan: _Plan, refusals: list[Refusal], *, name_checked: bool = False
) -> asyncpg.Record:
    """One call of fg_intake; its refusals become the API's 422s."""
    for attempt in range(DEADLOCK_RETRIES + 1):
        try:
            row = await conn.fetchrow(
                "SELECT * FROM fg_intake($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
                " $13, $14, $15)",
                *plan.arguments(name_checked),
            )
            assert row is not None
            return row
        except asyncpg.DeadlockDetectedError:
            if attempt == DEADLOCK_RETRIES:
                raise
            log.warning("intake.deadlock_retried", txn_no=plan.req.txn_no, attempt=attempt + 1)
        except asyncpg.PostgresError as e:
            plan.refused(e, refusals)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


class _Plan:
    """What `fg_intake` needs for each candidate funder, computed before the one round trip:
    the row, the allocations, the response body and the voucher texts."""

    def __init__(
        self, svc: Services, req: DisbursementRequest, digest: bytes, client: str,
        now: datetime, day: date, order: list[Funder],
    ) -> None:  # fmt: skip
        self.svc, self.req, self.order = svc, req, order
        self.bucket = limits.pick_bucket(svc)
        self.allocs = [allocate(req.amount, f.platform_share) for f in order]
        self.order_no = order_no(req.txn_no, 1)
        first = order[0]
        payee = pii.payee_columns(svc.vault, req.payee.account_no, req.payee.account_name)
        stamp = iso(now)
        self.row: dict[str, Any] = {
            "txn_no": req.txn_no,
            "request_hash": _hex(digest),
            "client": client,
            "loan_id": req.loan_id,
            "borrower_id": req.borrower_id,
            "amount": req.amount,
            "currency": req.currency,
            "term_unit": req.term.unit,
            "term_count": req.term.count,
            "apr": str(req.apr_decimal),
            "product": req.product,
            "repayment": req.repayment,
            "payee_account_bidx": _hex(payee["payee_account_bidx"]),
            "payee_account_no_enc": _hex(payee["payee_account_no_enc"]),
            "payee_account_name_enc": _hex(payee["payee_account_name_enc"]),
            "payee_account_masked": payee["payee_account_masked"],
            "payee_name_masked": payee["payee_name_masked"],
            "payee_bank_code": req.payee.bank_code,
            "metadata": req.metadata,
            "status": "accepted",
            "funder_id": first.id,
            "mode": first.mode,
            "alloc_funder": self.allocs[0].funder,
            "alloc_platform": self.allocs[0].platform,
            "business_day": day.isoformat(),
            "created_at": stamp,
            "updated_at": stamp,
        }
        self.bodies = [self._body(f, a, now) for f, a in zip(order, self.allocs, strict=True)]

    def _body(self, f: Funder, alloc: Allocation, now: datetime) -> dict[str, Any]:
        row = {
            **self.row,
            "funder_id": f.id,
            "mode": f.mode,
            "alloc_funder": alloc.funder,
            "alloc_platform": alloc.platform,
            "failure": None,
            "created_at": now,
            "updated_at": now,
        }
        attempt = {"n": 1, "funder_id": f.id, "order_no": self.order_no, "status": "accepted",
                   "bank_ref": None, "error": None}  # fmt: skip
        return render(row, [attempt])

    def _voucher(self, f: Funder, alloc: Allocation) -> str:
        req = self.req
        return q.canonical(
            {
                "txn_no": req.txn_no,
                "status": "accepted",
                "funder_id": f.id,
                "mode": f.mode,
                "amount": req.amount,
                "allocation": {"funder": alloc.funder, "platform": alloc.platform},
                "business_day": self.row["business_day"],
                "order_no": self.order_no,
            }
        )

    def _ledger_voucher(self, f: Funder, alloc: Allocation) -> str:
        # fg_intake puts the ledger transaction's id where "tx" is -1
        entries = ledger.acceptance(f.id, alloc.funder, alloc.platform)
        lines = ledger.lines_of(ledger.ACCEPTED, entries)
        return q.canonical(ledger.voucher_event(-1, ledger.ACCEPTED, lines, self.req.txn_no, None))

    def arguments(self, name_checked: bool) -> tuple[Any, ...]:
        svc, order, allocs = self.svc, self.order, self.allocs
        pairs = list(zip(order, allocs, strict=True))
        return (
            self.row,
            pii.name_index(svc.vault, self.req.payee.account_name),
            name_checked,
            svc.cfg.gateway.platform_daily_limit,
            svc.cfg.gateway.limit_buckets,
            self.bucket,
            [f.id for f in order],
            [f.mode for f in order],
            [f.daily_limit for f in order],
            [a.funder for a in allocs],
            [a.platform for a in allocs],
            self.order_no,
            self.bodies,
            [self._voucher(f, a) for f, a in pairs],
            [self._ledger_voucher(f, a) for f, a in pairs],
        )

    def refused(self, e: asyncpg.PostgresError, refusals: list[Refusal]) -> None:
        """Turn fg_intake's refusals into the API's 422; other errors pass unchanged."""
        state = getattr(e, "sqlstate", None)
        if state == PLATFORM_LIMIT:
            raise Unprocessable(
                "limit_exceeded",
                "the platform daily limit would be exceeded",
                details={"scope": "platform"},
            ) from None
        if state == ALL_REFUSED:
            caps = {f.id: f.daily_limit for f in self.order}
            for funder_id, reason in json.loads(getattr(e, "detail", None) or "{}").items():
                message = (
                    f"daily limit {caps[funder_id]} would be exceeded"
                    if reason == "daily_limit"
                    else "the prefund does not cover the platform share"
                )
                refusals.append(Refusal(funder_id, reason, message))
            code = "limit_exceeded" if all_limit_refusals(refusals) else "no_eligible_funder"
            raise Unprocessable(
                code, "no funder can take this disbursement", details=refusal_details(refusals)
            ) from None
