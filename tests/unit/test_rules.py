"""Compliance rules on the loan itself: product, amount and term ranges, repayment, APR cap."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from config.models import GatewayConfig, Product, Term
from routing import LoanTerms, check_loan

GATEWAY = GatewayConfig(apr_cap=Decimal("0.24"))
PRODUCT = Product(
    code="consumer-standard",
    min_amount=300_000,
    max_amount=20_000_000,
    min_term=Term(unit="day", count=7),
    max_term=Term(unit="month", count=36),
    repayments=["equal_installment", "interest_first"],
)
LOAN = LoanTerms(
    amount=1_000_000,
    term=Term(unit="month", count=12),
    apr=Decimal("0.18"),
    product="consumer-standard",
    repayment="equal_installment",
)


def code_of(loan: LoanTerms, product: Product | None = PRODUCT) -> str | None:
    violation = check_loan(loan, product, GATEWAY)
    return None if violation is None else violation.code


def test_a_loan_within_every_rule_passes() -> None:
    assert check_loan(LOAN, PRODUCT, GATEWAY) is None


def test_unknown_product_is_refused_first() -> None:
    violation = check_loan(replace(LOAN, product="nope", amount=1), None, GATEWAY)
    assert violation is not None
    assert violation.code == "unknown_product"
    assert "nope" in violation.message


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        (299_999, "amount_out_of_range"),
        (300_000, None),  # the minimum itself
        (20_000_000, None),  # the maximum itself
        (20_000_001, "amount_out_of_range"),
    ],
)
def test_amount_must_lie_in_the_products_range(amount: int, code: str | None) -> None:
    assert code_of(replace(LOAN, amount=amount)) == code


def test_amount_refusal_names_the_range() -> None:
    violation = check_loan(replace(LOAN, amount=1), PRODUCT, GATEWAY)
    assert violation is not None
    assert "300000..20000000" in violation.message


@pytest.mark.parametrize(
    ("term", "code"),
    [
        (Term(unit="day", count=6), "term_out_of_range"),
        (Term(unit="day", count=7), None),  # the minimum itself
        (Term(unit="month", count=1), None),
        (Term(unit="month", count=36), None),  # the maximum itself
        (Term(unit="day", count=1080), None),  # 36 thirty-day months
        (Term(unit="day", count=1081), "term_out_of_range"),
        (Term(unit="month", count=37), "term_out_of_range"),
    ],
)
def test_term_must_lie_in_the_products_range_in_days_or_months(
    term: Term, code: str | None
) -> None:
    assert code_of(replace(LOAN, term=term)) == code


def test_repayment_not_offered_by_the_product_is_refused() -> None:
    assert code_of(replace(LOAN, repayment="equal_principal")) == "repayment_not_supported"


@pytest.mark.parametrize(
    ("term", "code"),
    [
        (Term(unit="month", count=12), None),
        (Term(unit="day", count=360), None),
        (Term(unit="month", count=13), "repayment_not_supported"),
        (Term(unit="day", count=400), "repayment_not_supported"),
    ],
)
def test_interest_first_is_limited_to_twelve_months(term: Term, code: str | None) -> None:
    assert code_of(replace(LOAN, repayment="interest_first", term=term)) == code


def test_interest_first_limit_does_not_touch_other_repayments() -> None:
    assert code_of(replace(LOAN, term=Term(unit="month", count=36))) is None


@pytest.mark.parametrize(
    ("apr", "code"),
    [
        ("0.2399", None),
        ("0.24", None),  # the cap itself
        ("0.2400", None),
        ("0.2401", "apr_above_cap"),
        ("0.36", "apr_above_cap"),
    ],
)
def test_apr_may_reach_but_not_exceed_the_cap(apr: str, code: str | None) -> None:
    assert code_of(replace(LOAN, apr=Decimal(apr))) == code


def test_rules_are_checked_in_the_documented_order() -> None:
    bad_everything = replace(
        LOAN,
        amount=1,
        term=Term(unit="day", count=1),
        apr=Decimal("0.5"),
        repayment="equal_principal",
    )
    assert code_of(bad_everything) == "amount_out_of_range"
    assert code_of(replace(bad_everything, amount=LOAN.amount)) == "term_out_of_range"
    assert code_of(replace(bad_everything, amount=LOAN.amount, term=LOAN.term)) == (
        "repayment_not_supported"
    )
