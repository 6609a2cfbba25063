"""The sandbox bank's CSV statement, read with the bank's own wire reader (`connectors.sandbox.
wire.StatementReader`) so the parser and the bank cannot drift apart; this module adds what a
file shows and a stream does not: the bank ends every line with a newline, so a last line
without one is a truncated file."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from connectors.base import StatementLine
from connectors.sandbox.wire import StatementReader, WireFormatError
from reconciliation.errors import StatementError

_LINE_PREFIX = re.compile(r"^line \d+: ")


def parse_sandbox_csv(lines: Iterable[bytes]) -> Iterator[tuple[int, StatementLine]]:
    reader = StatementReader()
    line_no = 0
    last = b"\n"
    held: tuple[int, StatementLine] | None = None  # yielded once the next line shows it whole
    for line_no, raw in enumerate(lines, start=1):
        last = raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StatementError(f"not UTF-8 ({e.reason} at byte {e.start})", line_no) from e
        try:
            parsed = reader.feed(text)
        except WireFormatError as e:
            reason = _LINE_PREFIX.sub("", str(e))
            if not raw.endswith(b"\n"):  # only the last line can lack one: the file was cut
                reason = f"truncated: the last line has no line end ({reason})"
            raise StatementError(reason, line_no) from e
        if parsed is not None:
            if held is not None:
                yield held
            held = (line_no, parsed)
    if last.strip() and not last.endswith(b"\n"):
        raise StatementError("truncated: the last line has no line end", line_no)
    if held is not None:
        yield held
    try:
        reader.finish()
    except WireFormatError as e:
        raise StatementError(f"empty: {e}", None) from e
