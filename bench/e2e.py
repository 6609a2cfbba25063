"""End to end: disbursements per second from submission to `succeeded` (intake, dispatch,
the bank's call and its signed callback, the outcome webhook), against the intake rate of
the same gateways measured in the same run.

    .venv/bin/python -m bench.e2e [--duration 15] [--warmup 5] [--concurrency 64]
                                  [--gateways 1 | --scale 1,2,3] [--window 256]
                                  [--latency-ms 5] [--settle-ms 20] [--database-url URL]
                                  [--profile]   # py-spy on the first gateway, saturated

What runs, all as separate processes over loopback: embedded PostgreSQL (durable) unless a
URL is given (its role must be allowed to create a sibling database `<name>_intake`); one
sandbox bank (`fundgate sandbox-bank`, no faults, `--latency-ms` before every answer,
`--settle-ms` from acceptance to execution and callback; the callback goes to the gateway
that sent the payout); N gateways; the load generator (bench/loadgen.py, one
asyncio process, at most one core), which is also the lending core receiving the signed
outcome webhooks.

For each gateway count N:

    intake     N `fundgate serve --role api` on a second database of the same server (their
               accepted disbursements are never dispatched, so they must not reach the next
               phase): accepted/s at `--concurrency` clients, as bench/intake.py measures it
    saturated  N `fundgate serve --role all` (intake and workers in each process): the same
               clients, but at most `--window` disbursements accepted and not yet terminal at
               any time; the rate is succeeded outcomes per second in the measured window (by
               webhook arrival, and by the commit of `succeeded` in the database). The window
               (256) is several times rate x latency here, so it does not bind, yet small
               enough that the pipeline is in a steady state after the warm-up (with a large
               one the stages drain a backlog at different speeds and the two rates differ)
    half load  the same gateways, open loop at half the saturated rate: submission-to-
               terminal p50/p99 (lending core's view: until the signed webhook arrives; and the
               gateway's: `created_at` to the `succeeded` commit, from the database)

CPU per disbursement is the CPU of each process group in the window over the disbursements
accepted (intake) or committed `succeeded` (e2e) in it.

A disbursement is terminal for the load generator when its signed webhook arrives; the
webhook comes from the notifier's outbox, so that time includes the notifier's claim loop
(it polls; the database figures show the gateway's own share). After the run every
disbursement of the run must be terminal and the bank's oracle (`/_sandbox/payouts`) must show every
succeeded disbursement's order executed exactly once, no other order executed, amounts as
accepted; the run exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/e2e.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import (
    BANK_SECRET,
    WEBHOOK_SECRET,
    Database,
    FunderSpec,
    Measured,
    Procs,
    Profile,
    config_toml,
    cpu_seconds,
    free_port,
    fundgate_env,
    get_json,
    load_average,
    loadgen,
    register,
    wait_up,
    workdir,
)


@dataclass
class Step:
    gateways: int
    intake: Measured
    saturated: Measured
    saturated_db: dict[str, Any]
    half: Measured | None
    half_db: dict[str, Any] | None
    profile: list[tuple[str, float]]


async def db_figures(url: str, prefix: str, window: list[float]) -> dict[str, Any]:
    """The gateway's own view of a phase: `succeeded` commits in the window per second, and
    created-to-succeeded p50/p99 of the disbursements created in the window."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            """
            SELECT count(*) FILTER (WHERE status = 'succeeded'
                                      AND updated_at >= to_timestamp($2)
                                      AND updated_at < to_timestamp($3)) AS done,
                   percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
                       ORDER BY extract(epoch FROM updated_at - created_at))
                       FILTER (WHERE status = 'succeeded' AND created_at >= to_timestamp($2)
                                 AND created_at < to_timestamp($3)) AS pct
              FROM disbursements WHERE txn_no LIKE $1 || '%'
            """,
            prefix,
            window[0],
            window[1],
        )
    finally:
        await conn.close()
    assert row is not None
    pct = row["pct"] or [0.0, 0.0]
    return {
        "rps": row["done"] / (window[1] - window[0]),
        "p50_ms": 1000 * pct[0],
        "p99_ms": 1000 * pct[1],
    }


async def wait_terminal(url: str, run: str, timeout: float) -> int:
    """Wait until no disbursement of this run (`txn_no` prefix) is open; how many still are
    after `timeout` seconds."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            left: int = await conn.fetchval(
                "SELECT count(*) FROM disbursements"
                " WHERE txn_no LIKE $1 || '%' AND status NOT IN ('succeeded', 'failed')",
                run,
            )
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def check_oracle(url: str, run: str, bank_url: str) -> tuple[dict[str, int], list[str]]:
    """This run's disbursements against the bank's executions (the bank is this run's
    alone); (counts, violations)."""
    import asyncpg

    orders = {o["order_no"]: o for o in get_json(f"{bank_url}/_sandbox/payouts", timeout=120)}
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT d.txn_no, d.status, d.amount, a.order_no, a.status AS attempt_status"
            "  FROM disbursements d JOIN attempts a ON a.disbursement_id = d.id"
            " WHERE d.txn_no LIKE $1 || '%'",
            run,
        )
    finally:
        await conn.close()
    problems: list[str] = []
    executed_per_txn: Counter[str] = Counter()
    status_of: dict[str, str] = {}
    known: set[str] = set()
    for r in rows:
        known.add(r["order_no"])
        status_of[r["txn_no"]] = r["status"]
        o = orders.get(r["order_no"])
        executions = o["executions"] if o else 0
        if executions > 1:
            problems.append(f"order {r['order_no']} executed {executions} times")
        if executions:
            executed_per_txn[r["txn_no"]] += executions
            if o is not None and o["amount"] != r["amount"]:
                problems.append(
                    f"order {r['order_no']}: bank paid {o['amount']}, not {r['amount']}"
                )
    for txn_no, status in status_of.items():
        paid = executed_per_txn[txn_no]
        if status == "succeeded" and paid != 1:
            problems.append(f"{txn_no} succeeded with {paid} executed orders")
        elif status != "succeeded" and paid:
            problems.append(f"{txn_no} is {status} but the bank executed {paid} orders")
    strangers = [o for o, v in orders.items() if v["executions"] and o not in known]
    problems += [f"order {o} executed at the bank, unknown to fundgate" for o in strangers]
    statuses = Counter(status_of.values())
    counts = {
        "disbursements": len(status_of),
        "succeeded": statuses["succeeded"],
        "failed": statuses["failed"],
        "open": len(status_of) - statuses["succeeded"] - statuses["failed"],
        "bank_orders": len(orders),
        "executed": sum(1 for o in orders.values() if o["executions"]),
    }
    return counts, problems


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, db: Database, procs: Procs) -> None:
        self.args, self.work, self.db, self.procs = args, work, db, procs
        self.bank_port, self.hook_port = free_port(), free_port()
        self.bank: subprocess.Popen[bytes] | None = None
        self.intake_url = ""
        self.registered: set[str] = set()
        self.run = f"E{int(time.time())}"  # every txn_no of this run starts so

    def start_bank(self) -> None:
        a = self.args
        self.bank = self.procs.start(
            "bank",
            ["-m", "gateway.cli", "sandbox-bank", "--port", str(self.bank_port),
             "--funder-id", "bank-a", "--callback-url", "", "--secret", BANK_SECRET,
             "--seed", "1", "--latency-ms", str(a.latency_ms), "--settle-ms", str(a.settle_ms)],
            {**os.environ, "FUNDGATE_LOG_LEVEL": "warning"},
        )  # fmt: skip
        wait_up(f"http://127.0.0.1:{self.bank_port}/_sandbox/health")

    def gateways(
        self, n: int, role: str, url: str
    ) -> tuple[list[int], list[subprocess.Popen[bytes]]]:
        """N gateways on `url`; with workers, each names itself as public_url, so the bank's
        callback for a payout returns to the process that sent it."""
        ports = [free_port() for _ in range(n)]
        running = []
        for p in ports:
            config = self.work / f"{role}-{p}.toml"
            funder = FunderSpec("bank-a", base_url=f"http://127.0.0.1:{self.bank_port}")
            config.write_text(
                config_toml(
                    [funder],
                    public_url=f"http://127.0.0.1:{p}",
                    webhook_url=f"http://127.0.0.1:{self.hook_port}/events",
                    http_transport=self.args.http_transport,
                )
            )
            running.append(self.procs.gateway(p, role, fundgate_env(url, config), pool_size=32))
        for p in ports:
            wait_up(f"http://127.0.0.1:{p}/readyz")
        if url not in self.registered:
            register(f"http://127.0.0.1:{ports[0]}", self.args.borrowers)
            self.registered.add(url)
        return ports, running

    def groups(self, gws: list[subprocess.Popen[bytes]]) -> dict[str, Callable[[], float]]:
        pids = [g.pid for g in gws]
        assert self.bank is not None
        bank = self.bank.pid
        return {
            "gateways": lambda: cpu_seconds(pids),
            "postgres": self.db.cpu,
            "bank": lambda: cpu_seconds([bank]),
        }

    def loadgen_args(self, ports: list[int], mode: str, prefix: str, *extra: str) -> list[str]:
        a = self.args
        out = ["--mode", mode, "--concurrency", str(a.concurrency),
               "--duration", str(a.duration), "--warmup", str(a.warmup),
               "--borrowers", str(a.borrowers), "--prefix", prefix,
               "--webhook-port", str(self.hook_port), "--webhook-secret", WEBHOOK_SECRET,
               "--drain", str(a.drain), *extra]  # fmt: skip
        for p in ports:
            out += ["--url", f"http://127.0.0.1:{p}"]
        return out

    def step(self, n: int) -> Step:
        a = self.args
        ports, gws = self.gateways(n, "api", self.intake_url)
        intake = loadgen(
            self.loadgen_args(ports, "intake", f"{self.run}I{n}-"),
            groups=self.groups(gws),
            database_url=self.intake_url,
        )
        self.procs.stop(gws)
        say(f"{n} gateway(s): intake {intake.result['rps']:,.0f}/s")

        ports, gws = self.gateways(n, "all", self.db.url)
        prefix = f"{self.run}S{n}-"
        spy = Profile(gws[0].pid, a.duration - 1, self.work / f"profile-{n}.txt")
        sat = loadgen(
            self.loadgen_args(ports, "e2e", prefix, "--window", str(a.window)),
            groups=self.groups(gws),
            database_url=self.db.url,
            on_start=spy.start if a.profile else None,
            on_stop=spy.stop if a.profile else None,
        )
        sat_db = asyncio.run(db_figures(self.db.url, prefix, sat.result["window_unix"]))
        say(f"{n} gateway(s): saturated e2e {sat.result['e2e_rps']:,.0f}/s "
            f"(database {sat_db['rps']:,.0f}/s); cores {sat.cpu.summary()}")  # fmt: skip
        for line in sat.waits.top_queries(6):
            say(f"    {line}")
        if sat.stats is not None:
            say(f"    database work per disbursement: {sat.stats.per(sat_db['rps'] * a.duration)}")
        half = half_db = None
        if not a.no_half_load and sat.result["e2e_rps"] > 0:
            rate = sat.result["e2e_rps"] / 2
            prefix = f"{self.run}H{n}-"
            half = loadgen(
                self.loadgen_args(ports, "e2e", prefix, "--rate", f"{rate:.1f}",
                                  "--window", str(max(a.window, 4096))),
                groups=self.groups(gws),
                database_url=self.db.url,
            )  # fmt: skip
            half_db = asyncio.run(db_figures(self.db.url, prefix, half.result["window_unix"]))
            say(f"{n} gateway(s): half load {rate:,.0f}/s offered: webhook p50/p99 "
                f"{half.result['e2e_p50_ms']:.0f}/{half.result['e2e_p99_ms']:.0f} ms")  # fmt: skip
        left = asyncio.run(wait_terminal(self.db.url, self.run, a.drain))
        if left:
            say(f"{left} disbursements still open after {a.drain} s")
        self.procs.stop(gws)
        return Step(n, intake, sat, sat_db, half, half_db, spy.summary())


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def per(m: Measured, group: str, count: float) -> float:
    return m.cpu.seconds[group] * 1000 / max(count, 1)


def report(args: argparse.Namespace, steps: list[Step]) -> None:
    print(
        "\n| gateways | intake/s | e2e/s saturated (webhook / database) | e2e / intake | "
        "half load: offered/s, succeeded/s | submit→webhook p50 / p99 ms | "
        "created→succeeded (database) p50 / p99 ms | intake p50 / p99 ms at half load | "
        "open after the run |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in steps:
        i, sat = s.intake.result, s.saturated.result
        half = s.half.result if s.half else None
        hd = s.half_db or {}
        cells = [
            str(s.gateways),
            f"{i['rps']:,.0f}",
            f"{sat['e2e_rps']:,.0f} / {s.saturated_db['rps']:,.0f}",
            f"{sat['e2e_rps'] / max(i['rps'], 1):.2f}",
            f"{half['offered_rps']:,.0f}, {half['e2e_rps']:,.0f}" if half else "",
            f"{half['e2e_p50_ms']:,.0f} / {half['e2e_p99_ms']:,.0f}" if half else "",
            f"{hd['p50_ms']:,.0f} / {hd['p99_ms']:,.0f}" if half else "",
            f"{half['p50_ms']:,.0f} / {half['p99_ms']:,.0f}" if half else "",
            str(sat["not_terminal"] + (half["not_terminal"] if half else 0)),
        ]
        print("| " + " | ".join(cells) + " |")

    print(
        "\n| gateways | phase | cores: gateways / PostgreSQL / bank / loadgen / other | "
        "CPU ms per disbursement: gateways / PostgreSQL / bank | PostgreSQL backends by wait |"
    )
    print("|---:|---|---|---|---|")
    for s in steps:
        phases: list[tuple[str, Measured, float]] = [
            ("intake (api)", s.intake, float(s.intake.result["ok"])),
            ("saturated (all)", s.saturated, s.saturated_db["rps"] * args.duration),
        ]
        if s.half is not None and s.half_db is not None:
            phases.append(("half load (all)", s.half, s.half_db["rps"] * args.duration))
        for label, m, count in phases:
            c = m.cpu.cores
            print(
                f"| {s.gateways} | {label} | {c['gateways']:.2f} / {c['postgres']:.2f} / "
                f"{c['bank']:.2f} / {c['loadgen']:.2f} / {c['other']:.2f} | "
                f"{per(m, 'gateways', count):.2f} / {per(m, 'postgres', count):.2f} / "
                f"{per(m, 'bank', count):.2f} | {m.waits.summary(3)} |"
            )
    print("\ndatabase work per disbursement (pg_stat_database, pg_stat_user_tables):")
    for s in steps:
        for label, m, count in (
            ("intake", s.intake, float(s.intake.result["ok"])),
            ("e2e saturated", s.saturated, s.saturated_db["rps"] * args.duration),
        ):
            if m.stats is not None:
                print(f"- {s.gateways} gateway(s), {label}: {m.stats.per(count)}")
    for s in steps:
        if s.profile:
            print(f"\nwhere gateway 1 of {s.gateways} spends its CPU, saturated (py-spy, "
                  "share of samples):")  # fmt: skip
            for name, share in s.profile:
                print(f"- {name}: {share:.0%}")
    if len(steps) > 1:
        i1 = max(steps[0].intake.result["rps"], 1)
        e1 = max(steps[0].saturated.result["e2e_rps"], 1)
        relative = "; ".join(
            f"{s.gateways}: intake {s.intake.result['rps'] / i1:.2f}, "
            f"e2e {s.saturated.result['e2e_rps'] / e1:.2f}"
            for s in steps
        )
        print(f"\nscale-out, relative to 1 gateway: {relative}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=15)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument(
        "--window", type=int, default=256, help="saturated: most accepted and not yet terminal"
    )
    p.add_argument("--borrowers", type=int, default=1000)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--scale", metavar="N,N,...", help="gateway counts, e.g. 1,2,3")
    p.add_argument("--latency-ms", type=int, default=5, help="the bank's delay of every answer")
    p.add_argument("--settle-ms", type=int, default=20, help="the bank's acceptance to callback")
    p.add_argument("--drain", type=float, default=30, help="seconds to wait for open outcomes")
    p.add_argument("--no-half-load", action="store_true", help="skip the latency phase")
    p.add_argument("--profile", action="store_true", help="py-spy the first gateway, saturated")
    p.add_argument(
        "--http-transport",
        choices=("aiohttp", "httpx"),
        help="the gateways' [gateway] http_transport (default: the gateway's default)",
    )
    p.add_argument("--database-url", default=os.environ.get("FUNDGATE_DATABASE_URL"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, db)")
    args = p.parse_args()
    counts = [int(x) for x in args.scale.split(",")] if args.scale else [args.gateways]

    say(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load_average()}")
    with workdir("fundgate-bench-e2e-", args.keep) as work, Database(work, args.database_url) as db:
        procs = Procs(work)
        try:
            bench = Bench(args, work, db, procs)
            bench.intake_url = db.sibling(f"{db.url.rpartition('/')[2]}_intake")
            db.migrate()
            db.migrate(bench.intake_url)
            bench.start_bank()
            steps = [bench.step(n) for n in counts]
            left = asyncio.run(wait_terminal(db.url, bench.run, args.drain))
            counts_, problems = asyncio.run(
                check_oracle(db.url, bench.run, f"http://127.0.0.1:{bench.bank_port}")
            )
        finally:
            procs.close()
    report(args, steps)
    print(
        f"\noracle: {counts_['disbursements']:,} disbursements ({counts_['succeeded']:,} "
        f"succeeded, {counts_['failed']:,} failed, {counts_['open']:,} open); the bank holds "
        f"{counts_['bank_orders']:,} orders, {counts_['executed']:,} executed; "
        + ("every succeeded disbursement executed exactly once, nothing else executed"
           if not problems else f"{len(problems)} VIOLATIONS")
    )  # fmt: skip
    for line in problems[:20]:
        print(f"  - {line}")
    print(f"load average after the run: {load_average()}")
    return 1 if problems or left else 0


if __name__ == "__main__":
    raise SystemExit(main())
