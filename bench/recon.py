"""Reconciliation speed: fundgate's run against the baseline a team would write by hand.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/recon.py --lines 1000000 --lines 4000000
    .venv/bin/python bench/recon.py --lines 1000000 --rounds 3   # alternating, fresh copies
    .venv/bin/python bench/recon.py --lines 1000000 --listed-days 7   # after a week of runs

For each N: a fresh database gets N attempts of one funder on one day and a sandbox-CSV
statement file of N lines with about 1 % of every break type (missing at the bank, missing at
the gateway, amount mismatch, bank succeeded / failed against our final status, duplicates)
plus 0.05 % unknown attempts the statement resolves through the state machine. Then, each in a
process of its own so peak memory (max RSS) is its own:

    fundgate   `gateway.reconcile.reconcile_day` reading the file from `[funders.statement]`
               (the file's bytes COPYed into PostgreSQL and checked there, match in
               SQL, breaks, auto-resolution, the ledger against the statement)
    pandas     `pd.read_csv` of the statement, the day's records exported with
               `COPY (...) TO STDOUT`, read with `pd.read_csv`, and an outer merge with
               the classification done in vectorised pandas (the issue's baseline)
    + persist  the same pandas process then COPYing back what fundgate keeps for the next
               days (every order listed, shaped and keyed as `recon_seen`, and the breaks):
               a like-for-like yardstick, timed from the same start

Both report lines/s and the process's peak RSS (pandas' before it persists); PostgreSQL's own
memory is not counted for either (both use it). Results go to stdout as a Markdown table,
with the load average and fundgate's phases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ZONE = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 3, 10)
FUNDER = "bank-a"
RATE = 0.01  # share of each break type
AUTO_RATE = 0.0005  # unknown attempts the statement settles


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- data


async def prepare(
    url: str,
    n: int,
    statement: Path,
    seed: int = 7,
    history_days: int = 0,
    listed_days: int = 0,
) -> dict[str, int]:
    """N attempts in the database and the statement file; the expected break counts. With
    `history_days`, as many attempts again on each of that many days before (all settled,
    none on the statement): the funder's history a production run joins against.
    With `listed_days`, the orders that many earlier statements listed (N each, written by
    `record_seen` as those days' runs left them, the history's order numbers): what a
    run looks back on for repeat payouts once the gateway has reconciled a week.
    """
    import asyncpg

    from gateway.store import db
    from gateway.store import recon_queries as rq

    rng = random.Random(seed)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        await conn.execute(
            "TRUNCATE disbursements, attempts, recon_runs, recon_breaks, recon_seen,"
            " recon_pending, limit_usage, outbox, voucher_events RESTART IDENTITY CASCADE"
        )
        # per order: 0 plain, 1 missing at bank, 2 amount, 3 we failed/bank paid,
        # 4 we succeeded/bank failed, 5 duplicate, 6 unknown -> auto
        kinds = []
        for _ in range(n):
            r = rng.random()
            k = int(r // RATE) + 1 if r < 5 * RATE else 0
            if k == 0 and rng.random() < RATE:
                k = 5
            if k == 0 and rng.random() < AUTO_RATE:
                k = 6
            kinds.append(k)
        status = {0: "succeeded", 1: "succeeded", 2: "succeeded", 3: "failed", 4: "succeeded",
                  5: "succeeded", 6: "unknown"}  # fmt: skip
        start = datetime.combine(DAY, dtime(9), tzinfo=ZONE)
        clear = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'disbursements' AND column_name = 'payee_account_no'"
        )  # the payee in clear until personal data is encrypted at rest (migration 0007)
        payee_cols, payee_vals = (
            ("payee_account_no, payee_account_name,", "'6222020200112233445', 'n',")
            if clear
            else ("", "")
        )
        disbursements = f"""
            INSERT INTO disbursements (txn_no, request_hash, client, loan_id, borrower_id,
                amount, currency, term_unit, term_count, apr, product, repayment,
                {payee_cols} payee_bank_code, status, funder_id, mode,
                alloc_funder, alloc_platform, business_day, created_at, updated_at)
            SELECT $5 || i, '\\x00', 'bench', 'L' || i, 'B' || i, {{amount}}, 'CNY',
                   'month', 12, 0.18, 'consumer-standard', 'equal_installment',
                   {payee_vals} 'ICBC', 'succeeded', $2, 'direct', {{amount}}, 0, $3, $4, $4
              FROM generate_series(1, $1) AS i
            """
        await conn.execute(
            disbursements.format(amount="100000 + i % 1000"), n, FUNDER, DAY, start, "T"
        )
        await conn.execute(
            """
            INSERT INTO attempts (disbursement_id, n, funder_id, order_no, status, mode,
                alloc_funder, alloc_platform, created_at, updated_at)
            SELECT i, 1, $2, 'O' || i, 'succeeded', 'direct', 100000 + i % 1000, 0, $3, $3
              FROM generate_series(1, $1) AS i
            """,
            n,
            FUNDER,
            start,
        )
        for back in range(1, history_days + 1):
            when = start - timedelta(days=back)
            await conn.execute(
                disbursements.format(amount="100000"),
                n,
                FUNDER,
                DAY - timedelta(days=back),
                when,
                f"H{back}-",
            )
            await conn.execute(
                """
                INSERT INTO attempts (disbursement_id, n, funder_id, order_no, status, mode,
                    alloc_funder, alloc_platform, created_at, updated_at)
                SELECT d.id, 1, $1, 'HO' || d.txn_no, 'succeeded', 'direct', 100000, 0, $2, $2
                  FROM disbursements d WHERE d.txn_no LIKE $3
                """,
                FUNDER,
                when,
                f"H{back}-%",
            )
        for back in range(1, listed_days + 1):
            async with conn.transaction():
                await conn.execute(
                    "CREATE TEMP VIEW recon_stage AS SELECT"
                    f" ('HOH{back}-' || i)::text COLLATE \"C\" AS order_no,"
                    " 'succeeded'::text AS status, 100000::bigint AS amount"
                    f" FROM generate_series(1, {n}) AS i"
                )
                await rq.record_seen(conn, FUNDER, DAY - timedelta(days=back))
                await conn.execute("DROP VIEW recon_stage")
        odd = [(i + 1, status[k]) for i, k in enumerate(kinds) if status[k] != "succeeded"]
        await conn.executemany("UPDATE attempts SET status = $2 WHERE id = $1", odd)
        await conn.executemany("UPDATE disbursements SET status = $2 WHERE id = $1", odd)
        await conn.execute(
            "INSERT INTO limit_usage (scope, business_day, used, share) VALUES"
            " ($1, $3, $2, $2), ('platform', $3, $2, $2)",
            f"funder:{FUNDER}",
            sum(100000 + i % 1000 for i in range(1, n + 1)),
            DAY,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()

    expected = dict.fromkeys(
        ("missing_at_bank", "missing_at_gateway", "amount_mismatch",
         "status_mismatch_bank_succeeded", "status_mismatch_bank_failed", "duplicate_at_bank",
         "auto_resolved"),
        0,
    )  # fmt: skip
    at = datetime.combine(DAY, dtime(18), tzinfo=ZONE).isoformat()
    with statement.open("w", encoding="utf-8") as f:
        f.write("order_no,bank_ref,amount,status,finished_at\n")
        for i, k in enumerate(kinds, start=1):
            amount = 100000 + i % 1000
            if k == 1:
                expected["missing_at_bank"] += 1
                continue
            word = "SUCCESS"
            if k == 2:
                amount += 1
                expected["amount_mismatch"] += 1
            elif k == 3:
                expected["status_mismatch_bank_succeeded"] += 1
            elif k == 4:
                word = "FAILED"
                expected["status_mismatch_bank_failed"] += 1
            elif k == 6:
                expected["auto_resolved"] += 1
            f.write(f"O{i},R{i},{amount},{word},{at}\n")
            if k == 5:
                f.write(f"O{i},R{i}b,{amount},SUCCESS,{at}\n")
                expected["duplicate_at_bank"] += 1
            if rng.random() < RATE:
                f.write(f"X{i},RX{i},{amount},SUCCESS,{at}\n")
                expected["missing_at_gateway"] += 1
    return expected


# ---------------------------------------------------------------- the two contenders


async def run_fundgate(url: str, statement: Path) -> dict[str, Any]:
    import httpx

    from config.loader import DEFAULT_CONFIG, load_config
    from config.models import StatementConfig
    from gateway.context import Services
    from gateway.logging import configure_logging
    from gateway.metrics import Metrics
    from gateway.reconcile import reconcile_day
    from gateway.store import db

    # as `fundgate reconcile` does, at the level the driver sets for its children
    configure_logging("json", os.environ.get("FUNDGATE_LOG_LEVEL", "info"))

    base = load_config(DEFAULT_CONFIG)
    funders = [
        f.model_copy(update={"statement": StatementConfig(path=str(statement))})
        for f in base.funders
    ]
    cfg = base.model_copy(
        update={
            "funders": funders,
            "lending_core": None,
            "reconciliation": base.reconciliation.model_copy(update={"window_days": 0}),
        }
    )
    pool = await db.create_pool(url, min_size=1, max_size=4)
    async with httpx.AsyncClient() as http:
        svc = Services(cfg=cfg, pool=pool, connectors={}, metrics=Metrics(), http=http)
        svc.clock = lambda: datetime.combine(DAY + timedelta(days=1), dtime(3), tzinfo=ZONE)
        started = time.perf_counter()
        result = await reconcile_day(svc, FUNDER, DAY, trigger="bench")
        seconds = time.perf_counter() - started
    await pool.close()
    assert result.ok, result.error
    s = result.summary
    return {
        "seconds": seconds,
        "lines": s.lines,
        "matched": s.matched.count,
        "breaks": {t: v.count for t, v in s.breaks.items()},
        "auto_resolved": s.total_auto_resolved,
        "phases": result.phases,
    }


async def _export(url: str, out: Path) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        start = datetime.combine(DAY, dtime(0), tzinfo=ZONE)
        with out.open("wb") as f:
            await conn.copy_from_query(
                "SELECT a.order_no, a.status, d.amount FROM attempts a"
                " JOIN disbursements d ON d.id = a.disbursement_id"
                " WHERE a.funder_id = $1 AND a.created_at >= $2 AND a.created_at < $3",
                FUNDER,
                start,
                start + timedelta(days=1),
                output=f,
                format="csv",
                header=True,
            )
    finally:
        await conn.close()


def run_pandas(url: str, statement: Path, work: Path) -> dict[str, Any]:
    import pandas as pd

    started = time.perf_counter()
    records = work / "records.csv"
    asyncio.run(_export(url, records))
    bank = pd.read_csv(statement, dtype={"order_no": str, "bank_ref": str, "status": str})
    ours = pd.read_csv(records, dtype={"order_no": str, "status": str})
    dup = bank.duplicated("order_no", keep=False)
    counts = bank.groupby("order_no").size()
    merged = ours.merge(
        bank.drop_duplicates("order_no"), on="order_no", how="outer", indicator=True,
        suffixes=("_ours", "_bank"),
    )  # fmt: skip
    both = merged["_merge"] == "both"
    bank_paid = merged["status_bank"] == "SUCCESS"
    breaks = {
        "missing_at_bank": int(((merged["_merge"] == "left_only")
                                & (merged["status_ours"] == "succeeded")).sum()),
        "missing_at_gateway": int((merged["_merge"] == "right_only").sum()),
        "duplicate_at_bank": int((counts > 1).sum()),
        "amount_mismatch": int((both & (merged["amount_ours"] != merged["amount_bank"])).sum()),
        "status_mismatch_bank_succeeded": int(
            (both & bank_paid & (merged["status_ours"] == "failed")).sum()),
        "status_mismatch_bank_failed": int(
            (both & ~bank_paid & (merged["status_ours"] == "succeeded")).sum()),
    }  # fmt: skip
    seconds = time.perf_counter() - started
    peak_mb = _peak_mb()  # the baseline's, before persisting adds its own

    # the same job made to keep what fundgate keeps, so that a later day could find a repeat
    # payout and know what was reported: every order the statement listed (the shape and key
    # of `recon_seen`) and the breaks, COPYed back in one transaction
    bank["paid"] = (bank["status"] == "SUCCESS").astype(int) - (
        bank["status"] == "REVERSED"
    ).astype(int)
    seen = bank.groupby("order_no").agg(
        lines=("order_no", "size"), paid=("paid", "sum"), amount=("amount", "max")
    )
    seen.insert(0, "business_day", DAY.isoformat())
    seen.insert(0, "funder_id", FUNDER)
    ours_paid = merged["status_ours"] == "succeeded"
    masks = {
        "missing_at_bank": (merged["_merge"] == "left_only") & ours_paid,
        "missing_at_gateway": merged["_merge"] == "right_only",
        "duplicate_at_bank": merged["order_no"].isin(counts[counts > 1].index),
        "amount_mismatch": both & (merged["amount_ours"] != merged["amount_bank"]),
        "status_mismatch_bank_succeeded": both & bank_paid & (merged["status_ours"] == "failed"),
        "status_mismatch_bank_failed": both & ~bank_paid & ours_paid,
    }  # fmt: skip
    odd = pd.concat(
        [merged.loc[m, ["order_no", "amount_ours", "amount_bank"]].assign(type=t)
         for t, m in masks.items()]
    )  # fmt: skip
    seen_csv, odd_csv = seen.to_csv(header=False).encode(), odd.to_csv(index=False).encode()
    before_copy = time.perf_counter()
    copy_seconds = asyncio.run(_persist(url, seen_csv, odd_csv))
    persist_seconds = before_copy - started + copy_seconds
    return {
        "seconds": seconds,
        "persist_seconds": persist_seconds,
        "peak_mb": peak_mb,
        "persist_peak_mb": _peak_mb(),
        "lines": len(bank),
        "breaks": breaks,
        "dup_lines": int(dup.sum()),
    }


async def _persist(url: str, seen_csv: bytes, breaks_csv: bytes) -> float:
    """COPY the listed orders and the breaks into tables shaped as fundgate's, in one
    transaction; the seconds until it committed (the tables are dropped after)."""
    import io

    import asyncpg

    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            # permanent tables, as fundgate writes: a temporary one would skip the WAL
            await conn.execute(
                "CREATE TABLE bench_seen (LIKE recon_seen INCLUDING ALL);"
                "CREATE TABLE bench_breaks (order_no text, our_amount numeric,"
                " bank_amount numeric, type text)"
            )
            await conn.copy_to_table(
                "bench_seen",
                source=io.BytesIO(seen_csv),
                columns=["order_no", "funder_id", "business_day", "lines", "paid", "amount"],
                format="csv",
            )
            await conn.copy_to_table(
                "bench_breaks", source=io.BytesIO(breaks_csv), format="csv", header=True
            )
        seconds = time.perf_counter() - started
        await conn.execute("DROP TABLE bench_seen, bench_breaks")
    finally:
        await conn.close()
    return seconds


# ---------------------------------------------------------------- driver


def child(mode: str, url: str, statement: str, work: str) -> None:
    if mode == "fundgate":
        out = asyncio.run(run_fundgate(url, Path(statement)))
    else:
        out = run_pandas(url, Path(statement), Path(work))
    out.setdefault("peak_mb", _peak_mb())
    print(json.dumps(out))


def contender(mode: str, url: str, statement: Path, work: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--url", url, "--statement", str(statement),
         "--work", str(work)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "FUNDGATE_LOG_LEVEL": "warning"},
    )  # fmt: skip
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


async def _fresh_database(url: str, target: str, template: str | None) -> str:
    """`target` on the server of `url`, dropped if it exists and, given a `template`, made
    anew as a copy of it (`CREATE DATABASE … TEMPLATE … STRATEGY FILE_COPY`, PostgreSQL 15
    and later); the URL of `target`."""
    import asyncpg

    base = url.rpartition("/")[0]
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
        if template is not None:
            # a file copy, then a checkpoint: the default strategy writes the whole database
            # into the WAL, and the checkpoint that follows would land in a contender's time
            await conn.execute(
                f'CREATE DATABASE "{target}" TEMPLATE "{template}" STRATEGY FILE_COPY'
            )
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return f"{base}/{target}"


def _check_breaks(ours: dict[str, Any], expected: dict[str, int]) -> None:
    got = {**ours["breaks"]}
    exp = {k: v for k, v in expected.items() if k != "auto_resolved"}
    # a run counts the breaks it resolved itself among the breaks it found
    exp["status_mismatch_bank_succeeded"] += expected["auto_resolved"]
    if any(got[k] != v for k, v in exp.items()):
        print(f"  fundgate breaks {got} != expected {exp}", file=sys.stderr)


async def _reset_recon(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE recon_runs, recon_breaks, recon_seen, recon_pending CASCADE")
    finally:
        await conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lines", type=int, action="append", help="N (repeatable); default 1M and 4M")
    p.add_argument("--child", choices=["fundgate", "pandas"])
    p.add_argument("--url")
    p.add_argument("--statement")
    p.add_argument("--work")
    p.add_argument(
        "--history-days",
        type=int,
        default=0,
        help="also N settled attempts on each of that many earlier days (the funder's history)",
    )
    p.add_argument(
        "--listed-days",
        type=int,
        default=0,
        help="also the N orders listed by each of that many earlier statements (what a run\n"
        "looks back on for repeat payouts; 7 is a week of nightly runs)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the two contenders this many times, alternating, each on a fresh copy of the\n"
        "prepared database (CREATE DATABASE ... TEMPLATE; the server must allow it): on a\n"
        "shared machine the ratio within a round is the steadier figure",
    )
    args = p.parse_args()
    if args.child:
        child(args.child, args.url, args.statement, args.work)
        return 0

    from gateway.store.embedded import EmbeddedPostgres

    sizes = args.lines or [1_000_000, 4_000_000]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fundgate-bench-") as tmp:
        work = Path(tmp)
        url = os.environ.get("FUNDGATE_DATABASE_URL")
        pg = None
        if not url:
            pg = EmbeddedPostgres(work / "db", durable=False)
            url = pg.start()
        try:
            for n in sizes:
                statement = work / f"statement-{n}.csv"
                t = time.perf_counter()
                expected = asyncio.run(
                    prepare(url, n, statement, history_days=args.history_days,
                            listed_days=args.listed_days)
                )  # fmt: skip
                print(f"N={n:,}: data ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
                if args.rounds <= 1:
                    ours = contender("fundgate", url, statement, work)
                    base = contender("pandas", url, statement, work)
                    asyncio.run(_reset_recon(url))
                    _check_breaks(ours, expected)
                    rows.append((n, 1, ours, base, os.getloadavg()))
                    print(f"  fundgate {ours}\n  pandas   {base}", file=sys.stderr)
                    continue
                prepared = url.rpartition("/")[2]
                template, fresh_db = f"{prepared}_bench_template", f"{prepared}_bench_round"
                asyncio.run(_fresh_database(url, template, prepared))
                try:
                    for r in range(1, args.rounds + 1):
                        fresh = asyncio.run(_fresh_database(url, fresh_db, template))
                        ours = contender("fundgate", fresh, statement, work)
                        _check_breaks(ours, expected)
                        fresh = asyncio.run(_fresh_database(url, fresh_db, template))
                        base = contender("pandas", fresh, statement, work)
                        rows.append((n, r, ours, base, os.getloadavg()))
                        print(f"  round {r}: fundgate {ours['seconds']:.2f} s, pandas "
                              f"{base['seconds']:.2f} s", file=sys.stderr)  # fmt: skip
                finally:
                    for db in (fresh_db, template):
                        asyncio.run(_fresh_database(url, db, None))
        finally:
            if pg is not None:
                pg.stop()

    # "pandas + persist": the same pandas job also COPYing back what fundgate keeps (every
    # order listed, the breaks), the like-for-like yardstick, timed from the same start
    print(
        "| N | round | statement lines | fundgate s | fundgate lines/s | fundgate peak MB "
        "| pandas s | pandas lines/s | pandas peak MB | pandas + persist s | fundgate / pandas "
        "| load (1, 5 min) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r, ours, base, load in rows:
        print(
            f"| {n:,} | {r} | {ours['lines']:,} | {ours['seconds']:.1f} | "
            f"{ours['lines'] / ours['seconds']:,.0f} | {ours['peak_mb']:.0f} | "
            f"{base['seconds']:.1f} | {base['lines'] / base['seconds']:,.0f} | "
            f"{base['peak_mb']:.0f} | {base['persist_seconds']:.1f} | "
            f"{ours['seconds'] / base['seconds']:.2f}× | {load[0]:.1f}, {load[1]:.1f} |"
        )
    # where fundgate's time goes (`recon.finished` phases): the first four are the work the
    # pandas baseline also does (read, join, classify); the rest is what it skips (persisting
    # what the statement listed, the pending pool and the breaks, resolving through the state
    # machine, the ledger comparison)
    for n, r, ours, _, _ in rows:
        phases = ours["phases"]
        alike = sum(phases.get(k, 0.0) for k in ("stage", "match", "duplicates", "classify"))
        listed = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
        print(f"\nN = {n:,}, round {r}: {listed}; read + match + classify {alike:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
