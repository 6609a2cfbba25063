"""HTTP handlers of the lending-core API, bank callbacks and ops routes (CONTRACT.md)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import date, datetime, timedelta, tzinfo
from datetime import time as dtime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from connectors.base import BankStatus
from connectors.errors import CallbackRejected
from gateway import outcomes, pii, states, vouchers
from gateway.context import Services
from gateway.disbursements import iso, render, submit
from gateway.errors import NotFound, Unauthorized, Unprocessable
from gateway.http import CLIENT_KEY, json_response, read_model, scoped
from gateway.masking import mask_account
from gateway.openapi import Param, Route, add_routes, document
from gateway.schemas import (
    MAX_BIGINT,
    TXN_NO_PATTERN,
    AccountIn,
    AccountList,
    AccountOut,
    Disbursement,
    DisbursementList,
    DisbursementRequest,
    ErrorOut,
    FunderList,
    Health,
    OpenApiDocument,
    VoucherList,
)
from gateway.store import db
from gateway.store import queries as q

log = structlog.get_logger("fundgate.api")

SERVICES = web.AppKey("services", Services)
try:
    __version__ = version("fundgate")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"


def _svc(request: web.Request) -> Services:
    return request.app[SERVICES]


# ---------------------------------------------------------------- disbursements


@scoped("disburse")
async def create_disbursement(request: web.Request) -> web.Response:
    svc = _svc(request)
    req = await read_model(request, DisbursementRequest)
    structlog.contextvars.bind_contextvars(txn_no=req.txn_no)
    outcome = await submit(svc, req, request[CLIENT_KEY].name)
    headers = {"Idempotent-Replay": "true"} if outcome.replay else None
    # keys sorted: a replay's body comes back from jsonb (which orders keys its own way) and
    # must be the first answer's, byte for byte
    return json_response(outcome.body, outcome.status, headers, sort_keys=True)


@scoped("read")
async def get_disbursement(request: web.Request) -> web.Response:
    svc = _svc(request)
    txn_no = request.match_info["txn_no"]
    async with svc.db() as conn:
        d = await q.find_by_txn(conn, txn_no)
        if d is None:
            raise NotFound(f"no disbursement {txn_no}")
        attempts = (await q.attempts_of(conn, [d["id"]]))[d["id"]]
    return json_response(render(d, attempts))


def _parse_time(
    name: str, value: str | None, zone: tzinfo, *, end: bool = False
) -> datetime | None:
    """An ISO 8601 time with its offset, or a business day (`YYYY-MM-DD`, in the gateway's
    time zone, as limits and reconciliation count days): its start, or with `end` the start
    of the day after, so that `created_to=D` takes in the whole of D."""
    if value is None or value == "":
        return None
    if len(value) == 10:
        try:
            day = date.fromisoformat(value)
        except ValueError as e:
            raise Unprocessable(
                "invalid_request", f"{name} must be an ISO 8601 time or date"
            ) from e
        return datetime.combine(day + timedelta(days=1 if end else 0), dtime(0), tzinfo=zone)
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise Unprocessable("invalid_request", f"{name} must be an ISO 8601 time or date") from e
    if ts.tzinfo is None:
        raise Unprocessable("invalid_request", f"{name} needs a UTC offset")
    return ts


def _cursor_out(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"d:{last_id}".encode()).decode().rstrip("=")


def _cursor_in(value: str | None) -> int | None:
    if not value:
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        kind, _, num = raw.partition(":")
        if kind != "d":
            raise ValueError(kind)
        n = int(num)
        if not 0 < n <= MAX_BIGINT:
            raise ValueError(num)
        return n
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise Unprocessable("invalid_request", "cursor is not valid") from e


def _parse_limit(request: web.Request, default: int = 50) -> int:
    try:
        limit = int(request.query.get("limit", str(default)))
    except ValueError as e:
        raise Unprocessable("invalid_request", "limit must be an integer") from e
    if not 1 <= limit <= 500:
        raise Unprocessable("invalid_request", "limit must be between 1 and 500")
    return limit


@scoped("read")
async def list_disbursements(request: web.Request) -> web.Response:
    svc = _svc(request)
    qs = request.query
    status = qs.get("status") or None
    if status is not None and status not in states.STATES:
        raise Unprocessable("invalid_request", f"status must be one of {', '.join(states.STATES)}")
    limit = _parse_limit(request)
    zone = svc.cfg.gateway.zone
    async with svc.db() as conn:
        rows = await q.list_disbursements(
            conn,
            status=status,
            funder_id=qs.get("funder_id") or None,
            created_from=_parse_time("created_from", qs.get("created_from"), zone),
            created_to=_parse_time("created_to", qs.get("created_to"), zone, end=True),
            before_id=_cursor_in(qs.get("cursor")),
            limit=limit + 1,
        )
        page = rows[:limit]
        attempts = await q.attempts_of(conn, [r["id"] for r in page])
    items = [render(r, attempts[r["id"]]) for r in page]
    nxt = _cursor_out(page[-1]["id"]) if len(rows) > limit else None
    return json_response({"items": items, "next_cursor": nxt})


@scoped("read")
async def list_vouchers(request: web.Request) -> web.Response:
    svc = _svc(request)
    txn_no = request.match_info["txn_no"]
    async with svc.db() as conn:
        if await q.find_by_txn(conn, txn_no) is None:
            raise NotFound(f"no disbursement {txn_no}")
        rows = await q.vouchers_of(conn, txn_no)
        unsealed = [r["id"] for r in rows if r["seq"] is None]
        if unsealed and await vouchers.seal_through(conn, unsealed):
            rows = await q.vouchers_of(conn, txn_no)
    return json_response({"items": [voucher_out(r) for r in rows]})


def voucher_out(r: Any) -> dict[str, Any]:
    return {
        "seq": r.get("seq"),
        "kind": r["kind"],
        "event": json.loads(r["event"]),
        "hash": r.get("hash"),
        "prev_hash": r.get("prev_hash"),
        "at": iso(r["at"]),
    }


# ---------------------------------------------------------------- whitelist


def _account_out(r: Any) -> dict[str, Any]:
    return {
        "borrower_id": r["borrower_id"],
        "account_no": r["account_masked"],
        "account_name": r["name_masked"],
        "bank_code": r["bank_code"],
        "created_at": iso(r["created_at"]),
    }


def _borrower(request: web.Request) -> str:
    borrower_id = request.match_info["borrower_id"]
    if not 1 <= len(borrower_id) <= 64:
        raise Unprocessable("invalid_request", "borrower_id must be 1 to 64 characters")
    return borrower_id


@scoped("disburse")
async def put_account(request: web.Request) -> web.Response:
    svc = _svc(request)
    borrower_id = _borrower(request)
    body = await read_model(request, AccountIn)
    async with svc.db() as conn, conn.transaction():
        row = await q.upsert_account(
            conn,
            borrower_id,
            pii.account_columns(svc.vault, body.account_no, body.account_name),
            body.bank_code,
        )
        await q.voucher(
            conn,
            "whitelist.registered",
            {
                "borrower_id": borrower_id,
                "account_no": mask_account(body.account_no),
                "bank_code": body.bank_code,
            },
            None,
        )
    log.info("whitelist.registered", borrower_id=borrower_id, account_no=body.account_no)
    return json_response(_account_out(row), 201 if row["inserted"] else 200)


@scoped("disburse")
async def delete_account(request: web.Request) -> web.Response:
    svc = _svc(request)
    borrower_id = _borrower(request)
    account_no = request.match_info["account_no"]
    async with svc.db() as conn, conn.transaction():
        if await q.delete_account(conn, borrower_id, pii.account_index(svc.vault, account_no)):
            await q.voucher(
                conn,
                "whitelist.removed",
                {"borrower_id": borrower_id, "account_no": mask_account(account_no)},
                None,
            )
    return web.Response(status=204)


@scoped("read")
async def list_accounts(request: web.Request) -> web.Response:
    svc = _svc(request)
    borrower_id = _borrower(request)
    async with svc.db() as conn:
        rows = await q.list_accounts(conn, borrower_id)
    return json_response({"items": [_account_out(r) for r in rows]})


# ---------------------------------------------------------------- funders


@scoped("read")
async def list_funders(request: web.Request) -> web.Response:
    svc = _svc(request)
    day = svc.business_day()
    async with svc.db() as conn:
        usage = await q.usage(conn, day)
        prefund = await q.prefund_balances(conn)
        in_flight = await q.in_flight_counts(conn)
        circuits = await q.circuits(conn)
    items = []
    for f in sorted(svc.cfg.funders, key=lambda f: (f.priority, f.id)):
        used = usage.get(q.funder_scope(f.id), 0)
        items.append(
            {
                "id": f.id,
                "name": f.name,
                "license": f.license,
                "mode": f.mode,
                "priority": f.priority,
                "platform_share": None if f.platform_share is None else str(f.platform_share),
                "connector": f.connector,
                "single_max": f.single_max,
                "daily_limit": f.daily_limit,
                "used_today": used,
                "remaining_today": max(0, f.daily_limit - used),
                "prefund_balance": prefund.get(f.id) if f.mode == "co_lending" else None,
                "circuit": circuits.get(f.id, "closed"),
                "paused": f.paused,
                "in_flight": in_flight.get(f.id, {}),
            }
        )
    platform_used = usage.get(q.PLATFORM_SCOPE, 0)
    cap = svc.cfg.gateway.platform_daily_limit
    return json_response(
        {
            "business_day": day.isoformat(),
            "platform": {
                "daily_limit": cap,
                "used_today": platform_used,
                "remaining_today": max(0, cap - platform_used),
            },
            "items": items,
        }
    )


# ---------------------------------------------------------------- callbacks


async def bank_callback(request: web.Request) -> web.StreamResponse:
    """`POST /v1/callbacks/{funder_id}`: verify, refuse replays, apply once, acknowledge."""
    svc = _svc(request)
    funder_id = request.match_info["funder_id"]
    connector = svc.connectors.get(funder_id)
    if connector is None:
        raise NotFound(f"no funder {funder_id}", code="unknown_funder")
    body = await request.read()
    try:
        event = connector.parse_callback(request.headers, body)
    except CallbackRejected as e:
        svc.metrics.callback(funder_id, "refused", e.reason)
        log.warning("callback.refused", funder_id=funder_id, reason=e.reason, detail=e.message)
        raise Unauthorized("callback_refused", e.message, details={"reason": e.reason}) from e
    structlog.contextvars.bind_contextvars(order_no=event.order_no)
    # no transaction: the nonce and the move are one statement (outcomes.move); the attempt is
    # read without a lock and read again if it moves before that statement
    settle = outcomes.Settle(nonce=(funder_id, event.nonce))

    decided: list[asyncpg.Record] = []  # the row the last decision was made from

    async def apply(a: asyncpg.Record) -> bool | None:
        decided[:] = [a]
        if event.amount is not None and event.amount != a["amount"]:
            await outcomes.settle_only(conn, a, settle)  # the nonce is spent all the same
            return None
        return await outcomes.apply_bank_status(
            conn, svc, a, event.status, bank_ref=event.bank_ref, fail_code=event.fail_code,
            fail_reason=event.fail_reason, source="callback", settle=settle,
        )  # fmt: skip

    async with svc.db() as conn:
        # an order this process has just moved is decided from that row (see RecentAttempts)
        a = svc.recent.get(event.order_no) or await q.attempt_by_order(conn, event.order_no)
        if a is None or a["funder_id"] != funder_id:
            svc.metrics.callback(funder_id, "refused", "unknown_order")
            raise NotFound(f"no order {event.order_no} at {funder_id}", code="unknown_order")
        try:
            moved = await outcomes.retry_stale(conn, a, apply)
        except outcomes.Replayed as e:
            svc.metrics.callback(funder_id, "refused", "replayed")
            log.warning("callback.refused", funder_id=funder_id, reason="replayed")
            raise Unauthorized(
                "callback_refused", "nonce already used", details={"reason": "replayed"}
            ) from e
    if moved is None:
        # the bank reports a different amount: do not settle on it; reconciliation decides
        log.error(
            "callback.amount_mismatch", order_no=event.order_no, ours=a["amount"], bank=event.amount
        )
        svc.metrics.callback(funder_id, "refused", "amount_mismatch")
        return connector.callback_ack(True)
    if not moved and event.status == BankStatus.SUCCEEDED and decided[0]["status"] == "failed":
        # acknowledged as the contract says (stale), but the bank paid an order we failed,
        # perhaps after failing it over: money may have moved twice. Reconciliation raises
        # the break at night; ops hear of it now
        svc.metrics.paid_after_failure(funder_id)
        log.error(
            "callback.paid_after_failure", funder_id=funder_id, order_no=event.order_no,
            txn_no=a["txn_no"], bank_ref=event.bank_ref,
        )  # fmt: skip
    svc.metrics.callback(funder_id, "accepted" if moved else "duplicate", None)
    log.info("callback.received", funder_id=funder_id, status=str(event.status), applied=moved)
    return connector.callback_ack(True)


# ---------------------------------------------------------------- ops


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = _svc(request)
    try:
        async with svc.pool.acquire(timeout=2) as conn:
            pending = await db.pending(conn)
    except Exception as e:
        return json_response({"status": "unavailable", "database": str(e)[:200]}, 503)
    if pending:
        return json_response(
            {"status": "migrations_pending", "pending": [m.version for m in pending]}, 503
        )
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = _svc(request).metrics.render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


OPENAPI = web.AppKey("openapi", dict)

# a time with its offset, or a business day (`_parse_time`)
_TIME_OR_DAY = {"type": "string", "anyOf": [{"format": "date-time"}, {"format": "date"}]}
_TXN = Param("txn_no", "path", {"type": "string", "pattern": TXN_NO_PATTERN})
_BORROWER = Param("borrower_id", "path", {"type": "string", "minLength": 1, "maxLength": 64})

API_ROUTES: list[Route] = [
    Route("POST", "/v1/disbursements", create_disbursement, "Submit a disbursement",
          scope="disburse", body=DisbursementRequest,
          responses={201: Disbursement, 200: Disbursement, 409: ErrorOut}),
    Route("GET", "/v1/disbursements", list_disbursements, "List disbursements, newest first",
          scope="read", responses={200: DisbursementList}, params=(
              Param("status", "query", {"type": "string", "enum": list(states.STATES)}),
              Param("funder_id", "query", {"type": "string"}),
              Param("created_from", "query", _TIME_OR_DAY),
              Param("created_to", "query", _TIME_OR_DAY),
              Param("cursor", "query", {"type": "string"}),
              Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}),
          )),
    Route("GET", "/v1/disbursements/{txn_no}", get_disbursement, "One disbursement",
          scope="read", responses={200: Disbursement, 404: ErrorOut}, params=(_TXN,)),
    Route("GET", "/v1/disbursements/{txn_no}/vouchers", list_vouchers,
          "The vouchers of one disbursement", scope="read",
          responses={200: VoucherList, 404: ErrorOut}, params=(_TXN,)),
    Route("PUT", "/v1/borrowers/{borrower_id}/accounts", put_account,
          "Register a payee account (whitelist)", scope="disburse", body=AccountIn,
          responses={201: AccountOut, 200: AccountOut}, params=(_BORROWER,)),
    Route("GET", "/v1/borrowers/{borrower_id}/accounts", list_accounts,
          "A borrower's registered accounts, masked", scope="read",
          responses={200: AccountList}, params=(_BORROWER,)),
    Route("DELETE", "/v1/borrowers/{borrower_id}/accounts/{account_no}", delete_account,
          "Remove a payee account", scope="disburse", responses={204: None},
          params=(_BORROWER, Param("account_no", "path", {"type": "string"}))),
    Route("GET", "/v1/funders", list_funders, "Funders: limits, usage, prefund, circuit",
          scope="read", responses={200: FunderList}),
    Route("POST", "/v1/callbacks/{funder_id}", bank_callback,
          "A bank's signed result callback (format defined by the funder's connector)",
          raw_body="application/json",
          responses={200: "the bank's acknowledgement", 401: ErrorOut, 404: ErrorOut},
          params=(Param("funder_id", "path", {"type": "string"}),)),
]  # fmt: skip

OPS_ROUTES: list[Route] = [
    Route("GET", "/healthz", healthz, "Liveness", responses={200: Health}),
    Route("GET", "/readyz", readyz, "Readiness: database answers, migrations current",
          responses={200: Health, 503: Health}),
    Route("GET", "/metrics", metrics, "Prometheus metrics",
          responses={200: "Prometheus text format"}),
    Route("GET", "/openapi.json", openapi, "This document", responses={200: OpenApiDocument}),
]  # fmt: skip


def install_routes(app: web.Application, *, api: bool) -> None:
    from gateway.ledger_api import LEDGER_ROUTES
    from gateway.recon_api import RECON_ROUTES  # reconciliation's routes (gateway/recon_api.py)

    every = API_ROUTES + LEDGER_ROUTES + RECON_ROUTES
    add_routes(app, OPS_ROUTES + (every if api else []))
    app[OPENAPI] = document(OPS_ROUTES + every, version=__version__)
