"""Dispatch in batches with the real dispatcher and poller: orders of one funder ready together
travel in one bank call (one pain.001 for iso20022), each order still gets its own outcome,
and money moves at most once (the sandbox bank's `/_sandbox/payouts` and the FakeBank ledger
are the oracles)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio

from connectors.base import BankStatus
from connectors.iso20022 import sandbox as iso_bank
from connectors.iso20022 import wire as iso_wire
from connectors.iso20022.connector import IsoConnector
from gateway.disbursements import order_no
from gateway.dispatcher import payout_order
from gateway.store import queries as q
from tests.connectors.conformance import serve
from tests.fakes import ACCEPT, NOT_SENT, BatchingFakeBank, FakeBank, reject, unknown
from tests.integration.conftest import Harness, LendingCore, StartGateway, make_config

pytestmark = pytest.mark.integration

ISO_SECRET = "integration-iso-secret"


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


def iso_options(base_url: str, batch_size: int) -> dict[str, Any]:
    return {
        "base_url": base_url,
        "secret": ISO_SECRET,
        "debtor_name": "Fundgate Platform",
        "debtor_account": "110000000001",
        "debtor_agent_bic": "ICBKCNBJ",
        "batch_size": batch_size,
    }


async def accept_all(api: Harness, txns: list[str]) -> list[str]:
    """Accept one disbursement per txn (no worker runs yet); their attempt-1 order numbers."""
    await api.register()
    for txn in txns:
        await api.accepted(txn)
    return [order_no(txn, 1) for txn in txns]


@pytest.mark.asyncio
async def test_iso20022_orders_ready_together_go_in_one_pain001_and_each_succeeds_once(
    start_gateway: StartGateway, lending_core: LendingCore, http: httpx.AsyncClient
) -> None:
    app = iso_bank.create_bank_app(
        # no callbacks: the poller's status queries settle the orders
        iso_bank.IsoBankOptions(secret=ISO_SECRET, settle_ms=20, callback_attempts=0)
    )
    bank = app[iso_bank.BANK]
    runner, url = await serve(app)
    try:
        options = iso_options(url, 5)
        cfg = make_config(
            lending_core.url,
            funders={"bank-a": {"connector": "iso20022", "connector_options": options}},
        )
        funder = cfg.funder("bank-a")
        assert funder is not None
        iso = {"bank-a": IsoConnector(funder, http)}
        api = await start_gateway(role="api", cfg=cfg, connectors=iso)
        txns = [f"T-ISO-BATCH-{i}" for i in range(5)]
        orders = await accept_all(api, txns)

        await start_gateway(role="worker", cfg=cfg, banks=api.banks, connectors=iso)
        for txn in txns:
            d = await api.wait_status(txn, "succeeded")
            assert d["funder_id"] == "bank-a"
            assert [a["status"] for a in d["attempts"]] == ["succeeded"]

        # one pain.001 carried all five orders
        assert [sorted(ids) for _, ids in bank.messages] == [sorted(orders)]
        oracle = (await http.get(url + "/_sandbox/payouts")).json()
        assert sorted(p["order_no"] for p in oracle) == sorted(orders)
        assert all(p["executions"] == 1 for p in oracle), oracle
        assert {p["msg_id"] for p in oracle} == {bank.messages[0][0]}
        assert await api.outbox("dispatch") == []
        assert api.banks["bank-b"].calls == []
    finally:
        await runner.cleanup()


class GarbledIsoBank:
    """An httpx MockTransport bank that takes every pain.001 (the money moves) but answers it
    badly, per `answer`; its status queries answer truthfully (ACSC)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.orders: dict[str, int] = {}  # order_no -> executions
        self.uploads: list[list[str]] = []

    def signed(self, body: bytes, status: int = 200) -> httpx.Response:
        headers = iso_wire.signed_headers(
            ISO_SECRET, body, timestamp=str(int(time.time())), nonce=f"n{time.monotonic_ns()}"
        )
        return httpx.Response(status, content=body, headers=headers)

    def report(self, *statuses: tuple[str, str]) -> bytes:
        return iso_wire.pain002(
            msg_id="R1",
            original_msg_id="M1",
            statuses=[iso_wire.TxStatus(no, code, None, f"G-{no}", None) for no, code in statuses],
            created=datetime.now(UTC),
        )

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            _, txs = iso_wire.read_pain001(request.content)
            ids = [t.order_no for t in txs]
            self.uploads.append(ids)
            for no in ids:
                self.orders[no] = self.orders.get(no, 0) or 1  # idempotent by EndToEndId
            if self.answer == "truncated":
                return self.signed(self.report(*((no, "ACTC") for no in ids))[:-50])
            # the first order accepted, the second a status word never seen, the rest missing
            return self.signed(self.report((ids[0], "ACTC"), (ids[1], "ZZZZ")))
        no = request.url.path.rsplit("/", 1)[-1]
        if no not in self.orders:
            return self.signed(self.report((no, "RJCT")), 404)
        return self.signed(self.report((no, "ACSC")))


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", ["truncated", "partial"])
async def test_a_garbled_pain002_for_a_batch_is_classified_per_order_and_settled_by_query(
    start_gateway: StartGateway, lending_core: LendingCore, answer: str
) -> None:
    bank = GarbledIsoBank(answer)
    cfg = make_config(
        lending_core.url,
        funders={
            "bank-a": {"connector": "iso20022", "connector_options": iso_options("http://iso", 4)}
        },
    )
    funder = cfg.funder("bank-a")
    assert funder is not None
    async with httpx.AsyncClient(transport=httpx.MockTransport(bank)) as mocked:
        iso = {"bank-a": IsoConnector(funder, mocked)}
        api = await start_gateway(role="api", cfg=cfg, connectors=iso)
        txns = [f"T-GARBLED-{answer}-{i}" for i in range(4)]
        orders = await accept_all(api, txns)
        await start_gateway(role="worker", cfg=cfg, banks=api.banks, connectors=iso)
        for txn in txns:
            d = await api.wait_status(txn, "succeeded")
            assert [a["funder_id"] for a in d["attempts"]] == ["bank-a"]  # never failed over
        assert [sorted(ids) for ids in bank.uploads] == [sorted(orders)]
        assert bank.orders == dict.fromkeys(orders, 1)
        # which orders the answer left in doubt: only a status query settled them
        unknown = set()
        for txn, no in zip(txns, orders, strict=True):
            if "disbursement.unknown" in [v["kind"] for v in await api.vouchers(txn)]:
                unknown.add(no)
        first = bank.uploads[0][0]  # the one order the partial answer accepted
        expected = set(orders) if answer == "truncated" else set(orders) - {first}
        assert unknown == expected
        assert api.banks["bank-b"].calls == []


@pytest.mark.asyncio
async def test_each_order_of_a_batch_follows_its_own_outcome(
    start_gateway: StartGateway,
) -> None:
    bank_a = BatchingFakeBank("bank-a", max_batch=5)
    banks: dict[str, FakeBank] = {"bank-a": bank_a, "bank-b": FakeBank("bank-b")}
    api = await start_gateway(role="api", banks=banks)
    txns = ["T-BB-ACCEPT", "T-BB-EARLY", "T-BB-LATE", "T-BB-UNKNOWN", "T-BB-ACCEPT2"]
    accept, early, late, unsure, accept2 = await accept_all(api, txns)
    bank_a.script(ACCEPT, order_no=accept)
    bank_a.script(reject(pre_execution=True), order_no=early)
    bank_a.script(reject(pre_execution=False), order_no=late)
    bank_a.script(unknown(executed=True, then=BankStatus.SUCCEEDED), order_no=unsure)
    bank_a.script(ACCEPT, order_no=accept2)

    await start_gateway(role="worker", banks=banks)
    await api.wait_status("T-BB-ACCEPT", "sent")
    await api.wait_status("T-BB-ACCEPT2", "sent")
    # refused before execution: re-routed to bank-b, as after a single call
    moved = await api.wait_status("T-BB-EARLY", "sent")
    assert [(a["funder_id"], a["status"]) for a in moved["attempts"]] == [
        ("bank-a", "failed"),
        ("bank-b", "sent"),
    ]
    # refused after execution started: failed, never re-routed
    failed = await api.wait_status("T-BB-LATE", "failed")
    assert [a["funder_id"] for a in failed["attempts"]] == ["bank-a"]
    # the answer was lost but the bank executed it: unknown, then settled by a status query
    settled = await api.wait_status("T-BB-UNKNOWN", "succeeded")
    assert [a["funder_id"] for a in settled["attempts"]] == ["bank-a"]
    assert unsure in bank_a.queries

    assert sorted(bank_a.batches[0]) == sorted([accept, early, late, unsure, accept2])
    assert len(bank_a.calls) == 5  # one batch call, no single re-send
    assert [c.order_no for c in banks["bank-b"].calls] == [order_no("T-BB-EARLY", 2)]
    assert await api.outbox("dispatch") == []


@pytest.mark.asyncio
async def test_a_batch_that_never_reaches_the_bank_is_retried_then_failed_over_per_order(
    start_gateway: StartGateway,
) -> None:
    bank_a = BatchingFakeBank("bank-a", max_batch=5, default=NOT_SENT)
    banks: dict[str, FakeBank] = {"bank-a": bank_a, "bank-b": FakeBank("bank-b")}
    api = await start_gateway(role="api", banks=banks, dispatch={"not_sent_retries": 1})
    txns = [f"T-BB-DOWN-{i}" for i in range(3)]
    await accept_all(api, txns)

    await start_gateway(role="worker", banks=banks, dispatch={"not_sent_retries": 1})
    for txn in txns:
        d = await api.wait_status(txn, "sent")
        assert [(a["funder_id"], a["status"]) for a in d["attempts"]] == [
            ("bank-a", "failed"),
            ("bank-b", "sent"),
        ]
        assert d["attempts"][0]["error"]["not_sent"] == 2
    assert len(bank_a.batches[0]) == 3
    assert bank_a.executions == {}


@pytest.mark.asyncio
async def test_a_batch_whose_earlier_send_has_no_recorded_outcome_is_never_failed_over(
    start_gateway: StartGateway,
) -> None:
    bank_a = BatchingFakeBank("bank-a", max_batch=5)
    banks: dict[str, FakeBank] = {"bank-a": bank_a, "bank-b": FakeBank("bank-b")}
    api = await start_gateway(role="api", banks=banks, dispatch={"not_sent_retries": 0})
    txns = [f"T-BB-DEAD-{i}" for i in range(3)]
    await accept_all(api, txns)
    # a worker claims the three rows, its batch call reaches the bank, and it dies
    async with api.pool.acquire() as conn:
        rows = await q.claim(conn, "dispatch", 10, 0.3)
        attempts = [await q.load_attempt(conn, r["ref_id"]) for r in rows]
    assert len(rows) == 3
    await bank_a.disburse_batch([payout_order(api.svc, a) for a in attempts if a is not None])
    bank_a.default = NOT_SENT  # now the bank cannot be reached

    await start_gateway(role="worker", banks=banks, dispatch={"not_sent_retries": 0})
    for txn in txns:
        d = await api.wait_status(txn, "processing")
        assert [a["funder_id"] for a in d["attempts"]] == ["bank-a"]
    assert banks["bank-b"].calls == []
    assert all(n == 1 for n in bank_a.executions.values())
    assert len(bank_a.batches) >= 2  # the dead worker's batch, then the re-send
