"""The alert rules: valid for promtool, unit-tested alert by alert, each with a severity and a
runbook section that exists, and written over metrics that exist."""

from __future__ import annotations

import re

import pytest

from tests.ops.conftest import (
    ALERTS,
    ALERTS_TEST,
    OPERATIONS,
    PROMETHEUS_EXAMPLE,
    catalogue_series,
    github_anchors,
    run_promtool,
)

ALERT_NAME = re.compile(r"^\s*- alert: (\w+)\s*$", re.MULTILINE)


def alert_blocks() -> dict[str, str]:
    """Each alert's YAML text, by alert name."""
    text = ALERTS.read_text(encoding="utf-8")
    starts = list(ALERT_NAME.finditer(text))
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return {m.group(1): text[m.start() : end] for m, end in zip(starts, ends, strict=True)}


def test_promtool_check_rules_passes(promtool: str) -> None:
    rc, out = run_promtool(promtool, "check", "rules", str(ALERTS))

    assert rc == 0, out
    assert f"SUCCESS: {len(alert_blocks())} rules found" in out, out


def test_promtool_unit_tests_of_every_alert_pass(promtool: str) -> None:
    rc, out = run_promtool(promtool, "test", "rules", str(ALERTS_TEST))

    assert rc == 0, out
    assert "SUCCESS" in out, out


def test_example_prometheus_config_passes_promtool_check_config(promtool: str) -> None:
    rc, out = run_promtool(promtool, "check", "config", str(PROMETHEUS_EXAMPLE))

    assert rc == 0, out
    assert "SUCCESS: 1 rule files found" in out, out


def test_the_alerts_cover_the_issue_list() -> None:
    names = set(alert_blocks())
    assert names >= {
        "FundgateDown",
        "FundgateFunderSuccessRateLow",
        "FundgateCircuitOpen",
        "FundgateDailyLimitHigh",
        "FundgatePrefundLow",
        "FundgateDispatchOutboxStuck",
        "FundgateWebhookOutboxStuck",
        "FundgateUnknownAttemptsEscalated",
        "FundgateCallbacksFailingVerification",
        "FundgateReconciliationBreaks",
        "FundgateReconciliationMissing",
    }


@pytest.mark.parametrize("name", sorted(alert_blocks()))
def test_alert_has_a_severity_and_a_runbook_section_that_exists(name: str) -> None:
    block = alert_blocks()[name]

    severity = re.search(r"^\s+severity: (\w+)\s*$", block, re.MULTILINE)
    assert severity is not None, f"{name} has no severity label"
    assert severity.group(1) in ("critical", "warning")
    runbook = re.search(r'^\s+runbook_url: "docs/operations\.md#([\w-]+)"$', block, re.MULTILINE)
    assert runbook is not None, f"{name} has no runbook_url into docs/operations.md"
    assert runbook.group(1) == name.lower(), "the anchor is the alert's own section"
    assert runbook.group(1) in github_anchors(OPERATIONS), f"no section #{runbook.group(1)}"


@pytest.mark.parametrize("name", sorted(alert_blocks()))
def test_alert_is_unit_tested_firing_and_not_firing(name: str) -> None:
    fired, silent = False, False
    current = None
    for line in ALERTS_TEST.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^\s+alertname: (\w+)\s*$", line):
            current = m.group(1)
        elif current == name and re.match(r"^\s+exp_alerts: \[\]\s*$", line):
            silent = True
        elif current == name and re.match(r"^\s+exp_alerts:\s*$", line):
            fired = True  # a list of expected alerts follows

    assert fired, f"alerts_test.yml never shows {name} firing"
    assert silent, f"alerts_test.yml never shows {name} staying quiet"


def test_alert_expressions_name_only_metrics_that_exist() -> None:
    used = set(re.findall(r"\bfundgate_\w+", ALERTS.read_text(encoding="utf-8")))

    assert used, "no fundgate metric in alerts.yml"
    assert used <= catalogue_series(), sorted(used - catalogue_series())


def test_break_types_in_the_alerts_are_the_ones_reconciliation_reports() -> None:
    classify = pytest.importorskip("reconciliation.classify")
    critical = {str(t) for t, severity in classify.SEVERITY.items() if severity == "critical"}
    blocks = alert_blocks()
    for name, op in [
        ("FundgateReconciliationBreaksCritical", "=~"),
        ("FundgateReconciliationBreaks", "!~"),
    ]:
        m = re.search(rf'fundgate_recon_breaks\{{type{op}"([\w|]+)"\}}', blocks[name])
        assert m is not None, name
        assert set(m.group(1).split("|")) == critical, f"{name}: the paging break types"
