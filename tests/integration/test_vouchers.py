"""The voucher chain: sealed in order without gaps, any edit, deletion or insertion detected."""

from __future__ import annotations

import asyncio
import base64
from datetime import date

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from config import load_config
from config.models import SecurityConfig
from gateway.store import queries as q
from gateway.vouchers import (
    GENESIS,
    SEALER_LOCK_KEY,
    checkpoint,
    seal_once,
    seal_through,
    verify,
    voucher_hash,
    voucher_hash_of_canonical,
)
from tests.integration.conftest import StartGateway

pytestmark = pytest.mark.integration


async def _write(pool: asyncpg.Pool, n: int, prefix: str = "T") -> None:
    async with pool.acquire() as conn:
        for i in range(n):
            await q.voucher(
                conn, "disbursement.accepted", {"txn_no": f"{prefix}{i}", "amount": 1000 + i},
                f"{prefix}{i}",
            )  # fmt: skip


async def _seal_all(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        while await seal_once(conn, batch=7):
            pass


@pytest.mark.asyncio
async def test_sealed_chain_verifies_and_reports_the_unsealed_tail(pool: asyncpg.Pool) -> None:
    await _write(pool, 20)
    await _seal_all(pool)
    await _write(pool, 3, prefix="U")
    async with pool.acquire() as conn:
        result = await verify(conn, page=6)
        first = await conn.fetchrow("SELECT * FROM voucher_events WHERE seq = 1")
    assert result.ok, result.problem
    assert (result.checked, result.unsealed) == (20, 3)
    assert first["prev_hash"] == GENESIS


@pytest.mark.asyncio
async def test_concurrent_sealers_leave_one_gapless_chain(pool: asyncpg.Pool) -> None:
    async def writer(k: int) -> None:
        await _write(pool, 25, prefix=f"W{k}-")

    async def sealer() -> None:
        for _ in range(40):
            async with pool.acquire() as conn:
                await seal_once(conn, batch=5)
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(k) for k in range(4)), sealer(), sealer(), sealer())
    await _seal_all(pool)
    async with pool.acquire() as conn:
        seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM voucher_events ORDER BY seq")]
        result = await verify(conn)
    assert seqs == list(range(1, 101))
    assert result.ok, result.problem


# forging an insertion: shift the tail up by one and slip a voucher in at seq 11
INSERTION = [
    "UPDATE voucher_events SET seq = seq + 1000 WHERE seq >= 11",
    "UPDATE voucher_events SET seq = seq - 999 WHERE seq >= 1011",
    "INSERT INTO voucher_events (kind, event, seq, prev_hash, hash)"
    " SELECT kind, '{\"forged\":true}', 11, prev_hash, hash FROM voucher_events WHERE seq = 12",
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("tamper", "broken_at"),
    [
        (["UPDATE voucher_events SET event = replace(event, '1004', '9004') WHERE seq = 5"], 5),
        (["DELETE FROM voucher_events WHERE seq = 7"], 7),
        (["UPDATE voucher_events SET kind = 'disbursement.failed' WHERE seq = 3"], 3),
        (INSERTION, 11),
    ],
    ids=["changed", "deleted", "kind-changed", "inserted"],
)
async def test_tampering_is_detected_at_the_first_broken_seq(
    pool: asyncpg.Pool, tamper: list[str], broken_at: int
) -> None:
    await _write(pool, 15)
    await _seal_all(pool)
    async with pool.acquire() as conn:
        for sql in tamper:
            await conn.execute(sql)
        result = await verify(conn, page=4)
    assert not result.ok
    assert result.first_broken == broken_at, result.problem


def _security() -> SecurityConfig:
    return load_config().security


@pytest.mark.asyncio
async def test_signed_checkpoints_verify_with_the_public_key_alone(pool: asyncpg.Pool) -> None:
    sec = _security()
    await _write(pool, 10)
    await _seal_all(pool)
    async with pool.acquire() as conn:
        assert await checkpoint(conn, sec, date(2026, 11, 24))
        assert not await checkpoint(conn, sec, date(2026, 11, 24))  # once a day
    await _write(pool, 5, prefix="N")
    await _seal_all(pool)
    async with pool.acquire() as conn:
        assert await checkpoint(conn, sec, date(2026, 11, 25))
        result = await verify(conn, checkpoint_key=sec.checkpoint_public_key)
    assert result.ok, result.problem
    assert (result.checked, result.checkpoints) == (15, 2)


@pytest.mark.asyncio
async def test_a_rewritten_chain_is_caught_by_the_signed_head(pool: asyncpg.Pool) -> None:
    sec = _security()
    await _write(pool, 12)
    await _seal_all(pool)
    async with pool.acquire() as conn:
        await checkpoint(conn, sec, date(2026, 11, 24))
        # an attacker edits voucher 4 and recomputes every hash after it: the chain is
        # self-consistent again, only the signed head can tell
        await conn.execute(
            "UPDATE voucher_events SET event = replace(event, '1003', '9003') WHERE seq = 4"
        )
        rows = await conn.fetch("SELECT * FROM voucher_events ORDER BY seq")
        prev = GENESIS
        for r in rows:
            h = voucher_hash(prev, r["seq"], r["kind"], r["at"], r["event"])
            await conn.execute(
                "UPDATE voucher_events SET prev_hash = $2, hash = $3 WHERE seq = $1",
                r["seq"], prev, h,
            )  # fmt: skip
            prev = h
        assert (await verify(conn)).ok  # the rewrite fools the plain chain check
        result = await verify(conn, checkpoint_key=sec.checkpoint_public_key)
    assert not result.ok
    assert result.first_broken == 12
    assert "rewritten" in (result.problem or "")


@pytest.mark.asyncio
async def test_removed_tail_and_bad_signatures_are_named(pool: asyncpg.Pool) -> None:
    sec = _security()
    await _write(pool, 6)
    await _seal_all(pool)
    async with pool.acquire() as conn:
        await checkpoint(conn, sec, date(2026, 11, 24))
        other = (
            Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        wrong = await verify(conn, checkpoint_key=base64.b64encode(other).decode())
        assert not wrong.ok
        assert "checkpoint of 2026-11-24" in (wrong.problem or "")
        garbage = await verify(conn, checkpoint_key="not-a-key")
        assert "public key" in (garbage.problem or "")
        await conn.execute("DELETE FROM voucher_events WHERE seq >= 5")
        result = await verify(conn, checkpoint_key=sec.checkpoint_public_key)
    assert not result.ok
    assert result.first_broken == 5
    assert "removed" in (result.problem or "")


@pytest.mark.asyncio
async def test_the_fast_hash_of_a_canonical_event_is_the_sealed_hash(pool: asyncpg.Pool) -> None:
    """verify assembles the envelope around the stored text; for the canonical text every
    writer stores, that is exactly the hash the sealer computed by re-encoding, and a
    stored text in another (equivalent) form still verifies through the slow path."""
    await _write(pool, 5)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO voucher_events (kind, txn_no, event)"
            " VALUES ('x', 'T-WS', '{ \"b\": 1,  \"a\": \"é\" }')"
        )
        await seal_once(conn)
        rows = await conn.fetch("SELECT * FROM voucher_events ORDER BY seq")
        result = await verify(conn)
    assert result.ok, result.problem
    assert result.checked == 6
    for r in rows[:5]:
        args = (r["prev_hash"], r["seq"], r["kind"], r["at"], r["event"])
        assert voucher_hash_of_canonical(*args) == voucher_hash(*args) == r["hash"]
    odd = rows[5]
    args = (odd["prev_hash"], odd["seq"], odd["kind"], odd["at"], odd["event"])
    assert voucher_hash_of_canonical(*args) != odd["hash"] == voucher_hash(*args)


@pytest.mark.asyncio
async def test_a_disbursements_vouchers_are_shown_sealed_right_after_the_change(
    start_gateway: StartGateway,
) -> None:
    """A client checking the chain right after a change finds each voucher with its place and
    hash, though no sealer runs in this process (`--role api`): reading seals the chain."""
    h = await start_gateway(role="api")
    await h.register()
    await h.accepted("LC-SEALED-1")
    items = await h.vouchers("LC-SEALED-1")
    assert items
    assert all(v["seq"] and v["hash"] and v["prev_hash"] for v in items), items
    async with h.pool.acquire() as conn:
        result = await verify(conn)
    assert result.ok, result.problem
    assert result.unsealed == 0


@pytest.mark.asyncio
async def test_a_reader_waits_for_the_sealer_holding_the_lock(pool: asyncpg.Pool) -> None:
    await _write(pool, 3)
    async with pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM voucher_events")]
    async with pool.acquire() as sealer, pool.acquire() as reader:
        async with sealer.transaction():
            await sealer.execute("SELECT pg_advisory_xact_lock($1)", SEALER_LOCK_KEY)
            # held by another process that does not seal: the reader gives up after its wait
            assert not await seal_through(reader, ids, wait=0.2)
        # the holder went away without sealing: the reader seals them itself
        assert await seal_through(reader, ids, wait=0.2)
        assert not await reader.fetchval("SELECT count(*) FROM voucher_events WHERE seq IS NULL")
