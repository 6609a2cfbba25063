"""Stopping the gateway mid-flight, gracefully or by a crash, loses nothing and pays nothing twice.

The banks answer slowly (300 ms) and settle 500 ms later, so when the gateway goes down
payout calls are in flight and callbacks are on their way; the banks retry their callbacks
while it is down, and the restarted gateway queries whatever it no longer knows about.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.harness import Api, Stack, bank_a, bank_b, run_stack

pytestmark = pytest.mark.e2e

SLOW = ("--latency-ms", "300", "--settle-ms", "500")
COUNT = 30


@pytest.fixture(scope="module")
def stack(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(
        tmp_path_factory.mktemp("restart"),
        module_db,
        funders=[bank_a(bank_args=SLOW), bank_b(bank_args=SLOW)],
    ) as s:
        yield s


async def _submit(api: Api, count: int) -> list[str]:
    bodies = [await api.new_disbursement() for _ in range(count)]
    answers = await asyncio.gather(*(api.post(b) for b in bodies))
    assert [r.status_code for r in answers] == [201] * count, [r.text for r in answers]
    return [b["txn_no"] for b in bodies]


async def _assert_each_paid_at_most_once(stack: Stack, final: dict[str, dict[str, Any]]) -> None:
    oracle = {fid: await bank.payouts() for fid, bank in stack.banks.items()}
    for txn_no, res in final.items():
        executions = sum(
            p["executions"]
            for orders in oracle.values()
            for order_no, p in orders.items()
            if order_no.startswith(f"{txn_no}-")
        )
        assert executions <= 1, (txn_no, executions)
        if res["status"] == "succeeded":
            last = res["attempts"][-1]
            assert oracle[last["funder_id"]][last["order_no"]]["executions"] == 1, res


async def _banks_have_orders(stack: Stack, txn_nos: list[str], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while True:
        orders = [o for bank in stack.banks.values() for o in await bank.payouts()]
        if any(o.startswith(f"{t}-") for o in orders for t in txn_nos):
            return
        assert time.monotonic() < deadline, "no payout reached a bank"
        await asyncio.sleep(0.02)


def _restart(stack: Stack) -> None:
    stack.gateway.start()
    stack.gateway.wait_ready()


@pytest.mark.asyncio
async def test_sigterm_mid_flight_then_restart_finishes_every_disbursement_paid_at_most_once(
    api: Api, stack: Stack
) -> None:
    txn_nos = await _submit(api, COUNT)

    started = time.monotonic()
    rc = await asyncio.to_thread(stack.gateway.stop)
    stopped_in = time.monotonic() - started
    assert rc == 0, f"graceful stop exit code {rc}"
    assert stopped_in < 15, f"took {stopped_in:.1f} s to stop"
    await asyncio.to_thread(_restart, stack)

    final = await api.wait_terminal(txn_nos, timeout=30)

    assert {r["status"] for r in final.values()} == {"succeeded"}, final
    await _assert_each_paid_at_most_once(stack, final)
    for txn_no in txn_nos:
        await stack.receiver.wait_for(txn_no, "succeeded")


@pytest.mark.asyncio
async def test_crash_mid_flight_then_restart_finishes_every_disbursement_paid_at_most_once(
    api: Api, stack: Stack
) -> None:
    txn_nos = await _submit(api, COUNT)
    await _banks_have_orders(stack, txn_nos)  # payout calls are in flight now

    await asyncio.to_thread(stack.gateway.kill)
    await asyncio.to_thread(_restart, stack)

    # claimed work returns after its lease (5 s here) and is re-sent under the same order_no
    final = await api.wait_terminal(txn_nos, timeout=30)

    assert {r["status"] for r in final.values()} == {"succeeded"}, final
    await _assert_each_paid_at_most_once(stack, final)
