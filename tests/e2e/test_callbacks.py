"""Bank callbacks at `/v1/callbacks/{funder_id}`: forged, stale and replayed ones change nothing.

bank-a settles slowly here (4 s), so a disbursement waits in `sent` long enough for a forged
FAILED callback to matter: were it believed, the borrower would be reported unpaid while the
bank pays. Callbacks are signed in the test from CONTRACT.md's rule, not with product code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Api, Stack, bank_a, bank_b, error_of, run_stack

pytestmark = pytest.mark.e2e

SETTLE_MS = 4000


@pytest.fixture(scope="module")
def stack(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(
        tmp_path_factory.mktemp("callbacks"),
        module_db,
        funders=[bank_a(bank_args=("--settle-ms", str(SETTLE_MS))), bank_b()],
    ) as s:
        yield s


def signed(
    secret: str, body: bytes, *, timestamp: int | None = None, nonce: str | None = None
) -> dict[str, str]:
    """CONTRACT.md: hex(hmac_sha256(secret, timestamp + "\\n" + nonce + "\\n" + body))."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_hex(16)
    mac = hmac.new(secret.encode(), f"{ts}\n{nonce}\n".encode() + body, hashlib.sha256)
    return {
        "Content-Type": "application/json",
        "X-Sandbox-Timestamp": ts,
        "X-Sandbox-Nonce": nonce,
        "X-Sandbox-Signature": mac.hexdigest(),
    }


def callback_body(order_no: str, status: str, amount: int, **extra: Any) -> bytes:
    failed = status == "FAILED"
    return json.dumps(
        {
            "order_no": order_no,
            "bank_ref": "SBXFORGED0001",
            "status": status,
            "amount": amount,
            "finished_at": None,
            "fail_code": "ACCOUNT_FROZEN" if failed else None,
            "fail_reason": "payee account is frozen" if failed else None,
            **extra,
        },
        separators=(",", ":"),
    ).encode()


async def post_callback(
    stack: Stack, funder_id: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as bank:
        return await bank.post(f"/v1/callbacks/{funder_id}", content=body, headers=headers)


async def sent_disbursement(api: Api) -> dict[str, Any]:
    """A disbursement bank-a has accepted but not yet settled."""
    body = await api.new_disbursement()
    assert (await api.post(body)).status_code == 201
    txn_no = body["txn_no"]
    return (await api.wait_until([txn_no], lambda r: r["status"] == "sent", 5, "sent"))[txn_no]


async def assert_unchanged(api: Api, before: dict[str, Any], vouchers: int) -> None:
    after = await api.resource(before["txn_no"])
    assert after == before
    assert len(await api.vouchers(before["txn_no"])) == vouchers


SECRET_A = bank_a().secret


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "forge",
    [
        lambda body: signed("not-the-bank-secret", body),
        lambda body: signed(SECRET_A, body, timestamp=int(time.time()) - 600),
        lambda body: signed(SECRET_A, body, timestamp=int(time.time()) + 600),
        lambda body: signed(SECRET_A, body.replace(b"FAILED", b"SUCCESS")),
        lambda body: {"Content-Type": "application/json"},
        lambda body: {**signed(SECRET_A, body), "X-Sandbox-Signature": "0" * 64},
    ],
    ids=[
        "wrong_secret",
        "ten_minutes_old",
        "ten_minutes_ahead",
        "body_tampered",
        "unsigned",
        "zero_signature",
    ],
)
async def test_forged_or_stale_callback_is_401_and_changes_nothing(
    api: Api, stack: Stack, forge: Any
) -> None:
    before = await sent_disbursement(api)
    vouchers = len(await api.vouchers(before["txn_no"]))
    order_no = before["attempts"][0]["order_no"]
    body = callback_body(order_no, "FAILED", before["amount"])

    resp = await post_callback(stack, "bank-a", body, forge(body))

    error_of(resp, 401)
    await assert_unchanged(api, before, vouchers)


@pytest.mark.asyncio
async def test_replayed_callback_is_401_and_changes_nothing(api: Api, stack: Stack) -> None:
    before = await sent_disbursement(api)
    order_no = before["attempts"][0]["order_no"]
    body = callback_body(order_no, "PROCESSING", before["amount"])
    headers = signed(SECRET_A, body)

    first = await post_callback(stack, "bank-a", body, headers)
    assert first.status_code == 200, first.text
    assert first.text == "SUCCESS"
    processing = await api.resource(before["txn_no"])
    assert processing["status"] == "processing"
    vouchers = len(await api.vouchers(before["txn_no"]))

    copy = await post_callback(stack, "bank-a", body, dict(headers))

    error_of(copy, 401)
    await assert_unchanged(api, processing, vouchers)
    # the bank's own callback still settles it, and money left once
    final = await api.wait_terminal([before["txn_no"]], timeout=SETTLE_MS / 1000 + 8)
    assert final[before["txn_no"]]["status"] == "succeeded"
    [paid] = await stack.banks["bank-a"].payouts_of(before["txn_no"])
    assert paid["executions"] == 1


@pytest.mark.asyncio
async def test_callback_reporting_another_amount_is_acknowledged_but_does_not_settle(
    api: Api, stack: Stack
) -> None:
    before = await sent_disbursement(api)
    vouchers = len(await api.vouchers(before["txn_no"]))
    order_no = before["attempts"][0]["order_no"]
    body = callback_body(order_no, "SUCCESS", before["amount"] + 1)

    resp = await post_callback(stack, "bank-a", body, signed(SECRET_A, body))

    assert resp.status_code == 200, resp.text
    await assert_unchanged(api, before, vouchers)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", ["SUCCESS", "FAILED", "PROCESSING"])
async def test_late_or_duplicate_callback_after_success_is_acknowledged_and_ignored(
    api: Api, stack: Stack, status: str
) -> None:
    body = await api.new_disbursement(funder_hint="bank-b")  # bank-b settles at once
    assert (await api.post(body)).status_code == 201
    done = (await api.wait_terminal([body["txn_no"]], timeout=10))[body["txn_no"]]
    assert done["status"] == "succeeded"
    await stack.receiver.wait_for(body["txn_no"], "succeeded")
    vouchers = len(await api.vouchers(body["txn_no"]))
    late = callback_body(done["attempts"][0]["order_no"], status, done["amount"])

    resp = await post_callback(stack, "bank-b", late, signed(bank_b().secret, late))

    assert resp.status_code == 200, resp.text
    assert resp.text == "SUCCESS"
    await assert_unchanged(api, done, vouchers)
    statuses = [e.body["status"] for e in stack.receiver.events(body["txn_no"])]
    assert set(statuses) == {"succeeded"}, statuses


@pytest.mark.asyncio
async def test_callback_for_an_unknown_order_is_404(stack: Stack) -> None:
    body = callback_body("NOSUCHORDER-01", "SUCCESS", 1_000_000)

    resp = await post_callback(stack, "bank-a", body, signed(SECRET_A, body))

    error_of(resp, 404)


@pytest.mark.asyncio
async def test_callback_for_another_funders_order_is_404_and_changes_nothing(
    api: Api, stack: Stack
) -> None:
    before = await sent_disbursement(api)
    vouchers = len(await api.vouchers(before["txn_no"]))
    body = callback_body(before["attempts"][0]["order_no"], "FAILED", before["amount"])

    resp = await post_callback(stack, "bank-b", body, signed(bank_b().secret, body))

    error_of(resp, 404)
    await assert_unchanged(api, before, vouchers)


@pytest.mark.asyncio
async def test_callback_for_an_unknown_funder_is_404_with_the_error_shape(stack: Stack) -> None:
    body = callback_body("NOSUCHORDER-01", "SUCCESS", 1_000_000)

    resp = await post_callback(stack, "bank-zz", body, signed(SECRET_A, body))

    error_of(resp, 404)
