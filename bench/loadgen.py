"""The load generator of the benchmarks: a separate process with its own core budget (one
asyncio loop: one core at most), posting distinct disbursements (distinct `txn_no`,
whitelisted payees `BB0..BB{borrowers-1}`) to one or more gateways.

    python -m bench.loadgen --url http://127.0.0.1:8700 [--url ...] --mode intake
                            [--concurrency 64] [--duration 20] [--warmup 5]
                            [--funder-hint bank-a --funder-hint bank-b ...]

Modes:

    intake  `--concurrency` clients, each posting the next disbursement as soon as the last
            is answered (closed loop); client k talks to gateway k mod (number of --url); or
            open loop with `--rate R`, as below (over at most `--concurrency` connections)
    floor   the same load against bench/floor.py
    e2e     the load generator is also the lending core: it serves the outcome webhook on
            `--webhook-port` (signatures checked) and a disbursement is terminal when its
            signed webhook arrives. Either closed loop: the clients post as in intake mode but
            at most `--window` disbursements are accepted and not yet terminal at any time (the
            pipeline's saturation throughput); or open loop with `--rate R`: one submission
            every 1/R s on schedule, whatever the answers (latency at a given load, counted
            from the scheduled time, so a slow answer cannot hide the queue behind it)

`--funder-hint` (repeatable) sets `funder_hint`, round-robin over the requests.

Output, one JSON line each: `{"event": "start"}` when the warm-up ends, `{"event": "stop"}`
when the measured window ends (the caller reads CPU counters at both), then the result:
accepted/s in the window, intake p50/p99 latency in ms, answers by status; for e2e also
terminal outcomes per second in the window (`e2e_rps`, succeeded only), submission-to-
terminal p50/p99/max of the disbursements submitted in the window (after waiting up to
`--drain` seconds for their outcomes), how many did not finish, and the window in unix time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

ACCOUNT_BASE = 6222020200000000000
TERMINAL = ("succeeded", "failed")


def borrower(i: int) -> tuple[str, dict[str, str]]:
    return f"BB{i}", {
        "account_no": str(ACCOUNT_BASE + i),
        "account_name": "张三",
        "bank_code": "ICBC",
    }


def body(txn_no: str, i: int, funder_hint: str | None = None) -> dict[str, Any]:
    bid, account = borrower(i)
    return {
        "txn_no": txn_no,
        "loan_id": "L" + txn_no,
        "borrower_id": bid,
        "payee": account,
        "amount": 1_000_000,
        "currency": "CNY",
        "term": {"unit": "month", "count": 12},
        "apr": "0.1800",
        "product": "consumer-standard",
        "repayment": "equal_installment",
        "funder_hint": funder_hint,
        "metadata": {},
    }


def percentile(sorted_values: list[float], p: float) -> float:
    """The p-quantile of sorted seconds, in ms (0 when empty)."""
    if not sorted_values:
        return 0.0
    return 1000 * sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(msg).decode() + "\n")
    sys.stdout.flush()


@dataclass(slots=True)
class _Txn:
    t0: float  # sent (closed loop) or due (open loop), perf_counter seconds
    accepted: bool = False
    done_at: float | None = None
    status: str | None = None
    released: bool = False


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.urls: list[str] = args.url
        self.hints: list[str | None] = args.funder_hint or [None]
        self.headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
        self.path = "/" if args.mode == "floor" else "/v1/disbursements"
        self.start = time.perf_counter()
        self.measure_from = self.start + args.warmup
        self.stop_at = self.measure_from + args.duration
        self.unix_offset = time.time() - time.perf_counter()
        self.sequence = itertools.count()
        # intake answers in the window
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        # e2e
        self.txns: dict[str, _Txn] = {}
        self.window = asyncio.Semaphore(args.window)
        self.e2e: list[float] = []
        self.completed: Counter[str] = Counter()  # terminal in the window, by status
        self.hooks: Counter[str] = Counter()
        self.in_flight = 0  # submitted and not yet released (refused, or accepted and terminal)
        self.skipped = 0

    # --- requests ----------------------------------------------------------------------

    def payload(self, txn_no: str, k: int, n: int) -> bytes:
        i = next(self.sequence)
        hint = self.hints[i % len(self.hints)]
        return orjson.dumps(body(txn_no, (k * 7919 + n) % self.args.borrowers, hint))

    async def post(self, session: aiohttp.ClientSession, k: int, n: int, t0: float) -> int:
        txn_no = f"{self.args.prefix}-{k}-{n}"
        data = self.payload(txn_no, k, n)
        try:
            async with session.post(
                self.urls[k % len(self.urls)] + self.path, data=data, headers=self.headers
            ) as r:
                await r.read()
                status = r.status
        except aiohttp.ClientError:
            status = 0  # connection-level failure
        if t0 >= self.measure_from and t0 < self.stop_at:
            self.statuses[status] += 1
            if status in (200, 201):
                self.latencies.append(time.perf_counter() - t0)
        return status

    async def closed_client(self, k: int, session: aiohttp.ClientSession) -> None:
        for n in itertools.count(1):
            if time.perf_counter() >= self.stop_at:
                return
            await self.post(session, k, n, time.perf_counter())

    # --- e2e ---------------------------------------------------------------------------

    def _release(self, t: _Txn) -> None:
        if not t.released:
            t.released = True
            self.in_flight -= 1
            if not self.args.rate:
                self.window.release()

    async def e2e_one(self, session: aiohttp.ClientSession, k: int, n: int, t0: float) -> None:
        txn_no = f"{self.args.prefix}-{k}-{n}"
        t = self.txns[txn_no] = _Txn(t0)  # before the POST: the webhook may come first
        self.in_flight += 1
        status = await self.post(session, k, n, t0)
        if status in (200, 201):
            t.accepted = True
            if t.done_at is not None:
                self._release(t)
        else:
            self._release(t)
            del self.txns[txn_no]

    async def e2e_client(self, k: int, session: aiohttp.ClientSession) -> None:
        for n in itertools.count(1):
            await self.window.acquire()
            now = time.perf_counter()
            if now >= self.stop_at:
                self.window.release()
                return
            await self.e2e_one(session, k, n, now)

    async def intake_one(self, session: aiohttp.ClientSession, k: int, n: int, t0: float) -> None:
        self.in_flight += 1
        try:
            await self.post(session, k, n, t0)
        finally:
            self.in_flight -= 1

    async def open_loop(
        self,
        session: aiohttp.ClientSession,
        one: Callable[[aiohttp.ClientSession, int, int, float], Coroutine[Any, Any, None]],
    ) -> None:
        """One submission every 1/rate s on schedule (latency from the scheduled time), at most
        `--window` outstanding (beyond that the schedule is not kept: `skipped`)."""
        rate = self.args.rate
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while True:
            now = time.perf_counter()
            due_count = int((min(now, self.stop_at) - self.start) * rate)
            while i < due_count:
                due = self.start + i / rate
                if self.in_flight >= self.args.window:
                    if due >= self.measure_from:
                        self.skipped += 1  # overloaded: the schedule is not kept
                else:
                    task = asyncio.create_task(one(session, i % len(self.urls), i, due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
            if now >= self.stop_at:
                break
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)

    async def webhook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        ts = request.headers.get("X-Fundgate-Timestamp", "")
        expected = hmac.new(
            self.args.webhook_secret.encode(), ts.encode() + b"." + raw, hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-Fundgate-Signature", "")):
            self.hooks["bad_signature"] += 1
            return web.Response(status=401)
        now = time.perf_counter()
        event = orjson.loads(raw)
        self.hooks["received"] += 1
        t = self.txns.get(event.get("txn_no", ""))
        status = event.get("status")
        if t is None:
            self.hooks["not_ours"] += 1  # e.g. a late one from an earlier run
        elif t.done_at is not None:
            self.hooks["duplicate"] += 1  # at least once: the lending core dedups
        elif status in TERMINAL:
            t.done_at, t.status = now, status
            if self.measure_from <= now < self.stop_at:
                self.completed[status] += 1
            if self.measure_from <= t.t0 < self.stop_at:
                self.e2e.append(now - t.t0)
            if t.accepted:
                self._release(t)
        return web.Response(status=200)

    async def drain(self) -> int:
        """Wait for the outcomes of the disbursements submitted in the window; how many are
        still open when `--drain` seconds have passed."""

        def open_ones() -> int:
            return sum(
                1
                for t in self.txns.values()
                if t.accepted and t.done_at is None and self.measure_from <= t.t0 < self.stop_at
            )

        deadline = time.perf_counter() + self.args.drain
        while open_ones() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        return open_ones()

    # --- the run -------------------------------------------------------------------------

    async def markers(self) -> None:
        await asyncio.sleep(max(self.measure_from - time.perf_counter(), 0))
        emit({"event": "start"})
        await asyncio.sleep(max(self.stop_at - time.perf_counter(), 0))
        emit({"event": "stop"})

    async def run(self) -> dict[str, Any]:
        a = self.args
        runner: web.AppRunner | None = None
        if a.mode == "e2e":
            app = web.Application()
            app.router.add_post("/events", self.webhook)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", a.webhook_port, backlog=1024).start()
        marks = asyncio.create_task(self.markers())
        conn = aiohttp.TCPConnector(limit=a.concurrency)
        not_terminal = 0
        try:
            async with aiohttp.ClientSession(connector=conn) as session:
                if a.mode != "e2e" and a.rate:
                    await self.open_loop(session, self.intake_one)
                elif a.mode != "e2e":
                    clients = [self.closed_client(k, session) for k in range(a.concurrency)]
                    await asyncio.gather(*clients)
                elif a.rate:
                    await self.open_loop(session, self.e2e_one)
                else:
                    clients = [self.e2e_client(k, session) for k in range(a.concurrency)]
                    # clients wait for room in the window: bounded if the pipeline stalls
                    left = self.stop_at - time.perf_counter() + a.drain
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.gather(*clients), max(left, 1))
                await marks
                if a.mode == "e2e":
                    not_terminal = await self.drain()
        finally:
            if runner is not None:
                await runner.cleanup()
        self.latencies.sort()
        out: dict[str, Any] = {
            "mode": a.mode,
            "concurrency": a.concurrency,
            "gateways": len(self.urls),
            "ok": len(self.latencies),
            "rps": len(self.latencies) / a.duration,
            "p50_ms": percentile(self.latencies, 0.50),
            "p99_ms": percentile(self.latencies, 0.99),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "window_unix": [self.measure_from + self.unix_offset, self.stop_at + self.unix_offset],
        }
        if a.rate:
            out |= {"offered_rps": a.rate, "skipped": self.skipped}
        if a.mode == "e2e":
            self.e2e.sort()
            out |= {
                "offered_rps": a.rate,
                "window": a.window,
                "e2e_rps": self.completed["succeeded"] / a.duration,
                "completed": dict(self.completed),
                "e2e_p50_ms": percentile(self.e2e, 0.50),
                "e2e_p99_ms": percentile(self.e2e, 0.99),
                "e2e_max_ms": percentile(self.e2e, 1.0),
                "finished": len(self.e2e),
                "not_terminal": not_terminal,
                "skipped": self.skipped,
                "webhooks": dict(self.hooks),
            }
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", action="append", required=True, help="a gateway (repeatable)")
    p.add_argument("--token", default="demo-token")
    p.add_argument("--mode", choices=["intake", "floor", "e2e"], default="intake")
    p.add_argument("--concurrency", type=int, default=64, help="clients (open loop: connections)")
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--borrowers", type=int, default=1000)
    p.add_argument("--prefix", default=f"B{int(time.time())}")
    p.add_argument("--funder-hint", action="append", help="funder_hint, round-robin (repeatable)")
    e2e = p.add_argument_group("e2e")
    e2e.add_argument("--webhook-port", type=int, default=8799)
    e2e.add_argument("--webhook-secret", default="bench-webhook-secret")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: submissions per second")
    e2e.add_argument("--window", type=int, default=2048,
                     help="max accepted and not terminal (open loop: max outstanding)")  # fmt: skip
    e2e.add_argument("--drain", type=float, default=30, help="seconds to wait for outcomes")
    args = p.parse_args()
    emit(asyncio.run(Run(args).run()))


if __name__ == "__main__":
    main()
