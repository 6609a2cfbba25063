"""An httpx transport on an `aiohttp.ClientSession`: the same `httpx.AsyncClient` seam for
connectors and tests (respx, `MockTransport`), at a fraction of httpcore's CPU per request.

httpx builds the request (URL, headers, body, cookies, auth) and reads the response; this
class only carries the bytes. Its one duty beyond that is to fail the way httpcore fails, so
that `connectors.http` keeps deciding "did the bank possibly act on this?" in one place:

    httpx.ConnectError      no connection: refused, DNS, TLS handshake (nothing was sent)
    httpx.ConnectTimeout    no connection in time, waiting for a pooled one included
    httpx.ReadTimeout       sent (or possibly sent), no answer in time
    httpx.RemoteProtocolError  the connection dropped or the answer was garbled after sending
    httpx.ReadError         any other failure once a connection was handed out

Only failures aiohttp raises while *connecting* become `ConnectError`/`ConnectTimeout`;
anything later, or anything unknown, is a read/write error, which the gateway treats as
"outcome unknown" (a status query), never as "not sent" (a fail-over that could pay twice).

Timeouts: httpx's `pool` + `connect` bound getting a connection (aiohttp `connect`), `connect`
alone the socket connect and TLS handshake (`sock_connect`), `read` each wait for response
bytes (`sock_read`), which starts once the request is written. aiohttp has no write timeout:
a request body larger than the socket buffers (`WRITE_GUARD_BYTES`) is bounded from the
request to the response headers by the sum of the four phases (a peer that stops reading it
ends as `ReadTimeout`: outcome unknown); a smaller one cannot stall while being written.

Redirects are httpx's business (never followed here), and so are cookies and content
decoding (aiohttp passes the raw bytes). HTTP/1.1 only; environment proxies are not used
(httpx ignores them too when given a transport). One difference from httpcore: aiohttp sends
an idempotent request (GET, PUT, DELETE) once more when the kept-alive connection it reused
turns out closed by the server; a POST (every payout here) is never sent twice.
"""

from __future__ import annotations

import asyncio
import functools
import io
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from yarl import URL

# bytes handed to httpx per chunk of a response body
CHUNK_BYTES = 64 * 1024
# idle keep-alive connections are closed after this long (httpx's default keepalive_expiry):
# a bank's server closing an idle connection first would turn the next payout on it into an
# "outcome unknown" (the request may have gone out before the close was seen)
KEEPALIVE_SECONDS = 5.0
# a body this small goes into the socket's send buffer without waiting, so the read timeout,
# which starts once it is written, bounds the whole exchange; a larger one gets the bound up
# to the response headers (an asyncio timer per request: measurable CPU, so not for all)
WRITE_GUARD_BYTES = 64 * 1024
# aiohttp frames the body it is given itself
_BODY_FRAMING = (b"content-length", b"transfer-encoding")


def _client_timeout(timeout: dict[str, float | None]) -> tuple[aiohttp.ClientTimeout, float | None]:
    """aiohttp's timeouts for httpx's four phases, and the bound up to the response headers."""
    return _timeouts(timeout.get("pool"), timeout.get("connect"), timeout.get("read"),
                     timeout.get("write"))  # fmt: skip


@functools.lru_cache(maxsize=64)  # a handful of distinct timeouts, one per caller
def _timeouts(
    pool: float | None, connect: float | None, read: float | None, write: float | None
) -> tuple[aiohttp.ClientTimeout, float | None]:
    get_conn = None if pool is None or connect is None else pool + connect
    phases = (pool, connect, write, read)
    headers_by = None if any(p is None for p in phases) else sum(p for p in phases if p)
    return (
        aiohttp.ClientTimeout(total=None, connect=get_conn, sock_connect=connect, sock_read=read),
        headers_by,
    )


def _mapped(e: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx error httpcore would raise for this aiohttp failure (see the module doc)."""
    msg = f"{type(e).__name__}: {e}"
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(msg, request=request)
    if isinstance(e, aiohttp.ClientConnectorError):  # refused, DNS, TLS handshake
        return httpx.ConnectError(msg, request=request)
    if isinstance(e, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(msg, request=request)
    if isinstance(e, TimeoutError):  # aiohttp's SocketTimeoutError, or the headers bound
        return httpx.ReadTimeout(msg, request=request)
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(msg, request=request)
    if isinstance(e, aiohttp.ClientResponseError):  # an answer aiohttp could not parse
        return httpx.RemoteProtocolError(msg, request=request)
    return httpx.ReadError(msg, request=request)


class _Body(httpx.AsyncByteStream):
    """A response body read from aiohttp as httpx reads it; closing releases the connection."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_BYTES):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _mapped(e, self._request) from e

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=AiohttpTransport())`: HTTP/1.1 over one aiohttp session.

    `verify` is what httpx's `verify` is (True: the default CA bundle, False: no checks, or an
    `ssl.SSLContext`, e.g. with a client certificate for mTLS); `max_connections` bounds the
    pool as httpx's `Limits.max_connections` does. The session is created on first use, in
    the running event loop, and closed by `aclose` (the client's `aclose`)."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        max_connections: int = 100,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
    ) -> None:
        if verify is True:
            verify = ssl.create_default_context()
        self._ssl: ssl.SSLContext | bool = verify
        self._max_connections = max_connections
        self._keepalive = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # httpx keeps the cookies
                auto_decompress=False,  # httpx decodes Content-Encoding itself
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                trust_env=False,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open()
        timeout, headers_by = _client_timeout(request.extensions.get("timeout", {}))
        body = await request.aread()
        kwargs: dict[str, Any] = {
            "headers": [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in request.headers.raw
                if k.lower() not in _BODY_FRAMING
            ],
            # aiohttp warns about large bytes bodies (they are written in one piece)
            "data": io.BytesIO(body) if len(body) > WRITE_GUARD_BYTES else body or None,
            "allow_redirects": False,
            "timeout": timeout,
        }
        url = URL(str(request.url), encoded=True)
        try:
            if len(body) > WRITE_GUARD_BYTES:
                async with asyncio.timeout(headers_by):
                    response = await session.request(request.method, url, **kwargs)
            else:
                response = await session.request(request.method, url, **kwargs)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _mapped(e, request) from e
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Cookies(httpx.Cookies):
    """httpx's cookie store, which reads an answer only when it sets a cookie.

    httpx hands every answer to the standard library's cookie jar, which first wraps the
    request and the answer in urllib look-alikes: about 4 % of a gateway's CPU under load,
    for bank and webhook answers that almost never set a cookie. The jar (with its default
    policy) takes cookies from `Set-Cookie` headers alone, so an answer without one is
    skipped with the same result."""

    def extract_cookies(self, response: httpx.Response) -> None:
        if "set-cookie" in response.headers:
            super().extract_cookies(response)


class OutboundClient(httpx.AsyncClient):
    """`httpx.AsyncClient` whose cookie store is `_Cookies`; nothing else differs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store = _Cookies(kwargs.get("cookies"))

    @property
    def cookies(self) -> httpx.Cookies:
        return self._store

    @cookies.setter
    def cookies(self, cookies: httpx._types.CookieTypes) -> None:
        self._store = _Cookies(cookies)


def outbound_client(
    kind: str = "aiohttp", *, max_connections: int = 200, max_keepalive: int = 100
) -> httpx.AsyncClient:
    """The shared client the gateway hands to connectors and the notifier: on this transport
    (`kind` "aiohttp"), or on httpx's own ("httpx"), with the same pool size (aiohttp keeps
    any idle connection of its pool alive; `max_keepalive` is httpx's)."""
    if kind == "httpx":
        return OutboundClient(
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_keepalive
            )
        )
    if kind != "aiohttp":
        raise ValueError(f"unknown http transport {kind!r}")
    return OutboundClient(transport=AiohttpTransport(max_connections=max_connections))
