"""The sandbox bank: a real aiohttp server that behaves like a payout bank, faults included.

Routes (CONTRACT.md):

    POST /api/payouts                 signed; idempotent by order_no; 409 on a changed payload
    GET  /api/payouts/{order_no}      signed; 404 {"status": "NOT_FOUND"} for unknown orders
    GET  /api/statements/{YYYY-MM-DD} signed; CSV of orders finished that (Asia/Shanghai) day
    GET  /_sandbox/payouts            the oracle of money moved: `executions` is never above 1
    GET  /_sandbox/health             200

An accepted order is executed once, `settle_ms` later, by a background task that then POSTs
the signed result callback to the configured callback URL (retried with back-off, as banks
do). Every fault is drawn from one `random.Random(seed)`, a fixed number of draws per order,
so a run with the same seed and the same request order is reproducible.

State is in memory and the event loop is single-threaded: looking an order up and
inserting it happen with no `await` in between, so concurrent identical requests cannot both
create (and execute) it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import re
import secrets
import signal
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import structlog
from aiohttp import web
from pydantic import ValidationError

from connectors.sandbox import wire
from connectors.simbank import SimulatedBank, mount

log = structlog.get_logger("fundgate.sandbox_bank")

DEFAULT_SECRET = "sandbox-secret"
# Each callback delivery is tried this often before the bank gives up on it
# (real banks retry for hours; a sandbox run is minutes long).
DEFAULT_CALLBACK_ATTEMPTS = 6
# First retry delay; doubled after every failed try (200 ms … 6.4 s over six attempts).
DEFAULT_CALLBACK_BACKOFF_MS = 200
# One callback POST that takes longer than this counts as failed and is retried.
CALLBACK_TIMEOUT_SECONDS = 5.0

_REJECT_CODE, _REJECT_REASON = "RISK_REJECTED", "payee account failed the bank's risk check"
_FAIL_CODE, _FAIL_REASON = "ACCOUNT_FROZEN", "payee account is frozen"

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

OrderState = Literal["ACCEPTED", "SUCCESS", "FAILED", "REJECTED"]


@dataclass(frozen=True, slots=True)
class BankOptions:
    """One simulated bank: identity, secret and fault rates (probabilities 0..1)."""

    funder_id: str
    callback_url: str | None = None  # None: use the callback_url each payout request carries
    secret: str = DEFAULT_SECRET
    seed: int | None = None  # None: a fresh seed, logged at start so the run can be repeated
    reject_rate: float = 0.0  # 422 REJECTED, pre_execution, nothing executed
    error_rate: float = 0.0  # HTTP 500, nothing executed, order forgotten
    timeout_rate: float = 0.0  # accepted and executed, but the request is never answered
    fail_rate: float = 0.0  # accepted, then FAILED without moving money
    callback_loss_rate: float = 0.0  # the result callback is never sent
    callback_duplicate_rate: float = 0.0  # the result callback is sent twice
    callback_delay_ms: int = 0  # extra delay between execution and callback
    latency_ms: int = 0  # delay before every /api answer
    settle_ms: int = 50  # from acceptance to execution (and callback)
    callback_attempts: int = DEFAULT_CALLBACK_ATTEMPTS
    callback_backoff_ms: int = DEFAULT_CALLBACK_BACKOFF_MS
    timezone: str = "Asia/Shanghai"  # the statement's business day

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in (
            "reject_rate",
            "error_rate",
            "timeout_rate",
            "fail_rate",
            "callback_loss_rate",
            "callback_duplicate_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name} must be within 0..1, got {value}")
        for name in ("callback_delay_ms", "latency_ms", "settle_ms", "callback_backoff_ms"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.callback_attempts < 1:
            problems.append("callback_attempts must be at least 1")
        if not self.secret:
            problems.append("secret must not be empty")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"unknown time zone {self.timezone!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(slots=True)
class _Order:
    order_no: str
    amount: int
    currency: str
    account_no: str
    account_name: str
    bank_code: str
    callback_url: str | None
    bank_ref: str
    status: OrderState
    executions: int = 0  # how many times money left for this order; the oracle's number
    fail_code: str | None = None
    fail_reason: str | None = None
    finished_at: datetime | None = None

    def same_payload(self, req: wire.PayoutRequest) -> bool:
        return (req.amount, req.currency, req.account_no, req.account_name, req.bank_code) == (
            self.amount,
            self.currency,
            self.account_no,
            self.account_name,
            self.bank_code,
        )

    @property
    def pre_execution(self) -> bool:
        # In this bank a failed or rejected order never moved money.
        return self.status in ("FAILED", "REJECTED")

    def view(self) -> dict[str, Any]:
        return wire.PayoutView(
            order_no=self.order_no,
            bank_ref=self.bank_ref,
            status=self.status,
            amount=self.amount,
            finished_at=self.finished_at,
            fail_code=self.fail_code,
            fail_reason=self.fail_reason,
            pre_execution=self.pre_execution,
        ).model_dump(mode="json")

    def callback(self) -> dict[str, Any]:
        return wire.CallbackBody(
            order_no=self.order_no,
            bank_ref=self.bank_ref,
            status=self.status,
            amount=self.amount,
            finished_at=self.finished_at,
            fail_code=self.fail_code,
            fail_reason=self.fail_reason,
        ).model_dump(mode="json")


@dataclass(frozen=True, slots=True)
class _Draws:
    """Every fault draw for one new order, taken at once and always all six.

    Drawing a fixed number per order keeps rates independent (raising one does not shift the
    others) and keeps callback faults out of the race between settle tasks.
    """

    reject: bool
    error: bool
    timeout: bool
    fail: bool
    callback_lost: bool
    callback_duplicated: bool


class SandboxBank(SimulatedBank):
    """The state and behaviour behind one sandbox bank app (see the module docstring)."""

    def __init__(self, opts: BankOptions, seed: int) -> None:
        super().__init__(
            "sandbox_bank", CALLBACK_TIMEOUT_SECONDS,
            latency_ms=opts.latency_ms, callback_delay_ms=opts.callback_delay_ms,
        )  # fmt: skip
        self.opts = opts
        self.seed = seed
        self.rng = random.Random(seed)
        self.zone = ZoneInfo(opts.timezone)
        self.orders: dict[str, _Order] = {}
        self._refs = itertools.count(1)

    # --- handlers ---------------------------------------------------------------------

    async def create_payout(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if (denied := self._verify(request, body)) is not None:
            return denied
        try:
            req = wire.PayoutRequest.model_validate_json(body)
        except ValidationError as e:
            return _json({"error": "bad_request", "message": str(e.errors()[0]["msg"])}, 400)
        key = request.headers.get(wire.IDEMPOTENCY_HEADER)
        if key is not None and key != req.order_no:
            return _json(
                {"error": "bad_request", "message": "Idempotency-Key is not order_no"}, 400
            )
        hang = False
        # Lookup and insert below run with no await in between: at most one order per order_no.
        order = self.orders.get(req.order_no)
        if order is None:
            draws = self._draw()
            if draws.error:
                log.info("sandbox_bank.fault.error", order_no=req.order_no)
                await self._latency()
                return _json({"error": "internal_error"}, 500)
            order = self._remember(req, "REJECTED" if draws.reject else "ACCEPTED")
            if order.status == "ACCEPTED":
                self._spawn(self._settle(order, draws))
                hang = draws.timeout
            log.info("sandbox_bank.payout.received", order_no=order.order_no, status=order.status)
        elif not order.same_payload(req):
            await self._latency()
            return _json(
                {
                    "status": "CONFLICT",
                    "fail_code": "ORDER_CONFLICT",
                    "fail_reason": "order_no already used with a different payload",
                },
                409,
            )
        await self._latency()
        if hang:
            log.info("sandbox_bank.fault.timeout", order_no=order.order_no)
            await self._never_answer()
            return _json({"error": "shutting_down"}, 503)
        if order.status == "REJECTED":
            return _json(
                wire.Rejection(
                    status="REJECTED",
                    fail_code=order.fail_code,
                    fail_reason=order.fail_reason,
                    pre_execution=True,
                ).model_dump(mode="json"),
                422,
            )
        return _json(order.view(), 200)

    async def get_payout(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._verify(request, await request.read())) is not None:
            return denied
        await self._latency()
        order_no = request.match_info["order_no"]
        order = self.orders.get(order_no)
        if order is None:
            return _json({"status": "NOT_FOUND", "order_no": order_no}, 404)
        return _json(order.view(), 200)

    async def get_statement(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._verify(request, await request.read())) is not None:
            return denied
        raw_day = request.match_info["day"]
        try:
            if not _DAY.fullmatch(raw_day):
                raise ValueError(raw_day)
            day = date.fromisoformat(raw_day)
        except ValueError:
            return _json({"error": "bad_request", "message": "day must be YYYY-MM-DD"}, 400)
        await self._latency()
        finished = sorted(
            (
                o
                for o in self.orders.values()
                if o.finished_at is not None
                and o.status in ("SUCCESS", "FAILED")
                and o.finished_at.astimezone(self.zone).date() == day
            ),
            key=lambda o: (o.finished_at, o.order_no),
        )
        response = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8"})
        await response.prepare(request)
        await response.write((wire.STATEMENT_HEADER + "\n").encode())
        for o in finished:
            assert o.finished_at is not None
            line = wire.statement_row(o.order_no, o.bank_ref, o.amount, o.status, o.finished_at)
            await response.write(line.encode())
        await response.write_eof()
        return response

    async def oracle(self, _request: web.Request) -> web.StreamResponse:
        return _json(
            [
                {
                    "order_no": o.order_no,
                    "amount": o.amount,
                    "account_no": o.account_no,
                    "executions": o.executions,
                    "status": o.status,
                }
                for o in self.orders.values()
            ],
            200,
        )

    async def health(self, _request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok", "funder_id": self.opts.funder_id, "seed": self.seed}, 200)

    # --- life of an order -------------------------------------------------------------

    def _draw(self) -> _Draws:
        o = self.opts
        reject, error, timeout, fail, lost, duplicated = (self.rng.random() for _ in range(6))
        return _Draws(
            reject=reject < o.reject_rate,
            error=error < o.error_rate,
            timeout=timeout < o.timeout_rate,
            fail=fail < o.fail_rate,
            callback_lost=lost < o.callback_loss_rate,
            callback_duplicated=duplicated < o.callback_duplicate_rate,
        )

    def _remember(self, req: wire.PayoutRequest, status: OrderState) -> _Order:
        order = _Order(
            order_no=req.order_no,
            amount=req.amount,
            currency=req.currency,
            account_no=req.account_no,
            account_name=req.account_name,
            bank_code=req.bank_code,
            callback_url=req.callback_url,
            bank_ref=f"SBX{next(self._refs):010d}",
            status=status,
        )
        if status == "REJECTED":
            order.fail_code, order.fail_reason = _REJECT_CODE, _REJECT_REASON
        self.orders[req.order_no] = order
        return order

    async def _settle(self, order: _Order, draws: _Draws) -> None:
        await asyncio.sleep(self.opts.settle_ms / 1000)
        if draws.fail:
            order.status = "FAILED"
            order.fail_code, order.fail_reason = _FAIL_CODE, _FAIL_REASON
        elif order.executions == 0:
            # The one place money leaves the bank.
            order.executions += 1
            order.status = "SUCCESS"
        else:  # unreachable by construction; the oracle would show it, so say it loudly
            log.error("sandbox_bank.double_execution_prevented", order_no=order.order_no)
            return
        order.finished_at = datetime.now(self.zone)
        log.info("sandbox_bank.payout.finished", order_no=order.order_no, status=order.status)
        await self._call_back(
            order, order.order_no, lost=draws.callback_lost, duplicated=draws.callback_duplicated
        )

    async def _deliver(self, order: _Order) -> None:
        url = self.opts.callback_url or order.callback_url
        if not url or self.session is None:
            return
        body = wire.json_bytes(order.callback())
        delay = self.opts.callback_backoff_ms / 1000
        for attempt in range(1, self.opts.callback_attempts + 1):
            # Every try is a new message: fresh timestamp and nonce, as a real bank re-signs.
            headers = wire.signed_headers(
                self.opts.secret,
                body,
                timestamp=str(int(time.time())),
                nonce=secrets.token_hex(16),
            )
            headers["Content-Type"] = "application/json"
            try:
                async with self.session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        log.info("sandbox_bank.callback.delivered", order_no=order.order_no)
                        return
                    outcome = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                outcome = type(e).__name__
            log.info(
                "sandbox_bank.callback.retry",
                order_no=order.order_no,
                attempt=attempt,
                outcome=outcome,
            )
            if attempt < self.opts.callback_attempts:
                await asyncio.sleep(delay)
                delay *= 2
        log.warning("sandbox_bank.callback.gave_up", order_no=order.order_no)

    # --- helpers ----------------------------------------------------------------------

    def _verify(self, request: web.Request, body: bytes) -> web.Response | None:
        ts = request.headers.get(wire.TIMESTAMP_HEADER, "")
        nonce = request.headers.get(wire.NONCE_HEADER, "")
        signature = request.headers.get(wire.SIGNATURE_HEADER, "")
        if not (ts and nonce and signature) or not wire.signature_matches(
            self.opts.secret, ts, nonce, body, signature
        ):
            return _json({"error": "bad_signature"}, 401)
        try:
            fresh = wire.is_fresh(wire.parse_timestamp(ts), time.time())
        except wire.WireFormatError:
            fresh = False
        if not fresh:
            return _json({"error": "stale"}, 401)
        return None

    async def _never_answer(self) -> None:
        # Wait for shutdown rather than sleeping: the app's shutdown waits for open handlers.
        await self.closing.wait()

    async def start(self) -> None:
        await super().start()
        log.info("sandbox_bank.started", funder_id=self.opts.funder_id, seed=self.seed)


BANK = web.AppKey("sandbox_bank", SandboxBank)


def _json(data: Any, status: int) -> web.Response:
    return web.Response(status=status, body=wire.json_bytes(data), content_type="application/json")


def create_bank_app(opts: BankOptions) -> web.Application:
    """The sandbox bank as an aiohttp app; `app[BANK]` is its state (for tests and demos)."""
    seed = opts.seed if opts.seed is not None else secrets.randbits(32)
    bank = SandboxBank(opts, seed)
    app = web.Application()
    app[BANK] = bank

    mount(app, bank)
    app.router.add_post("/api/payouts", bank.create_payout)
    app.router.add_get("/api/payouts/{order_no}", bank.get_payout)
    app.router.add_get("/api/statements/{day}", bank.get_statement)
    app.router.add_get("/_sandbox/payouts", bank.oracle)
    app.router.add_get("/_sandbox/health", bank.health)
    return app


async def run_bank(
    opts: BankOptions,
    *,
    host: str = "127.0.0.1",
    port: int,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve one sandbox bank until SIGTERM/SIGINT (or `stop` is set), then shut down cleanly.

    Shutdown releases never-answered requests and cancels pending settle/callback tasks.
    """
    stop = stop or asyncio.Event()
    app = create_bank_app(opts)
    # Handlers finish quickly once `closing` is set; do not wait aiohttp's default 60 s.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        await web.TCPSite(runner, host, port).start()
        log.info(
            "sandbox_bank.listening",
            funder_id=opts.funder_id,
            addresses=[f"{a[0]}:{a[1]}" for a in runner.addresses],
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Not possible outside the main thread (or on Windows); `stop` still works there.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        await stop.wait()
        log.info("sandbox_bank.stopping", funder_id=opts.funder_id)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        log.info("sandbox_bank.stopped", funder_id=opts.funder_id)


# --- command line -------------------------------------------------------------------------


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {text}")
    return value


def _millis(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of ms: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fundgate sandbox-bank` (including --host and --port)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, required=True, help="port to bind (0: any free)")
    parser.add_argument("--funder-id", required=True, help="the funder this bank plays")
    parser.add_argument(
        "--callback-url",
        required=True,
        help="where result callbacks go: the gateway's /v1/callbacks/{funder_id}",
    )
    # None, not DEFAULT_SECRET: the other protocols' banks tell a given secret from none
    parser.add_argument(
        "--secret",
        default=None,
        help=f"HMAC secret (both ways; default {DEFAULT_SECRET!r}); signed_json and iso20022 "
        "sign with the funder's connector_options and refuse any other",
    )
    parser.add_argument("--seed", type=int, default=None, help="fault RNG seed (default: random)")
    rates = parser.add_argument_group("faults (probabilities 0..1)")
    rates.add_argument("--reject-rate", type=_rate, default=0.0, help="422 REJECTED, no money")
    rates.add_argument("--error-rate", type=_rate, default=0.0, help="HTTP 500, nothing executed")
    rates.add_argument(
        "--timeout-rate", type=_rate, default=0.0, help="executes, never answers the request"
    )
    rates.add_argument(
        "--fail-rate", type=_rate, default=0.0, help="accepted, then FAILED with no money moved"
    )
    rates.add_argument("--callback-loss-rate", type=_rate, default=0.0, help="no callback")
    rates.add_argument("--callback-duplicate-rate", type=_rate, default=0.0, help="two callbacks")
    times = parser.add_argument_group("timing (milliseconds)")
    times.add_argument("--callback-delay-ms", type=_millis, default=0, help="delay of callbacks")
    times.add_argument("--latency-ms", type=_millis, default=0, help="delay of every answer")
    times.add_argument(
        "--settle-ms", type=_millis, default=50, help="from acceptance to execution and callback"
    )
    times.add_argument(
        "--callback-attempts",
        type=int,
        default=DEFAULT_CALLBACK_ATTEMPTS,
        help="tries per callback before giving up",
    )


# the fault options of `add_arguments`, named as every simulated bank's options name them
FAULT_OPTIONS = (
    "reject_rate", "error_rate", "timeout_rate", "fail_rate", "callback_loss_rate",
    "callback_duplicate_rate", "callback_delay_ms", "latency_ms", "settle_ms",
    "callback_attempts",
)  # fmt: skip


def fault_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The fault options parsed by `add_arguments`, for any simulated bank's options."""
    return {name: getattr(ns, name) for name in FAULT_OPTIONS}


def options_from_args(ns: argparse.Namespace) -> BankOptions:
    """`BankOptions` from parsed `add_arguments` options; `ValueError` if inconsistent."""
    return BankOptions(
        funder_id=ns.funder_id,
        callback_url=ns.callback_url,
        secret=DEFAULT_SECRET if ns.secret is None else ns.secret,
        seed=ns.seed,
        **fault_options(ns),
    )
