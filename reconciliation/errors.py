"""The one error of the statement parsers: what is wrong, and where."""

from __future__ import annotations


class StatementError(ValueError):
    """A statement that cannot be trusted as a whole: truncated, wrong header, a summary that
    does not add up, a duplicated line, a value that is not what its column promises, an XML
    document that fails its schema. `line` is the 1-based line of the file (or, for lines a
    connector delivers, of the statement) where the problem shows; None when it concerns the
    whole file."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line

    def __str__(self) -> str:
        return self.reason if self.line is None else f"line {self.line}: {self.reason}"
