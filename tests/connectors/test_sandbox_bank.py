"""The sandbox bank on a real loopback port, driven by the real SandboxConnector."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from config.models import Funder
from connectors.base import BankStatus, CallbackEvent, PayoutOrder
from connectors.errors import CallbackRejected, NotSent, OutcomeUnknown, Rejected
from connectors.sandbox import bank as sandbox_bank
from connectors.sandbox import wire
from connectors.sandbox.bank import BankOptions, create_bank_app, run_bank
from connectors.sandbox.connector import SandboxConnector

SECRET = "sandbox-secret-test"
SETTLE_MS = 10
# How long a test waits for something the bank does in the background.
PATIENCE_SECONDS = 5.0


def order(n: int = 1, **changes: Any) -> PayoutOrder:
    fields: dict[str, Any] = {
        "order_no": f"LC{n}-1",
        "txn_no": f"LC{n}",
        "funder_id": "bank-t",
        "amount": 1_000_000 + n,
        "currency": "CNY",
        "account_no": "6222020200112233445",
        "account_name": "张三",
        "bank_code": "ICBC",
        "mode": "direct",
        "funder_amount": 1_000_000 + n,
        "platform_amount": 0,
        "callback_url": "http://127.0.0.1:9/unused",
    }
    fields.update(changes)
    return PayoutOrder(**fields)


def funder(base_url: str, **options: Any) -> Funder:
    return Funder(
        id="bank-t",
        name="Sandbox Bank T",
        license="bank",
        mode="direct",
        priority=1,
        products=["consumer-standard"],
        single_max=20_000_000,
        daily_limit=5_000_000_000,
        connector_options={"base_url": base_url, "secret": SECRET, **options},
    )


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class Receiver:
    """The gateway's side of callbacks: verifies with `parse_callback`, records, acks."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[CallbackEvent] = asyncio.Queue()
        self.refused: list[str] = []
        self.fail_next = 0  # answer this many callbacks with a 500 first
        self.connector: SandboxConnector | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/callbacks/{funder_id}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        assert self.connector is not None
        body = await request.read()
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=500, text="busy")
        try:
            event = self.connector.parse_callback(request.headers, body)
        except CallbackRejected as e:
            self.refused.append(e.reason)
            return web.Response(status=401, text=e.reason)
        await self.events.put(event)
        return self.connector.callback_ack(True)

    async def next(self) -> CallbackEvent:
        return await asyncio.wait_for(self.events.get(), PATIENCE_SECONDS)


class Harness:
    def __init__(
        self, url: str, connector: SandboxConnector, receiver: Receiver, client: httpx.AsyncClient
    ) -> None:
        self.url = url
        self.connector = connector
        self.receiver = receiver
        self.client = client

    async def oracle(self) -> list[dict[str, Any]]:
        response = await self.client.get(f"{self.url}/_sandbox/payouts")
        assert response.status_code == 200
        rows: list[dict[str, Any]] = response.json()
        return rows

    async def settled(self, order_no: str) -> dict[str, Any]:
        """The oracle row of `order_no` once the bank has finished it."""
        deadline = time.monotonic() + PATIENCE_SECONDS
        while time.monotonic() < deadline:
            row = next((r for r in await self.oracle() if r["order_no"] == order_no), None)
            if row is not None and row["status"] in ("SUCCESS", "FAILED", "REJECTED"):
                return row
            await asyncio.sleep(0.01)
        raise AssertionError(f"{order_no} did not settle")


StartBank = Callable[..., Awaitable[Harness]]


@pytest_asyncio.fixture
async def start_bank() -> AsyncIterator[StartBank]:
    """Start a bank (with the given `BankOptions` fields) and a callback receiver."""
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(httpx.AsyncClient())

        async def start(*, timeout_seconds: float = 5.0, **opts: Any) -> Harness:
            receiver = Receiver()
            receiver_url = await stack.enter_async_context(serve(receiver.app()))
            options = BankOptions(
                funder_id="bank-t",
                callback_url=f"{receiver_url}/v1/callbacks/bank-t",
                secret=SECRET,
                seed=7,
                settle_ms=SETTLE_MS,
                callback_backoff_ms=10,
                **opts,
            )
            url = await stack.enter_async_context(serve(create_bank_app(options)))
            connector = SandboxConnector(funder(url, timeout_seconds=timeout_seconds), client)
            receiver.connector = connector
            return Harness(url, connector, receiver, client)

        yield start


# --- idempotency and exactly-once -----------------------------------------------------------


@pytest.mark.asyncio
async def test_resend_of_a_known_order_never_executes_again(start_bank: StartBank) -> None:
    h = await start_bank()
    first = await h.connector.disburse(order())
    assert first.status is BankStatus.ACCEPTED
    await h.settled("LC1-1")
    again = await h.connector.disburse(order())
    assert again.status is BankStatus.SUCCEEDED
    assert again.bank_ref == first.bank_ref
    assert [r["executions"] for r in await h.oracle()] == [1]


@pytest.mark.asyncio
async def test_fifty_concurrent_identical_posts_execute_once(start_bank: StartBank) -> None:
    h = await start_bank()
    results = await asyncio.gather(*(h.connector.disburse(order()) for _ in range(50)))
    assert len({r.bank_ref for r in results}) == 1
    row = await h.settled("LC1-1")
    assert row["executions"] == 1
    await asyncio.sleep(SETTLE_MS * 3 / 1000)
    assert [r["executions"] for r in await h.oracle()] == [1]


@pytest.mark.asyncio
async def test_same_order_no_with_another_payload_is_a_conflict(start_bank: StartBank) -> None:
    h = await start_bank()
    await h.connector.disburse(order())
    with pytest.raises(OutcomeUnknown) as info:
        await h.connector.disburse(order(amount=5))
    assert info.value.code == "order_conflict"
    row = await h.settled("LC1-1")
    assert (row["amount"], row["executions"]) == (1_000_001, 1)


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_reject_fault_is_a_remembered_pre_execution_rejection(
    start_bank: StartBank,
) -> None:
    h = await start_bank(reject_rate=1.0)
    for _ in range(2):  # a re-send gets the same rejection
        with pytest.raises(Rejected) as info:
            await h.connector.disburse(order())
        assert info.value.pre_execution is True
        assert info.value.code == "RISK_REJECTED"
    queried = await h.connector.query("LC1-1")
    assert (queried.status, queried.pre_execution) == (BankStatus.FAILED, True)
    assert await h.oracle() == [
        {
            "order_no": "LC1-1",
            "amount": 1_000_001,
            "account_no": "6222020200112233445",
            "executions": 0,
            "status": "REJECTED",
        }
    ]


@pytest.mark.asyncio
async def test_error_fault_is_outcome_unknown_and_executes_nothing(start_bank: StartBank) -> None:
    h = await start_bank(error_rate=1.0)
    with pytest.raises(OutcomeUnknown) as info:
        await h.connector.disburse(order())
    assert info.value.code == "server_error"
    assert (await h.connector.query("LC1-1")).status is BankStatus.NOT_FOUND
    assert await h.oracle() == []


@pytest.mark.asyncio
async def test_timeout_fault_executes_but_never_answers(start_bank: StartBank) -> None:
    h = await start_bank(timeout_rate=1.0, timeout_seconds=0.2)
    started = time.monotonic()
    with pytest.raises(OutcomeUnknown) as info:
        await h.connector.disburse(order())
    assert info.value.code == "timeout"
    assert time.monotonic() - started < 2
    # other requests are served while that one hangs
    assert (await h.connector.query("LC2-1")).status is BankStatus.NOT_FOUND
    row = await h.settled("LC1-1")
    assert row["executions"] == 1
    assert (await h.connector.query("LC1-1")).status is BankStatus.SUCCEEDED


@pytest.mark.asyncio
async def test_shutdown_releases_hanging_requests_and_pending_callbacks() -> None:
    options = BankOptions(
        funder_id="bank-t",
        callback_url="http://127.0.0.1:9/cb",
        secret=SECRET,
        timeout_rate=1.0,
        callback_delay_ms=60_000,
    )
    app = create_bank_app(options)
    async with httpx.AsyncClient() as client:
        async with serve(app) as url:
            connector = SandboxConnector(funder(url, timeout_seconds=0.1), client)
            with pytest.raises(OutcomeUnknown):
                await connector.disburse(order())
            bank = app[sandbox_bank.BANK]
            await asyncio.sleep(SETTLE_MS * 5 / 1000)
            assert bank.tasks  # waiting for the callback delay
            started = time.monotonic()
        assert time.monotonic() - started < 1.0
        assert not bank.tasks


@pytest.mark.asyncio
async def test_fail_fault_accepts_then_fails_without_moving_money(start_bank: StartBank) -> None:
    h = await start_bank(fail_rate=1.0)
    assert (await h.connector.disburse(order())).status is BankStatus.ACCEPTED
    event = await h.receiver.next()
    assert (event.status, event.fail_code) == (BankStatus.FAILED, "ACCOUNT_FROZEN")
    queried = await h.connector.query("LC1-1")
    assert (queried.status, queried.pre_execution) == (BankStatus.FAILED, True)
    assert (await h.settled("LC1-1"))["executions"] == 0


@pytest.mark.asyncio
async def test_bad_signature_is_refused_before_anything_happens(start_bank: StartBank) -> None:
    h = await start_bank()
    wrong = SandboxConnector(
        funder(h.url, secret="not-the-secret"), h.client
    )  # same bank, other secret
    with pytest.raises(Rejected) as info:
        await wrong.disburse(order())
    assert (info.value.code, info.value.pre_execution) == ("unauthorized", True)
    assert await h.oracle() == []


@pytest.mark.asyncio
async def test_a_bank_that_is_down_is_not_sent() -> None:
    async with serve(web.Application()) as url:
        pass  # the port is free again: nothing listens there
    async with httpx.AsyncClient() as client:
        with pytest.raises(NotSent):
            await SandboxConnector(funder(url), client).disburse(order())


# --- callbacks ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_callback_arrives_signed_and_verifies(start_bank: StartBank) -> None:
    h = await start_bank()
    accepted = await h.connector.disburse(order())
    event = await h.receiver.next()
    assert event.order_no == "LC1-1"
    assert event.status is BankStatus.SUCCEEDED
    assert event.bank_ref == accepted.bank_ref
    assert event.amount == 1_000_001
    assert event.finished_at is not None
    assert event.finished_at.utcoffset() is not None
    assert h.receiver.refused == []


@pytest.mark.asyncio
async def test_duplicate_fault_sends_two_callbacks_with_fresh_nonces(
    start_bank: StartBank,
) -> None:
    h = await start_bank(callback_duplicate_rate=1.0)
    await h.connector.disburse(order())
    first, second = await h.receiver.next(), await h.receiver.next()
    assert first.order_no == second.order_no == "LC1-1"
    assert first.nonce != second.nonce
    assert (await h.settled("LC1-1"))["executions"] == 1


@pytest.mark.asyncio
async def test_loss_fault_sends_no_callback(start_bank: StartBank) -> None:
    h = await start_bank(callback_loss_rate=1.0)
    await h.connector.disburse(order())
    assert (await h.settled("LC1-1"))["executions"] == 1
    await asyncio.sleep(0.1)
    assert h.receiver.events.empty()


@pytest.mark.asyncio
async def test_callback_answered_with_an_error_is_retried(start_bank: StartBank) -> None:
    h = await start_bank()
    h.receiver.fail_next = 2
    await h.connector.disburse(order())
    event = await h.receiver.next()
    assert event.status is BankStatus.SUCCEEDED
    assert h.receiver.fail_next == 0


@pytest.mark.asyncio
async def test_callback_url_of_the_bank_wins_over_the_request(start_bank: StartBank) -> None:
    h = await start_bank()
    await h.connector.disburse(order(callback_url="http://127.0.0.1:9/elsewhere"))
    assert (await h.receiver.next()).order_no == "LC1-1"


# --- statement and oracle -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_statement_lists_finished_orders_of_the_business_day(start_bank: StartBank) -> None:
    h = await start_bank()
    await h.connector.disburse(order(1))
    await h.connector.disburse(order(2))
    for n in (1, 2):
        await h.settled(f"LC{n}-1")
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    lines = [x async for x in h.connector.fetch_statement(today)]
    assert sorted((x.order_no, x.amount, x.status) for x in lines) == [
        ("LC1-1", 1_000_001, "succeeded"),
        ("LC2-1", 1_000_002, "succeeded"),
    ]
    assert all(x.bank_ref and x.booked_at for x in lines)
    other_day = today.replace(year=today.year - 1)
    assert [x async for x in h.connector.fetch_statement(other_day)] == []


@pytest.mark.asyncio
async def test_statement_leaves_out_rejected_orders(start_bank: StartBank) -> None:
    h = await start_bank(reject_rate=1.0)
    with pytest.raises(Rejected):
        await h.connector.disburse(order())
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    assert [x async for x in h.connector.fetch_statement(today)] == []


@pytest.mark.asyncio
async def test_oracle_and_health_shape(start_bank: StartBank) -> None:
    h = await start_bank()
    await h.connector.disburse(order())
    await h.settled("LC1-1")
    assert await h.oracle() == [
        {
            "order_no": "LC1-1",
            "amount": 1_000_001,
            "account_no": "6222020200112233445",
            "executions": 1,
            "status": "SUCCESS",
        }
    ]
    health = await h.client.get(f"{h.url}/_sandbox/health")
    assert health.status_code == 200
    assert health.json()["funder_id"] == "bank-t"


@pytest.mark.asyncio
async def test_unsigned_api_requests_are_refused(start_bank: StartBank) -> None:
    h = await start_bank()
    for path in ("/api/payouts/LC1-1", "/api/statements/2025-11-25"):
        assert (await h.client.get(h.url + path)).status_code == 401
    assert (await h.client.post(h.url + "/api/payouts", json={})).status_code == 401


@pytest.mark.asyncio
async def test_signed_but_invalid_payout_request_is_a_400(start_bank: StartBank) -> None:
    h = await start_bank()
    body = b'{"order_no":"LC1-1","amount":-5}'
    headers = wire.signed_headers(SECRET, body, timestamp=str(int(time.time())), nonce="n")
    response = await h.client.post(h.url + "/api/payouts", content=body, headers=headers)
    assert response.status_code == 400
    assert await h.oracle() == []


@pytest.mark.asyncio
async def test_same_seed_gives_the_same_faults(start_bank: StartBank) -> None:
    outcomes = []
    for _ in range(2):
        h = await start_bank(reject_rate=0.5)
        run = []
        for n in range(12):
            try:
                await h.connector.disburse(order(n))
                run.append("accepted")
            except Rejected:
                run.append("rejected")
        outcomes.append(run)
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {"accepted", "rejected"}


# --- running it -----------------------------------------------------------------------------


def test_command_line_options_become_bank_options() -> None:
    parser = argparse.ArgumentParser()
    sandbox_bank.add_arguments(parser)
    ns = parser.parse_args(
        [
            "--port=8801",
            "--funder-id=bank-a",
            "--callback-url=http://127.0.0.1:8700/v1/callbacks/bank-a",
            "--seed=3",
            "--reject-rate=0.1",
            "--timeout-rate=0.2",
            "--callback-duplicate-rate=1",
            "--latency-ms=5",
        ]
    )
    opts = sandbox_bank.options_from_args(ns)
    assert (ns.host, ns.port) == ("127.0.0.1", 8801)
    assert opts.secret == "sandbox-secret"
    assert (opts.seed, opts.reject_rate, opts.timeout_rate) == (3, 0.1, 0.2)
    assert (opts.callback_duplicate_rate, opts.latency_ms, opts.settle_ms) == (1.0, 5, 50)


@pytest.mark.parametrize("bad", ["--error-rate=1.5", "--error-rate=often", "--latency-ms=-1"])
def test_command_line_refuses_impossible_values(bad: str) -> None:
    parser = argparse.ArgumentParser()
    sandbox_bank.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--port=1", "--funder-id=a", "--callback-url=http://x", bad])


def test_bank_options_refuse_impossible_values() -> None:
    with pytest.raises(ValueError, match=r"reject_rate must be within 0\.\.1"):
        BankOptions(funder_id="a", reject_rate=2)


@pytest.mark.asyncio
async def test_run_bank_serves_until_stopped() -> None:
    async with serve(web.Application()) as probe:
        port = int(probe.rsplit(":", 1)[1])
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_bank(BankOptions(funder_id="bank-t", secret=SECRET), port=port, stop=stop)
    )
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + PATIENCE_SECONDS
        while True:
            try:
                health = await client.get(f"http://127.0.0.1:{port}/_sandbox/health")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        assert health.status_code == 200
    stop.set()
    await asyncio.wait_for(task, PATIENCE_SECONDS)
