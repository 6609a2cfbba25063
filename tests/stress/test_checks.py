"""The chaos run's checks catch what they claim to: each broken invariant, planted in an
otherwise consistent end state, is reported (and the consistent state reports nothing).

Pure: snapshots are built in memory, no database and no processes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import pytest

from bench.chaos import (
    Answer,
    Job,
    Limits,
    LimitWatch,
    Report,
    Snapshot,
    Traffic,
    check_all,
)
from tests.e2e.harness import WebhookEvent, disbursement_body

DAY = date(2026, 11, 25)
AMOUNT = 1_000_000
PLATFORM = 300_000  # bank-b's 30 % share of AMOUNT
ACCOUNT = "6222020200112233445"
CAPS = {"platform": 10 * AMOUNT, "funder:bank-a": 5 * AMOUNT, "funder:bank-b": 5 * AMOUNT}
OPENING = {"bank-b": 2 * AMOUNT}


def _webhook(txn_no: str, status: str) -> WebhookEvent:
    return WebhookEvent(
        body={"txn_no": txn_no, "status": status},
        raw=b"{}",
        timestamp="0",
        signature="x",
        signature_valid=True,
    )


def _job(txn_no: str) -> Job:
    payee = {"account_no": ACCOUNT, "account_name": "张三", "bank_code": "ICBC"}
    body = disbursement_body(txn_no, "B1", payee=payee, amount=AMOUNT)
    return Job(0, "B1", payee, (body, {**body, "amount": AMOUNT + 1}), (0, 0, 1), 0)


def consistent() -> tuple[Snapshot, list[Job], Traffic]:
    """T1: rejected by bank-a before execution, re-routed, paid by bank-b (co-lending).
    T2: paid by bank-a. Both storms answered 201 once, then replays and a 409."""
    d1 = {
        "id": 1, "txn_no": "T1", "status": "succeeded", "funder_id": "bank-b",
        "mode": "co_lending", "amount": AMOUNT, "alloc_funder": AMOUNT - PLATFORM,
        "alloc_platform": PLATFORM, "business_day": DAY, "failure": None,
    }  # fmt: skip
    d2 = {
        **d1, "id": 2, "txn_no": "T2", "funder_id": "bank-a", "mode": "direct",
        "alloc_funder": AMOUNT, "alloc_platform": 0,
    }  # fmt: skip
    refused = {"code": "RISK_REJECTED", "message": "no", "pre_execution": True}
    att: dict[str, Any] = {
        "disbursement_id": 1, "error": None, "unknown_since": None, "escalated_at": None,
    }  # fmt: skip
    attempts: dict[str, list[dict[str, Any]]] = {
        "T1": [
            {**att, "n": 1, "funder_id": "bank-a", "order_no": "T1-01", "status": "failed",
             "error": refused, "alloc_platform": 0},
            {**att, "n": 2, "funder_id": "bank-b", "order_no": "T1-02", "status": "succeeded",
             "alloc_platform": PLATFORM, "unknown_since": datetime(2026, 11, 25, tzinfo=UTC)},
        ],
        "T2": [
            {**att, "disbursement_id": 2, "n": 1, "funder_id": "bank-a", "order_no": "T2-01",
             "status": "succeeded", "alloc_platform": 0},
        ],
    }  # fmt: skip
    order = {"amount": AMOUNT, "account_no": ACCOUNT, "executions": 1, "status": "SUCCESS"}
    banks = {
        "bank-a": {
            "T1-01": {**order, "order_no": "T1-01", "executions": 0, "status": "REJECTED"},
            "T2-01": {**order, "order_no": "T2-01"},
        },
        "bank-b": {"T1-02": {**order, "order_no": "T1-02"}},
    }
    snapshot = Snapshot(
        disbursements={"T1": d1, "T2": d2},
        attempts=attempts,
        usage={
            ("platform", DAY): 2 * AMOUNT,
            ("funder:bank-a", DAY): AMOUNT,
            ("funder:bank-b", DAY): AMOUNT,
        },
        prefund={"bank-b": OPENING["bank-b"] - PLATFORM},
        outbox={},
        bank_orders=banks,
        webhooks=[_webhook("T1", "succeeded"), _webhook("T2", "succeeded")],
        api_status={"T1": "succeeded", "T2": "succeeded"},
        settled_by={"callback": 2},
        chain_problem=None,
    )
    traffic = Traffic()
    for txn_no in ("T1", "T2"):
        resource = {"txn_no": txn_no, "status": "accepted"}
        traffic.answers[txn_no] = [
            Answer(0, 201, resource, "gateway-1"),
            Answer(0, 200, resource, "gateway-2"),
            Answer(1, 409, {"error": {"code": "txn_no_conflict"}}, "gateway-1"),
        ]
    return snapshot, [_job("T1"), _job("T2")], traffic


def kinds(snapshot: Snapshot, jobs: list[Job], traffic: Traffic) -> set[str]:
    report = Report(seed=1, count=2, gateways=2, banks=2, database="-", workdir="-")
    watch = LimitWatch("unused")
    violations = check_all(snapshot, jobs, traffic, Limits(CAPS, OPENING), watch, report)
    return {v.kind for v in violations}


def test_a_consistent_end_state_has_no_violation() -> None:
    assert kinds(*consistent()) == set()


Plant = Callable[[Snapshot, list[Job], Traffic], Any]


def _double_execution(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.bank_orders["bank-a"]["T2-01"]["executions"] = 2


def _paid_by_the_refused_order_too(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.bank_orders["bank-a"]["T1-01"].update(executions=1, status="SUCCESS")


def _succeeded_but_never_paid(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.bank_orders["bank-a"]["T2-01"].update(executions=0, status="FAILED")


def _order_nobody_knows(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.bank_orders["bank-a"]["T9-01"] = {**s.bank_orders["bank-a"]["T2-01"], "order_no": "T9-01"}


def _paid_to_another_account(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.bank_orders["bank-a"]["T2-01"]["account_no"] = "6222000000000000000"


def _stuck_in_processing(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.disbursements["T2"]["status"] = "processing"
    s.attempts["T2"][0]["status"] = "processing"
    s.webhooks.pop()
    s.api_status["T2"] = "processing"


def _rerouted_after_an_unknown(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.attempts["T1"][0]["error"] = {"code": "timeout", "message": "read timeout"}


def _usage_not_released(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.usage[("funder:bank-a", DAY)] += AMOUNT


def _limit_overshot(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.usage[("platform", DAY)] = CAPS["platform"] + 1
    s.disbursements["T2"]["amount"] = CAPS["platform"] + 1 - AMOUNT


def _prefund_not_taken(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.prefund["bank-b"] = OPENING["bank-b"]


def _webhook_for_a_state_in_between(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.webhooks.append(_webhook("T1", "processing"))


def _webhook_never_sent(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.webhooks.pop()


def _webhook_says_failed(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.webhooks.append(_webhook("T2", "failed"))


def _created_twice(_s: Snapshot, _j: list[Job], t: Traffic) -> None:
    t.answers["T2"].append(Answer(0, 201, {"txn_no": "T2", "status": "accepted"}, "gateway-2"))


def _acknowledged_then_lost(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    del s.disbursements["T2"], s.attempts["T2"], s.api_status["T2"]
    del s.bank_orders["bank-a"]["T2-01"]
    s.webhooks.pop()
    s.usage[("platform", DAY)] -= AMOUNT
    s.usage[("funder:bank-a", DAY)] -= AMOUNT


def _conflicting_payload_accepted(_s: Snapshot, _j: list[Job], t: Traffic) -> None:
    t.answers["T2"][-1] = Answer(1, 200, {"txn_no": "T2", "status": "accepted"}, "gateway-1")


def _api_says_otherwise(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.api_status["T1"] = "failed"


def _chain_broken(s: Snapshot, _j: list[Job], _t: Traffic) -> None:
    s.chain_problem = "seq 7: hash mismatch"


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (_double_execution, "double_execution"),
        (_paid_by_the_refused_order_too, "paid_twice"),
        (_succeeded_but_never_paid, "succeeded_not_executed"),
        (_order_nobody_knows, "order_unknown_to_fundgate"),
        (_paid_to_another_account, "wrong_payee"),
        (_stuck_in_processing, "not_terminal"),
        (_rerouted_after_an_unknown, "rerouted_without_definitive_refusal"),
        (_usage_not_released, "limit_usage_mismatch"),
        (_limit_overshot, "limit_overshot"),
        (_prefund_not_taken, "prefund_mismatch"),
        (_webhook_for_a_state_in_between, "webhook_for_non_terminal_state"),
        (_webhook_never_sent, "webhook_missing"),
        (_webhook_says_failed, "webhook_contradicts_final_state"),
        (_created_twice, "two_creations"),
        (_acknowledged_then_lost, "acknowledged_but_lost"),
        (_conflicting_payload_accepted, "two_payloads_accepted"),
        (_api_says_otherwise, "api_disagrees"),
        (_chain_broken, "voucher_chain_broken"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__.strip("_"),
)
def test_a_planted_break_is_reported(plant: Plant, expected: str) -> None:
    snapshot, jobs, traffic = copy.deepcopy(consistent())
    plant(snapshot, jobs, traffic)
    assert expected in kinds(snapshot, jobs, traffic)


def test_an_unknown_escalated_with_a_reason_is_accepted_even_if_the_bank_paid() -> None:
    snapshot, jobs, traffic = consistent()
    a = snapshot.attempts["T2"][0]
    a.update(status="unknown", escalated_at=datetime.now(UTC), error={"code": "timeout"})
    snapshot.disbursements["T2"]["status"] = "unknown"
    snapshot.api_status["T2"] = "unknown"
    snapshot.webhooks.pop()
    assert kinds(snapshot, jobs, traffic) == set()
