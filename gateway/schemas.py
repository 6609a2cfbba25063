"""The API's request and response models: validation and the OpenAPI document come from here."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from config.models import Term

MAX_BIGINT = 2**63 - 1  # ids are PostgreSQL bigint
TXN_NO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
# every field a bank may need; lengths are those of CNAPS account and name fields
ACCOUNT_NO_PATTERN = r"^[0-9]{8,32}$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class PayeeIn(_In):
    account_no: str = Field(pattern=ACCOUNT_NO_PATTERN, description="digits only")
    account_name: str = Field(min_length=1, max_length=64)
    bank_code: str = Field(pattern=r"^[A-Z0-9]{2,16}$")


class TermIn(_In):
    unit: Literal["day", "month"]
    count: StrictInt = Field(gt=0, le=3650)

    def to_term(self) -> Term:
        return Term(unit=self.unit, count=self.count)


class DisbursementRequest(_In):
    txn_no: str = Field(pattern=TXN_NO_PATTERN, description="unique transaction number")
    loan_id: str = Field(min_length=1, max_length=64)
    borrower_id: str = Field(min_length=1, max_length=64)
    payee: PayeeIn
    amount: StrictInt = Field(gt=0, le=10**15, description="fen; integers only")
    currency: Literal["CNY"]
    term: TermIn
    apr: str = Field(
        pattern=r"^[0-9]{1,3}(\.[0-9]{1,6})?$", description='annualised cost, e.g. "0.1800"'
    )
    product: str = Field(min_length=1, max_length=64)
    repayment: str = Field(min_length=1, max_length=64)
    funder_hint: str | None = Field(default=None, max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("apr", mode="before")
    @classmethod
    def _apr_text(cls, v: Any) -> Any:
        # a JSON number is accepted and read through its decimal text, never as a binary float
        if isinstance(v, bool):
            return v
        if isinstance(v, int | float):
            return format(Decimal(str(v)), "f")
        return v

    @property
    def apr_decimal(self) -> Decimal:
        try:
            return Decimal(self.apr)
        except InvalidOperation:  # pragma: no cover - the pattern already guarantees it
            return Decimal("Infinity")

    def canonical_bytes(self) -> bytes:
        """The canonical request: sorted keys, no whitespace, apr normalised. Idempotency
        compares a keyed digest of it (it holds the payee's account number)."""
        data = self.model_dump(mode="json")
        data["apr"] = format(self.apr_decimal.normalize(), "f")
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode()


class AccountIn(_In):
    account_no: str = Field(pattern=ACCOUNT_NO_PATTERN)
    account_name: str = Field(min_length=1, max_length=64)
    bank_code: str = Field(pattern=r"^[A-Z0-9]{2,16}$")


# ---- responses (documented in /openapi.json) ----


class PayeeOut(BaseModel):
    account_no: str = Field(description="masked: first 6 and last 4 digits")
    account_name: str = Field(description="masked: last character")
    bank_code: str


class AllocationOut(BaseModel):
    funder: int
    platform: int


class AttemptOut(BaseModel):
    n: int
    funder_id: str
    order_no: str
    status: str
    bank_ref: str | None
    error: dict[str, Any] | None


class Disbursement(BaseModel):
    txn_no: str
    status: Literal["accepted", "sent", "processing", "unknown", "succeeded", "failed"]
    funder_id: str
    mode: Literal["direct", "co_lending"]
    allocation: AllocationOut
    amount: int
    currency: str
    payee: PayeeOut
    attempts: list[AttemptOut]
    failure: dict[str, Any] | None
    created_at: str
    updated_at: str


class DisbursementList(BaseModel):
    items: list[Disbursement]
    next_cursor: str | None


class Voucher(BaseModel):
    seq: int | None
    kind: str
    event: dict[str, Any]
    hash: str | None
    prev_hash: str | None
    at: str


class VoucherList(BaseModel):
    items: list[Voucher]


class AccountOut(BaseModel):
    borrower_id: str
    account_no: str
    account_name: str
    bank_code: str
    created_at: str


class AccountList(BaseModel):
    items: list[AccountOut]


class FunderOut(BaseModel):
    id: str
    name: str
    license: str
    mode: str
    priority: int
    platform_share: str | None
    single_max: int
    daily_limit: int
    used_today: int
    remaining_today: int
    prefund_balance: int | None
    connector: str
    circuit: Literal["closed", "half_open", "open"]
    paused: bool
    in_flight: dict[str, int]


class FunderList(BaseModel):
    business_day: str
    platform: dict[str, int]
    items: list[FunderOut]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str


class OpenApiDocument(BaseModel):
    """This OpenAPI 3.1 document."""

    model_config = ConfigDict(extra="allow")
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
