"""Stopping a gateway hands unfinished work back at once instead of leaving it to the lease."""

from __future__ import annotations

import asyncio

import pytest

from connectors.base import PayoutOrder, PayoutResult
from tests.fakes import FakeBank
from tests.integration.conftest import StartGateway, eventually

pytestmark = pytest.mark.integration


class HangingBank(FakeBank):
    """A bank that never answers a payout (until cancelled)."""

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


@pytest.mark.asyncio
async def test_sigterm_hands_a_hanging_bank_call_back_for_the_next_process(
    start_gateway: StartGateway,
) -> None:
    banks = {"bank-a": HangingBank("bank-a"), "bank-b": FakeBank("bank-b")}
    h = await start_gateway(banks=banks, dispatch={"drain_seconds": 0.2, "lease_seconds": 600})
    await h.register()
    await h.accepted("SHUT-1")

    async def claimed() -> bool:
        rows = await h.outbox("dispatch")
        return bool(rows) and rows[0]["leased_until"] is not None

    await eventually(claimed, "the dispatcher to claim the payout")
    await h.client.close()  # the app's shutdown: workers drain, then release

    rows = await h.outbox("dispatch")
    assert len(rows) == 1
    assert rows[0]["leased_until"] is None  # free for the next process now, not in 10 minutes
    assert rows[0]["tries"] == 1  # the try still counts: that call may have reached the bank
