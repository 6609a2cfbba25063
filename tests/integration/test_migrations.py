"""Migrations: applied once under an advisory lock, idempotent, and `/readyz` tracks them."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway.store import db
from tests.integration.conftest import StartGateway

pytestmark = pytest.mark.integration


async def _drop_everything(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        if tables:
            await conn.execute(f"DROP TABLE {', '.join(tables)} CASCADE")
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_every_migration_is_recorded_once(clean_db: str) -> None:
    conn = await asyncpg.connect(clean_db)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in db.migrations()
        ]
        assert await db.pending(conn) == []
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_migrating_a_current_database_applies_nothing(clean_db: str) -> None:
    conn = await asyncpg.connect(clean_db)
    try:
        assert await db.migrate(conn) == []
        assert await db.migrate(conn) == []
        count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(db.migrations())
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_concurrent_migrate_from_three_connections_applies_each_migration_once(
    clean_db: str,
) -> None:
    await _drop_everything(clean_db)
    conns = [await asyncpg.connect(clean_db) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(db.migrate(c) for c in conns))
        versions = sorted(m.version for batch in applied for m in batch)
        assert versions == [m.version for m in db.migrations()]
        assert await db.pending(conns[0]) == []
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(db.migrations())
        # the advisory lock was released by every migrator
        held = await conns[0].fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
        assert held == 0
    finally:
        for c in conns:
            await c.close()


@pytest.mark.asyncio
async def test_gateway_started_twice_on_one_database_migrates_nothing_the_second_time(
    start_gateway: StartGateway,
) -> None:
    first = await start_gateway(role="api")
    second = await start_gateway(role="api")
    for h in (first, second):
        resp = await h.client.get("/readyz")
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    async with first.pool.acquire() as conn:
        count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
    assert count == len(db.migrations())


@pytest.mark.asyncio
async def test_readyz_is_503_while_a_migration_is_pending(start_gateway: StartGateway) -> None:
    h = await start_gateway(role="api")
    assert (await h.client.get("/readyz")).status == 200
    last = db.migrations()[-1]
    async with h.pool.acquire() as conn:
        await conn.execute("DELETE FROM schema_migrations WHERE version = $1", last.version)
    try:
        resp = await h.client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert body["status"] == "migrations_pending"
        assert body["pending"] == [last.version]
        assert (await h.client.get("/healthz")).status == 200
    finally:
        async with h.pool.acquire() as conn:  # put it back: the next test's reset migrates
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                last.version,
                last.name,
            )
    assert (await h.client.get("/readyz")).status == 200


@pytest.mark.asyncio
async def test_a_long_migration_and_the_wait_for_another_outlast_the_pools_query_timeout(
    clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool cancels a query after `command_timeout` (30 s, for requests). A migration
    that builds an index over a large table, and a process waiting for another's migrations,
    take longer: here the pool's timeout is 1 s, a migration sleeps 2 s, and the lock is
    held by another connection for 2 s first."""
    slow = db.Migration(9999, "slow", "SELECT pg_sleep(2)")
    monkeypatch.setattr(db, "migrations", lambda: [slow])
    pool = await db.create_pool(clean_db, min_size=1, max_size=2, command_timeout=1.0)
    holder = await asyncpg.connect(clean_db)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", db.MIGRATION_LOCK_KEY)

        async def release_later() -> None:
            await asyncio.sleep(2)
            await holder.execute("SELECT pg_advisory_unlock($1)", db.MIGRATION_LOCK_KEY)

        releasing = asyncio.create_task(release_later())
        async with pool.acquire() as conn:
            applied = await db.migrate(conn)
        await releasing
        assert applied == [slow]
    finally:
        await holder.execute("DELETE FROM schema_migrations WHERE version = 9999")
        await holder.close()
        await pool.close()
