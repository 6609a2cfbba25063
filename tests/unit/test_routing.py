"""Funder eligibility and order: who may take a disbursement, why not, and who goes first."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from config.models import Funder, Term
from routing import FunderState, LoanTerms, Refusal, candidates, eligibility
from routing.eligibility import all_limit_refusals

PRODUCT = "consumer-standard"
LOAN = LoanTerms(
    amount=1_000_000,
    term=Term(unit="month", count=12),
    apr=Decimal("0.18"),
    product=PRODUCT,
    repayment="equal_installment",
)
RICH = FunderState(used_today=0, prefund_balance=10**10)


def funder(fid: str, priority: int = 1, **overrides: Any) -> Funder:
    fields: dict[str, Any] = {
        "id": fid,
        "name": fid.upper(),
        "license": "bank",
        "mode": "direct",
        "priority": priority,
        "products": [PRODUCT],
        "single_max": 20_000_000,
        "daily_limit": 100_000_000,
    }
    fields.update(overrides)
    return Funder.model_validate(fields)


def co_lending(fid: str, priority: int = 1, share: str = "0.30", **overrides: Any) -> Funder:
    return funder(fid, priority, mode="co_lending", platform_share=share, **overrides)


def reason(f: Funder, state: FunderState = RICH, loan: LoanTerms = LOAN) -> str | None:
    refusal = eligibility(f, loan, state)
    if refusal is not None:
        assert refusal.funder_id == f.id
        assert refusal.message
    return None if refusal is None else refusal.reason


def ids(funders: list[Funder]) -> list[str]:
    return [f.id for f in funders]


# eligibility: a reason for each refusal


def test_a_funder_within_every_limit_is_eligible() -> None:
    assert reason(funder("a")) is None
    assert reason(co_lending("b")) is None


def test_funder_not_offering_the_product_is_refused() -> None:
    assert reason(funder("a", products=["other"])) == "product_not_offered"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"min_amount": 1_000_001}, "amount_out_of_range"),
        ({"min_amount": 1_000_000}, None),
        ({"max_amount": 999_999}, "amount_out_of_range"),
        ({"max_amount": 1_000_000}, None),
        ({"min_term": {"unit": "month", "count": 13}}, "term_out_of_range"),
        ({"max_term": {"unit": "day", "count": 359}}, "term_out_of_range"),
        ({"max_term": {"unit": "day", "count": 360}}, None),
    ],
)
def test_funders_own_amount_and_term_ranges_apply(
    overrides: dict[str, Any], expected: str | None
) -> None:
    assert reason(funder("a", **overrides)) == expected


def test_amount_above_single_transaction_limit_is_refused() -> None:
    assert reason(funder("a", single_max=999_999)) == "single_max"
    assert reason(funder("a", single_max=1_000_000)) is None


def test_daily_limit_counts_todays_usage() -> None:
    f = funder("a", single_max=2_000_000, daily_limit=5_000_000)
    assert reason(f, FunderState(used_today=4_000_000)) is None  # reaches the limit exactly
    assert reason(f, FunderState(used_today=4_000_001)) == "daily_limit"


def test_open_circuit_refuses_the_funder() -> None:
    assert reason(funder("a"), FunderState(circuit_open=True)) == "circuit_open"


def test_a_paused_funder_takes_nothing_new_and_is_passed_by() -> None:
    assert reason(funder("a", paused=True), FunderState()) == "paused"
    order, refusals = candidates(
        [funder("a", priority=1, paused=True), funder("b", priority=2)], LOAN, {}, hint="a"
    )
    assert [f.id for f in order] == ["b"]
    assert [(r.funder_id, r.reason) for r in refusals] == [("a", "paused")]


def test_co_lending_needs_prefund_for_the_platform_share() -> None:
    f = co_lending("b", share="0.30")
    # 1_000_001 fen -> platform share ceil(300000.3) = 300001
    loan = replace(LOAN, amount=1_000_001)
    assert reason(f, FunderState(prefund_balance=300_001), loan) is None
    assert reason(f, FunderState(prefund_balance=300_000), loan) == "prefund_insufficient"


def test_direct_funder_needs_no_prefund() -> None:
    assert reason(funder("a"), FunderState(prefund_balance=0)) is None


# candidates: order, hint, exclusion


def test_lowest_priority_wins_then_id() -> None:
    fs = [funder("c", 3), funder("b", 1), funder("a", 2), funder("aa", 1)]
    eligible, refusals = candidates(fs, LOAN, {})
    assert ids(eligible) == ["aa", "b", "a", "c"]
    assert refusals == []


def test_hint_goes_first_when_eligible() -> None:
    fs = [funder("a", 1), funder("b", 2), funder("c", 3)]
    eligible, _ = candidates(fs, LOAN, {}, hint="c")
    assert ids(eligible) == ["c", "a", "b"]


def test_hint_is_ignored_when_not_eligible() -> None:
    fs = [funder("a", 1), funder("b", 2), funder("c", 3, single_max=1)]
    eligible, refusals = candidates(fs, LOAN, {}, hint="c")
    assert ids(eligible) == ["a", "b"]
    assert refusals == [Refusal("c", "single_max", refusals[0].message)]


def test_unknown_hint_changes_nothing() -> None:
    fs = [funder("a", 2), funder("b", 1)]
    eligible, _ = candidates(fs, LOAN, {}, hint="zzz")
    assert ids(eligible) == ["b", "a"]


def test_every_refused_funder_has_its_reason() -> None:
    fs = [
        funder("no-product", products=["other"]),
        funder("too-big", single_max=999_999),
        funder("day-full", daily_limit=1_500_000, single_max=1_500_000),
        funder("broken"),
        co_lending("no-prefund"),
        funder("fine", 9),
    ]
    states = {
        "day-full": FunderState(used_today=600_000),
        "broken": FunderState(circuit_open=True),
        "no-prefund": FunderState(prefund_balance=299_999),
    }
    eligible, refusals = candidates(fs, LOAN, states)
    assert ids(eligible) == ["fine"]
    assert {r.funder_id: r.reason for r in refusals} == {
        "no-product": "product_not_offered",
        "too-big": "single_max",
        "day-full": "daily_limit",
        "broken": "circuit_open",
        "no-prefund": "prefund_insufficient",
    }


def test_funder_without_state_is_judged_on_an_empty_day_and_no_prefund() -> None:
    eligible, refusals = candidates([funder("a"), co_lending("b")], LOAN, {})
    assert ids(eligible) == ["a"]
    assert [(r.funder_id, r.reason) for r in refusals] == [("b", "prefund_insufficient")]


def test_excluded_funders_are_refused_as_already_tried() -> None:
    fs = [funder("a", 1), funder("b", 2)]
    eligible, refusals = candidates(fs, LOAN, {}, hint="a", exclude=frozenset({"a"}))
    assert ids(eligible) == ["b"]
    assert [(r.funder_id, r.reason) for r in refusals] == [("a", "already_tried")]


# all_limit_refusals: limit_exceeded versus no_eligible_funder


def _refusals(*reasons: str) -> list[Refusal]:
    return [Refusal(f"f{i}", r, "") for i, r in enumerate(reasons)]


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        ((), False),
        (("single_max",), True),
        (("daily_limit", "prefund_insufficient"), True),
        (("daily_limit", "already_tried"), True),
        (("already_tried",), False),
        (("daily_limit", "product_not_offered"), False),
        (("daily_limit", "circuit_open"), False),
        (("amount_out_of_range",), False),
    ],
)
def test_all_limit_refusals_only_when_limits_alone_stand_in_the_way(
    reasons: tuple[str, ...], expected: bool
) -> None:
    assert all_limit_refusals(_refusals(*reasons)) is expected
