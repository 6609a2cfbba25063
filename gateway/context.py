"""What the handlers and workers share, built once in `gateway.app.create_app`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, cast

import asyncpg
import httpx
from asyncpg.pool import PoolConnectionProxy

from config.models import FileConfig, Funder
from connectors.base import BankConnector
from gateway.circuit import Breaker
from gateway.crypto import Vault
from gateway.errors import Unavailable
from gateway.metrics import Metrics
from gateway.states import TERMINAL
from gateway.store import queries as q
from gateway.wakeups import Wakeups

# intake may see a circuit change this much later than the process that made it
CIRCUIT_CACHE_SECONDS = 1.0
# open attempts remembered for their callbacks: several times the orders in flight at once
RECENT_ATTEMPTS = 20_000


class RecentAttempts:
    """The open attempts this process moved last, by order number, as they are after the
    move: a bank's callback about an order this process has just sent is then decided
    without reading its attempt first.

    Safe because a move decided from a row read without a lock is a compare-and-set on the
    attempt's status (`outcomes.move`, `fg_move`): a remembered row whose attempt another
    process moved meanwhile answers "stale", and the attempt is read again. Besides the
    status, a move reads only what is fixed when the attempt is created (its amounts, funder,
    buckets, order and transaction numbers). Terminal attempts are forgotten: nothing moves
    them on, and a late report reads the database as before."""

    def __init__(self, size: int = RECENT_ATTEMPTS) -> None:
        self._size = size
        self._rows: dict[str, dict[str, Any]] = {}

    def get(self, order_no: str) -> asyncpg.Record | None:
        # a mapping with the record's keys: the moves only index it
        return cast(asyncpg.Record | None, self._rows.get(order_no))

    def moved(self, a: asyncpg.Record, status: str) -> None:
        order = a["order_no"]
        self._rows.pop(order, None)
        if status in TERMINAL:
            return
        self._rows[order] = {**a, "status": status}
        if len(self._rows) > self._size:
            del self._rows[next(iter(self._rows))]  # the oldest


def utcnow() -> datetime:
    return datetime.now(UTC)


def business_day(cfg: FileConfig, at: datetime | None = None) -> date:
    return (at or utcnow()).astimezone(cfg.gateway.zone).date()


@dataclass
class Services:
    cfg: FileConfig
    pool: asyncpg.Pool
    connectors: dict[str, BankConnector]
    metrics: Metrics
    http: httpx.AsyncClient
    clock: Callable[[], datetime] = utcnow
    funders: dict[str, Funder] = field(init=False)
    breakers: dict[str, Breaker] = field(init=False)
    vault: Vault = field(init=False)
    wakeups: Wakeups = field(default_factory=Wakeups)
    recent: RecentAttempts = field(default_factory=RecentAttempts)
    _circuits: tuple[float, dict[str, str]] = field(init=False, default=(-1.0, {}))

    def __post_init__(self) -> None:
        self.funders = {f.id: f for f in self.cfg.funders}
        self.vault = Vault(self.cfg.security)
        d = self.cfg.dispatch
        self.breakers = {
            f.id: Breaker(f.id, d.circuit_failure_threshold, d.circuit_cooldown_seconds)
            for f in self.cfg.funders
        }

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[PoolConnectionProxy]:
        """A connection for a request; 503 + Retry-After instead of an unbounded queue."""
        try:
            conn = await self.pool.acquire(timeout=self.cfg.gateway.db_acquire_timeout_seconds)
        except TimeoutError as e:
            self.metrics.pool_exhausted()
            raise Unavailable(
                "overloaded", "no database connection free; retry shortly", retry_after=1
            ) from e
        try:
            yield conn
        finally:
            await self.pool.release(conn)

    async def circuits(self, conn: q.Conn) -> dict[str, str]:
        """Circuit states of every funder as all processes see them (cached for a second)."""
        at, states = self._circuits
        now = time.monotonic()
        if now - at > CIRCUIT_CACHE_SECONDS:
            states = await q.circuits(conn)
            self._circuits = (now, states)
        return states

    def wake_dispatch(self, funder_id: str) -> None:
        """Committed dispatch work for `funder_id`: wake the dispatchers (soon, coalesced)."""
        self.wakeups.wake(funder_id)

    def business_day(self, at: datetime | None = None) -> date:
        return business_day(self.cfg, at or self.clock())

    def callback_url(self, funder_id: str) -> str:
        return f"{self.cfg.gateway.public_url.rstrip('/')}/v1/callbacks/{funder_id}"
