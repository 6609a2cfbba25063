"""Intake: validation, idempotency, routing and limit reservation in one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import structlog

from config.models import Funder
from gateway import ledger, pii
from gateway.context import Services
from gateway.errors import Conflict, Unprocessable
from gateway.schemas import DisbursementRequest
from gateway.store import queries as q
from routing import FunderState, LoanTerms, Refusal, allocate, candidates, check_loan
from routing.eligibility import all_limit_refusals

log = structlog.get_logger("fundgate.intake")


def order_no(txn_no: str, n: int) -> str:
    """The bank's idempotency key: the same attempt always carries the same order number."""
    return f"{txn_no}-{n:02d}"


def iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def render(d: asyncpg.Record, attempts: list[asyncpg.Record]) -> dict[str, Any]:
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


async def reserve_for(
    conn: q.Conn, funder: Funder, day: date, amount: int, platform_amount: int
) -> bool:
    """Reserve the funder's daily limit and, for co-lending, the platform's prefund there."""
    if not await q.reserve(conn, q.funder_scope(funder.id), day, amount, funder.daily_limit):
        return False
    if platform_amount and not await q.take_prefund(conn, funder.id, platform_amount):
        await q.release(conn, q.funder_scope(funder.id), day, amount)
        return False
    return True


async def _replay(conn: q.Conn, req: DisbursementRequest, digest: bytes) -> Outcome | None:
    existing = await q.find_by_txn(conn, req.txn_no)
    if existing is None:
        return None
    if bytes(existing["request_hash"]) != digest:
        raise Conflict(
            "txn_no_conflict",
            f"txn_no {req.txn_no} was already used with a different request",
        )
    body = existing["first_response"]
    if body is None:  # pragma: no cover - written in the same transaction as the row
        body = await load_resource(conn, existing["id"])
    return Outcome(200, body, replay=True)


async def submit(svc: Services, req: DisbursementRequest, client: str) -> Outcome:
    digest = svc.vault.keyed_digest(req.canonical_bytes())
    async with svc.db() as conn:
        replay = await _replay(conn, req, digest)
        if replay is not None:
            return replay

        loan = LoanTerms(
            amount=req.amount,
            term=req.term.to_term(),
            apr=req.apr_decimal,
            product=req.product,
            repayment=req.repayment,
        )
        violation = check_loan(loan, svc.cfg.product(req.product), svc.cfg.gateway)
        if violation is not None:
            raise Unprocessable(violation.code, violation.message)

        account = await q.get_account(
            conn, req.borrower_id, pii.account_index(svc.vault, req.payee.account_no)
        )
        if (
            account is None
            or account["bank_code"] != req.payee.bank_code
            or pii.account_name(svc.vault, account) != req.payee.account_name
        ):
            raise Unprocessable(
                "payee_not_whitelisted",
                "the payee account is not registered for this borrower",
            )

        now = svc.clock()
        day = svc.business_day(now)
        usage = await q.usage(conn, day)
        prefund = await q.prefund_balances(conn)
        circuits = await svc.circuits(conn)
        order, refusals = candidates(
            svc.cfg.funders,
            loan,
            funder_states(svc, usage, prefund, circuits),
            hint=req.funder_hint,
        )
        if not order:
            code = "limit_exceeded" if all_limit_refusals(refusals) else "no_eligible_funder"
            raise Unprocessable(code, "no funder can take this disbursement",
                                details=refusal_details(refusals))  # fmt: skip

        first = order[0]
        first_alloc = allocate(req.amount, first.platform_share)
        async with conn.transaction():
            did = await q.insert_disbursement(
                conn,
                {
                    "txn_no": req.txn_no,
                    "request_hash": digest,
                    "client": client,
                    "loan_id": req.loan_id,
                    "borrower_id": req.borrower_id,
                    "amount": req.amount,
                    "currency": req.currency,
                    "term_unit": req.term.unit,
                    "term_count": req.term.count,
                    "apr": req.apr_decimal,
                    "product": req.product,
                    "repayment": req.repayment,
                    **pii.payee_columns(svc.vault, req.payee.account_no, req.payee.account_name),
                    "payee_bank_code": req.payee.bank_code,
                    "metadata": req.metadata,
                    "status": "accepted",
                    "funder_id": first.id,
                    "mode": first.mode,
                    "alloc_funder": first_alloc.funder,
                    "alloc_platform": first_alloc.platform,
                    "business_day": day,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            chosen: Funder | None = None
            if did is not None:
                if not await q.reserve(
                    conn, q.PLATFORM_SCOPE, day, req.amount, svc.cfg.gateway.platform_daily_limit
                ):
                    raise Unprocessable(
                        "limit_exceeded",
                        "the platform daily limit would be exceeded",
                        details={"scope": "platform"},
                    )
                for f in order:
                    alloc = allocate(req.amount, f.platform_share)
                    if await reserve_for(conn, f, day, req.amount, alloc.platform):
                        chosen = f
                        if f is not first:
                            await q.route_disbursement(
                                conn, did, funder_id=f.id, mode=f.mode, alloc_funder=alloc.funder,
                                alloc_platform=alloc.platform, now=now,
                            )  # fmt: skip
                        break
                    refusals.append(Refusal(f.id, "daily_limit", "limit taken concurrently"))
                if chosen is None:
                    raise Unprocessable(
                        "limit_exceeded",
                        "every eligible funder's limit was taken concurrently",
                        details=refusal_details(refusals),
                    )
                alloc = allocate(req.amount, chosen.platform_share)
                attempt_id = await q.insert_attempt(
                    conn,
                    {
                        "disbursement_id": did,
                        "n": 1,
                        "funder_id": chosen.id,
                        "order_no": order_no(req.txn_no, 1),
                        "status": "accepted",
                        "mode": chosen.mode,
                        "alloc_funder": alloc.funder,
                        "alloc_platform": alloc.platform,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
                await q.enqueue(conn, "dispatch", attempt_id, funder_id=chosen.id)
                await ledger.reserve(conn, req.txn_no, chosen.id, alloc.funder, alloc.platform, day)
                await q.voucher(
                    conn,
                    "disbursement.accepted",
                    {
                        "txn_no": req.txn_no,
                        "status": "accepted",
                        "funder_id": chosen.id,
                        "mode": chosen.mode,
                        "amount": req.amount,
                        "allocation": {"funder": alloc.funder, "platform": alloc.platform},
                        "business_day": day.isoformat(),
                        "order_no": order_no(req.txn_no, 1),
                    },
                    req.txn_no,
                )
                body = await load_resource(conn, did)
                await q.set_first_response(conn, did, body)
        if did is None:
            # a concurrent duplicate committed first: answer as its replay (or conflict)
            replay = await _replay(conn, req, digest)
            assert replay is not None
            return replay

    assert chosen is not None
    svc.metrics.disbursement_transition(chosen.id, "accepted", req.amount)
    log.info(
        "disbursement.accepted",
        txn_no=req.txn_no,
        funder_id=chosen.id,
        amount=req.amount,
        mode=chosen.mode,
    )
    return Outcome(201, body)
