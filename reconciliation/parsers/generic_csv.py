"""A bank's CSV statement, mapped by `[funders.statement]` (`config.models.StatementConfig`).

The mapping itself lives in `connectors.csv_statement`, shared with the `signed_json`
connector's statement download so the two cannot drift apart (`connectors/` may not import
`reconciliation/`; the other way round is allowed). These names stay importable from here.
"""

from __future__ import annotations

from connectors.csv_statement import CsvParser, amount_of, parse_csv

__all__ = ["CsvParser", "amount_of", "parse_csv"]
