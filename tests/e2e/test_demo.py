"""`fundgate demo` end to end, over the sandbox protocol and over ISO 20022: exit 0 only when
every accepted disbursement is terminal, paid at most once, reconciled and in the chain."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("funders", ["sandbox", "iso"])
def test_demo_pays_reconciles_and_verifies(funders: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FUNDGATE_DATABASE_URL"}
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--count", "24", "--funders", funders],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "accepted 24, terminal 24" in out
    assert "each paid at most once" in out
    assert "no breaks" in out
    assert "voucher chain intact" in out
