"""The sandbox bank's wire format: options, signing, models and status mapping. Pure, no I/O.

Request signature (payout requests, queries, statements and callbacks alike)::

    X-Sandbox-Timestamp: <unix seconds>
    X-Sandbox-Nonce:     <random, unique per message>
    X-Sandbox-Signature: hex(hmac_sha256(secret, timestamp + "\\n" + nonce + "\\n" + body))

The bank's status words are ACCEPTED, PROCESSING, SUCCESS, FAILED and REJECTED; FAILED and
REJECTED carry `pre_execution` (true when no money moved). Both sides of the wire (the
connector and the simulated bank in `bank.py`) use these models, so they cannot drift apart.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from connectors.base import BankStatus, PayoutOrder, PayoutResult, StatementLine

TIMESTAMP_HEADER = "X-Sandbox-Timestamp"
NONCE_HEADER = "X-Sandbox-Nonce"
SIGNATURE_HEADER = "X-Sandbox-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"

# CONTRACT.md: callbacks (and, at the bank, requests) outside ±300 s are refused.
MAX_CLOCK_SKEW_SECONDS = 300
# The bank keeps local (Asia/Shanghai) time; a timestamp without an offset is read in it.
BANK_ZONE = ZoneInfo("Asia/Shanghai")

STATEMENT_COLUMNS = ("order_no", "bank_ref", "amount", "status", "finished_at")
STATEMENT_HEADER = ",".join(STATEMENT_COLUMNS)

BankWord = Literal["ACCEPTED", "PROCESSING", "SUCCESS", "FAILED", "REJECTED"]

_TIMESTAMP = re.compile(r"\d{1,12}")
_M = TypeVar("_M", bound=BaseModel)


class WireFormatError(ValueError):
    """A message that does not follow the sandbox wire format."""


# --- options -------------------------------------------------------------------------------


class SandboxOptions(BaseModel):
    """`connector_options` of a funder served by the sandbox bank."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    secret: SecretStr
    timeout_seconds: float = Field(default=10, gt=0, le=300)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {v!r}")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return v.rstrip("/")

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
        return v


def parse_options(raw: Mapping[str, Any]) -> SandboxOptions:
    """Validate `connector_options`; every problem is listed in one `ValueError`."""
    try:
        return SandboxOptions.model_validate(dict(raw))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "options"
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown option"
            problems.append(f"{where}: {msg}")
        raise ValueError("; ".join(problems)) from None


# --- signing -------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, nonce: str, body: bytes) -> str:
    """hex(hmac_sha256(secret, timestamp + "\\n" + nonce + "\\n" + body)), lowercase."""
    # header bytes that are not UTF-8 arrive surrogate-escaped: sign them as they came
    message = f"{timestamp}\n{nonce}\n".encode(errors="surrogateescape") + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes, *, timestamp: str, nonce: str) -> dict[str, str]:
    return {
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: sign(secret, timestamp, nonce, body),
    }


def signature_matches(secret: str, timestamp: str, nonce: str, body: bytes, given: str) -> bool:
    """Constant-time check; bytes because `compare_digest` refuses non-ASCII `str`."""
    expected = sign(secret, timestamp, nonce, body).encode()
    return hmac.compare_digest(expected, given.strip().lower().encode("utf-8", "replace"))


def parse_timestamp(value: str) -> int:
    if not _TIMESTAMP.fullmatch(value.strip()):
        raise WireFormatError(f"timestamp {value[:20]!r} is not unix seconds")
    return int(value)


def is_fresh(timestamp: int, now: float) -> bool:
    return abs(now - timestamp) <= MAX_CLOCK_SKEW_SECONDS


# --- status mapping ------------------------------------------------------------------------


def map_status(word: str) -> BankStatus:
    """The bank's status word in fundgate's vocabulary; a word we do not know is UNKNOWN."""
    match word:
        case "ACCEPTED":
            return BankStatus.ACCEPTED
        case "PROCESSING":
            return BankStatus.PROCESSING
        case "SUCCESS":
            return BankStatus.SUCCEEDED
        case "FAILED" | "REJECTED":
            # REJECTED is how a query reports an order refused at submission.
            return BankStatus.FAILED
        case _:
            return BankStatus.UNKNOWN


def map_statement_status(word: str) -> str:
    """A statement line's status in `StatementLine` vocabulary."""
    match word:
        case "SUCCESS":
            return "succeeded"
        case "FAILED":
            return "failed"
        case "REVERSED":
            return "reversed"
        case _:
            raise WireFormatError(f"unknown statement status {word[:20]!r}")


# --- messages ------------------------------------------------------------------------------


class _Wire(BaseModel):
    # Unknown fields are ignored: a bank adding a field must not break payouts.
    model_config = ConfigDict(extra="ignore", frozen=True)


class PayoutRequest(_Wire):
    """Body of `POST /api/payouts`."""

    order_no: str = Field(min_length=1, max_length=64)
    amount: int = Field(gt=0)  # fen
    currency: str = Field(min_length=3, max_length=3)
    account_no: str = Field(min_length=1)
    account_name: str = Field(min_length=1)
    bank_code: str = Field(min_length=1)
    callback_url: str | None = None


class PayoutView(_Wire):
    """The bank's view of one order: the 200 answer to a payout request or a query."""

    order_no: str
    bank_ref: str | None = None
    status: str
    amount: int | None = None
    finished_at: datetime | None = None
    fail_code: str | None = None
    fail_reason: str | None = None
    pre_execution: bool = False


class Rejection(_Wire):
    """The 422 answer to a payout request the bank refuses."""

    status: Literal["REJECTED"]
    fail_code: str | None = None
    fail_reason: str | None = None
    pre_execution: bool


class NotFound(_Wire):
    """The 404 answer to a query for an order the bank never saw."""

    status: Literal["NOT_FOUND"]


class CallbackBody(_Wire):
    """Body of the bank's result callback."""

    order_no: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00]+$")
    bank_ref: str | None = Field(default=None, max_length=128, pattern=r"^[^\x00]*$")
    status: str
    amount: int | None = None
    finished_at: datetime | None = None
    fail_code: str | None = None
    fail_reason: str | None = None


def payout_request_body(order: PayoutOrder) -> bytes:
    """The exact bytes sent (and signed) for `order`."""
    return json_bytes(
        PayoutRequest(
            order_no=order.order_no,
            amount=order.amount,
            currency=order.currency,
            account_no=order.account_no,
            account_name=order.account_name,
            bank_code=order.bank_code,
            callback_url=order.callback_url,
        ).model_dump()
    )


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def _parse(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise WireFormatError(f"not a {model.__name__}: {e.error_count()} error(s)") from e


def _local(at: datetime | None) -> datetime | None:
    if at is not None and at.tzinfo is None:
        return at.replace(tzinfo=BANK_ZONE)
    return at


def parse_payout_view(body: bytes, *, order_no: str) -> PayoutResult:
    """A 200 answer about `order_no`; an answer about another order is malformed."""
    view = _parse(PayoutView, body)
    if view.order_no != order_no:
        raise WireFormatError(f"answer is about order {view.order_no!r}, asked {order_no!r}")
    status = map_status(view.status)
    return PayoutResult(
        order_no=view.order_no,
        status=status,
        bank_ref=view.bank_ref,
        amount=view.amount,
        fail_code=view.fail_code,
        fail_reason=view.fail_reason,
        finished_at=_local(view.finished_at),
        pre_execution=status is BankStatus.FAILED and view.pre_execution,
    )


def parse_rejection(body: bytes) -> Rejection:
    return _parse(Rejection, body)


def parse_not_found(body: bytes) -> NotFound:
    return _parse(NotFound, body)


def parse_callback_body(body: bytes) -> tuple[CallbackBody, dict[str, Any]]:
    """The callback model and the raw JSON object it came from."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireFormatError("callback body is not JSON") from e
    except RecursionError as e:
        raise WireFormatError("callback body is nested too deeply") from e
    if not isinstance(raw, dict):
        raise WireFormatError("callback body is not a JSON object")
    try:
        return CallbackBody.model_validate(raw), raw
    except ValidationError as e:
        raise WireFormatError(f"callback body: {e.error_count()} invalid field(s)") from e


def callback_status(body: CallbackBody) -> BankStatus:
    return map_status(body.status)


def callback_finished_at(body: CallbackBody) -> datetime | None:
    return _local(body.finished_at)


# --- statements ----------------------------------------------------------------------------


class StatementReader:
    """Turns the lines of a sandbox CSV statement into `StatementLine`s, one line at a time.

    The first non-blank line must be the header; blank lines are skipped. Feeding lines one
    by one keeps a large statement out of memory.
    """

    def __init__(self) -> None:
        self._seen_header = False
        self._line_no = 0

    def feed(self, line: str) -> StatementLine | None:
        self._line_no += 1
        text = line.strip().removeprefix("\ufeff")
        if not text:
            return None
        fields = next(csv.reader([text]))
        if not self._seen_header:
            if tuple(f.strip() for f in fields) != STATEMENT_COLUMNS:
                raise WireFormatError(f"line {self._line_no}: header is not {STATEMENT_HEADER}")
            self._seen_header = True
            return None
        if len(fields) != len(STATEMENT_COLUMNS):
            raise WireFormatError(f"line {self._line_no}: {len(fields)} fields, expected 5")
        order_no, bank_ref, amount, status, finished_at = (f.strip() for f in fields)
        try:
            booked_at = _local(datetime.fromisoformat(finished_at)) if finished_at else None
            fen = int(amount)
        except ValueError as e:
            raise WireFormatError(f"line {self._line_no}: {e}") from e
        if not order_no:
            raise WireFormatError(f"line {self._line_no}: empty order_no")
        try:
            mapped = map_statement_status(status)
        except WireFormatError as e:
            raise WireFormatError(f"line {self._line_no}: {e}") from e
        return StatementLine(
            order_no=order_no,
            bank_ref=bank_ref or None,
            amount=fen,
            status=mapped,
            booked_at=booked_at,
        )

    def finish(self) -> None:
        """An empty body (not even a header) is not a statement."""
        if not self._seen_header:
            raise WireFormatError("statement has no header line")


def parse_statement(lines: Iterable[str]) -> Iterator[StatementLine]:
    """Every line of a whole sandbox CSV statement."""
    reader = StatementReader()
    for line in lines:
        if (parsed := reader.feed(line)) is not None:
            yield parsed
    reader.finish()


def statement_row(order_no: str, bank_ref: str | None, amount: int, word: str, at: datetime) -> str:
    """One CSV line (with its newline) as the bank writes it; quoting is left to `csv`."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(
        [order_no, bank_ref or "", amount, word, at.isoformat()]
    )
    return out.getvalue()
