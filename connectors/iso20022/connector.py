"""`IsoConnector`: pain.001 payout instructions, pain.002 status, camt.053 statements over HTTP.

Outcome classes of a payout upload (the answer is a signed pain.002 about the order):

    200, TxSts RCVD/ACTC/ACCP/PDNG/ACSP/ACWC/ACSC…   -> PayoutResult
    200 or 422, TxSts RJCT/CANC                      -> Rejected(pre_execution when the reason
                                                        code says the payment was never executed,
                                                        `wire.PRE_EXECUTION_REASONS`)
    400, 401, 403                                    -> Rejected(pre_execution=True)
    409                                              -> OutcomeUnknown("order_conflict")
    5xx, unsigned/invalid/truncated XML, an XML bomb, an unknown status code, read timeout
                                                     -> OutcomeUnknown
    connection refused, DNS, connect timeout         -> NotSent

`query` answers NOT_FOUND only for the bank's signed 404 pain.002 with TxSts RJCT and reason
NOOR (no original transaction received).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, date, datetime
from urllib.parse import quote

import httpx
import structlog
from aiohttp import web

from config.models import Funder
from connectors import http
from connectors.base import BankStatus, CallbackEvent, PayoutOrder, PayoutResult, StatementLine
from connectors.errors import CallbackRejected, ConnectorError, OutcomeUnknown, Rejected
from connectors.iso20022 import wire

log = structlog.get_logger("fundgate.connectors.iso20022")

NOT_FOUND_REASON = "NOOR"
_REFUSED_BEFORE_EXECUTION = (400, 401, 403)


def _result(s: wire.TxStatus) -> PayoutResult:
    status = wire.map_status(s.code)
    return PayoutResult(
        order_no=s.order_no,
        status=status,
        bank_ref=s.bank_ref,
        amount=s.amount,
        fail_code=s.reason if status is BankStatus.FAILED else None,
        fail_reason=f"pain.002 {s.code} {s.reason or ''}".strip()
        if status is BankStatus.FAILED
        else None,
        finished_at=s.at if status in (BankStatus.SUCCEEDED, BankStatus.FAILED) else None,
        pre_execution=wire.pre_execution(s.code, s.reason),
    )


class IsoConnector:
    """One funder speaking ISO 20022; `IsoConnector(funder, client, clock=…)`."""

    name: str = "iso20022"

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

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        what = f"iso20022 payout {order.order_no}"
        created = datetime.fromtimestamp(self._clock(), UTC)
        try:
            body = wire.pain001(self.options, [order], msg_id=order.order_no, created=created)
        except wire.WireFormatError as e:
            # nothing was sent: our own message failed the XSD
            raise Rejected(f"{what}: {e}", code="invalid_pain001", pre_execution=True) from e
        request = self._request("POST", self.options.upload_path, body)
        request.headers[wire.CALLBACK_HEADER] = order.callback_url
        response = await http.send(self._client, request, what=what)
        code = response.status_code
        if code >= 500:
            self._bad_reply(what, response, "server_error")
            raise http.unexpected_status(response, what)
        if code in (200, 422):
            result = self._status(response, order.order_no, what)
            match result.status:
                case BankStatus.ACCEPTED | BankStatus.PROCESSING | BankStatus.SUCCEEDED:
                    if code == 200:
                        return result
                case BankStatus.FAILED:
                    raise Rejected(
                        f"{what}: {result.fail_reason}",
                        code=result.fail_code or "RJCT",
                        pre_execution=result.pre_execution,
                    )
                case _:
                    pass
            self._bad_reply(what, response, "unknown_status")
            raise OutcomeUnknown(f"{what}: status is not an acceptance", code="unknown_status")
        if code == 409:
            raise OutcomeUnknown(f"{what}: the bank holds this order number", code="order_conflict")
        if code in _REFUSED_BEFORE_EXECUTION:
            raise Rejected(
                f"{what}: refused with HTTP {code}", code=f"http_{code}", pre_execution=True
            )
        self._bad_reply(what, response, "unexpected_status")
        raise http.unexpected_status(response, what)

    async def query(self, order_no: str) -> PayoutResult:
        what = f"iso20022 query {order_no}"
        path = self.options.status_path.replace("{order_no}", quote(order_no, safe=""))
        response = await http.send(self._client, self._request("GET", path, b""), what=what)
        if response.status_code == 200:
            return self._status(response, order_no, what)
        if response.status_code == 404:
            result = self._status(response, order_no, what)
            if result.status is BankStatus.FAILED and result.fail_code == NOT_FOUND_REASON:
                return PayoutResult(order_no=order_no, status=BankStatus.NOT_FOUND)
        self._bad_reply(what, response, "unexpected_status")
        raise http.unexpected_status(response, what)

    async def fetch_statement(self, day: date) -> AsyncIterator[StatementLine]:
        what = f"iso20022 statement {day.isoformat()}"
        path = self.options.statement_path.replace("{day}", day.isoformat())
        request = self._request("GET", path, b"")
        with http.classify_transport_errors(what):
            response = await self._client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    await response.aread()
                    raise http.unexpected_status(response, what)
                parser = wire.CamtStream()
                async for chunk in response.aiter_bytes():
                    try:
                        for line in parser.feed(chunk):
                            yield line
                    except wire.WireFormatError as e:
                        raise ConnectorError(f"{what}: {e}", code="malformed_statement") from e
                try:
                    for line in parser.close():
                        yield line
                except wire.WireFormatError as e:
                    raise ConnectorError(f"{what}: {e}", code="malformed_statement") from e
            finally:
                await response.aclose()

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the gateway."""

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> CallbackEvent:
        try:
            ts, nonce = wire.verify(self._secret, headers, body, self._clock())
        except wire.SignatureError as e:
            raise CallbackRejected(e.reason, e.message) from e
        try:
            statuses = wire.read_pain002(body)
        except wire.WireFormatError as e:
            raise CallbackRejected("malformed", str(e)) from e
        if len(statuses) != 1:
            raise CallbackRejected("malformed", f"{len(statuses)} transactions, expected 1")
        r = _result(statuses[0])
        return CallbackEvent(
            order_no=r.order_no,
            status=r.status,
            nonce=nonce,
            timestamp=ts,
            bank_ref=r.bank_ref,
            amount=r.amount,
            fail_code=r.fail_code,
            fail_reason=r.fail_reason,
            finished_at=r.finished_at,
            raw={"TxSts": statuses[0].code, "Rsn": statuses[0].reason},
        )

    def callback_ack(self, ok: bool) -> web.Response:
        return web.Response(status=200 if ok else 400, text="ACK" if ok else "NACK")

    # --- helpers ----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes) -> httpx.Request:
        headers = wire.signed_headers(
            self._secret, body, timestamp=str(int(self._clock())), nonce=secrets.token_hex(16)
        )
        return self._client.build_request(
            method,
            self.options.base_url + path,
            content=body,
            headers=headers,
            timeout=self._timeout,
        )

    def _status(self, response: httpx.Response, order_no: str, what: str) -> PayoutResult:
        try:
            wire.verify(self._secret, response.headers, response.content, self._clock())
            statuses = wire.read_pain002(response.content)
        except wire.SignatureError as e:
            self._bad_reply(what, response, e.reason)
            raise OutcomeUnknown(f"{what}: answer not trusted: {e.message}", code=e.reason) from e
        except wire.WireFormatError as e:
            self._bad_reply(what, response, "malformed")
            raise OutcomeUnknown(f"{what}: unreadable pain.002: {e}", code="malformed") from e
        mine = [s for s in statuses if s.order_no == order_no]
        if len(mine) != 1:
            self._bad_reply(what, response, "malformed")
            raise OutcomeUnknown(f"{what}: pain.002 does not report this order", code="malformed")
        return _result(mine[0])

    def _bad_reply(self, what: str, response: httpx.Response, reason: str) -> None:
        body = response.content
        log.warning(
            "iso20022.bad_reply",
            funder_id=self.funder_id,
            what=what,
            reason=reason,
            http_status=response.status_code,
            raw=wire.masked_excerpt(body),
        )
