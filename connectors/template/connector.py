"""`TemplateConnector`: the skeleton of a `BankConnector` (see docs/connectors.md).

Document the outcome classes of a payout request here, as the shipped connectors do:
which answers are a `PayoutResult`, which are `Rejected` (and whether before execution),
and that everything else is `OutcomeUnknown` (or `NotSent` when nothing reached the bank).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import date

import httpx
from aiohttp import web

from config.models import Funder
from connectors import http
from connectors.base import CallbackEvent, PayoutOrder, PayoutResult, StatementLine
from connectors.template import wire


class TemplateConnector:
    """Built by its entry point as `TemplateConnector(funder, client)`; `clock` is injectable
    so the conformance suite can test freshness checks."""

    name: str = "template"

    def __init__(
        self,
        funder: Funder,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.funder_id = funder.id
        self.options = wire.parse_options(funder.connector_options)
        self._client = client
        self._clock = clock
        self._timeout = http.request_timeout(self.options.timeout_seconds)

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        # TODO: build the request in wire.py, send it with `http.send`, classify the answer
        raise NotImplementedError

    async def query(self, order_no: str) -> PayoutResult:
        # TODO: NOT_FOUND only on the bank's own "no such order", never on a bare 404
        raise NotImplementedError

    async def fetch_statement(self, day: date) -> AsyncIterator[StatementLine]:
        # TODO: stream the body (`client.send(request, stream=True)`), one line at a time
        raise NotImplementedError
        yield  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        """Release what the connector itself opened (the shared client is the gateway's)."""

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> CallbackEvent:
        # TODO: verify the signature, then freshness (±300 s), then parse; raise
        # CallbackRejected("bad_signature" | "stale" | "malformed", ...)
        raise NotImplementedError

    def callback_ack(self, ok: bool) -> web.Response:
        # TODO: exactly what the bank expects as "delivered"
        return web.Response(status=200 if ok else 400, text="SUCCESS" if ok else "FAIL")
