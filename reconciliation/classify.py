"""Matching rules: one order's gateway record against what the bank's statements say of it.

The bank is the source of truth for whether money moved. The vocabulary is the one payment
operators use (roncoo-pay's reconciliation):

    matched                          both sides agree
    missing_at_bank                  we say succeeded; no statement within the window has it
    missing_at_gateway               the bank lists an order we do not know (critical)
    status_mismatch_bank_succeeded   we say failed/unknown/processing, the bank paid
    status_mismatch_bank_failed      we say succeeded, the bank failed or reversed it
    amount_mismatch                  the bank moved another amount than we asked
    duplicate_at_bank                the bank paid the same order twice (money moved twice)
    ledger_total_mismatch            (per run, not per order) the ledger's settled payouts of
                                     the day differ from the statement's total (critical)

Decision table for an order on this statement (first rule that applies wins):

    gateway   bank (net of earlier statements)        verdict
    -------   -------------------------------------   --------------------------------------
    none      seen on an earlier statement, paid > 1   break duplicate_at_bank
    none      seen on an earlier statement             not expected (reported then)
    none      any                                      break missing_at_gateway
    any       paid more than once, paid here           break duplicate_at_bank
    any       a line's amount differs from ours        break amount_mismatch
    succeeded paid                                     matched
    sent/processing/unknown  paid                      auto: succeeded
    failed/accepted          paid                      break status_mismatch_bank_succeeded
    failed    failed or reversed                       matched
    sent/processing/unknown  failed                    auto: failed
    succeeded failed or reversed                       break status_mismatch_bank_failed
    open      reversed; accepted + failed              break status_mismatch_bank_failed

and for an order of ours the statements have not shown since its day:

    failed                                      not expected (a failed order need not appear)
    within the window                           pending (looked for in later statements)
    succeeded, window over                      break missing_at_bank
    still open, window over                     not expected (the status poller owns it)

Automatic resolution happens only where the answer is certain: the gateway has no final
answer (sent, processing, unknown) and the bank has one (paid, or plainly failed).
"""

from __future__ import annotations

import enum
from datetime import date
from typing import NamedTuple

from connectors.base import BankStatus

OPEN_STATES = frozenset({"sent", "processing", "unknown"})


class BreakType(enum.StrEnum):
    MISSING_AT_BANK = "missing_at_bank"
    MISSING_AT_GATEWAY = "missing_at_gateway"
    STATUS_MISMATCH_BANK_SUCCEEDED = "status_mismatch_bank_succeeded"
    STATUS_MISMATCH_BANK_FAILED = "status_mismatch_bank_failed"
    AMOUNT_MISMATCH = "amount_mismatch"
    DUPLICATE_AT_BANK = "duplicate_at_bank"
    # a run-level finding, not an order's: the ledger's settled payouts of the day and the
    # statement's net paid total of that day's orders differ (`gateway.reconcile`)
    LEDGER_TOTAL_MISMATCH = "ledger_total_mismatch"


BREAK_TYPES: tuple[str, ...] = tuple(t.value for t in BreakType)

# what an unresolved break of each type means for money; critical ones page someone
SEVERITY: dict[BreakType, str] = {
    BreakType.MISSING_AT_GATEWAY: "critical",
    BreakType.DUPLICATE_AT_BANK: "critical",
    BreakType.STATUS_MISMATCH_BANK_FAILED: "critical",
    BreakType.STATUS_MISMATCH_BANK_SUCCEEDED: "high",
    BreakType.MISSING_AT_BANK: "high",
    BreakType.AMOUNT_MISMATCH: "high",
    BreakType.LEDGER_TOTAL_MISMATCH: "critical",
}


class Verdict(enum.StrEnum):
    MATCHED = "matched"
    PENDING = "pending"
    BREAK = "break"
    AUTO_SUCCEEDED = "auto_succeeded"
    AUTO_FAILED = "auto_failed"
    NOT_EXPECTED = "not_expected"


# The three value types below are named tuples, not frozen dataclasses: a run builds a few of
# them for each of its ~70,000 odd orders a night, and a frozen dataclass's constructor (one
# `object.__setattr__` per field) cost five times a tuple's.


class Ours(NamedTuple):
    """The gateway's record of one order (an attempt)."""

    status: str
    amount: int
    # the order's business day: `classify_absent` counts the window from it, given the
    # pending pool's expected day (the disbursement's business day, the ledger's)
    day: date


class Bank(NamedTuple):
    """What the bank's statements say of one order: this statement's lines by status, the
    distinct amounts on them, and its net payouts on earlier statements."""

    succeeded: int = 0
    failed: int = 0
    reversed: int = 0
    amounts: tuple[int, ...] = ()
    earlier_paid: int = 0
    earlier_seen: bool = False

    @property
    def net_paid(self) -> int:
        return self.earlier_paid + self.succeeded - self.reversed

    @property
    def status(self) -> str:
        """succeeded (money moved once or more) | reversed | failed."""
        if self.net_paid >= 1:
            return "succeeded"
        return "reversed" if self.reversed else "failed"

    @property
    def amount(self) -> int:
        return max(self.amounts) if self.amounts else 0


class Decision(NamedTuple):
    verdict: Verdict
    reason: str
    type: BreakType | None = None

    @property
    def bank_status(self) -> BankStatus | None:
        """The status to apply to our record, for an automatic resolution."""
        match self.verdict:
            case Verdict.AUTO_SUCCEEDED:
                return BankStatus.SUCCEEDED
            case Verdict.AUTO_FAILED:
                return BankStatus.FAILED
            case _:
                return None

    @property
    def is_break(self) -> bool:
        return self.type is not None


def _brk(t: BreakType, reason: str) -> Decision:
    return Decision(Verdict.BREAK, reason, t)


def _auto(v: Verdict, t: BreakType, reason: str) -> Decision:
    return Decision(v, reason, t)


def classify(ours: Ours | None, bank: Bank) -> Decision:
    """An order that is on this statement."""
    if ours is None:
        if bank.earlier_seen:
            if bank.succeeded and bank.net_paid > 1:
                return _brk(
                    BreakType.DUPLICATE_AT_BANK,
                    f"unknown order paid again: {bank.net_paid} payouts over the statements",
                )
            return Decision(Verdict.NOT_EXPECTED, "unknown order, reported on an earlier day")
        return _brk(
            BreakType.MISSING_AT_GATEWAY, f"the bank lists an order we do not know ({bank.status})"
        )
    if bank.succeeded and bank.net_paid > 1:
        where = "earlier statements and this one" if bank.earlier_paid else "this statement"
        return _brk(
            BreakType.DUPLICATE_AT_BANK, f"paid {bank.net_paid} times ({where}); we sent it once"
        )
    wrong = [a for a in bank.amounts if a != ours.amount]
    if wrong:
        return _brk(
            BreakType.AMOUNT_MISMATCH, f"the bank moved {wrong[0]} fen, we asked for {ours.amount}"
        )
    said, ours_status = bank.status, ours.status
    if said == "succeeded":
        if ours_status == "succeeded":
            return Decision(Verdict.MATCHED, "paid on both sides")
        if ours_status in OPEN_STATES:
            return _auto(
                Verdict.AUTO_SUCCEEDED,
                BreakType.STATUS_MISMATCH_BANK_SUCCEEDED,
                f"we had no final answer ({ours_status}); the bank paid it",
            )
        return _brk(
            BreakType.STATUS_MISMATCH_BANK_SUCCEEDED, f"we say {ours_status}, the bank paid it"
        )
    if ours_status == "failed":
        return Decision(Verdict.MATCHED, f"failed on both sides (bank: {said})")
    if said == "failed" and ours_status in OPEN_STATES:
        return _auto(
            Verdict.AUTO_FAILED,
            BreakType.STATUS_MISMATCH_BANK_FAILED,
            f"we had no final answer ({ours_status}); the bank failed it",
        )
    return _brk(BreakType.STATUS_MISMATCH_BANK_FAILED, f"we say {ours_status}, the bank {said} it")


def classify_absent(ours: Ours, statement_day: date, window_days: int) -> Decision:
    """An order of ours that no statement since its day has shown."""
    if ours.status == "failed":
        return Decision(Verdict.NOT_EXPECTED, "failed: a failed order need not be listed")
    waited = (statement_day - ours.day).days
    if waited < window_days:
        return Decision(
            Verdict.PENDING, f"not listed yet; looked for until {window_days} day(s) after its day"
        )
    if ours.status == "succeeded":
        return _brk(
            BreakType.MISSING_AT_BANK,
            f"we say succeeded; no statement from its day to {waited} day(s) later lists it",
        )
    return Decision(
        Verdict.NOT_EXPECTED, f"still {ours.status} after the window; the status poller owns it"
    )


def is_plain_match(ours_status: str, ours_amount: int, lines: int, bank_status: str,
                   bank_amount: int, earlier_seen: bool) -> bool:  # fmt: skip
    """The common case: one line, never seen before, same amount, same final status. The SQL
    of `gateway.store.recon_queries` decides it in bulk where the data lives, with one more
    condition (the order belongs to the run's own business day) so that the ledger comparison
    can count other days' orders from the odd ones alone; an order it leaves out comes here
    and gets the same verdict."""
    return (
        lines == 1
        and not earlier_seen
        and ours_amount == bank_amount
        and ours_status == bank_status
        and ours_status in ("succeeded", "failed")
    )
