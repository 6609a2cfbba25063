"""ISO 20022 camt.053 (Bank-to-Customer Statement), versions 001.02, 001.04 and 001.08: the
one reader of it, for the connector's download and for a statement file alike
(`reconciliation.parsers` re-exports it; `connectors/` may not import `reconciliation/`), so
that the same document always gives the same lines.

The document is validated against its XSD (chosen by the root namespace) while it streams:
lines are fed one by one to an lxml pull parser with the schema plugged in, so a schema
violation is reported with the line where it shows, and memory holds one entry (`Ntry`) at a
time (a line longer than `PIECE_BYTES`, as in a document written on one line, is fed in
pieces). Parsing is hardened: no DTD, no entity expansion, no network, and a document that
declares a DOCTYPE is refused outright.

Mapping, one `StatementLine` per transaction detail (`TxDtls`), in document order:

    order_no   TxDtls/Refs/EndToEndId (our order number), else InstrId, else TxId, else ""
    bank_ref   TxDtls/Refs/AcctSvcrRef, else Ntry/AcctSvcrRef, else Ntry/NtryRef
    amount     fen; an entry with one detail: Ntry/Amt; a batched entry: each detail's
               Amt (v04+) or AmtDtls/TxAmt/Amt, and they must add up to Ntry/Amt
    status     Ntry/Sts BOOK: "succeeded", or "reversed" when Ntry/RvslInd is true;
               PDNG, INFO and FUTR entries are not booked and are left out
    booked_at  Ntry/BookgDt/DtTm, or BookgDt/Dt at midnight in the business time zone

An entry without details is one line of its own. When a statement carries
TxsSummry/TtlNtries, its NbOfNtries and Sum are checked against the entries read.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any, cast
from zoneinfo import ZoneInfo

from lxml import etree

from connectors.base import StatementLine
from connectors.errors import StatementError
from connectors.iso20022.wire import CAMT053, schema

VERSIONS = ("02", "04", "08")
# the root element must start within this many bytes (XML declaration, comments)
ROOT_WITHIN_BYTES = 1 << 20
# a longer line is fed in pieces of this size: memory stays bounded whatever the layout
PIECE_BYTES = 1 << 16
_ERROR_LEVELS = frozenset({"ERROR", "FATAL"})
_DECLARATION = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


class _Recorder(etree.PyErrorLog):  # type: ignore[misc]  # untyped in lxml-stubs
    """Receives libxml2's errors the moment they happen. The schema validator of a pull
    parser only raises at `close()`, without a line; recording errors as they arrive, while
    we feed one line at a time, tells which line broke the schema."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []
        self.recording = True

    def receive(self, entry: Any) -> None:
        if self.recording and entry.level_name in _ERROR_LEVELS:
            self.errors.append(str(entry.message))


def _version_of(head: bytes) -> tuple[str, str]:
    """(namespace, version) from the root element of the document's first bytes."""
    probe = etree.XMLPullParser(
        events=("start",), resolve_entities=False, no_network=True, load_dtd=False
    )
    try:
        probe.feed(head)
        for _, item in probe.read_events():
            el = cast(etree._Element, item)
            tag = etree.QName(el)
            for v in VERSIONS:
                if tag.namespace == CAMT053.format(version=v) and tag.localname == "Document":
                    return tag.namespace, v
            raise StatementError(
                f"not a camt.053.001.{{{','.join(VERSIONS)}}} document: root is {el.tag}", None
            )
    except etree.XMLSyntaxError as e:
        raise StatementError(f"not XML: {e.msg}", e.lineno or None) from e
    raise StatementError("no root element", None)


def _fen(text: str | None, line_no: int, what: str) -> int:
    try:
        value = Decimal((text or "").strip())
    except InvalidOperation as e:
        raise StatementError(f"{what} {text!r} is not a number", line_no) from e
    fen = value * 100
    if fen != fen.to_integral_value():
        raise StatementError(f"{what} {value} has fractions of a fen", line_no)
    return abs(int(fen))


class _Entries:
    """Turns finished `Ntry` elements into lines; checks each statement's summary."""

    def __init__(self, ns: str, zone: ZoneInfo) -> None:
        self.ns = ns
        self.zone = zone
        self.entries = 0
        self.entry_total = 0

    def q(self, path: str) -> str:
        return "/".join(f"{{{self.ns}}}{p}" for p in path.split("/"))

    def text(self, el: Any, path: str) -> str | None:
        found = el.find(self.q(path))
        if found is None or found.text is None:
            return None
        value = str(found.text).strip()
        return value or None

    def _booked_at(self, ntry: Any) -> datetime | None:
        at = self.text(ntry, "BookgDt/DtTm")
        if at is not None:
            parsed = datetime.fromisoformat(at.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=self.zone)
        day = self.text(ntry, "BookgDt/Dt")
        if day is not None:
            return datetime.combine(date.fromisoformat(day), time(0), tzinfo=self.zone)
        return None

    def lines(self, ntry: Any) -> Iterator[tuple[int, StatementLine]]:
        line_no = int(ntry.sourceline or 0)
        amount = _fen(self.text(ntry, "Amt"), line_no, "entry amount")
        self.entries += 1
        self.entry_total += amount
        word = self.text(ntry, "Sts") or self.text(ntry, "Sts/Cd") or self.text(ntry, "Sts/Prtry")
        match word:
            case "BOOK":
                pass
            case "PDNG" | "INFO" | "FUTR":
                return  # not booked: no money has moved yet
            case _:
                raise StatementError(f"unknown entry status {word!r}", line_no)
        reversal = (self.text(ntry, "RvslInd") or "false").lower() in ("true", "1")
        status = "reversed" if reversal else "succeeded"
        booked_at = self._booked_at(ntry)
        entry_ref = self.text(ntry, "AcctSvcrRef") or self.text(ntry, "NtryRef")
        details = ntry.findall(self.q("NtryDtls/TxDtls"))
        if not details:
            yield line_no, StatementLine("", entry_ref, amount, status, booked_at)
            return
        amounts: list[int] = []
        for tx in details:
            tx_line = int(tx.sourceline or line_no)
            if len(details) == 1:
                amounts.append(amount)
                continue
            text = (
                self.text(tx, "Amt")
                or self.text(tx, "AmtDtls/TxAmt/Amt")
                or self.text(tx, "AmtDtls/InstdAmt/Amt")
            )
            if text is None:
                raise StatementError("a transaction of a batched entry has no amount", tx_line)
            amounts.append(_fen(text, tx_line, "transaction amount"))
        if sum(amounts) != amount:
            raise StatementError(
                f"the entry's {len(details)} transactions add up to {sum(amounts)} fen, "
                f"the entry says {amount}",
                line_no,
            )
        for tx, fen in zip(details, amounts, strict=True):
            order_no = self.text(tx, "Refs/EndToEndId")
            if order_no == "NOTPROVIDED":
                order_no = None
            order_no = order_no or self.text(tx, "Refs/InstrId") or self.text(tx, "Refs/TxId")
            bank_ref = self.text(tx, "Refs/AcctSvcrRef") or entry_ref
            yield (
                int(tx.sourceline or line_no),
                StatementLine(order_no or "", bank_ref, fen, status, booked_at),
            )

    def check_summary(self, stmt: Any) -> None:
        line_no = int(stmt.sourceline or 0)
        count = self.text(stmt, "TxsSummry/TtlNtries/NbOfNtries")
        total = self.text(stmt, "TxsSummry/TtlNtries/Sum")
        if count is not None and int(count) != self.entries:
            raise StatementError(
                f"statement summary says {count} entries, the statement has {self.entries}",
                line_no,
            )
        if total is not None and _fen(total, line_no, "summary sum") != self.entry_total:
            raise StatementError(
                f"statement summary sum {total} does not match the entries' "
                f"{Decimal(self.entry_total) / 100}",
                line_no,
            )
        self.entries = 0
        self.entry_total = 0


def _pieces(raw: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """The document's lines as (line number, bytes), a line longer than `PIECE_BYTES` in
    pieces that carry its number, and a DOCTYPE or ENTITY declaration refused where it shows
    (also when it straddles two pieces)."""
    line_no = 1
    tail = b""
    for line in raw:
        for start in range(0, max(len(line), 1), PIECE_BYTES):
            piece = line[start : start + PIECE_BYTES]
            if _DECLARATION.search(tail + piece):
                raise StatementError("DOCTYPE and ENTITY declarations are refused", line_no)
            tail = piece[-16:]
            yield line_no, piece
        line_no += line.count(b"\n")


def parse_camt053(
    raw: Iterable[bytes], timezone: str = "Asia/Shanghai"
) -> Iterator[tuple[int, StatementLine]]:
    """The statement lines of a camt.053 given as its raw lines (or any pieces of it, or a
    binary file, read a line at a time and a longer line in `PIECE_BYTES` pieces, so that a
    document written on one line is never read whole), each with the line of its `TxDtls` (or
    of its `Ntry`); `StatementError` with the line where the document goes wrong."""
    zone = ZoneInfo(timezone)
    readline = getattr(raw, "readline", None)
    pieces = _pieces(raw if readline is None else iter(lambda: readline(PIECE_BYTES), b""))
    head: list[tuple[int, bytes]] = []
    size = 0
    for line_no, piece in pieces:
        head.append((line_no, piece))
        size += len(piece)
        if b"<" in piece and re.search(rb"<[A-Za-z_][\w.:-]*[\s>/]", piece):
            break
        if size > ROOT_WITHIN_BYTES:
            raise StatementError("no root element in the first MiB", line_no)
    # the root's start tag may span lines: take a few more before looking at it
    for line_no, piece in pieces:
        head.append((line_no, piece))
        if b">" in piece or len(head) > 50:
            break
    ns, version = _version_of(b"".join(piece for _, piece in head))
    recorder = _Recorder()
    etree.use_global_python_log(recorder)
    try:
        yield from _validated(head, pieces, ns, version, zone, recorder)
    finally:
        recorder.recording = False


def _validated(
    head: list[tuple[int, bytes]],
    rest: Iterator[tuple[int, bytes]],
    ns: str,
    version: str,
    zone: ZoneInfo,
    recorder: _Recorder,
) -> Iterator[tuple[int, StatementLine]]:
    entries = _Entries(ns, zone)
    ntry_tag, stmt_tag, root_tag = f"{{{ns}}}Ntry", f"{{{ns}}}Stmt", f"{{{ns}}}Document"
    parser = etree.XMLPullParser(
        events=("end",),
        tag=(ntry_tag, stmt_tag, root_tag),
        schema=schema(f"camt.053.001.{version}"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
    )
    line_no = 0
    ended = False  # saw </Document>: with a schema plugged in, lxml closes a cut document quietly

    def feed(piece: bytes, at: int) -> Iterator[tuple[int, StatementLine]]:
        nonlocal ended
        try:
            parser.feed(piece)
        except etree.XMLSyntaxError as e:
            raise StatementError(f"not well-formed XML: {e.msg}", e.lineno or at) from e
        if recorder.errors:
            raise StatementError(
                f"fails the camt.053.001.{version} schema: {recorder.errors[0]}", at
            )
        for _, item in parser.read_events():
            el = cast(etree._Element, item)
            if el.tag == ntry_tag:
                yield from entries.lines(el)
                parent = el.getparent()
                el.clear()
                if parent is not None:
                    parent.remove(el)
            elif el.tag == stmt_tag:
                entries.check_summary(el)
                el.clear()
            else:
                ended = True

    for line_no, piece in itertools.chain(head, rest):
        yield from feed(piece, line_no)
    try:
        parser.close()
    except etree.XMLSyntaxError as e:
        if recorder.errors:
            raise StatementError(
                f"fails the camt.053.001.{version} schema: {recorder.errors[0]}", line_no
            ) from e
        raise StatementError(f"truncated or not well-formed XML: {e.msg}", line_no) from e
    if recorder.errors:
        raise StatementError(
            f"fails the camt.053.001.{version} schema: {recorder.errors[0]}", line_no
        )
    if not ended:
        raise StatementError("truncated: the document ends before </Document>", line_no)
