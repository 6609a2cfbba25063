"""The metrics, dashboard and alerts against the real thing: a gateway and two sandbox banks as
processes (tests/e2e/harness.py), disbursements through the HTTP API, a real Prometheus server
scraping the gateway every second with alerts.yml loaded, and promtool on the live `/metrics`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from gateway.store import db
from tests.e2e.harness import Stack, run_stack
from tests.ops.conftest import (
    ALERTS,
    PrometheusServer,
    catalogue_series,
    run_prometheus,
    run_promtool,
)
from tests.ops.test_dashboard import concrete, queries
from tests.ops.test_rules import alert_blocks

pytestmark = pytest.mark.e2e

BANK_A_AMOUNTS = (1_000_000, 1_200_000, 1_500_000, 2_000_000)  # direct, priority 1
BANK_B_AMOUNTS = (1_000_001, 3_000_000)  # co-lending by funder_hint, platform share 30 %
BANK_B_PREFUND = 1_000_000_000  # tests/e2e/harness.py bank_b()
PLATFORM_SHARE = 0.3

# dashboard queries that are empty after a healthy run of a few seconds, and why
EMPTY_WHEN_HEALTHY = {
    ("Unresolved reconciliation breaks", "A"): "no reconciliation has run",
    ("Since last successful reconciliation", "A"): "no reconciliation has run",
    ("Voucher sealing and verification", "B"): "no verification in the gateway process",
    ("Bank callbacks by result", "B"): "no bank has paid an order fundgate failed",
}


async def _reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            if r["tablename"] != "schema_migrations"
        ]
        if tables:
            await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


async def _fetchval(url: str, sql: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        value: int = await conn.fetchval(sql)
        return value
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def stack(
    prometheus_bin: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # without the prometheus binary every test here skips: start nothing
    # the gateway seeds prefund balances at start: empty the database before, not under it
    asyncio.run(_reset(database_url))
    with run_stack(tmp_path_factory.mktemp("ops-stack"), database_url) as s:
        yield s


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bin: str, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    target = f"127.0.0.1:{stack.gateway.port}"
    yield from run_prometheus(prometheus_bin, workdir, [target], [ALERTS])


@dataclass(frozen=True)
class Traffic:
    by_funder: dict[str, int]  # succeeded disbursements per funder


async def _submit(stack: Stack) -> None:
    async with stack.api() as api:
        bodies = [await api.new_disbursement(amount=a) for a in BANK_A_AMOUNTS]
        bodies += [
            await api.new_disbursement(amount=a, funder_hint="bank-b") for a in BANK_B_AMOUNTS
        ]
        for body in bodies:
            resp = await api.post(body)
            assert resp.status_code == 201, resp.text
        final = await api.wait_terminal([b["txn_no"] for b in bodies], timeout=20)
        assert {r["status"] for r in final.values()} == {"succeeded"}, final
        for body in bodies:
            await stack.receiver.wait_for(body["txn_no"], "succeeded", timeout=20)
        # a forged bank callback: refused, and counted under its reason
        forged = await api.http.post(
            "/v1/callbacks/bank-a",
            content=b'{"order_no": "X-1", "status": "SUCCESS"}',
            headers={
                "X-Sandbox-Timestamp": str(int(time.time())),
                "X-Sandbox-Nonce": "forged",
                "X-Sandbox-Signature": "0" * 64,
            },
        )
        assert forged.status_code == 401, forged.text


@pytest.fixture(scope="module")
def traffic(stack: Stack, prometheus: PrometheusServer) -> Traffic:
    """Disbursements paid end to end while Prometheus scrapes, then seen by Prometheus."""
    prometheus.wait_for('up{job="fundgate"}', 1)
    asyncio.run(_submit(stack))
    total = len(BANK_A_AMOUNTS) + len(BANK_B_AMOUNTS)
    prometheus.wait_for('sum(fundgate_disbursements_total{status="succeeded"})', total)
    # the gauges read from the database refresh every 5 s (gateway.app._housekeeping)
    prometheus.wait_for('max(fundgate_limit_used_fen{scope="platform"})', _platform_used())
    return Traffic({"bank-a": len(BANK_A_AMOUNTS), "bank-b": len(BANK_B_AMOUNTS)})


def _platform_used() -> int:
    return sum(BANK_A_AMOUNTS) + sum(BANK_B_AMOUNTS)


def test_prometheus_counts_the_disbursements_paid_end_to_end(
    prometheus: PrometheusServer, traffic: Traffic
) -> None:
    succeeded = 'sum(fundgate_disbursements_total{status="succeeded"})'
    assert prometheus.scalar(succeeded) == len(BANK_A_AMOUNTS) + len(BANK_B_AMOUNTS)
    by_funder = prometheus.values(
        'sum by (funder) (fundgate_disbursements_total{status="succeeded"})', "funder"
    )
    assert by_funder == traffic.by_funder
    accepted = prometheus.values(
        'sum by (funder) (fundgate_disbursements_total{status="accepted"})', "funder"
    )
    assert accepted == traffic.by_funder
    assert prometheus.scalar('sum(fundgate_disbursements_total{status="failed"})') is None
    sent_ok = prometheus.values(
        'sum by (funder) (fundgate_connector_calls_total{operation="disburse", outcome="ok"})',
        "funder",
    )
    assert sent_ok == traffic.by_funder
    created = 'sum(fundgate_http_requests_total{route="/v1/disbursements", status="201"})'
    assert prometheus.scalar(created) == len(BANK_A_AMOUNTS) + len(BANK_B_AMOUNTS)
    prometheus.wait_for(
        'sum(fundgate_webhooks_total{outcome="delivered"})',
        len(BANK_A_AMOUNTS) + len(BANK_B_AMOUNTS),
    )
    refused = prometheus.values(
        'sum by (reason) (fundgate_callbacks_refused_total{funder="bank-a"})', "reason"
    )
    assert refused == {"bad_signature": 1}


def test_prometheus_sees_limits_prefund_circuits_and_stuck_work_from_the_database(
    prometheus: PrometheusServer, stack: Stack, traffic: Traffic
) -> None:
    used = prometheus.values("max by (scope) (fundgate_limit_used_fen)", "scope")
    assert used == {
        "bank-a": sum(BANK_A_AMOUNTS),
        "bank-b": sum(BANK_B_AMOUNTS),
        "platform": _platform_used(),
    }
    remaining = prometheus.values("max by (scope) (fundgate_limit_remaining_fen)", "scope")
    limits = {f["id"]: f["daily_limit"] for f in stack.config["funders"]}
    limits["platform"] = stack.config["gateway"]["platform_daily_limit"]
    assert remaining == {scope: limits[scope] - used[scope] for scope in limits}
    platform_shares = sum(math.ceil(a * PLATFORM_SHARE) for a in BANK_B_AMOUNTS)
    prefund = prometheus.values("max by (funder) (fundgate_prefund_balance_fen)", "funder")
    assert prefund == {"bank-b": BANK_B_PREFUND - platform_shares}
    # every funder's circuit is exported (closed) though none ever changed state
    circuits = prometheus.values("max by (funder) (fundgate_circuit_state)", "funder")
    assert circuits == {"bank-a": 0, "bank-b": 0}
    for gauge in (
        "fundgate_attempts_unknown",
        "fundgate_attempts_unknown_oldest_age_seconds",
        "fundgate_attempts_escalated_unresolved",
    ):
        assert prometheus.values(f"max by (funder) ({gauge})", "funder") == {
            "bank-a": 0,
            "bank-b": 0,
        }, gauge
    prometheus.wait_for('max(fundgate_outbox_depth{kind="dispatch"})', 0)


def test_prometheus_sees_the_voucher_chain_sealed_to_its_last_event(
    prometheus: PrometheusServer, stack: Stack, traffic: Traffic
) -> None:
    deadline = time.monotonic() + 20
    while True:
        events = asyncio.run(_fetchval(stack.database_url, "SELECT count(*) FROM voucher_events"))
        sealed = prometheus.scalar("max(fundgate_vouchers_sealed)")
        unsealed = prometheus.scalar("max(fundgate_vouchers_unsealed)")
        if sealed == events and unsealed == 0:
            break
        assert time.monotonic() < deadline, (events, sealed, unsealed)
        time.sleep(0.5)
    assert events > 0
    assert prometheus.scalar("max(fundgate_vouchers_unsealed_oldest_age_seconds)") == 0


def test_promtool_check_metrics_is_clean_on_the_live_scrape(
    promtool: str, stack: Stack, traffic: Traffic
) -> None:
    scrape = httpx.get(f"{stack.gateway.url}/metrics", timeout=10.0)
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=")

    rc, out = run_promtool(promtool, "check", "metrics", stdin=scrape.content)

    assert rc == 0, out
    assert out == "", out
    exported = {line.split("{")[0].split(" ")[0] for line in scrape.text.splitlines() if line}
    exported = {name for name in exported if not name.startswith("#")}
    assert exported <= catalogue_series(), sorted(exported - catalogue_series())


def test_every_dashboard_query_evaluates_on_prometheus(
    prometheus: PrometheusServer, traffic: Traffic
) -> None:
    empty = []
    for title, ref, expr in queries():
        result = prometheus.query(concrete(expr))  # raises with Prometheus's error
        if not result and (title, ref) not in EMPTY_WHEN_HEALTHY:
            empty.append((title, ref, concrete(expr)))

    # beyond valid: after real traffic every panel shows data, but the few named above
    assert empty == []


def test_every_alert_rule_loads_and_evaluates_healthy_and_none_fires(
    prometheus: PrometheusServer, traffic: Traffic
) -> None:
    deadline = time.monotonic() + 10
    while True:
        groups = prometheus.api("rules", type="alert")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        evaluated = all(r["lastEvaluation"] > "2000" for r in rules.values())
        if evaluated or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    assert set(rules) == set(alert_blocks())
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{name.lower()}"
        assert rule["annotations"]["summary"], name
    firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == [], "a healthy run fires no alert"
