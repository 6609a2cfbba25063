"""The one error of the statement parsers: what is wrong, and where.

`StatementError` is defined with the connector errors (`connectors.errors`), because the
generic CSV mapping that raises it is shared with the connectors (`connectors.csv_statement`);
it is the same class under this name, so `except StatementError` catches both.
"""

from __future__ import annotations

from connectors.errors import StatementError

__all__ = ["StatementError"]
