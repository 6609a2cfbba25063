"""Logs are JSON events with context, and personal data never reaches the stream unmasked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
import structlog

from gateway.logging import configure_logging, get_logger

ACCOUNT = "6222020200112233445"
MASKED_ACCOUNT = "622202*********3445"
PHONE = "13812345678"
MASKED_PHONE = "138****5678"

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; give the next test the state it found."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def lines(stream: io.StringIO) -> Lines:
    configure_logging("json", "info", stream)
    return lambda: [json.loads(line) for line in stream.getvalue().splitlines()]


def test_event_is_one_json_line_with_level_time_logger_and_context(lines: Lines) -> None:
    structlog.contextvars.bind_contextvars(request_id="req-1", txn_no="LC202611250001")
    get_logger("fundgate.test").info("disbursement.accepted", funder_id="bank-a", amount=1000000)
    [event] = lines()
    assert event["event"] == "disbursement.accepted"
    assert event["level"] == "info"
    assert event["logger"] == "fundgate.test"
    assert event["request_id"] == "req-1"
    assert event["txn_no"] == "LC202611250001"
    assert event["funder_id"] == "bank-a"
    assert event["amount"] == 1000000
    assert datetime.fromisoformat(event["timestamp"]).tzinfo is not None


def test_account_number_field_and_phone_in_message_are_masked(
    lines: Lines, stream: io.StringIO
) -> None:
    structlog.contextvars.bind_contextvars(request_id="req-2")
    get_logger("fundgate.test").info(
        f"borrower called from {PHONE}", account_no=ACCOUNT, bank_code="ICBC"
    )
    [event] = lines()
    assert event["account_no"] == MASKED_ACCOUNT
    assert event["event"] == f"borrower called from {MASKED_PHONE}"
    assert event["bank_code"] == "ICBC"
    assert event["request_id"] == "req-2"
    assert ACCOUNT not in stream.getvalue()
    assert PHONE not in stream.getvalue()


def test_named_fields_get_their_own_masker(lines: Lines) -> None:
    get_logger("t").info(
        "payee.registered",
        account_name="张三",
        payee_name="欧阳娜娜",
        id_number="11010519491231002X",
        phone=PHONE,
        mobile=int(PHONE),
        Account_No=ACCOUNT,
    )
    [event] = lines()
    assert event["account_name"] == "*三"
    assert event["payee_name"] == "***娜"
    assert event["id_number"] == "110***********002X"
    assert event["phone"] == MASKED_PHONE
    assert event["mobile"] == MASKED_PHONE
    assert event["Account_No"] == MASKED_ACCOUNT


def test_nested_values_are_masked(lines: Lines) -> None:
    get_logger("t").info(
        "bank.answer",
        payee={"account_no": ACCOUNT, "account_name": "张三", "bank_code": "ICBC"},
        body=[{"text": f"card {ACCOUNT}"}, f"tel {PHONE}"],
        names=("张三", "李四"),
    )
    [event] = lines()
    assert event["payee"] == {
        "account_no": MASKED_ACCOUNT,
        "account_name": "*三",
        "bank_code": "ICBC",
    }
    assert event["body"] == [{"text": f"card {MASKED_ACCOUNT}"}, f"tel {MASKED_PHONE}"]
    assert event["names"] == ["张三", "李四"]  # not a name field: free text has no names


def test_dataclass_values_are_masked_by_field_name(lines: Lines, stream: io.StringIO) -> None:
    @dataclass
    class Payee:
        account_no: str
        account_name: str

    get_logger("t").info("order.built", payee=Payee(ACCOUNT, "张三"))
    [event] = lines()
    assert event["payee"] == {"account_no": MASKED_ACCOUNT, "account_name": "*三"}
    assert "张三" not in stream.getvalue()


def test_correlation_ids_are_never_starred(lines: Lines) -> None:
    digits = "202611250001000123"  # 18 digits: would look like an account in free text
    structlog.contextvars.bind_contextvars(txn_no=digits)
    get_logger("t").info("attempt.sent", order_no=f"{digits}-1", bank_ref=digits)
    [event] = lines()
    assert (event["txn_no"], event["order_no"], event["bank_ref"]) == (
        digits,
        f"{digits}-1",
        digits,
    )


def test_exception_text_is_masked(lines: Lines, stream: io.StringIO) -> None:
    log = get_logger("t")
    try:
        raise RuntimeError(f"bank refused account {ACCOUNT}")
    except RuntimeError:
        log.exception("bank.error")
    [event] = lines()
    assert event["level"] == "error"
    assert "RuntimeError: bank refused account " + MASKED_ACCOUNT in event["exception"]
    assert ACCOUNT not in stream.getvalue()


def test_stdlib_records_share_the_pipeline(lines: Lines) -> None:
    structlog.contextvars.bind_contextvars(request_id="req-3")
    logging.getLogger("aiohttp.access").info("GET /v1/borrowers/B1/accounts/%s 204", ACCOUNT)
    [event] = lines()
    assert event["event"] == f"GET /v1/borrowers/B1/accounts/{MASKED_ACCOUNT} 204"
    assert event["logger"] == "aiohttp.access"
    assert event["level"] == "info"
    assert event["request_id"] == "req-3"


def test_level_filters_events(stream: io.StringIO) -> None:
    configure_logging("json", "warning", stream)
    log = get_logger("t")
    log.info("dropped")
    logging.getLogger("other").info("dropped too")
    log.warning("kept")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["kept"]


def test_configuring_twice_replaces_rather_than_duplicates(stream: io.StringIO) -> None:
    first = io.StringIO()
    configure_logging("json", "info", first)
    configure_logging("json", "info", stream)
    get_logger("t").info("once")
    logging.getLogger("other").warning("once too")
    assert first.getvalue() == ""
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == [
        "once",
        "once too",
    ]


def test_console_format_is_masked_too(stream: io.StringIO) -> None:
    configure_logging("console", "debug", stream)
    log = get_logger("t")
    log.debug("payee", account_no=ACCOUNT, name="张三")
    try:
        raise ValueError(PHONE)
    except ValueError:
        log.exception("boom")
    out = stream.getvalue()
    assert MASKED_ACCOUNT in out
    assert "name=*三" in out
    assert f"ValueError: {MASKED_PHONE}" in out
    assert ACCOUNT not in out
    assert PHONE not in out


def test_unknown_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("json", "chatty")
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("xml", "info")  # type: ignore[arg-type]
