"""Intake throughput against this machine's limits, measured in the same run.

    .venv/bin/python -m bench.intake [--duration 20] [--warmup 5] [--concurrency 64]
                                     [--database-url URL] [--gateways 1]

Starts embedded PostgreSQL (durable, as in production) unless a URL is given, then measures:

    pgbench    the database's capacity for intake's write set: one transaction inserting a
               disbursement, an attempt, an outbox row and a voucher event and reserving a
               daily limit with a conditional update spread over 16 rows, at 16/32/64 clients;
               the best rate is the baseline
    floor      the load generator against a minimal aiohttp handler (bench/floor.py)
    fundgate   the load generator (bench/loadgen.py, a separate process) against
               `fundgate serve --role api`, every request to one funder, distinct txn_no,
               whitelisted payees, limits far away

and prints a table with the ratios fundgate / pgbench and fundgate / floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.store.embedded import POSTGRES_BIN_PATH, EmbeddedPostgres  # noqa: E402

CONFIG = """
[gateway]
platform_daily_limit = 1000000000000000

[[clients]]
name = "bench"
token_sha256 = "7c43ef5ae21d43ce2743f770c68e24def1a43ee2f416d2438410c8af7af2ff2c"
scopes = ["disburse", "read", "admin"]

[[products]]
code = "consumer-standard"
min_amount = 300000
max_amount = 20000000
min_term = { unit = "day", count = 7 }
max_term = { unit = "month", count = 36 }
repayments = ["equal_installment", "interest_first"]

[[funders]]
id = "bank-a"
name = "Bench Bank"
license = "bank"
mode = "direct"
priority = 1
products = ["consumer-standard"]
single_max = 20000000
daily_limit = 1000000000000000
connector = "sandbox"
[funders.connector_options]
base_url = "http://127.0.0.1:9"
secret = "bench"
"""

PGBENCH_SCRIPT = r"""
\set r random(1, 2000000000)
\set bucket random(1, 16)
BEGIN;
INSERT INTO disbursements (txn_no, request_hash, client, loan_id, borrower_id, amount, currency,
  term_unit, term_count, apr, product, repayment, metadata, status, funder_id, mode,
  alloc_funder, alloc_platform, business_day, payee_bank_code, payee_account_bidx,
  payee_account_no_enc, payee_account_name_enc, payee_account_masked, payee_name_masked,
  first_response)
VALUES ('PGB-' || :client_id || '-' || :r || '-' || random(), '\x00', 'bench', 'L', 'B', 1000000,
  'CNY', 'month', 12, 0.18, 'consumer-standard', 'equal_installment', '{}', 'accepted',
  'bank-a', 'direct', 1000000, 0, current_date, 'ICBC', '\x0102',
  '\x0102030405060708090a0b0c0d0e0f', '\x0102030405060708090a0b0c0d0e0f',
  '622202*********3445', '*三', '{"status":"accepted"}')
RETURNING id AS did \gset
INSERT INTO attempts (disbursement_id, n, funder_id, order_no, status, mode, alloc_funder,
  alloc_platform) VALUES (:did, 1, 'bank-a', 'PGB-' || :did, 'accepted', 'direct', 1000000, 0)
RETURNING id AS aid \gset
INSERT INTO outbox (kind, ref_id, funder_id) VALUES ('dispatch', :aid, 'bank-a');
INSERT INTO voucher_events (kind, txn_no, event) VALUES ('disbursement.accepted', 'PGB',
  '{"amount":1000000,"funder_id":"bank-a","status":"accepted"}');
UPDATE limit_usage SET used = used + 1000000
 WHERE scope = 'bench' AND business_day = current_date AND bucket = :bucket - 1
   AND cap = 1000000000000000000 AND used + 1000000 <= share;
END;
"""


def cpu_seconds(pids: list[int], reaped_by: int | None = None) -> float:
    """User + system CPU seconds used so far by these processes (Linux /proc), plus those of
    the exited children `reaped_by` has collected (PostgreSQL's ended backends)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if pid == reaped_by:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / tick


def postgres_pids(postmaster: int | None) -> list[int]:
    """The server's processes: the postmaster and its children (its backends), or, for a
    server given by URL, every PostgreSQL process of the machine."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() not in ("postgres", "postmaster"):
                continue
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if postmaster is None or postmaster in (int(d.name), ppid):
            out.append(int(d.name))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def loadgen(url: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--url", url, "--mode", mode,
         "--concurrency", str(args.concurrency), "--duration", str(args.duration),
         "--warmup", str(args.warmup), "--borrowers", str(args.borrowers)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def seed_pgbench_buckets(url: str) -> None:
    """The 16 usage rows the pgbench script reserves in (fundgate's bucket layout)."""
    import asyncpg

    async def seed() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO limit_usage (scope, business_day, bucket, used, share, cap)"
                " SELECT 'bench', current_date, b, 0, 62500000000000000, 1000000000000000000"
                " FROM generate_series(0, 15) AS b ON CONFLICT DO NOTHING"
            )
        finally:
            await conn.close()

    asyncio.run(seed())


def pgbench(url: str, clients: int, seconds: float, workdir: Path) -> float:
    script = workdir / "intake.sql"
    script.write_text(PGBENCH_SCRIPT)
    out = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pgbench"), "-n", "-M", "prepared", "-c", str(clients),
         "-j", "2", "-T", str(int(seconds)), "-f", str(script), url],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(out)


def register(url: str, n: int) -> None:
    from bench.loadgen import borrower

    for i in range(n):
        bid, account = borrower(i)
        req = urllib.request.Request(
            f"{url}/v1/borrowers/{bid}/accounts", data=json.dumps(account).encode(),
            method="PUT", headers={"Authorization": "Bearer demo-token"},
        )  # fmt: skip
        urllib.request.urlopen(req, timeout=10).read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--borrowers", type=int, default=1000)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--database-url", default=os.environ.get("FUNDGATE_DATABASE_URL"))
    p.add_argument("--no-baselines", action="store_true",
                   help="fundgate only (quick before/after checks; no ratios)")  # fmt: skip
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fundgate-bench-"))
    pg = None
    url = args.database_url
    if url is None:
        pg = EmbeddedPostgres(work / "db", durable=True)
        url = pg.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        (work / "bench.toml").write_text(CONFIG)
        env = {
            **os.environ,
            "FUNDGATE_DATABASE_URL": url,
            "FUNDGATE_CONFIG": str(work / "bench.toml"),
            "FUNDGATE_LOG_LEVEL": "warning",
        }
        ports = [free_port() for _ in range(args.gateways)]
        for port in ports:
            log = open(work / f"gw{port}.log", "w")  # lives as long as the process
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
                 "--role", "api", "--pool-size", "32"],
                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
            ))  # fmt: skip
        for port in ports:
            wait_up(f"http://127.0.0.1:{port}/readyz")
        register(f"http://127.0.0.1:{ports[0]}", args.borrowers)

        postmaster = None
        if pg is not None:
            postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
        seed_pgbench_buckets(url)
        best, best_c, best_pg_ms = 0.0, 0, 0.0
        for c in () if args.no_baselines else (16, 32, 64):
            before = cpu_seconds(postgres_pids(postmaster), postmaster)
            tps = pgbench(url, c, args.duration / 2, work)
            pg_ms = (
                (cpu_seconds(postgres_pids(postmaster), postmaster) - before)
                * 1000
                / max(tps * int(args.duration / 2), 1)
            )
            print(f"pgbench {c} clients: {tps:,.0f} tx/s, PostgreSQL CPU {pg_ms:.2f} ms/tx",
                  file=sys.stderr)  # fmt: skip
            if tps > best:
                best, best_c, best_pg_ms = tps, c, pg_ms

        floor_r: dict[str, Any] = {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}
        if not args.no_baselines:
            floor_port = free_port()
            floor = subprocess.Popen(
                [sys.executable, "-m", "bench.floor", "--port", str(floor_port)], cwd=ROOT
            )
            procs.append(floor)
            time.sleep(1.0)
            floor_r = loadgen(f"http://127.0.0.1:{floor_port}", "floor", args)
        gw_pids = [pr.pid for pr in procs[: args.gateways]]
        cpu0 = (cpu_seconds(gw_pids), cpu_seconds(postgres_pids(postmaster), postmaster))
        fg = loadgen(f"http://127.0.0.1:{ports[0]}", "intake", args)
        cpu1 = (cpu_seconds(gw_pids), cpu_seconds(postgres_pids(postmaster), postmaster))
        requests = fg["rps"] * (args.duration + args.warmup)  # CPU was counted over both

        print("\n| measure | rate (/s) | p50 ms | p99 ms | note |")
        print("|---|---:|---:|---:|---|")
        print(
            f"| pgbench intake write set | {best:,.0f} | | | best of 16/32/64 clients ({best_c}) |"
        )
        print(f"| HTTP floor (aiohttp) | {floor_r['rps']:,.0f} | {floor_r['p50_ms']:.1f} | "
              f"{floor_r['p99_ms']:.1f} | {args.concurrency} clients |")  # fmt: skip
        print(f"| fundgate intake | {fg['rps']:,.0f} | {fg['p50_ms']:.1f} | {fg['p99_ms']:.1f} | "
              f"{args.concurrency} clients, statuses {fg['statuses']} |")  # fmt: skip
        gw_ms = (cpu1[0] - cpu0[0]) * 1000 / max(requests, 1)
        pg_ms = (cpu1[1] - cpu0[1]) * 1000 / max(requests, 1)
        print(f"\nCPU per accepted disbursement: gateway {gw_ms:.2f} ms, PostgreSQL "
              f"{pg_ms:.2f} ms (pgbench's write set: {best_pg_ms:.2f} ms per tx)")  # fmt: skip
        print(
            f"fundgate / pgbench = {fg['rps'] / max(best, 1):.2f}; "
            f"fundgate / HTTP floor = {fg['rps'] / max(floor_r['rps'], 1):.2f}"
        )
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            try:
                pr.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pr.kill()
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
