"""The generic CSV statement mapping: a bank's CSV statement read as `[funders.statement]`
(`config.models.StatementConfig`) describes it. One implementation for everyone who reads
such a file: the `signed_json` connector's statement download and reconciliation's
`fundgate statement parse --format csv` / `path` statements (`reconciliation.parsers`).

Layout, top to bottom (blank lines are ignored everywhere):

    preamble_lines   title lines (bank name, account, period), skipped
    summary          when `summary.position = "first"`: count and total of the lines below
    column header    must name every configured column (others are allowed and ignored)
    data lines       one payout result each
    summary          when `summary.position = "last"`: count and total of the lines above

Bytes are split into lines before decoding (the encoding must keep ASCII as is, which GBK,
GB18030 and UTF-8 do), so a decoding error names its line. The file is read once, one line at
a time; only the current line is held, plus one data line when the summary is the last line
without a marker (it is known to be data only once another line follows). Pure, no I/O: the
caller hands over the raw lines (with their line ends) from a file or a download.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

from config.models import StatementConfig
from connectors.base import StatementLine
from connectors.errors import StatementError

_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_INTEGER = re.compile(r"-?\d+")


class _Lines:
    """Decoded lines for `csv.reader`, remembering the physical number of the last one."""

    def __init__(self, raw: Iterable[bytes], encoding: str) -> None:
        self._raw = raw
        self._encoding = encoding
        self.line_no = 0
        self.ended = True  # the last line read ends with a line end

    def __iter__(self) -> Iterator[str]:
        for raw in self._raw:
            self.line_no += 1
            self.ended = raw.endswith(b"\n")
            try:
                text = raw.decode(self._encoding)
            except UnicodeDecodeError as e:
                raise StatementError(
                    f"not {self._encoding} ({e.reason} at byte {e.start})", self.line_no
                ) from e
            if self.line_no == 1:
                text = text.removeprefix("\ufeff")
            yield text


def amount_of(text: str, unit: str, *, negative_ok: bool, what: str = "amount") -> int:
    """Fen from a fen integer or a yuan decimal; exact, never through a float."""
    value = text.strip()
    pattern = _INTEGER if unit == "fen" else _NUMBER
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value[:30]!r} is not a number in {unit}")
    try:
        fen = Decimal(value) * (1 if unit == "fen" else 100)
    except InvalidOperation as e:  # pragma: no cover - the pattern already guarantees it
        raise ValueError(f"{what} {value[:30]!r} is not a number") from e
    if fen != fen.to_integral_value():
        raise ValueError(f"{what} {value} has fractions of a fen")
    if fen < 0:
        if not negative_ok:
            raise ValueError(f"{what} {value} is negative")
        fen = -fen
    return int(fen)


class _Summary:
    def __init__(self, count: int, total: int, line_no: int) -> None:
        self.count = count
        self.total = total
        self.line_no = line_no


class CsvParser:
    """One pass over one file; `parse` yields `(line_no, StatementLine)`."""

    def __init__(self, cfg: StatementConfig) -> None:
        self.cfg = cfg
        self.zone = ZoneInfo(cfg.timezone)
        self.data_lines = 0  # every data line, skipped status words included
        self.total = 0
        self.width = 0  # fields per line, from the header

    # --- fields --------------------------------------------------------------------------

    def _summary(self, fields: list[str], line_no: int) -> _Summary:
        s = self.cfg.summary
        assert s is not None
        need = max(s.count_field, s.total_field) + 1
        if len(fields) < need:
            raise StatementError(f"summary row has {len(fields)} fields, expected {need}", line_no)
        count_text = fields[s.count_field].strip()
        if not count_text.isdigit():
            raise StatementError(f"summary line count {count_text[:30]!r} is no number", line_no)
        try:
            total = amount_of(
                fields[s.total_field],
                self.cfg.amount_unit,
                negative_ok=self.cfg.negative_debits,
                what="summary total",
            )
        except ValueError as e:
            raise StatementError(str(e), line_no) from e
        return _Summary(int(count_text), total, line_no)

    def _is_marked_summary(self, fields: list[str]) -> bool:
        s = self.cfg.summary
        return (
            s is not None
            and s.position == "last"
            and s.marker is not None
            and bool(fields)
            and fields[0].strip() == s.marker
        )

    def _booked_at(self, text: str, line_no: int) -> datetime | None:
        value = text.strip()
        if not value:
            return None
        try:
            if self.cfg.booked_at_format:
                at = datetime.strptime(value, self.cfg.booked_at_format)
            else:
                at = datetime.fromisoformat(value)
        except ValueError as e:
            raise StatementError(f"booked_at {value[:40]!r} is not a time: {e}", line_no) from e
        return at if at.tzinfo is not None else at.replace(tzinfo=self.zone)

    def _header(self, fields: list[str], line_no: int) -> dict[str, int]:
        names = [f.strip() for f in fields]
        cols = self.cfg.columns
        wanted = {
            "order_no": cols.order_no,
            "bank_ref": cols.bank_ref,
            "amount": cols.amount,
            "status": cols.status,
            "booked_at": cols.booked_at,
        }
        index: dict[str, int] = {}
        missing = []
        for key, name in wanted.items():
            if name is None:
                continue
            if name in names:
                index[key] = names.index(name)
            elif key in names:  # the field's own name (`order_no`, …, `booked_at`)
                index[key] = names.index(key)
            else:
                missing.append(name)
        if missing:
            raise StatementError(
                f"header lacks column(s) {', '.join(missing)} (found: {', '.join(names)[:200]})",
                line_no,
            )
        self.width = len(names)
        return index

    def _line(self, fields: list[str], index: dict[str, int], line_no: int) -> StatementLine | None:
        if len(fields) != self.width:
            raise StatementError(f"{len(fields)} fields, expected {self.width}", line_no)
        try:
            amount = amount_of(
                fields[index["amount"]],
                self.cfg.amount_unit,
                negative_ok=self.cfg.negative_debits,
            )
        except ValueError as e:
            raise StatementError(str(e), line_no) from e
        self.data_lines += 1
        self.total += amount
        word = fields[index["status"]].strip()
        if word in self.cfg.skip_statuses:
            return None
        status = self.cfg.status_map.get(word)
        if status is None:
            raise StatementError(f"unknown status word {word[:30]!r}", line_no)
        order_no = fields[index["order_no"]].strip()
        if not order_no:
            raise StatementError("empty order number", line_no)
        bank_ref = fields[index["bank_ref"]].strip() if "bank_ref" in index else ""
        booked_at = self._booked_at(fields[index["booked_at"]], line_no) if (
            "booked_at" in index
        ) else None  # fmt: skip
        return StatementLine(
            order_no=order_no,
            bank_ref=bank_ref or None,
            amount=amount,
            status=status,
            booked_at=booked_at,
        )

    # --- the pass ------------------------------------------------------------------------

    def parse(self, raw: Iterable[bytes]) -> Iterator[tuple[int, StatementLine]]:
        cfg = self.cfg
        src = _Lines(raw, cfg.encoding)
        rows = csv.reader(src, delimiter=cfg.delimiter, strict=True)
        summary_first = cfg.summary is not None and cfg.summary.position == "first"
        summary_last = cfg.summary is not None and cfg.summary.position == "last"
        unmarked_last = summary_last and cfg.summary is not None and cfg.summary.marker is None
        summary: _Summary | None = None
        index: dict[str, int] | None = None
        held: tuple[list[str], int] | None = None  # unmarked_last: the row that may be the summary
        after_summary: int | None = None
        while True:
            try:
                fields = next(rows)
            except StopIteration:
                break
            except csv.Error as e:
                raise StatementError(f"not CSV: {e}", src.line_no) from e
            line_no = src.line_no
            if line_no <= cfg.preamble_lines or not any(f.strip() for f in fields):
                continue
            if summary_first and summary is None:
                summary = self._summary(fields, line_no)
                continue
            if index is None:
                index = self._header(fields, line_no)
                continue
            if after_summary is not None:
                raise StatementError(
                    f"a line after the summary row (line {after_summary})", line_no
                )
            if self._is_marked_summary(fields):
                summary = self._summary(fields, line_no)
                after_summary = line_no
                continue
            if unmarked_last:
                if held is not None:
                    line = self._line(held[0], index, held[1])
                    if line is not None:
                        yield held[1], line
                held = (fields, line_no)
                continue
            try:
                line = self._line(fields, index, line_no)
            except StatementError as e:
                if not src.ended:  # only the last line can lack a line end: the file was cut
                    e.reason = f"truncated: the last line has no line end ({e.reason})"
                raise
            if line is not None:
                yield line_no, line
        end = src.line_no
        if index is None:
            raise StatementError("no column header", end or None)
        if unmarked_last and held is not None:
            summary = self._summary(held[0], held[1])
        if cfg.summary is not None:
            if summary is None:
                raise StatementError(
                    f"truncated: no summary row after {self.data_lines} line(s)", end or None
                )
            if (summary.count, summary.total) != (self.data_lines, self.total):
                raise StatementError(
                    f"summary says {summary.count} line(s) totalling {summary.total} fen, the "
                    f"file has {self.data_lines} totalling {self.total} fen",
                    summary.line_no,
                )


def parse_csv(raw: Iterable[bytes], cfg: StatementConfig) -> Iterator[tuple[int, StatementLine]]:
    return CsvParser(cfg).parse(raw)
