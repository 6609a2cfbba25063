"""The sandbox bank protocol: its connector (`connector.py`), wire format (`wire.py`) and the
simulated bank itself (`bank.py`), which `fundgate sandbox-bank` and `fundgate demo` run."""
