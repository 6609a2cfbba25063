"""The half-open circuit's one probe is given back whatever happens to the payout it was
given to: a payout that cannot even be built must not hold the funder's circuit shut."""

from __future__ import annotations

import asyncio

import pytest

from gateway.crypto import CryptoError
from gateway.dispatcher import Dispatcher
from tests.integration.conftest import StartGateway

pytestmark = pytest.mark.integration

COOLDOWN_SECONDS = 0.2


@pytest.mark.asyncio
async def test_a_payout_that_cannot_be_built_does_not_keep_the_circuit_half_open(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(
        role="api",  # no dispatcher of its own: the test drives one
        dispatch={"circuit_failure_threshold": 1, "circuit_cooldown_seconds": COOLDOWN_SECONDS},
    )
    await h.register()
    bad = await h.accepted("T-PROBE-BAD")
    good = await h.accepted("T-PROBE-GOOD")
    assert bad["funder_id"] == good["funder_id"] == "bank-a"
    # the payee of one payout no longer opens (say, its key was dropped from the config)
    async with h.pool.acquire() as conn:
        await conn.execute(
            "UPDATE disbursements SET payee_account_no_enc ="
            " overlay(payee_account_no_enc placing '\\xff'::bytea"
            " from length(payee_account_no_enc)) WHERE txn_no = $1",
            "T-PROBE-BAD",
        )
    breaker = h.svc.breakers["bank-a"]
    breaker.record("not_sent")  # the circuit opens ...
    assert breaker.state == "open"
    await asyncio.sleep(COOLDOWN_SECONDS + 0.1)  # ... and its cool-down is over

    dispatcher = Dispatcher(h.svc)
    async with h.pool.acquire() as conn:
        rows = await dispatcher.claim(conn, 10)
    by_txn = {}
    async with h.pool.acquire() as conn:
        for row in rows:
            by_txn[
                await conn.fetchval(
                    "SELECT d.txn_no FROM attempts a JOIN disbursements d"
                    " ON d.id = a.disbursement_id WHERE a.id = $1",
                    row["ref_id"],
                )
            ] = row
    with pytest.raises(CryptoError):
        await dispatcher.handle(by_txn["T-PROBE-BAD"])
    await dispatcher.handle(by_txn["T-PROBE-GOOD"])

    order_no = good["attempts"][0]["order_no"]
    assert len(h.banks["bank-a"].calls_for(order_no)) == 1  # the probe went out
    assert breaker.state == "closed"
    d = await h.get("T-PROBE-GOOD")
    assert d["attempts"][0]["status"] == "sent"
