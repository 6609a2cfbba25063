"""Statement parsers, one per format, each streaming: lines in, `(line_no, StatementLine)` out,
nothing held but the current record. A bad file raises `StatementError` with its line.

    sandbox-csv  the sandbox bank's CSV (`order_no,bank_ref,amount,status,finished_at`)
    csv          any bank's CSV, mapped by `[funders.statement]` (`config.StatementConfig`)
    camt053      ISO 20022 camt.053.001.02/04/08, validated against the XSD while streaming
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from config.models import StatementConfig, StatementFormat
from connectors.base import StatementLine
from reconciliation.errors import StatementError
from reconciliation.parsers.camt053 import parse_camt053
from reconciliation.parsers.generic_csv import parse_csv
from reconciliation.parsers.sandbox_csv import parse_sandbox_csv

Numbered = tuple[int, StatementLine]

FORMATS: tuple[StatementFormat, ...] = ("sandbox-csv", "csv", "camt053")
STATUSES = frozenset({"succeeded", "failed", "reversed"})


def parse(
    lines: Iterable[bytes], fmt: StatementFormat, cfg: StatementConfig | None = None
) -> Iterator[Numbered]:
    """The statement lines of a file given as its raw lines (with their line ends)."""
    cfg = cfg or StatementConfig()
    match fmt:
        case "sandbox-csv":
            return parse_sandbox_csv(lines)
        case "csv":
            return parse_csv(lines, cfg)
        case "camt053":
            return parse_camt053(lines, cfg.timezone)  # a file: read in bounded pieces


def identity(line: StatementLine) -> tuple[object, ...]:
    """Two lines with the same identity are the same line twice (a broken file), not two
    payments: a second payment of an order has its own bank reference or time."""
    return (line.order_no, line.bank_ref, line.amount, line.status, line.booked_at)


def without_duplicates(numbered: Iterable[Numbered]) -> Iterator[Numbered]:
    """Refuse a line identical to an earlier one. Memory grows with the statement (one small
    digest per line): the gateway does this check in PostgreSQL instead."""
    seen: dict[bytes, int] = {}
    for line_no, line in numbered:
        key = hashlib.blake2b(repr(identity(line)).encode(), digest_size=12).digest()
        first = seen.get(key)
        if first is not None:
            raise StatementError(f"duplicate line: repeats line {first}", line_no)
        seen[key] = line_no
        yield line_no, line


def check_line(line_no: int, line: StatementLine) -> None:
    """What every source must deliver, whichever connector or parser produced the line."""
    if line.status not in STATUSES:
        raise StatementError(f"status {line.status!r} is not one of {sorted(STATUSES)}", line_no)
    if line.amount < 0:
        raise StatementError(f"negative amount {line.amount}", line_no)
    if "\x00" in line.order_no or (line.bank_ref is not None and "\x00" in line.bank_ref):
        raise StatementError("a NUL character in a field", line_no)  # PostgreSQL text refuses it


__all__ = [
    "FORMATS",
    "Numbered",
    "StatementError",
    "check_line",
    "identity",
    "parse",
    "without_duplicates",
]
