"""Faults, crashes and concurrency together: the short chaos run keeps every invariant.

Two gateways on one database, three sandbox banks with seeded faults, a few hundred
disbursements from concurrent clients with duplicate storms, two SIGKILLs, then the oracle
(see `bench/chaos.py`). On failure the assertion message is the run's report: counts, every
violation and the process log lines of the first disbursements involved.
"""

from __future__ import annotations

import pytest

from bench.chaos import ChaosSettings, run_chaos

pytestmark = pytest.mark.e2e


@pytest.mark.asyncio
async def test_short_chaos_run_pays_nothing_twice_loses_nothing_and_keeps_every_limit(
    chaos_settings: ChaosSettings,
) -> None:
    report = await run_chaos(chaos_settings)

    assert report.violations == [], report.text()
    # the run did go through what it claims to survive, or passing would prove little
    assert len(report.kills) == chaos_settings.kills, report.text()
    assert report.storms > 0, report.text()
    assert report.replayed > 0, report.text()
    assert report.rerouted > 0, report.text()
    assert report.unknown_resolved > 0, report.text()
    assert report.refused.get("limit_exceeded", 0) > 0, report.text()
    assert report.unknown_resolved_by_query > 0, report.text()
    assert report.executions == report.succeeded > 0, report.text()
