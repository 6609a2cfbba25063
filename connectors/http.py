"""httpx failures, translated into the connector error tree in one place.

Every HTTP-based connector sends through `send` (or wraps a stream in
`classify_transport_errors`) so that "did the bank possibly act on this?" is decided once:

    NotSent         the request cannot have reached the bank: connection refused, DNS failure,
                    connect timeout, no free pooled connection, a URL httpx cannot use
    OutcomeUnknown  anything after the first byte may have gone out: read/write timeouts,
                    a dropped connection, a garbled answer, and every other httpx error

When in doubt the answer is `OutcomeUnknown`: it costs a status query, while a wrong
`NotSent` may pay a borrower twice (the gateway fails `NotSent` over to another funder).

A signed statement download goes through `verified_download`: spooled while its signature is
computed, and handed over only once it checks out (the signed_json and iso20022 connectors).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import IO, Any, Protocol

import httpx

from connectors.errors import ConnectorError, NotSent, OutcomeUnknown

# Raised before a single byte of the request is written. DNS failures surface as
# ConnectError; PoolTimeout means no connection was ever handed to the request.
_NEVER_SENT: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.InvalidURL,
)

# The longest a connect may take, whatever the request timeout: a bank that does not accept
# the connection quickly is down, and NotSent is the cheap, safe outcome to learn early.
MAX_CONNECT_TIMEOUT_SECONDS = 3.0


def request_timeout(seconds: float) -> httpx.Timeout:
    """The per-request timeout for a bank call of at most `seconds` per phase."""
    return httpx.Timeout(seconds, connect=min(seconds, MAX_CONNECT_TIMEOUT_SECONDS))


@contextmanager
def classify_transport_errors(what: str) -> Iterator[None]:
    """Re-raise httpx errors raised inside the block as `NotSent` or `OutcomeUnknown`."""
    try:
        yield
    except _NEVER_SENT as e:
        raise NotSent(f"{what}: not sent: {type(e).__name__}: {e}", code="not_sent") from e
    except httpx.TimeoutException as e:
        raise OutcomeUnknown(f"{what}: timed out: {type(e).__name__}", code="timeout") from e
    except httpx.HTTPError as e:
        raise OutcomeUnknown(
            f"{what}: transport error after sending: {type(e).__name__}: {e}",
            code="transport_error",
        ) from e


async def send(client: httpx.AsyncClient, request: httpx.Request, *, what: str) -> httpx.Response:
    """Send `request` and read the whole answer; httpx errors come out classified."""
    with classify_transport_errors(what):
        return await client.send(request)


def unexpected_status(response: httpx.Response, what: str) -> OutcomeUnknown:
    """The error for an HTTP status the connector gives no specific meaning.

    A 5xx may come after the bank executed the order, and an unexpected 4xx (a proxy, a moved
    endpoint) says nothing definitive about it either, so both are `OutcomeUnknown`. Connectors
    handle the statuses their bank documents as definitive *before* calling this.
    """
    code = "server_error" if response.status_code >= 500 else "unexpected_status"
    return OutcomeUnknown(f"{what}: bank answered HTTP {response.status_code}", code=code)


# a statement download larger than this is spooled to a temporary file while it is verified
SPOOL_IN_MEMORY_BYTES = 64 * 1024


class BodyCheck(Protocol):
    """A check computed over a body as it streams (a statement's signature)."""

    def update(self, chunk: bytes) -> None: ...

    def finish(self) -> None: ...


async def spool_body(
    response: httpx.Response, spool: IO[bytes], check: BodyCheck | None, *, head_bytes: int
) -> bytes:
    """A streamed answer's body written to `spool` as it arrives, each chunk fed to `check`
    on the way; returns its first `head_bytes` bytes, for a log line should the check fail.
    Call inside `classify_transport_errors`: the body is still being read."""
    head = b""
    async for chunk in response.aiter_bytes():
        if len(head) < head_bytes:
            head += chunk[: head_bytes - len(head)]
        spool.write(chunk)
        if check is not None:
            check.update(chunk)
    return head


@dataclass(frozen=True)
class StatementSignature:
    """How a connector checks the signature of a statement download, and reports a refusal.

    `start` reads the answer's headers and returns the running check (None: this funder's
    statements are not verified); it and the check's `finish` raise `error`, an exception with
    the wire's `reason` (`bad_signature`, `stale`, `malformed`) and `message`. A refusal is
    logged as `event` with the first bytes through `excerpt` (masked), and becomes a
    `ConnectorError` coded with the reason."""

    start: Callable[[httpx.Headers], BodyCheck | None]
    error: type[Exception]
    log: Any  # the connector's structlog logger
    event: str
    funder_id: str
    excerpt: Callable[[bytes], str]

    def refused(
        self, what: str, response: httpx.Response, e: Exception, head: bytes
    ) -> ConnectorError:
        reason, message = getattr(e, "reason", "malformed"), getattr(e, "message", str(e))
        self.log.warning(
            self.event,
            funder_id=self.funder_id,
            what=what,
            reason=reason,
            http_status=response.status_code,
            raw=self.excerpt(head),
        )
        return ConnectorError(f"{what}: statement not trusted: {message}", code=reason)


@asynccontextmanager
async def verified_download(
    client: httpx.AsyncClient,
    request: httpx.Request,
    what: str,
    signature: StatementSignature,
    *,
    head_bytes: int,
    on_unexpected_status: Callable[[httpx.Response], None] | None = None,
) -> AsyncIterator[IO[bytes]]:
    """A statement download, spooled (memory up to `SPOOL_IN_MEMORY_BYTES`, then a temporary
    file) while its signature is computed, and yielded rewound only once the signature and its
    timestamp check out: an unsigned or tampered statement is never parsed. A status other than
    200 is `unexpected_status` (after `on_unexpected_status`, for a connector's own log)."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as spool:
        with classify_transport_errors(what):
            response = await client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    await response.aread()
                    if on_unexpected_status is not None:
                        on_unexpected_status(response)
                    raise unexpected_status(response, what)
                try:
                    check = signature.start(response.headers)
                except signature.error as e:
                    raise signature.refused(what, response, e, b"") from e
                head = await spool_body(response, spool, check, head_bytes=head_bytes)
                if check is not None:
                    try:
                        check.finish()
                    except signature.error as e:
                        raise signature.refused(what, response, e, head) from e
            finally:
                await response.aclose()
        spool.seek(0)
        yield spool
