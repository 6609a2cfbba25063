"""A skeleton bank protocol folder: copy it to `connectors/<bank>/` (see docs/connectors.md).

It passes the conformance suite's structural checks (connector.py and wire.py present, the
class satisfies `BankConnector`) and nothing else until its TODOs are done."""
