"""Wake-up calls for the dispatchers (intake's) and the notifiers (outcomes'), coalesced.

A NOTIFY sent inside a transaction serialises that transaction's commit with every other
notifying one (PostgreSQL takes one lock for the notification queue from pre-commit to the
end of the commit, so their WAL flushes can no longer be grouped). Intake therefore does not
notify in its transaction: after its commit it names the funder here, and this loop sends one
NOTIFY per funder for everything accepted in the last few milliseconds. A wake-up lost to a
crash costs nothing but latency: the dispatchers also poll. An outcome that enqueues its
webhook (`outcomes.move`) wakes the notifiers the same way.
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
        self._pending: set[tuple[str, str]] = set()  # (channel, payload)
        self._event = asyncio.Event()

    def wake(self, funder_id: str) -> None:
        """Dispatch work for `funder_id` was committed."""
        self._pending.add((q.DISPATCH_CHANNEL, funder_id))
        self._event.set()

    def wake_notifiers(self) -> None:
        """A webhook row was (or is about to be) committed."""
        self._pending.add((q.WEBHOOK_CHANNEL, ""))
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
        pending, self._pending = sorted(self._pending), set()
        if not pending:
            return
        try:
            # bounded: with every connection busy (or the pool closing) the wake-up is dropped
            # rather than waited for; the workers' polling picks the work up
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn:
                await conn.execute(
                    "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS u(c, p)",
                    [c for c, _ in pending],
                    [p for _, p in pending],
                    timeout=ACQUIRE_TIMEOUT_SECONDS,
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("dispatch.wakeup_failed", wakeups=pending, error=str(e))
