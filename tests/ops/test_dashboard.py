"""The Grafana dashboard's structure, checked without Grafana: one data source variable, a
tidy grid, every panel explained, every query over metrics that exist. (Its queries run against
a real Prometheus in test_live.py.)"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.ops.conftest import DASHBOARD, catalogue_series

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
GRID_COLUMNS = 24

# Grafana's built-in interval variables and the test value each gets (scrapes are 1 s apart)
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> list[dict[str, Any]]:
    """Every panel, rows included, with a collapsed row's panels flattened in."""
    out: list[dict[str, Any]] = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every target of every panel."""
    return [
        (p["title"], t["refId"], t["expr"])
        for p in panels()
        if p["type"] != "row"
        for t in p["targets"]
    ]


def template_variables() -> set[str]:
    return {v["name"] for v in dashboard()["templating"]["list"]}


def concrete(expr: str) -> str:
    """A panel query as Prometheus would get it: Grafana's interval variables at a fixed value,
    the dashboard's template variables at `.*` (all values)."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in BUILTIN_VARIABLES:
            return BUILTIN_VARIABLES[name]
        assert name in template_variables(), f"{name} is not a dashboard variable"
        return ".*"

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def test_the_data_source_is_the_ds_prometheus_variable() -> None:
    ds = [v for v in dashboard()["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert len(ds) == 1
    assert ds[0]["type"] == "datasource"
    assert ds[0]["query"] == "prometheus"
    for p in panels():
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, (p["title"], t["refId"])
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, v["name"]


def test_panels_have_unique_ids_and_tile_the_grid_without_overlap() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for p in panels():
        g = p["gridPos"]
        assert g["w"] > 0
        assert g["h"] > 0
        assert 0 <= g["x"]
        assert g["x"] + g["w"] <= GRID_COLUMNS, p["title"]
        cells = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells


def test_every_panel_has_a_title_a_description_and_queries() -> None:
    titles = [p["title"] for p in panels() if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles are unique"
    for p in panels():
        if p["type"] == "row":
            continue
        assert p["title"]
        assert p.get("description"), f"{p['title']} has no description"
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    text = " ".join(expr for _, _, expr in queries())
    for metric in (
        "fundgate_disbursements_total",  # traffic and success rate per funder
        "fundgate_http_request_duration_seconds_bucket",  # HTTP latency
        "fundgate_connector_call_duration_seconds_bucket",  # bank latency
        "fundgate_limit_remaining_fen",  # limit headroom
        "fundgate_prefund_balance_fen",
        "fundgate_outbox_oldest_age_seconds",  # stuck work
        "fundgate_attempts_unknown",
        "fundgate_attempts_escalated_unresolved",
        "fundgate_circuit_state",
        "fundgate_callbacks_total",  # callback health
        "fundgate_callbacks_refused_total",
        "fundgate_webhooks_total",
        "fundgate_recon_breaks",
        "fundgate_recon_last_success_timestamp_seconds",
        "fundgate_vouchers_sealed",
    ):
        assert metric in text, f"no panel shows {metric}"
    assert "histogram_quantile(0.50" in text
    assert "histogram_quantile(0.99" in text


def test_queries_name_only_metrics_that_exist_and_only_known_variables() -> None:
    series = catalogue_series() | {"up"}
    for title, ref, expr in queries():
        used = set(re.findall(r"\bfundgate_\w+", expr))
        assert used <= series, (title, ref, sorted(used - series))
        concrete(expr)  # every $variable is defined


def test_gauges_read_from_the_database_are_never_summed_across_processes() -> None:
    # every process exports the same database-derived value: summing would multiply it
    db_gauges = (
        "fundgate_limit_",
        "fundgate_prefund_balance_fen",
        "fundgate_outbox_",
        "fundgate_attempts_unknown",
        "fundgate_attempts_escalated_unresolved",
        "fundgate_circuit_state",
        "fundgate_recon_",
        "fundgate_vouchers_",
    )
    for title, ref, expr in queries():
        for m in re.finditer(r"\b(sum|max|min|count)\s*(?:by \([^)]*\)\s*)?\((\w+)", expr):
            if m.group(2).startswith(db_gauges):
                assert m.group(1) != "sum", (title, ref, expr)
