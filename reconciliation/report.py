"""The outcome of one run, as counts and amounts (fen) per verdict and break type.

A run's summary is built while its orders are classified, stored with the run as JSON, and
rendered by the CLI and the API from that JSON, so every view shows the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reconciliation.classify import BREAK_TYPES, Decision, Verdict


@dataclass
class Tally:
    count: int = 0
    amount: int = 0

    def add(self, amount: int, count: int = 1) -> None:
        self.count += count
        self.amount += amount

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "amount": self.amount}


@dataclass
class LedgerTotals:
    """The ledger's settled payouts of (funder, day) against the statement of that day.

    `ledger_paid`      net `payout:borrowers` entries of the funder's `disbursement.paid` and
                       `disbursement.corrected_*` transactions with that business day
    `statement_paid`   the statement's succeeded minus reversed lines, every line
    `other_days`       the part of it for orders whose business day is another (listed late,
                       or repeated): they belong to that day's comparison, not this one
    `awaiting`         settled payouts of the day's orders the statement does not list yet,
                       still inside the window (looked for in later statements)

    Like with like: the day's orders on the bank's side (`compared`) against the day's
    settled payouts; `difference = compared - ledger_paid`; `unexplained` is the difference
    left once the awaited orders are counted: a break when not zero."""

    ledger_paid: int = 0
    statement_paid: int = 0
    other_days: int = 0
    awaiting: int = 0

    @property
    def compared(self) -> int:
        return self.statement_paid - self.other_days

    @property
    def difference(self) -> int:
        return self.compared - self.ledger_paid

    @property
    def unexplained(self) -> int:
        return self.difference + self.awaiting

    @property
    def ok(self) -> bool:
        return self.unexplained == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger_paid": self.ledger_paid,
            "statement_paid": self.statement_paid,
            "other_days": self.other_days,
            "compared": self.compared,
            "awaiting": self.awaiting,
            "difference": self.difference,
            "unexplained": self.unexplained,
            "ok": self.ok,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerTotals:
        return cls(
            ledger_paid=int(data.get("ledger_paid", 0)),
            statement_paid=int(data.get("statement_paid", 0)),
            other_days=int(data.get("other_days", 0)),
            awaiting=int(data.get("awaiting", 0)),
        )


@dataclass
class Summary:
    """Counts and amounts of one run. `breaks` counts every break found by the run (open,
    resolved or automatically resolved); `auto_resolved` the subset the run resolved itself;
    `open` the breaks still waiting for a person."""

    lines: int = 0
    amount: int = 0
    matched: Tally = field(default_factory=Tally)
    pending: Tally = field(default_factory=Tally)
    not_expected: Tally = field(default_factory=Tally)
    breaks: dict[str, Tally] = field(default_factory=lambda: {t: Tally() for t in BREAK_TYPES})
    auto_resolved: dict[str, Tally] = field(
        default_factory=lambda: {t: Tally() for t in BREAK_TYPES}
    )
    open: int = 0
    ledger: LedgerTotals = field(default_factory=LedgerTotals)

    def count(self, decision: Decision, amount: int) -> None:
        match decision.verdict:
            case Verdict.MATCHED:
                self.matched.add(amount)
            case Verdict.PENDING:
                self.pending.add(amount)
            case Verdict.NOT_EXPECTED:
                self.not_expected.add(amount)
            case _:
                assert decision.type is not None
                self.breaks[decision.type].add(amount)

    @property
    def total_breaks(self) -> int:
        return sum(t.count for t in self.breaks.values())

    @property
    def total_auto_resolved(self) -> int:
        return sum(t.count for t in self.auto_resolved.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "amount": self.amount,
            "matched": self.matched.to_json(),
            "pending": self.pending.to_json(),
            "not_expected": self.not_expected.to_json(),
            "breaks": {t: v.to_json() for t, v in self.breaks.items()},
            "auto_resolved": {t: v.to_json() for t, v in self.auto_resolved.items()},
            "open": self.open,
            "ledger": self.ledger.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Summary:
        def tally(v: Any) -> Tally:
            return Tally(int(v.get("count", 0)), int(v.get("amount", 0))) if v else Tally()

        s = cls(
            lines=int(data.get("lines", 0)),
            amount=int(data.get("amount", 0)),
            matched=tally(data.get("matched")),
            pending=tally(data.get("pending")),
            not_expected=tally(data.get("not_expected")),
            open=int(data.get("open", 0)),
            ledger=LedgerTotals.from_json(data.get("ledger") or {}),
        )
        for t in BREAK_TYPES:
            s.breaks[t] = tally(data.get("breaks", {}).get(t))
            s.auto_resolved[t] = tally(data.get("auto_resolved", {}).get(t))
        return s


def yuan(fen: int) -> str:
    """Fen as yuan with two decimals and thousands separators: 123456 → "1,234.56"."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{whole:,}.{cents:02d}"
