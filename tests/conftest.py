"""Shared fixtures: one PostgreSQL for the session (embedded, or FUNDGATE_TEST_DATABASE_URL),
emptied before every test that uses it, so tests are isolated and run in any order."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from gateway.store import db
from gateway.store.embedded import EmbeddedPostgres

TABLES_KEPT = {"schema_migrations"}


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("FUNDGATE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="fundgate-test-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp), durable=False)
        try:
            yield pg.start()
        finally:
            pg.stop()


async def _reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            if r["tablename"] not in TABLES_KEPT
        ]
        if tables:
            await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def clean_db(database_url: str) -> str:
    """The database URL, migrated and empty."""
    asyncio.run(_reset(database_url))
    return database_url


@pytest_asyncio.fixture
async def pool(clean_db: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(clean_db, min_size=1, max_size=10)
    try:
        yield p
    finally:
        await p.close()
