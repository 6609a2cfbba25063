"""ISO 20022 bank protocol: pain.001 instructions, pain.002 status reports and camt.053
statements over HTTP (`connector.py`, `wire.py`), and a sandbox bank speaking them
(`sandbox.py`)."""
