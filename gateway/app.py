"""Wiring in one place: `create_app` builds the pool, connectors, metrics and workers.

Nothing here runs at import time; everything is created in `cleanup_ctx` and torn down in
reverse order, so a SIGTERM stops intake first, then lets in-flight bank calls finish (or
leaves them to their lease), then closes the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal

import asyncpg
import structlog
from aiohttp import web

from config.models import FileConfig
from connectors import registry
from connectors.base import BankConnector
from connectors.transport import outbound_client
from gateway import housekeeping, ledger, pii
from gateway.api import SERVICES, install_routes
from gateway.context import Services, business_day
from gateway.crypto import Vault
from gateway.dispatcher import Dispatcher, Poller
from gateway.http import Authenticator, make_middlewares
from gateway.metrics import Metrics
from gateway.notifier import Notifier
from gateway.reconcile import run_scheduler
from gateway.store import db
from gateway.store import queries as q
from gateway.vouchers import run_sealer

log = structlog.get_logger("fundgate.app")

Role = Literal["all", "api", "worker"]

# how long the listener and the wake-up loop get to finish by themselves at shutdown
STOP_LISTEN_SECONDS = 5.0


def create_app(
    cfg: FileConfig,
    *,
    database_url: str | None = None,
    pool: asyncpg.Pool | None = None,
    connectors: dict[str, BankConnector] | None = None,
    metrics: Metrics | None = None,
    role: Role = "all",
    pool_size: int = 20,
) -> web.Application:
    if pool is None and database_url is None:
        raise ValueError("create_app needs a database_url or a pool")
    m = metrics or Metrics()
    app = web.Application(
        client_max_size=cfg.gateway.max_body_bytes,
        middlewares=make_middlewares(Authenticator(cfg.clients), m.observe_http),
    )

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own_pool = pool is None
        p = pool or await db.create_pool(database_url or "", max_size=pool_size)
        http = outbound_client(cfg.gateway.http_transport)
        try:
            async with p.acquire() as conn:
                applied = await db.migrate(conn)
                if applied:
                    log.info("db.migrated", versions=[a.version for a in applied])
                vault = Vault(cfg.security)
                await pii.encrypt_legacy(conn, vault)
                await pii.index_names(conn, vault)
                opening = {f.id: f.prefund_balance for f in cfg.funders if f.mode == "co_lending"}
                async with conn.transaction():
                    for funder_id in await q.seed_prefund(conn, opening):
                        await ledger.custody_move(
                            conn, funder_id, opening[funder_id], business_day(cfg),
                            kind="prefund.opening", reference=f"opening:{funder_id}",
                        )  # fmt: skip
            conns = connectors if connectors is not None else registry.build_all(cfg, http)
            app[SERVICES] = Services(cfg=cfg, pool=p, connectors=conns, metrics=m, http=http)
            yield
        finally:
            if connectors is None and SERVICES in app:
                for c in app[SERVICES].connectors.values():
                    await c.aclose()
            await http.aclose()
            if own_pool:
                await p.close()

    app.cleanup_ctx.append(resources)
    app.cleanup_ctx.append(_housekeeping)
    if role in ("all", "worker"):
        app.cleanup_ctx.append(_workers)
    install_routes(app, api=role in ("all", "api"))
    return app


async def _listen(
    svc: Services, dispatcher: Dispatcher, notifier: Notifier, stop: asyncio.Event
) -> None:
    """LISTEN for new dispatch and webhook work; reconnects if the connection drops (polling
    covers gaps)."""
    channels = {q.DISPATCH_CHANNEL: dispatcher.wake, q.WEBHOOK_CHANNEL: notifier.wake}
    while not stop.is_set():
        try:
            async with svc.pool.acquire() as conn:
                db.holds_session_state(conn)  # LISTEN: reset when released
                for channel, wake in channels.items():
                    await conn.add_listener(channel, wake)
                try:
                    await stop.wait()
                finally:
                    for channel, wake in channels.items():
                        await conn.remove_listener(channel, wake)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("dispatch.listen_failed", error=str(e))
            await asyncio.sleep(1)


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    """Every role refreshes the database gauges, so an api-only process exports them too,
    and sends intake's dispatch wake-ups."""
    svc = app[SERVICES]
    stop = asyncio.Event()
    task = asyncio.create_task(housekeeping.run(svc, stop), name="housekeeping")
    wakeups = asyncio.create_task(svc.wakeups.run(svc.pool, stop), name="wakeups")
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        # the wake-up loop sends what intake accepted last, then ends by itself
        await asyncio.wait([wakeups], timeout=STOP_LISTEN_SECONDS)
        wakeups.cancel()
        await asyncio.gather(task, wakeups, return_exceptions=True)


async def _workers(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICES]
    stop = asyncio.Event()
    dispatcher, poller, notifier = Dispatcher(svc), Poller(svc), Notifier(svc)
    listen = asyncio.create_task(_listen(svc, dispatcher, notifier, stop), name="listen")
    tasks = [
        asyncio.create_task(dispatcher.run(stop), name="dispatcher"),
        asyncio.create_task(poller.run(stop), name="poller"),
        asyncio.create_task(notifier.run(stop), name="notifier"),
        asyncio.create_task(
            run_sealer(svc.pool, stop, svc.cfg.security, svc.business_day), name="sealer"
        ),
        asyncio.create_task(run_scheduler(svc, stop), name="reconciliation"),
    ]
    log.info("workers.started")
    try:
        yield
    finally:
        stop.set()
        for loop in (dispatcher, poller, notifier):
            await loop.drain(svc.cfg.dispatch.drain_seconds)
        # the listener ends by itself once `stop` is set; cancelled in its UNLISTEN, its
        # connection could be left checked out and the pool would never close
        await asyncio.wait([listen], timeout=STOP_LISTEN_SECONDS)
        for t in [*tasks, listen]:
            t.cancel()
        await asyncio.gather(*tasks, listen, return_exceptions=True)
        # the notifier's loop may have started webhooks while the loops drained (rows it
        # claimed just before the stop), and one may have opened its session again: they get
        # a moment, are handed back if they need longer, and the session is closed
        await notifier.drain(1)
        log.info("workers.stopped")
