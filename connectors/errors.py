"""The outcome of a bank call that did not simply succeed, classified once per connector.

    ConnectorError
    ├── NotSent            nothing reached the bank (connection refused, DNS, TLS handshake,
    │                      connect timeout): safe to retry, safe to fail over to another funder
    ├── Rejected           the bank answered with a definitive refusal
    │                      (pre_execution=True: no money moved, fail-over allowed;
    │                       pre_execution=False: terminal, never failed over)
    └── OutcomeUnknown     the request may have been executed (read timeout, 5xx after sending,
                           an unreadable answer): never failed over, never auto-failed, only
                           resolved by querying the bank or by its statement

    CallbackRejected       an inbound callback that cannot be trusted (bad signature, stale
                           timestamp, malformed): answered 401, nothing changes

    StatementError         a statement file that cannot be trusted as a whole (truncated,
                           wrong header, a summary that does not add up…), with its line;
                           raised by the shared statement parsers (`connectors.csv_statement`,
                           `reconciliation.parsers`). A connector fetching a statement turns it
                           into `ConnectorError(code="malformed_statement")`.

Unlike a pricing or tax call, a payout timeout is *not* a reason to try the next provider:
the first one may already have paid.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every classified bank-call failure."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class NotSent(ConnectorError):
    """The request never reached the bank."""


class Rejected(ConnectorError):
    """The bank definitively refused the order."""

    def __init__(self, message: str, *, code: str | None = None, pre_execution: bool) -> None:
        super().__init__(message, code=code)
        self.pre_execution = pre_execution


class OutcomeUnknown(ConnectorError):
    """The bank may or may not have executed the order."""


class CallbackRejected(Exception):
    """An inbound callback failed verification; `reason` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # bad_signature | stale | replayed | malformed
        self.message = message


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
