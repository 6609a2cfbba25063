"""iso20022 batching: several orders in one pain.001, one outcome per order from the pain.002,
a whole-message failure for every order it carried, and the sandbox bank answering per
transaction without ever executing an order twice."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from config.models import Funder
from connectors.base import (
    BankStatus,
    BatchingConnector,
    PayoutOrder,
    PayoutOutcome,
    PayoutResult,
    max_batch,
)
from connectors.errors import OutcomeUnknown, Rejected
from connectors.iso20022 import sandbox as iso_bank
from connectors.iso20022 import wire
from connectors.iso20022.connector import IsoConnector
from connectors.sandbox.connector import SandboxConnector
from tests.connectors.conformance import closed_port_url, order, serve

SECRET = "iso-batch-secret"
NOW = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


def funder(base_url: str = "http://bank.test", **changes: Any) -> Funder:
    return Funder(
        id="bank-i",
        name="ISO Bank",
        license="bank",
        mode="direct",
        priority=1,
        products=["consumer-standard"],
        single_max=20_000_000,
        daily_limit=5_000_000_000,
        connector="iso20022",
        connector_options={
            "base_url": base_url,
            "secret": SECRET,
            "debtor_name": "Fundgate Platform",
            "debtor_account": "110000000001",
            "debtor_agent_bic": "ICBKCNBJ",
            "batch_size": 10,
            **changes,
        },
    )


def signed(body: bytes, status: int = 200) -> httpx.Response:
    headers = wire.signed_headers(SECRET, body, timestamp=str(int(time.time())), nonce="n1")
    return httpx.Response(status, content=body, headers=headers)


def report(*statuses: tuple[str, str, str | None]) -> bytes:
    """A pain.002 with (order_no, TxSts, reason) per transaction."""
    return wire.pain002(
        msg_id="R1",
        original_msg_id="B1",
        statuses=[
            wire.TxStatus(no, code, reason, f"ISO-{no}", None) for no, code, reason in statuses
        ],
        created=NOW,
    )


class Recorded:
    """A MockTransport bank: answers with `answer()` and keeps every pain.001 it received."""

    def __init__(self, answer: Callable[[], httpx.Response]) -> None:
        self.answer = answer
        self.uploads: list[list[str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        _msg_id, txs = wire.read_pain001(request.content)
        self.uploads.append([t.order_no for t in txs])
        return self.answer()


async def batch_with(
    bank: Recorded, orders: list[PayoutOrder], **options: Any
) -> list[PayoutOutcome]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(bank)) as c:
        return await IsoConnector(funder(**options), c).disburse_batch(orders)


def kinds(outcomes: list[PayoutOutcome]) -> list[str]:
    return [type(o).__name__ for o in outcomes]


# --- the capability --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_batch_size_is_the_connectors_max_batch_and_defaults_to_one() -> None:
    async with httpx.AsyncClient() as c:
        batching = IsoConnector(funder(), c)
        assert isinstance(batching, BatchingConnector)
        assert max_batch(batching) == 10
        assert max_batch(IsoConnector(funder(batch_size=1), c)) == 1
        opts = dict(funder().connector_options)
        del opts["batch_size"]
        assert wire.parse_options(opts).batch_size == 1
        sandbox = Funder.model_validate(
            {**funder().model_dump(), "connector": "sandbox",
             "connector_options": {"base_url": "http://x.test", "secret": "s"}}
        )  # fmt: skip
        assert max_batch(SandboxConnector(sandbox, c)) == 1


@pytest.mark.parametrize("size", [0, wire.MAX_BATCH_SIZE + 1, "many"])
def test_batch_size_out_of_range_is_an_option_error(size: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        wire.parse_options({**funder().connector_options, "batch_size": size})


# --- one outcome per order from the pain.002 -------------------------------------------------


@pytest.mark.asyncio
async def test_each_order_of_a_batch_gets_its_own_outcome_from_the_transaction_status() -> None:
    orders = [order(n) for n in range(1, 7)]
    bank = Recorded(
        lambda: signed(
            report(
                ("CF1-1", "ACTC", None),
                ("CF2-1", "RJCT", "AC04"),  # refused before execution: fail-over allowed
                ("CF3-1", "RJCT", "FOCR"),  # terminal refusal
                ("CF4-1", "RJCT", "DUPL"),  # repeats an order that may have executed
                ("CF5-1", "WHAT", None),  # a status code never seen before
                # CF6-1 is missing from the report
                ("OTHER-1", "ACSC", None),  # not ours: ignored
            )
        )
    )
    outcomes = await batch_with(bank, orders)
    assert bank.uploads == [[o.order_no for o in orders]]  # one pain.001 for all six
    accepted, early, late, dupl, odd, missing = outcomes
    assert isinstance(accepted, PayoutResult)
    assert (accepted.order_no, accepted.bank_ref) == ("CF1-1", "ISO-CF1-1")
    assert isinstance(early, Rejected)
    assert (early.code, early.pre_execution) == ("AC04", True)
    assert isinstance(late, Rejected)
    assert (late.code, late.pre_execution) == ("FOCR", False)
    assert isinstance(dupl, OutcomeUnknown)
    assert dupl.code == "duplicate"
    assert isinstance(odd, OutcomeUnknown)
    assert odd.code == "unknown_status"
    assert isinstance(missing, OutcomeUnknown)
    assert missing.code == "malformed"


@pytest.mark.asyncio
async def test_an_order_reported_twice_is_an_unknown_outcome_and_the_others_stand() -> None:
    bank = Recorded(
        lambda: signed(
            report(("CF1-1", "ACTC", None), ("CF2-1", "ACTC", None), ("CF2-1", "RJCT", "AC04"))
        )
    )
    first, second = await batch_with(bank, [order(1), order(2)])
    assert isinstance(first, PayoutResult)
    assert isinstance(second, OutcomeUnknown)


@pytest.mark.asyncio
async def test_acceptances_in_a_422_answer_are_not_trusted_but_its_rejections_are() -> None:
    bank = Recorded(lambda: signed(report(("CF1-1", "ACTC", None), ("CF2-1", "RJCT", "AC01")), 422))
    first, second = await batch_with(bank, [order(1), order(2)])
    assert isinstance(first, OutcomeUnknown)
    assert isinstance(second, Rejected)
    assert second.pre_execution


# --- a failure of the whole message is every order's outcome ---------------------------------


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<Document>&lol2;</Document>"""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "kind", "code"),
    [
        (lambda: signed(report(("CF1-1", "ACTC", None))[:-40]), OutcomeUnknown, "malformed"),
        (lambda: signed(BOMB), OutcomeUnknown, "malformed"),
        (lambda: signed(b"<html>busy</html>"), OutcomeUnknown, "malformed"),
        (lambda: httpx.Response(200, content=report()), OutcomeUnknown, "bad_signature"),
        (lambda: httpx.Response(502, text="<html>bad gateway</html>"), OutcomeUnknown,
         "server_error"),
        (lambda: httpx.Response(409), OutcomeUnknown, "order_conflict"),
        (lambda: httpx.Response(418), OutcomeUnknown, "unexpected_status"),
        (lambda: httpx.Response(401), Rejected, "http_401"),
    ],
)  # fmt: skip
async def test_a_message_level_answer_applies_to_every_order_of_the_batch(
    answer: Callable[[], httpx.Response], kind: type[Exception], code: str
) -> None:
    outcomes = await batch_with(Recorded(answer), [order(1), order(2), order(3)])
    assert [type(o) for o in outcomes] == [kind] * 3
    assert all(getattr(o, "code", None) == code for o in outcomes)


@pytest.mark.asyncio
async def test_a_batch_that_cannot_reach_the_bank_is_not_sent_for_every_order() -> None:
    async with httpx.AsyncClient() as c:
        connector = IsoConnector(funder(closed_port_url()), c)
        outcomes = await connector.disburse_batch([order(1), order(2)])
    assert kinds(outcomes) == ["NotSent", "NotSent"]


@pytest.mark.asyncio
async def test_a_batch_timing_out_is_an_unknown_outcome_for_every_order() -> None:
    def hang(_request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer")

    async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as c:
        outcomes = await IsoConnector(funder(), c).disburse_batch([order(1), order(2)])
    assert kinds(outcomes) == ["OutcomeUnknown", "OutcomeUnknown"]


@pytest.mark.asyncio
async def test_an_order_failing_the_xsd_is_refused_alone_and_the_others_are_sent() -> None:
    bad = dataclasses.replace(order(2), account_name="")  # Nm must not be empty
    too_long = dataclasses.replace(order(4), order_no="X" * 36)  # EndToEndId is Max35Text
    bank = Recorded(lambda: signed(report(("CF1-1", "ACTC", None), ("CF3-1", "ACTC", None))))
    outcomes = await batch_with(bank, [order(1), bad, order(3), too_long])
    assert bank.uploads == [["CF1-1", "CF3-1"]]
    assert kinds(outcomes) == ["PayoutResult", "Rejected", "PayoutResult", "Rejected"]
    for refused in (outcomes[1], outcomes[3]):
        assert isinstance(refused, Rejected)
        assert (refused.code, refused.pre_execution) == ("invalid_pain001", True)


@pytest.mark.asyncio
async def test_disburse_of_one_order_raises_what_the_batch_would_return() -> None:
    transport = httpx.MockTransport(lambda _r: signed(report(("CF1-1", "RJCT", "DUPL"))))
    async with httpx.AsyncClient(transport=transport) as c:
        with pytest.raises(OutcomeUnknown) as caught:
            await IsoConnector(funder(), c).disburse(order(1))
    assert caught.value.code == "duplicate"


# --- against the sandbox bank ----------------------------------------------------------------


async def start_bank(**faults: Any) -> tuple[iso_bank.IsoBank, Any, str]:
    app = iso_bank.create_bank_app(
        iso_bank.IsoBankOptions(secret=SECRET, seed=3, settle_ms=5, callback_attempts=1, **faults)
    )
    runner, url = await serve(app)
    return app[iso_bank.BANK], runner, url


@pytest.mark.asyncio
async def test_the_sandbox_bank_takes_a_batch_in_one_message_and_executes_each_order_once(
    client: httpx.AsyncClient,
) -> None:
    bank, runner, url = await start_bank()
    try:
        connector = IsoConnector(funder(url), client)
        orders = [order(n) for n in range(1, 5)]
        first = await connector.disburse_batch(orders)
        assert kinds(first) == ["PayoutResult"] * 4
        refs = [o.bank_ref for o in first if isinstance(o, PayoutResult)]
        assert len(set(refs)) == 4
        assert [ids for _, ids in bank.messages] == [[o.order_no for o in orders]]

        # the same orders again, regrouped with a new one: answered, never executed twice
        again = await connector.disburse_batch([orders[2], order(5), orders[0]])
        assert kinds(again) == ["PayoutResult"] * 3
        assert [o.bank_ref for o in again if isinstance(o, PayoutResult)][::2] == [
            refs[2],
            refs[0],
        ]
        for n in range(1, 6):
            assert (await connector.query(order(n).order_no)).order_no == order(n).order_no
        oracle = (await client.get(url + "/_sandbox/payouts")).json()
        assert sorted(o["order_no"] for o in oracle) == [f"CF{n}-1" for n in range(1, 6)]
        assert all(o["executions"] <= 1 for o in oracle)
        assert {o["msg_id"] for o in oracle if o["order_no"] != "CF5-1"} == {bank.messages[0][0]}
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_the_sandbox_bank_refuses_a_batch_reusing_an_order_number_and_executes_none(
    client: httpx.AsyncClient,
) -> None:
    bank, runner, url = await start_bank()
    try:
        connector = IsoConnector(funder(url), client)
        assert kinds(await connector.disburse_batch([order(1)])) == ["PayoutResult"]
        changed = dataclasses.replace(order(1), amount=order(1).amount + 1)
        outcomes = await connector.disburse_batch([order(2), changed])
        assert kinds(outcomes) == ["OutcomeUnknown", "OutcomeUnknown"]
        assert set(bank.orders) == {"CF1-1"}  # CF2-1 was not taken either
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_a_500_from_the_sandbox_bank_executes_nothing_of_the_batch(
    client: httpx.AsyncClient,
) -> None:
    bank, runner, url = await start_bank(error_rate=1.0)
    try:
        outcomes = await IsoConnector(funder(url), client).disburse_batch([order(1), order(2)])
        assert kinds(outcomes) == ["OutcomeUnknown", "OutcomeUnknown"]
        assert bank.orders == {}
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_the_sandbox_bank_answers_a_refused_order_per_transaction(
    client: httpx.AsyncClient,
) -> None:
    bank, runner, url = await start_bank(reject_rate=1.0)
    try:
        outcomes = await IsoConnector(funder(url), client).disburse_batch([order(1), order(2)])
        assert all(isinstance(o, Rejected) and o.pre_execution for o in outcomes)
        assert all(o.executions == 0 for o in bank.orders.values())
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_a_batch_the_bank_never_answers_is_unknown_for_every_order_and_runs_once() -> None:
    bank, runner, url = await start_bank(timeout_rate=1.0)
    try:
        async with httpx.AsyncClient() as c:
            connector = IsoConnector(funder(url, timeout_seconds=0.3), c)
            outcomes = await connector.disburse_batch([order(1), order(2)])
            assert kinds(outcomes) == ["OutcomeUnknown", "OutcomeUnknown"]
            for n in (1, 2):
                await _settled(connector, order(n).order_no)
        assert [o.executions for o in bank.orders.values()] == [1, 1]
    finally:
        await runner.cleanup()


async def _settled(connector: IsoConnector, order_no: str) -> None:
    deadline = time.monotonic() + 5
    while (await connector.query(order_no)).status is not BankStatus.SUCCEEDED:
        assert time.monotonic() < deadline, f"{order_no} never settled"
        await asyncio.sleep(0.02)
