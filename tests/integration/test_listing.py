"""`GET /v1/disbursements` (newest first, cursor pages, filters) and `GET /v1/funders`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.fakes import reject
from tests.integration.conftest import (
    AMOUNT,
    AUTH,
    Harness,
    StartGateway,
)

pytestmark = pytest.mark.integration

# seven disbursements: #2 and #5 fail at the bank, #3 and #5 go to bank-b
FAILING = {2, 5}
AT_BANK_B = {3, 5}
TXNS = [f"T-LIST-{i}" for i in range(7)]


async def _listed(h: Harness, **params: Any) -> tuple[int, dict[str, Any]]:
    resp = await h.client.get(
        "/v1/disbursements", params={k: str(v) for k, v in params.items()}, headers=AUTH
    )
    return resp.status, await resp.json()


async def _walk(h: Harness, **params: Any) -> list[str]:
    """Every txn_no over all pages, in order."""
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(len(TXNS) + 2):
        status, body = await _listed(h, **params, **({"cursor": cursor} if cursor else {}))
        assert status == 200, body
        assert len(body["items"]) <= int(params.get("limit", 50))
        seen += [d["txn_no"] for d in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError(f"pagination did not end: {seen}")


async def _seven(start_gateway: StartGateway) -> tuple[Harness, dict[str, dict[str, Any]]]:
    h = await start_gateway()
    await h.register()
    for i, txn in enumerate(TXNS):
        if i in FAILING:
            h.banks["bank-b" if i in AT_BANK_B else "bank-a"].script(
                reject(pre_execution=False), order_no=f"{txn}-01"
            )
        await h.accepted(txn, funder_hint="bank-b" if i in AT_BANK_B else None)
    final = {txn: await h.wait_status(txn, "sent", "failed") for txn in TXNS}
    return h, final


@pytest.mark.asyncio
async def test_listing_walks_every_disbursement_newest_first_without_duplicates(
    start_gateway: StartGateway,
) -> None:
    h, _ = await _seven(start_gateway)
    newest_first = list(reversed(TXNS))
    assert await _walk(h) == newest_first
    for limit in (1, 3, 7, 8):
        assert await _walk(h, limit=limit) == newest_first
    _, body = await _listed(h, limit=7)
    assert body["next_cursor"] is None


@pytest.mark.asyncio
async def test_listing_filters_by_status_funder_and_creation_time(
    start_gateway: StartGateway,
) -> None:
    h, final = await _seven(start_gateway)
    failed = [t for i, t in enumerate(TXNS) if i in FAILING]
    at_b = [t for i, t in enumerate(TXNS) if i in AT_BANK_B]
    assert {final[t]["status"] for t in failed} == {"failed"}

    assert await _walk(h, status="failed") == failed[::-1]
    assert await _walk(h, status="sent", limit=2) == [t for t in reversed(TXNS) if t not in failed]
    assert await _walk(h, funder_id="bank-b") == at_b[::-1]
    assert await _walk(h, funder_id="bank-b", status="failed") == ["T-LIST-5"]
    assert await _walk(h, status="succeeded") == []

    # created_from is inclusive, created_to exclusive
    start, end = final[TXNS[2]]["created_at"], final[TXNS[5]]["created_at"]
    window = ["T-LIST-4", "T-LIST-3", "T-LIST-2"]
    assert await _walk(h, created_from=start, created_to=end) == window
    assert await _walk(h, created_from=start, created_to=end, limit=1) == window
    assert await _walk(h, created_from=end) == ["T-LIST-6", "T-LIST-5"]
    assert await _walk(h, created_to=start) == ["T-LIST-1", "T-LIST-0"]


@pytest.mark.asyncio
async def test_a_business_day_bounds_the_listing_in_the_gateways_time_zone(
    start_gateway: StartGateway,
) -> None:
    h, final = await _seven(start_gateway)
    today = h.svc.business_day()
    created = datetime.fromisoformat(final[TXNS[0]]["created_at"].replace("Z", "+00:00"))
    assert created.astimezone(h.cfg.gateway.zone).date() == today
    day, before, after = (str(d) for d in (today, today - timedelta(1), today + timedelta(1)))
    newest_first = list(reversed(TXNS))
    # created_to=D takes in the whole of D
    assert await _walk(h, created_from=day, created_to=day) == newest_first
    assert await _walk(h, created_to=before) == []
    assert await _walk(h, created_from=after) == []


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "not-a-cursor!"},
        {"cursor": "eDox"},  # base64 of "x:1": a cursor of another kind
        {"cursor": "ZDpvbmU"},  # base64 of "d:one"
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"status": "paid"},
        {"created_from": "yesterday"},
        {"created_to": "2026-01-01T00:00:00"},  # no UTC offset
        {"created_from": "2026-13-01"},
    ],
)
@pytest.mark.asyncio
async def test_listing_refuses_invalid_parameters_with_422(
    start_gateway: StartGateway, params: dict[str, Any]
) -> None:
    h = await start_gateway(role="api")
    status, body = await _listed(h, **params)
    assert status == 422, body
    assert body["error"]["code"] == "invalid_request"


@pytest.mark.asyncio
async def test_funders_show_todays_usage_and_the_prefund_after_intake(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(role="api")
    await h.register()
    await h.accepted("T-FUND-A")
    await h.accepted("T-FUND-B", 1_000_001, funder_hint="bank-b")

    resp = await h.client.get("/v1/funders", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert body["business_day"] == h.svc.business_day().isoformat()
    cfg = {f.id: f for f in h.cfg.funders}
    items = {f["id"]: f for f in body["items"]}
    assert [f["id"] for f in body["items"]] == ["bank-a", "bank-b"]  # by priority

    a, b = items["bank-a"], items["bank-b"]
    assert (a["used_today"], a["remaining_today"]) == (AMOUNT, cfg["bank-a"].daily_limit - AMOUNT)
    assert a["prefund_balance"] is None
    assert a["mode"] == "direct"
    assert b["used_today"] == 1_000_001
    assert b["remaining_today"] == cfg["bank-b"].daily_limit - 1_000_001
    assert b["prefund_balance"] == cfg["bank-b"].prefund_balance - 300_001
    assert b["platform_share"] == "0.30"
    assert a["in_flight"] == {"accepted": 1}
    assert b["in_flight"] == {"accepted": 1}
    platform = body["platform"]
    assert platform["used_today"] == AMOUNT + 1_000_001
    assert platform["remaining_today"] == platform["daily_limit"] - AMOUNT - 1_000_001
