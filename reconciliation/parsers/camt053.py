"""ISO 20022 camt.053 statements (001.02, 001.04, 001.08).

The reader itself lives in `connectors.iso20022.camt053`, shared with the `iso20022`
connector's statement download so the two cannot drift apart (`connectors/` may not import
`reconciliation/`; the other way round is allowed). The name stays importable from here.
"""

from __future__ import annotations

from connectors.iso20022.camt053 import parse_camt053

__all__ = ["parse_camt053"]
