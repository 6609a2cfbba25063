"""The gateway in-process on real PostgreSQL, with `FakeBank`s and an in-test lending core.

`start_gateway(...)` builds the app with `create_app` from config/default.toml plus fast
dispatch timings, serves it on loopback and returns a `Harness` to drive it over HTTP. The
real dispatcher, poller and notifier run (role "all"); tests wait on conditions with a
deadline, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol, TypeVar

import asyncpg
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from config.loader import DEFAULT_CONFIG, parse_config
from config.models import FileConfig
from connectors.base import BankConnector
from gateway.api import SERVICES
from gateway.app import Role, create_app
from gateway.context import Services
from gateway.dispatcher import Dispatcher, Poller
from gateway.store import queries as q
from tests.fakes import FakeBank

T = TypeVar("T")

TOKEN = "demo-token"  # the default config's client token (all scopes)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WEBHOOK_SECRET = "integration-webhook-secret"
BORROWER = "B1"
ACCOUNT = {"account_no": "6222020200112233445", "account_name": "张三", "bank_code": "ICBC"}
AMOUNT = 1_000_000  # 10,000 CNY, inside the default product's range
FAST_DISPATCH: dict[str, Any] = {
    "query_backoff_seconds": [0.05, 0.1],
    "poll_interval_seconds": 0.05,
    "not_sent_backoff_seconds": 0.01,
    "webhook_backoff_seconds": [0.05],
    "lease_seconds": 5,
}
WAIT_SECONDS = 10.0

# Known product bug (see test_auth.py): gateway/http.py stores the client under a str request
# key, so aiohttp warns once per process and, with warnings as errors, the first
# authenticated request answers 500. Modules that test other behaviours ignore that warning.


def make_config(
    webhook_url: str | None,
    *,
    gateway: dict[str, Any] | None = None,
    dispatch: dict[str, Any] | None = None,
    funders: dict[str, dict[str, Any]] | None = None,
) -> FileConfig:
    """config/default.toml with fast dispatch timings, the in-test lending core and overrides
    per section (`funders` is keyed by funder id)."""
    raw = tomllib.loads(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    raw["gateway"].update(gateway or {})
    raw["dispatch"] = {**raw.get("dispatch", {}), **FAST_DISPATCH, **(dispatch or {})}
    if webhook_url is None:
        raw.pop("lending_core", None)
    else:
        raw["lending_core"] = {"webhook_url": webhook_url, "webhook_secret": WEBHOOK_SECRET}
    for f in raw["funders"]:
        f.update((funders or {}).get(f["id"], {}))
    return parse_config(raw, "integration")


async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT_SECONDS
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- the lending core


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes


@dataclass
class LendingCore:
    """Receives outcome webhooks; `answers` scripts its HTTP statuses (then 200)."""

    url: str = ""
    answers: deque[int] = field(default_factory=deque)
    deliveries: list[Delivery] = field(default_factory=list)
    refused: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.answers.popleft() if self.answers else 200
        if status >= 300:
            self.refused += 1
            return web.Response(status=status)
        self.deliveries.append(Delivery(dict(request.headers), body))
        return web.Response(status=status)


@pytest_asyncio.fixture
async def lending_core() -> AsyncIterator[LendingCore]:
    core = LendingCore()
    app = web.Application()
    app.router.add_post("/events", core.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    core.url = str(server.make_url("/events"))
    try:
        yield core
    finally:
        await server.close()


# ---------------------------------------------------------------- the gateway


@dataclass
class Harness:
    client: TestClient[web.Request, web.Application]
    svc: Services
    banks: dict[str, FakeBank]
    pool: asyncpg.Pool
    core: LendingCore

    @property
    def cfg(self) -> FileConfig:
        return self.svc.cfg

    async def register(self, borrower_id: str = BORROWER, **account: str) -> None:
        resp = await self.client.put(
            f"/v1/borrowers/{borrower_id}/accounts", json={**ACCOUNT, **account}, headers=AUTH
        )
        assert resp.status in (200, 201), await resp.text()

    def request(self, txn_no: str, amount: int = AMOUNT, **over: Any) -> dict[str, Any]:
        return {
            "txn_no": txn_no,
            "loan_id": f"L-{txn_no}",
            "borrower_id": BORROWER,
            "payee": dict(ACCOUNT),
            "amount": amount,
            "currency": "CNY",
            "term": {"unit": "month", "count": 12},
            "apr": "0.1800",
            "product": "consumer-standard",
            "repayment": "equal_installment",
            **over,
        }

    async def disburse(
        self, txn_no: str, amount: int = AMOUNT, **over: Any
    ) -> tuple[int, dict[str, Any]]:
        resp = await self.client.post(
            "/v1/disbursements", json=self.request(txn_no, amount, **over), headers=AUTH
        )
        return resp.status, await resp.json()

    async def accepted(self, txn_no: str, amount: int = AMOUNT, **over: Any) -> dict[str, Any]:
        status, body = await self.disburse(txn_no, amount, **over)
        assert status == 201, body
        return body

    async def get(self, txn_no: str) -> dict[str, Any]:
        resp = await self.client.get(f"/v1/disbursements/{txn_no}", headers=AUTH)
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    async def wait_status(self, txn_no: str, *statuses: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            d = await self.get(txn_no)
            return d if d["status"] in statuses else None

        return await eventually(check, f"{txn_no} to reach {statuses}")

    async def vouchers(self, txn_no: str) -> list[dict[str, Any]]:
        resp = await self.client.get(f"/v1/disbursements/{txn_no}/vouchers", headers=AUTH)
        assert resp.status == 200, await resp.text()
        items: list[dict[str, Any]] = (await resp.json())["items"]
        return items

    async def usage(self, day: date | None = None) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            return await q.usage(conn, day or self.svc.business_day())

    async def prefund(self, funder_id: str = "bank-b") -> int:
        async with self.pool.acquire() as conn:
            return (await q.prefund_balances(conn))[funder_id]

    async def outbox(self, kind: str) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return await conn.fetch("SELECT * FROM outbox WHERE kind = $1 ORDER BY id", kind)

    async def callback(self, funder_id: str, headers: dict[str, str], body: bytes) -> int:
        resp = await self.client.post(f"/v1/callbacks/{funder_id}", data=body, headers=headers)
        await resp.read()
        return resp.status

    def assert_paid_at_most_once(self) -> None:
        """The oracle: no order executed twice, no disbursement paid by two orders."""
        per_txn: dict[str, int] = defaultdict(int)
        for bank in self.banks.values():
            assert all(n <= 1 for n in bank.executions.values()), bank.executions
            for txn, n in bank.executed_txns().items():
                per_txn[txn] += n
        assert all(n <= 1 for n in per_txn.values()), dict(per_txn)


class StartGateway(Protocol):
    def __call__(
        self,
        *,
        role: Role = "all",
        banks: dict[str, FakeBank] | None = None,
        cfg: FileConfig | None = None,
        gateway: dict[str, Any] | None = None,
        dispatch: dict[str, Any] | None = None,
        funders: dict[str, dict[str, Any]] | None = None,
        connectors: dict[str, BankConnector] | None = None,
    ) -> Awaitable[Harness]: ...


@pytest_asyncio.fixture
async def start_gateway(
    pool: asyncpg.Pool, lending_core: LendingCore
) -> AsyncIterator[StartGateway]:
    """Start gateways (several may share one database); all are stopped after the test and
    each is checked against the paid-at-most-once oracle. `connectors` puts real connectors
    (e.g. against an in-process sandbox bank) in place of the `FakeBank`s of those funders;
    the test checks their bank's own oracle."""
    started: list[Harness] = []

    async def start(
        *,
        role: Role = "all",
        banks: dict[str, FakeBank] | None = None,
        cfg: FileConfig | None = None,
        gateway: dict[str, Any] | None = None,
        dispatch: dict[str, Any] | None = None,
        funders: dict[str, dict[str, Any]] | None = None,
        connectors: dict[str, BankConnector] | None = None,
    ) -> Harness:
        cfg = cfg or make_config(
            lending_core.url, gateway=gateway, dispatch=dispatch, funders=funders
        )
        real = connectors or {}
        if banks is None:
            banks = {f.id: FakeBank(f.id) for f in cfg.funders if f.id not in real}
        app = create_app(cfg, pool=pool, connectors={**banks, **real}, role=role)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        h = Harness(client, app[SERVICES], banks, pool, lending_core)
        started.append(h)
        return h

    try:
        yield start
    finally:
        for h in reversed(started):
            await h.client.close()
    for h in started:
        h.assert_paid_at_most_once()


async def query_now(h: Harness, poller: Poller) -> None:
    """Make every scheduled status query due and run the poller on the one attempt."""
    async with h.pool.acquire() as conn:
        await conn.execute(
            "UPDATE attempts SET next_query_at = now() WHERE next_query_at IS NOT NULL"
        )
        rows = await poller.claim(conn, 10)
    assert len(rows) == 1
    await poller.handle(rows[0])


async def dispatch_one(h: Harness, dispatcher: Dispatcher) -> None:
    """Claim the one ready payout and send it, as the dispatcher's loop would."""
    async with h.pool.acquire() as conn:
        rows = await dispatcher.claim(conn, 10)
    assert len(rows) == 1
    await dispatcher.handle(rows[0])
