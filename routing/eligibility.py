"""Which funders may take a disbursement, with a reason for every refusal, and in what order."""

from __future__ import annotations

from dataclasses import dataclass

from config.models import Funder
from routing.allocation import allocate_for
from routing.rules import LoanTerms

# refusal codes that mean "a limit is in the way" rather than "this funder never could"
LIMIT_REASONS = frozenset({"single_max", "daily_limit", "prefund_insufficient"})


@dataclass(frozen=True, slots=True)
class FunderState:
    """What the database says about a funder right now."""

    used_today: int = 0
    prefund_balance: int = 0
    circuit_open: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    funder_id: str
    reason: str  # bounded code, see eligibility()
    message: str


def eligibility(funder: Funder, loan: LoanTerms, state: FunderState) -> Refusal | None:
    """None when `funder` may take `loan`, else the first reason it may not."""

    def no(reason: str, message: str) -> Refusal:
        return Refusal(funder.id, reason, message)

    if funder.paused:
        return no("paused", "paused by configuration: takes no new payouts")
    if loan.product not in funder.products:
        return no("product_not_offered", f"does not offer product {loan.product}")
    if funder.min_amount is not None and loan.amount < funder.min_amount:
        return no("amount_out_of_range", f"amount below the funder's minimum {funder.min_amount}")
    if funder.max_amount is not None and loan.amount > funder.max_amount:
        return no("amount_out_of_range", f"amount above the funder's maximum {funder.max_amount}")
    if funder.min_term is not None and loan.term.days < funder.min_term.days:
        return no("term_out_of_range", "term shorter than the funder's minimum")
    if funder.max_term is not None and loan.term.days > funder.max_term.days:
        return no("term_out_of_range", "term longer than the funder's maximum")
    if loan.amount > funder.single_max:
        return no("single_max", f"amount above single-transaction limit {funder.single_max}")
    if state.used_today + loan.amount > funder.daily_limit:
        return no(
            "daily_limit",
            f"daily limit {funder.daily_limit} would be exceeded ({state.used_today} used today)",
        )
    if state.circuit_open:
        return no("circuit_open", "circuit breaker open after consecutive bank failures")
    if funder.mode == "co_lending":
        platform = allocate_for(funder, loan.amount).platform
        if platform > state.prefund_balance:
            return no(
                "prefund_insufficient",
                f"platform share {platform} exceeds prefund balance {state.prefund_balance}",
            )
    return None


def candidates(
    funders: list[Funder],
    loan: LoanTerms,
    states: dict[str, FunderState],
    *,
    hint: str | None = None,
    exclude: frozenset[str] = frozenset(),
) -> tuple[list[Funder], list[Refusal]]:
    """Eligible funders in the order to try them (hint first, then lowest priority, then id)."""
    eligible: list[Funder] = []
    refusals: list[Refusal] = []
    for f in funders:
        if f.id in exclude:
            refusals.append(Refusal(f.id, "already_tried", "an earlier attempt was refused"))
            continue
        r = eligibility(f, loan, states.get(f.id, FunderState()))
        if r is None:
            eligible.append(f)
        else:
            refusals.append(r)
    eligible.sort(key=lambda f: (f.id != hint, f.priority, f.id))
    return eligible, refusals


def all_limit_refusals(refusals: list[Refusal]) -> bool:
    """True when limits, not the funders' offers, are what stops the disbursement."""
    return (
        bool(refusals)
        and all(r.reason in LIMIT_REASONS or r.reason == "already_tried" for r in refusals)
        and any(r.reason in LIMIT_REASONS for r in refusals)
    )
