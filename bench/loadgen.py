"""The load generator of the intake benchmark: a separate process (its own core budget: one
asyncio loop, one core at most) posting distinct disbursements from N concurrent clients.

    python -m bench.loadgen --url http://127.0.0.1:8700 --concurrency 64 --duration 20

Prints one JSON line: requests/s after the warm-up, p50/p99 latency in ms, errors by status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

import aiohttp

ACCOUNT_BASE = 6222020200000000000


def borrower(i: int) -> tuple[str, dict[str, str]]:
    return f"BB{i}", {
        "account_no": str(ACCOUNT_BASE + i),
        "account_name": "张三",
        "bank_code": "ICBC",
    }


def body(txn_no: str, i: int) -> dict[str, Any]:
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
        "funder_hint": None,
        "metadata": {},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    start = time.perf_counter()
    measure_from = start + args.warmup
    stop_at = measure_from + args.duration
    path = "/v1/disbursements" if args.mode == "intake" else "/"

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            n += 1
            payload = json.dumps(body(f"{args.prefix}-{k}-{n}", (k * 7919 + n) % args.borrowers))
            t0 = time.perf_counter()
            try:
                async with session.post(args.url + path, data=payload, headers=headers) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status = 0  # connection-level failure
            t1 = time.perf_counter()
            if t0 >= measure_from:
                statuses[status] += 1
                if status in (200, 201):
                    latencies.append(t1 - t0)

    conn = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(client(k, session) for k in range(args.concurrency)))
    latencies.sort()

    def pct(p: float) -> float:
        return (
            1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0
        )

    return {
        "mode": args.mode,
        "concurrency": args.concurrency,
        "ok": len(latencies),
        "rps": len(latencies) / args.duration,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--token", default="demo-token")
    p.add_argument("--mode", choices=["intake", "floor"], default="intake")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--borrowers", type=int, default=1000)
    p.add_argument("--prefix", default=f"B{int(time.time())}")
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
