"""Every registered connector, against its own sandbox bank: the conformance suite."""

from __future__ import annotations

import asyncio
import importlib
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from datetime import date
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

import httpx
import pytest

from config.loader import CONNECTOR_GROUP
from config.models import Funder
from connectors.base import BankConnector, BankStatus
from connectors.errors import CallbackRejected, ConnectorError, NotSent, OutcomeUnknown, Rejected
from connectors.template.connector import TemplateConnector
from tests.connectors.conformance import (
    SHORT_TIMEOUT_SECONDS,
    CallbackInbox,
    Faults,
    Harness,
    bank_day,
    closed_port_url,
    connected,
    each,
    eventually,
    now,
    order,
)

STATEMENT_LINES = 100_000
CHUNK_BYTES = 64 * 1024


def skewed_clock(seconds: float) -> Callable[[], float]:
    return lambda: time.time() + seconds


# --- structure -------------------------------------------------------------------------------


@each
def test_folder_has_connector_and_wire_modules(harness: Harness) -> None:
    spec = find_spec(harness.package)
    assert spec is not None
    assert spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    assert (folder / "connector.py").is_file()
    assert (folder / "wire.py").is_file()
    importlib.import_module(f"{harness.package}.wire")


@each
def test_entry_point_resolves_to_the_connector_class(harness: Harness) -> None:
    eps = {ep.name: ep for ep in entry_points(group=CONNECTOR_GROUP)}
    assert harness.name in eps
    assert eps[harness.name].load() is harness.connector_class


@each
@pytest.mark.asyncio
async def test_connector_satisfies_the_protocol(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    connector = harness.build(harness.funder("http://127.0.0.1:9"), client, now)
    assert isinstance(connector, BankConnector)
    assert connector.name == harness.name
    await connector.aclose()


# --- round trip ------------------------------------------------------------------------------


@each
@pytest.mark.asyncio
async def test_disburse_callback_query_statement_round_trip(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client) as (bank, connector):
        async with CallbackInbox() as inbox:
            o = order(1, inbox.url)
            accepted = await connector.disburse(o)
            assert accepted.order_no == o.order_no
            assert accepted.status in (
                BankStatus.ACCEPTED,
                BankStatus.PROCESSING,
                BankStatus.SUCCEEDED,
            )
            headers, body = await inbox.next()
            event = connector.parse_callback(headers, body)
            assert (event.order_no, event.status) == (o.order_no, BankStatus.SUCCEEDED)
            assert event.amount == o.amount
            assert connector.callback_ack(True).status == 200
            assert connector.callback_ack(False).status != 200

            queried = await connector.query(o.order_no)
            assert (queried.status, queried.amount) == (BankStatus.SUCCEEDED, o.amount)
            assert (await connector.query("CF-never-1")).status is BankStatus.NOT_FOUND

            lines = [line async for line in connector.fetch_statement(bank_day())]
            assert [(x.order_no, x.amount, x.status) for x in lines] == [
                (o.order_no, o.amount, "succeeded")
            ]
            assert bank.executions(o.order_no) == 1
            await connector.aclose()


@each
@pytest.mark.asyncio
async def test_resending_the_same_order_executes_it_once(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client) as (bank, connector):
        o = order(2)
        first = await connector.disburse(o)
        again = await asyncio.gather(connector.disburse(o), connector.disburse(o))
        assert {r.bank_ref for r in again} == {first.bank_ref}
        await eventually(lambda: bank.executions(o.order_no) == 1)
        await connector.disburse(o)
        await asyncio.sleep(0.05)
        assert bank.executions(o.order_no) == 1


# --- outcome classes -------------------------------------------------------------------------


@each
@pytest.mark.asyncio
async def test_closed_port_is_not_sent(harness: Harness, client: httpx.AsyncClient) -> None:
    connector = harness.build(harness.funder(closed_port_url()), client, now)
    with pytest.raises(NotSent):
        await connector.disburse(order(3))
    with pytest.raises(NotSent):
        await connector.query(order(3).order_no)


@each
@pytest.mark.asyncio
async def test_bank_refusal_is_rejected_before_execution(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client, Faults(reject_rate=1.0)) as (bank, connector):
        with pytest.raises(Rejected) as caught:
            await connector.disburse(order(4))
        assert caught.value.pre_execution is True
        assert bank.executions(order(4).order_no) == 0


@each
@pytest.mark.asyncio
async def test_server_error_is_an_unknown_outcome(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client, Faults(error_rate=1.0)) as (_, connector):
        with pytest.raises(OutcomeUnknown):
            await connector.disburse(order(5))


@each
@pytest.mark.asyncio
async def test_timeout_is_an_unknown_outcome_even_though_the_bank_executed(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(
        harness, client, Faults(timeout_rate=1.0), timeout_seconds=SHORT_TIMEOUT_SECONDS
    ) as (bank, connector):
        with pytest.raises(OutcomeUnknown):
            await connector.disburse(order(6))
        await eventually(lambda: bank.executions(order(6).order_no) == 1)
        assert (await connector.query(order(6).order_no)).status is BankStatus.SUCCEEDED


# --- signatures and clocks -------------------------------------------------------------------


@each
@pytest.mark.asyncio
async def test_tampered_and_skewed_callbacks_are_refused(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client) as (bank, connector):
        async with CallbackInbox() as inbox:
            o = order(7, inbox.url)
            await connector.disburse(o)
            headers, body = await inbox.next()
            connector.parse_callback(headers, body)  # the genuine one passes

            tampered = body.replace(o.order_no.encode(), b"CF999-1")
            with pytest.raises(CallbackRejected) as bad:
                connector.parse_callback(headers, tampered)
            assert bad.value.reason == "bad_signature"

            for skew in (301.0, -301.0):
                skewed = harness.build(harness.funder(bank.base_url), client, skewed_clock(skew))
                with pytest.raises(CallbackRejected) as stale:
                    skewed.parse_callback(headers, body)
                assert stale.value.reason == "stale"


@each
@pytest.mark.asyncio
async def test_request_from_a_skewed_clock_executes_nothing(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client, clock=lambda: time.time() - 1000) as (bank, connector):
        with pytest.raises(ConnectorError):
            await connector.disburse(order(8))
        assert bank.executions(order(8).order_no) == 0


# --- statements ------------------------------------------------------------------------------


@each
@pytest.mark.asyncio
async def test_large_statement_streams_in_bounded_memory(harness: Harness) -> None:
    size = physical = 0
    for chunk in harness.statement_lines(STATEMENT_LINES):
        size += len(chunk)
        physical += chunk.count(b"\n")
    assert physical >= STATEMENT_LINES
    records = harness.records(STATEMENT_LINES)

    async def body() -> AsyncIterator[bytes]:
        # the network hands the connector chunks of this size, whatever the format
        chunk: list[bytes] = []
        held = 0
        for piece in harness.statement_lines(STATEMENT_LINES):
            chunk.append(piece)
            held += len(piece)
            if held >= CHUNK_BYTES:
                yield b"".join(chunk)
                chunk, held = [], 0
        yield b"".join(chunk)

    # a bank that signs its statements signs these bytes (computed over a first pass)
    signed = harness.statement_headers(harness.statement_lines(STATEMENT_LINES))

    def handler(_request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": "text/csv", **signed}
        return httpx.Response(200, content=body(), headers=headers)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mocked:
        connector = harness.build(harness.funder("http://bank.test"), mocked, now)
        count = total = 0
        tracemalloc.start()
        try:
            async for line in connector.fetch_statement(date(2026, 11, 25)):
                count += 1
                total += line.amount
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == records
    assert total == sum(1000 + i for i in range(records))
    assert peak < size / 10, f"peak {peak} bytes for a {size}-byte statement"


# --- the template folder ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_template_folder_passes_the_structural_checks(
    client: httpx.AsyncClient,
) -> None:
    spec = find_spec("connectors.template")
    assert spec is not None
    assert spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    assert (folder / "connector.py").is_file()
    assert (folder / "wire.py").is_file()
    funder = Funder(
        id="bank-t",
        name="Template Bank",
        license="bank",
        mode="direct",
        priority=1,
        products=["consumer-standard"],
        single_max=1,
        daily_limit=1,
        connector="template",
        connector_options={"base_url": "http://127.0.0.1:9", "secret": "s"},
    )
    connector = TemplateConnector(funder, client)
    assert isinstance(connector, BankConnector)
    with pytest.raises(ValueError, match="secret"):
        TemplateConnector(funder.model_copy(update={"connector_options": {}}), client)
