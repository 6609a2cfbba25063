"""A bank that executes but never answers: the attempt is `unknown`, never re-routed, and is
resolved by asking the bank (its callbacks are lost too, so only a query can settle it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.harness import Api, Stack, bank_a, bank_b, run_stack

pytestmark = pytest.mark.e2e

HANG = ("--timeout-rate", "1", "--callback-loss-rate", "1")
BANK_TIMEOUT_SECONDS = 1


@pytest.fixture(scope="module")
def stack(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """bank-a hangs and its connector gives up after 1 s (`connector_options.timeout_seconds`);
    bank-b is healthy and must never see bank-a's orders."""
    with run_stack(
        tmp_path_factory.mktemp("timeout"),
        module_db,
        funders=[
            bank_a(bank_args=HANG, connector_options={"timeout_seconds": BANK_TIMEOUT_SECONDS}),
            bank_b(),
        ],
        # a first query 1 s after the timeout keeps `unknown` visible long enough to see it
        dispatch={"query_backoff_seconds": [1, 1, 2]},
    ) as s:
        yield s


def _kinds(vouchers: list[dict[str, Any]]) -> list[str]:
    return [str(v.get("kind") or v.get("event")) for v in vouchers]


def _unknown(resource: dict[str, Any]) -> bool:
    return resource["status"] == "unknown" and resource["attempts"][-1]["status"] == "unknown"


@pytest.mark.asyncio
async def test_timed_out_payout_goes_unknown_and_is_resolved_by_query_never_failed_over(
    api: Api, stack: Stack
) -> None:
    body = await api.new_disbursement()
    txn_no = body["txn_no"]
    assert (await api.post(body)).status_code == 201

    unknown = (await api.wait_until([txn_no], _unknown, 6, "unknown"))[txn_no]
    assert [a["funder_id"] for a in unknown["attempts"]] == ["bank-a"]
    final = (await api.wait_terminal([txn_no], timeout=10))[txn_no]

    assert final["status"] == "succeeded"
    assert final["funder_id"] == "bank-a"
    [attempt] = final["attempts"]
    assert attempt["status"] == "succeeded"
    kinds = _kinds(await api.vouchers(txn_no))
    assert "disbursement.unknown" in kinds, kinds
    assert kinds.index("disbursement.unknown") < kinds.index("disbursement.succeeded"), kinds
    [paid] = await stack.banks["bank-a"].payouts_of(txn_no)
    assert paid["executions"] == 1
    assert await stack.banks["bank-b"].payouts_of(txn_no) == []
    await stack.receiver.wait_for(txn_no, "succeeded")
