"""A simulated bank that speaks any `signed_json` configuration: the connector's real peer in
the conformance suite, the tests and end-to-end runs.

It reads the same `SignedJsonOptions` a funder is configured with (paths, field mapping,
amount format, status words, signing), so both sides follow one description of the wire:

    POST <endpoints.create>      signed; idempotent by order_no; 409 on a changed payload
    GET  <endpoints.query>       signed; 404 with the not_found word for unknown orders
    GET  <endpoints.statement>   signed; CSV in the `StatementConfig` mapping, its raw bytes
                                 signed in the timestamp/nonce/signature headers
    GET  /_sandbox/payouts       the oracle of money moved: `executions` is never above 1

Its answers and callbacks are signed with the bank's key (the HMAC secret, or
`bank_private_key` for RSA) and requests are verified with the client's (`client_public_key`).
A 500 answer is an HTML page, as a real bank's load balancer sends.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

import aiohttp
import structlog
from aiohttp import web

from config.models import StatementConfig
from connectors.signed_json import wire
from connectors.simbank import SimulatedBank, mount, serve

log = structlog.get_logger("fundgate.signed_json_bank")

State = Literal["accepted", "succeeded", "failed", "rejected"]
CALLBACK_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class SignedJsonBankOptions:
    """One simulated bank: the wire description, its own keys and fault rates (0..1)."""

    wire: wire.SignedJsonOptions
    statement: StatementConfig = field(default_factory=StatementConfig)
    bank_private_key: str | None = None  # RSA: signs answers and callbacks
    client_public_key: str | None = None  # RSA: verifies requests
    callback_url: str | None = None  # None: the callback_url field of each request
    seed: int = 0
    reject_rate: float = 0.0  # refused before execution, nothing executed
    error_rate: float = 0.0  # HTTP 500 (HTML), nothing executed
    timeout_rate: float = 0.0  # executes, never answers
    fail_rate: float = 0.0  # accepted, then failed without moving money
    callback_loss_rate: float = 0.0  # the result callback is never sent
    callback_duplicate_rate: float = 0.0  # the result callback is sent twice
    callback_delay_ms: int = 0  # extra delay between execution and callback
    latency_ms: int = 0  # delay before every answer of the bank's API
    settle_ms: int = 20
    callback_attempts: int = 3
    timezone: str = "Asia/Shanghai"


@dataclass(slots=True)
class _Order:
    order_no: str
    amount: int
    fingerprint: bytes
    callback_url: str | None
    bank_ref: str
    state: State
    executions: int = 0
    finished_at: datetime | None = None


def bank_signer(opts: SignedJsonBankOptions) -> wire.Signer:
    s = opts.wire.signing
    if s.algorithm == "hmac-sha256":
        assert s.secret is not None
        secret = s.secret.get_secret_value().encode()
        return wire.Signer(s, own_key=secret, peer_key=secret)
    if opts.bank_private_key is None or opts.client_public_key is None:
        raise ValueError("RSA signing needs bank_private_key and client_public_key")
    return wire.Signer(
        s,
        own_key=wire.load_private_key(opts.bank_private_key),
        peer_key=wire.load_public_key(opts.client_public_key),
    )


class SignedJsonBank(SimulatedBank):
    def __init__(self, opts: SignedJsonBankOptions) -> None:
        super().__init__(
            "signed_json_bank", CALLBACK_TIMEOUT_SECONDS,
            latency_ms=opts.latency_ms, callback_delay_ms=opts.callback_delay_ms,
        )  # fmt: skip
        self.opts = opts
        self.w = opts.wire
        self.signer = bank_signer(opts)
        self.rng = random.Random(opts.seed)
        # callback faults draw from a stream of their own: a seed keeps giving the request
        # faults it always gave, whether or not callback faults are asked for
        self.callback_rng = random.Random(f"callbacks-{opts.seed}")
        self.zone = ZoneInfo(opts.timezone)
        self.orders: dict[str, _Order] = {}
        self._refs = itertools.count(1)
        self.words = {
            "accepted": self._word("accepted") or self._word("processing"),
            "succeeded": self._word("succeeded"),
            "failed": self._word("failed"),
            "rejected": next(iter(self.w.pre_execution_words), None) or self._word("failed"),
            "not_found": self._word("not_found"),
        }

    def _word(self, target: wire.Target) -> str | None:
        found = wire.words_for(self.w, target)
        return found[0] if found else None

    # --- handlers ---------------------------------------------------------------------

    async def create_payout(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if (denied := self._verify(request, body)) is not None:
            return denied
        try:
            obj = wire.parse_json_object(body)
            fields = self.w.request_fields
            order_no = wire.get_path(obj, fields["order_no"])
            amount = wire.wire_to_fen(wire.get_path(obj, fields["amount"]), self.w.amount_format)
            if not isinstance(order_no, str) or not order_no or amount <= 0:
                raise wire.WireFormatError("order_no and a positive amount are required")
        except wire.WireFormatError as e:
            return self._answer({"error": "bad_request", "message": str(e)}, 400)
        callback = wire.get_path(obj, fields["callback_url"]) if "callback_url" in fields else None
        fingerprint = wire.canonical_sorted(obj, self.w.signing.signature_field)
        order = self.orders.get(order_no)
        hang = False
        if order is None:
            reject, error, timeout, fail = (self.rng.random() for _ in range(4))
            lost, duplicated = (self.callback_rng.random() for _ in range(2))
            if error < self.opts.error_rate:
                await self._latency()
                return web.Response(
                    status=500, text="<html><body>500 Internal Error</body></html>",
                    content_type="text/html",
                )  # fmt: skip
            state: State = "rejected" if reject < self.opts.reject_rate else "accepted"
            order = _Order(
                order_no=order_no,
                amount=amount,
                fingerprint=fingerprint,
                callback_url=callback if isinstance(callback, str) else None,
                bank_ref=f"SJB{next(self._refs):010d}",
                state=state,
            )
            self.orders[order_no] = order
            if state == "accepted":
                self._spawn(
                    self._settle(
                        order,
                        failed=fail < self.opts.fail_rate,
                        lost=lost < self.opts.callback_loss_rate,
                        duplicated=duplicated < self.opts.callback_duplicate_rate,
                    )
                )
                hang = timeout < self.opts.timeout_rate
        elif order.fingerprint != fingerprint:
            await self._latency()
            return self._answer({"error": "conflict"}, 409)
        await self._latency()
        if hang:
            await self.closing.wait()
            return web.Response(status=503)
        return self._answer(self.view(order), 422 if order.state == "rejected" else 200)

    async def get_payout(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._verify(request, await request.read())) is not None:
            return denied
        await self._latency()
        order = self.orders.get(request.match_info["order_no"])
        if order is None:
            word = self.words["not_found"]
            out: dict[str, Any] = {}
            if word is not None:
                wire.set_path(out, self.w.response_fields["status"], word)
            return self._answer(out, 404)
        return self._answer(self.view(order), 200)

    async def get_statement(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._verify(request, await request.read())) is not None:
            return denied
        try:
            day = date.fromisoformat(request.match_info["day"])
        except ValueError:
            return self._answer({"error": "bad_request"}, 400)
        await self._latency()
        cfg = self.opts.statement
        words = {v: k for k, v in reversed(list(cfg.status_map.items()))}
        c = cfg.columns
        names = [c.order_no, c.bank_ref, c.amount, c.status, c.booked_at]
        d = cfg.delimiter
        lines = [(d.join(n for n in names if n is not None) + "\n").encode(cfg.encoding)]
        for o in sorted(
            (o for o in self.orders.values() if o.finished_at is not None),
            key=lambda o: (o.finished_at, o.order_no),
        ):
            assert o.finished_at is not None
            if o.finished_at.astimezone(self.zone).date() != day:
                continue
            values = [
                o.order_no,
                o.bank_ref if c.bank_ref is not None else None,
                str(wire.fen_to_wire(o.amount, cfg.amount_unit)),
                words["succeeded" if o.state == "succeeded" else "failed"],
                o.finished_at.isoformat() if c.booked_at is not None else None,
            ]
            lines.append((d.join(v for v in values if v is not None) + "\n").encode(cfg.encoding))
        # signed over the raw bytes, in headers, like every answer of this bank; the
        # sandbox's statements are small, so it renders them whole to sign them first
        headers = wire.sign_statement(
            self.signer, lines, timestamp=str(int(time.time())), nonce=secrets.token_hex(16)
        )
        headers["Content-Type"] = f"text/csv; charset={cfg.encoding}"
        return web.Response(status=200, body=b"".join(lines), headers=headers)

    async def oracle(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(
            [
                {
                    "order_no": o.order_no,
                    "amount": o.amount,
                    "executions": o.executions,
                    "status": o.state,
                }
                for o in self.orders.values()
            ]
        )

    # --- life of an order -------------------------------------------------------------

    def view(self, order: _Order) -> dict[str, Any]:
        rf = self.w.response_fields
        out: dict[str, Any] = {}
        word = self.words[order.state] or order.state.upper()
        values: dict[str, Any] = {
            "order_no": order.order_no,
            "status": word,
            "bank_ref": order.bank_ref,
            "amount": wire.fen_to_wire(order.amount, self.w.amount_format),
            "finished_at": order.finished_at.isoformat() if order.finished_at else None,
            "fail_code": "RISK_REJECTED" if order.state in ("failed", "rejected") else None,
            "fail_reason": "refused by the sandbox"
            if order.state in ("failed", "rejected")
            else None,
            "pre_execution": order.state in ("failed", "rejected"),
        }
        for key, path in rf.items():
            if values.get(key) is not None:
                wire.set_path(out, path, values[key])
        return out

    async def _settle(
        self, order: _Order, *, failed: bool, lost: bool = False, duplicated: bool = False
    ) -> None:
        await asyncio.sleep(self.opts.settle_ms / 1000)
        if failed:
            order.state = "failed"
        elif order.executions == 0:
            order.executions += 1  # the one place money leaves the bank
            order.state = "succeeded"
        order.finished_at = datetime.now(self.zone)
        await self._call_back(order, order.order_no, lost=lost, duplicated=duplicated)

    async def _deliver(self, order: _Order) -> None:
        url = self.opts.callback_url or order.callback_url
        if not url or self.session is None:
            return
        delay = 0.1
        for _ in range(self.opts.callback_attempts):
            body, headers = self.sign(self.view(order))
            try:
                async with self.session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(delay)
            delay *= 2

    # --- helpers ----------------------------------------------------------------------

    def sign(self, fields: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
        return wire.sign_message(
            self.signer, fields, timestamp=str(int(time.time())), nonce=secrets.token_hex(16)
        )

    def _answer(self, fields: Mapping[str, Any], status: int) -> web.Response:
        body, headers = self.sign(fields)
        return web.Response(status=status, body=body, headers=headers)

    def _verify(self, request: web.Request, body: bytes) -> web.Response | None:
        try:
            wire.verify_message(self.signer, request.headers, body, time.time())
        except wire.SignatureError as e:
            return self._answer({"error": e.reason}, 401)
        return None


BANK = web.AppKey("signed_json_bank", SignedJsonBank)


def create_bank_app(opts: SignedJsonBankOptions) -> web.Application:
    """The simulated bank as an aiohttp app; `app[BANK]` is its state."""
    bank = SignedJsonBank(opts)
    app = web.Application()
    app[BANK] = bank

    mount(app, bank)
    # aiohttp's route placeholders use the same `{name}` syntax as the endpoint templates
    ep = opts.wire.endpoints
    app.router.add_post(ep.create, bank.create_payout)
    app.router.add_get(ep.query, bank.get_payout)
    app.router.add_get(ep.statement, bank.get_statement)
    app.router.add_get("/_sandbox/payouts", bank.oracle)
    return app


async def run_bank(
    opts: SignedJsonBankOptions, *, host: str = "127.0.0.1", port: int, stop: asyncio.Event
) -> None:
    """Serve the bank until `stop` is set (`fundgate sandbox-bank --protocol signed_json`)."""
    log.info("signed_json_bank.listening", host=host, port=port)
    await serve(create_bank_app(opts), host=host, port=port, stop=stop)
