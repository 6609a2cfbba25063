"""Fixtures of the end-to-end suite.

Each test module builds its own `stack` fixture (banks, gateways and config it needs) with
`harness.run_stack`; processes are started once per module where tests can share them
(every test uses fresh txn_nos and borrowers) and once per test where the database must be
fresh (limits). The `api` fixture is an `Api` client for the module's `stack`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from gateway.store import db
from tests.e2e.harness import Api, Stack

KEPT_TABLES = {"schema_migrations"}


async def _reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            if r["tablename"] not in KEPT_TABLES
        ]
        if tables:
            await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def module_db(database_url: str) -> str:
    """`clean_db` for a whole module: migrated and emptied before the module's processes start
    (they seed the prefund balances at start-up, so the database is not emptied under them)."""
    asyncio.run(_reset(database_url))
    return database_url


@pytest_asyncio.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    async with stack.api() as client:
        yield client


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[Any]:
    """On a failure, attach the tail of every process log of the test's stack to the report."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for value in funcargs.values():
            if isinstance(value, Stack):
                report.sections.append(("process logs", value.log_tails()))
                break
    return report
