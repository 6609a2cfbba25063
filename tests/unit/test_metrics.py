"""The metric catalogue: every metric renders, instances are independent, helpers count right."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import gateway.metrics
from gateway.metrics import Metrics

CATALOGUE = {
    "fundgate_http_requests": "counter",
    "fundgate_http_request_duration_seconds": "histogram",
    "fundgate_disbursements": "counter",
    "fundgate_disbursed_amount_fen": "counter",
    "fundgate_connector_calls": "counter",
    "fundgate_connector_call_duration_seconds": "histogram",
    "fundgate_limit_used_fen": "gauge",
    "fundgate_limit_remaining_fen": "gauge",
    "fundgate_prefund_balance_fen": "gauge",
    "fundgate_outbox_depth": "gauge",
    "fundgate_outbox_oldest_age_seconds": "gauge",
    "fundgate_attempts_unknown": "gauge",
    "fundgate_attempts_unknown_oldest_age_seconds": "gauge",
    "fundgate_attempts_at_bank_oldest_age_seconds": "gauge",
    "fundgate_attempts_escalated": "counter",
    "fundgate_attempts_escalated_unresolved": "gauge",
    "fundgate_callbacks": "counter",
    "fundgate_callbacks_paid_after_failure": "counter",
    "fundgate_callbacks_refused": "counter",
    "fundgate_webhooks": "counter",
    "fundgate_db_pool_exhausted": "counter",
    "fundgate_recon_breaks": "gauge",
    "fundgate_recon_last_success_timestamp_seconds": "gauge",
    "fundgate_recon_runs": "counter",
    "fundgate_recon_statement_lines": "counter",
    "fundgate_recon_run_duration_seconds": "histogram",
    "fundgate_vouchers_sealed": "gauge",
    "fundgate_vouchers_unsealed": "gauge",
    "fundgate_vouchers_unsealed_oldest_age_seconds": "gauge",
    "fundgate_voucher_verification_last_timestamp_seconds": "gauge",
    "fundgate_voucher_verification_broken": "gauge",
    "fundgate_circuit_state": "gauge",
    "fundgate_build_info": "gauge",
}


def exposed(m: Metrics) -> str:
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=")
    return body.decode()


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_every_catalogued_metric_is_registered_with_its_type() -> None:
    families = {
        f.name: f.type
        for f in text_string_to_metric_families(exposed(Metrics()))
        if not f.name.endswith("_created")  # an unlabelled counter's creation time
    }
    assert families == CATALOGUE


def test_every_metric_is_listed_in_the_module_docstring() -> None:
    doc = gateway.metrics.__doc__ or ""
    for name, kind in CATALOGUE.items():
        listed = f"{name}_total" if kind == "counter" else name
        assert re.search(rf"\b{listed}(\{{|\s)", doc), f"{listed} is not in the docstring"


def test_build_info_is_one_with_the_version() -> None:
    m = Metrics(version="1.2.3")
    assert sample(m, "fundgate_build_info", version="1.2.3") == 1
    assert 'fundgate_build_info{version="1.2.3"} 1.0' in exposed(m)


def test_two_instances_do_not_clash() -> None:
    a, b = Metrics(), Metrics()
    a.webhook("delivered")
    a.webhook("delivered")
    b.webhook("failed")
    assert sample(a, "fundgate_webhooks_total", outcome="delivered") == 2
    assert sample(a, "fundgate_webhooks_total", outcome="failed") is None
    assert sample(b, "fundgate_webhooks_total", outcome="failed") == 1
    assert sample(b, "fundgate_webhooks_total", outcome="delivered") is None


def test_a_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    assert m.registry is registry
    m.attempt_escalated("bank-a")
    assert registry.get_sample_value("fundgate_attempts_escalated_total", {"funder": "bank-a"})


def test_observe_http_counts_by_route_template_and_times() -> None:
    m = Metrics()
    m.observe_http("/v1/disbursements/{txn_no}", "GET", 200, 0.012)
    m.observe_http("/v1/disbursements/{txn_no}", "GET", 200, 0.5)
    labels = {"route": "/v1/disbursements/{txn_no}", "method": "GET"}
    assert sample(m, "fundgate_http_requests_total", status="200", **labels) == 2
    assert sample(m, "fundgate_http_request_duration_seconds_count", **labels) == 2
    assert sample(m, "fundgate_http_request_duration_seconds_sum", **labels) == pytest.approx(0.512)
    assert sample(m, "fundgate_http_request_duration_seconds_bucket", le="0.025", **labels) == 1
    assert sample(m, "fundgate_http_request_duration_seconds_bucket", le="30.0", **labels) == 2


def test_disbursement_transition_counts_and_adds_the_amount_when_known() -> None:
    m = Metrics()
    m.disbursement_transition("bank-b", "accepted", 1_000_001)
    m.disbursement_transition("bank-b", "accepted")
    m.disbursement_transition("bank-b", "succeeded", 1_000_001)
    assert sample(m, "fundgate_disbursements_total", status="accepted", funder="bank-b") == 2
    assert sample(m, "fundgate_disbursements_total", status="succeeded", funder="bank-b") == 1
    amount = "fundgate_disbursed_amount_fen_total"
    assert sample(m, amount, funder="bank-b", status="accepted") == 1_000_001


def test_connector_call_counts_outcome_and_times_by_operation() -> None:
    m = Metrics()
    m.observe_connector_call("bank-a", "sandbox", "disburse", "unknown", 10.0)
    labels = {"funder": "bank-a", "connector": "sandbox", "operation": "disburse"}
    assert sample(m, "fundgate_connector_calls_total", outcome="unknown", **labels) == 1
    assert sample(m, "fundgate_connector_call_duration_seconds_count", **labels) == 1


def test_gauges_are_set_not_added() -> None:
    m = Metrics()
    m.set_limit("platform", used=700, limit=1_000)
    m.set_limit("platform", used=1_200, limit=1_000)  # never negative
    m.set_prefund_balance("bank-b", 5_000)
    m.set_outbox("dispatch", depth=3, oldest_age_seconds=12.5)
    m.set_attempts_unknown("bank-a", 4)
    assert sample(m, "fundgate_limit_used_fen", scope="platform") == 1_200
    assert sample(m, "fundgate_limit_remaining_fen", scope="platform") == 0
    assert sample(m, "fundgate_prefund_balance_fen", funder="bank-b") == 5_000
    assert sample(m, "fundgate_outbox_depth", kind="dispatch") == 3
    assert sample(m, "fundgate_outbox_oldest_age_seconds", kind="dispatch") == 12.5
    assert sample(m, "fundgate_attempts_unknown", funder="bank-a") == 4


def test_refused_callbacks_are_counted_with_their_reason() -> None:
    m = Metrics()
    m.callback("bank-a", "accepted")
    m.callback("bank-a", "refused", "stale")
    assert sample(m, "fundgate_callbacks_total", funder="bank-a", result="accepted") == 1
    assert sample(m, "fundgate_callbacks_total", funder="bank-a", result="refused") == 1
    assert sample(m, "fundgate_callbacks_refused_total", funder="bank-a", reason="stale") == 1


@pytest.mark.parametrize(("state", "value"), [("closed", 0), ("half_open", 1), ("open", 2)])
def test_circuit_state_values(state: str, value: int) -> None:
    m = Metrics()
    m.set_circuit_state("bank-a", state)  # type: ignore[arg-type]
    assert sample(m, "fundgate_circuit_state", funder="bank-a") == value


def test_no_label_can_carry_a_transaction_or_account() -> None:
    m = Metrics()
    m.observe_http("/v1/disbursements/{txn_no}", "POST", 201, 0.1)
    m.disbursement_transition("bank-a", "accepted", 1)
    m.observe_connector_call("bank-a", "sandbox", "query", "ok", 0.1)
    m.set_limit("bank-a", 1, 2)
    m.set_prefund_balance("bank-a", 1)
    m.set_outbox("webhook", 1, 1.0)
    m.set_attempts_unknown("bank-a", 1)
    m.attempt_escalated("bank-a")
    m.callback("bank-a", "refused", "bad_signature")
    m.paid_after_failure("bank-a")
    m.webhook("failed")
    m.set_circuit_state("bank-a", "open")
    m.set_attempts_unknown_oldest_age("bank-a", 1.0)
    m.set_attempts_at_bank_oldest_age("bank-a", 1.0)
    m.set_attempts_escalated_unresolved("bank-a", 1)
    m.set_recon_breaks("bank-a", {"missing_at_bank": 1})
    m.recon_run("bank-a", "succeeded", 1.0, 10)
    m.set_voucher_chain(10, 0, 0.0)
    m.voucher_verification(intact=True)
    m.pool_exhausted()
    families = list(text_string_to_metric_families(exposed(m)))
    # the text parser sees a counter's `_created` samples as families of their own
    named = {f.name for f in families if f.samples and not f.name.endswith("_created")}
    assert named == set(CATALOGUE)
    allowed = {"route", "method", "status", "funder", "connector", "operation", "outcome"}
    allowed |= {"scope", "kind", "result", "reason", "version", "le", "type"}
    for family in families:
        for s in family.samples:
            assert set(s.labels) <= allowed, (family.name, s.labels)


def test_recon_break_types_that_clear_drop_to_zero() -> None:
    m = Metrics()
    m.set_recon_breaks("bank-a", {"missing_at_bank": 2, "amount_mismatch": 1})
    m.set_recon_breaks("bank-a", {"missing_at_bank": 1})
    m.set_recon_breaks("bank-b", {"amount_mismatch": 3})
    assert sample(m, "fundgate_recon_breaks", funder="bank-a", type="missing_at_bank") == 1
    assert sample(m, "fundgate_recon_breaks", funder="bank-a", type="amount_mismatch") == 0
    assert sample(m, "fundgate_recon_breaks", funder="bank-b", type="amount_mismatch") == 3


def test_voucher_chain_and_verification_gauges() -> None:
    m = Metrics()
    assert sample(m, "fundgate_voucher_verification_broken") == 0  # never verified: no alarm
    assert sample(m, "fundgate_voucher_verification_last_timestamp_seconds") == 0
    m.set_voucher_chain(sealed=120, unsealed=3, oldest_unsealed_age=0.4)
    m.voucher_verification(intact=False, at=1_700_000_000.0)
    assert sample(m, "fundgate_vouchers_sealed") == 120
    assert sample(m, "fundgate_vouchers_unsealed") == 3
    assert sample(m, "fundgate_vouchers_unsealed_oldest_age_seconds") == 0.4
    assert sample(m, "fundgate_voucher_verification_last_timestamp_seconds") == 1_700_000_000
    assert sample(m, "fundgate_voucher_verification_broken") == 1
