"""Intake throughput against this machine's limits, measured in the same run.

    .venv/bin/python -m bench.intake [--duration 20] [--warmup 5] [--concurrency 64]
                                     [--database-url URL] [--gateways 1] [--no-baselines]
    .venv/bin/python -m bench.intake --scale 1,2,3 ...   # scale-out: 1, 2, 3 gateways
    .venv/bin/python -m bench.intake --hot-limit ...     # one funder's limit vs four funders

Starts embedded PostgreSQL (durable, as in production) unless a URL is given, then measures:

    pgbench    the database's capacity for intake's write set: one transaction inserting a
               disbursement, an attempt, an outbox row and a voucher event and reserving a
               daily limit with a conditional update spread over 16 rows, at 16/32/64 clients;
               the best rate is the baseline (the issue's write set)
    pgbench, full  the same with everything `fg_intake` writes and reads in plain SQL
               statements: the replay and whitelist look-ups, the disbursement with its
               first response, the platform's and the funder's limit buckets, the attempt,
               the outbox row, the ledger transaction with its two entries and the two
               vouchers (ledger and state); fundgate / this is how close the gateway comes
               to the database's capacity for what it really writes
    floor      the load generator against a minimal aiohttp handler (bench/floor.py)
    fundgate   the load generator (bench/loadgen.py, a separate process) against
               `fundgate serve --role api` (pool 32 each), every request to one funder,
               distinct txn_no, whitelisted payees, limits far away; with several gateways the
               load generator's clients are spread over all of them

then, unless --no-half-load, the same gateways open loop at half the rate just measured
(one submission every 2/R s on schedule, latency counted from the scheduled time), and prints
a table with the ratios fundgate / pgbench and fundgate / floor, the CPU per
accepted disbursement of the gateways and of PostgreSQL, the cores each process group used in
the measured window (of the machine's 2; `other` is whatever else ran on the machine), and
PostgreSQL's client backends by wait event (average number of backends sampled 10×/s).

--scale 1,2,3 runs the fundgate measurement with 1, then 2, then 3 gateway processes against
the one database (the baselines once) and prints one row per count.

--hot-limit uses a config with four direct funders (bank-a..bank-d, limits far away) and
measures, in the same gateways, the rate with every request's `funder_hint` = bank-a (one
funder's daily-limit rows) against hints round-robin over the four; in the order one, four,
four, one so that a drift of the shared machine weighs on both alike. With `--buckets 1`
every daily limit is one row again (the design before migration 0011; the platform's limit
is then one row for every request, whatever the funder).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/intake.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import (
    Database,
    FunderSpec,
    Measured,
    Procs,
    config_toml,
    cpu_seconds,
    free_port,
    fundgate_env,
    load_average,
    loadgen,
    register,
    wait_up,
    workdir,
)

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

# fg_intake's own write set (migration 0011) as plain statements, for a direct funder. A
# ":" followed by a letter is a pgbench variable, even inside a string: the accounts spell it
# \x3a (an E'' string) and the voucher texts \u003a (a JSON escape).
PGBENCH_FULL_SCRIPT = r"""
\set r random(1, 2000000000)
\set bucket random(0, 15)
BEGIN;
SELECT request_hash, first_response FROM disbursements
 WHERE txn_no = 'PGF-' || CAST(:client_id AS text) || '-' || CAST(:r AS text);
SELECT name_bidx, account_name_enc FROM borrower_accounts
 WHERE borrower_id = 'PGB' AND account_bidx = '\x0102' AND bank_code = 'ICBC';
INSERT INTO disbursements (txn_no, request_hash, client, loan_id, borrower_id, amount, currency,
  term_unit, term_count, apr, product, repayment, metadata, status, funder_id, mode,
  alloc_funder, alloc_platform, business_day, payee_bank_code, payee_account_bidx,
  payee_account_no_enc, payee_account_name_enc, payee_account_masked, payee_name_masked,
  platform_bucket, first_response)
VALUES ('PGF-' || CAST(:client_id AS text) || '-' || CAST(:r AS text) || '-' || random(),
  '\x00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff', 'bench', 'L', 'PGB',
  1000000, 'CNY', 'month', 12, 0.18, 'consumer-standard', 'equal_installment', '{}',
  'accepted', 'bank-a', 'direct', 1000000, 0, current_date, 'ICBC', '\x0102',
  '\x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728',
  '\x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f',
  '622202*********3445', '*三', CAST(:bucket AS integer),
  '{"txn_no": "LC202612070001", "status": "accepted", "funder_id": "bank-a", "mode": "direct",
    "allocation": {"funder": 1000000, "platform": 0}, "amount": 1000000, "currency": "CNY",
    "payee": {"account_no": "622202*********3445", "account_name": "*三", "bank_code": "ICBC"},
    "attempts": [{"n": 1, "funder_id": "bank-a", "order_no": "LC202612070001-01",
                  "status": "accepted", "bank_ref": null, "error": null}],
    "failure": null, "created_at": "2026-12-07T03:00:00.123456Z",
    "updated_at": "2026-12-07T03:00:00.123456Z"}')
RETURNING id AS did \gset
UPDATE limit_usage SET used = used + 1000000
 WHERE scope = 'bench' AND business_day = current_date AND bucket = :bucket
   AND cap = 1000000000000000000 AND used + 1000000 <= share;
UPDATE limit_usage SET used = used + 1000000
 WHERE scope = 'bench-funder' AND business_day = current_date AND bucket = :bucket
   AND cap = 1000000000000000000 AND used + 1000000 <= share;
INSERT INTO attempts (disbursement_id, n, funder_id, order_no, status, mode, alloc_funder,
  alloc_platform, limit_bucket, created_at, updated_at)
VALUES (:did, 1, 'bank-a', 'PGF-' || CAST(:did AS text), 'accepted', 'direct', 1000000, 0,
  :bucket, now(), now())
RETURNING id AS aid \gset
INSERT INTO outbox (kind, ref_id, funder_id) VALUES ('dispatch', :aid, 'bank-a');
INSERT INTO ledger_transactions (kind, txn_no, funder_id)
VALUES ('disbursement.accepted', 'PGF-' || CAST(:did AS text), 'bank-a')
RETURNING id AS tx \gset
INSERT INTO ledger_entries (tx_id, account, amount, business_day)
VALUES (CAST(:tx AS bigint), E'transit\x3abank-a', 1000000, current_date),
       (CAST(:tx AS bigint), E'funder\x3abank-a', -1000000, current_date);
INSERT INTO voucher_events (kind, txn_no, event)
VALUES ('ledger.disbursement.accepted', 'PGF-' || CAST(:did AS text),
        '{"entries":[{"account":"funder\u003abank-a","amount":-1000000},'
        || '{"account":"transit\u003abank-a","amount":1000000}],'
        || '"kind":"disbursement.accepted","reference": null,"tx":' || CAST(:tx AS text)
        || ',"txn_no":"LC202612070001"}'),
       ('disbursement.accepted', 'PGF-' || CAST(:did AS text),
        '{"allocation":{"funder":1000000,"platform":0},"amount":1000000,'
        || '"business_day":"2026-12-07","funder_id":"bank-a","mode":"direct",'
        || '"order_no":"LC202612070001-01","status":"accepted","txn_no":"LC202612070001"}');
END;
"""

FOUR_FUNDERS = [FunderSpec(f"bank-{c}", priority=i + 1) for i, c in enumerate("abcd")]


def seed_pgbench_buckets(url: str) -> None:
    """The 16 usage rows per scope the pgbench scripts reserve in (fundgate's bucket layout),
    and the whitelisted account the full script looks up."""
    import asyncpg

    async def seed() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO limit_usage (scope, business_day, bucket, used, share, cap)"
                " SELECT s, current_date, b, 0, 62500000000000000, 1000000000000000000"
                " FROM unnest(ARRAY['bench', 'bench-funder']) AS s,"
                "      generate_series(0, 15) AS b ON CONFLICT DO NOTHING"
            )
            await conn.execute(
                "INSERT INTO borrower_accounts (borrower_id, account_bidx, bank_code, name_bidx,"
                " account_no_enc, account_name_enc, account_masked, name_masked)"
                " VALUES ('PGB', '\\x0102', 'ICBC', '\\x03', '\\x01', '\\x01', 'x', 'y')"
                " ON CONFLICT DO NOTHING"
            )
        finally:
            await conn.close()

    asyncio.run(seed())


def pgbench(url: str, clients: int, seconds: float, work: Path, sql: str = PGBENCH_SCRIPT) -> float:
    from gateway.store.embedded import POSTGRES_BIN_PATH

    script = work / "intake.sql"
    script.write_text(sql)
    out = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pgbench"), "-n", "-M", "prepared", "-c", str(clients),
         "-j", "2", "-T", str(int(seconds)), "-f", str(script), url],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(out)


@dataclass
class Baselines:
    pgbench: float = 0.0
    pgbench_clients: int = 0
    pgbench_pg_ms: float = 0.0
    full: float = 0.0  # pgbench of fg_intake's whole write set
    full_clients: int = 0
    full_pg_ms: float = 0.0
    floor: dict[str, Any] = field(
        default_factory=lambda: {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}
    )


def measure_baselines(args: argparse.Namespace, db: Database, procs: Procs) -> Baselines:
    b = Baselines()
    seed_pgbench_buckets(db.url)
    for c in (16, 32, 64):
        for label, sql in (("", PGBENCH_SCRIPT), (", full", PGBENCH_FULL_SCRIPT)):
            before = db.cpu()
            tps = pgbench(db.url, c, args.duration / 2, procs.work, sql)
            pg_ms = (db.cpu() - before) * 1000 / max(tps * int(args.duration / 2), 1)
            print(f"pgbench{label} {c} clients: {tps:,.0f} tx/s, PostgreSQL CPU {pg_ms:.2f} ms/tx",
                  file=sys.stderr)  # fmt: skip
            if label and tps > b.full:
                b.full, b.full_clients, b.full_pg_ms = tps, c, pg_ms
            elif not label and tps > b.pgbench:
                b.pgbench, b.pgbench_clients, b.pgbench_pg_ms = tps, c, pg_ms
    port = free_port()
    floor = procs.start("floor", ["-m", "bench.floor", "--port", str(port)], os.environ)
    time.sleep(1.0)
    b.floor = loadgen(
        loadgen_args(args, [port], "floor", prefix="F"), groups={}, database_url=None
    ).result
    procs.stop([floor])
    return b


def loadgen_args(
    args: argparse.Namespace, ports: list[int], mode: str, *, prefix: str,
    hints: list[str] | None = None, rate: float | None = None,
) -> list[str]:  # fmt: skip
    out = ["--mode", mode, "--concurrency", str(args.concurrency),
           "--duration", str(args.duration), "--warmup", str(args.warmup),
           "--borrowers", str(args.borrowers),
           "--prefix", f"{prefix}{int(time.time())}"]  # fmt: skip
    if rate:
        out += ["--rate", f"{rate:.1f}"]
    for p in ports:
        out += ["--url", f"http://127.0.0.1:{p}"]
    for h in hints or []:
        out += ["--funder-hint", h]
    return out


class Gateways:
    """`fundgate serve --role api` processes on one database, started and stopped per step."""

    def __init__(self, procs: Procs, db: Database, config: Path) -> None:
        self.procs, self.db, self.config = procs, db, config
        self.running: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.registered = False

    def start(self, n: int, borrowers: int) -> None:
        env = fundgate_env(self.db.url, self.config)
        self.ports = [free_port() for _ in range(n)]
        self.running = [self.procs.gateway(p, "api", env, pool_size=32) for p in self.ports]
        for p in self.ports:
            wait_up(f"http://127.0.0.1:{p}/readyz")
        if not self.registered:
            register(f"http://127.0.0.1:{self.ports[0]}", borrowers)
            self.registered = True

    def stop(self) -> None:
        self.procs.stop(self.running)
        self.running = []

    def groups(self) -> dict[str, Callable[[], float]]:
        pids = [p.pid for p in self.running]
        return {"gateways": lambda: cpu_seconds(pids), "postgres": self.db.cpu}

    def measure(
        self,
        args: argparse.Namespace,
        prefix: str,
        hints: list[str] | None = None,
        rate: float | None = None,
    ) -> Measured:
        """Closed loop (`--concurrency` clients back to back), or open loop at `rate`."""
        return loadgen(
            loadgen_args(args, self.ports, "intake", prefix=prefix, hints=hints, rate=rate),
            groups=self.groups(),
            database_url=self.db.url,
        )


def per_request_ms(m: Measured, group: str) -> float:
    return m.cpu.seconds[group] * 1000 / max(int(m.result["ok"]), 1)


def row(label: str, m: Measured, note: str = "") -> str:
    r = m.result
    return (
        f"| {label} | {r['rps']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
        f"{per_request_ms(m, 'gateways'):.2f} | {per_request_ms(m, 'postgres'):.2f} | "
        f"{m.cpu.cores['gateways']:.2f} / {m.cpu.cores['postgres']:.2f} / "
        f"{m.cpu.cores['loadgen']:.2f} / {m.cpu.cores['other']:.2f} | {m.waits.summary(3)} |"
        + (f" {note} |" if note else "")
    )


HEADER = (
    "| {what} | accepted/s | p50 ms | p99 ms | gateway CPU ms/req | PostgreSQL CPU ms/req | "
    "cores: gateways / PostgreSQL / loadgen / other | PostgreSQL backends by wait |{extra}\n"
    "|---|---:|---:|---:|---:|---:|---|---|{extra_sep}"
)


def print_baselines(args: argparse.Namespace, b: Baselines) -> None:
    print("\n| baseline | rate (/s) | p50 ms | p99 ms | note |")
    print("|---|---:|---:|---:|---|")
    print(f"| pgbench intake write set | {b.pgbench:,.0f} | | | best of 16/32/64 clients "
          f"({b.pgbench_clients}); PostgreSQL CPU {b.pgbench_pg_ms:.2f} ms/tx |")  # fmt: skip
    print(f"| pgbench, fg_intake's whole write set | {b.full:,.0f} | | | best of 16/32/64 "
          f"clients ({b.full_clients}); PostgreSQL CPU {b.full_pg_ms:.2f} ms/tx |")  # fmt: skip
    print(f"| HTTP floor (aiohttp) | {b.floor['rps']:,.0f} | {b.floor['p50_ms']:.1f} | "
          f"{b.floor['p99_ms']:.1f} | {args.concurrency} clients |")  # fmt: skip


def single(args: argparse.Namespace, gws: Gateways, b: Baselines | None) -> None:
    gws.start(args.gateways, args.borrowers)
    m = gws.measure(args, "I")
    half = None
    if not args.no_half_load:
        # latency at half the best rate, open loop: one submission every 2/rate s on schedule
        half = gws.measure(args, "L", rate=m.result["rps"] / 2)
    gws.stop()
    if b is not None:
        print_baselines(args, b)
    print()
    print(HEADER.format(what="fundgate", extra=" statuses |", extra_sep="---|"))
    print(row(f"{args.gateways} gateway(s), {args.concurrency} clients", m,
              str(m.result["statuses"])))  # fmt: skip
    if half is not None:
        r = half.result
        print(row(f"half load: {r['offered_rps']:,.0f}/s offered (open loop)", half,
                  f"{r['statuses']}, {r['skipped']} not sent on schedule"))  # fmt: skip
    if b is not None:
        r = m.result["rps"]
        print(f"\nfundgate / pgbench = {r / max(b.pgbench, 1):.2f}; "
              f"fundgate / pgbench of the whole write set = {r / max(b.full, 1):.2f}; "
              f"fundgate / HTTP floor = {r / max(b.floor['rps'], 1):.2f}")  # fmt: skip


def scale(args: argparse.Namespace, gws: Gateways, b: Baselines | None) -> None:
    counts = [int(x) for x in args.scale.split(",")]
    results: list[tuple[int, Measured]] = []
    for n in counts:
        gws.start(n, args.borrowers)
        m = gws.measure(args, f"S{n}-")
        gws.stop()
        print(f"{n} gateway(s): {m.result['rps']:,.0f}/s; cores {m.cpu.summary()}",
              file=sys.stderr)  # fmt: skip
        results.append((n, m))
    if b is not None:
        print_baselines(args, b)
    print()
    print(HEADER.format(what="gateways", extra=" vs 1 gateway | statuses |",
                        extra_sep="---:|---|"))  # fmt: skip
    first = results[0][1].result["rps"]
    for n, m in results:
        print(row(str(n), m, f"{m.result['rps'] / max(first, 1):.2f} | {m.result['statuses']}"))
    if b is not None:
        best = max(m.result["rps"] for _, m in results)
        print(
            f"\nbest fundgate / pgbench = {best / max(b.pgbench, 1):.2f}; "
            f"/ pgbench of the whole write set = {best / max(b.full, 1):.2f}"
        )


def hot_limit(args: argparse.Namespace, gws: Gateways) -> None:
    gws.start(args.gateways, args.borrowers)
    one, four = ["bank-a"], [f.id for f in FOUR_FUNDERS]
    runs: list[tuple[str, Measured]] = []
    for label, hints in (("one", one), ("four", four), ("four", four), ("one", one)):
        m = gws.measure(args, f"H{label}{len(runs)}-", hints)
        print(f"{label} funder{'s' if label == 'four' else ''}: {m.result['rps']:,.0f}/s "
              f"{m.result['statuses']}", file=sys.stderr)  # fmt: skip
        runs.append((label, m))
    gws.stop()
    print()
    print(HEADER.format(what="funders", extra=" statuses |", extra_sep="---|"))
    for label, m in runs:
        print(row(f"{label} ({'bank-a' if label == 'one' else 'round-robin a..d'})", m,
                  str(m.result["statuses"])))  # fmt: skip

    def mean(label: str) -> float:
        rates = [float(m.result["rps"]) for lb, m in runs if lb == label]
        return sum(rates) / len(rates)

    one_rate, four_rate = mean("one"), mean("four")
    print(
        f"\none funder / four funders = {one_rate / max(four_rate, 1):.2f} "
        f"(means of the two runs each: {one_rate:,.0f} / {four_rate:,.0f} per s)"
    )


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
    p.add_argument("--no-half-load", action="store_true",
                   help="skip the latency phase at half the measured rate (open loop)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, db)")
    p.add_argument(
        "--buckets",
        type=int,
        help="[gateway] limit_buckets (default: the gateway's); 1 = one row per daily limit, "
        "as before migration 0011",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--scale", metavar="N,N,...", help="gateway counts, e.g. 1,2,3")
    mode.add_argument("--hot-limit", action="store_true", help="one funder vs four funders")
    args = p.parse_args()

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load_average()}", file=sys.stderr)
    with (
        workdir("fundgate-bench-intake-", args.keep) as work,
        Database(work, args.database_url) as db,
    ):
        procs = Procs(work)
        try:
            config = work / "bench.toml"
            funders = FOUR_FUNDERS if args.hot_limit else [FunderSpec("bank-a")]
            config.write_text(config_toml(funders, limit_buckets=args.buckets))
            db.migrate()
            gws = Gateways(procs, db, config)
            if args.hot_limit:
                hot_limit(args, gws)
            else:
                b = None if args.no_baselines else measure_baselines(args, db, procs)
                (scale if args.scale else single)(args, gws, b)
            print(f"\nload average after the run: {load_average()}")
        finally:
            procs.close()


if __name__ == "__main__":
    main()
