"""Structured logging: events with fields, context from contextvars, personal data masked.

    from gateway.logging import configure_logging, get_logger

    configure_logging("json", "info")            # once at start-up; calling again reconfigures
    log = get_logger(__name__)
    structlog.contextvars.bind_contextvars(request_id=rid, txn_no=txn_no)
    log.info("disbursement.accepted", funder_id="bank-a", account_no=account_no)

Everything goes through one pipeline: structlog events and the standard library's records
(aiohttp's access and error logs, asyncio, asyncpg) meet in a single root handler whose
formatter merges the bound contextvars, adds the ISO timestamp, level and logger name,
renders exceptions, **masks** (`mask_event`) and renders JSON or console lines. Masking sits
after exception rendering, so a traceback quoting an account number is masked as well.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from gateway.masking import mask_account, mask_id_number, mask_name, mask_phone, mask_text

_Masker = Callable[[str], str]

# Field names whose value is one specific kind of personal data. Matched lower-cased, exactly:
# a suffix rule would also mask harmless fields such as `funder_name` or `bank_name`.
_FIELD_MASKERS: Mapping[str, _Masker] = {
    **dict.fromkeys(
        ("account_no", "account_number", "payee_account_no", "card_no", "acct_no"), mask_account
    ),
    **dict.fromkeys(
        ("account_name", "payee_name", "name", "borrower_name", "real_name", "holder_name"),
        mask_name,
    ),
    **dict.fromkeys(("id_number", "id_no", "id_card", "id_card_no", "cert_no"), mask_id_number),
    **dict.fromkeys(("phone", "mobile", "phone_no", "mobile_no", "phone_number"), mask_phone),
}

# Correlation identifiers stay greppable: they are not personal data, and a txn_no or bank
# order number made of 12+ digits would otherwise be starred like an account number.
_VERBATIM_FIELDS = frozenset(
    {"timestamp", "level", "logger", "request_id", "txn_no", "order_no", "bank_ref"}
)

# Libraries that log every outbound request at INFO; the connector events and metrics
# already say the same with bounded fields.
_QUIET_LOGGERS = ("httpx", "httpcore")


class _Handler(logging.StreamHandler[TextIO]):
    """The root handler this module installs; its type lets a second call find and replace it."""


def _mask_value(value: Any, masker: _Masker) -> Any:
    if isinstance(value, str):
        return masker(value)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        # an int in a personal-data field (an account number parsed as a number) is still one
        return masker(str(value)) if masker is not mask_text else value
    if isinstance(value, Mapping):
        return {k: _mask_field(str(k), v, masker) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask_value(v, masker) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # a logged PayoutOrder must not leak through its repr: walk its fields by name
        return _mask_value(dataclasses.asdict(value), masker)
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return _mask_value(model_dump(mode="json"), masker)
    # Decimal, datetime, UUID, exceptions, anything else: its text, masked
    return masker(str(value))


def _mask_field(key: str, value: Any, inherited: _Masker = mask_text) -> Any:
    lowered = key.lower()
    if lowered in _VERBATIM_FIELDS and isinstance(value, str):
        return value
    return _mask_value(value, _FIELD_MASKERS.get(lowered, inherited))


def mask_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask personal data in every field, nested ones included.

    Fields named for one kind of personal data (`account_no`, `payee_name`, `id_number`,
    `phone`, ...) get that kind's masker; every other string goes through `mask_text`.
    """
    return {key: _mask_field(key, value) for key, value in event_dict.items()}


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def _renderer(fmt: Literal["json", "console"], stream: TextIO) -> Processor:
    if fmt == "json":
        return structlog.processors.JSONRenderer(ensure_ascii=False)
    if fmt == "console":
        isatty = getattr(stream, "isatty", None)
        return structlog.dev.ConsoleRenderer(
            colors=bool(isatty and isatty()),
            # exceptions are already text (rendered before masking), so no rich tracebacks
            exception_formatter=structlog.dev.plain_traceback,
        )
    raise ValueError(f"unknown log format {fmt!r}")


def configure_logging(
    fmt: Literal["json", "console"] = "json",
    level: str | int = "info",
    stream: TextIO | None = None,
) -> None:
    """Send structlog events and stdlib records, masked, to `stream` (default: stdout).

    Idempotent: a second call replaces the handler and processors of the first.
    """
    out = stream if stream is not None else sys.stdout
    threshold = _level_number(level)
    renderer = _renderer(fmt, out)  # before any global change: a bad argument changes nothing
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # no caching: a reconfiguration (tests, the CLI) must reach loggers already in use
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            mask_event,
            renderer,
        ],
    )
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(threshold, logging.WARNING))


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger whose events carry `logger=name`."""
    return cast(FilteringBoundLogger, structlog.get_logger(name))
