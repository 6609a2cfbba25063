"""Ledger and prefund routes: balances, an account's entries, prefund top-ups/withdrawals."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from gateway import ledger
from gateway.api import SERVICES, _cursor_in, _cursor_out, _parse_limit
from gateway.disbursements import iso
from gateway.errors import Conflict, NotFound, Unprocessable
from gateway.http import CLIENT_KEY, json_response, read_model, scoped
from gateway.openapi import Param, Route
from gateway.schemas import ErrorOut
from gateway.store import queries as q

log = structlog.get_logger("fundgate.ledger")


class PrefundIn(BaseModel):
    """A top-up (amount > 0) or withdrawal (amount < 0) of the platform's prefund at a funder."""

    model_config = ConfigDict(extra="forbid")
    reference: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    amount: StrictInt = Field(
        description="fen; > 0 top-up, < 0 withdrawal", ge=-(10**15), le=10**15
    )
    note: str | None = Field(default=None, max_length=500)


class PrefundOut(BaseModel):
    """The operation as recorded, with the balance right after it."""

    reference: str
    funder_id: str
    amount: int
    balance_after: int
    note: str | None
    created_at: str


class Balance(BaseModel):
    account: str
    balance: int


class Balances(BaseModel):
    """Balances derived from the journal's entries (debit > 0)."""

    items: list[Balance]


class Entry(BaseModel):
    id: int
    tx: int
    kind: str
    amount: int
    txn_no: str | None
    reference: str | None
    business_day: str
    at: str


class EntryList(BaseModel):
    items: list[Entry]
    next_cursor: str | None


def _op_out(r: Any) -> dict[str, Any]:
    return {
        "reference": r["reference"],
        "funder_id": r["funder_id"],
        "amount": r["amount"],
        "balance_after": r["balance_after"],
        "note": r["note"],
        "created_at": iso(r["created_at"]),
    }


@scoped("admin")
async def prefund(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    funder_id = request.match_info["funder_id"]
    funder = svc.funders.get(funder_id)
    if funder is None:
        raise NotFound(f"no funder {funder_id}", code="unknown_funder")
    if funder.mode != "co_lending":
        raise Unprocessable("invalid_request", f"{funder_id} is not a co-lending funder")
    body = await read_model(request, PrefundIn)
    if body.amount == 0:
        raise Unprocessable("invalid_request", "amount must not be zero")
    client = request[CLIENT_KEY].name
    async with svc.db() as conn, conn.transaction():
        # concurrent requests with one reference queue here, so the later ones see the first
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", "prefund:" + body.reference
        )
        seen = await conn.fetchrow(
            "SELECT * FROM prefund_operations WHERE reference = $1", body.reference
        )
        if seen is not None:
            if (seen["funder_id"], seen["amount"], seen["note"]) != (
                funder_id, body.amount, body.note,
            ):  # fmt: skip
                raise Conflict("reference_conflict", "reference already used differently")
            return json_response(_op_out(seen), 200, {"Idempotent-Replay": "true"})
        if body.amount > 0:
            await q.return_prefund(conn, funder_id, body.amount)
        elif not await q.take_prefund(conn, funder_id, -body.amount):
            raise Unprocessable(
                "prefund_insufficient", "the withdrawal is larger than the prefund balance"
            )
        balance = await conn.fetchval("SELECT balance FROM prefund WHERE funder_id = $1", funder_id)
        row = await conn.fetchrow(
            "INSERT INTO prefund_operations"
            " (reference, funder_id, amount, note, client, balance_after)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (reference) DO NOTHING RETURNING *",
            body.reference,
            funder_id,
            body.amount,
            body.note,
            client,
            balance,
        )
        assert row is not None  # the advisory lock above admits one writer per reference
        kind = "prefund.topup" if body.amount > 0 else "prefund.withdrawal"
        await ledger.custody_move(
            conn, funder_id, body.amount, svc.business_day(), kind=kind, reference=body.reference
        )
        await q.voucher(
            conn,
            "admin." + kind,
            {"funder_id": funder_id, "amount": body.amount, "reference": body.reference,
             "client": client, "note": body.note, "balance_after": balance},
            None,
        )  # fmt: skip
    log.info(kind, funder_id=funder_id, amount=body.amount, client=client, balance=balance)
    return json_response(_op_out(row), 201)


@scoped("read")
async def balances(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    async with svc.db() as conn:
        bal = await ledger.balances(conn)
    return json_response({"items": [{"account": a, "balance": b} for a, b in bal.items()]})


@scoped("read")
async def account_entries(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    account = request.match_info["account"]
    limit = _parse_limit(request)
    async with svc.db() as conn:
        rows = await ledger.entries(
            conn, account, before_id=_cursor_in(request.query.get("cursor")), limit=limit + 1
        )
    page = rows[:limit]
    nxt = _cursor_out(page[-1]["id"]) if len(rows) > limit else None
    return json_response({"items": [ledger.entry_out(r) for r in page], "next_cursor": nxt})


_FUNDER = Param("funder_id", "path", {"type": "string"})

LEDGER_ROUTES: list[Route] = [
    Route("POST", "/v1/funders/{funder_id}/prefund", prefund,
          "Top up (amount > 0) or withdraw (amount < 0) the platform's prefund at a funder",
          scope="admin", body=PrefundIn,
          responses={201: PrefundOut, 200: PrefundOut, 404: ErrorOut, 409: ErrorOut},
          params=(_FUNDER,)),
    Route("GET", "/v1/ledger/balances", balances, "Balances of every ledger account",
          scope="read", responses={200: Balances}),
    Route("GET", "/v1/ledger/accounts/{account}/entries", account_entries,
          "An account's entries, newest first", scope="read", responses={200: EntryList},
          params=(Param("account", "path", {"type": "string"}),
                  Param("cursor", "query", {"type": "string"}),
                  Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}))),
]  # fmt: skip
