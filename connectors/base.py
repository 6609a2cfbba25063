"""What fundgate asks of a bank, in fundgate's own types. Bank wire types stay in their folder."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol, runtime_checkable

import httpx
from aiohttp import web

from config.models import Funder
from connectors.errors import NotSent, OutcomeUnknown, Rejected


class BankStatus(enum.StrEnum):
    """A bank's view of one order, mapped to fundgate's vocabulary."""

    ACCEPTED = "accepted"  # received, not yet processing
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NOT_FOUND = "not_found"  # the bank has no such order: it was never executed
    UNKNOWN = "unknown"  # a status word the mapping does not know


@dataclass(frozen=True, slots=True)
class PayoutOrder:
    """One instruction to one funder. `order_no` is the bank's idempotency key."""

    order_no: str
    txn_no: str
    funder_id: str
    amount: int  # fen
    currency: str
    account_no: str
    account_name: str
    bank_code: str
    mode: str
    funder_amount: int
    platform_amount: int
    callback_url: str


@dataclass(frozen=True, slots=True)
class PayoutResult:
    order_no: str
    status: BankStatus
    bank_ref: str | None = None
    amount: int | None = None
    fail_code: str | None = None
    fail_reason: str | None = None
    finished_at: datetime | None = None
    # a FAILED answer to a query: did money never move? (decides fail-over)
    pre_execution: bool = False


@dataclass(frozen=True, slots=True)
class CallbackEvent:
    """A verified, fresh callback. `nonce` is checked for reuse by the gateway."""

    order_no: str
    status: BankStatus
    nonce: str
    timestamp: int
    bank_ref: str | None = None
    amount: int | None = None
    fail_code: str | None = None
    fail_reason: str | None = None
    finished_at: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StatementLine:
    order_no: str
    bank_ref: str | None
    amount: int  # fen
    status: str  # succeeded | failed | reversed
    booked_at: datetime | None


@runtime_checkable
class BankConnector(Protocol):
    """One funder's bank protocol.

    `disburse` returns the bank's acceptance (ACCEPTED, PROCESSING or already SUCCEEDED) and
    raises `Rejected`, `NotSent` or `OutcomeUnknown` (see `connectors.errors`). `query`
    returns the bank's current view (NOT_FOUND when it never saw the order) and raises
    `NotSent`/`OutcomeUnknown` when it cannot tell. `parse_callback` verifies signature and
    freshness or raises `CallbackRejected`.
    """

    name: str

    async def disburse(self, order: PayoutOrder) -> PayoutResult: ...

    async def query(self, order_no: str) -> PayoutResult: ...

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> CallbackEvent: ...

    def callback_ack(self, ok: bool) -> web.Response: ...

    def fetch_statement(self, day: date) -> AsyncIterator[StatementLine]: ...

    async def aclose(self) -> None: ...


# What became of one order of a bank call: the bank's acceptance, or its classified failure.
PayoutOutcome = PayoutResult | Rejected | NotSent | OutcomeUnknown


@runtime_checkable
class BatchingConnector(Protocol):
    """Optional capability: several orders for this connector's funder in one bank call.

    `max_batch` is how many orders one call may carry (from the funder's options); the
    dispatcher never hands over more, and sends through `disburse` while it is 1.
    `disburse_batch` returns one outcome per order, in the order given, instead of raising:
    what the bank said about each order (its own acceptance or refusal), or, when the call
    as a whole failed, the same `NotSent` / `OutcomeUnknown` / `Rejected(pre_execution=True)`
    for every order it carried. The same rules as for `disburse` apply per order: anything
    the connector cannot trust about an order is `OutcomeUnknown`; an order missing from the
    bank's answer is `OutcomeUnknown`, never `NotSent`. Order numbers in one call are distinct.
    """

    max_batch: int

    async def disburse_batch(self, orders: Sequence[PayoutOrder]) -> list[PayoutOutcome]: ...


def max_batch(connector: BankConnector) -> int:
    """How many orders one call to `connector` may carry: 1 unless it batches."""
    if isinstance(connector, BatchingConnector):
        return max(1, int(connector.max_batch))
    return 1


class ConnectorFactory(Protocol):
    """An entry point in group `fundgate.connectors`: builds a connector for one funder.

    It receives the funder's config (with `connector_options`) and the shared outbound
    `httpx.AsyncClient`, and raises `ValueError` for options it cannot use.
    """

    def __call__(self, funder: Funder, client: httpx.AsyncClient) -> BankConnector: ...
