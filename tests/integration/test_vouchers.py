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
from connectors.base import BankStatus
from gateway import ledger
from gateway.disbursements import order_no
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
from tests.fakes import PROCESS, SUCCEED, reject, unknown
from tests.integration.conftest import ACCOUNT, AUTH, StartGateway, eventually

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
            "INSERT INTO voucher_events (kind, txn_no, event) VALUES ('x', 'T-WS', $1)",
            '{ "b": 1,  "txn_no" : "T-WS", "a": "é" }',
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


# ---------------------------------------------------------------- the txn_no column


async def _write_listed_and_unlisted(pool: asyncpg.Pool) -> None:
    """Seq 1-3: vouchers of T0-T2; 4: a whitelist change (no txn_no); 5: a ledger posting of
    no disbursement ("txn_no": null); 6: one of T3."""
    await _write(pool, 3)
    async with pool.acquire() as conn:
        await q.voucher(conn, "whitelist.registered", {"borrower_id": "B1", "bank_code": "X"}, None)
        await q.voucher(
            conn, "ledger.prefund.topup",
            ledger.voucher_event(7, "prefund.topup", [("custody:prefund:bank-b", 5)], None, "R1"),
            None,
        )  # fmt: skip
        await q.voucher(conn, "disbursement.sent", {"txn_no": "T3", "status": "sent"}, "T3")
    await _seal_all(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("tamper", "broken_at", "problem"),
    [
        (
            "UPDATE voucher_events SET txn_no = 'T0' WHERE seq = 3",
            3,
            "voucher 3 is listed under disbursement 'T0' but its event is of 'T2'",
        ),
        (
            "UPDATE voucher_events SET txn_no = NULL WHERE seq = 2",
            2,
            "voucher 2 is listed under no disbursement but its event is of 'T1'",
        ),
        (
            "UPDATE voucher_events SET txn_no = 'T1' WHERE seq = 4",
            4,
            "voucher 4 is listed under disbursement 'T1' but its event names none",
        ),
        (
            "UPDATE voucher_events SET txn_no = 'T1' WHERE seq = 5",
            5,
            "voucher 5 is listed under disbursement 'T1' but its event names none",
        ),
    ],
    ids=["moved", "unlisted", "listed-without-txn", "listed-with-null-txn"],
)
async def test_a_voucher_moved_to_another_disbursements_list_breaks_the_chain(
    pool: asyncpg.Pool, tamper: str, broken_at: int, problem: str
) -> None:
    await _write_listed_and_unlisted(pool)
    async with pool.acquire() as conn:
        assert (await verify(conn)).ok
        await conn.execute(tamper)
        result = await verify(conn, page=2)
    assert not result.ok
    assert result.first_broken == broken_at, result.problem
    assert (result.problem or "").startswith(problem), result.problem
    assert "txn_no column was changed" in (result.problem or "")


@pytest.mark.asyncio
async def test_the_txn_no_is_read_exactly_from_nested_escaped_and_odd_events(
    pool: asyncpg.Pool,
) -> None:
    """Events the text cannot answer for without a parse (a nested "txn_no" first, escapes,
    braces in strings, a number) are parsed: each voucher is held to its top-level value."""
    events: list[tuple[dict[str, object], str | None]] = [
        ({"a": {"txn_no": "INNER"}, "txn_no": "OUTER"}, "OUTER"),
        ({"a": {"txn_no": "INNER"}}, None),
        ({"a": [{"x": "}{"}], "b": "}", "txn_no": "BRACES"}, "BRACES"),
        ({'a"txn_no': "KEY", "z": 1}, None),
        ({"note": 'say "hi"', "txn_no": 'Q"1'}, 'Q"1'),
        ({"txn_no": "Ä-1\u0001"}, "Ä-1\u0001"),
    ]
    async with pool.acquire() as conn:
        for event, txn_no in events:
            await q.voucher(conn, "x", event, txn_no)
        await seal_once(conn)
        assert (await verify(conn)).ok
        await conn.execute("UPDATE voucher_events SET txn_no = 'INNER' WHERE seq = 2")
        result = await verify(conn)
        assert result.first_broken == 2, result.problem
        await conn.execute("UPDATE voucher_events SET txn_no = NULL WHERE seq = 2")
        await conn.execute("UPDATE voucher_events SET txn_no = 'KEY' WHERE seq = 4")
        result = await verify(conn)
        assert result.first_broken == 4, result.problem


@pytest.mark.asyncio
async def test_an_untouched_chain_of_every_kind_the_gateway_writes_verifies(
    start_gateway: StartGateway,
) -> None:
    """Whitelist changes, acceptances, sends, callbacks, failures, fail-over, escalation and
    prefund moves, with their ledger postings: each voucher's txn_no column is its event's."""
    h = await start_gateway(dispatch={"escalate_after_seconds": 0.01})
    await h.register()
    await h.register("B2")
    resp = await h.client.delete(f"/v1/borrowers/B2/accounts/{ACCOUNT['account_no']}",
                                 headers=AUTH)  # fmt: skip
    assert resp.status == 204
    a, b = h.banks["bank-a"], h.banks["bank-b"]
    a.script(PROCESS, order_no=order_no("K-CALLBACK", 1))
    a.script(reject(pre_execution=False), order_no=order_no("K-FAILED", 1))
    a.script(reject(pre_execution=True), order_no=order_no("K-REROUTED", 1))
    b.script(SUCCEED, order_no=order_no("K-REROUTED", 2))
    a.script(reject(pre_execution=True), order_no=order_no("K-NONE", 1))
    b.script(reject(pre_execution=True), order_no=order_no("K-NONE", 2))
    a.script(unknown(executed=False), SUCCEED, order_no=order_no("K-ESCALATED", 1))
    for txn in ("K-CALLBACK", "K-FAILED", "K-REROUTED", "K-NONE", "K-ESCALATED"):
        await h.accepted(txn)
    await h.wait_status("K-CALLBACK", "processing")
    callback = order_no("K-CALLBACK", 1)
    a.settle(callback, BankStatus.SUCCEEDED)
    assert await h.callback("bank-a", *a.callback(callback, BankStatus.SUCCEEDED)) == 200
    resp = await h.client.post("/v1/funders/bank-b/prefund", json={"reference": "TOP-1",
                               "amount": 500}, headers=AUTH)  # fmt: skip
    assert resp.status == 201, await resp.text()
    await h.wait_status("K-CALLBACK", "succeeded")
    await h.wait_status("K-REROUTED", "succeeded")
    await h.wait_status("K-ESCALATED", "succeeded")
    await h.wait_status("K-FAILED", "failed")
    await h.wait_status("K-NONE", "failed")

    async def sealed() -> bool | None:
        async with h.pool.acquire() as conn:
            await _seal_all(h.pool)
            return not await conn.fetchval("SELECT count(*) FROM voucher_events WHERE seq IS NULL")

    await eventually(sealed, "every voucher sealed")
    async with h.pool.acquire() as conn:
        result = await verify(conn, page=7)
        rows = await conn.fetch("SELECT kind, txn_no, event::jsonb ->> 'txn_no' AS named"
                                " FROM voucher_events")  # fmt: skip
    assert result.ok, result.problem
    assert all(r["txn_no"] == r["named"] for r in rows), [dict(r) for r in rows]
    kinds = {r["kind"] for r in rows}
    assert {
        "whitelist.registered", "whitelist.removed", "disbursement.accepted",
        "ledger.disbursement.accepted", "disbursement.processing", "disbursement.succeeded",
        "disbursement.failed", "attempt.failed", "disbursement.rerouted", "attempt.escalated",
        "admin.prefund.topup", "ledger.prefund.topup",
    } <= kinds, kinds  # fmt: skip
    assert {r["kind"] for r in rows if r["txn_no"] is None} >= {"ledger.prefund.topup"}
