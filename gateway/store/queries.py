"""Every query of the disbursement path. Functions take a connection; callers own the
transaction (the unit of work), so a state change, its limit movement, its outbox row and its
voucher event commit together or not at all."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import asyncpg

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

DISPATCH_CHANNEL = "fundgate_dispatch"
WEBHOOK_CHANNEL = "fundgate_webhook"


def funder_scope(funder_id: str) -> str:
    return f"funder:{funder_id}"


PLATFORM_SCOPE = "platform"

# ---------------------------------------------------------------- whitelist


async def upsert_account(
    conn: Conn, borrower_id: str, columns: dict[str, Any], bank_code: str
) -> asyncpg.Record:
    """Register (or refresh) a payee account; `inserted` tells whether it is new."""
    row = await conn.fetchrow(
        """
        INSERT INTO borrower_accounts (borrower_id, account_bidx, account_no_enc,
                                       account_name_enc, account_masked, name_masked, bank_code,
                                       name_bidx)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (borrower_id, account_bidx) DO UPDATE
           SET account_no_enc = EXCLUDED.account_no_enc,
               account_name_enc = EXCLUDED.account_name_enc,
               account_masked = EXCLUDED.account_masked, name_masked = EXCLUDED.name_masked,
               bank_code = EXCLUDED.bank_code, name_bidx = EXCLUDED.name_bidx
        RETURNING *, (xmax = 0) AS inserted
        """,
        borrower_id,
        columns["account_bidx"],
        columns["account_no_enc"],
        columns["account_name_enc"],
        columns["account_masked"],
        columns["name_masked"],
        bank_code,
        columns["name_bidx"],
    )
    assert row is not None
    return row


async def delete_account(conn: Conn, borrower_id: str, account_bidx: bytes) -> bool:
    status = await conn.execute(
        "DELETE FROM borrower_accounts WHERE borrower_id = $1 AND account_bidx = $2",
        borrower_id,
        account_bidx,
    )
    return status != "DELETE 0"


async def list_accounts(conn: Conn, borrower_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM borrower_accounts WHERE borrower_id = $1 ORDER BY id", borrower_id
    )


async def get_account(conn: Conn, borrower_id: str, account_bidx: bytes) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM borrower_accounts WHERE borrower_id = $1 AND account_bidx = $2",
        borrower_id,
        account_bidx,
    )


# ---------------------------------------------------------------- limits and prefund


async def seed_prefund(conn: Conn, balances: dict[str, int]) -> list[str]:
    """First sight of a co-lending funder: its configured prefund becomes the opening balance.
    Returns the funders seeded now (their opening is posted to the ledger by the caller)."""
    if not balances:
        return []
    rows = await conn.fetch(
        "INSERT INTO prefund (funder_id, balance)"
        " SELECT * FROM unnest($1::text[], $2::bigint[]) ON CONFLICT DO NOTHING"
        " RETURNING funder_id",
        list(balances),
        list(balances.values()),
    )
    return [r["funder_id"] for r in rows]


async def usage(conn: Conn, day: date) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT scope, sum(used)::bigint AS used FROM limit_usage WHERE business_day = $1"
        " GROUP BY scope",
        day,
    )
    return {r["scope"]: r["used"] for r in rows}


async def prefund_balances(conn: Conn) -> dict[str, int]:
    rows = await conn.fetch("SELECT funder_id, balance FROM prefund")
    return {r["funder_id"]: r["balance"] for r in rows}


async def reserve(
    conn: Conn, scope: str, day: date, bucket: int, amount: int, cap: int, buckets: int
) -> int | None:
    """Add `amount` to the day's usage unless that would pass `cap`; the bucket that holds it
    (`bucket` if free, else another), or None. Never overshoots, however many processes
    reserve at once (migration 0011: buckets whose shares sum to the cap)."""
    sql = "SELECT fg_limit_reserve($1, $2, $3, $4, $5, $6)"
    b = await conn.fetchval(sql, scope, day, bucket, amount, cap, buckets)
    return None if b < 0 else int(b)


async def lock_usage(conn: Conn, scope: str, day: date, bucket: int) -> None:
    """Lock a usage bucket without changing it. Transactions moving limits lock the platform's
    before any funder's (intake's order), so they can never deadlock each other."""
    await conn.execute(
        "SELECT 1 FROM limit_usage WHERE scope = $1 AND business_day = $2 AND bucket = $3"
        " FOR UPDATE",
        scope,
        day,
        bucket,
    )


async def release(conn: Conn, scope: str, day: date, bucket: int, amount: int) -> None:
    """Give back a reservation made in `bucket`: its share shrinks with it, so the room
    returns to the scope at the next rebalance rather than to this bucket alone."""
    await conn.execute(
        "UPDATE limit_usage SET used = used - $4, share = share - $4"
        " WHERE scope = $1 AND business_day = $2 AND bucket = $3",
        scope,
        day,
        bucket,
        amount,
    )


async def record_usage(
    conn: Conn, scope: str, day: date, bucket: int, amount: int, cap: int, buckets: int
) -> None:
    """Usage for money that already moved: recorded even past the cap, which guards intake."""
    await conn.execute(
        "SELECT fg_limit_rebalance($1, $2, $3, $4, $5, $6, true)",
        scope, day, bucket, amount, cap, buckets,
    )  # fmt: skip


async def take_prefund(conn: Conn, funder_id: str, amount: int) -> bool:
    if amount == 0:
        return True
    status = await conn.execute(
        "UPDATE prefund SET balance = balance - $2, updated_at = now()"
        " WHERE funder_id = $1 AND balance >= $2",
        funder_id,
        amount,
    )
    return status == "UPDATE 1"


async def return_prefund(conn: Conn, funder_id: str, amount: int) -> None:
    if amount:
        await conn.execute(
            "UPDATE prefund SET balance = balance + $2, updated_at = now() WHERE funder_id = $1",
            funder_id,
            amount,
        )


# ---------------------------------------------------------------- disbursements


async def find_by_txn(conn: Conn, txn_no: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM disbursements WHERE txn_no = $1", txn_no)


async def insert_disbursement(conn: Conn, values: dict[str, Any]) -> int | None:
    """Insert unless the txn_no exists; a concurrent duplicate waits here for the first one's
    commit and then gets None (the unique index settles the race)."""
    cols = list(values)
    placeholders = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
    row = await conn.fetchrow(
        f"INSERT INTO disbursements ({', '.join(cols)}) VALUES ({placeholders})"
        " ON CONFLICT (txn_no) DO NOTHING RETURNING id",
        *values.values(),
    )
    return None if row is None else int(row["id"])


async def set_first_response(conn: Conn, disbursement_id: int, body: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE disbursements SET first_response = $2 WHERE id = $1", disbursement_id, body
    )


async def route_disbursement(
    conn: Conn,
    disbursement_id: int,
    *,
    funder_id: str,
    mode: str,
    alloc_funder: int,
    alloc_platform: int,
    now: datetime,
) -> None:
    await conn.execute(
        """UPDATE disbursements SET funder_id = $2, mode = $3, alloc_funder = $4,
                  alloc_platform = $5, updated_at = $6 WHERE id = $1""",
        disbursement_id,
        funder_id,
        mode,
        alloc_funder,
        alloc_platform,
        now,
    )


async def insert_attempt(conn: Conn, values: dict[str, Any]) -> int:
    cols = list(values)
    placeholders = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
    row = await conn.fetchrow(
        f"INSERT INTO attempts ({', '.join(cols)}) VALUES ({placeholders}) RETURNING id",
        *values.values(),
    )
    assert row is not None
    return int(row["id"])


async def attempts_of(conn: Conn, disbursement_ids: list[int]) -> dict[int, list[asyncpg.Record]]:
    rows = await conn.fetch(
        "SELECT * FROM attempts WHERE disbursement_id = ANY($1::bigint[])"
        " ORDER BY disbursement_id, n",
        disbursement_ids,
    )
    out: dict[int, list[asyncpg.Record]] = {i: [] for i in disbursement_ids}
    for r in rows:
        out[r["disbursement_id"]].append(r)
    return out


# an attempt with what dispatch and the state machine need of its disbursement
_ATTEMPT_OF = """
    SELECT a.*, d.txn_no, d.amount, d.currency, d.business_day, d.status AS d_status,
           d.platform_bucket,
           d.payee_account_no_enc, d.payee_account_name_enc, d.payee_bank_code
      FROM attempts a JOIN disbursements d ON d.id = a.disbursement_id
"""
_ATTEMPT = _ATTEMPT_OF + " WHERE a.id = $1"


async def lock_attempt(conn: Conn, attempt_id: int) -> asyncpg.Record | None:
    """The attempt and its disbursement, both locked for this transaction."""
    return await conn.fetchrow(_ATTEMPT + " FOR UPDATE OF a, d", attempt_id)


async def load_attempt(conn: Conn, attempt_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(_ATTEMPT, attempt_id)


async def load_attempts(conn: Conn, attempt_ids: list[int]) -> dict[int, asyncpg.Record]:
    """`load_attempt` for several attempts in one query, by attempt id."""
    rows = await conn.fetch(_ATTEMPT_OF + " WHERE a.id = ANY($1::bigint[])", attempt_ids)
    return {r["id"]: r for r in rows}


async def was_corrected(conn: Conn, txn_no: str) -> bool:
    """A person has reversed a final outcome of this disbursement before."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM voucher_events"
            " WHERE txn_no = $1 AND kind = 'disbursement.corrected')",
            txn_no,
        )
    )


async def attempt_by_order(conn: Conn, order_no: str) -> asyncpg.Record | None:
    """The attempt of a bank order number, as `load_attempt` reads it (no lock)."""
    return await conn.fetchrow(_ATTEMPT_OF + " WHERE a.order_no = $1", order_no)


_MOVE = "SELECT fg_move(" + ", ".join(f"${i}" for i in range(1, 25)) + ")"


async def move(
    conn: Conn,
    attempt_id: int,
    from_status: str,
    new: str | None,
    now: datetime,
    *,
    bank_ref: str | None = None,
    error: dict[str, Any] | None = None,
    failure: dict[str, Any] | None = None,
    next_query_at: datetime | None = None,
    query_count: int | None = None,
    unknown_since: datetime | None = None,
    releases: Sequence[tuple[str, int, int]] = (),
    prefund_return: int = 0,
    ledger_kind: str | None = None,
    ledger_lines: Sequence[tuple[str, int]] = (),
    ledger_voucher: str | None = None,
    voucher_kind: str | None = None,
    voucher: str | None = None,
    webhook: bool = False,
    finish_outbox: int | None = None,
    nonce: tuple[str, str] | None = None,
) -> str:
    """One state transition in one statement (`fg_move`, migration 0013): 'moved',
    'unchanged' (`new` None: only the outbox row and the nonce), 'stale' (the attempt's status
    is no longer `from_status`: nothing written), 'replayed' (the nonce was seen: nothing
    written) or 'missing'."""
    return str(
        await conn.fetchval(
            _MOVE,
            attempt_id,
            from_status,
            new,
            now,
            bank_ref,
            error,
            failure,
            next_query_at,
            query_count,
            unknown_since,
            [r[0] for r in releases],
            [r[1] for r in releases],
            [r[2] for r in releases],
            prefund_return,
            ledger_kind,
            [a for a, _ in ledger_lines],
            [n for _, n in ledger_lines],
            ledger_voucher,
            voucher_kind,
            voucher,
            webhook,
            finish_outbox,
            None if nonce is None else nonce[0],
            None if nonce is None else nonce[1],
        )
    )


async def update_attempt(conn: Conn, attempt_id: int, now: datetime, **fields: Any) -> None:
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=3))
    await conn.execute(
        f"UPDATE attempts SET updated_at = $2, {sets} WHERE id = $1",
        attempt_id,
        now,
        *fields.values(),
    )


async def update_disbursement(
    conn: Conn, disbursement_id: int, now: datetime, **fields: Any
) -> None:
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=3))
    await conn.execute(
        f"UPDATE disbursements SET updated_at = $2, {sets} WHERE id = $1",
        disbursement_id,
        now,
        *fields.values(),
    )


async def get_disbursement_by_id(conn: Conn, disbursement_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM disbursements WHERE id = $1", disbursement_id)


async def list_disbursements(
    conn: Conn,
    *,
    status: str | None,
    funder_id: str | None,
    created_from: datetime | None,
    created_to: datetime | None,
    before_id: int | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT * FROM disbursements
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR funder_id = $2)
           AND ($3::timestamptz IS NULL OR created_at >= $3)
           AND ($4::timestamptz IS NULL OR created_at < $4)
           AND ($5::bigint IS NULL OR id < $5)
         ORDER BY id DESC
         LIMIT $6
        """,
        status,
        funder_id,
        created_from,
        created_to,
        before_id,
        limit,
    )


async def in_flight_counts(conn: Conn) -> dict[str, dict[str, int]]:
    rows = await conn.fetch(
        "SELECT funder_id, status, count(*) AS n FROM attempts"
        " WHERE status IN ('accepted', 'sent', 'processing', 'unknown')"
        " GROUP BY funder_id, status"
    )
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["funder_id"], {})[r["status"]] = r["n"]
    return out


# ---------------------------------------------------------------- outbox


async def enqueue(
    conn: Conn,
    kind: str,
    ref_id: int,
    *,
    funder_id: str | None = None,
    payload: Any = None,
    delay_seconds: float = 0,
) -> None:
    await conn.execute(
        """INSERT INTO outbox (kind, ref_id, funder_id, payload, available_at)
           VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))""",
        kind,
        ref_id,
        funder_id,
        payload,
        float(delay_seconds),
    )
    # wakes the workers at commit (intake's own dispatch rows are announced after commit,
    # coalesced: gateway/wakeups.py); a webhook is sent as soon as its outcome is committed
    channel = {"dispatch": DISPATCH_CHANNEL, "webhook": WEBHOOK_CHANNEL}.get(kind)
    if channel is not None and delay_seconds == 0:
        await conn.execute("SELECT pg_notify($1, $2)", channel, funder_id or "")


async def claim(conn: Conn, kind: str, limit: int, lease_seconds: float) -> list[asyncpg.Record]:
    """Lease up to `limit` ready rows; a lease that expires (the holder died) frees the row.

    A webhook row waits while an older webhook of the same disbursement is still in the
    outbox (being sent, backing off, or delivered and not yet deleted): a reversal of a final
    outcome (`outcomes.correct_terminal`) reaches the lending core after that outcome, never
    before it, or the lending core would keep the outcome that was reversed."""
    return await conn.fetch(
        """
        UPDATE outbox SET leased_until = now() + make_interval(secs => $3), tries = tries + 1
         WHERE id IN (SELECT id FROM outbox AS o
                       WHERE kind = $1 AND available_at <= now()
                         AND (leased_until IS NULL OR leased_until < now())
                         AND (kind <> 'webhook' OR NOT EXISTS (
                                SELECT 1 FROM outbox AS older
                                 WHERE older.kind = 'webhook' AND older.ref_id = o.ref_id
                                   AND older.id < o.id))
                       ORDER BY available_at, id
                       LIMIT $2
                         FOR UPDATE SKIP LOCKED)
        RETURNING id, ref_id, funder_id, payload, tries
        """,
        kind,
        limit,
        float(lease_seconds),
    )


async def defer_outbox(conn: Conn, outbox_id: int, delay_seconds: float) -> None:
    """Put a claimed row back untouched: the claim did not call the bank, so it is not a try."""
    await conn.execute(
        """UPDATE outbox SET leased_until = NULL, tries = tries - 1,
                  available_at = now() + make_interval(secs => $2) WHERE id = $1""",
        outbox_id,
        float(delay_seconds),
    )


async def release_leases(conn: Conn, outbox_ids: list[int]) -> None:
    """Hand leased rows back now; the try they used still counts (it may have been sent)."""
    await conn.execute(
        "UPDATE outbox SET leased_until = NULL WHERE id = ANY($1::bigint[])", outbox_ids
    )


async def lock_outbox(conn: Conn, outbox_id: int) -> asyncpg.Record | None:
    """The outbox row, locked for this transaction (None once it is finished)."""
    return await conn.fetchrow(
        "SELECT tries, leased_until FROM outbox WHERE id = $1 FOR UPDATE", outbox_id
    )


async def release_untried(conn: Conn, tries: dict[int, int]) -> None:
    """Hand back leased rows whose bank call never began (outbox row id -> the tries their
    claim counted): not a try, as `defer_outbox`. A row claimed again since is left alone."""
    if not tries:
        return
    await conn.execute(
        """UPDATE outbox AS o SET leased_until = NULL, tries = o.tries - 1
             FROM unnest($1::bigint[], $2::integer[]) AS c (id, tries)
            WHERE o.id = c.id AND o.tries = c.tries AND o.leased_until IS NOT NULL""",
        list(tries),
        list(tries.values()),
    )


async def finish_outbox(conn: Conn, outbox_id: int) -> None:
    await conn.execute("DELETE FROM outbox WHERE id = $1", outbox_id)


async def finish_outboxes(conn: Conn, outbox_ids: list[int]) -> None:
    await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", outbox_ids)


async def retry_outbox(conn: Conn, outbox_id: int, delay_seconds: float, error: str) -> None:
    await conn.execute(
        """UPDATE outbox SET leased_until = NULL, last_error = $3,
                  available_at = now() + make_interval(secs => $2) WHERE id = $1""",
        outbox_id,
        float(delay_seconds),
        error[:500],
    )


async def outbox_stats(conn: Conn) -> dict[str, tuple[int, float]]:
    rows = await conn.fetch(
        "SELECT kind, count(*) AS n,"
        " coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age"
        " FROM outbox GROUP BY kind"
    )
    return {r["kind"]: (r["n"], r["age"]) for r in rows}


# ---------------------------------------------------------------- poller


async def claim_queries(conn: Conn, limit: int, lease_seconds: float) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        UPDATE attempts SET next_query_at = now() + make_interval(secs => $2)
         WHERE id IN (SELECT id FROM attempts
                       WHERE next_query_at <= now()
                         AND status IN ('sent', 'processing', 'unknown')
                       ORDER BY next_query_at
                       LIMIT $1
                         FOR UPDATE SKIP LOCKED)
        RETURNING id, funder_id, order_no, status, query_count
        """,
        limit,
        float(lease_seconds),
    )


# ---------------------------------------------------------------- circuits


async def save_circuit(
    conn: Conn, funder_id: str, state: str, failures: int, open_until: datetime | None
) -> None:
    await conn.execute(
        """
        INSERT INTO funder_circuits AS c (funder_id, state, failures, opened_at, open_until)
        VALUES ($1, $2, $3, CASE WHEN $2 = 'open' THEN now() END, $4)
        ON CONFLICT (funder_id) DO UPDATE
           SET state = EXCLUDED.state, failures = EXCLUDED.failures,
               opened_at = coalesce(EXCLUDED.opened_at, c.opened_at),
               open_until = EXCLUDED.open_until, updated_at = now()
        """,
        funder_id,
        state,
        failures,
        open_until,
    )


async def circuits(conn: Conn) -> dict[str, str]:
    """Each funder's circuit as every process should see it now."""
    rows = await conn.fetch(
        """
        SELECT funder_id,
               CASE WHEN state = 'open' AND open_until > now() THEN 'open'
                    WHEN state = 'open' THEN 'half_open'
                    ELSE state END AS state
          FROM funder_circuits
        """
    )
    return {r["funder_id"]: r["state"] for r in rows}


async def release_queries(conn: Conn, attempt_ids: list[int]) -> None:
    """Make claimed status queries due again now (shutdown hands them back)."""
    await conn.execute(
        "UPDATE attempts SET next_query_at = now() WHERE id = ANY($1::bigint[])"
        " AND status IN ('sent', 'processing', 'unknown')",
        attempt_ids,
    )


# ---------------------------------------------------------------- callbacks


async def remember_nonce(conn: Conn, funder_id: str, nonce: str) -> bool:
    """False when the nonce was seen before (a replayed callback)."""
    row = await conn.fetchrow(
        "INSERT INTO callback_nonces (funder_id, nonce) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        funder_id,
        nonce,
    )
    return row is not None


async def forget_nonces(conn: Conn, older_than_seconds: float, limit: int) -> int:
    """Delete up to `limit` nonces older than `older_than_seconds`; how many went. Bounded so
    that a backlog (after the purge failed for a while) is worked off over a few calls instead
    of one statement that outlasts the pool's timeout every time."""
    status = await conn.execute(
        """DELETE FROM callback_nonces
            WHERE ctid = ANY(ARRAY(SELECT ctid FROM callback_nonces
                                    WHERE seen_at < now() - make_interval(secs => $1)
                                    LIMIT $2))""",
        float(older_than_seconds),
        limit,
    )
    return int(status.split()[-1])


# ---------------------------------------------------------------- vouchers


def canonical(event: dict[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


async def voucher(conn: Conn, kind: str, event: dict[str, Any], txn_no: str | None) -> None:
    await conn.execute(
        "INSERT INTO voucher_events (kind, txn_no, event) VALUES ($1, $2, $3)",
        kind,
        txn_no,
        canonical(event),
    )


async def vouchers_of(conn: Conn, txn_no: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM voucher_events WHERE txn_no = $1 ORDER BY id", txn_no)


# ---------------------------------------------------------------- gauges (housekeeping)


async def stuck_attempts(conn: Conn) -> dict[str, asyncpg.Record]:
    """Per funder, in one pass over the open attempts (their partial index, migration 0005):
    escalated unknown attempts, the age of the oldest unknown one (`oldest`), and how long the
    oldest attempt the bank has taken (`sent`, `processing`) has gone without a change
    (`at_bank`); ages in seconds, 0 when there is none."""
    rows = await conn.fetch(
        "SELECT funder_id,"
        " count(*) FILTER (WHERE status = 'unknown' AND escalated_at IS NOT NULL) AS escalated,"
        " greatest(coalesce(extract(epoch FROM now() - min(unknown_since)"
        " FILTER (WHERE status = 'unknown')), 0), 0)::float8 AS oldest,"
        " greatest(coalesce(extract(epoch FROM now() - min(updated_at)"
        " FILTER (WHERE status IN ('sent', 'processing'))), 0), 0)::float8 AS at_bank"
        " FROM attempts WHERE status IN ('sent', 'processing', 'unknown') GROUP BY funder_id"
    )
    return {r["funder_id"]: r for r in rows}


async def voucher_chain_stats(conn: Conn) -> asyncpg.Record | None:
    # max(seq) reads the unique index; the unsealed rows have a partial index
    return await conn.fetchrow(
        "SELECT (SELECT coalesce(max(seq), 0) FROM voucher_events) AS sealed,"
        " count(*) AS unsealed,"
        " greatest(coalesce(extract(epoch FROM now() - min(at)), 0), 0)::float8 AS oldest"
        " FROM voucher_events WHERE seq IS NULL"
    )


async def record_verification(
    conn: Conn, intact: bool, checked: int, first_broken: int | None, problem: str | None
) -> None:
    await conn.execute(
        "INSERT INTO voucher_verifications (intact, checked, first_broken, problem)"
        " VALUES ($1, $2, $3, $4)",
        intact,
        checked,
        first_broken,
        problem,
    )


async def last_verification(conn: Conn) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT intact, extract(epoch FROM at)::float8 AS at FROM voucher_verifications"
        " ORDER BY id DESC LIMIT 1"
    )


async def recon_stats(conn: Conn) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Last successful reconciliation per funder (unix time) and open breaks by type."""
    last = {
        r["funder_id"]: r["at"]
        for r in await conn.fetch(
            "SELECT funder_id, extract(epoch FROM max(finished_at))::float8 AS at"
            " FROM recon_runs WHERE status = 'succeeded' GROUP BY funder_id"
        )
    }
    breaks: dict[str, dict[str, int]] = {}
    for r in await conn.fetch(
        "SELECT funder_id, type, count(*) AS n FROM recon_breaks"
        " WHERE status IN ('open', 'auto_pending') GROUP BY funder_id, type"
    ):
        breaks.setdefault(r["funder_id"], {})[r["type"]] = r["n"]
    return last, breaks
