"""In-memory fakes shared by the test suites (cosmicpython style: fakes over patches).

`FakeBank` is a `BankConnector` whose answers a test scripts, and whose ledger is the oracle
of money moved: `executions[order_no]` counts how often money left for an order, and a
re-sent order number never executes twice, exactly like a real bank's idempotency key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Literal

from aiohttp import web

from connectors.base import BankStatus, CallbackEvent, PayoutOrder, PayoutResult, StatementLine
from connectors.errors import CallbackRejected, NotSent, OutcomeUnknown, Rejected

Action = Literal["accept", "process", "succeed", "reject", "refuse_request", "not_sent", "unknown"]

# the bank refuses callbacks signed further away than this, like the sandbox (CONTRACT.md)
CALLBACK_MAX_SKEW_SECONDS = 300


@dataclass(frozen=True, slots=True)
class Step:
    """What the fake bank does with one `disburse` call.

    accept/process/succeed: the order is taken (and executed once) with that status.
    reject: a definitive refusal; `pre_execution=False` records the order as FAILED.
    refuse_request: the request refused unread (pre-execution), whatever the bank holds.
    not_sent: nothing reached the bank.
    unknown: the answer is lost; `executed` says whether the bank took the order anyway,
    and `then` is the status its ledger holds for it.
    """

    action: Action
    pre_execution: bool = True
    executed: bool = False
    then: BankStatus = BankStatus.PROCESSING


ACCEPT = Step("accept")
PROCESS = Step("process")
SUCCEED = Step("succeed")
NOT_SENT = Step("not_sent")


def reject(*, pre_execution: bool) -> Step:
    return Step("reject", pre_execution=pre_execution)


# refused before the bank looks at the order at all (an HTTP 400/401/403 from its front end):
# "not executed by this request", which says nothing about an earlier request for the order
REFUSE_REQUEST = Step("refuse_request")


def unknown(*, executed: bool, then: BankStatus = BankStatus.PROCESSING) -> Step:
    return Step("unknown", executed=executed, then=then)


_TAKEN: dict[Action, BankStatus] = {
    "accept": BankStatus.ACCEPTED,
    "process": BankStatus.PROCESSING,
    "succeed": BankStatus.SUCCEEDED,
}


@dataclass(slots=True)
class Entry:
    """The bank's record of one order."""

    order: PayoutOrder
    status: BankStatus
    bank_ref: str
    executions: int = 0
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Call:
    order_no: str
    txn_no: str
    action: Action
    at: datetime


@dataclass
class FakeBank:
    """A scriptable in-memory bank. Script with `script(...)` (globally or per order number);
    when nothing is scripted `default` applies."""

    funder_id: str
    secret: str = "fake-secret"
    default: Step = ACCEPT
    clock: Callable[[], float] = time.time
    name: str = "fake"
    ledger: dict[str, Entry] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    _global: deque[Step] = field(default_factory=deque)
    _per_order: dict[str, deque[Step]] = field(default_factory=lambda: defaultdict(deque))

    # --- scripting and the oracle --------------------------------------------------------

    def script(self, *steps: Step, order_no: str | None = None) -> None:
        """Queue answers for the next `disburse` calls (of one order number, if given)."""
        (self._per_order[order_no] if order_no else self._global).extend(steps)

    def settle(self, order_no: str, status: BankStatus) -> None:
        """The bank finishes an order it holds; `query` reports it from now on."""
        entry = self.ledger[order_no]
        entry.status = status
        if status in (BankStatus.SUCCEEDED, BankStatus.FAILED):
            entry.finished_at = datetime.now(UTC)

    @property
    def executions(self) -> dict[str, int]:
        return {no: e.executions for no, e in self.ledger.items()}

    def calls_for(self, order_no: str) -> list[Call]:
        return [c for c in self.calls if c.order_no == order_no]

    def executed_txns(self) -> dict[str, int]:
        """How often money left per txn_no, over all of its order numbers at this bank."""
        out: dict[str, int] = defaultdict(int)
        for e in self.ledger.values():
            out[e.order.txn_no] += e.executions
        return dict(out)

    def callback(
        self,
        order_no: str,
        status: BankStatus,
        *,
        nonce: str | None = None,
        timestamp: int | None = None,
        amount: int | None = None,
        secret: str | None = None,
    ) -> tuple[dict[str, str], bytes]:
        """Headers and body of a signed callback about `order_no`, as this bank sends it."""
        entry = self.ledger.get(order_no)
        body = json.dumps(
            {
                "order_no": order_no,
                "status": status.value,
                "bank_ref": entry.bank_ref if entry else None,
                "amount": amount if amount is not None else (entry.order.amount if entry else None),
                "fail_code": "insufficient_funds" if status == BankStatus.FAILED else None,
            },
            separators=(",", ":"),
        ).encode()
        ts = str(int(self.clock()) if timestamp is None else timestamp)
        n = nonce or secrets.token_hex(8)
        return {
            "Content-Type": "application/json",
            "X-Fake-Timestamp": ts,
            "X-Fake-Nonce": n,
            "X-Fake-Signature": _sign(secret or self.secret, ts, n, body),
        }, body

    # --- BankConnector -------------------------------------------------------------------

    async def disburse(self, order: PayoutOrder) -> PayoutResult:
        queue = self._per_order.get(order.order_no)
        step = (queue or self._global or deque([self.default])).popleft()
        self.calls.append(Call(order.order_no, order.txn_no, step.action, datetime.now(UTC)))
        entry = self.ledger.get(order.order_no)
        if entry is not None and entry.order != order:
            raise Rejected("order number reused with another payload", pre_execution=True)
        match step.action:
            case "refuse_request":
                raise Rejected(
                    f"{self.funder_id}: request refused", code="http_401", pre_execution=True
                )
            case "not_sent":
                raise NotSent(f"{self.funder_id}: connection refused")
            case "reject":
                if entry is not None:  # a re-send of an order the bank holds: its own answer
                    return self._result(entry)
                if not step.pre_execution:
                    self._take(order, BankStatus.FAILED, execute=False)
                raise Rejected(
                    f"{self.funder_id}: refused", code="refused", pre_execution=step.pre_execution
                )
            case "unknown":
                if step.executed:
                    self._take(order, step.then, execute=True)
                raise OutcomeUnknown(f"{self.funder_id}: read timeout")
            case _:
                if entry is None:
                    entry = self._take(order, _TAKEN[step.action], execute=True)
                return self._result(entry)

    async def query(self, order_no: str) -> PayoutResult:
        self.queries.append(order_no)
        entry = self.ledger.get(order_no)
        if entry is None:
            return PayoutResult(order_no=order_no, status=BankStatus.NOT_FOUND)
        return self._result(entry)

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> CallbackEvent:
        ts, nonce, sig = (headers.get(f"X-Fake-{h}") for h in ("Timestamp", "Nonce", "Signature"))
        if not ts or not nonce or not sig or not ts.isdigit():
            raise CallbackRejected("malformed", "missing signature headers")
        if not hmac.compare_digest(sig, _sign(self.secret, ts, nonce, body)):
            raise CallbackRejected("bad_signature", "signature does not match")
        if abs(self.clock() - int(ts)) > CALLBACK_MAX_SKEW_SECONDS:
            raise CallbackRejected("stale", "timestamp outside the accepted window")
        try:
            data = json.loads(body)
            status = BankStatus(data["status"])
            order_no = str(data["order_no"])
        except (ValueError, KeyError, TypeError) as e:
            raise CallbackRejected("malformed", f"unreadable body: {e}") from e
        return CallbackEvent(
            order_no=order_no,
            status=status,
            nonce=nonce,
            timestamp=int(ts),
            bank_ref=data.get("bank_ref"),
            amount=data.get("amount"),
            fail_code=data.get("fail_code"),
            raw=data,
        )

    def callback_ack(self, ok: bool) -> web.Response:
        return web.Response(text="SUCCESS" if ok else "FAIL")

    async def fetch_statement(self, day: date) -> AsyncIterator[StatementLine]:
        for no, e in list(self.ledger.items()):
            if e.finished_at is not None and e.finished_at.date() == day:
                yield StatementLine(no, e.bank_ref, e.order.amount, e.status.value, e.finished_at)

    async def aclose(self) -> None:
        return None

    # --- internals -----------------------------------------------------------------------

    def _take(self, order: PayoutOrder, status: BankStatus, *, execute: bool) -> Entry:
        entry = self.ledger.get(order.order_no)
        if entry is None:
            ref = f"{self.funder_id}-{len(self.ledger) + 1:06d}"
            entry = self.ledger[order.order_no] = Entry(order, status, ref)
            if execute:  # idempotent by order number: only the first sight moves money
                entry.executions += 1
        return entry

    def _result(self, e: Entry) -> PayoutResult:
        return PayoutResult(
            order_no=e.order.order_no,
            status=e.status,
            bank_ref=e.bank_ref,
            amount=e.order.amount,
            fail_code="refused" if e.status == BankStatus.FAILED else None,
            finished_at=e.finished_at,
        )


@dataclass
class BatchingFakeBank(FakeBank):
    """A `FakeBank` that also takes up to `max_batch` orders in one call (`disburse_batch`),
    answering each order by its own script, as a bank reports per transaction. A `not_sent`
    step fails the whole call (a batch cannot half reach the bank). `batches` records the
    order numbers of every batch call."""

    max_batch: int = 5
    batches: list[list[str]] = field(default_factory=list)

    async def disburse_batch(
        self, orders: Sequence[PayoutOrder]
    ) -> list[PayoutResult | Rejected | NotSent | OutcomeUnknown]:
        self.batches.append([o.order_no for o in orders])
        out: list[PayoutResult | Rejected | NotSent | OutcomeUnknown] = []
        for o in orders:
            try:
                out.append(await self.disburse(o))
            except (Rejected, NotSent, OutcomeUnknown) as e:
                out.append(e)
        if any(isinstance(r, NotSent) for r in out):
            if any(not isinstance(r, NotSent) for r in out):
                raise AssertionError("script a whole batch as not_sent, or none of it")
        return out


def _sign(secret: str, ts: str, nonce: str, body: bytes) -> str:
    msg = ts.encode() + b"\n" + nonce.encode() + b"\n" + body
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()
