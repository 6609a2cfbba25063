"""The stress suite: `bench/chaos.py`'s chaos run, shortened to fit in `make test`.

The run is seeded: `FUNDGATE_CHAOS_SEED=<seed>` repeats a failed run (its seed is in the
report), `FUNDGATE_CHAOS_COUNT=<n>` makes it longer. Process logs stay in the test's
`tmp_path` (pytest keeps the last three runs' directories).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.chaos import ChaosSettings

SEED = 20261125
COUNT = 400  # a few hundred disbursements: about 15 s alone, well under a minute when loaded
KILLS = 2  # one while submitting, one right after the last submission


@pytest.fixture
def chaos_settings(clean_db: str, tmp_path: Path) -> ChaosSettings:
    """A short chaos run on the test database (emptied first), logs under `tmp_path`."""
    return ChaosSettings(
        count=int(os.environ.get("FUNDGATE_CHAOS_COUNT", COUNT)),
        gateways=2,
        kills=KILLS,
        seed=int(os.environ.get("FUNDGATE_CHAOS_SEED", SEED)),
        database_url=clean_db,
        workdir=tmp_path / "chaos",
        clients=12,
        # other suites may share these two cores: generous with time, never with invariants
        settle_timeout_seconds=180.0,
        request_deadline_seconds=90.0,
    )
