"""The connector conformance suite: what every registered connector must do against its sandbox.

A connector takes part by providing a `Harness` (below) and listing it in `HARNESSES`; the
checks in `test_conformance.py` then run for it unchanged:

    structure     the folder has connector.py and wire.py, the class satisfies BankConnector,
                  the entry point in group `fundgate.connectors` resolves to it
    round trip    disburse -> signed callback -> query -> statement of the day
    idempotency   the same order sent twice (and concurrently) executes once
    outcomes      NotSent (closed port), Rejected (bank refuses), OutcomeUnknown (5xx, timeout)
    security      a tampered callback and a callback outside ±300 s are refused; a request
                  signed with a skewed clock executes nothing
    statements    a 100k-line statement streams in bounded memory (tracemalloc)

A harness starts its bank in-process (an aiohttp app on a loopback port) with a few fault
switches, builds the connector with an injected clock, and renders a statement body in the
bank's format. See docs/connectors.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol

import httpx
import pytest
from aiohttp import web

from config.models import Funder, StatementConfig
from connectors.base import BankConnector, PayoutOrder
from connectors.iso20022 import sandbox as iso_bank
from connectors.iso20022 import wire as iso_wire
from connectors.iso20022.connector import IsoConnector
from connectors.sandbox import bank as sandbox_bank
from connectors.sandbox import wire as sandbox_wire
from connectors.sandbox.connector import SandboxConnector
from connectors.signed_json import sandbox as sj_bank
from connectors.signed_json import wire as sj_wire
from connectors.signed_json.connector import SignedJsonConnector

Clock = Callable[[], float]
SETTLE_MS = 10
# A connector timeout short enough for the suite, long enough for a loopback answer.
SHORT_TIMEOUT_SECONDS = 0.3


@dataclass(frozen=True)
class Faults:
    """Fault switches every sandbox bank offers (probabilities 0..1)."""

    reject_rate: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    fail_rate: float = 0.0
    callback_loss_rate: float = 0.0
    callback_duplicate_rate: float = 0.0
    callback_delay_ms: int = 0  # milliseconds, not a probability
    latency_ms: int = 0  # milliseconds, not a probability


@dataclass
class Bank:
    """A running sandbox bank: its URL, the oracle of money moved, and how to stop it."""

    base_url: str
    runner: web.AppRunner
    executions: Callable[[str], int]
    options: dict[str, Any] = field(default_factory=dict)

    async def close(self) -> None:
        await self.runner.cleanup()


class Harness(Protocol):
    name: str  # the entry point name in group fundgate.connectors
    package: str  # the folder's package, e.g. "connectors.sandbox"
    connector_class: type[Any]

    async def start_bank(self, faults: Faults) -> Bank: ...

    def funder(self, base_url: str, **options: Any) -> Funder: ...

    def build(self, funder: Funder, client: httpx.AsyncClient, clock: Clock) -> BankConnector: ...

    def statement_lines(self, n: int) -> Iterator[bytes]:
        """A statement file of at least `n` physical lines, in chunks of whole lines."""
        ...

    def records(self, n: int) -> int:
        """How many StatementLines that file holds (order i has amount 1000 + i)."""
        ...

    def statement_headers(self, chunks: Iterable[bytes]) -> dict[str, str]:
        """The headers the bank sends with a statement made of `chunks` (its signature, for
        a bank that signs statements)."""
        ...


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _funder(connector: str, options: dict[str, Any], **statement: Any) -> Funder:
    return Funder(
        id="bank-c",
        name="Conformance Bank",
        license="bank",
        mode="direct",
        priority=1,
        products=["consumer-standard"],
        single_max=20_000_000,
        daily_limit=5_000_000_000,
        connector=connector,
        connector_options=options,
        statement=StatementConfig(**statement),
    )


def order(n: int, callback_url: str = "http://127.0.0.1:9/unused") -> PayoutOrder:
    return PayoutOrder(
        order_no=f"CF{n}-1",
        txn_no=f"CF{n}",
        funder_id="bank-c",
        amount=1_000_000 + n,
        currency="CNY",
        account_no="6222020200112233445",
        account_name="张三",
        bank_code="ICBC",
        mode="direct",
        funder_amount=1_000_000 + n,
        platform_amount=0,
        callback_url=callback_url,
    )


# --- sandbox ---------------------------------------------------------------------------------


class SandboxHarness:
    name = "sandbox"
    package = "connectors.sandbox"
    connector_class = SandboxConnector
    secret = "conformance-secret"

    async def start_bank(self, faults: Faults) -> Bank:
        app = sandbox_bank.create_bank_app(
            sandbox_bank.BankOptions(
                funder_id="bank-c",
                secret=self.secret,
                seed=1,
                settle_ms=SETTLE_MS,
                callback_attempts=2,
                **asdict(faults),
            )
        )
        state = app[sandbox_bank.BANK]
        runner, url = await serve(app)

        def executions(order_no: str) -> int:
            o = state.orders.get(order_no)
            return 0 if o is None else o.executions

        return Bank(url, runner, executions)

    def funder(self, base_url: str, **options: Any) -> Funder:
        return _funder("sandbox", {"base_url": base_url, "secret": self.secret, **options})

    def build(self, funder: Funder, client: httpx.AsyncClient, clock: Clock) -> BankConnector:
        return SandboxConnector(funder, client, clock=clock)

    def records(self, n: int) -> int:
        return n

    def statement_headers(self, chunks: Iterable[bytes]) -> dict[str, str]:
        return {}

    def statement_lines(self, n: int) -> Iterator[bytes]:
        yield (sandbox_wire.STATEMENT_HEADER + "\n").encode()
        # the same bytes as sandbox_wire.statement_row, formatted cheaply for 100k lines
        at = datetime(2026, 11, 25, 10, 0, tzinfo=UTC).isoformat()
        for i in range(n):
            yield f"CF{i}-1,SBX{i:010d},{1000 + i},SUCCESS,{at}\n".encode()


# --- signed_json -----------------------------------------------------------------------------


class SignedJsonHarness:
    """A bank with an envelope, yuan amounts, Chinese-style sorted signing in a body field."""

    name = "signed_json"
    package = "connectors.signed_json"
    connector_class = SignedJsonConnector
    secret = "conformance-hmac"

    def options(self, base_url: str) -> dict[str, Any]:
        return {
            "base_url": base_url,
            "endpoints": {
                "create": "/gateway/pay",
                "query": "/gateway/pay/{order_no}",
                "statement": "/gateway/bill/{day}",
            },
            "request_fields": {
                "order_no": "out_trade_no",
                "amount": "trans_amt",
                "currency": "cur",
                "account_no": "payee_acct",
                "account_name": "payee_name",
                "bank_code": "bank_no",
                "callback_url": "notify_url",
            },
            "static_fields": {"mch_id": "M10001"},
            "amount_format": "yuan",
            "response_fields": {
                "order_no": "data.out_trade_no",
                "status": "data.trade_state",
                "bank_ref": "data.trade_no",
                "amount": "data.trans_amt",
                "fail_code": "data.err_code",
                "fail_reason": "data.err_msg",
                "finished_at": "data.finish_time",
            },
            "status_map": {
                "RECEIVED": "accepted",
                "DEALING": "processing",
                "PAY_SUCCESS": "succeeded",
                "PAY_FAIL": "failed",
                "REFUSED": "failed",
                "NO_ORDER": "not_found",
            },
            "pre_execution_words": ["REFUSED"],
            "signing": {
                "algorithm": "hmac-sha256",
                "secret": self.secret,
                "canonical": "sorted",
                "placement": "body",
                "signature_field": "sign",
            },
        }

    async def start_bank(self, faults: Faults) -> Bank:
        opts = sj_wire.parse_options(self.options("http://placeholder"))
        app = sj_bank.create_bank_app(
            sj_bank.SignedJsonBankOptions(
                wire=opts,
                seed=1,
                settle_ms=SETTLE_MS,
                callback_attempts=2,
                **asdict(faults),
            )
        )
        state = app[sj_bank.BANK]
        runner, url = await serve(app)

        def executions(order_no: str) -> int:
            o = state.orders.get(order_no)
            return 0 if o is None else o.executions

        return Bank(url, runner, executions)

    def funder(self, base_url: str, **options: Any) -> Funder:
        return _funder("signed_json", {**self.options(base_url), **options})

    def build(self, funder: Funder, client: httpx.AsyncClient, clock: Clock) -> BankConnector:
        return SignedJsonConnector(funder, client, clock=clock)

    def records(self, n: int) -> int:
        return n

    def statement_headers(self, chunks: Iterable[bytes]) -> dict[str, str]:
        signer = sj_wire.Signer.for_client(sj_wire.parse_options(self.options("http://x")).signing)
        return sj_wire.sign_statement(
            signer, chunks, timestamp=str(int(time.time())), nonce="conformance"
        )

    def statement_lines(self, n: int) -> Iterator[bytes]:
        yield b"order_no,bank_ref,amount,status,finished_at\n"
        for i in range(n):
            yield f"CF{i}-1,SJB{i:010d},{1000 + i},SUCCESS,2026-11-25T10:00:00+08:00\n".encode()


# --- iso20022 --------------------------------------------------------------------------------


# camt.053 as the sandbox writes it: one element per line, 11 lines per entry
ISO_LINES_PER_ENTRY = 11


class IsoHarness:
    name = "iso20022"
    package = "connectors.iso20022"
    connector_class = IsoConnector
    secret = "conformance-iso"

    async def start_bank(self, faults: Faults) -> Bank:
        app = iso_bank.create_bank_app(
            iso_bank.IsoBankOptions(
                secret=self.secret,
                seed=1,
                settle_ms=SETTLE_MS,
                callback_attempts=2,
                **asdict(faults),
            )
        )
        state = app[iso_bank.BANK]
        runner, url = await serve(app)

        def executions(order_no: str) -> int:
            o = state.orders.get(order_no)
            return 0 if o is None else o.executions

        return Bank(url, runner, executions)

    def funder(self, base_url: str, **options: Any) -> Funder:
        return _funder(
            "iso20022",
            {
                "base_url": base_url,
                "secret": self.secret,
                "debtor_name": "Fundgate Platform",
                "debtor_account": "110000000001",
                "debtor_agent_bic": "ICBKCNBJ",
                **options,
            },
            format="camt053",
        )

    def build(self, funder: Funder, client: httpx.AsyncClient, clock: Clock) -> BankConnector:
        return IsoConnector(funder, client, clock=clock)

    def records(self, n: int) -> int:
        return n // ISO_LINES_PER_ENTRY + 1  # header and trailer lines come on top

    def statement_headers(self, chunks: Iterable[bytes]) -> dict[str, str]:
        return iso_wire.sign_statement(
            self.secret, chunks, timestamp=str(int(time.time())), nonce="conformance"
        )

    def statement_lines(self, n: int) -> Iterator[bytes]:
        at = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
        entries = self.records(n)
        return iso_wire.camt053(
            "S1", ((f"CF{i}-1", f"ISO{i:010d}", 1000 + i, at) for i in range(entries))
        )


HARNESSES: dict[str, Harness] = {
    h.name: h for h in (SandboxHarness(), SignedJsonHarness(), IsoHarness())
}


# --- helpers for the checks ------------------------------------------------------------------


class CallbackInbox:
    """A loopback receiver that keeps every callback (headers, body) a bank sends."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> CallbackInbox:
        app = web.Application()

        async def receive(request: web.Request) -> web.Response:
            await self.received.put((dict(request.headers), await request.read()))
            return web.Response(text="SUCCESS")

        app.router.add_post("/cb", receive)
        self.runner, base = await serve(app)
        self.url = base + "/cb"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def next(self, timeout: float = 5.0) -> tuple[dict[str, str], bytes]:
        return await asyncio.wait_for(self.received.get(), timeout)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def bank_day() -> date:
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo("Asia/Shanghai")).date()


# a check of the suites that run once per connector (its simulated bank included)
each = pytest.mark.parametrize("harness", list(HARNESSES.values()), ids=list(HARNESSES))


def now() -> float:
    return time.time()


@contextlib.asynccontextmanager
async def connected(
    harness: Harness,
    client: httpx.AsyncClient,
    faults: Faults | None = None,
    *,
    clock: Clock = now,
    **options: Any,
) -> AsyncIterator[tuple[Bank, BankConnector]]:
    """The harness's simulated bank playing `faults`, and its connector to it (the funder's
    connector options as the harness writes them, plus `options`); the bank closes after."""
    bank = await harness.start_bank(faults or Faults())
    try:
        yield bank, harness.build(harness.funder(bank.base_url, **options), client, clock)
    finally:
        await bank.close()
