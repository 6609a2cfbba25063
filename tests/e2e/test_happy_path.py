"""The straight path through real processes: intake → bank → callback → webhook, idempotency."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from gateway.store.embedded import POSTGRES_BIN_PATH
from tests.e2e.harness import (
    PAYEE,
    PAYEE_MASKED,
    ROOT,
    Api,
    Stack,
    error_of,
    fundgate_command,
    run_stack,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(tmp_path_factory.mktemp("happy"), module_db) as s:
        yield s


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and int(value, 16) >= 0


def _is_timestamp(value: str) -> bool:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


@pytest.mark.asyncio
async def test_disbursement_is_paid_once_by_the_first_funder_and_reported(
    api: Api, stack: Stack
) -> None:
    body = await api.new_disbursement(amount=1_000_000)
    txn_no = body["txn_no"]

    resp = await api.post(body)

    assert resp.status_code == 201, resp.text
    assert "Idempotent-Replay" not in resp.headers
    first = resp.json()
    assert first["txn_no"] == txn_no
    assert first["status"] in ("accepted", "sent", "processing", "succeeded")
    assert first["funder_id"] == "bank-a"
    assert first["mode"] == "direct"
    assert first["allocation"] == {"funder": 1_000_000, "platform": 0}
    assert first["amount"] == 1_000_000
    assert first["currency"] == "CNY"
    assert first["payee"] == PAYEE_MASKED
    assert first["failure"] is None
    assert _is_timestamp(first["created_at"])
    assert _is_timestamp(first["updated_at"])
    [attempt] = first["attempts"]
    assert attempt["n"] == 1
    assert attempt["funder_id"] == "bank-a"
    assert attempt["order_no"]

    final = (await api.wait_terminal([txn_no], timeout=10))[txn_no]

    assert final["status"] == "succeeded"
    assert final["failure"] is None
    assert final["payee"] == PAYEE_MASKED
    assert final["allocation"] == {"funder": 1_000_000, "platform": 0}
    [done] = final["attempts"]
    assert done["order_no"] == attempt["order_no"]
    assert done["status"] == "succeeded"
    assert done["bank_ref"]
    assert done["error"] is None

    oracle = await stack.banks["bank-a"].payouts()
    paid = oracle[attempt["order_no"]]
    assert paid["executions"] == 1
    assert paid["amount"] == 1_000_000
    assert paid["account_no"] == "6222020200112233445"
    assert await stack.banks["bank-b"].payouts_of(txn_no) == []

    events = await stack.receiver.wait_for(txn_no, "succeeded")
    assert all(e.signature_valid for e in events), "every webhook carries a valid signature"
    succeeded = next(e for e in events if e.body["status"] == "succeeded")
    assert abs(int(succeeded.timestamp) - time.time()) < 300
    assert succeeded.body["txn_no"] == txn_no
    assert succeeded.body["attempts"][0]["order_no"] == attempt["order_no"]
    assert succeeded.body["payee"] == PAYEE_MASKED


@pytest.mark.asyncio
async def test_co_lending_disbursement_routed_by_hint_allocates_the_platform_share_rounded_up(
    api: Api, stack: Stack
) -> None:
    amount = 1_000_001  # 30 % of it is 300000.3 fen: the platform's share rounds up
    body = await api.new_disbursement(amount=amount, funder_hint="bank-b")
    prefund_before = await _prefund(api, "bank-b")

    resp = await api.post(body)

    assert resp.status_code == 201, resp.text
    first = resp.json()
    platform = math.ceil(amount * 3 / 10)
    assert platform == 300_001
    assert first["funder_id"] == "bank-b"
    assert first["mode"] == "co_lending"
    assert first["allocation"] == {"funder": amount - platform, "platform": platform}

    final = (await api.wait_terminal([body["txn_no"]], timeout=10))[body["txn_no"]]
    assert final["status"] == "succeeded"
    assert final["allocation"] == {"funder": amount - platform, "platform": platform}
    [attempt] = final["attempts"]
    assert attempt["funder_id"] == "bank-b"
    [paid] = await stack.banks["bank-b"].payouts_of(body["txn_no"])
    assert paid["executions"] == 1
    assert paid["amount"] == amount
    assert await stack.banks["bank-a"].payouts_of(body["txn_no"]) == []
    events = await stack.receiver.wait_for(body["txn_no"], "succeeded")
    assert all(e.signature_valid for e in events)
    # the platform's share was paid out of its prefunded account at bank-b
    assert await _prefund(api, "bank-b") == prefund_before - platform


async def _prefund(api: Api, funder_id: str) -> int:
    funders = {f["id"]: f for f in (await api.funders())["items"]}
    balance: int = funders[funder_id]["prefund_balance"]
    return balance


@pytest.mark.asyncio
async def test_outcome_webhook_is_retried_until_the_lending_core_answers_2xx(
    api: Api, stack: Stack
) -> None:
    refused_before = stack.receiver.refused
    stack.receiver.fail_next(4)
    body = await api.new_disbursement()
    assert (await api.post(body)).status_code == 201

    events = await stack.receiver.wait_for(body["txn_no"], "succeeded", timeout=15)

    assert stack.receiver.refused - refused_before == 4
    assert all(e.signature_valid for e in events)


@pytest.mark.asyncio
async def test_same_txn_no_and_payload_replays_the_first_answer(api: Api, stack: Stack) -> None:
    body = await api.new_disbursement()
    created = await api.post(body)
    assert created.status_code == 201, created.text
    await api.wait_terminal([body["txn_no"]], timeout=10)

    # same payload, other key order and spacing: still the same request
    reordered = dict(reversed(list(body.items())))
    replays = [await api.post(body), await api.post(reordered)]

    for replay in replays:
        assert replay.status_code == 200, replay.text
        assert replay.headers.get("Idempotent-Replay") == "true"
        assert replay.json() == created.json()
    [paid] = await stack.banks["bank-a"].payouts_of(body["txn_no"])
    assert paid["executions"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "change",
    [
        {"amount": 1_000_100},
        {"payee": {**PAYEE, "account_no": "6222020200112233446"}},
        {"term": {"unit": "month", "count": 6}},
        {"metadata": {"channel": "other"}},
    ],
    ids=["amount", "payee", "term", "metadata"],
)
async def test_same_txn_no_with_a_different_payload_is_a_conflict(
    api: Api, change: dict[str, object]
) -> None:
    body = await api.new_disbursement()
    created = await api.post(body)
    assert created.status_code == 201, created.text

    conflict = await api.post({**body, **change})

    error_of(conflict, 409, "txn_no_conflict")
    current = await api.resource(body["txn_no"])
    assert current["amount"] == body["amount"]
    assert len(current["attempts"]) == 1


@pytest.mark.asyncio
async def test_fifty_concurrent_posts_of_one_txn_no_create_one_disbursement_paid_once(
    api: Api, stack: Stack
) -> None:
    body = await api.new_disbursement()

    answers = await asyncio.gather(*(api.post(body) for _ in range(50)))

    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(201) == 1, statuses
    assert statuses.count(200) == 49, statuses
    created = next(r for r in answers if r.status_code == 201).json()
    for r in answers:
        assert r.json() == created
        if r.status_code == 200:
            assert r.headers.get("Idempotent-Replay") == "true"
    final = (await api.wait_terminal([body["txn_no"]], timeout=10))[body["txn_no"]]
    assert final["status"] == "succeeded"
    assert len(final["attempts"]) == 1
    orders = await stack.banks["bank-a"].payouts_of(body["txn_no"])
    assert [o["executions"] for o in orders] == [1]
    assert await stack.banks["bank-b"].payouts_of(body["txn_no"]) == []


async def _sealed_vouchers(api: Api, txn_no: str, timeout: float = 5) -> list[dict[str, Any]]:
    """The disbursement's vouchers once every one is sealed into the chain (seq and hash)."""
    deadline = time.monotonic() + timeout
    while True:
        vouchers = await api.vouchers(txn_no)
        if vouchers and all(v["seq"] is not None and v["hash"] for v in vouchers):
            return vouchers
        assert time.monotonic() < deadline, f"vouchers not sealed in {timeout} s: {vouchers}"
        await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_every_state_change_leaves_a_voucher_sealed_into_the_verified_chain(
    api: Api, stack: Stack
) -> None:
    body = await api.new_disbursement()
    assert (await api.post(body)).status_code == 201
    await api.wait_terminal([body["txn_no"]], timeout=10)

    vouchers = await _sealed_vouchers(api, body["txn_no"])

    kinds = [str(v.get("kind") or v.get("event")) for v in vouchers]
    assert any("accepted" in k for k in kinds), kinds
    assert any("succeeded" in k for k in kinds), kinds
    seqs = [v["seq"] for v in vouchers]
    assert all(isinstance(s, int) for s in seqs), vouchers
    assert seqs == sorted(set(seqs)), seqs
    for v in vouchers:
        assert _is_sha256(v["hash"]), v
        assert v["seq"] == 1 or _is_sha256(v["prev_hash"]), v
        assert _is_timestamp(v["at"])
    verify = await asyncio.to_thread(
        subprocess.run,
        [*fundgate_command(), "audit", "verify"],
        env=stack.gateway.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.asyncio
async def test_no_plaintext_account_number_or_name_in_the_gateway_logs_or_the_database(
    api: Api, stack: Stack
) -> None:
    body = await api.new_disbursement()
    assert (await api.post(body)).status_code == 201
    await api.wait_terminal([body["txn_no"]], timeout=10)
    logs = stack.gateway.log_path.read_text(encoding="utf-8", errors="replace")
    assert body["txn_no"] in logs  # the run is in the log...
    assert PAYEE["account_no"] not in logs  # ...the payee's account number is not
    assert PAYEE["account_name"] not in logs
    dump = await asyncio.to_thread(
        subprocess.run,
        [str(POSTGRES_BIN_PATH / "pg_dump"), "--data-only", stack.database_url],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert body["txn_no"] in dump.stdout
    assert PAYEE["account_no"] not in dump.stdout
    assert PAYEE["account_name"] not in dump.stdout
