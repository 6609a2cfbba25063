"""Re-routing after a definitive pre-execution rejection, and failing when nobody is left."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Api, Stack, bank_a, bank_b, run_stack

pytestmark = pytest.mark.e2e

REJECT_ALL = ("--reject-rate", "1")


@pytest.fixture
def stack(clean_db: str, tmp_path: Path) -> Iterator[Stack]:
    """bank-a (tried first) rejects every payout before executing it; bank-b is healthy."""
    with run_stack(
        tmp_path,
        clean_db,
        funders=[bank_a(bank_args=REJECT_ALL), bank_b()],
    ) as s:
        yield s


@pytest.mark.asyncio
async def test_pre_execution_rejection_fails_over_to_the_next_funder_and_pays_once(
    api: Api, stack: Stack
) -> None:
    amount = 1_000_000
    body = await api.new_disbursement(amount=amount)
    txn_no = body["txn_no"]
    created = await api.post(body)
    assert created.status_code == 201, created.text
    assert created.json()["funder_id"] == "bank-a"

    final = (await api.wait_terminal([txn_no], timeout=10))[txn_no]

    assert final["status"] == "succeeded"
    assert final["funder_id"] == "bank-b"
    assert final["mode"] == "co_lending"
    platform = math.ceil(amount * 3 / 10)
    assert final["allocation"] == {"funder": amount - platform, "platform": platform}
    first, second = final["attempts"]
    assert (first["n"], first["funder_id"], first["status"]) == (1, "bank-a", "failed")
    assert first["error"] is not None
    assert first["error"].get("pre_execution") is True, first["error"]
    assert (second["n"], second["funder_id"], second["status"]) == (2, "bank-b", "succeeded")
    assert first["order_no"] != second["order_no"]

    rejected = await stack.banks["bank-a"].payouts_of(txn_no)
    assert [p["executions"] for p in rejected] == [0], rejected
    [paid] = await stack.banks["bank-b"].payouts_of(txn_no)
    assert paid["order_no"] == second["order_no"]
    assert paid["executions"] == 1
    events = await stack.receiver.wait_for(txn_no, "succeeded")
    assert {e.body["status"] for e in events} == {"succeeded"}, "no webhook for the attempt"
    assert all(e.signature_valid for e in events)


@pytest.fixture
def everyone_rejects(clean_db: str, tmp_path: Path) -> Iterator[Stack]:
    with run_stack(
        tmp_path,
        clean_db,
        funders=[bank_a(bank_args=REJECT_ALL), bank_b(bank_args=REJECT_ALL)],
    ) as s:
        yield s


@pytest.mark.asyncio
async def test_disbursement_fails_with_limits_released_when_every_funder_rejects(
    everyone_rejects: Stack,
) -> None:
    stack = everyone_rejects
    async with stack.api() as api:
        body = await api.new_disbursement()
        assert (await api.post(body)).status_code == 201
        txn_no = body["txn_no"]

        final = (await api.wait_terminal([txn_no], timeout=10))[txn_no]

        assert final["status"] == "failed"
        assert final["failure"] is not None
        assert [(a["funder_id"], a["status"]) for a in final["attempts"]] == [
            ("bank-a", "failed"),
            ("bank-b", "failed"),
        ]
        funders = await api.funders()
        assert funders["platform"]["used_today"] == 0
        assert all(f["used_today"] == 0 for f in funders["items"]), funders["items"]
        [bank_b_funder] = [f for f in funders["items"] if f["id"] == "bank-b"]
        assert bank_b_funder["prefund_balance"] == bank_b().prefund_balance
    for bank in stack.banks.values():
        assert all(p["executions"] == 0 for p in await bank.payouts_of(txn_no))
    events = await stack.receiver.wait_for(txn_no, "failed")
    assert all(e.signature_valid for e in events)
