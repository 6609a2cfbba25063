"""Typed configuration models. Amounts are integer fen; rates are decimals given as strings."""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Mapping
from datetime import time
from decimal import Decimal
from typing import Annotated, Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# Days per month when terms of different units are compared; loan products quote 30-day months.
DAYS_PER_MONTH = 30
# Regulation floor for the platform's own share in co-lending (联合贷款).
CO_LENDING_SHARE_FLOOR = Decimal("0.30")

Scope = Literal["disburse", "read", "admin"]
Repayment = Literal["equal_installment", "equal_principal", "interest_first"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def _problems(cls, v: Mapping[str, Any]) -> list[str]:
        """Checks across this model's fields, over those that are valid (`v`: field name →
        value; a field that failed its own validation is absent)."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        """`_problems`, also when some fields are invalid: `fundgate config check` lists
        every error, and a bad unit in a product must not hide that its amounts are upside
        down (an `after` validator runs only once every field is valid)."""
        try:
            model = handler(data)
        except ValidationError as e:
            if not isinstance(data, dict):
                raise
            problems = cls._problems(_valid_fields(cls, data, e))
            if not problems:
                raise
            details = [
                InitErrorDetails(type=err["type"], loc=err["loc"], input=err["input"],
                                 ctx=err.get("ctx", {}))
                for err in e.errors()
            ]  # fmt: skip
            details.append(_problem_detail(problems, data))
            raise ValidationError.from_exception_data(cls.__name__, details) from None
        problems = cls._problems(model.__dict__)
        if problems:
            raise ValueError("; ".join(problems))
        return model


def _valid_fields(cls: type[_Model], data: dict[str, Any], e: ValidationError) -> dict[str, Any]:
    """The fields of `data` that pass their own validation (defaults for those left out)."""
    bad = {err["loc"][0] for err in e.errors() if err["loc"]}
    valid: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name in bad:
            continue
        if name not in data:
            if not info.is_required():
                valid[name] = info.get_default(call_default_factory=True)
            continue
        try:
            valid[name] = TypeAdapter(cast(Any, Annotated[info.annotation, info])).validate_python(
                data[name]
            )
        except ValidationError:
            continue
    return valid


def _problem_detail(problems: list[str], data: Any) -> InitErrorDetails:
    error = PydanticCustomError(
        "value_error", "Value error, {error}", {"error": "; ".join(problems)}
    )
    return InitErrorDetails(type=error, loc=(), input=data)


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
    # rows each daily limit is spread over, so concurrent intakes do not queue on one row
    limit_buckets: int = Field(default=32, ge=1, le=256)
    # what carries the connectors' outbound HTTP under the shared httpx.AsyncClient:
    # "aiohttp" (connectors/transport.py, much less CPU per request) or "httpx" (httpcore,
    # httpx's own); webhooks go out on aiohttp directly (gateway.notifier)
    http_transport: Literal["aiohttp", "httpx"] = "aiohttp"

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


# Development keys for configs without a [security] section (the embedded demo). A real
# deployment sets its own as `env:NAME` secrets; `fundgate serve` warns while these are in use.
DEV_DATA_KEY = "X6UauD5FWX782RjMk8IH3I4uDMh82TMOWNBHI9za2NU="
DEV_INDEX_KEY = "Tk13MSPJnMNBeKXqrQ9xRzYkfIf9q5/sLPgiOsoIYkg="
# Ed25519 key pair (raw 32-byte seed / public key, base64) signing the daily voucher checkpoint
DEV_CHECKPOINT_SEED = "qCL72YY/xsPeCDXrM4NqeAa7ek6YI5Qre/g6SZW3WmU="
DEV_CHECKPOINT_PUBLIC = "Pjd1gXVUrZjZbTgvhNmcrJ6H5iwmzkpV46fTmdyTikc="


class SecurityConfig(_Model):
    """Keys for personal data at rest: AES-256-GCM data keys by id, and the blind-index key.
    Each key is base64 of 32 random bytes."""

    data_keys: dict[str, SecretStr] = Field(
        default_factory=lambda: {"dev-1": SecretStr(DEV_DATA_KEY)}, min_length=1
    )
    active_key: str = "dev-1"
    blind_index_key: SecretStr = SecretStr(DEV_INDEX_KEY)
    checkpoint_signing_key: SecretStr = SecretStr(DEV_CHECKPOINT_SEED)
    checkpoint_public_key: str = DEV_CHECKPOINT_PUBLIC

    @classmethod
    def _problems(cls, v: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        data_keys: dict[str, SecretStr] = v.get("data_keys", {})
        if "active_key" in v and "data_keys" in v and v["active_key"] not in data_keys:
            problems.append(f"active_key {v['active_key']!r} is not among data_keys")
        keys = {f"data_keys.{k}": key for k, key in data_keys.items()}
        for name in ("blind_index_key", "checkpoint_signing_key"):
            if name in v:
                keys[name] = v[name]
        if "checkpoint_public_key" in v:
            keys["checkpoint_public_key"] = SecretStr(v["checkpoint_public_key"])
        for name, secret in keys.items():
            try:
                raw = base64.b64decode(secret.get_secret_value(), validate=True)
            except (binascii.Error, ValueError):
                problems.append(f"{name}: not base64")
                continue
            if len(raw) != 32:
                problems.append(f"{name}: must be base64 of 32 bytes, got {len(raw)} bytes")
        for kid in data_keys:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", kid):
                problems.append(f"data_keys: key id {kid!r} must be 1-32 of [A-Za-z0-9_.-]")
        return problems

    @property
    def uses_dev_keys(self) -> bool:
        return any(k.get_secret_value() == DEV_DATA_KEY for k in self.data_keys.values()) or (
            self.blind_index_key.get_secret_value() == DEV_INDEX_KEY
        )


class LendingCoreConfig(_Model):
    webhook_url: str
    webhook_secret: SecretStr
    # outcome webhooks on their way at once (per gateway process)
    max_in_flight: int = Field(default=64, gt=0, le=1024)


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

    @classmethod
    def _problems(cls, v: Mapping[str, Any]) -> list[str]:
        problems = []
        if "min_amount" in v and "max_amount" in v and v["min_amount"] > v["max_amount"]:
            problems.append("min_amount is above max_amount")
        if "min_term" in v and "max_term" in v and v["min_term"].days > v["max_term"].days:
            problems.append("min_term is longer than max_term")
        return problems


StatementFormat = Literal["sandbox-csv", "csv", "camt053"]
StatementStatus = Literal["succeeded", "failed", "reversed"]


def _sandbox_words() -> dict[str, StatementStatus]:
    """The default status words: the sandbox bank's, and the normalised words themselves (a
    file written in `fundgate statement parse`'s own vocabulary reads as it says)."""
    return {"SUCCESS": "succeeded", "FAILED": "failed", "REVERSED": "reversed",
            "succeeded": "succeeded", "failed": "failed", "reversed": "reversed"}  # fmt: skip


class StatementColumns(_Model):
    """Column names of a generic CSV statement (matched after stripping blanks)."""

    order_no: str = Field(default="order_no", min_length=1)
    bank_ref: str | None = "bank_ref"
    amount: str = Field(default="amount", min_length=1)
    status: str = Field(default="status", min_length=1)
    booked_at: str | None = "finished_at"


class StatementSummary(_Model):
    """A summary (or trailer) row holding the statement's line count and total amount.

    `position = "first"`: the first non-blank line, before the column header.
    `position = "last"`: the last non-blank line. `marker`, when set, is the text of the
    row's first field (e.g. "合计" or "TOTAL"). Fields are 0-based indexes into the row; the
    total is written in the statement's `amount_unit`.
    """

    position: Literal["first", "last"] = "last"
    marker: str | None = None
    count_field: int = Field(default=1, ge=0)
    total_field: int = Field(default=2, ge=0)


class StatementConfig(_Model):
    """`[funders.statement]`: how this funder's daily statement is read.

    Without `path` the funder's connector fetches it (`fetch_statement`); with `path` (a
    template with `{funder}` and `{day}`, e.g. "/data/statements/{funder}/{day}.csv") the
    file is read in `format`. `csv` is the generic mapping below.
    """

    format: StatementFormat = "sandbox-csv"
    path: str | None = None
    encoding: str = "utf-8"
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    columns: StatementColumns = StatementColumns()
    amount_unit: Literal["fen", "yuan"] = "fen"
    # banks that print payouts as negative debits: the sign is dropped
    negative_debits: bool = False
    status_map: dict[str, StatementStatus] = Field(default_factory=_sandbox_words)
    # status words of lines that are not a final result (e.g. "PROCESSING"): counted, not used
    skip_statuses: list[str] = Field(default_factory=list)
    # strptime pattern of booked_at; ISO 8601 when unset
    booked_at_format: str | None = None
    # title lines before the column header (bank name, account, period)
    preamble_lines: int = Field(default=0, ge=0)
    summary: StatementSummary | None = None
    timezone: str = "Asia/Shanghai"  # for timestamps without an offset

    @field_validator("encoding")
    @classmethod
    def _line_based_codec(cls, v: str) -> str:
        try:
            info = codecs.lookup(v)
        except LookupError as e:
            raise ValueError(f"unknown encoding {v!r}") from e
        # lines are split on b"\n" before decoding: the codec must keep ASCII as is
        if "\n,".encode(info.name) != b"\n,":
            raise ValueError(f"encoding {v!r} is not ASCII-compatible")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r}") from e
        return v

    @field_validator("path")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                v.format(funder="f", day="2000-01-01")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"path may use only {{funder}} and {{day}}: {e}") from e
        return v


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
    statement: StatementConfig = StatementConfig()
    # takes no new payouts (intake and fail-over pass it by) while its open attempts are still
    # queried, its callbacks applied and its statements reconciled: how a funder is drained
    paused: bool = False

    @classmethod
    def _problems(cls, v: Mapping[str, Any]) -> list[str]:
        problems = []
        share = v.get("platform_share")
        if "platform_share" in v:  # valid, or given as none at all
            if v.get("mode") == "co_lending" and share is None:
                problems.append("co_lending funder needs platform_share")
            if v.get("mode") == "direct" and share is not None:
                problems.append("platform_share is only for co_lending funders")
        if "single_max" in v and "daily_limit" in v and v["single_max"] > v["daily_limit"]:
            problems.append("single_max is above daily_limit")
        return problems


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
    # on SIGTERM, bank calls in flight get this long before they are handed back
    drain_seconds: float = Field(default=10, ge=0)
    webhook_backoff_seconds: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 600.0], min_length=1
    )


class ReconciliationConfig(_Model):
    run_at: time = time(2, 0)
    window_days: int = Field(default=3, ge=0)
    # days missed while no gateway ran are caught up at start, at most this far back
    catch_up_days: int = Field(default=7, ge=1, le=366)


class FileConfig(_Model):
    gateway: GatewayConfig = GatewayConfig()
    lending_core: LendingCoreConfig | None = None
    clients: list[Client] = Field(min_length=1)
    products: list[Product] = Field(min_length=1)
    funders: list[Funder] = Field(min_length=1)
    dispatch: DispatchConfig = DispatchConfig()
    security: SecurityConfig = SecurityConfig()
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
