"""Every query of the nightly reconciliation (`gateway.reconcile`). Functions take a
connection; the caller owns the transaction.

A run streams its statement into a table of its own with COPY (unlogged, dropped before the
run commits: `drop_stage`), records the orders it lists
(its own partition of `recon_seen`, one row per order), and does the matching where the data
lives: each order recorded there joined against the funder's attempts and earlier
statements; the common case (one line, same amount, same final status) is only counted, and
the rest is kept with what its lines say (`recon_odd`) and read back to be classified one by
one.

Order numbers in the run's own tables and in `recon_seen` compare bytewise (`COLLATE
"C"`, migration 0012): a million of them are sorted and indexed per run, and a locale-aware
comparison sorts them half as fast for the same answer (equality is the same under every
deterministic collation). Where such a column meets one of the default collation
(`attempts`, `recon_breaks`, `recon_pending`), one side is given the other's collation
explicitly, the run's side where a permanent table's index should stay usable.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, get_args

import asyncpg

from gateway.store.queries import Conn

STAGE_COLUMNS = ("line_no", "order_no", "bank_ref", "amount", "status", "booked_at")
BREAK_COLUMNS = (
    "order_no", "type", "status", "severity", "reason", "attempt_id", "txn_no", "our_status",
    "our_amount", "bank_status", "bank_amount", "bank_ref", "bank_lines", "line_no", "evidence",
)  # fmt: skip

# ---------------------------------------------------------------- runs


async def start_run(conn: Conn, funder_id: str, day: date, trigger: str) -> asyncpg.Record:
    """The run of (funder, day), created or restarted; breaks of an earlier run stay."""
    row = await conn.fetchrow(
        """
        INSERT INTO recon_runs AS r (funder_id, business_day, status, trigger)
        VALUES ($1, $2, 'running', $3)
        ON CONFLICT (funder_id, business_day) DO UPDATE
           SET status = 'running', trigger = EXCLUDED.trigger, runs = r.runs + 1,
               started_at = now(), finished_at = NULL, error = NULL
        RETURNING *
        """,
        funder_id,
        day,
        trigger,
    )
    assert row is not None
    return row


async def fail_run(conn: Conn, run_id: int, error: str) -> None:
    await conn.execute(
        "UPDATE recon_runs SET status = 'failed', error = $2, finished_at = now() WHERE id = $1",
        run_id,
        error[:2000],
    )


async def finish_run(
    conn: Conn, run_id: int, lines: int, amount: int, summary: dict[str, Any]
) -> asyncpg.Record:
    row = await conn.fetchrow(
        """UPDATE recon_runs SET status = 'succeeded', error = NULL, finished_at = now(),
                  lines = $2, amount = $3, summary = $4
            WHERE id = $1 RETURNING *""",
        run_id,
        lines,
        amount,
        summary,
    )
    assert row is not None
    return row


async def get_run(conn: Conn, run_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM recon_runs WHERE id = $1", run_id)


async def run_of(conn: Conn, funder_id: str, day: date) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM recon_runs WHERE funder_id = $1 AND business_day = $2", funder_id, day
    )


async def list_runs(
    conn: Conn, *, day: date | None, funder_id: str | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT * FROM recon_runs
            WHERE ($1::date IS NULL OR business_day = $1)
              AND ($2::text IS NULL OR funder_id = $2)
            ORDER BY business_day DESC, funder_id LIMIT $3""",
        day,
        funder_id,
        limit,
    )


async def done_days(conn: Conn, funder_id: str, since: date) -> dict[date, asyncpg.Record]:
    """Runs of a funder from `since` on, by day: what the scheduler need not run again."""
    rows = await conn.fetch(
        "SELECT * FROM recon_runs WHERE funder_id = $1 AND business_day >= $2",
        funder_id,
        since,
    )
    return {r["business_day"]: r for r in rows}


async def first_attempt_at(conn: Conn, funder_id: str) -> datetime | None:
    at: datetime | None = await conn.fetchval(
        "SELECT min(created_at) FROM attempts WHERE funder_id = $1", funder_id
    )
    return at


# ---------------------------------------------------------------- staging and matching


@dataclass(slots=True)
class StageTotals:
    """The staged statement's lines, their amount, and its net paid total (succeeded minus
    reversed lines), counted as it is staged."""

    lines: int = 0
    amount: int = 0
    paid: int = 0

    def add(self, amount: int, status: str) -> None:
        self.lines += 1
        self.amount += amount
        if status == "succeeded":
            self.paid += amount
        elif status == "reversed":
            self.paid -= amount


# The staged statement is a plain table of the run's own, UNLOGGED, created inside the run's
# transaction and dropped before it commits (`drop_stage`): no other session ever sees it, a
# rollback takes it back with the rest, and, unlike a temporary table, it lives in shared
# buffers, where PostgreSQL's parallel workers can read it (the grouping into `recon_seen`,
# the checks and totals over a million lines use both cores) and a million lines are not
# evicted through the session's small local buffers; being unlogged, its lines write no WAL.
# `recon_stage` is a temporary view over it under one name, whichever path staged it.


RunTable = Literal["raw", "lines", "joined"]  # the fast path's file, the parser's, the match's


def _run_table(kind: RunTable, run_id: int) -> str:
    return f"recon_{kind}_{run_id}"


async def create_stage(conn: Conn, run_id: int) -> None:
    table = _run_table("lines", run_id)
    await conn.execute(
        f"""
        CREATE UNLOGGED TABLE {table} (
            line_no   bigint NOT NULL,
            order_no  text COLLATE "C" NOT NULL,
            bank_ref  text COLLATE "C",
            amount    bigint NOT NULL,
            status    text   NOT NULL,
            booked_at timestamptz
        ) WITH (autovacuum_enabled = off)
        """
    )
    await conn.execute(f"CREATE TEMP VIEW recon_stage AS SELECT * FROM {table}")


async def copy_stage(conn: Conn, run_id: int, records: AsyncIterable[tuple[Any, ...]]) -> None:
    table = _run_table("lines", run_id)
    await conn.copy_records_to_table(
        table, records=records, columns=STAGE_COLUMNS, timeout=RUN_TIMEOUT
    )
    # statistics before the joins: without them a new table looks like a few hundred orders,
    # and a million index look-ups into `attempts` replace one hash join
    await _analyze_sampled(conn, table)


# ---- the fast path of a sandbox-CSV file: its bytes COPYed as they are, checked in SQL

RAW_COLUMNS = ("order_no", "bank_ref", "amount", "status", "finished_at")
# A time the fast path takes as PostgreSQL reads it: exactly ISO 8601 with an offset, which
# `datetime.fromisoformat` reads to the same instant (anything else goes to the parser).
_TIME = (
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d"
    r"(\.\d{1,6})?(Z|[+-](0\d|1[0-4]):[0-5]\d)$"
)


async def create_raw(conn: Conn, run_id: int) -> None:
    """The data lines of a sandbox-CSV file as COPY reads them (the header skipped): `line_no`
    is the file's line (each row is one line: the caller lets no blank line, no quote and no
    line end inside a field through), the amount already an integer, the time still text.

    The numbers come from the table's own sequence in blocks (`CACHE`): only this session
    uses it, so they stay consecutive, and a million lines no longer take a million trips to
    the sequence (a fifth of the COPY's time)."""
    await conn.execute(
        f"""
        CREATE UNLOGGED TABLE {_run_table("raw", run_id)} (
            line_no     bigint GENERATED ALWAYS AS IDENTITY (START WITH 2 CACHE 100000),
            order_no text COLLATE "C", bank_ref text COLLATE "C", amount bigint, status text,
            finished_at text
        ) WITH (autovacuum_enabled = off)
        """
    )


async def copy_raw(conn: Conn, run_id: int, source: AsyncIterable[bytes]) -> int:
    """The file's bytes into the run's raw table (`create_raw`); PostgreSQL parses the CSV and
    the amounts (a line with another field count, or an amount that is no integer, raises).
    Returns the rows."""
    status = await conn.copy_to_table(
        _run_table("raw", run_id),
        source=source,
        columns=RAW_COLUMNS,
        format="csv",
        header=True,
        timeout=RUN_TIMEOUT,
    )
    return int(status.split()[-1])


async def stage_raw(conn: Conn, run_id: int) -> StageTotals | None:
    """Check the raw table in one pass (every field there, a known status word, no negative
    amount; the distinct times in the exact ISO shape and real instants) and make it the
    `recon_stage` of the run: a view mapping the status words; its totals, counted in the
    same pass. None when a line is not in the fast path's shape. A time that is no real
    instant raises `asyncpg.DataError`. The lines are grouped by their time as they are
    checked, so each distinct time is then checked once (`OFFSET 0` keeps that check above the
    grouping): a day's statement has far fewer distinct times than lines."""
    raw = _run_table("raw", run_id)
    row = await _big_row(
        conn,
        f"""
        SELECT coalesce(bool_or(bad OR (finished_at IS NOT NULL
                                        AND (finished_at !~ '{_TIME}'
                                             OR finished_at::timestamptz IS NULL))), false)
                   AS odd,
               coalesce(sum(lines), 0)::bigint AS lines,
               coalesce(sum(amount), 0)::bigint AS amount,
               coalesce(sum(paid), 0)::bigint AS paid
          FROM (SELECT finished_at,
                       bool_or(order_no IS NULL OR amount IS NULL OR amount < 0
                               OR status IS NULL
                               OR status NOT IN ('SUCCESS', 'FAILED', 'REVERSED')) AS bad,
                       count(*) AS lines, sum(amount) AS amount,
                       sum(CASE status WHEN 'SUCCESS' THEN amount WHEN 'REVERSED' THEN -amount
                                       ELSE 0 END) AS paid
                  FROM {raw} GROUP BY finished_at OFFSET 0) t
        """,
    )
    assert row is not None
    if row["odd"]:
        return None
    await _analyze_sampled(conn, raw)  # as `copy_stage`: the joins need its shape
    await conn.execute(
        f"""
        CREATE TEMP VIEW recon_stage ({", ".join(STAGE_COLUMNS)}) AS
        SELECT line_no, order_no, bank_ref, amount,
               CASE status WHEN 'SUCCESS' THEN 'succeeded' WHEN 'FAILED' THEN 'failed'
                           ELSE 'reversed' END,
               finished_at::timestamptz
          FROM {raw}
        """
    )
    return StageTotals(int(row["lines"]), int(row["amount"]), int(row["paid"]))


async def _big_row(conn: Conn, query: str, *args: Any) -> asyncpg.Record | None:
    """The one row (or none) of a query over the whole statement, with the run's timeout.
    Not `fetchrow`: it asks the server for one row at most, and PostgreSQL runs a query
    whose rows are fetched in part without its parallel workers (at 1M lines the staging
    check took 0.28 s alone instead of about half that)."""
    rows = await conn.fetch(query, *args, timeout=RUN_TIMEOUT)
    return rows[0] if rows else None


async def drop_stage(conn: Conn, run_id: int) -> None:
    """The staged statement (`recon_stage` and the table under it) and the match's table,
    before the run commits: a temporary view outlives the transaction, and the tables are the
    run's alone."""
    await conn.execute("DROP VIEW IF EXISTS pg_temp.recon_stage")
    tables = ", ".join(_run_table(kind, run_id) for kind in get_args(RunTable))
    await conn.execute(f"DROP TABLE IF EXISTS {tables}")


# A run's own statements wait this long before the client cancels them, not the pool's
# `command_timeout` (30 s, for requests): staging lasts as long as the statement takes to
# arrive and be parsed (a million camt.053 entries take about a minute to parse), and the
# grouping, the match and the breaks as long as the data.
RUN_TIMEOUT = 6 * 3600.0

# the run's transaction: its hash aggregate and joins over a million orders spill to disk at
# PostgreSQL's 4 MB default; SET LOCAL ends with the transaction
RUN_WORK_MEM = "64MB"


async def tune_run(conn: Conn) -> None:
    """Session settings for the run's one big transaction (`SET LOCAL`: they end with it).

    `synchronous_commit = off` lets its commit return before the WAL reaches the disk. It
    writes only what the statement derives (the orders it listed, the pending pool, breaks),
    and a day is re-run idempotently; a crash in that moment loses the whole transaction, never
    part of it (the run stays `running` and the scheduler runs the day again), and any later
    durable commit (an automatic resolution, a person's resolution) flushes the WAL up to
    itself first, so nothing that depends on it can survive without it. The state machine's
    transactions (`gateway.outcomes`) keep the server's setting.

    `parallel_tuple_cost = 0`: the run's big statements (the grouping into `recon_seen`, the
    match, whose filter keeps a few orders in a hundred, which the planner cannot know) pass
    many rows through a parallel plan's Gather, which the planner overprices and then stays
    serial, at half speed."""
    await conn.execute(f"SET LOCAL work_mem = '{RUN_WORK_MEM}'")
    await conn.execute("SET LOCAL synchronous_commit = off")
    await conn.execute("SET LOCAL parallel_tuple_cost = 0")


async def duplicate_line(conn: Conn) -> tuple[int, int] | None:
    """(first, repeat) line numbers of the first line that repeats another exactly, after
    `match`: only an order on several lines can hold one, every such order is among the odd
    ones, and `recon_odd` flags those whose lines repeat (`repeats`); their lines are read
    again only when there is one."""
    row = await conn.fetchrow(
        """
        SELECT lines[1] AS first, lines[2] AS repeat FROM (
            SELECT array_agg(s.line_no ORDER BY s.line_no) AS lines
              FROM recon_stage s
             WHERE s.order_no IN (SELECT order_no FROM recon_odd WHERE repeats)
             GROUP BY s.order_no, s.bank_ref, s.amount, s.status, s.booked_at
            HAVING count(*) > 1) d
         WHERE EXISTS (SELECT 1 FROM recon_odd WHERE repeats)
         ORDER BY lines[2] LIMIT 1
        """,
        timeout=RUN_TIMEOUT,
    )
    return None if row is None else (row["first"], row["repeat"])


# What the statement says of each order the match kept, from its lines (`{joined}` holds
# a few orders in a hundred; the orders on several lines are aggregated with them).
_LINES = """(
    SELECT order_no,
           (count(*) FILTER (WHERE status = 'succeeded'))::int AS succeeded,
           (count(*) FILTER (WHERE status = 'failed'))::int AS failed,
           (count(*) FILTER (WHERE status = 'reversed'))::int AS reversed,
           min(amount) AS amount_min, max(amount) AS amount_max, min(line_no) AS line_no,
           min(bank_ref) AS bank_ref,
           sum(CASE status WHEN 'succeeded' THEN amount WHEN 'reversed' THEN -amount
                           ELSE 0 END)::bigint AS net_paid,
           sum(amount)::bigint AS amount_sum,
           count(DISTINCT (bank_ref, amount, status, booked_at)) < count(*) AS repeats
      FROM recon_stage
     WHERE order_no IN (SELECT order_no FROM {joined})
     GROUP BY order_no)"""


@dataclass(frozen=True, slots=True)
class Totals:
    """What `match` counted: the statement's lines and amount, the plain matches, and
    its net paid total (succeeded minus reversed lines). The part of that total for orders of
    another business day is the odd orders' (`odd_rows`' `ledger_day`)."""

    lines: int
    amount: int
    matched: int
    matched_amount: int
    paid: int


async def match(
    conn: Conn,
    funder_id: str,
    day: date,
    bounds: tuple[datetime, datetime],
    sent_from: datetime,
    earlier_from: date,
    run_id: int,
    zone: str,
    stage: StageTotals,
    orders: int,
) -> Totals:
    """Match the statement (after `record_seen`): each order it lists, as recorded in the
    day's partition of `recon_seen` (one row per order: its lines, net paid count and
    amount), joined with our attempt and what earlier statements of the last days listed;
    only the orders that are not plain matches are kept (the run's `recon_joined_<run>`),
    then given what their lines say (statuses, amounts, first line, bank reference:
    `_LINES`) and numbered in statement order (`recon_odd`), to be classified one by one. A
    plain match is one line, never listed before, not already resolved by this day's run,
    same amount and final status (`reconciliation.classify.is_plain_match`) of an order of
    this business day: it changes nothing but counts, so the joined rows of nearly every
    order are counted, not written. The counts are the statement's own totals (`stage`,
    counted as it was staged, and the `orders` it listed, as `record_seen` wrote them) less
    what the odd orders hold.

    The join hashes only the funder's attempts sent from `sent_from` on (the days a statement
    lists nearly every order from), not the funder's whole history; an order the statement
    lists whose attempt is older (a late listing, a payout that hung for days) is looked up by
    its order number (`attempts`' unique index), one look-up per such order. The same join (a
    FULL JOIN) also keeps the funder's attempts of the day (`bounds`) that the statement does
    not list and that have not failed (no `line_no`), and the fail-overs (`n > 1`) sent after
    the day, which may be of a disbursement of the day: the pending pool's newcomers
    (`sweep_pending`), without an anti-join of their own. Those fail-overs are among the
    attempts the join reads anyway, and few.

    The plain test reads `attempts` alone, so the million-row join never touches
    `disbursements`: an attempt's amount is its allocation's total (`alloc_funder +
    alloc_platform`, which `routing.allocation` makes the disbursement's amount), and a first
    attempt (`n = 1`) is written by intake with the disbursement, stamped from the same clock
    reading the business day is derived from, so its creation inside `bounds` (the day in the
    business time zone) is the disbursement's business day. Anything else (a fail-over's
    attempt, an order of another day) is odd and classified with the disbursement's own
    amount and day (`odd_rows`), with the same verdict.

    What earlier statements listed (from `earlier_from` on) is read in two steps. The join
    reads the day before's statement only: an order sent this day cannot be on an older one
    (a statement lists what the bank executed on its day, and the two days may be offset by
    hours, not by a day), so for a plain match that is the whole look-back. The odd orders
    not sent this day (and those we do not know) are then looked up in the older statements
    by their key, a few probes each, instead of the million orders of the day being hashed
    against a week of statements (with seven days of a million orders each, that took the
    match from 1.3 to 3.8-4.0 s).

    The million-row join reads no temporary table (invisible to parallel workers), so
    PostgreSQL (16 and later) can hash and join it in parallel."""
    # a table of the run's own, as its stage: read in parallel
    joined = _run_table("joined", run_id)
    await conn.execute(
        f"""
        CREATE UNLOGGED TABLE {joined} WITH (autovacuum_enabled = off) AS
        WITH auto AS (
            SELECT order_no, min(type) AS type FROM recon_breaks
             WHERE run_id = $3 AND status = 'auto_resolved' GROUP BY order_no)
        SELECT b.order_no, b.lines, e.paid AS earlier_paid, au.type AS auto_type,
               a.id AS a_id, a.order_no AS a_order_no, a.status AS a_status, a.n AS a_n,
               a.created_at AS a_created_at, a.disbursement_id AS a_disbursement_id
          FROM (SELECT order_no, lines, paid, amount FROM recon_seen
                 WHERE funder_id = $1 AND business_day = $2) b
          LEFT JOIN recon_seen e  -- the day before's statement only: the older ones in `recon_odd`
                 ON e.funder_id = $1 AND e.business_day = $2::date - 1 AND e.order_no = b.order_no
          LEFT JOIN auto au ON au.order_no = b.order_no COLLATE "default"
          FULL JOIN (SELECT id, order_no, status, n, created_at, alloc_funder,
                            alloc_platform, disbursement_id
                       FROM attempts WHERE funder_id = $1 AND created_at >= $6) a
                 ON a.order_no = b.order_no COLLATE "default"
         WHERE CASE WHEN b.order_no IS NULL  -- not listed, not failed: sent on the day, or
                    -- a fail-over sent after it (its disbursement's day: `sweep_pending`)
                    THEN a.created_at >= $4 AND (a.created_at < $5 OR a.n > 1)
                         AND a.status <> 'failed'
                    ELSE NOT coalesce(  -- one line: paid 1 is succeeded, 0 failed
               a.id IS NOT NULL AND b.lines = 1 AND e.order_no IS NULL AND au.type IS NULL
               AND a.n = 1 AND a.created_at >= $4 AND a.created_at < $5
               AND b.amount = a.alloc_funder + a.alloc_platform
               AND ((b.paid = 1 AND a.status = 'succeeded')
                    OR (b.paid = 0 AND a.status = 'failed')), false) END
        """,
        funder_id,
        day,
        run_id,
        *bounds,
        sent_from,
        timeout=RUN_TIMEOUT,
    )
    await conn.execute(
        f"""
        CREATE TEMP TABLE recon_odd ON COMMIT DROP AS
        SELECT row_number() OVER (ORDER BY d.line_no) AS i,
               j.order_no, j.lines, d.succeeded, d.failed, d.reversed, d.amount_min,
               d.amount_max, d.amount_sum, d.line_no, d.bank_ref, d.net_paid, d.repeats,
               CASE WHEN j.earlier_paid IS NOT NULL OR x.n > 0
                    THEN coalesce(j.earlier_paid, 0) + coalesce(x.paid, 0) END AS earlier_paid,
               j.auto_type,
               coalesce(j.a_id, o.id) AS attempt_id, j.a_n AS our_n,
               coalesce(j.a_order_no, o.order_no) AS our_order_no,
               coalesce(j.a_status, o.status) AS our_status,
               coalesce(j.a_disbursement_id, o.disbursement_id) AS disbursement_id,
               (coalesce(j.a_created_at, o.created_at) AT TIME ZONE $2)::date AS our_day
          FROM {joined} j
          LEFT JOIN {_LINES.format(joined=joined)} d ON d.order_no = j.order_no
          LEFT JOIN LATERAL (  -- only for a listed order with no attempt since `sent_from`
              SELECT id, order_no, status, created_at, disbursement_id FROM attempts
               WHERE j.a_id IS NULL AND j.order_no IS NOT NULL
                 AND order_no = j.order_no COLLATE "default" AND funder_id = $1
              OFFSET 0) o ON true
          CROSS JOIN LATERAL (  -- the older statements, only for an order not sent this day
              SELECT sum(s.paid)::int AS paid, count(*) AS n FROM recon_seen s
               WHERE j.order_no IS NOT NULL
                 AND NOT coalesce(coalesce(j.a_created_at, o.created_at) >= $3
                                  AND coalesce(j.a_created_at, o.created_at) < $4, false)
                 AND s.funder_id = $1 AND s.business_day >= $5
                 AND s.business_day < $6::date - 1 AND s.order_no = j.order_no) x
        """,
        funder_id,
        zone,
        *bounds,
        earlier_from,
        day,
        timeout=RUN_TIMEOUT,
    )
    # `odd_rows` reads it a page at a time
    await conn.execute("CREATE INDEX ON recon_odd (i)", timeout=RUN_TIMEOUT)
    # the listed orders' counts, from the statement's totals less what the odd orders hold:
    # every order on several lines is odd, so the rest of the amount is that of the orders on
    # one line, and the plain matches are those of them that are not odd
    row = await conn.fetchrow(
        """SELECT count(*) AS n,
                  coalesce(sum(amount_min) FILTER (WHERE lines = 1), 0)::bigint AS single,
                  coalesce(sum(amount_sum) FILTER (WHERE lines > 1), 0)::bigint AS several
             FROM recon_odd WHERE line_no IS NOT NULL""",
        timeout=RUN_TIMEOUT,
    )
    assert row is not None
    return Totals(
        lines=stage.lines,
        amount=stage.amount,
        matched=orders - int(row["n"]),
        matched_amount=stage.amount - int(row["several"]) - int(row["single"]),
        paid=stage.paid,
    )


LEDGER_PAYOUT_KINDS = (
    "disbursement.paid",
    "disbursement.corrected_succeeded",
    "disbursement.corrected_failed",
)


async def ledger_paid(conn: Conn, funder_id: str, day: date) -> int:
    """The ledger's net settled payouts of a funder's business day: `payout:borrowers` entries
    of payouts and their corrections (index `ledger_entries_account_day`, migration 0010)."""
    total = await conn.fetchval(
        """SELECT coalesce(sum(e.amount), 0)::bigint
             FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id
            WHERE e.account = 'payout:borrowers' AND e.business_day = $2
              AND t.funder_id = $1 AND t.kind = ANY($3::text[])""",
        funder_id,
        day,
        list(LEDGER_PAYOUT_KINDS),
    )
    return int(total)


async def odd_rows(conn: Conn, after: int, limit: int) -> list[asyncpg.Record]:
    """The orders that are not plain matches, a page at a time, in statement order, with
    their disbursement's amount, transaction number and business day (`ledger_day`)."""
    return await conn.fetch(
        # a look-up per order (`OFFSET 0` keeps the planner from hashing all disbursements)
        """SELECT o.*, d.amount AS our_amount, d.txn_no, d.business_day AS ledger_day
             FROM (SELECT * FROM recon_odd WHERE i > $1 AND line_no IS NOT NULL
                    ORDER BY i LIMIT $2) o
             LEFT JOIN LATERAL (SELECT amount, txn_no, business_day FROM disbursements
                                 WHERE id = o.disbursement_id OFFSET 0) d ON true
            ORDER BY o.i""",
        after,
        limit,
        timeout=RUN_TIMEOUT,
    )


_SEEN_ROWS = """
    SELECT $1::text AS funder_id, $2::date AS business_day, order_no, count(*)::int AS lines,
           (count(*) FILTER (WHERE status = 'succeeded')
            - count(*) FILTER (WHERE status = 'reversed'))::int AS paid,
           max(amount)::bigint AS amount
      FROM recon_stage GROUP BY order_no ORDER BY order_no"""
_SEEN_COLUMNS = "(funder_id, business_day, order_no, lines, paid, amount)"


async def record_seen(conn: Conn, funder_id: str, day: date) -> int:
    """What this statement listed, one row per order, as the (funder, day) partition of
    `recon_seen` (migration 0012), replacing an earlier run of the same day. Written right
    after staging: the rest of the run reads it (the match, the pending pool).

    A first run of the day creates a table of its own from the grouped lines in key order
    (`CREATE TABLE AS` writes in bulk; one sort serves the grouping, the load and the key),
    builds its primary key once and attaches it. A re-run empties
    its partition and inserts again. Runs of any funder take `recon_seen` (the parent alone,
    so autovacuum of a partition is not in the way) in SHARE UPDATE EXCLUSIVE mode first,
    which only they conflict with: from here to their commit they go one at a time, so a
    run's partition DDL never meets another run's half-way (nothing but runs reads it).

    Returns the orders written."""
    # waits for another funder's run to commit, however long that run takes
    await conn.execute(
        "LOCK TABLE ONLY recon_seen IN SHARE UPDATE EXCLUSIVE MODE", timeout=RUN_TIMEOUT
    )
    row = await conn.fetchrow(
        """SELECT quote_ident(p) AS name, to_regclass(quote_ident(p)) IS NOT NULL AS exists,
                  format('ALTER TABLE recon_seen ATTACH PARTITION %I'
                         ' FOR VALUES FROM (%L, %L) TO (%L, %L)', p, $1::text, $2::date,
                         $1::text, $2::date + 1) AS attach,
                  format('CHECK (funder_id = %L AND business_day = %L)', $1::text, $2::date)
                      AS bounds
             FROM recon_seen_partition($1, $2) AS p""",
        funder_id,
        day,
    )
    assert row is not None
    table = row["name"]
    if row["exists"]:
        await conn.execute(f"TRUNCATE {table}")
        status = await conn.execute(
            f"INSERT INTO {table} {_SEEN_COLUMNS} {_SEEN_ROWS}", funder_id, day, timeout=RUN_TIMEOUT
        )
        await _analyze_sampled(conn, table)
        return int(status.split()[-1])
    status = await conn.execute(
        f"CREATE TABLE {table} AS {_SEEN_ROWS}", funder_id, day, timeout=RUN_TIMEOUT
    )
    # the parent's constraints, in one pass over the table (attaching requires them), and
    # one that implies the partition's bounds, checked in the same pass: attaching then
    # trusts it instead of scanning the table again
    await conn.execute(
        f"""ALTER TABLE {table} ALTER lines SET NOT NULL, ALTER paid SET NOT NULL,
                ALTER amount SET NOT NULL, ADD {row["bounds"]},
                ADD PRIMARY KEY (order_no, funder_id, business_day)""",
        timeout=RUN_TIMEOUT,
    )
    await conn.execute(row["attach"])  # the key above becomes the partition's part of the parent's
    await _analyze_sampled(conn, table)
    return int(status.split()[-1])


async def _analyze_sampled(conn: Conn, table: str) -> None:
    """Statistics of a table the run has just written, before its joins read it, from a small
    sample. A new table looks nearly empty to the planner, which then hashes it as the small
    side of a million-row join and grows the hash as the rows come (at 4M orders the match
    took 1.6-3 s longer), or looks its rows up one by one. The plans need the row count and
    that order numbers are (nearly) unique, which 3,000 rows tell as well as the default
    30,000: ANALYZE of a million staged lines took 0.1 s, now 0.02 s."""
    await conn.execute("SET LOCAL default_statistics_target = 10")
    await conn.execute(f"ANALYZE {table}", timeout=RUN_TIMEOUT)
    await conn.execute("SET LOCAL default_statistics_target TO DEFAULT")


# how long pruning waits for a run of another funder to commit before leaving it to later
PRUNE_LOCK_TIMEOUT = "5s"


async def prune_seen(conn: Conn, funder_id: str, keep_from: date) -> list[str]:
    """Drop the funder's partitions of `recon_seen` older than `keep_from`, in a short
    transaction of its own after the run's (dropping a partition locks the parent table
    exclusively). Returns the tables dropped; none when another run holds `recon_seen` past
    `PRUNE_LOCK_TIMEOUT` (the next run prunes them).

    A partition's day is the `YYYYMMDD` its name ends with (`recon_seen_partition`), compared
    as text, which orders as the days do: nothing is parsed, because the planner may test the
    condition on any relation of `pg_class` before the join keeps the partitions (with a hash
    join it did, and `to_date` of a TOAST table's name failed the run after its commit)."""
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{PRUNE_LOCK_TIMEOUT}'")
            rows = await conn.fetch(
                """SELECT quote_ident(c.relname) AS name
                     FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,
                          recon_seen_partition($1, $2) AS p
                    WHERE i.inhparent = 'recon_seen'::regclass
                      AND left(c.relname, -8) = left(p, -8)
                      AND right(c.relname, 8) < right(p, 8)
                    ORDER BY c.relname""",
                funder_id,
                keep_from,
            )
            names = [str(r["name"]) for r in rows]
            if names:
                await conn.execute(f"DROP TABLE {', '.join(names)}")
    except asyncpg.LockNotAvailableError:
        return []
    return names


async def sweep_pending(conn: Conn, funder_id: str, day: date, keep_from: date) -> None:
    """The pool after this statement: orders it lists are found (recomputed from
    `recon_seen`, so re-running a day with another file is exact); the orders it does not
    list (`match` kept them) join the pool, expected from their disbursement's business day,
    the day the ledger books the payout on, so that the ledger comparison of that day awaits
    them. For a first attempt that is the statement's day; a fail-over's is read by key (few
    of them): one sent after midnight belongs to the day before, and one sent after this day
    joins here only if it is this day's (a later day's waits for its own run), found on the
    later statement that already lists it, if any (an older day re-run)."""
    await conn.execute(
        """
        UPDATE recon_pending p
           SET seen_day = (SELECT min(s.business_day) FROM recon_seen s
                            WHERE s.funder_id = p.funder_id
                              AND s.order_no = p.order_no COLLATE "C"
                              AND s.business_day >= p.expected_day)
         WHERE p.funder_id = $1
           AND (p.seen_day = $2
                OR EXISTS (SELECT 1 FROM recon_seen s
                            WHERE s.funder_id = $1 AND s.business_day = $2
                              AND s.order_no = p.order_no COLLATE "C"))
        """,
        funder_id,
        day,
        timeout=RUN_TIMEOUT,
    )
    await conn.execute(
        """
        INSERT INTO recon_pending (funder_id, order_no, attempt_id, expected_day, seen_day)
        SELECT $1, o.our_order_no, o.attempt_id, coalesce(d.business_day, $2),
               CASE WHEN d.business_day IS NOT NULL THEN
                   (SELECT min(s.business_day) FROM recon_seen s
                     WHERE s.funder_id = $1 AND s.business_day > $2
                       AND s.order_no = o.our_order_no COLLATE "C") END
          FROM recon_odd o
          LEFT JOIN LATERAL (SELECT business_day FROM disbursements
                              WHERE o.our_n > 1 AND id = o.disbursement_id OFFSET 0) d ON true
         WHERE o.line_no IS NULL AND coalesce(d.business_day, $2) <= $2
        ON CONFLICT (funder_id, order_no) DO NOTHING
        """,
        funder_id,
        day,
        timeout=RUN_TIMEOUT,
    )
    await conn.execute(
        "DELETE FROM recon_pending WHERE funder_id = $1 AND expected_day < $2",
        funder_id,
        keep_from,
        timeout=RUN_TIMEOUT,
    )


async def absent(
    conn: Conn, funder_id: str, day: date, since: date, page: int
) -> AsyncIterator[list[asyncpg.Record]]:
    """Orders of ours from `since` to `day` that no statement up to `day` has listed, in
    order-number order, `page` at a time (the pool holds a whole day when a bank leaves one
    out). One query read through a cursor, inside the run's transaction: each page asked for
    again from the one after the last would have read the rest of the pool again, joined
    with its attempts and disbursements, and sorted it (the pool is written in the same
    transaction, so the planner knows nothing of its size): at 4M orders with 40,000 of them
    unlisted, eight pages read 180,000 rows and took 3.1 s."""
    cursor = await conn.cursor(
        """
        SELECT p.order_no, p.expected_day, a.id AS attempt_id, a.status AS our_status,
               d.amount AS our_amount, d.txn_no
          FROM recon_pending p
          JOIN attempts a ON a.id = p.attempt_id
          JOIN disbursements d ON d.id = a.disbursement_id
         WHERE p.funder_id = $1 AND p.expected_day <= $2 AND p.expected_day >= $3
           AND (p.seen_day IS NULL OR p.seen_day > $2)
         ORDER BY p.order_no
        """,
        funder_id,
        day,
        since,
        timeout=RUN_TIMEOUT,
    )
    while rows := await cursor.fetch(page, timeout=RUN_TIMEOUT):
        yield rows


async def missing_reported_elsewhere(
    conn: Conn, funder_id: str, run_id: int, order_nos: Sequence[str]
) -> set[str]:
    """Orders that already have a `missing_at_bank` break from another run (the type spelled
    out, so that every plan of this statement reads the partial index of those breaks,
    migration 0015)."""
    if not order_nos:
        return set()
    rows = await conn.fetch(
        """SELECT order_no FROM recon_breaks
            WHERE funder_id = $1 AND type = 'missing_at_bank' AND run_id <> $2
              AND order_no = ANY($3::text[])""",
        funder_id,
        run_id,
        list(order_nos),
    )
    return {r["order_no"] for r in rows}


async def close_found_late(conn: Conn, funder_id: str, run_id: int, day: date) -> int:
    """Open `missing_at_bank` breaks of earlier runs whose order this statement lists after
    all: closed automatically, with the line as evidence."""
    status = await conn.execute(
        """
        UPDATE recon_breaks r
           SET status = 'auto_resolved', resolution = 'auto', resolved_by = 'reconciliation',
               resolved_at = now(), updated_at = now(),
               note = 'listed late, on the statement of ' || $3::date::text || ' line '
                      || b.line_no,
               evidence = coalesce(r.evidence, '{}'::jsonb) || jsonb_build_object(
                   'found_on', $3::date, 'line_no', b.line_no, 'bank_ref', b.bank_ref,
                   'succeeded', b.succeeded, 'failed', b.failed, 'reversed', b.reversed)
          FROM (SELECT order_no, min(line_no) AS line_no, min(bank_ref) AS bank_ref,
                       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                       count(*) FILTER (WHERE status = 'failed') AS failed,
                       count(*) FILTER (WHERE status = 'reversed') AS reversed
                  FROM recon_stage
                 WHERE order_no IN (SELECT order_no COLLATE "C" FROM recon_breaks
                                     WHERE funder_id = $1 AND type = 'missing_at_bank'
                                       AND status = 'open' AND run_id <> $2)
                 GROUP BY order_no) b
         WHERE r.funder_id = $1 AND r.order_no = b.order_no COLLATE "default"
           AND r.type = 'missing_at_bank'
           AND r.status = 'open' AND r.run_id <> $2
        """,
        funder_id,
        run_id,
        day,
        timeout=RUN_TIMEOUT,
    )
    return int(status.split()[-1])


# ---------------------------------------------------------------- breaks


async def create_new_breaks(conn: Conn) -> None:
    await conn.execute(
        """
        CREATE TEMP TABLE recon_new_breaks (
            order_no text, type text, status text, severity text, reason text,
            attempt_id bigint, txn_no text, our_status text, our_amount bigint,
            bank_status text, bank_amount bigint, bank_ref text, bank_lines integer,
            line_no bigint, evidence text  -- JSON text: COPY's binary format has no jsonb codec
        ) ON COMMIT DROP
        """
    )


async def copy_new_breaks(conn: Conn, rows: Iterable[tuple[Any, ...]]) -> None:
    await conn.copy_records_to_table(
        "recon_new_breaks", records=rows, columns=BREAK_COLUMNS, timeout=RUN_TIMEOUT
    )


async def save_breaks(conn: Conn, run_id: int, funder_id: str, day: date) -> None:
    """Upsert the run's breaks; a break a person (or the run) already resolved keeps its
    resolution and what it was resolved on (its evidence holds the correction applied or
    refused, and a refusal's reason for the manual adjustment): it is left as it is. An open
    break the run no longer finds is removed (it was never acted on)."""
    cols = ", ".join(BREAK_COLUMNS)
    values = cols.replace("evidence", "evidence::jsonb")
    insert = f"""INSERT INTO recon_breaks AS r (run_id, funder_id, business_day, {cols})
                 SELECT $1, $2, $3, {values} FROM recon_new_breaks"""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM recon_breaks WHERE run_id = $1)",
                               run_id):  # fmt: skip
        # the day's first run (the run lock keeps others out): a plain insert, no conflicts
        await conn.execute(insert, run_id, funder_id, day, timeout=RUN_TIMEOUT)
        return
    # first what an earlier run of the day found and this one does not, then the upsert,
    # which never touches those
    await conn.execute(
        """
        DELETE FROM recon_breaks r
         WHERE r.run_id = $1 AND r.status IN ('open', 'auto_pending')
           AND r.type <> 'ledger_total_mismatch'  -- the run's own finding: `save_ledger_break`
           AND NOT EXISTS (SELECT 1 FROM recon_new_breaks n
                            WHERE n.order_no = r.order_no AND n.type = r.type)
        """,
        run_id,
        timeout=RUN_TIMEOUT,
    )
    updates = ", ".join(
        f"{c} = EXCLUDED.{c}" for c in BREAK_COLUMNS if c not in ("order_no", "type", "status")
    )
    await conn.execute(
        f"""
        {insert}
        ON CONFLICT (run_id, order_no, type) DO UPDATE
           SET {updates}, updated_at = now(), status = EXCLUDED.status
         WHERE r.status IN ('open', 'auto_pending')
        """,
        run_id,
        funder_id,
        day,
        timeout=RUN_TIMEOUT,
    )


LEDGER_ORDER_NO = "(ledger total)"  # the order number of the run-level ledger break


async def save_ledger_break(
    conn: Conn, run_id: int, funder_id: str, day: date, row: tuple[Any, ...] | None
) -> None:
    """The run's `ledger_total_mismatch` break (`row` in `BREAK_COLUMNS` order, evidence as
    JSON text), or none: an open one from an earlier run of the day is updated, or removed
    when the totals now agree; one a person resolved is left as it was resolved."""
    if row is None:
        await conn.execute(
            """DELETE FROM recon_breaks WHERE run_id = $1 AND type = 'ledger_total_mismatch'
                  AND status = 'open'""",
            run_id,
        )
        return
    cols = ", ".join(BREAK_COLUMNS)
    params = ", ".join(
        f"${i}::text::jsonb" if c == "evidence" else f"${i}" for i, c in enumerate(BREAK_COLUMNS, 4)
    )
    updates = ", ".join(
        f"{c} = EXCLUDED.{c}" for c in BREAK_COLUMNS if c not in ("order_no", "type", "status")
    )
    await conn.execute(
        f"""
        INSERT INTO recon_breaks AS r (run_id, funder_id, business_day, {cols})
        VALUES ($1, $2, $3, {params})
        ON CONFLICT (run_id, order_no, type) DO UPDATE SET {updates}, updated_at = now()
         WHERE r.status = 'open'
        """,
        run_id,
        funder_id,
        day,
        *row,
    )


async def auto_pending(conn: Conn, run_id: int, after: int, limit: int) -> list[asyncpg.Record]:
    """The run's breaks awaiting their automatic resolution, with what it needs of them, a
    page at a time in id order from the one after `after` (a run writes its breaks together,
    so the primary key reads a page without sorting the rest)."""
    return await conn.fetch(
        """SELECT id, attempt_id, order_no, type, bank_ref, line_no, our_amount, evidence
             FROM recon_breaks WHERE run_id = $1 AND status = 'auto_pending' AND id > $2
            ORDER BY id LIMIT $3""",
        run_id,
        after,
        limit,
    )


async def settle_auto(
    conn: Conn,
    break_id: int,
    *,
    status: str,
    reason: str | None,
    note: str | None,
    at: datetime | None,
    voucher: str | None,
    txn_no: str | None,
) -> bool:
    """One statement for an `auto_pending` break: its new status (`auto_resolved` with the
    note and time, or `open` with the reason when a person must decide) and, when resolved,
    its `recon.auto_resolved` voucher (`voucher`, canonical JSON). False, with nothing
    written, when the break is no longer `auto_pending`."""
    n = await conn.fetchval(
        """
        WITH b AS (
            UPDATE recon_breaks
               SET status = $2, reason = coalesce($3, reason), note = coalesce($4, note),
                   resolution = CASE WHEN $2 = 'auto_resolved' THEN 'auto' END,
                   resolved_by = CASE WHEN $2 = 'auto_resolved' THEN 'reconciliation' END,
                   resolved_at = $5, updated_at = now()
             WHERE id = $1 AND status = 'auto_pending'
            RETURNING id),
        v AS (
            INSERT INTO voucher_events (kind, txn_no, event)
            SELECT 'recon.auto_resolved', $7, $6 FROM b WHERE $6::text IS NOT NULL)
        SELECT count(*) FROM b
        """,
        break_id,
        status,
        reason,
        note,
        at,
        voucher,
        txn_no,
    )
    return bool(n)


async def lock_break(conn: Conn, break_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM recon_breaks WHERE id = $1 FOR UPDATE", break_id)


async def get_break(conn: Conn, break_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM recon_breaks WHERE id = $1", break_id)


async def update_break(conn: Conn, break_id: int, **fields: Any) -> asyncpg.Record:
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=2))
    row = await conn.fetchrow(
        f"UPDATE recon_breaks SET updated_at = now(), {sets} WHERE id = $1 RETURNING *",
        break_id,
        *fields.values(),
    )
    assert row is not None
    return row


async def list_breaks(
    conn: Conn,
    *,
    run_id: int | None,
    funder_id: str | None,
    kind: str | None,
    status: str | None,
    after_id: int | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT * FROM recon_breaks
         WHERE ($1::bigint IS NULL OR run_id = $1)
           AND ($2::text IS NULL OR funder_id = $2)
           AND ($3::text IS NULL OR type = $3)
           AND ($4::text IS NULL OR status = $4)
           AND ($5::bigint IS NULL OR id > $5)
         ORDER BY id LIMIT $6
        """,
        run_id,
        funder_id,
        kind,
        status,
        after_id,
        limit,
    )


async def open_breaks(conn: Conn, run_id: int) -> int:
    n = await conn.fetchval(
        "SELECT count(*) FROM recon_breaks WHERE run_id = $1 AND status = 'open'", run_id
    )
    return int(n)


async def open_by_type(conn: Conn, funder_id: str) -> dict[str, int]:
    """Unresolved breaks of a funder over every run, by type (the breaks gauge)."""
    rows = await conn.fetch(
        """SELECT type, count(*) AS n FROM recon_breaks
            WHERE funder_id = $1 AND status IN ('open', 'auto_pending') GROUP BY type""",
        funder_id,
    )
    return {r["type"]: int(r["n"]) for r in rows}
