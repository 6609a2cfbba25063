"""Tamper-evident vouchers: one hash chain over every recorded change.

A voucher event is inserted, unsealed, in the transaction of the change it records. The
sealer (one process at a time, under an advisory lock) takes unsealed events in id order,
gives each the next `seq` and links it:

    hash = sha256(prev_hash ‖ canonical({"at", "event", "kind", "seq"}))

with `prev_hash` of the first voucher 64 zeros. Editing, deleting or inserting a voucher
breaks the recomputation at that `seq`; `verify` streams the chain in bounded memory.

The `txn_no` column, by which a disbursement's vouchers are listed, is outside the hash, so
`verify` also holds it to the event: the event's top-level "txn_no" when it has one (NULL
for null), NULL when it has none. Moving a voucher to another disbursement's list, or off
every list, is then as visible as editing it. The one exception: `recon.auto_resolved` and
`recon.break_resolved` events sealed before they carried "txn_no" (`LEGACY_UNNAMED_KINDS`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum
from typing import Any

import asyncpg
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from config.models import SecurityConfig
from gateway.store import queries as q

log = structlog.get_logger("fundgate.vouchers")

GENESIS = "0" * 64
SEALER_LOCK_KEY = 0x766F7563686572  # "voucher"
SEAL_BATCH = 5000
SEAL_INTERVAL_SECONDS = 0.5  # vouchers are sealed within a second of their change
# kinds whose events were written without "txn_no" though the column names a disbursement;
# chains sealed then still hold them, so for these an event without the key binds nothing
LEGACY_UNNAMED_KINDS = frozenset({"recon.auto_resolved", "recon.break_resolved"})


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


def voucher_hash_of_canonical(prev_hash: str, seq: int, kind: str, at: datetime, event: str) -> str:
    """`voucher_hash` for an event stored in canonical form (as `queries.canonical` writes
    every event): the envelope is assembled around the stored text instead of re-encoding
    it, the same bytes several times faster. For any other text the two differ, so a
    verifier that gets a mismatch here asks `voucher_hash` before calling it broken."""
    envelope = (
        f'{{"at":"{iso(at)}","event":{event},'
        f'"kind":{json.dumps(kind, ensure_ascii=False)},"seq":{seq}}}'
    )
    return hashlib.sha256(prev_hash.encode() + envelope.encode()).hexdigest()


class _Txn(Enum):
    ABSENT = "absent"  # the event has no top-level "txn_no"
    UNREAD = "unread"  # the text cannot be read exactly without parsing it


_TXN_KEY = '"txn_no":'
_TXN_LAST = '"txn_no":"'


def _txn_no_of_canonical(event: str) -> str | _Txn | None:
    """The top-level "txn_no" of an event in canonical form (no whitespace, `ensure_ascii`
    off), read off the text without parsing it where that is exact: the string, None for
    null, ABSENT, or UNREAD when only a parse can tell."""
    # Most events end with it (sorted keys put "txn_no" after the others they have). Then the
    # final brace closes the top-level object and what precedes it is its last member: with
    # no quote or backslash in the value, and a brace or comma before the key's quote (no
    # escape), that member is "txn_no" and nothing else.
    if event.endswith(',"txn_no":null}') or event == '{"txn_no":null}':
        return None
    if event.endswith('"}'):
        last = event.rfind(_TXN_LAST)
        if last > 0 and event[last - 1] in "{,":
            value = event[last + len(_TXN_LAST) : -2]
            if '"' not in value and "\\" not in value:
                return value
    if _TXN_KEY not in event:
        return _Txn.ABSENT  # a "txn_no" member at any depth would be written with these bytes
    return _Txn.UNREAD  # elsewhere, or nested, or escaped: a parse tells


def _txn_no_parsed(event: str) -> Any:
    """The event's top-level "txn_no" by parsing it: the value, or ABSENT."""
    obj = json.loads(event)
    if isinstance(obj, dict) and "txn_no" in obj:
        return obj["txn_no"]
    return _Txn.ABSENT


def _misfiled(kind: str, column: str | None, named: Any) -> str | None:
    """What is wrong with a voucher's `txn_no` column given its event's "txn_no" (`named`:
    the value or ABSENT); None when they agree."""
    if column == named:
        return None
    if named is None or named is _Txn.ABSENT:
        if column is None or (named is _Txn.ABSENT and kind in LEGACY_UNNAMED_KINDS):
            return None
        return f"is listed under disbursement {column!r} but its event names none"
    if column is None:
        return f"is listed under no disbursement but its event is of {named!r}"
    return f"is listed under disbursement {column!r} but its event is of {named!r}"


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


# how long a reader waits for the chain to reach the vouchers it shows (`seal_through`)
SEAL_ON_READ_SECONDS = 2.0


async def seal_through(conn: q.Conn, ids: list[int], wait: float = SEAL_ON_READ_SECONDS) -> bool:
    """Seal the chain now up to the vouchers `ids` at least, for a reader who is shown them
    (a disbursement's vouchers are otherwise sealed within a second of their change, and a
    client checking the chain right after a change would find them without `seq` or `hash`).
    Seals with the sealer's own step, or waits while the process holding the sealer lock does;
    False when they are still unsealed after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = await conn.fetchval(
            "SELECT count(*) FROM voucher_events WHERE id = ANY($1::bigint[]) AND seq IS NULL",
            ids,
        )
        if not left:
            return True
        if time.monotonic() >= deadline:
            return False
        if not await seal_once(conn):  # another process holds the lock: it is sealing them
            await asyncio.sleep(0.02)


def checkpoint_message(day: date, seq: int, head: str) -> bytes:
    return json.dumps(
        {"day": day.isoformat(), "hash": head, "seq": seq}, sort_keys=True, separators=(",", ":")
    ).encode()


async def checkpoint(conn: q.Conn, security: SecurityConfig, day: date) -> bool:
    """Sign today's chain head once; False when today is signed already or nothing is sealed."""
    if await conn.fetchval("SELECT 1 FROM voucher_checkpoints WHERE day = $1", day):
        return False
    head = await conn.fetchrow(
        "SELECT seq, hash FROM voucher_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1"
    )
    if head is None:
        return False
    seed = base64.b64decode(security.checkpoint_signing_key.get_secret_value())
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signature = key.sign(checkpoint_message(day, head["seq"], head["hash"]))
    inserted = await conn.fetchval(
        "INSERT INTO voucher_checkpoints (day, seq, hash, public_key, signature)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (day) DO NOTHING RETURNING 1",
        day,
        head["seq"],
        head["hash"],
        base64.b64encode(public).decode(),
        base64.b64encode(signature).decode(),
    )
    if inserted:
        log.info("vouchers.checkpoint", day=day.isoformat(), seq=head["seq"])
    return bool(inserted)


async def run_sealer(
    pool: asyncpg.Pool,
    stop: asyncio.Event,
    security: SecurityConfig | None = None,
    today: Callable[[], date] | None = None,
) -> None:
    signed_day: date | None = None
    while not stop.is_set():
        sealed = 0
        try:
            async with pool.acquire() as conn:
                sealed = await seal_once(conn)
                if security is not None and today is not None and signed_day != today():
                    day = today()
                    await checkpoint(conn, security, day)
                    if await conn.fetchval("SELECT 1 FROM voucher_checkpoints WHERE day = $1", day):
                        if signed_day is not None or not await _verified_today(conn):
                            await verify_and_record(conn, security.checkpoint_public_key)
                        signed_day = day
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("vouchers.seal_failed", error=str(e))
        if sealed < SEAL_BATCH:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SEAL_INTERVAL_SECONDS)


async def _verified_today(conn: q.Conn) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM voucher_verifications WHERE at > now() - interval '1 day' LIMIT 1"
        )
    )


async def verify_and_record(conn: q.Conn, checkpoint_key: str | None) -> Verification:
    """The daily full check: recompute the chain and leave the result for the gauges."""
    result = await verify(conn, checkpoint_key=checkpoint_key)
    await q.record_verification(
        conn, result.ok, result.checked, result.first_broken, result.problem
    )
    if result.ok:
        log.info("vouchers.verified", checked=result.checked, checkpoints=result.checkpoints)
    else:
        log.error("vouchers.broken", first_broken=result.first_broken, problem=result.problem)
    return result


@dataclass
class Verification:
    checked: int = 0
    unsealed: int = 0
    checkpoints: int = 0
    first_broken: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_broken is None


async def _stream(conn: q.Conn, page: int) -> AsyncIterator[asyncpg.Record]:
    last = 0
    while True:
        rows = await conn.fetch(
            "SELECT seq, kind, at, txn_no, event, prev_hash, hash FROM voucher_events"
            " WHERE seq > $1 ORDER BY seq LIMIT $2",
            last,
            page,
        )
        for r in rows:
            yield r
        if len(rows) < page:
            return
        last = rows[-1]["seq"]


async def _signed_heads(
    conn: q.Conn, public_key: str, out: Verification
) -> dict[int, tuple[str, str]] | None:
    """seq → (day, hash) of every checkpoint whose signature holds; None after a bad one."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
    except (ValueError, binascii.Error) as e:
        out.first_broken, out.problem = 0, f"the public key is not a base64 Ed25519 key: {e}"
        return None
    heads: dict[int, tuple[str, str]] = {}
    for c in await conn.fetch("SELECT * FROM voucher_checkpoints ORDER BY day"):
        day = c["day"].isoformat()
        try:
            key.verify(
                base64.b64decode(c["signature"]), checkpoint_message(c["day"], c["seq"], c["hash"])
            )
        except (InvalidSignature, ValueError, binascii.Error):
            out.first_broken = c["seq"]
            out.problem = (
                f"checkpoint of {day} (seq {c['seq']}): the signature does not verify with "
                "this public key"
            )
            return None
        heads[c["seq"]] = (day, c["hash"])
        out.checkpoints += 1
    return heads


async def verify(
    conn: q.Conn,
    *,
    page: int = 10000,
    progress: Any = None,
    checkpoint_key: str | None = None,
) -> Verification:
    """Recompute the whole chain, a page at a time (memory does not grow with its length);
    with `checkpoint_key` (base64 Ed25519 public key) also check every signed daily head."""
    out = Verification()
    heads: dict[int, tuple[str, str]] = {}
    if checkpoint_key is not None:
        signed = await _signed_heads(conn, checkpoint_key, out)
        if signed is None:
            return out
        heads = signed
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
        event = r["event"]
        args = (prev, r["seq"], r["kind"], r["at"], event)
        if voucher_hash_of_canonical(*args) == r["hash"]:
            named = _txn_no_of_canonical(event)  # the hash shows the text is canonical
            if named is _Txn.UNREAD:
                named = _txn_no_parsed(event)
        elif voucher_hash(*args) == r["hash"]:
            named = _txn_no_parsed(event)
        else:
            out.first_broken = r["seq"]
            out.problem = f"voucher {r['seq']} was changed after sealing (hash mismatch)"
            return out
        if named != r["txn_no"] and (misfiled := _misfiled(r["kind"], r["txn_no"], named)):
            out.first_broken = r["seq"]
            out.problem = (
                f"voucher {r['seq']} {misfiled}: its txn_no column was changed after sealing"
            )
            return out
        if r["seq"] in heads and heads[r["seq"]][1] != r["hash"]:
            out.first_broken = r["seq"]
            out.problem = (
                f"voucher {r['seq']} differs from the head signed on {heads[r['seq']][0]}: "
                "the chain was rewritten"
            )
            return out
        prev = r["hash"]
        expected_seq += 1
        out.checked += 1
        if progress is not None:
            progress(1)
    beyond = [s for s in heads if s >= expected_seq]
    if beyond:
        out.first_broken = expected_seq
        out.problem = (
            f"the chain ends at {expected_seq - 1} but a checkpoint of {heads[min(beyond)][0]} "
            f"signed voucher {min(beyond)}: vouchers were removed"
        )
        return out
    out.unsealed = await conn.fetchval("SELECT count(*) FROM voucher_events WHERE seq IS NULL")
    return out
