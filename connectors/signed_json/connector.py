"""`SignedJsonConnector`: a generic host-to-host JSON bank API, configured with no code.

Outcome classes of a payout request (after the answer's signature is verified):

    2xx, status maps to accepted | processing | succeeded -> PayoutResult
    any status, body maps to failed                       -> Rejected(pre_execution from
                                                             pre_execution_words/codes/field)
    refused_http_statuses (default 400, 401, 403)         -> Rejected(pre_execution=True)
    409                                                   -> OutcomeUnknown("order_conflict")
    5xx, unreadable body (HTML, truncated JSON), a signature that does not verify,
    an unknown status word, read timeout                  -> OutcomeUnknown
    connection refused, DNS, connect timeout              -> NotSent

Every answer that cannot be trusted is logged with the bank's raw reply masked and truncated.

Statement downloads (`fetch_statement`) are verified like answers: signed over their raw
bytes, refused unsigned or tampered before a line is parsed, then read with the shared
generic CSV mapping (`connectors.csv_statement`) in the funder's `[funders.statement]`.
"""

from __future__ import annotations

import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import date
from typing import Any
from urllib.parse import quote

import httpx
import structlog
from aiohttp import web

from config.models import Funder
from connectors import csv_statement, http
from connectors.base import BankStatus, CallbackEvent, PayoutOrder, PayoutResult, StatementLine
from connectors.errors import (
    CallbackRejected,
    ConnectorError,
    OutcomeUnknown,
    Rejected,
    StatementError,
)
from connectors.signed_json import wire

log = structlog.get_logger("fundgate.connectors.signed_json")


def tls_context(tls: wire.Tls) -> ssl.SSLContext:
    """The client TLS context for a custom CA bundle and/or a client certificate (mTLS)."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_bundle)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"tls.ca_bundle: cannot load {tls.ca_bundle!r}: {e}") from None
    if tls.client_cert is not None:
        try:
            ctx.load_cert_chain(tls.client_cert, tls.client_key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"tls.client_cert: cannot load the certificate/key: {e}") from None
    return ctx


class SignedJsonConnector:
    """One funder's signed JSON API, as described by its `connector_options`.

    Built by the entry point `signed_json` as `SignedJsonConnector(funder, client)`; invalid
    options raise `ValueError` naming the field. The shared `client` is used unless the funder
    needs its own TLS settings (mTLS, CA bundle): then the connector owns a client and closes
    it in `aclose`. `clock` (unix seconds) signs requests and judges freshness.
    """

    name: str = "signed_json"

    def __init__(
        self,
        funder: Funder,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.funder_id = funder.id
        self.options = wire.parse_options(funder.connector_options)
        wire.check_statement_config(funder.statement)
        self.statement_config = funder.statement
        self._signer = wire.Signer.for_client(self.options.signing)
        self._clock = clock
        self._timeout = http.request_timeout(self.options.timeout_seconds)
        self._own_client: httpx.AsyncClient | None = None
        if self.options.tls.custom:
            self._own_client = httpx.AsyncClient(verify=tls_context(self.options.tls))
        self._client = self._own_client or client

    # --- outbound ---------------------------------------------------------------------

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        what = f"signed_json payout {order.order_no}"
        fields = wire.request_fields(self.options, order)
        request = self._request("POST", self.options.endpoints.create, fields)
        response = await http.send(self._client, request, what=what)
        code = response.status_code
        if code >= 500:
            self._bad_reply(what, response, "server_error")
            raise http.unexpected_status(response, what)
        result = self._trusted_result(response, order.order_no, what, lenient=not 200 <= code < 300)
        if result is not None:
            match result.status:
                case BankStatus.ACCEPTED | BankStatus.PROCESSING | BankStatus.SUCCEEDED:
                    if 200 <= code < 300:
                        return result
                case BankStatus.FAILED:
                    raise Rejected(
                        f"{what}: failed: {result.fail_reason or result.fail_code}",
                        code=result.fail_code or "failed",
                        pre_execution=result.pre_execution,
                    )
                case BankStatus.UNKNOWN | BankStatus.NOT_FOUND:
                    self._bad_reply(what, response, "unknown_status")
                    raise OutcomeUnknown(
                        f"{what}: bank status is not an acceptance", code="unknown_status"
                    )
        if code == 409:
            raise OutcomeUnknown(f"{what}: the bank holds this order number", code="order_conflict")
        if code in self.options.refused_http_statuses:
            raise Rejected(
                f"{what}: refused with HTTP {code}", code=f"http_{code}", pre_execution=True
            )
        self._bad_reply(what, response, "unexpected_status")
        if 200 <= code < 300:
            raise OutcomeUnknown(f"{what}: unreadable answer", code="malformed")
        raise http.unexpected_status(response, what)

    async def query(self, order_no: str) -> PayoutResult:
        what = f"signed_json query {order_no}"
        path = self.options.endpoints.query.replace("{order_no}", quote(order_no, safe=""))
        request = self._request("GET", path, None)
        response = await http.send(self._client, request, what=what)
        code = response.status_code
        if code >= 500:
            self._bad_reply(what, response, "server_error")
            raise http.unexpected_status(response, what)
        if code == 200 or code == 404:
            result = self._trusted_result(response, order_no, what, lenient=code == 404)
            if result is not None and (code == 200 or result.status is BankStatus.NOT_FOUND):
                return result
        # A bare 404 (a proxy, a wrong base_url) must not let the gateway fail over.
        self._bad_reply(what, response, "unexpected_status")
        raise http.unexpected_status(response, what)

    async def fetch_statement(self, day: date) -> AsyncIterator[StatementLine]:
        """The day's CSV statement. With `verify_responses` the download must carry the bank's
        signature over its raw bytes: it is spooled (memory up to `http.SPOOL_IN_MEMORY_BYTES`,
        then a temporary file) while the signature is computed, and parsed only once the
        signature and its timestamp check out; an unsigned or tampered statement is a
        `ConnectorError` (code `bad_signature`, `stale` or `malformed`) and never parsed."""
        what = f"signed_json statement {day.isoformat()}"
        path = self.options.endpoints.statement.replace("{day}", day.isoformat())
        request = self._request("GET", path, None)
        verify = self.options.signing.verify_responses
        signature = http.StatementSignature(
            start=lambda headers: (
                wire.StatementCheck(self._signer, headers, self._clock()) if verify else None
            ),
            error=wire.SignatureError,
            log=log,
            event="signed_json.statement_refused",
            funder_id=self.funder_id,
            excerpt=wire.masked_excerpt,
        )
        # a local spool: the writes of a few 64 KiB chunks do not stall the loop noticeably
        async with http.verified_download(
            self._client,
            request,
            what,
            signature,
            head_bytes=wire.RAW_LOG_LIMIT,
            on_unexpected_status=lambda r: self._bad_reply(what, r, "unexpected_status"),
        ) as spool:
            try:
                for _line_no, line in csv_statement.parse_csv(spool, self.statement_config):
                    yield line
            except StatementError as e:
                raise ConnectorError(f"{what}: {e}", code="malformed_statement") from e

    async def aclose(self) -> None:
        """Close the connector's own client (mTLS); the shared one belongs to the gateway."""
        if self._own_client is not None:
            await self._own_client.aclose()

    # --- inbound ----------------------------------------------------------------------

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> CallbackEvent:
        try:
            ts, nonce = wire.verify_message(self._signer, headers, body, self._clock())
        except wire.SignatureError as e:
            raise CallbackRejected(e.reason, e.message) from e
        # Everything below is authentic: a failure is the bank's bug, not an attack.
        try:
            raw = wire.parse_json_object(body)
            result, _word = wire.result_of(self.options, raw, order_no=None)
        except wire.WireFormatError as e:
            raise CallbackRejected("malformed", str(e)) from e
        return CallbackEvent(
            order_no=result.order_no,
            status=result.status,
            nonce=nonce,
            timestamp=ts,
            bank_ref=result.bank_ref,
            amount=result.amount,
            fail_code=result.fail_code,
            fail_reason=result.fail_reason,
            finished_at=result.finished_at,
            raw=raw,
        )

    def callback_ack(self, ok: bool) -> web.Response:
        if ok:
            return web.Response(status=200, text=self.options.callback_ack_ok)
        return web.Response(status=400, text=self.options.callback_ack_fail)

    # --- helpers ----------------------------------------------------------------------

    def _request(self, method: str, path: str, fields: dict[str, Any] | None) -> httpx.Request:
        body, headers = wire.sign_message(
            self._signer,
            fields,
            timestamp=str(int(self._clock())),
            nonce=secrets.token_hex(16),
        )
        return self._client.build_request(
            method,
            self.options.url + path,
            content=body,
            headers=headers,
            timeout=self._timeout,
        )

    def _trusted_result(
        self, response: httpx.Response, order_no: str, what: str, *, lenient: bool
    ) -> PayoutResult | None:
        """The verified answer's result. Untrusted or unreadable: None when `lenient` (a
        non-200 status decides), else `OutcomeUnknown`."""
        body = response.content
        try:
            if self.options.signing.verify_responses:
                wire.verify_message(self._signer, response.headers, body, self._clock())
            obj = wire.parse_json_object(body)
            result, _word = wire.result_of(self.options, obj, order_no=order_no)
        except wire.SignatureError as e:
            self._bad_reply(what, response, e.reason)
            if lenient:
                return None
            raise OutcomeUnknown(f"{what}: answer not trusted: {e.message}", code=e.reason) from e
        except wire.WireFormatError as e:
            if lenient:
                return None
            self._bad_reply(what, response, "malformed")
            raise OutcomeUnknown(f"{what}: unreadable answer: {e}", code="malformed") from e
        return result

    def _bad_reply(self, what: str, response: httpx.Response, reason: str) -> None:
        log.warning(
            "signed_json.bad_reply",
            funder_id=self.funder_id,
            what=what,
            reason=reason,
            http_status=response.status_code,
            content_type=response.headers.get("content-type", "")[:80],
            raw=wire.masked_excerpt(response.content),
        )
