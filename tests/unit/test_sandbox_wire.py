"""The sandbox wire format: signing, status mapping, options and message parsing. No I/O."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from connectors.base import BankStatus, PayoutOrder
from connectors.sandbox import wire

# Vectors computed independently with
#   printf '1700000000\nn-1\n{"order_no":"O1"}' | openssl dgst -sha256 -hmac sandbox-secret
SIGNING_VECTORS = [
    (
        "sandbox-secret",
        "1700000000",
        "n-1",
        b'{"order_no":"O1"}',
        "35c69eef35fef974ec2263cb27d3fc1eb8cacf9dbeedccfd31c8d0323738b853",
    ),
    (
        "sandbox-secret",
        "1700000000",
        "n-1",
        b"",
        "e00ce680d41ddb23b2f45f4040a0e0245217d6fee28e68b8db116cb54cce2198",
    ),
    (
        "sandbox-secret-a",
        "1764000000",
        "abc",
        b'{"amount":1}',
        "886a1cdb63d2670d00622c5a27a608318f7cb82dc17ac39e982c9c22ae6cf433",
    ),
]


@pytest.mark.parametrize(("secret", "timestamp", "nonce", "body", "expected"), SIGNING_VECTORS)
def test_sign_matches_the_contract_formula(
    secret: str, timestamp: str, nonce: str, body: bytes, expected: str
) -> None:
    assert wire.sign(secret, timestamp, nonce, body) == expected


def test_signature_check_accepts_uppercase_hex_and_refuses_any_change() -> None:
    secret, ts, nonce, body, good = SIGNING_VECTORS[0]
    assert wire.signature_matches(secret, ts, nonce, body, good.upper())
    assert not wire.signature_matches(secret, ts, nonce, body + b" ", good)
    assert not wire.signature_matches(secret, ts, "n-2", body, good)
    assert not wire.signature_matches("other", ts, nonce, body, good)
    # non-ASCII in a header must be a mismatch, not a TypeError from compare_digest
    assert not wire.signature_matches(secret, ts, nonce, body, "é" * 64)


def test_signed_headers_carry_timestamp_nonce_and_signature() -> None:
    headers = wire.signed_headers("s", b"x", timestamp="1", nonce="n")
    assert headers == {
        "X-Sandbox-Timestamp": "1",
        "X-Sandbox-Nonce": "n",
        "X-Sandbox-Signature": wire.sign("s", "1", "n", b"x"),
    }


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("ACCEPTED", BankStatus.ACCEPTED),
        ("PROCESSING", BankStatus.PROCESSING),
        ("SUCCESS", BankStatus.SUCCEEDED),
        ("FAILED", BankStatus.FAILED),
        ("REJECTED", BankStatus.FAILED),
        ("REVERSED", BankStatus.UNKNOWN),
        ("success", BankStatus.UNKNOWN),
        ("", BankStatus.UNKNOWN),
    ],
)
def test_status_mapping_is_exhaustive_with_unknown_fallback(word: str, status: BankStatus) -> None:
    assert wire.map_status(word) is status


def test_statement_status_mapping_refuses_unknown_words() -> None:
    assert wire.map_statement_status("SUCCESS") == "succeeded"
    assert wire.map_statement_status("FAILED") == "failed"
    assert wire.map_statement_status("REVERSED") == "reversed"
    with pytest.raises(wire.WireFormatError):
        wire.map_statement_status("PENDING")


def test_options_accept_the_default_config_shape() -> None:
    opts = wire.parse_options({"base_url": "http://127.0.0.1:8801/", "secret": "sandbox-secret-a"})
    assert opts.base_url == "http://127.0.0.1:8801"  # trailing slash dropped
    assert opts.secret.get_secret_value() == "sandbox-secret-a"
    assert opts.timeout_seconds == 10
    assert "sandbox-secret-a" not in repr(opts)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"secret": "s"}, "base_url: Field required"),
        ({"base_url": "http://b"}, "secret: Field required"),
        ({"base_url": "ftp://b", "secret": "s"}, "base_url: must be an http(s) URL"),
        ({"base_url": "http://b", "secret": ""}, "secret: must not be empty"),
        ({"base_url": "http://b", "secret": "s", "timeout_seconds": 0}, "timeout_seconds:"),
        ({"base_url": "http://b", "secret": "s", "colour": "red"}, "colour: unknown option"),
    ],
)
def test_invalid_options_raise_one_clear_value_error(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        wire.parse_options(raw)


def test_every_option_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError, match="base_url") as info:
        wire.parse_options({"timeout_seconds": -1})
    assert "secret" in str(info.value)
    assert "timeout_seconds" in str(info.value)


def test_payout_request_body_has_exactly_the_contract_fields() -> None:
    order = PayoutOrder(
        order_no="LC1-1",
        txn_no="LC1",
        funder_id="bank-a",
        amount=1_000_000,
        currency="CNY",
        account_no="6222020200112233445",
        account_name="张三",
        bank_code="ICBC",
        mode="direct",
        funder_amount=1_000_000,
        platform_amount=0,
        callback_url="http://gw/v1/callbacks/bank-a",
    )
    body = wire.payout_request_body(order)
    assert body.decode() == (
        '{"order_no":"LC1-1","amount":1000000,"currency":"CNY",'
        '"account_no":"6222020200112233445","account_name":"张三","bank_code":"ICBC",'
        '"callback_url":"http://gw/v1/callbacks/bank-a"}'
    )


def test_payout_view_maps_status_and_keeps_pre_execution_only_for_failures() -> None:
    ok = wire.parse_payout_view(
        b'{"order_no":"O1","bank_ref":"R1","status":"SUCCESS","amount":5,'
        b'"finished_at":"2026-11-25T10:00:00+08:00","pre_execution":true}',
        order_no="O1",
    )
    assert ok.status is BankStatus.SUCCEEDED
    assert ok.pre_execution is False
    assert ok.finished_at == datetime(2026, 11, 25, 2, tzinfo=UTC)
    failed = wire.parse_payout_view(
        b'{"order_no":"O1","status":"FAILED","fail_code":"X","pre_execution":true}',
        order_no="O1",
    )
    assert failed.status is BankStatus.FAILED
    assert failed.pre_execution is True


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b"",
        b'{"order_no":"O2","status":"SUCCESS"}',  # about another order
        b'{"status":"SUCCESS"}',
        b"\xff\xfe",
    ],
)
def test_unreadable_payout_views_are_wire_errors(body: bytes) -> None:
    with pytest.raises(wire.WireFormatError):
        wire.parse_payout_view(body, order_no="O1")


def test_naive_bank_times_are_read_in_bank_local_time() -> None:
    view = wire.parse_payout_view(
        b'{"order_no":"O1","status":"SUCCESS","finished_at":"2026-11-25T10:00:00"}',
        order_no="O1",
    )
    assert view.finished_at is not None
    assert view.finished_at.utcoffset() == timedelta(hours=8)


def test_callback_body_parses_and_keeps_the_raw_object() -> None:
    message, raw = wire.parse_callback_body(
        b'{"order_no":"O1","bank_ref":"R1","status":"FAILED","amount":5,'
        b'"finished_at":null,"fail_code":"ACCOUNT_FROZEN","fail_reason":"frozen","x":1}'
    )
    assert wire.callback_status(message) is BankStatus.FAILED
    assert message.fail_code == "ACCOUNT_FROZEN"
    assert raw["x"] == 1


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"status":"SUCCESS"}', b"\xff"])
def test_malformed_callback_bodies_are_wire_errors(body: bytes) -> None:
    with pytest.raises(wire.WireFormatError):
        wire.parse_callback_body(body)


@pytest.mark.parametrize("value", ["1700000000", " 1700000000 "])
def test_timestamps_are_unix_seconds(value: str) -> None:
    assert wire.parse_timestamp(value) == 1_700_000_000


@pytest.mark.parametrize("value", ["", "17e8", "-5", "1.5", "tomorrow"])
def test_other_timestamps_are_wire_errors(value: str) -> None:
    with pytest.raises(wire.WireFormatError):
        wire.parse_timestamp(value)


def test_freshness_window_is_300_seconds_both_ways() -> None:
    assert wire.is_fresh(1000, 1300)
    assert wire.is_fresh(1300, 1000)
    assert not wire.is_fresh(1000, 1301)
    assert not wire.is_fresh(1301, 1000)


def test_statement_round_trip_through_the_bank_writer() -> None:
    at = datetime(2026, 11, 25, 9, 30, tzinfo=timezone(timedelta(hours=8)))
    text = wire.STATEMENT_HEADER + "\n" + wire.statement_row("O1", "R1", 100, "SUCCESS", at)
    text += wire.statement_row("O,2", None, 200, "REVERSED", at) + "\n"
    lines = list(wire.parse_statement(text.splitlines()))
    assert [(x.order_no, x.bank_ref, x.amount, x.status) for x in lines] == [
        ("O1", "R1", 100, "succeeded"),
        ("O,2", None, 200, "reversed"),
    ]
    assert lines[0].booked_at == at


@pytest.mark.parametrize(
    "lines",
    [
        [],
        ["order_no,amount"],
        [wire.STATEMENT_HEADER, "O1,R1,abc,SUCCESS,"],
        [wire.STATEMENT_HEADER, "O1,R1,1,SUCCESS"],
        [wire.STATEMENT_HEADER, "O1,R1,1,PENDING,"],
    ],
)
def test_bad_statements_are_wire_errors(lines: list[str]) -> None:
    with pytest.raises(wire.WireFormatError):
        list(wire.parse_statement(lines))
