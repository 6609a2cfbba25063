"""SandboxConnector against recorded sandbox-bank answers (respx): every outcome class."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime

import httpx
import pytest
import respx

from config.models import Funder
from connectors import registry
from connectors.base import BankConnector, BankStatus, PayoutOrder
from connectors.errors import (
    CallbackRejected,
    ConnectorError,
    NotSent,
    OutcomeUnknown,
    Rejected,
)
from connectors.sandbox import wire
from connectors.sandbox.connector import SandboxConnector

BASE = "http://bank-a.test"
SECRET = "sandbox-secret-a"
NOW = 1_764_036_000  # 2025-11-25T02:00:00Z

# Answers recorded from connectors/sandbox/bank.py.
ACCEPTED = {
    "order_no": "LC1-1",
    "bank_ref": "SBX0000000001",
    "status": "ACCEPTED",
    "amount": 1000000,
    "finished_at": None,
    "fail_code": None,
    "fail_reason": None,
    "pre_execution": False,
}
SUCCEEDED = {
    **ACCEPTED,
    "status": "SUCCESS",
    "finished_at": "2025-11-25T10:00:00.123000+08:00",
}
FAILED = {
    **ACCEPTED,
    "status": "FAILED",
    "finished_at": "2025-11-25T10:00:00.123000+08:00",
    "fail_code": "ACCOUNT_FROZEN",
    "fail_reason": "payee account is frozen",
    "pre_execution": True,
}
REJECTED = {
    "status": "REJECTED",
    "fail_code": "RISK_REJECTED",
    "fail_reason": "payee account failed the bank's risk check",
    "pre_execution": True,
}
CONFLICT = {
    "status": "CONFLICT",
    "fail_code": "ORDER_CONFLICT",
    "fail_reason": "order_no already used with a different payload",
}
NOT_FOUND = {"status": "NOT_FOUND", "order_no": "LC1-1"}
HTML = "<html><body><h1>502 Bad Gateway</h1></body></html>"

ORDER = PayoutOrder(
    order_no="LC1-1",
    txn_no="LC1",
    funder_id="bank-a",
    amount=1_000_000,
    currency="CNY",
    account_no="6222020200112233445",
    account_name="张三",
    bank_code="ICBC",
    mode="direct",
    funder_amount=1_000_000,
    platform_amount=0,
    callback_url="http://127.0.0.1:8700/v1/callbacks/bank-a",
)


def funder(**options: object) -> Funder:
    return Funder(
        id="bank-a",
        name="Sandbox Bank A",
        license="bank",
        mode="direct",
        priority=1,
        products=["consumer-standard"],
        single_max=20_000_000,
        daily_limit=5_000_000_000,
        connector="sandbox",
        connector_options={"base_url": BASE, "secret": SECRET, **options},
    )


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def bank() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def connector(client: httpx.AsyncClient, clock: Clock) -> SandboxConnector:
    return SandboxConnector(funder(), client, clock=clock)


def assert_signed(request: httpx.Request) -> None:
    ts = request.headers["X-Sandbox-Timestamp"]
    nonce = request.headers["X-Sandbox-Nonce"]
    assert ts == str(NOW)
    assert request.headers["X-Sandbox-Signature"] == wire.sign(SECRET, ts, nonce, request.content)


# --- construction -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_entry_point_builds_the_connector_from_funder_options(
    client: httpx.AsyncClient,
) -> None:
    built = registry.build(funder(), client)
    assert isinstance(built, SandboxConnector)
    assert isinstance(built, BankConnector)
    assert built.name == "sandbox"


@pytest.mark.asyncio
async def test_invalid_options_make_the_constructor_raise_value_error(
    client: httpx.AsyncClient,
) -> None:
    with pytest.raises(ValueError, match="timeout_seconds") as info:
        SandboxConnector(funder(timeout_seconds="soon", region="cn"), client)
    assert "region: unknown option" in str(info.value)


# --- disburse -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_accepted_payout_is_a_signed_idempotent_post(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    route = bank.post("/api/payouts").respond(200, json=ACCEPTED)
    result = await connector.disburse(ORDER)
    assert result.status is BankStatus.ACCEPTED
    assert result.bank_ref == "SBX0000000001"
    request = route.calls.last.request
    assert_signed(request)
    assert request.headers["Idempotency-Key"] == "LC1-1"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "order_no": "LC1-1",
        "amount": 1_000_000,
        "currency": "CNY",
        "account_no": "6222020200112233445",
        "account_name": "张三",
        "bank_code": "ICBC",
        "callback_url": "http://127.0.0.1:8700/v1/callbacks/bank-a",
    }


@pytest.mark.asyncio
async def test_every_request_gets_a_fresh_nonce(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    route = bank.post("/api/payouts").respond(200, json=ACCEPTED)
    await connector.disburse(ORDER)
    await connector.disburse(ORDER)
    nonces = {call.request.headers["X-Sandbox-Nonce"] for call in route.calls}
    assert len(nonces) == 2


@pytest.mark.asyncio
async def test_request_timeout_comes_from_options_with_a_shorter_connect(
    bank: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    route = bank.post("/api/payouts").respond(200, json=ACCEPTED)
    await SandboxConnector(funder(timeout_seconds=20), client).disburse(ORDER)
    timeout = route.calls.last.request.extensions["timeout"]
    assert timeout == {"connect": 3.0, "read": 20.0, "write": 20.0, "pool": 20.0}


@pytest.mark.asyncio
async def test_already_succeeded_resend_is_a_result(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    bank.post("/api/payouts").respond(200, json=SUCCEEDED)
    result = await connector.disburse(ORDER)
    assert result.status is BankStatus.SUCCEEDED
    assert result.finished_at == datetime(2025, 11, 25, 2, 0, 0, 123000, tzinfo=UTC)


@pytest.mark.asyncio
async def test_resend_of_a_failed_order_is_rejected_with_its_pre_execution_flag(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    bank.post("/api/payouts").respond(200, json=FAILED)
    with pytest.raises(Rejected) as info:
        await connector.disburse(ORDER)
    assert info.value.pre_execution is True
    assert info.value.code == "ACCOUNT_FROZEN"


@pytest.mark.asyncio
async def test_422_rejection_is_rejected_before_execution(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    bank.post("/api/payouts").respond(422, json=REJECTED)
    with pytest.raises(Rejected) as info:
        await connector.disburse(ORDER)
    assert info.value.pre_execution is True
    assert info.value.code == "RISK_REJECTED"


@pytest.mark.asyncio
async def test_422_that_admits_execution_is_a_terminal_rejection(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    bank.post("/api/payouts").respond(422, json={**REJECTED, "pre_execution": False})
    with pytest.raises(Rejected) as info:
        await connector.disburse(ORDER)
    assert info.value.pre_execution is False


@pytest.mark.asyncio
async def test_409_order_conflict_is_an_unknown_outcome_never_failed_over(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    # the bank already holds this order number: it may have paid, so only a query may decide
    bank.post("/api/payouts").respond(409, json=CONFLICT)
    with pytest.raises(OutcomeUnknown) as info:
        await connector.disburse(ORDER)
    assert info.value.code == "order_conflict"


@pytest.mark.asyncio
async def test_401_bad_signature_is_rejected_before_execution(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    bank.post("/api/payouts").respond(401, json={"error": "bad_signature"})
    with pytest.raises(Rejected) as info:
        await connector.disburse(ORDER)
    assert info.value.code == "unauthorized"
    assert info.value.pre_execution is True


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, json={"error": "internal_error"}),
        httpx.Response(502, text=HTML),
        httpx.Response(503),
        httpx.Response(200, text=HTML),  # a proxy's page with a 200
        httpx.Response(200, json={**ACCEPTED, "order_no": "LC9-1"}),  # about another order
        httpx.Response(200, json={**ACCEPTED, "status": "ON_HOLD"}),  # unknown status word
        httpx.Response(422, text=HTML),  # cannot tell whether it was pre-execution
        httpx.Response(404, text=HTML),  # a wrong path says nothing about the order
        httpx.Response(429),
    ],
    ids=[
        "500",
        "502-html",
        "503-empty",
        "200-html",
        "200-other-order",
        "200-unknown-status",
        "422-html",
        "404-html",
        "429",
    ],
)
@pytest.mark.asyncio
async def test_answers_that_may_follow_execution_are_outcome_unknown(
    bank: respx.MockRouter, connector: SandboxConnector, answer: httpx.Response
) -> None:
    bank.post("/api/payouts").mock(return_value=answer)
    with pytest.raises(OutcomeUnknown):
        await connector.disburse(ORDER)


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.ReadError("connection reset"),
        httpx.WriteError("broken pipe"),
        httpx.RemoteProtocolError("server disconnected without sending a response"),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.asyncio
async def test_transport_errors_after_sending_are_outcome_unknown(
    bank: respx.MockRouter, connector: SandboxConnector, error: httpx.TransportError
) -> None:
    bank.post("/api/payouts").mock(side_effect=error)
    with pytest.raises(OutcomeUnknown) as info:
        await connector.disburse(ORDER)
    assert info.value.__cause__ is error


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectError("[Errno -2] Name or service not known"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.PoolTimeout("no connection available"),
    ],
    ids=["refused", "dns", "connect-timeout", "pool-timeout"],
)
@pytest.mark.asyncio
async def test_errors_before_sending_are_not_sent(
    bank: respx.MockRouter, connector: SandboxConnector, error: httpx.TransportError
) -> None:
    bank.post("/api/payouts").mock(side_effect=error)
    with pytest.raises(NotSent) as info:
        await connector.disburse(ORDER)
    assert info.value.__cause__ is error


# --- query --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_query_maps_the_bank_status(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    route = bank.get("/api/payouts/LC1-1").respond(200, json=SUCCEEDED)
    result = await connector.query("LC1-1")
    assert result.status is BankStatus.SUCCEEDED
    assert result.amount == 1_000_000
    assert_signed(route.calls.last.request)
    assert route.calls.last.request.content == b""


@pytest.mark.asyncio
async def test_query_of_a_failed_order_says_whether_money_moved(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    bank.get("/api/payouts/LC1-1").respond(200, json=FAILED)
    result = await connector.query("LC1-1")
    assert result.status is BankStatus.FAILED
    assert result.pre_execution is True
    assert result.fail_code == "ACCOUNT_FROZEN"


@pytest.mark.asyncio
async def test_query_of_an_unknown_order_is_not_found(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    bank.get("/api/payouts/LC1-1").respond(404, json=NOT_FOUND)
    result = await connector.query("LC1-1")
    assert result.status is BankStatus.NOT_FOUND
    assert result.order_no == "LC1-1"


@pytest.mark.asyncio
async def test_query_path_escapes_the_order_number(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    route = bank.get(url=f"{BASE}/api/payouts/A%2FB%20C").respond(
        200, json={**ACCEPTED, "order_no": "A/B C"}
    )
    assert (await connector.query("A/B C")).status is BankStatus.ACCEPTED
    assert route.called


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(404, text=HTML), OutcomeUnknown),
        (httpx.Response(500), OutcomeUnknown),
        (httpx.Response(200, text="ok"), OutcomeUnknown),
        (httpx.ReadTimeout("read timed out"), OutcomeUnknown),
        (httpx.ConnectError("connection refused"), NotSent),
    ],
    ids=["404-html", "500", "200-text", "read-timeout", "connect-error"],
)
@pytest.mark.asyncio
async def test_query_that_cannot_tell_raises(
    bank: respx.MockRouter,
    connector: SandboxConnector,
    answer: httpx.Response | Exception,
    error: type[ConnectorError],
) -> None:
    route = bank.get("/api/payouts/LC1-1")
    if isinstance(answer, Exception):
        route.mock(side_effect=answer)
    else:
        route.mock(return_value=answer)
    with pytest.raises(error):
        await connector.query("LC1-1")


# --- callbacks ----------------------------------------------------------------------------

CALLBACK_BODY = json.dumps(
    {
        "order_no": "LC1-1",
        "bank_ref": "SBX0000000001",
        "status": "SUCCESS",
        "amount": 1000000,
        "finished_at": "2025-11-25T10:00:00.123000+08:00",
        "fail_code": None,
        "fail_reason": None,
    }
).encode()


def callback_headers(body: bytes, *, ts: int = NOW, nonce: str = "n-1") -> dict[str, str]:
    return wire.signed_headers(SECRET, body, timestamp=str(ts), nonce=nonce)


def test_valid_callback_becomes_an_event(connector: SandboxConnector) -> None:
    headers = {k.lower(): v for k, v in callback_headers(CALLBACK_BODY).items()}
    event = connector.parse_callback(headers, CALLBACK_BODY)
    assert event.order_no == "LC1-1"
    assert event.status is BankStatus.SUCCEEDED
    assert event.nonce == "n-1"
    assert event.timestamp == NOW
    assert event.bank_ref == "SBX0000000001"
    assert event.amount == 1_000_000
    assert event.finished_at == datetime(2025, 11, 25, 2, 0, 0, 123000, tzinfo=UTC)
    assert event.raw["status"] == "SUCCESS"


def test_failed_callback_carries_the_bank_reason(connector: SandboxConnector) -> None:
    body = json.dumps(
        {"order_no": "LC1-1", "status": "FAILED", "fail_code": "ACCOUNT_FROZEN", "amount": 5}
    ).encode()
    event = connector.parse_callback(callback_headers(body), body)
    assert event.status is BankStatus.FAILED
    assert event.fail_code == "ACCOUNT_FROZEN"


def test_tampered_callback_body_is_a_bad_signature(connector: SandboxConnector) -> None:
    headers = callback_headers(CALLBACK_BODY)
    tampered = CALLBACK_BODY.replace(b"1000000", b"9000000")
    with pytest.raises(CallbackRejected) as info:
        connector.parse_callback(headers, tampered)
    assert info.value.reason == "bad_signature"


def test_callback_signed_with_another_secret_is_a_bad_signature(
    connector: SandboxConnector,
) -> None:
    headers = wire.signed_headers("wrong", CALLBACK_BODY, timestamp=str(NOW), nonce="n")
    with pytest.raises(CallbackRejected) as info:
        connector.parse_callback(headers, CALLBACK_BODY)
    assert info.value.reason == "bad_signature"


@pytest.mark.parametrize(
    "missing", ["X-Sandbox-Timestamp", "X-Sandbox-Nonce", "X-Sandbox-Signature"]
)
def test_callback_missing_a_header_is_a_bad_signature(
    connector: SandboxConnector, missing: str
) -> None:
    headers = callback_headers(CALLBACK_BODY)
    del headers[missing]
    with pytest.raises(CallbackRejected) as info:
        connector.parse_callback(headers, CALLBACK_BODY)
    assert info.value.reason == "bad_signature"


@pytest.mark.parametrize("skew", [301, -301, 86_400])
def test_callback_outside_300_seconds_is_stale(
    connector: SandboxConnector, clock: Clock, skew: int
) -> None:
    headers = callback_headers(CALLBACK_BODY)
    clock.now = NOW + skew
    with pytest.raises(CallbackRejected) as info:
        connector.parse_callback(headers, CALLBACK_BODY)
    assert info.value.reason == "stale"


def test_callback_at_the_edge_of_the_window_is_fresh(
    connector: SandboxConnector, clock: Clock
) -> None:
    headers = callback_headers(CALLBACK_BODY)
    clock.now = NOW + 300
    assert connector.parse_callback(headers, CALLBACK_BODY).order_no == "LC1-1"


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"status":"SUCCESS"}'])
def test_signed_but_unreadable_callback_is_malformed(
    connector: SandboxConnector, body: bytes
) -> None:
    with pytest.raises(CallbackRejected) as info:
        connector.parse_callback(callback_headers(body), body)
    assert info.value.reason == "malformed"


def test_unsigned_garbage_is_a_bad_signature_not_malformed(connector: SandboxConnector) -> None:
    headers = callback_headers(CALLBACK_BODY)
    with pytest.raises(CallbackRejected) as info:
        connector.parse_callback(headers, b"not json")
    assert info.value.reason == "bad_signature"


def test_callback_ack_is_what_the_bank_expects(connector: SandboxConnector) -> None:
    ok = connector.callback_ack(True)
    assert (ok.status, ok.text) == (200, "SUCCESS")
    refused = connector.callback_ack(False)
    assert (refused.status, refused.text) == (400, "FAIL")


# --- statements ---------------------------------------------------------------------------

STATEMENT = (
    "order_no,bank_ref,amount,status,finished_at\n"
    "LC1-1,SBX0000000001,1000000,SUCCESS,2025-11-25T10:00:00.123000+08:00\n"
    "LC2-1,SBX0000000002,500000,FAILED,2025-11-25T10:00:01+08:00\n"
    "LC3-1,SBX0000000003,300000,REVERSED,2025-11-25T11:00:00+08:00\n"
)


@pytest.mark.asyncio
async def test_statement_is_streamed_line_by_line(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    produced: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        data = STATEMENT.encode()
        for i in range(0, len(data), 7):  # chunk borders fall inside lines
            produced.append(i)
            yield data[i : i + 7]

    route = bank.get("/api/statements/2025-11-25").respond(200, content=chunks())
    seen: list[tuple[str, str, int]] = []
    chunks_when_first_line_arrived = None
    async for line in connector.fetch_statement(date(2025, 11, 25)):
        if chunks_when_first_line_arrived is None:
            chunks_when_first_line_arrived = len(produced)
        seen.append((line.order_no, line.status, line.amount))
    assert seen == [
        ("LC1-1", "succeeded", 1_000_000),
        ("LC2-1", "failed", 500_000),
        ("LC3-1", "reversed", 300_000),
    ]
    assert chunks_when_first_line_arrived is not None
    assert chunks_when_first_line_arrived < len(produced)  # not read whole before yielding
    assert_signed(route.calls.last.request)


@pytest.mark.asyncio
async def test_empty_statement_has_only_its_header(
    bank: respx.MockRouter, connector: SandboxConnector
) -> None:
    bank.get("/api/statements/2025-11-25").respond(200, text=wire.STATEMENT_HEADER + "\n")
    assert [x async for x in connector.fetch_statement(date(2025, 11, 25))] == []


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(500), OutcomeUnknown),
        (httpx.Response(200, text=HTML), ConnectorError),
        (httpx.Response(200, text=""), ConnectorError),
        (
            httpx.Response(200, text=wire.STATEMENT_HEADER + "\nLC1-1,R,abc,SUCCESS,\n"),
            ConnectorError,
        ),
        (httpx.ConnectError("refused"), NotSent),
    ],
    ids=["500", "html", "empty", "bad-amount", "connect-error"],
)
@pytest.mark.asyncio
async def test_unusable_statement_raises(
    bank: respx.MockRouter,
    connector: SandboxConnector,
    answer: httpx.Response | Exception,
    error: type[ConnectorError],
) -> None:
    route = bank.get("/api/statements/2025-11-25")
    if isinstance(answer, Exception):
        route.mock(side_effect=answer)
    else:
        route.mock(return_value=answer)
    with pytest.raises(error):
        _ = [x async for x in connector.fetch_statement(date(2025, 11, 25))]


@pytest.mark.asyncio
async def test_aclose_leaves_the_shared_client_open(
    bank: respx.MockRouter, connector: SandboxConnector, client: httpx.AsyncClient
) -> None:
    await connector.aclose()
    assert not client.is_closed
