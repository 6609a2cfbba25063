"""connectors/transport.py over real loopback sockets: the bytes go through unchanged, and
every failure comes out as the httpx error httpcore raises for it, so that `connectors.http`
classifies it the same way ("not sent" only when nothing can have reached the server)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gzip
import ipaddress
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connectors import http
from connectors.errors import NotSent, OutcomeUnknown
from connectors.transport import AiohttpTransport, _client_timeout, outbound_client

TRANSPORTS = ["aiohttp", "httpx"]  # the classification must agree with httpx's own


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context else "http"
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object]],
) -> AsyncIterator[str]:
    """A TCP server whose connections `handle` serves byte by byte (misbehaving peers)."""

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def client(kind: str = "aiohttp", **kwargs: object) -> httpx.AsyncClient:
    if kind == "aiohttp":
        return httpx.AsyncClient(transport=AiohttpTransport(**kwargs))  # type: ignore[arg-type]
    return httpx.AsyncClient(**kwargs)  # type: ignore[arg-type]


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        resp = web.json_response(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "body": body.decode(),
                "headers": {k: v for k, v in request.headers.items() if k.startswith("X-")},
                "content_type": request.headers.get("Content-Type"),
            }
        )
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        return resp

    async def gz(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b"compressed " * 100), headers={"Content-Encoding": "gzip"}
        )

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(40):
            await resp.write(bytes([65 + i % 26]) * 10_000)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/gz", gz)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/big", big)
    return app


@pytest.mark.asyncio
async def test_a_request_and_its_answer_pass_through_unchanged() -> None:
    async with serve(echo_app()) as base, client() as c:
        r = await c.post(
            f"{base}/echo/a%2Fb?q=%E4%B8%AD&x=1",
            content=b'{"amount":1000000}',
            headers={"Content-Type": "application/json", "X-Idempotency-Key": "LC1-01"},
        )
        got = r.json()
        assert r.status_code == 200
        assert got["method"] == "POST"
        assert got["path_qs"] == "/echo/a%2Fb?q=%E4%B8%AD&x=1"  # the encoding httpx chose
        assert got["body"] == '{"amount":1000000}'
        assert got["content_type"] == "application/json"
        assert got["headers"]["X-Idempotency-Key"] == "LC1-01"
        assert r.headers.get_list("X-Multi") == ["one", "two"]
        r = await c.get(f"{base}/echo/")
        assert r.json()["method"] == "GET"
        assert r.json()["body"] == ""


@pytest.mark.asyncio
async def test_httpx_decodes_the_content_and_no_redirect_is_followed() -> None:
    async with serve(echo_app()) as base, client() as c:
        r = await c.get(f"{base}/gz")
        assert r.text == "compressed " * 100
        r = await c.get(f"{base}/redirect")
        assert r.status_code == 302
        assert r.headers["Location"] == "/elsewhere"


@pytest.mark.asyncio
async def test_a_streamed_body_arrives_in_chunks_and_whole() -> None:
    async with serve(echo_app()) as base, client() as c:
        async with c.stream("GET", f"{base}/big") as r:
            chunks = [chunk async for chunk in r.aiter_raw()]
        assert sum(map(len, chunks)) == 400_000
        assert b"".join(chunks)[:10_000] == b"A" * 10_000


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_connection_refused_is_not_sent(kind: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with raw_server(answer) as base:
        pass  # closed again: nothing listens on the port now
    async with client(kind) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(base)
        with pytest.raises(NotSent):
            await http.send(c, c.build_request("POST", base, content=b"{}"), what="t")


@pytest.mark.asyncio
async def test_an_unknown_host_is_not_sent() -> None:
    async with client() as c:
        with pytest.raises(NotSent):
            await http.send(c, c.build_request("GET", "http://no-such-host.invalid/"), what="t")


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_no_answer_in_time_is_an_unknown_outcome_after_the_request_arrived(
    kind: str,
) -> None:
    arrived: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append(await read_request(reader))
        await asyncio.sleep(5)

    async with raw_server(silent) as base, client(kind) as c:
        request = c.build_request(
            "POST", f"{base}/api/payouts", content=b'{"order_no":"LC1-01"}', timeout=0.3
        )
        with pytest.raises(OutcomeUnknown) as e:
            await http.send(c, request, what="payout")
        assert e.value.code == "timeout"
        assert isinstance(e.value.__cause__, httpx.ReadTimeout)
    assert len(arrived) == 1
    assert arrived[0].endswith(b'{"order_no":"LC1-01"}')


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_waiting_for_a_pooled_connection_in_vain_is_not_sent(kind: str) -> None:
    arrived: list[bytes] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append(await read_request(reader))
        await asyncio.sleep(1.0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    one = (
        {"max_connections": 1} if kind == "aiohttp" else {"limits": httpx.Limits(max_connections=1)}
    )
    async with raw_server(slow) as base, client(kind, **one) as c:
        first = asyncio.create_task(c.get(base, timeout=5))
        await asyncio.sleep(0.2)  # the only connection is busy
        second = c.build_request("POST", base, content=b"{}", timeout=httpx.Timeout(5, pool=0.2))
        second.extensions["timeout"]["connect"] = 0.1
        with pytest.raises(NotSent):
            await http.send(c, second, what="payout")
        assert (await first).status_code == 200
    assert len(arrived) == 1  # the second request never left


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_connection_dropped_after_the_request_is_an_unknown_outcome(kind: str) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # executes, then closes without a word

    async with raw_server(drop) as base, client(kind) as c:
        with pytest.raises(OutcomeUnknown) as e:
            await http.send(c, c.build_request("POST", base, content=b"{}"), what="payout")
        assert e.value.code == "transport_error"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_truncated_or_garbled_answer_is_an_unknown_outcome(kind: str) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"status":')
        await writer.drain()

    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    for handler in (truncated, garbled):
        async with raw_server(handler) as base, client(kind) as c:
            with pytest.raises(OutcomeUnknown):
                await http.send(c, c.build_request("POST", base, content=b"{}"), what="payout")


@pytest.mark.asyncio
async def test_a_peer_that_stops_reading_a_large_request_times_out_as_unknown() -> None:
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the headers, then never another byte
        await asyncio.sleep(10)

    async with raw_server(deaf) as base, client() as c:
        request = c.build_request("POST", base, content=b"x" * 32_000_000, timeout=0.2)
        with pytest.raises(OutcomeUnknown) as e:
            await asyncio.wait_for(http.send(c, request, what="upload"), timeout=5)
        assert e.value.code == "timeout"


def test_httpx_timeouts_map_to_aiohttp_phases() -> None:
    t, headers_by = _client_timeout({"connect": 3.0, "read": 10.0, "write": 10.0, "pool": 1.0})
    assert (t.total, t.connect, t.sock_connect, t.sock_read) == (None, 4.0, 3.0, 10.0)
    assert headers_by == 24.0
    t, headers_by = _client_timeout({"connect": None, "read": None, "write": None, "pool": None})
    assert (t.connect, t.sock_connect, t.sock_read, headers_by) == (None, None, None, None)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_the_outbound_client_keeps_cookies_an_answer_sets_and_only_those(kind: str) -> None:
    async def login(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.set_cookie("session", request.query["as"])
        return response

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"cookie": request.headers.get("Cookie")})

    app = web.Application()
    app.router.add_get("/login", login)
    app.router.add_get("/whoami", whoami)
    async with serve(app) as base, outbound_client(kind) as c:
        assert (await c.get(f"{base}/whoami")).json() == {"cookie": None}
        await c.get(f"{base}/login", params={"as": "first"})
        # an answer without Set-Cookie leaves the store as it was
        assert (await c.get(f"{base}/whoami")).json() == {"cookie": "session=first"}
        assert (await c.get(f"{base}/whoami")).json() == {"cookie": "session=first"}
        await c.get(f"{base}/login", params={"as": "second"})
        assert (await c.get(f"{base}/whoami")).json() == {"cookie": "session=second"}
        assert dict(c.cookies) == {"session": "second"}
        c.cookies = {"session": "set-by-hand"}
        assert (await c.get(f"{base}/whoami")).json() == {"cookie": "session=set-by-hand"}


def test_the_outbound_client_is_configurable() -> None:
    assert isinstance(outbound_client("aiohttp")._transport, AiohttpTransport)
    assert not isinstance(outbound_client("httpx")._transport, AiohttpTransport)
    with pytest.raises(ValueError, match="unknown http transport"):
        outbound_client("curl")


# ---------------------------------------------------------------- TLS


def _cert(
    name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        alt: x509.GeneralName = (
            x509.IPAddress(ipaddress.ip_address(name)) if name[0].isdigit() else x509.DNSName(name)
        )
        builder = builder.add_extension(x509.SubjectAlternativeName([alt]), False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(dir: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (dir / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d)
        ca, ca_key = _cert("fundgate test CA")
        _write(path, "ca", ca, ca_key)
        for name in ("127.0.0.1", "client"):
            cert, key = _cert(name, (ca.subject, ca_key))
            _write(path, name, cert, key)
        yield path


def _server_tls(pki: Path, *, require_client: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(pki / "127.0.0.1.pem", pki / "127.0.0.1.key")
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _peer_app() -> web.Application:
    async def who(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        peer = transport.get_extra_info("peercert") or {}
        subject = dict(x[0] for x in peer.get("subject", ()))
        return web.json_response({"client": subject.get("commonName")})

    app = web.Application()
    app.router.add_get("/", who)
    return app


@pytest.mark.asyncio
async def test_tls_verifies_the_server_and_presents_a_client_certificate(pki: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    async with (
        serve(_peer_app(), _server_tls(pki, require_client=True)) as base,
        client(verify=ctx) as c,
    ):
        r = await c.get(base + "/")
        assert r.json() == {"client": "client"}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_server_certificate_that_does_not_verify_is_not_sent(kind: str, pki: Path) -> None:
    async with serve(_peer_app(), _server_tls(pki, require_client=False)) as base:
        async with client(kind) as c:  # the default CA bundle does not know the test CA
            with pytest.raises(NotSent):
                await http.send(c, c.build_request("GET", base + "/"), what="t")
        async with client(kind, verify=False) as c:
            assert (await c.get(base + "/")).json() == {"client": None}
