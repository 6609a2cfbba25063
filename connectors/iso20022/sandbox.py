"""A simulated ISO 20022 bank: accepts pain.001 uploads (validated against the XSD), answers
and calls back with signed pain.002, serves camt.053.001.08 statements.

    POST <upload_path>            pain.001 of one or more transactions -> pain.002 with one
                                  status per transaction (ACTC, or RJCT AC04 when refused)
    GET  <status_path>            pain.002 of one order; 404 + pain.002 RJCT NOOR if unknown
    GET  <statement_path>         camt.053.001.08 of the orders booked that day, signed like
                                  every answer (the X-ISO headers over its raw bytes)
    GET  /_sandbox/payouts        the oracle of money moved: `executions` is never above 1

Idempotent by EndToEndId (our order number): an order sent again, alone or in another
message, is answered with its status and never executed twice. The same EndToEndId with another
amount or account is a 409 for the whole message, and a 500 (an HTML page) executes nothing of
it; the timeout fault holds the whole answer back. Callbacks are pain.002 ACSC/RJCT, one per
order; the fail fault makes an accepted order RJCT AM04 (insufficient funds at execution,
nothing moved). The oracle also names each order's `msg_id` (the pain.001 that brought it).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal
from zoneinfo import ZoneInfo

import aiohttp
from aiohttp import web

from connectors.iso20022 import wire
from connectors.simbank import SimulatedBank, mount, serve

State = Literal["accepted", "succeeded", "failed", "rejected"]
_CODES: dict[State, tuple[str, str | None]] = {
    "accepted": ("ACTC", None),
    "succeeded": ("ACSC", None),
    "failed": ("RJCT", "AM04"),  # insufficient funds at execution, nothing moved
    "rejected": ("RJCT", "AC04"),  # closed account: refused before execution
}


@dataclass(frozen=True, slots=True)
class IsoBankOptions:
    secret: str
    upload_path: str = "/iso/pain001"
    status_path: str = "/iso/pain002/{order_no}"
    statement_path: str = "/iso/camt053/{day}"
    callback_url: str | None = None  # None: the X-ISO-Callback-Url header of the upload
    seed: int = 0
    reject_rate: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    fail_rate: float = 0.0  # accepted, then RJCT AM04 without moving money
    callback_loss_rate: float = 0.0  # the result callback is never sent
    callback_duplicate_rate: float = 0.0  # the result callback is sent twice
    callback_delay_ms: int = 0  # extra delay between execution and callback
    latency_ms: int = 0  # delay before every answer of the bank's API
    settle_ms: int = 20
    callback_attempts: int = 3
    timezone: str = "Asia/Shanghai"


@dataclass(frozen=True, slots=True)
class _Fate:
    """What happens to an accepted order after its answer, drawn when it is accepted."""

    fail: bool = False
    callback_lost: bool = False
    callback_duplicated: bool = False


@dataclass(slots=True)
class _Order:
    tx: wire.Pain001Tx
    msg_id: str
    bank_ref: str
    state: State
    callback_url: str | None = None
    executions: int = 0
    finished_at: datetime | None = None


class IsoBank(SimulatedBank):
    def __init__(self, opts: IsoBankOptions) -> None:
        super().__init__(
            "iso20022_bank", 5.0,
            latency_ms=opts.latency_ms, callback_delay_ms=opts.callback_delay_ms,
        )  # fmt: skip
        self.opts = opts
        self.rng = random.Random(opts.seed)
        # the faults that play out after acceptance draw from a stream of their own: a seed
        # keeps giving the request faults it always gave, whatever else is asked for
        self.later_rng = random.Random(f"later-{opts.seed}")
        self.zone = ZoneInfo(opts.timezone)
        self.orders: dict[str, _Order] = {}
        # every pain.001 taken: (MsgId, its EndToEndIds), for tests that count messages
        self.messages: list[tuple[str, list[str]]] = []
        self._refs = itertools.count(1)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if (denied := self._verify(request, body)) is not None:
            return denied
        try:
            msg_id, txs = wire.read_pain001(body)
        except wire.WireFormatError as e:
            return web.Response(status=400, text=str(e))
        # the message is judged whole before anything executes: a reused EndToEndId with
        # another payload, or a 500, leaves every order of it untouched
        seen: dict[str, wire.Pain001Tx] = {}
        for tx in txs:
            known = self.orders.get(tx.order_no)
            earlier = known.tx if known is not None else seen.get(tx.order_no)
            if earlier is not None and earlier != tx:
                await self._latency()
                return web.Response(status=409, text="EndToEndId reused with another payload")
            seen[tx.order_no] = tx
        fresh: dict[str, tuple[wire.Pain001Tx, State, bool, _Fate]] = {}
        for tx in txs:
            if tx.order_no in self.orders or tx.order_no in fresh:
                continue
            reject, error, timeout = (self.rng.random() for _ in range(3))
            fail, lost, duplicated = (self.later_rng.random() for _ in range(3))
            if error < self.opts.error_rate:
                await self._latency()
                return web.Response(status=500, text="<html>500</html>", content_type="text/html")
            state: State = "rejected" if reject < self.opts.reject_rate else "accepted"
            fate = _Fate(
                fail=fail < self.opts.fail_rate,
                callback_lost=lost < self.opts.callback_loss_rate,
                callback_duplicated=duplicated < self.opts.callback_duplicate_rate,
            )
            fresh[tx.order_no] = (tx, state, timeout < self.opts.timeout_rate, fate)
        callback = request.headers.get(wire.CALLBACK_HEADER) or self.opts.callback_url
        hang = False
        for tx, state, times_out, fate in fresh.values():
            order = _Order(tx, msg_id, f"ISO{next(self._refs):010d}", state, callback)
            self.orders[tx.order_no] = order
            if state == "accepted":
                self._spawn(self._settle(order, fate))
                hang = hang or times_out
        self.messages.append((msg_id, [tx.order_no for tx in txs]))
        await self._latency()
        if hang:
            await self.closing.wait()
            return web.Response(status=503)
        # one transaction status per transaction of the message, in its order
        return self._report(msg_id, [self.orders[tx.order_no] for tx in txs], 200)

    async def status(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._verify(request, await request.read())) is not None:
            return denied
        await self._latency()
        order_no = request.match_info["order_no"]
        order = self.orders.get(order_no)
        if order is None:
            missing = wire.TxStatus(order_no, "RJCT", "NOOR")
            return self._signed(self._pain002("?", [missing]), 404)
        return self._report(order.msg_id, [order], 200)

    async def statement(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._verify(request, await request.read())) is not None:
            return denied
        try:
            day = date.fromisoformat(request.match_info["day"])
        except ValueError:
            return web.Response(status=400)
        await self._latency()
        booked = sorted(
            (
                (o.tx.order_no, o.bank_ref, o.tx.amount, o.finished_at)
                for o in self.orders.values()
                if o.state == "succeeded"
                and o.finished_at is not None
                and o.finished_at.astimezone(self.zone).date() == day
            ),
            key=lambda t: (t[3], t[0]),
        )
        # signed as every answer is: the document is rendered twice, once for its signature
        # (the headers go first) and once to send, so that a large day is never held whole
        msg_id = f"STMT-{day.isoformat()}"
        headers = wire.sign_statement(
            self.opts.secret,
            wire.camt053(msg_id, booked),
            timestamp=str(int(time.time())),
            nonce=secrets.token_hex(16),
        )
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        for chunk in wire.camt053(msg_id, booked):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def oracle(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(
            [
                {
                    "order_no": o.tx.order_no,
                    "amount": o.tx.amount,
                    "account_no": o.tx.account_no,
                    "executions": o.executions,
                    "status": o.state,
                    "msg_id": o.msg_id,
                }
                for o in self.orders.values()
            ]
        )

    # --- helpers ----------------------------------------------------------------------

    def _tx(self, o: _Order) -> wire.TxStatus:
        code, reason = _CODES[o.state]
        return wire.TxStatus(o.tx.order_no, code, reason, o.bank_ref, o.tx.amount, o.finished_at)

    def _pain002(self, msg_id: str, statuses: list[wire.TxStatus]) -> bytes:
        return wire.pain002(
            msg_id=f"R{next(self._refs):010d}",
            original_msg_id=msg_id,
            statuses=statuses,
            created=datetime.now(self.zone),
        )

    def _report(self, msg_id: str, orders: list[_Order], status: int) -> web.Response:
        return self._signed(self._pain002(msg_id, [self._tx(o) for o in orders]), status)

    def _signed(self, body: bytes, status: int) -> web.Response:
        headers = wire.signed_headers(
            self.opts.secret, body, timestamp=str(int(time.time())), nonce=secrets.token_hex(16)
        )
        return web.Response(status=status, body=body, headers=headers)

    def _verify(self, request: web.Request, body: bytes) -> web.Response | None:
        try:
            wire.verify(self.opts.secret, request.headers, body, time.time())
        except wire.SignatureError as e:
            return web.Response(status=401, text=e.reason)
        return None

    async def _settle(self, order: _Order, fate: _Fate) -> None:
        await asyncio.sleep(self.opts.settle_ms / 1000)
        if fate.fail:
            order.state = "failed"
        elif order.executions == 0:
            order.executions += 1  # the one place money leaves the bank
            order.state = "succeeded"
        order.finished_at = datetime.now(self.zone)
        await self._call_back(
            order, order.tx.order_no, lost=fate.callback_lost, duplicated=fate.callback_duplicated
        )

    async def _deliver(self, order: _Order) -> None:
        url = order.callback_url
        if url is None or self.session is None:
            return
        for attempt in range(self.opts.callback_attempts):
            body = self._pain002(order.msg_id, [self._tx(order)])
            headers = wire.signed_headers(
                self.opts.secret, body, timestamp=str(int(time.time())), nonce=secrets.token_hex(16)
            )
            try:
                async with self.session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1 * 2**attempt)


BANK = web.AppKey("iso20022_bank", IsoBank)


def create_bank_app(opts: IsoBankOptions) -> web.Application:
    bank = IsoBank(opts)
    app = web.Application()
    app[BANK] = bank

    mount(app, bank)
    app.router.add_post(opts.upload_path, bank.upload)
    app.router.add_get(opts.status_path, bank.status)
    app.router.add_get(opts.statement_path, bank.statement)
    app.router.add_get("/_sandbox/payouts", bank.oracle)
    return app


async def run_bank(
    opts: IsoBankOptions, *, host: str = "127.0.0.1", port: int, stop: asyncio.Event
) -> None:
    """Serve the bank until `stop` is set (`fundgate sandbox-bank --protocol iso20022`)."""
    await serve(create_bank_app(opts), host=host, port=port, stop=stop)
