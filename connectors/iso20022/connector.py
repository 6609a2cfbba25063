"""`IsoConnector`: pain.001 payout instructions, pain.002 status, camt.053 statements over HTTP.

Outcome classes of a payout upload (the answer is a signed pain.002 about the orders), for
each order of the message:

    200, its TxSts RCVD/ACTC/ACCP/PDNG/ACSP/ACWC/ACSC…   -> PayoutResult
    200 or 422, its TxSts RJCT/CANC                      -> Rejected(pre_execution when the reason
                                                            code says the payment was never
                                                            executed, `wire.PRE_EXECUTION_REASONS`)
    200 or 422, RJCT with reason DUPL                    -> OutcomeUnknown("duplicate"): the order
                                                            it repeats may have been executed
    200 or 422, the order missing from the pain.002 or reported twice, an unknown status code
                                                         -> OutcomeUnknown
    the order's own pain.001 fails the XSD               -> Rejected(pre_execution=True), never sent
    400, 401, 403                                        -> Rejected(pre_execution=True)
    409                                                  -> OutcomeUnknown("order_conflict")
    5xx, unsigned/invalid/truncated XML, an XML bomb, read timeout
                                                         -> OutcomeUnknown
    connection refused, DNS, connect timeout             -> NotSent

A message-level answer (every row but the first three) applies to every order the message
carried. With `batch_size` above 1 the dispatcher hands over up to that many orders of this
funder at once (`disburse_batch`): they travel as one pain.001, one `CdtTrfTxInf` each.

`query` answers NOT_FOUND only for the bank's signed 404 pain.002 with TxSts RJCT and reason
NOOR (no original transaction received).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, date, datetime
from urllib.parse import quote

import httpx
import structlog
from aiohttp import web

from config.models import Funder
from connectors import http
from connectors.base import (
    BankStatus,
    CallbackEvent,
    PayoutOrder,
    PayoutOutcome,
    PayoutResult,
    StatementLine,
)
from connectors.errors import (
    CallbackRejected,
    ConnectorError,
    NotSent,
    OutcomeUnknown,
    Rejected,
    StatementError,
)
from connectors.iso20022 import camt053, wire

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


def _batch_id(created: datetime) -> str:
    """A MsgId for a message of several orders: unique, within Max35Text. (A message of one
    order keeps the order number, as before batching.)"""
    return f"B{created:%Y%m%d%H%M%S}{secrets.token_hex(8)}"


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
        self.max_batch = self.options.batch_size
        self._client = client
        self._clock = clock
        self._timeout = http.request_timeout(self.options.timeout_seconds)

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        outcome = (await self.disburse_batch([order]))[0]
        if isinstance(outcome, PayoutResult):
            return outcome
        raise outcome

    async def disburse_batch(self, orders: Sequence[PayoutOrder]) -> list[PayoutOutcome]:
        """One pain.001 for `orders`, one outcome per order from the pain.002 (see the table
        above); never raises for what the bank or the network did."""
        if not orders:
            return []
        created = datetime.fromtimestamp(self._clock(), UTC)
        outcomes: dict[str, PayoutOutcome] = {}
        sendable = list(orders)
        msg_id = orders[0].order_no if len(orders) == 1 else _batch_id(created)
        try:
            body = wire.pain001(self.options, sendable, msg_id=msg_id, created=created)
        except wire.WireFormatError:
            # one bad order must not hold back the others: find it, send the rest
            for o in orders:
                try:
                    wire.pain001(self.options, [o], msg_id=o.order_no, created=created)
                except wire.WireFormatError as e:
                    # nothing was sent: our own message failed the XSD
                    outcomes[o.order_no] = Rejected(
                        f"iso20022 payout {o.order_no}: {e}",
                        code="invalid_pain001",
                        pre_execution=True,
                    )
            sendable = [o for o in orders if o.order_no not in outcomes]
            body = b""
            if sendable:
                if len(sendable) == 1:
                    msg_id = sendable[0].order_no
                try:
                    body = wire.pain001(self.options, sendable, msg_id=msg_id, created=created)
                except wire.WireFormatError as e:
                    for o in sendable:
                        outcomes[o.order_no] = Rejected(
                            f"iso20022 pain.001 {msg_id}: {e}",
                            code="invalid_pain001",
                            pre_execution=True,
                        )
                    sendable = []
        if sendable:
            outcomes.update(await self._upload(msg_id, body, sendable))
        return [outcomes[o.order_no] for o in orders]

    async def _upload(
        self, msg_id: str, body: bytes, orders: list[PayoutOrder]
    ) -> dict[str, PayoutOutcome]:
        """Send one pain.001 and classify the answer for each of its orders."""
        single = len(orders) == 1
        what = (
            f"iso20022 payout {orders[0].order_no}"
            if single
            else f"iso20022 pain.001 {msg_id} ({len(orders)} orders)"
        )

        def every(e: Rejected | NotSent | OutcomeUnknown) -> dict[str, PayoutOutcome]:
            return {o.order_no: e for o in orders}

        request = self._request("POST", self.options.upload_path, body)
        request.headers[wire.CALLBACK_HEADER] = orders[0].callback_url
        try:
            response = await http.send(self._client, request, what=what)
        except (NotSent, OutcomeUnknown) as e:
            return every(e)
        code = response.status_code
        if code >= 500:
            self._bad_reply(what, response, "server_error")
            return every(http.unexpected_status(response, what))
        if code in (200, 422):
            try:
                statuses = self._statuses(response, what)
            except OutcomeUnknown as e:
                return every(e)
            return {o.order_no: self._outcome(response, o.order_no, statuses) for o in orders}
        if code == 409:
            return every(
                OutcomeUnknown(f"{what}: the bank holds an order number", code="order_conflict")
            )
        if code in _REFUSED_BEFORE_EXECUTION:
            return every(
                Rejected(
                    f"{what}: refused with HTTP {code}", code=f"http_{code}", pre_execution=True
                )
            )
        self._bad_reply(what, response, "unexpected_status")
        return every(http.unexpected_status(response, what))

    def _outcome(
        self, response: httpx.Response, order_no: str, statuses: list[wire.TxStatus]
    ) -> PayoutOutcome:
        """What the pain.002 says about one order of the message."""
        what = f"iso20022 payout {order_no}"
        mine = [s for s in statuses if s.order_no == order_no]
        if len(mine) != 1:
            self._bad_reply(what, response, "malformed")
            said = "does not report" if not mine else "reports twice"
            return OutcomeUnknown(f"{what}: pain.002 {said} this order", code="malformed")
        result = _result(mine[0])
        match result.status:
            case BankStatus.ACCEPTED | BankStatus.PROCESSING | BankStatus.SUCCEEDED:
                if response.status_code == 200:
                    return result
            case BankStatus.FAILED if mine[0].reason == wire.DUPLICATE_REASON:
                return OutcomeUnknown(
                    f"{what}: the bank calls it a duplicate of an order it may have executed",
                    code="duplicate",
                )
            case BankStatus.FAILED:
                return Rejected(
                    f"{what}: {result.fail_reason}",
                    code=result.fail_code or "RJCT",
                    pre_execution=result.pre_execution,
                )
            case _:
                pass
        self._bad_reply(what, response, "unknown_status")
        return OutcomeUnknown(f"{what}: status is not an acceptance", code="unknown_status")

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
        """The day's camt.053. The download must carry the bank's signature over its raw
        bytes (the X-ISO headers, as on every answer): it is spooled (memory up to
        `http.SPOOL_IN_MEMORY_BYTES`, then a temporary file) while the signature is computed, and
        parsed only once the signature and its timestamp check out; an unsigned or tampered
        statement is a `ConnectorError` (code `bad_signature`, `stale` or `malformed`) and
        not one entry of it is read."""
        what = f"iso20022 statement {day.isoformat()}"
        path = self.options.statement_path.replace("{day}", day.isoformat())
        request = self._request("GET", path, b"")
        signature = http.StatementSignature(
            start=lambda headers: wire.StatementCheck(self._secret, headers, self._clock()),
            error=wire.SignatureError,
            log=log,
            event="iso20022.statement_refused",
            funder_id=self.funder_id,
            excerpt=wire.masked_excerpt,
        )
        async with http.verified_download(
            self._client, request, what, signature, head_bytes=wire.RAW_LOG_LIMIT
        ) as spool:
            try:  # read by lines (a longer one in pieces), so that an error names its line
                for _line_no, line in camt053.parse_camt053(spool, wire.BANK_ZONE.key):
                    yield line
            except StatementError as e:
                raise ConnectorError(f"{what}: {e}", code="malformed_statement") from e

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

    def _statuses(self, response: httpx.Response, what: str) -> list[wire.TxStatus]:
        """The transaction statuses of a genuine, readable pain.002, else `OutcomeUnknown`."""
        try:
            wire.verify(self._secret, response.headers, response.content, self._clock())
            return wire.read_pain002(response.content)
        except wire.SignatureError as e:
            self._bad_reply(what, response, e.reason)
            raise OutcomeUnknown(f"{what}: answer not trusted: {e.message}", code=e.reason) from e
        except wire.WireFormatError as e:
            self._bad_reply(what, response, "malformed")
            raise OutcomeUnknown(f"{what}: unreadable pain.002: {e}", code="malformed") from e

    def _status(self, response: httpx.Response, order_no: str, what: str) -> PayoutResult:
        statuses = self._statuses(response, what)
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
