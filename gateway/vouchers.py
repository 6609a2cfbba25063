"""Tamper-evident vouchers: one hash chain over every recorded change.

A voucher event is inserted, unsealed, in the transaction of the change it records. The
sealer (one process at a time, under an advisory lock) takes unsealed events in id order,
gives each the next `seq` and links it:

    hash = sha256(prev_hash ‖ canonical({"at", "event", "kind", "seq"}))

with `prev_hash` of the first voucher 64 zeros. Editing, deleting or inserting a voucher
breaks the recomputation at that `seq`; `verify` streams the chain in bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from gateway.store import queries as q

log = structlog.get_logger("fundgate.vouchers")

GENESIS = "0" * 64
SEALER_LOCK_KEY = 0x766F7563686572  # "voucher"
SEAL_BATCH = 5000
SEAL_INTERVAL_SECONDS = 0.5  # vouchers are sealed within a second of their change


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def voucher_hash(prev_hash: str, seq: int, kind: str, at: datetime, event: str) -> str:
    envelope = json.dumps(
        {"at": iso(at), "event": json.loads(event), "kind": kind, "seq": seq},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(prev_hash.encode() + envelope.encode()).hexdigest()


async def seal_once(conn: q.Conn, batch: int = SEAL_BATCH) -> int:
    """Seal up to `batch` events; 0 when another process holds the sealer lock."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SEALER_LOCK_KEY):
            return 0
        head = await conn.fetchrow(
            "SELECT seq, hash FROM voucher_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1"
        )
        seq, prev = (head["seq"], head["hash"]) if head else (0, GENESIS)
        rows = await conn.fetch(
            "SELECT id, kind, at, event FROM voucher_events WHERE seq IS NULL ORDER BY id LIMIT $1",
            batch,
        )
        if not rows:
            return 0
        ids, seqs, prevs, hashes = [], [], [], []
        for r in rows:
            seq += 1
            h = voucher_hash(prev, seq, r["kind"], r["at"], r["event"])
            ids.append(r["id"])
            seqs.append(seq)
            prevs.append(prev)
            hashes.append(h)
            prev = h
        await conn.execute(
            """
            UPDATE voucher_events v SET seq = u.seq, prev_hash = u.prev, hash = u.hash,
                   sealed_at = now()
              FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[])
                   AS u(id, seq, prev, hash)
             WHERE v.id = u.id
            """,
            ids,
            seqs,
            prevs,
            hashes,
        )
        return len(rows)


async def run_sealer(pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    while not stop.is_set():
        sealed = 0
        try:
            async with pool.acquire() as conn:
                sealed = await seal_once(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("vouchers.seal_failed", error=str(e))
        if sealed < SEAL_BATCH:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SEAL_INTERVAL_SECONDS)


@dataclass
class Verification:
    checked: int = 0
    unsealed: int = 0
    first_broken: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_broken is None


async def _stream(conn: q.Conn, page: int) -> AsyncIterator[asyncpg.Record]:
    last = 0
    while True:
        rows = await conn.fetch(
            "SELECT seq, kind, at, event, prev_hash, hash FROM voucher_events"
            " WHERE seq > $1 ORDER BY seq LIMIT $2",
            last,
            page,
        )
        for r in rows:
            yield r
        if len(rows) < page:
            return
        last = rows[-1]["seq"]


async def verify(conn: q.Conn, *, page: int = 10000, progress: Any = None) -> Verification:
    """Recompute the whole chain, a page at a time (memory does not grow with its length)."""
    out = Verification()
    expected_seq, prev = 1, GENESIS
    async for r in _stream(conn, page):
        if r["seq"] != expected_seq:
            out.first_broken = expected_seq
            out.problem = f"voucher {expected_seq} is missing (next is {r['seq']})"
            return out
        if r["prev_hash"] != prev:
            out.first_broken = r["seq"]
            out.problem = f"voucher {r['seq']} does not link to voucher {r['seq'] - 1}"
            return out
        if voucher_hash(prev, r["seq"], r["kind"], r["at"], r["event"]) != r["hash"]:
            out.first_broken = r["seq"]
            out.problem = f"voucher {r['seq']} was changed after sealing (hash mismatch)"
            return out
        prev = r["hash"]
        expected_seq += 1
        out.checked += 1
        if progress is not None:
            progress(1)
    out.unsealed = await conn.fetchval("SELECT count(*) FROM voucher_events WHERE seq IS NULL")
    return out
