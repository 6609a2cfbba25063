"""Matching rules: every break type, automatic resolution only where the answer is certain,
the cross-day window, and duplicates at the bank (within a statement and across days)."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from connectors.base import BankStatus
from reconciliation.classify import (
    Bank,
    BreakType,
    Ours,
    Verdict,
    classify,
    classify_absent,
    is_plain_match,
)
from reconciliation.report import Summary, Tally, yuan

D = date(2026, 3, 10)
AMOUNT = 100_00


def ours(status: str, amount: int = AMOUNT) -> Ours:
    return Ours(status, amount, D)


def paid(n: int = 1, **kw: int | bool) -> Bank:
    return Bank(succeeded=n, amounts=(AMOUNT,), **kw)  # type: ignore[arg-type]


FAILED = Bank(failed=1, amounts=(AMOUNT,))
REVERSED = Bank(reversed=1, amounts=(AMOUNT,), earlier_paid=1, earlier_seen=True)


@pytest.mark.parametrize(
    ("our", "bank", "verdict", "kind"),
    [
        ("succeeded", paid(), Verdict.MATCHED, None),
        ("failed", FAILED, Verdict.MATCHED, None),
        ("failed", REVERSED, Verdict.MATCHED, None),
        ("unknown", paid(), Verdict.AUTO_SUCCEEDED, BreakType.STATUS_MISMATCH_BANK_SUCCEEDED),
        ("processing", paid(), Verdict.AUTO_SUCCEEDED, BreakType.STATUS_MISMATCH_BANK_SUCCEEDED),
        ("sent", paid(), Verdict.AUTO_SUCCEEDED, BreakType.STATUS_MISMATCH_BANK_SUCCEEDED),
        ("unknown", FAILED, Verdict.AUTO_FAILED, BreakType.STATUS_MISMATCH_BANK_FAILED),
        ("processing", FAILED, Verdict.AUTO_FAILED, BreakType.STATUS_MISMATCH_BANK_FAILED),
        ("failed", paid(), Verdict.BREAK, BreakType.STATUS_MISMATCH_BANK_SUCCEEDED),
        ("accepted", paid(), Verdict.BREAK, BreakType.STATUS_MISMATCH_BANK_SUCCEEDED),
        ("succeeded", FAILED, Verdict.BREAK, BreakType.STATUS_MISMATCH_BANK_FAILED),
        ("succeeded", REVERSED, Verdict.BREAK, BreakType.STATUS_MISMATCH_BANK_FAILED),
        ("unknown", REVERSED, Verdict.BREAK, BreakType.STATUS_MISMATCH_BANK_FAILED),
        ("accepted", FAILED, Verdict.BREAK, BreakType.STATUS_MISMATCH_BANK_FAILED),
        ("succeeded", paid(2), Verdict.BREAK, BreakType.DUPLICATE_AT_BANK),
        ("succeeded", paid(earlier_paid=1, earlier_seen=True), Verdict.BREAK,
         BreakType.DUPLICATE_AT_BANK),
    ],
)  # fmt: skip
def test_an_order_on_the_statement(
    our: str, bank: Bank, verdict: Verdict, kind: BreakType | None
) -> None:
    d = classify(ours(our), bank)
    assert (d.verdict, d.type) == (verdict, kind)
    assert d.reason


def test_only_certain_answers_are_applied_automatically() -> None:
    assert classify(ours("unknown"), paid()).bank_status is BankStatus.SUCCEEDED
    assert classify(ours("processing"), FAILED).bank_status is BankStatus.FAILED
    assert classify(ours("failed"), paid()).bank_status is None
    assert classify(ours("unknown"), REVERSED).bank_status is None
    assert classify(ours("unknown"), Bank(succeeded=1)).bank_status is BankStatus.SUCCEEDED


def test_another_amount_is_an_amount_mismatch_even_when_we_had_no_answer() -> None:
    d = classify(ours("unknown"), Bank(succeeded=1, amounts=(AMOUNT + 1,)))
    assert (d.verdict, d.type) == (Verdict.BREAK, BreakType.AMOUNT_MISMATCH)
    assert "10001" in d.reason


def test_a_duplicate_outranks_an_amount_mismatch() -> None:
    d = classify(ours("succeeded"), Bank(succeeded=2, amounts=(AMOUNT, AMOUNT + 5)))
    assert d.type is BreakType.DUPLICATE_AT_BANK


def test_an_unknown_order_is_missing_at_gateway_once_and_a_duplicate_if_paid_again() -> None:
    assert classify(None, paid()).type is BreakType.MISSING_AT_GATEWAY
    assert classify(None, FAILED).type is BreakType.MISSING_AT_GATEWAY
    again = paid(earlier_paid=1, earlier_seen=True)
    assert classify(None, again).type is BreakType.DUPLICATE_AT_BANK
    seen = Bank(failed=1, earlier_seen=True)
    assert classify(None, seen).verdict is Verdict.NOT_EXPECTED


def test_a_reversal_of_a_duplicate_leaves_one_payout() -> None:
    bank = Bank(reversed=1, amounts=(AMOUNT,), earlier_paid=2, earlier_seen=True)
    assert bank.net_paid == 1
    assert classify(ours("succeeded"), bank).verdict is Verdict.MATCHED


@pytest.mark.parametrize(
    ("status", "days_later", "verdict", "kind"),
    [
        ("succeeded", 0, Verdict.PENDING, None),
        ("succeeded", 2, Verdict.PENDING, None),
        ("succeeded", 3, Verdict.BREAK, BreakType.MISSING_AT_BANK),
        ("succeeded", 9, Verdict.BREAK, BreakType.MISSING_AT_BANK),
        ("unknown", 1, Verdict.PENDING, None),
        ("unknown", 3, Verdict.NOT_EXPECTED, None),
        ("failed", 0, Verdict.NOT_EXPECTED, None),
    ],
)
def test_an_order_not_listed_waits_for_the_window(
    status: str, days_later: int, verdict: Verdict, kind: BreakType | None
) -> None:
    d = classify_absent(ours(status), D + timedelta(days=days_later), window_days=3)
    assert (d.verdict, d.type) == (verdict, kind)


def test_without_a_window_a_missing_order_is_a_break_the_same_day() -> None:
    assert classify_absent(ours("succeeded"), D, 0).type is BreakType.MISSING_AT_BANK


def test_the_bulk_rule_agrees_with_the_classifier() -> None:
    cases = [
        ("succeeded", paid(), 1, "succeeded"),
        ("failed", FAILED, 1, "failed"),
        ("unknown", paid(), 1, "succeeded"),
        ("succeeded", paid(2), 2, "succeeded"),
    ]
    for status, bank, lines, bank_status in cases:
        plain = is_plain_match(status, AMOUNT, lines, bank_status, AMOUNT, bank.earlier_seen)
        if plain:
            assert classify(ours(status), bank).verdict is Verdict.MATCHED


def test_the_summary_counts_and_round_trips_as_json() -> None:
    s = Summary(lines=3, amount=300)
    s.count(classify(ours("succeeded"), paid()), AMOUNT)
    s.count(classify(None, paid()), 7)
    s.count(classify_absent(ours("succeeded"), D, 3), 5)
    s.auto_resolved["missing_at_gateway"].add(7)
    assert s.matched == Tally(1, AMOUNT)
    assert s.breaks["missing_at_gateway"] == Tally(1, 7)
    assert s.pending == Tally(1, 5)
    assert (s.total_breaks, s.total_auto_resolved) == (1, 1)
    assert Summary.from_json(s.to_json()) == s


def test_yuan_formats_fen_exactly() -> None:
    assert [yuan(0), yuan(5), yuan(123456), yuan(-100)] == ["0.00", "0.05", "1,234.56", "-1.00"]
