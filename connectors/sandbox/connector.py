"""`SandboxConnector`: fundgate's `BankConnector` for the sandbox bank's HTTP API.

Outcome classes of a payout request:

    200 ACCEPTED | PROCESSING | SUCCESS   -> PayoutResult
    200 FAILED | REJECTED (a re-send)     -> Rejected(pre_execution from the answer)
    400, 401, 403                         -> Rejected(pre_execution=True): refused before any
                                             state change (bad body, bad signature)
    409                                   -> OutcomeUnknown(code="order_conflict"): the bank
                                             already holds this order number, and only a
                                             query can tell whether that order paid
    422 REJECTED                          -> Rejected(pre_execution from the answer)
    5xx, any other status, unreadable body, read timeout -> OutcomeUnknown
    connection refused, DNS, connect timeout             -> NotSent
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import date
from urllib.parse import quote

import httpx
from aiohttp import web

from config.models import Funder
from connectors import http
from connectors.base import BankStatus, CallbackEvent, PayoutOrder, PayoutResult, StatementLine
from connectors.errors import CallbackRejected, ConnectorError, OutcomeUnknown, Rejected
from connectors.sandbox import wire

# Statuses the sandbox bank answers before it looks at (let alone executes) an order.
_REFUSED_BEFORE_EXECUTION = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
}


class SandboxConnector:
    """Talks to one sandbox bank: signed JSON over HTTP, HMAC-signed result callbacks.

    Built by the `fundgate.connectors` entry point `sandbox` as
    `SandboxConnector(funder, client)`; `funder.connector_options` must be valid
    `SandboxOptions` or the constructor raises `ValueError`. The `httpx.AsyncClient` is shared
    and owned by the gateway. `clock` (unix seconds) signs requests and judges freshness.
    """

    name: str = "sandbox"

    def __init__(
        self,
        funder: Funder,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.funder_id = funder.id
        self.options = wire.parse_options(funder.connector_options)
        self._secret = self.options.secret.get_secret_value()
        self._client = client
        self._clock = clock
        self._timeout = http.request_timeout(self.options.timeout_seconds)

    # --- outbound ---------------------------------------------------------------------

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        what = f"sandbox payout {order.order_no}"
        body = wire.payout_request_body(order)
        request = self._request(
            "POST",
            "/api/payouts",
            body,
            {"Content-Type": "application/json", wire.IDEMPOTENCY_HEADER: order.order_no},
        )
        response = await http.send(self._client, request, what=what)
        status = response.status_code
        if status == 200:
            result = self._view(response, order.order_no, what)
            match result.status:
                case BankStatus.ACCEPTED | BankStatus.PROCESSING | BankStatus.SUCCEEDED:
                    return result
                case BankStatus.FAILED:
                    # A re-send of an order that already failed: the bank's final word.
                    raise Rejected(
                        f"{what}: already failed: {result.fail_reason or result.fail_code}",
                        code=result.fail_code or "failed",
                        pre_execution=result.pre_execution,
                    )
                case _:
                    raise OutcomeUnknown(
                        f"{what}: bank status {result.status} is not an acceptance",
                        code="unknown_status",
                    )
        if status == 422:
            try:
                rejection = wire.parse_rejection(response.content)
            except wire.WireFormatError as e:
                raise OutcomeUnknown(f"{what}: unreadable rejection", code="malformed") from e
            raise Rejected(
                f"{what}: rejected: {rejection.fail_reason or rejection.fail_code}",
                code=rejection.fail_code or "rejected",
                pre_execution=rejection.pre_execution,
            )
        if status == 409:
            raise OutcomeUnknown(
                f"{what}: the bank holds this order number with a different payload",
                code="order_conflict",
            )
        if status in _REFUSED_BEFORE_EXECUTION:
            raise Rejected(
                f"{what}: refused with HTTP {status}",
                code=_REFUSED_BEFORE_EXECUTION[status],
                pre_execution=True,
            )
        raise http.unexpected_status(response, what)

    async def query(self, order_no: str) -> PayoutResult:
        what = f"sandbox query {order_no}"
        request = self._request("GET", f"/api/payouts/{quote(order_no, safe='')}")
        response = await http.send(self._client, request, what=what)
        if response.status_code == 200:
            return self._view(response, order_no, what)
        if response.status_code == 404:
            # Only the bank's own NOT_FOUND proves the order was never seen; a bare 404
            # (a proxy, a wrong base_url) must not let the gateway fail over and pay twice.
            try:
                wire.parse_not_found(response.content)
            except wire.WireFormatError as e:
                raise OutcomeUnknown(f"{what}: 404 without NOT_FOUND", code="malformed") from e
            return PayoutResult(order_no=order_no, status=BankStatus.NOT_FOUND)
        raise http.unexpected_status(response, what)

    async def fetch_statement(self, day: date) -> AsyncIterator[StatementLine]:
        what = f"sandbox statement {day.isoformat()}"
        request = self._request("GET", f"/api/statements/{day.isoformat()}")
        reader = wire.StatementReader()
        with http.classify_transport_errors(what):
            response = await self._client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    await response.aread()
                    raise http.unexpected_status(response, what)
                async for line in response.aiter_lines():
                    try:
                        parsed = reader.feed(line)
                    except wire.WireFormatError as e:
                        raise ConnectorError(f"{what}: {e}", code="malformed_statement") from e
                    if parsed is not None:
                        yield parsed
            finally:
                await response.aclose()
        try:
            reader.finish()
        except wire.WireFormatError as e:
            raise ConnectorError(f"{what}: {e}", code="malformed_statement") from e

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the gateway."""

    # --- inbound ----------------------------------------------------------------------

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> CallbackEvent:
        lowered = {k.lower(): v for k, v in headers.items()}
        timestamp = lowered.get(wire.TIMESTAMP_HEADER.lower())
        nonce = lowered.get(wire.NONCE_HEADER.lower())
        signature = lowered.get(wire.SIGNATURE_HEADER.lower())
        if not timestamp or not nonce or not signature:
            raise CallbackRejected("bad_signature", "missing X-Sandbox signature header(s)")
        if not wire.signature_matches(self._secret, timestamp, nonce, body, signature):
            raise CallbackRejected("bad_signature", "signature does not match")
        # Everything below is authentic: a failure is the bank's bug, not an attack.
        try:
            ts = wire.parse_timestamp(timestamp)
        except wire.WireFormatError as e:
            raise CallbackRejected("malformed", str(e)) from e
        if not wire.is_fresh(ts, self._clock()):
            raise CallbackRejected(
                "stale", f"timestamp {ts} is outside ±{wire.MAX_CLOCK_SKEW_SECONDS} s"
            )
        try:
            message, raw = wire.parse_callback_body(body)
        except wire.WireFormatError as e:
            raise CallbackRejected("malformed", str(e)) from e
        return CallbackEvent(
            order_no=message.order_no,
            status=wire.callback_status(message),
            nonce=nonce,
            timestamp=ts,
            bank_ref=message.bank_ref,
            amount=message.amount,
            fail_code=message.fail_code,
            fail_reason=message.fail_reason,
            finished_at=wire.callback_finished_at(message),
            raw=raw,
        )

    def callback_ack(self, ok: bool) -> web.Response:
        # The bank treats exactly `200 SUCCESS` as delivered and retries anything else.
        if ok:
            return web.Response(status=200, text="SUCCESS")
        return web.Response(status=400, text="FAIL")

    # --- helpers ----------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        extra_headers: Mapping[str, str] | None = None,
    ) -> httpx.Request:
        headers = wire.signed_headers(
            self._secret,
            body,
            timestamp=str(int(self._clock())),
            nonce=secrets.token_hex(16),
        )
        headers.update(extra_headers or {})
        return self._client.build_request(
            method,
            self.options.base_url + path,
            content=body,
            headers=headers,
            timeout=self._timeout,
        )

    def _view(self, response: httpx.Response, order_no: str, what: str) -> PayoutResult:
        try:
            return wire.parse_payout_view(response.content, order_no=order_no)
        except wire.WireFormatError as e:
            raise OutcomeUnknown(f"{what}: unreadable answer", code="malformed") from e
