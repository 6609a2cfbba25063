"""Reconciliation over HTTP: runs, their breaks, and a person's resolution of a break.

GET  /v1/reconciliation/runs?date=&funder_id=           runs, newest day first   (read)
GET  /v1/reconciliation/runs/{id}                       one run with its summary (read)
GET  /v1/reconciliation/runs/{id}/breaks?type=&status=  its breaks               (read)
GET  /v1/reconciliation/breaks?run=&type=&status=&funder_id=&cursor=&limit=     (read)
POST /v1/reconciliation/breaks/{id}/resolve             {"resolution", "note"}  (admin)
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.context import Services
from gateway.errors import ApiError, NotFound, Unprocessable
from gateway.http import CLIENT_KEY, json_response, read_model, scoped
from gateway.openapi import Param, Route
from gateway.reconcile import ResolveError, resolve_break
from gateway.schemas import MAX_BIGINT, ErrorOut
from gateway.store import recon_queries as rq
from reconciliation.classify import BREAK_TYPES, BreakType

BREAK_STATUSES = ("open", "auto_pending", "auto_resolved", "resolved")
RUN_STATUSES = ("running", "succeeded", "failed")
MAX_LIMIT = 1000

# ---------------------------------------------------------------- models


class ResolveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: Literal["bank_is_right", "gateway_is_right"] = Field(
        description="bank_is_right applies the bank's answer through the state machine; "
        "gateway_is_right closes the break and leaves our record as it is"
    )
    note: str = Field(min_length=1, max_length=2000, description="why (kept in the audit trail)")


class Tally(BaseModel):
    count: int
    amount: int = Field(description="fen")


class RunSummary(BaseModel):
    lines: int
    amount: int
    matched: Tally
    pending: Tally
    not_expected: Tally
    breaks: dict[str, Tally] = Field(description="every break the run found, by type")
    auto_resolved: dict[str, Tally] = Field(description="those the run resolved itself")
    open: int = Field(description="breaks of this run still waiting for a person")


class Run(BaseModel):
    """One reconciliation run: a funder's statement of one business day."""

    id: int
    funder_id: str
    date: str
    status: Literal["running", "succeeded", "failed"]
    trigger: str
    runs: int = Field(description="how often this day was (re-)run")
    started_at: str
    finished_at: str | None
    error: str | None = Field(description="why a failed run failed, with the line number")
    lines: int
    amount: int
    summary: RunSummary | None


class RunList(BaseModel):
    items: list[Run]


class Break(BaseModel):
    """A difference between the bank's statement and the gateway's records."""

    id: int
    run_id: int
    funder_id: str
    date: str
    order_no: str
    txn_no: str | None
    type: BreakType  # every type a run records, the run-level ledger total's included
    severity: str
    status: Literal["open", "auto_pending", "auto_resolved", "resolved"]
    reason: str
    our_status: str | None
    our_amount: int | None
    bank_status: str | None
    bank_amount: int | None
    bank_ref: str | None
    bank_lines: int
    line_no: int | None
    resolution: str | None
    resolved_by: str | None
    resolved_at: str | None
    note: str | None
    evidence: dict[str, Any] | None
    created_at: str
    updated_at: str


class BreakList(BaseModel):
    items: list[Break]
    next_cursor: str | None


# ---------------------------------------------------------------- rendering


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def run_out(r: Any) -> dict[str, Any]:
    summary = r["summary"] or None
    return {
        "id": r["id"],
        "funder_id": r["funder_id"],
        "date": r["business_day"].isoformat(),
        "status": r["status"],
        "trigger": r["trigger"],
        "runs": r["runs"],
        "started_at": _iso(r["started_at"]),
        "finished_at": _iso(r["finished_at"]),
        "error": r["error"],
        "lines": r["lines"],
        "amount": r["amount"],
        "summary": summary if summary else None,
    }


def break_out(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"],
        "run_id": r["run_id"],
        "funder_id": r["funder_id"],
        "date": r["business_day"].isoformat(),
        "order_no": r["order_no"],
        "txn_no": r["txn_no"],
        "type": r["type"],
        "severity": r["severity"],
        "status": r["status"],
        "reason": r["reason"],
        "our_status": r["our_status"],
        "our_amount": r["our_amount"],
        "bank_status": r["bank_status"],
        "bank_amount": r["bank_amount"],
        "bank_ref": r["bank_ref"],
        "bank_lines": r["bank_lines"],
        "line_no": r["line_no"],
        "resolution": r["resolution"],
        "resolved_by": r["resolved_by"],
        "resolved_at": _iso(r["resolved_at"]),
        "note": r["note"],
        "evidence": r["evidence"],
        "created_at": _iso(r["created_at"]),
        "updated_at": _iso(r["updated_at"]),
    }


# ---------------------------------------------------------------- handlers


def _svc(request: web.Request) -> Services:
    from gateway.api import SERVICES  # the app key lives with the main route table

    return request.app[SERVICES]


def _int(name: str, value: str | None, *, minimum: int = 1) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError as e:
        raise Unprocessable("invalid_request", f"{name} must be an integer") from e
    if n < minimum:
        raise Unprocessable("invalid_request", f"{name} must be at least {minimum}")
    if n > MAX_BIGINT:
        raise Unprocessable("invalid_request", f"{name} is out of range")
    return n


def _choice(name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if not value:
        return None
    if value not in allowed:
        raise Unprocessable("invalid_request", f"{name} must be one of {', '.join(allowed)}")
    return value


def _path_id(request: web.Request) -> int:
    n = _int("id", request.match_info["id"])
    assert n is not None
    return n


@scoped("read")
async def list_runs(request: web.Request) -> web.Response:
    svc = _svc(request)
    raw = request.query.get("date") or None
    day = None
    if raw is not None:
        try:
            day = date.fromisoformat(raw)
        except ValueError as e:
            raise Unprocessable("invalid_request", "date must be YYYY-MM-DD") from e
    limit = _int("limit", request.query.get("limit")) or 100
    async with svc.db() as conn:
        rows = await rq.list_runs(
            conn, day=day, funder_id=request.query.get("funder_id") or None,
            limit=min(limit, MAX_LIMIT),
        )  # fmt: skip
    return json_response({"items": [run_out(r) for r in rows]})


@scoped("read")
async def get_run(request: web.Request) -> web.Response:
    svc = _svc(request)
    run_id = _path_id(request)
    async with svc.db() as conn:
        row = await rq.get_run(conn, run_id)
    if row is None:
        raise NotFound(f"no reconciliation run {run_id}")
    return json_response(run_out(row))


async def _breaks(request: web.Request, run_id: int | None) -> web.Response:
    svc = _svc(request)
    qs = request.query
    kind = _choice("type", qs.get("type"), BREAK_TYPES)
    status = _choice("status", qs.get("status"), BREAK_STATUSES)
    limit = min(_int("limit", qs.get("limit")) or 100, MAX_LIMIT)
    after = _int("cursor", qs.get("cursor"), minimum=0)
    async with svc.db() as conn:
        if run_id is not None and await rq.get_run(conn, run_id) is None:
            raise NotFound(f"no reconciliation run {run_id}")
        rows = await rq.list_breaks(
            conn, run_id=run_id, funder_id=qs.get("funder_id") or None, kind=kind,
            status=status, after_id=after, limit=limit + 1,
        )  # fmt: skip
    page = rows[:limit]
    nxt = str(page[-1]["id"]) if len(rows) > limit else None
    return json_response({"items": [break_out(r) for r in page], "next_cursor": nxt})


@scoped("read")
async def list_run_breaks(request: web.Request) -> web.Response:
    return await _breaks(request, _path_id(request))


@scoped("read")
async def list_breaks(request: web.Request) -> web.Response:
    return await _breaks(request, _int("run", request.query.get("run")))


@scoped("admin")
async def resolve(request: web.Request) -> web.Response:
    svc = _svc(request)
    break_id = _path_id(request)
    body = await read_model(request, ResolveIn)
    who = request[CLIENT_KEY].name
    try:
        row = await resolve_break(svc, break_id, body.resolution, body.note, who)
    except ResolveError as e:
        raise ApiError(e.code, e.message, status=e.status) from e
    return json_response(break_out(row))


# ---------------------------------------------------------------- routes

_ID = Param("id", "path", {"type": "integer", "minimum": 1, "maximum": MAX_BIGINT})
_TYPE = Param("type", "query", {"type": "string", "enum": list(BREAK_TYPES)})
_STATUS = Param("status", "query", {"type": "string", "enum": list(BREAK_STATUSES)})
_LIMIT = Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT})
_CURSOR = Param("cursor", "query", {"type": "string"}, description="next_cursor of the last page")
_FUNDER = Param("funder_id", "query", {"type": "string"})

RECON_ROUTES: list[Route] = [
    Route("GET", "/v1/reconciliation/runs", list_runs, "Reconciliation runs, newest day first",
          scope="read", responses={200: RunList},
          params=(Param("date", "query", {"type": "string", "format": "date"}), _FUNDER, _LIMIT)),
    Route("GET", "/v1/reconciliation/runs/{id}", get_run, "One reconciliation run",
          scope="read", responses={200: Run, 404: ErrorOut}, params=(_ID,)),
    Route("GET", "/v1/reconciliation/runs/{id}/breaks", list_run_breaks,
          "The breaks of one run", scope="read", responses={200: BreakList, 404: ErrorOut},
          params=(_ID, _TYPE, _STATUS, _CURSOR, _LIMIT)),
    Route("GET", "/v1/reconciliation/breaks", list_breaks, "Breaks of every run",
          scope="read", responses={200: BreakList, 404: ErrorOut},
          params=(Param("run", "query", {"type": "integer", "minimum": 1,
                                         "maximum": MAX_BIGINT}), _FUNDER, _TYPE,
                  _STATUS, _CURSOR, _LIMIT)),
    Route("POST", "/v1/reconciliation/breaks/{id}/resolve", resolve,
          "Resolve a break: bank_is_right or gateway_is_right, with a note (audit trail)",
          scope="admin", body=ResolveIn,
          responses={200: Break, 404: ErrorOut, 409: ErrorOut}, params=(_ID,)),
]  # fmt: skip
