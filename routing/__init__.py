"""Pure routing decisions: compliance rules, funder eligibility, strategy, co-lending allocation.

Data in, decision out: nothing here does I/O (a test over the AST keeps it that way).
"""

from routing.allocation import Allocation, allocate
from routing.eligibility import FunderState, Refusal, candidates, eligibility
from routing.rules import LoanTerms, RuleViolation, check_loan

__all__ = [
    "Allocation",
    "FunderState",
    "LoanTerms",
    "Refusal",
    "RuleViolation",
    "allocate",
    "candidates",
    "check_loan",
    "eligibility",
]
