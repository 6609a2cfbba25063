"""Real processes over loopback for the end-to-end suite.

A `Stack` is one test environment: sandbox banks (`fundgate sandbox-bank`), one or more
gateways (`fundgate serve`) on one database, the TOML config they share and a webhook
receiver standing in for the lending core::

    with run_stack(tmp_path, database_url, funders=[bank_a(), bank_b()]) as stack:
        async with stack.api() as api:
            body = await api.new_disbursement()
            assert (await api.post(body)).status_code == 201

Every process is started with its output in a log file under the stack's directory and is
stopped (SIGTERM, then SIGKILL) when the `run_stack` block ends, whatever happened inside.
Processes run in the background while the tests talk to them with httpx; the webhook
receiver runs its own event loop in a thread, so a stack can outlive one test's event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]

TOKEN = "demo-token"  # all scopes, as in config/default.toml
READ_ONLY_TOKEN = "e2e-read-only-token"  # a client with the `read` scope only
WEBHOOK_SECRET = "e2e-webhook-secret"
TERMINAL = frozenset({"succeeded", "failed"})

PAYEE = {"account_no": "6222020200112233445", "account_name": "张三", "bank_code": "ICBC"}
PAYEE_MASKED = {"account_no": "622202*********3445", "account_name": "*三", "bank_code": "ICBC"}

# Test timings: every loop of the gateway turns in well under a second.
FAST_DISPATCH: dict[str, Any] = {
    "max_in_flight_per_funder": 32,
    "lease_seconds": 5,
    "query_backoff_seconds": [0.5, 1, 2],
    "escalate_after_seconds": 3600,
    "not_sent_retries": 3,
    "not_sent_backoff_seconds": 0.2,
    "poll_interval_seconds": 0.2,
    "webhook_backoff_seconds": [0.2, 0.5, 1],
}

PROCESS_READY_SECONDS = 30.0
PROCESS_STOP_SECONDS = 15.0


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free right now (held together so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def fundgate_command() -> list[str]:
    """The venv's `fundgate` console script next to this interpreter, else `-m gateway.cli`."""
    script = Path(sys.executable).with_name("fundgate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gateway.cli"]


def new_id(prefix: str) -> str:
    """A unique id usable as txn_no or borrower_id (letters and digits only)."""
    return f"{prefix}{uuid.uuid4().hex[:16].upper()}"


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- processes


class ProcessFailed(RuntimeError):
    pass


_LIVE: set[Process] = set()


@atexit.register
def _kill_leftovers() -> None:  # a safety net for a test run that is itself interrupted
    for p in list(_LIVE):
        p.kill()


class Process:
    """One child process with its output in a log file and an HTTP readiness probe."""

    def __init__(
        self, name: str, argv: list[str], *, env: Mapping[str, str], log_path: Path, ready_url: str
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.ready_url = ready_url
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        if self.running:
            raise ProcessFailed(f"{self.name} is already running")
        self._close_log()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the children
        )
        _LIVE.add(self)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = PROCESS_READY_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.running:
                    rc = None if self.proc is None else self.proc.returncode
                    raise ProcessFailed(
                        f"{self.name} exited ({rc}) before it was ready:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.ready_url).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise ProcessFailed(
                        f"{self.name} not ready after {timeout} s:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def terminate(self) -> None:
        """Send SIGTERM (the graceful stop) without waiting."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = PROCESS_STOP_SECONDS) -> int | None:
        """Wait for the exit; SIGKILL after `timeout`. The exit code (None if never started)."""
        if self.proc is None:
            return None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        _LIVE.discard(self)
        self._close_log()
        return rc

    def stop(self, timeout: float = PROCESS_STOP_SECONDS) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit within `timeout`."""
        self.terminate()
        return self.wait_stopped(timeout)

    def kill(self) -> int | None:
        """SIGKILL: a crash, nothing runs its shutdown."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
        return self.wait_stopped()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNDGATE_")}
    env.update(extra)
    return env


class Gateway(Process):
    """`fundgate serve --port P`, ready when `/readyz` answers 200."""

    def __init__(self, name: str, port: int, *, database_url: str, config: Path, workdir: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(
            name,
            [*fundgate_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=_child_env(
                FUNDGATE_DATABASE_URL=database_url,
                FUNDGATE_CONFIG=str(config),
                FUNDGATE_LOG_FORMAT="json",
                FUNDGATE_DATA_DIR=str(workdir / "data"),
            ),
            log_path=workdir / f"{name}.log",
            ready_url=f"{self.url}/readyz",
        )


def _flags(options: Mapping[str, str]) -> list[str]:
    return [part for pair in options.items() for part in pair]


class Bank(Process):
    """`fundgate sandbox-bank` playing one funder, ready when `/_sandbox/health` answers 200."""

    def __init__(self, spec: FunderSpec, port: int, *, callback_url: str, workdir: Path):
        self.spec = spec
        self.funder_id = spec.id
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        options = {
            "--port": str(port),
            "--funder-id": spec.id,
            "--callback-url": callback_url,
            "--secret": spec.secret,
            "--seed": "7",  # faults drawn the same way on every run
        }
        super().__init__(
            spec.id,
            [*fundgate_command(), "sandbox-bank", *_flags(options), *spec.bank_args],
            env=_child_env(FUNDGATE_LOG_FORMAT="json"),
            log_path=workdir / f"{spec.id}.log",
            ready_url=f"{self.url}/_sandbox/health",
        )

    async def payouts(self) -> dict[str, dict[str, Any]]:
        """The oracle of money moved, by order number."""
        async with httpx.AsyncClient(timeout=10.0) as client:
            resp = await client.get(f"{self.url}/_sandbox/payouts")
        resp.raise_for_status()
        return {p["order_no"]: p for p in resp.json()}

    async def payouts_of(self, txn_no: str) -> list[dict[str, Any]]:
        """The bank's orders for one disbursement (order numbers are `<txn_no>-<n>`)."""
        return [p for o, p in (await self.payouts()).items() if o.startswith(f"{txn_no}-")]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FunderSpec:
    """One funder of the config and the sandbox bank that plays it."""

    id: str
    mode: str = "direct"
    priority: int = 1
    platform_share: str | None = None
    single_max: int = 20_000_000
    daily_limit: int = 5_000_000_000
    prefund_balance: int | None = None
    products: tuple[str, ...] = ("consumer-standard",)
    bank_args: tuple[str, ...] = ()  # fault and timing options of its sandbox bank
    connector_options: Mapping[str, Any] = field(default_factory=dict)  # beyond url and secret

    @property
    def secret(self) -> str:
        return f"e2e-secret-{self.id}"

    def funder_table(self, base_url: str) -> dict[str, Any]:
        table: dict[str, Any] = {
            "id": self.id,
            "name": f"Sandbox {self.id}",
            "license": "bank",
            "mode": self.mode,
            "priority": self.priority,
            "products": list(self.products),
            "single_max": self.single_max,
            "daily_limit": self.daily_limit,
            "connector": "sandbox",
        }
        if self.platform_share is not None:
            table["platform_share"] = self.platform_share
        if self.prefund_balance is not None:
            table["prefund_balance"] = self.prefund_balance
        table["connector_options"] = {
            "base_url": base_url,
            "secret": self.secret,
            **self.connector_options,
        }
        return table


def bank_a(**changes: Any) -> FunderSpec:
    """bank-a of config/default.toml: direct, priority 1."""
    return FunderSpec(**{"id": "bank-a", "mode": "direct", "priority": 1, **changes})


def bank_b(**changes: Any) -> FunderSpec:
    """bank-b of config/default.toml: co-lending with a 30 % platform share, priority 2."""
    defaults = {
        "id": "bank-b",
        "mode": "co_lending",
        "priority": 2,
        "platform_share": "0.30",
        "prefund_balance": 1_000_000_000,
    }
    return FunderSpec(**{**defaults, **changes})


STANDARD_PRODUCT: dict[str, Any] = {
    "code": "consumer-standard",
    "min_amount": 300_000,
    "max_amount": 20_000_000,
    "min_term": {"unit": "day", "count": 7},
    "max_term": {"unit": "month", "count": 36},
    "repayments": ["equal_installment", "interest_first"],
}


def build_config(
    *,
    public_url: str,
    webhook_url: str,
    funders: Sequence[tuple[FunderSpec, str]],
    gateway: Mapping[str, Any] | None = None,
    dispatch: Mapping[str, Any] | None = None,
    products: Sequence[Mapping[str, Any]] = (STANDARD_PRODUCT,),
) -> dict[str, Any]:
    """A config like config/default.toml with real ports and fast dispatch timings.

    Clients: `lending-core` (token `demo-token`, every scope) and `e2e-reader` (read only).
    """
    return {
        "gateway": {
            "timezone": "Asia/Shanghai",
            "apr_cap": "0.24",
            "min_platform_share": "0.30",
            "platform_daily_limit": 50_000_000_000,
            "public_url": public_url,
            **(gateway or {}),
        },
        "lending_core": {"webhook_url": webhook_url, "webhook_secret": WEBHOOK_SECRET},
        "clients": [
            {
                "name": "lending-core",
                "token_sha256": sha256_hex(TOKEN),
                "scopes": ["disburse", "read", "admin"],
            },
            {"name": "e2e-reader", "token_sha256": sha256_hex(READ_ONLY_TOKEN), "scopes": ["read"]},
        ],
        "products": [dict(p) for p in products],
        "funders": [spec.funder_table(url) for spec, url in funders],
        "dispatch": {**FAST_DISPATCH, **(dispatch or {})},
        "reconciliation": {"run_at": "02:00"},
    }


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}")


def to_toml(config: Mapping[str, Any]) -> str:
    """Top-level dicts as tables, lists of dicts as arrays of tables, the rest inline."""
    lines: list[str] = []
    for name, value in config.items():
        tables = value if isinstance(value, list) else [value]
        for table in tables:
            lines.append(f"[[{name}]]" if isinstance(value, list) else f"[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
            lines.append("")
    text = "\n".join(lines)
    tomllib.loads(text)  # fail here, not in a child process, if the writer is wrong
    return text


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(to_toml(config), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- webhook receiver


@dataclass(frozen=True)
class WebhookEvent:
    body: dict[str, Any]
    raw: bytes
    timestamp: str
    signature: str
    signature_valid: bool


class WebhookReceiver:
    """The lending core's webhook endpoint: checks `X-Fundgate-Signature`, records every event.

    Runs an aiohttp app on its own event loop in a thread. `fail_next(n)` answers the next `n`
    deliveries with 503, to see the gateway retry.
    """

    def __init__(self, secret: str = WEBHOOK_SECRET, port: int | None = None) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self._events: list[WebhookEvent] = []
        self._refused = 0
        self._fail_next = 0
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="webhook-receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(10) or self._error is not None:
            raise ProcessFailed(f"webhook receiver did not start: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def verify(self, timestamp: str, raw: bytes, signature: str) -> bool:
        expected = hmac.new(
            self.secret.encode(), timestamp.encode() + b"." + raw, hashlib.sha256
        ).hexdigest()
        return hmac.compare_digest(expected, signature)

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._fail_next = n

    @property
    def refused(self) -> int:
        with self._lock:
            return self._refused

    def events(self, txn_no: str | None = None) -> list[WebhookEvent]:
        with self._lock:
            events = list(self._events)
        return [e for e in events if txn_no is None or e.body.get("txn_no") == txn_no]

    async def wait_for(self, txn_no: str, status: str, timeout: float = 10.0) -> list[WebhookEvent]:
        """Every event for `txn_no` once one with `status` has arrived."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events(txn_no)
            if any(e.body.get("status") == status for e in events):
                return events
            if time.monotonic() > deadline:
                seen = [e.body.get("status") for e in events]
                raise AssertionError(f"no {status} webhook for {txn_no} in {timeout} s: {seen}")
            await asyncio.sleep(0.05)

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        ts = request.headers.get("X-Fundgate-Timestamp", "")
        sig = request.headers.get("X-Fundgate-Signature", "")
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                self._refused += 1
                return web.Response(status=503, text="try later")
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        event = WebhookEvent(
            body=body if isinstance(body, dict) else {},
            raw=raw,
            timestamp=ts,
            signature=sig,
            signature_valid=bool(ts and sig) and self.verify(ts, raw, sig),
        )
        with self._lock:
            self._events.append(event)
        return web.Response(status=200 if event.signature_valid else 401)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported by start()
            self._error = e
            self._started.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/events", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._stopping = asyncio.Event()
            self._started.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()


# --------------------------------------------------------------------------- the API client


def disbursement_body(txn_no: str, borrower_id: str, **changes: Any) -> dict[str, Any]:
    """A valid `POST /v1/disbursements` body (CONTRACT.md's example), with `changes`."""
    body: dict[str, Any] = {
        "txn_no": txn_no,
        "loan_id": f"L-{txn_no}",
        "borrower_id": borrower_id,
        "payee": dict(PAYEE),
        "amount": 1_000_000,
        "currency": "CNY",
        "term": {"unit": "month", "count": 12},
        "apr": "0.1800",
        "product": "consumer-standard",
        "repayment": "equal_installment",
        "funder_hint": None,
        "metadata": {},
    }
    body.update(changes)
    return body


def error_of(resp: httpx.Response, status: int | Sequence[int], code: str | None = None) -> Any:
    """Assert an error answer of CONTRACT.md's shape; return its `error` object."""
    statuses = (status,) if isinstance(status, int) else tuple(status)
    assert resp.status_code in statuses, (
        f"expected HTTP {statuses}, got {resp.status_code}: {resp.text[:500]}"
    )
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "details"}, err
    assert isinstance(err["code"], str), err
    assert err["code"], err
    assert isinstance(err["message"], str), err
    assert err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


class Api:
    """The lending core's view of one gateway: httpx with a bearer token, plus helpers."""

    def __init__(self, base_url: str, token: str | None = TOKEN) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self.http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=30.0,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def register(self, borrower_id: str, payee: Mapping[str, str] = PAYEE) -> httpx.Response:
        resp = await self.http.put(f"/v1/borrowers/{borrower_id}/accounts", json=dict(payee))
        assert resp.status_code in (200, 201), resp.text
        return resp

    async def new_disbursement(self, prefix: str = "E2E", **changes: Any) -> dict[str, Any]:
        """A valid body for a fresh borrower whose payee account is already whitelisted."""
        borrower_id = new_id("B")
        await self.register(borrower_id, changes.get("payee", PAYEE))
        return disbursement_body(new_id(prefix), borrower_id, **changes)

    async def post(
        self, body: Mapping[str, Any] | bytes, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        if isinstance(body, bytes):
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            return await self.http.post("/v1/disbursements", content=body, headers=hdrs)
        return await self.http.post("/v1/disbursements", json=dict(body), headers=headers)

    async def get(self, txn_no: str) -> httpx.Response:
        return await self.http.get(f"/v1/disbursements/{txn_no}")

    async def resource(self, txn_no: str) -> dict[str, Any]:
        resp = await self.get(txn_no)
        assert resp.status_code == 200, f"GET {txn_no}: {resp.status_code} {resp.text[:300]}"
        body: dict[str, Any] = resp.json()
        return body

    async def assert_absent(self, txn_no: str) -> None:
        """Nothing was written for `txn_no`: GET answers 404."""
        error_of(await self.get(txn_no), 404)

    async def vouchers(self, txn_no: str) -> list[dict[str, Any]]:
        resp = await self.http.get(f"/v1/disbursements/{txn_no}/vouchers")
        assert resp.status_code == 200, resp.text
        items: list[dict[str, Any]] = resp.json()["items"]
        return items

    async def funders(self) -> dict[str, Any]:
        resp = await self.http.get("/v1/funders")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def wait_until(
        self,
        txn_nos: Sequence[str],
        done: Callable[[dict[str, Any]], bool],
        timeout: float,
        what: str,
    ) -> dict[str, dict[str, Any]]:
        """Poll GET until `done(resource)` holds for every txn_no; their resources."""
        deadline = time.monotonic() + timeout
        found: dict[str, dict[str, Any]] = {}
        latest: dict[str, str] = {}
        while True:
            pending = [t for t in txn_nos if t not in found]
            for txn_no, res in zip(
                pending, await asyncio.gather(*(self.resource(t) for t in pending)), strict=True
            ):
                latest[txn_no] = res["status"]
                if done(res):
                    found[txn_no] = res
            if len(found) == len(set(txn_nos)):
                return found
            if time.monotonic() > deadline:
                stuck = {t: s for t, s in latest.items() if t not in found}
                raise AssertionError(f"not {what} after {timeout} s: {stuck}")
            await asyncio.sleep(0.1)

    async def wait_terminal(
        self, txn_nos: Sequence[str], timeout: float = 15.0
    ) -> dict[str, dict[str, Any]]:
        return await self.wait_until(
            txn_nos, lambda r: r["status"] in TERMINAL, timeout, "terminal"
        )


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    workdir: Path
    database_url: str
    config_path: Path
    config: dict[str, Any]
    gateways: list[Gateway]
    banks: dict[str, Bank]
    receiver: WebhookReceiver

    @property
    def gateway(self) -> Gateway:
        return self.gateways[0]

    def api(self, gateway: Gateway | None = None, token: str | None = TOKEN) -> Api:
        return Api((gateway or self.gateway).url, token)

    def processes(self) -> list[Process]:
        return [*self.banks.values(), *self.gateways]

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"----- {p.name} ({p.log_path}) -----\n{p.log_tail(lines)}" for p in self.processes()
        )


def stop_all(processes: Sequence[Process], timeout: float = PROCESS_STOP_SECONDS) -> None:
    """SIGTERM every process at once, then wait for each (SIGKILL on a timeout)."""
    for p in processes:
        with contextlib.suppress(OSError):
            p.terminate()
    for p in processes:
        p.wait_stopped(timeout)


# database URLs with a running stack: a second stack on the same database would have its
# gateways take the first one's work (and deliver webhooks to the other receiver)
_STACK_DATABASES: set[str] = set()


@contextlib.contextmanager
def run_stack(
    workdir: Path,
    database_url: str,
    *,
    funders: Sequence[FunderSpec] = (),
    gateways: int = 1,
    gateway: Mapping[str, Any] | None = None,
    dispatch: Mapping[str, Any] | None = None,
    products: Sequence[Mapping[str, Any]] = (STANDARD_PRODUCT,),
) -> Iterator[Stack]:
    """Start banks, gateways and the webhook receiver; stop them all when the block ends."""
    if database_url in _STACK_DATABASES:
        raise ProcessFailed("another stack is running on this database; do not mix scopes")
    specs = list(funders) or [bank_a(), bank_b()]
    workdir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(len(specs) + gateways + 1)
    gw_ports, bank_ports, receiver_port = ports[:gateways], ports[gateways:-1], ports[-1]
    public_url = f"http://127.0.0.1:{gw_ports[0]}"
    receiver = WebhookReceiver(port=receiver_port)
    banks = {
        spec.id: Bank(
            spec, port, callback_url=f"{public_url}/v1/callbacks/{spec.id}", workdir=workdir
        )
        for spec, port in zip(specs, bank_ports, strict=True)
    }
    config = build_config(
        public_url=public_url,
        webhook_url=receiver.url,
        funders=[(b.spec, b.url) for b in banks.values()],
        gateway=gateway,
        dispatch=dispatch,
        products=products,
    )
    config_path = write_config(workdir / "fundgate.toml", config)
    gws = [
        Gateway(
            f"gateway-{i + 1}",
            port,
            database_url=database_url,
            config=config_path,
            workdir=workdir,
        )
        for i, port in enumerate(gw_ports)
    ]
    stack = Stack(workdir, database_url, config_path, config, gws, banks, receiver)
    _STACK_DATABASES.add(database_url)
    try:
        receiver.start()
        for p in stack.processes():
            p.start()
        for p in stack.processes():
            p.wait_ready()
        yield stack
    finally:
        stop_all(stack.processes())
        receiver.stop()
        _STACK_DATABASES.discard(database_url)
