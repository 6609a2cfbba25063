"""Intake's wake-up calls for the dispatchers, coalesced.

A NOTIFY sent inside a transaction serialises that transaction's commit with every other
notifying one (PostgreSQL takes one lock for the notification queue from pre-commit to the
end of the commit, so their WAL flushes can no longer be grouped). Intake therefore does not
notify in its transaction: after its commit it names the funder here, and this loop sends one
NOTIFY per funder for everything accepted in the last few milliseconds. A wake-up lost to a
crash costs nothing but latency: the dispatchers also poll.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from gateway.store import queries as q

log = structlog.get_logger("fundgate.wakeups")

# how long accepted work may wait for its wake-up, gathering others into the same NOTIFY
COALESCE_SECONDS = 0.02
ACQUIRE_TIMEOUT_SECONDS = 1.0


class Wakeups:
    def __init__(self) -> None:
        self._funders: set[str] = set()
        self._event = asyncio.Event()

    def wake(self, funder_id: str) -> None:
        self._funders.add(funder_id)
        self._event.set()

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        """Until `stop`: flush every COALESCE_SECONDS while there is something to send; then
        one last flush, and return (never cancelled mid-acquire at shutdown)."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                woken = asyncio.create_task(self._event.wait())
                await asyncio.wait([woken, stopping], return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if not stop.is_set():
                    await asyncio.sleep(COALESCE_SECONDS)
                await self.flush(pool)
        finally:
            stopping.cancel()

    async def flush(self, pool: asyncpg.Pool) -> None:
        self._event.clear()
        funders, self._funders = sorted(self._funders), set()
        if not funders:
            return
        try:
            # bounded: with every connection busy (or the pool closing) the wake-up is dropped
            # rather than waited for; the dispatchers' polling picks the work up
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn:
                await conn.execute(
                    "SELECT pg_notify($1, f) FROM unnest($2::text[]) AS f",
                    q.DISPATCH_CHANNEL,
                    funders,
                    timeout=ACQUIRE_TIMEOUT_SECONDS,
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("dispatch.wakeup_failed", funders=funders, error=str(e))
