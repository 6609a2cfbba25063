"""Gauges read from the database, refreshed by every process whatever its role, so each
exports the same values (combine them with `max by`); and old callback nonces forgotten."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from gateway.context import Services
from gateway.store import queries as q

log = structlog.get_logger("fundgate.housekeeping")

HOUSEKEEPING_SECONDS = 5.0
# a bank signs a callback at most 300 s before we see it; keep nonces well past that
NONCE_RETENTION_SECONDS = 900
# nonces forgotten per refresh at most (a refresh runs every few seconds in every process)
NONCE_PURGE_BATCH = 50_000


async def forget_nonces(svc: Services) -> None:
    """Old callback nonces deleted, a batch per refresh; a failure is logged and never keeps
    the gauges from being refreshed."""
    try:
        async with svc.pool.acquire() as conn:
            await q.forget_nonces(conn, NONCE_RETENTION_SECONDS, NONCE_PURGE_BATCH)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        log.warning("housekeeping.nonces_failed", error=str(e))


async def refresh(svc: Services) -> None:
    await forget_nonces(svc)
    async with svc.pool.acquire() as conn:
        stats = await q.outbox_stats(conn)
        usage = await q.usage(conn, svc.business_day())
        prefund = await q.prefund_balances(conn)
        in_flight = await q.in_flight_counts(conn)
        circuits = await q.circuits(conn)
        stuck = await q.stuck_attempts(conn)
        chain = await q.voucher_chain_stats(conn)
        verified = await q.last_verification(conn)
        recon_last, recon_breaks = await q.recon_stats(conn)
    m = svc.metrics
    for kind in ("dispatch", "webhook"):
        depth, age = stats.get(kind, (0, 0.0))
        m.set_outbox(kind, depth, age)
    for f in svc.cfg.funders:
        m.set_limit(f.id, usage.get(q.funder_scope(f.id), 0), f.daily_limit)
        m.set_attempts_unknown(f.id, in_flight.get(f.id, {}).get("unknown", 0))
        row = stuck.get(f.id)
        m.set_attempts_unknown_oldest_age(f.id, row["oldest"] if row else 0.0)
        m.set_attempts_escalated_unresolved(f.id, row["escalated"] if row else 0)
        m.set_attempts_at_bank_oldest_age(f.id, row["at_bank"] if row else 0.0)
        match circuits.get(f.id, "closed"):  # no row yet: never opened
            case "closed" | "half_open" | "open" as state:
                m.set_circuit_state(f.id, state)
            case other:
                log.warning("housekeeping.circuit_state", funder_id=f.id, state=other)
        if f.mode == "co_lending":
            m.set_prefund_balance(f.id, prefund.get(f.id, 0))
        if f.id in recon_last:
            m.recon_succeeded(f.id, recon_last[f.id])
        m.set_recon_breaks(f.id, recon_breaks.get(f.id, {}))
    m.set_limit("platform", usage.get(q.PLATFORM_SCOPE, 0), svc.cfg.gateway.platform_daily_limit)
    if chain is not None:
        m.set_voucher_chain(chain["sealed"], chain["unsealed"], chain["oldest"])
    if verified is not None:
        m.voucher_verification(verified["intact"], verified["at"])


async def run(svc: Services, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await refresh(svc)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("housekeeping.failed", error=str(e))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HOUSEKEEPING_SECONDS)
