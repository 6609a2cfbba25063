"""Outcome webhooks to the lending core from the durable outbox: signed, retried until a 2xx.

A short burst of in-process retries (tenacity) rides out a blip; after that the row waits in
the outbox with a growing delay, so nothing is lost across restarts. Delivery is at least
once: the lending core deduplicates by `txn_no` + `status`.

Webhooks go out on an `aiohttp.ClientSession` of the notifier's own (opened with the first
webhook, closed by `drain`), not through the httpx client the bank connectors share: a
webhook is one small signed POST whose only question is "2xx or not", and httpx's request
building and response handling cost a gateway as much CPU per webhook as the rest of its
delivery. Bank calls keep httpx (`connectors.http`), where the failure taxonomy matters.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from gateway.context import Services
from gateway.dispatcher import _Loop
from gateway.store import queries as q

log = structlog.get_logger("fundgate.notifier")

# a webhook answered within this long, its connection made within CONNECT_SECONDS
TIMEOUT_SECONDS = 10.0
CONNECT_SECONDS = 3.0
# idle keep-alive connections to the lending core are closed after this long
KEEPALIVE_SECONDS = 5.0
# what a blip looks like: no connection, a dropped one, no answer in time
TRANSIENT = (aiohttp.ClientError, TimeoutError)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`hex(hmac_sha256(secret, timestamp + "." + body))`, as CONTRACT.md specifies."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class WebhookRefused(Exception):
    pass


class Notifier(_Loop):
    name = "notifier"

    def __init__(self, svc: Services) -> None:
        lc = svc.cfg.lending_core
        super().__init__(svc, capacity=16 if lc is None else lc.max_in_flight)
        # delivered rows, deleted with the next claim (one statement for all delivered since,
        # instead of one each); still leased meanwhile, so nobody sends them again unless this
        # process dies first, which at-least-once delivery allows
        self.delivered: set[int] = set()
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.capacity, keepalive_timeout=KEEPALIVE_SECONDS
                ),
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS, sock_connect=CONNECT_SECONDS),
                auto_decompress=False,
                trust_env=False,
            )
        return self.session

    async def claim(self, conn: q.Conn, n: int) -> list[asyncpg.Record]:
        await self._forget_delivered(conn)
        if self.svc.cfg.lending_core is None:
            return []
        return await q.claim(conn, "webhook", n, self.svc.cfg.dispatch.lease_seconds)

    async def _forget_delivered(self, conn: q.Conn) -> None:
        if self.delivered:
            ids = list(self.delivered)
            await q.finish_outboxes(conn, ids)
            self.delivered.difference_update(ids)

    async def close(self) -> None:
        """Close the webhooks' HTTP session; a later webhook opens another."""
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()

    async def drain(self, timeout: float) -> None:
        await super().drain(timeout)
        await self.close()
        if self.delivered:
            try:
                async with self.svc.pool.acquire(timeout=2) as conn:
                    await self._forget_delivered(conn)
            except (TimeoutError, OSError, asyncpg.PostgresError) as e:
                log.warning("notifier.finish_failed", error=str(e), rows=len(self.delivered))

    async def release(self, conn: q.Conn, ids: list[int], untried: dict[int, int]) -> None:
        await q.release_leases(conn, ids)

    async def _post(self, payload: dict[str, Any]) -> None:
        lc = self.svc.cfg.lending_core
        assert lc is not None
        body = orjson.dumps(payload)  # compact UTF-8, as json.dumps(ensure_ascii=False)
        ts = str(int(time.time()))
        async with self._session().post(
            lc.webhook_url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-Fundgate-Timestamp": ts,
                "X-Fundgate-Signature": sign(lc.webhook_secret.get_secret_value(), ts, body),
            },
            allow_redirects=False,
        ) as resp:
            await resp.read()  # the connection goes back to the pool whole
            if not 200 <= resp.status < 300:
                raise WebhookRefused(f"lending core answered {resp.status}")

    async def handle(self, row: asyncpg.Record) -> None:
        payload = row["payload"]
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(3),
                wait=wait_exponential(multiplier=0.1, max=1),
                retry=retry_if_exception_type((*TRANSIENT, WebhookRefused)),
                reraise=True,
            ):
                with attempt:
                    await self._post(payload)
        except (*TRANSIENT, WebhookRefused) as e:
            steps = self.svc.cfg.dispatch.webhook_backoff_seconds
            delay = steps[min(row["tries"] - 1, len(steps) - 1)]
            async with self.svc.pool.acquire() as conn:
                await q.retry_outbox(conn, row["id"], delay, str(e) or type(e).__name__)
            self.svc.metrics.webhook("failed")
            log.warning(
                "webhook.retry_later",
                txn_no=payload.get("txn_no"),
                status=payload.get("status"),
                tries=row["tries"],
                delay_s=delay,
                error=str(e) or type(e).__name__,
            )
            return
        self.delivered.add(row["id"])  # deleted by the next claim (this task's end wakes it)
        self.svc.metrics.webhook("delivered")
        log.info("webhook.delivered", txn_no=payload.get("txn_no"), status=payload.get("status"))
