"""Compliance rules on the loan itself (金额与期限匹配校验, APR cap, repayment), before routing."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from config.models import GatewayConfig, Product, Term


@dataclass(frozen=True, slots=True)
class LoanTerms:
    amount: int
    term: Term
    apr: Decimal
    product: str
    repayment: str


@dataclass(frozen=True, slots=True)
class RuleViolation:
    """A refusal with its API error code and a message a lending-core engineer can act on."""

    code: str
    message: str


def _fmt_term(t: Term) -> str:
    return f"{t.count} {t.unit}{'s' if t.count != 1 else ''}"


def check_loan(
    loan: LoanTerms, product: Product | None, gateway: GatewayConfig
) -> RuleViolation | None:
    """The first rule the loan breaks, in the order the API documents, or None."""
    if product is None:
        return RuleViolation("unknown_product", f"unknown product {loan.product!r}")
    if not product.min_amount <= loan.amount <= product.max_amount:
        return RuleViolation(
            "amount_out_of_range",
            f"amount {loan.amount} fen is outside {product.min_amount}..{product.max_amount} "
            f"for product {product.code}",
        )
    if not product.min_term.days <= loan.term.days <= product.max_term.days:
        return RuleViolation(
            "term_out_of_range",
            f"term {_fmt_term(loan.term)} is outside {_fmt_term(product.min_term)}.."
            f"{_fmt_term(product.max_term)} for product {product.code}",
        )
    if loan.repayment not in product.repayments:
        return RuleViolation(
            "repayment_not_supported",
            f"repayment {loan.repayment!r} is not offered by product {product.code}",
        )
    if loan.repayment == "interest_first" and loan.term.days > product.interest_first_max_term.days:
        return RuleViolation(
            "repayment_not_supported",
            f"interest_first (bullet principal) is allowed up to "
            f"{_fmt_term(product.interest_first_max_term)}, not {_fmt_term(loan.term)}",
        )
    if loan.apr > gateway.apr_cap:
        return RuleViolation("apr_above_cap", f"apr {loan.apr} is above the cap {gateway.apr_cap}")
    return None
