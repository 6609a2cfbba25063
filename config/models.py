"""Typed configuration models. Amounts are integer fen; rates are decimals given as strings."""

from __future__ import annotations

import re
from datetime import time
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

# Days per month when terms of different units are compared; loan products quote 30-day months.
DAYS_PER_MONTH = 30
# Regulation floor for the platform's own share in co-lending (联合贷款).
CO_LENDING_SHARE_FLOOR = Decimal("0.30")

Scope = Literal["disburse", "read", "admin"]
Repayment = Literal["equal_installment", "equal_principal", "interest_first"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Term(_Model):
    unit: Literal["day", "month"]
    count: int = Field(gt=0)

    @property
    def days(self) -> int:
        return self.count if self.unit == "day" else self.count * DAYS_PER_MONTH


class GatewayConfig(_Model):
    timezone: str = "Asia/Shanghai"
    apr_cap: Decimal = Field(default=Decimal("0.24"), gt=0, le=1)
    min_platform_share: Decimal = Field(default=CO_LENDING_SHARE_FLOOR, gt=0, lt=1)
    platform_daily_limit: int = Field(default=50_000_000_000, gt=0)
    public_url: str = "http://127.0.0.1:8700"
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    # a request that cannot get a database connection this fast is answered 503 + Retry-After
    db_acquire_timeout_seconds: float = Field(default=2.0, gt=0)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r}") from e
        return v

    @field_validator("min_platform_share")
    @classmethod
    def _floor(cls, v: Decimal) -> Decimal:
        if v < CO_LENDING_SHARE_FLOOR:
            raise ValueError(f"must be at least {CO_LENDING_SHARE_FLOOR} (co-lending floor)")
        return v

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class LendingCoreConfig(_Model):
    webhook_url: str
    webhook_secret: SecretStr


class Client(_Model):
    name: str = Field(min_length=1)
    token_sha256: str
    scopes: list[Scope] = Field(min_length=1)

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be the 64 lowercase hex digits of a sha256")
        return v


class Product(_Model):
    code: str = Field(min_length=1)
    min_amount: int = Field(gt=0)
    max_amount: int = Field(gt=0)
    min_term: Term
    max_term: Term
    repayments: list[Repayment] = Field(min_length=1)
    # bullet-principal loans are short-term by rule
    interest_first_max_term: Term = Term(unit="month", count=12)

    @model_validator(mode="after")
    def _ranges(self) -> Product:
        problems = []
        if self.min_amount > self.max_amount:
            problems.append("min_amount is above max_amount")
        if self.min_term.days > self.max_term.days:
            problems.append("min_term is longer than max_term")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Funder(_Model):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    name: str = Field(min_length=1)
    license: Literal["bank", "consumer_finance"]
    mode: Literal["direct", "co_lending"]
    platform_share: Decimal | None = Field(default=None, gt=0, lt=1)
    priority: int = Field(ge=0)
    products: list[str] = Field(min_length=1)
    single_max: int = Field(gt=0)
    daily_limit: int = Field(gt=0)
    prefund_balance: int = Field(default=0, ge=0)
    min_amount: int | None = Field(default=None, gt=0)
    max_amount: int | None = Field(default=None, gt=0)
    min_term: Term | None = None
    max_term: Term | None = None
    connector: str = "sandbox"
    connector_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _mode(self) -> Funder:
        problems = []
        if self.mode == "co_lending" and self.platform_share is None:
            problems.append("co_lending funder needs platform_share")
        if self.mode == "direct" and self.platform_share is not None:
            problems.append("platform_share is only for co_lending funders")
        if self.single_max > self.daily_limit:
            problems.append("single_max is above daily_limit")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DispatchConfig(_Model):
    max_in_flight_per_funder: int = Field(default=32, gt=0)
    lease_seconds: float = Field(default=30, gt=0)
    query_backoff_seconds: list[float] = Field(
        default_factory=lambda: [10.0, 60.0, 300.0, 1800.0, 3600.0], min_length=1
    )
    escalate_after_seconds: float = Field(default=86400, gt=0)
    not_sent_retries: int = Field(default=3, ge=0)
    not_sent_backoff_seconds: float = Field(default=2, ge=0)
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    # consecutive NotSent/OutcomeUnknown answers that open a funder's circuit, and for how long
    circuit_failure_threshold: int = Field(default=5, gt=0)
    circuit_cooldown_seconds: float = Field(default=30, gt=0)
    webhook_backoff_seconds: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 600.0], min_length=1
    )


class ReconciliationConfig(_Model):
    run_at: time = time(2, 0)
    window_days: int = Field(default=3, ge=0)


class FileConfig(_Model):
    gateway: GatewayConfig = GatewayConfig()
    lending_core: LendingCoreConfig | None = None
    clients: list[Client] = Field(min_length=1)
    products: list[Product] = Field(min_length=1)
    funders: list[Funder] = Field(min_length=1)
    dispatch: DispatchConfig = DispatchConfig()
    reconciliation: ReconciliationConfig = ReconciliationConfig()

    def product(self, code: str) -> Product | None:
        return next((p for p in self.products if p.code == code), None)

    def funder(self, funder_id: str) -> Funder | None:
        return next((f for f in self.funders if f.id == funder_id), None)


def cross_checks(raw: dict[str, Any]) -> list[str]:
    """Checks across sections, over the raw (secret-resolved) file, so they are reported even
    when some entries fail their own validation."""
    errors: list[str] = []

    def entries(section: str) -> list[tuple[int, dict[str, Any]]]:
        value = raw.get(section)
        if not isinstance(value, list):
            return []
        return [(i, e) for i, e in enumerate(value) if isinstance(e, dict)]

    def duplicates(section: str, key: str) -> None:
        seen: set[Any] = set()
        for _, e in entries(section):
            v = e.get(key)
            if isinstance(v, str):
                if v in seen:
                    errors.append(f"{section}: duplicate {key} {v!r}")
                seen.add(v)

    duplicates("products", "code")
    duplicates("funders", "id")
    duplicates("clients", "name")
    codes = {e.get("code") for _, e in entries("products")}
    gw = raw.get("gateway")
    gateway: dict[str, Any] = gw if isinstance(gw, dict) else {}
    try:
        floor = max(Decimal(str(gateway.get("min_platform_share", CO_LENDING_SHARE_FLOOR))),
                    CO_LENDING_SHARE_FLOOR)  # fmt: skip
    except ArithmeticError:
        floor = CO_LENDING_SHARE_FLOOR
    for i, f in entries("funders"):
        where = f"funders[{i}] ({f.get('id', '?')})"
        products = f.get("products")
        for p in products if isinstance(products, list) else []:
            if p not in codes:
                errors.append(f"{where}.products: unknown product {p!r}")
        share = f.get("platform_share")
        if f.get("mode") == "co_lending" and share is not None:
            try:
                below = Decimal(str(share)) < floor
            except ArithmeticError:
                below = False  # the field's own validation reports a share that is no number
            if below:
                errors.append(
                    f"{where}.platform_share: {share} is below the co-lending floor {floor}"
                )
    return errors
