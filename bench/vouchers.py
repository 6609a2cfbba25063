"""Voucher verification: vouchers per second of `fundgate audit verify` and its peak memory,
for chains of N vouchers, against the floor of reading and hashing the same rows.

    .venv/bin/python -m bench.vouchers [--events 100000 --events 1000000] [--repeat 1]
                                       [--database-url URL] [--keep]

Starts embedded PostgreSQL (durable) unless a URL is given (an empty database: the chain is
built from scratch), then builds the chain:

- realistic events first: `fundgate serve --role api` accepts disbursements through the API
  for a few seconds (whitelist changes, acceptances and their ledger postings), and
  `gateway.vouchers.seal_once` (the sealer's own code) chains them;
- then copies of those events, with fresh `txn_no`s, are appended already sealed: the next
  `seq`, `prev_hash` and `hash = gateway.vouchers.voucher_hash(...)` computed here, written
  with COPY, until the chain holds N vouchers. Verification recomputes every hash, so the
  chain must be right for it to pass; the run fails otherwise.

For each N, after one untimed pass that warms the caches, each contender runs as its own
process, and its peak memory is that process's VmHWM (peak RSS since its exec):

    floor      a server-side cursor over the same rows (`seq, kind, at, event, prev_hash,
               hash`, 10,000 prefetched) and one sha256 per row in Python: reading + hashing
    verify()   `gateway.vouchers.verify(conn)` in a bare process: the chain check alone
    CLI        `fundgate audit verify` as an operator runs it (its `main`, in the child: the
               count, the progress bar, the result recorded), timed from its import

The ratio verify() / floor is the figure to trust on this shared machine; memory must not grow
with N (the chain is streamed a page at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/vouchers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import (
    ROOT,
    Database,
    FunderSpec,
    Procs,
    config_toml,
    free_port,
    fundgate_env,
    load_average,
    loadgen,
    register,
    wait_up,
    workdir,
)

COPY_CHUNK = 50_000
COLUMNS = ["at", "kind", "txn_no", "event", "seq", "prev_hash", "hash", "sealed_at"]


# ------------------------------------------------------------------------- the contenders


async def floor(url: str) -> int:
    """Read every sealed voucher in seq order and hash it: the least any verifier does."""
    import asyncpg

    conn = await asyncpg.connect(url)
    n = 0
    try:
        async with conn.transaction():
            async for r in conn.cursor(
                "SELECT seq, kind, at, event, prev_hash, hash FROM voucher_events"
                " WHERE seq IS NOT NULL ORDER BY seq",
                prefetch=10_000,
            ):
                hashlib.sha256(
                    f"{r['prev_hash']}{r['kind']}{r['at'].isoformat()}{r['event']}".encode()
                ).hexdigest()
                n += 1
    finally:
        await conn.close()
    return n


async def bare_verify(url: str) -> int:
    import asyncpg

    from gateway.vouchers import verify

    conn = await asyncpg.connect(url)
    try:
        result = await verify(conn)
    finally:
        await conn.close()
    if not result.ok:
        raise SystemExit(f"chain broken at {result.first_broken}: {result.problem}")
    return result.checked


def peak_rss_mb() -> float:
    """This process's peak resident memory since its exec (VmHWM). Not wait4's ru_maxrss:
    Linux carries that across exec from the parent at fork, so it would show the driver's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(kind: str, url: str) -> None:
    """One contender in this (fresh) process; prints rows, seconds and peak memory."""
    started = time.perf_counter()
    if kind == "cli":
        from gateway.cli import main as fundgate

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = fundgate(["audit", "verify"])  # FUNDGATE_DATABASE_URL names the database
        if code != 0:
            raise SystemExit(f"fundgate audit verify: exit {code}: {out.getvalue()}")
        # "voucher chain intact: N sealed vouchers verified, ..."
        rows = int(out.getvalue().split("verified")[0].split()[-3])
    else:
        rows = asyncio.run(floor(url) if kind == "floor" else bare_verify(url))
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_mb": peak_rss_mb()}))


@dataclass
class Run:
    name: str
    n: int
    rows: int
    wall: float  # the child process, start-up included
    inner: float  # inside the child, from the start of the work (imports of the CLI included)
    peak_mb: float

    @property
    def rate(self) -> float:
        return self.rows / self.inner


def measure(name: str, n: int, cmd: list[str], env: dict[str, str]) -> Run:
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return Run(name, n, int(res["rows"]), wall, float(res["seconds"]), float(res["peak_mb"]))


# ------------------------------------------------------------------------------ the chain


async def seal_all(url: str) -> int:
    import asyncpg

    from gateway.vouchers import seal_once

    conn = await asyncpg.connect(url)
    total = 0
    try:
        while sealed := await seal_once(conn):
            total += sealed
    finally:
        await conn.close()
    return total


async def grow(url: str, target: int) -> tuple[int, float]:
    """Append sealed copies of the realistic events until the chain holds `target`;
    (vouchers added, seconds)."""
    import asyncpg

    from gateway.vouchers import voucher_hash

    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        templates = await conn.fetch(
            "SELECT kind, txn_no, event FROM voucher_events WHERE seq IS NOT NULL ORDER BY seq"
        )
        head = await conn.fetchrow(
            "SELECT seq, hash FROM voucher_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1"
        )
        assert templates, "no sealed events to copy"
        assert head is not None
        seq, prev = int(head["seq"]), str(head["hash"])
        sealed_at = datetime.now(UTC)
        base = sealed_at - timedelta(days=1)
        added = 0
        while seq < target:
            rows: list[tuple[Any, ...]] = []
            for _ in range(min(COPY_CHUNK, target - seq)):
                seq += 1
                t = templates[seq % len(templates)]
                txn_no = None if t["txn_no"] is None else f"V{seq:09d}"
                event = t["event"] if txn_no is None else t["event"].replace(t["txn_no"], txn_no)
                at = base + timedelta(microseconds=seq)
                h = voucher_hash(prev, seq, t["kind"], at, event)
                rows.append((at, t["kind"], txn_no, event, seq, prev, h, sealed_at))
                prev = h
            await conn.copy_records_to_table("voucher_events", records=rows, columns=COLUMNS)
            added += len(rows)
        await conn.execute("VACUUM ANALYZE voucher_events")
    finally:
        await conn.close()
    return added, time.perf_counter() - started


def seed(args: argparse.Namespace, db: Database, procs: Procs) -> int:
    """Realistic vouchers through the API, sealed by the sealer's code; how many."""
    config = procs.work / "bench.toml"
    config.write_text(config_toml([FunderSpec("bank-a")]))
    port = free_port()
    gw = procs.gateway(port, "api", fundgate_env(db.url, config), pool_size=8)
    wait_up(f"http://127.0.0.1:{port}/readyz")
    register(f"http://127.0.0.1:{port}", 50)
    loadgen(
        ["--url", f"http://127.0.0.1:{port}", "--mode", "intake", "--concurrency", "8",
         "--duration", str(args.seed_seconds), "--warmup", "0", "--borrowers", "50",
         "--prefix", "VS"],
        groups={}, database_url=None,
    )  # fmt: skip
    procs.stop([gw])
    return asyncio.run(seal_all(db.url))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, action="append", help="N (repeatable); default 100k, 1M")
    p.add_argument("--repeat", type=int, default=1, help="runs per contender; the best counts")
    p.add_argument("--seed-seconds", type=float, default=3, help="API intake for real events")
    p.add_argument("--database-url", default=os.environ.get("FUNDGATE_DATABASE_URL"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, db)")
    p.add_argument("--child", choices=["floor", "verify", "cli"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.url)
        return 0
    sizes = sorted(args.events or [100_000, 1_000_000])

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load_average()}", file=sys.stderr)
    runs: list[Run] = []
    with (
        workdir("fundgate-bench-vouchers-", args.keep) as work,
        Database(work, args.database_url) as db,
    ):
        procs = Procs(work)
        try:
            db.migrate()
            real = seed(args, db, procs)
            print(f"{real:,} vouchers from the API, sealed", file=sys.stderr)
            env = fundgate_env(db.url, work / "bench.toml")
            me = [sys.executable, "-m", "bench.vouchers", "--url", db.url, "--child"]
            for n in sizes:
                added, secs = asyncio.run(grow(db.url, n))
                print(f"N = {n:,}: {added:,} vouchers appended in {secs:.1f} s", file=sys.stderr)
                measure("warm-up", n, [*me, "floor"], env)
                for _ in range(args.repeat):
                    for name, cmd in (
                        ("floor", [*me, "floor"]),
                        ("verify()", [*me, "verify"]),
                        ("CLI", [*me, "cli"]),
                    ):
                        r = measure(name, n, cmd, env)
                        print(f"  {name}: {r.rows:,} in {r.wall:.1f} s wall, "
                              f"{r.rate:,.0f}/s, {r.peak_mb:.0f} MB", file=sys.stderr)  # fmt: skip
                        runs.append(r)
        finally:
            procs.close()

    print("\n| N | contender | vouchers | wall s | vouchers/s | peak RSS MB | vs floor |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    problems = []
    for n in sizes:
        best = {
            name: max((r for r in runs if r.n == n and r.name == name), key=lambda r: r.rate)
            for name in ("floor", "verify()", "CLI")
        }
        for name, r in best.items():
            if r.rows != n:
                problems.append(f"{name} at N = {n:,} read {r.rows:,} vouchers")
            print(f"| {n:,} | {name} | {r.rows:,} | {r.wall:.1f} | {r.rate:,.0f} | "
                  f"{r.peak_mb:.0f} | {r.rate / best['floor'].rate:.2f} |")  # fmt: skip
    print(
        "\nvouchers/s inside each process, from the start of its work (for the CLI: from the "
        "import of gateway.cli); peak RSS = the process's VmHWM"
    )
    for name in ("floor", "verify()", "CLI"):
        peaks = [max(r.peak_mb for r in runs if r.n == n and r.name == name) for n in sizes]
        print(f"{name} peak MB by N: " + ", ".join(f"{p:.0f}" for p in peaks))
    for line in problems:
        print(f"PROBLEM: {line}")
    print(f"load average after the run: {load_average()}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
