"""Connection pool, numbered migrations under an advisory lock, and where the database is."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from config.loader import Settings
from gateway.store.embedded import EmbeddedPostgres
from gateway.store.queries import Conn

# pg_advisory_lock key held while migrating: any number of processes may start at once
MIGRATION_LOCK_KEY = 0x66756E6467617465  # "fundgate"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    out: list[Migration] = []
    folder = resources.files("gateway.store") / "migrations"
    for entry in folder.iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    return out


async def applied_versions(conn: Conn) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def pending(conn: Conn) -> list[Migration]:
    done = await applied_versions(conn)
    return [m for m in migrations() if m.version not in done]


# A migration (an index built over a large table) and the wait for another process's
# migrations take as long as they take: not the pool's `command_timeout`, meant for requests
MIGRATION_TIMEOUT = 24 * 3600.0


async def migrate(conn: Conn) -> list[Migration]:
    """Apply every pending migration, each in its own transaction; returns those applied."""
    applied: list[Migration] = []
    holds_session_state(conn)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY, timeout=MIGRATION_TIMEOUT)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in await pending(conn):
            async with conn.transaction():
                await conn.execute(m.sql, timeout=MIGRATION_TIMEOUT)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    m.version,
                    m.name,
                )
            applied.append(m)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def _init_connection(conn: Conn) -> None:
    for name in ("jsonb", "json"):
        await conn.set_type_codec(name, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


# Server pids of pooled connections that took session state (a session-level advisory lock,
# a LISTEN). Only those get asyncpg's reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET
# ALL) when released; the others skip that round trip, one per request otherwise. The code
# uses no session settings (SET LOCAL only) and no cursors outside transactions.
_SESSION_STATE: set[int] = set()


def holds_session_state(conn: Conn) -> None:
    """Mark a pooled connection about to take session state: it is reset when released."""
    _SESSION_STATE.add(conn.get_server_pid())


async def _reset(conn: asyncpg.Connection) -> None:
    # asyncpg has already rolled back an open transaction and dropped the listener callbacks
    pid = conn.get_server_pid()
    if pid in _SESSION_STATE:
        _SESSION_STATE.discard(pid)
        await conn.execute(conn.get_reset_query())


# what a query may take before the client cancels it: requests and workers wait no longer
# (a nightly reconciliation's own statements set theirs: `recon_queries.RUN_TIMEOUT`)
COMMAND_TIMEOUT_SECONDS = 30.0


async def create_pool(
    url: str,
    *,
    min_size: int = 2,
    max_size: int = 20,
    command_timeout: float = COMMAND_TIMEOUT_SECONDS,
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=_init_connection,
        command_timeout=command_timeout, reset=_reset,
    )  # fmt: skip
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def database_url(settings: Settings) -> AsyncIterator[str]:
    """The configured URL, or an embedded server started (and stopped) around the block."""
    if settings.database_url is not None:
        yield settings.database_url.get_secret_value()
        return
    embedded = EmbeddedPostgres(Path(settings.data_dir))
    url = embedded.start()
    try:
        yield url
    finally:
        embedded.stop()
