"""Every metric fundgate exports, in one place. Served at `GET /metrics`.

Names follow `fundgate_<noun>_<unit>`: counters end in `_total`, durations are histograms in
seconds, money is integer fen (分). Labels are bounded — funder ids, statuses, route
templates — and never carry a txn_no, an order number or an account number.

HTTP API
    fundgate_http_requests_total{route,method,status}            counter: requests answered;
        `route` is the aiohttp route template (`/v1/disbursements/{txn_no}`), not the path
    fundgate_http_request_duration_seconds{route,method}          histogram: time to answer
    fundgate_db_pool_exhausted_total              counter: requests answered 503 because no
        database connection was free in time (backpressure instead of an unbounded queue)

Disbursements
    fundgate_disbursements_total{status,funder}                   counter: transitions of a
        disbursement into `status` (accepted, sent, processing, unknown, succeeded, failed,
        and `rerouted` when a pre-execution rejection moves it to the next funder)
    fundgate_disbursed_amount_fen_total{funder,status}            counter: the amount, in fen,
        of the disbursements counted above (when the call site knows it)

Bank calls (connectors)
    fundgate_connector_calls_total{funder,connector,operation,outcome}   counter: calls by
        operation (disburse, query, fetch_statement) and outcome: ok | rejected | not_sent |
        unknown (see `connectors.errors`); a batched disburse counts once per order it
        carried, with that order's outcome (and the call's duration)
    fundgate_connector_call_duration_seconds{funder,connector,operation}  histogram

Limits and money (gauges, refreshed from the database)
    fundgate_limit_used_fen{scope}               today's reserved and settled amount; scope is
                                                 a funder id or `platform`
    fundgate_limit_remaining_fen{scope}          today's daily limit minus the above
    fundgate_prefund_balance_fen{funder}         platform money prefunded at a co-lending funder

Work queues and stuck payouts
    fundgate_outbox_depth{kind}                  gauge: outbox rows waiting, by kind
    fundgate_outbox_oldest_age_seconds{kind}     gauge: age of the oldest waiting row
    fundgate_attempts_unknown{funder}            gauge: attempts whose outcome is unknown now
    fundgate_attempts_unknown_oldest_age_seconds{funder}   gauge: how long the oldest of them
                                                 has been unknown; 0 when none is
    fundgate_attempts_at_bank_oldest_age_seconds{funder}   gauge: how long the oldest payout
                                                 the bank has taken (sent, processing) has
                                                 waited for its outcome; 0 when none waits
    fundgate_attempts_escalated_total{funder}    counter: unknown attempts handed to a person
                                                 (counted by the process that escalated)
    fundgate_attempts_escalated_unresolved{funder}   gauge: escalated attempts still unknown
                                                 now; each one waits for a person

Inbound callbacks and outbound webhooks
    fundgate_callbacks_total{funder,result}              counter: accepted | duplicate | refused
    fundgate_callbacks_refused_total{funder,reason}      counter: refusals by reason
        (bad_signature | stale | replayed | malformed | unknown_order | amount_mismatch)
    fundgate_callbacks_paid_after_failure_total{funder}  counter: a bank reported paid an
        order fundgate holds as failed (refused, or failed over): money may have moved twice
    fundgate_webhooks_total{outcome}                     counter: deliveries to the lending
        core by outcome: delivered | failed (a failed one is retried)

Reconciliation (the gauges read from the database; empty until a run has happened)
    fundgate_recon_breaks{funder,type}           gauge: unresolved breaks (open, or waiting for
                                                 their automatic resolution) of every run, by
                                                 funder and break type
    fundgate_recon_last_success_timestamp_seconds{funder}   gauge: unix time at which the
                                                 latest reconciliation of that funder completed
    fundgate_recon_runs_total{funder,outcome}    counter: reconciliation runs by outcome:
                                                 succeeded | failed (a bad statement, with reason)
    fundgate_recon_statement_lines_total{funder} counter: statement lines reconciled
    fundgate_recon_run_duration_seconds{funder}  histogram: time of one run, fetch to report

Vouchers (the tamper-evident chain, see `gateway.vouchers`)
    fundgate_vouchers_sealed                     gauge: length of the sealed chain (highest seq)
    fundgate_vouchers_unsealed                   gauge: events written but not yet sealed
    fundgate_vouchers_unsealed_oldest_age_seconds   gauge: age of the oldest unsealed event;
                                                 grows only when the sealer is stuck
    fundgate_voucher_verification_last_timestamp_seconds   gauge: unix time of the latest
                                                 recorded chain verification (the workers' daily
                                                 one or `fundgate audit verify`); 0 never
    fundgate_voucher_verification_broken         gauge: 1 when that verification found the chain
                                                 broken, else 0

Health
    fundgate_circuit_state{funder}               gauge: 0 closed, 1 half-open, 2 open
    fundgate_build_info{version}                 gauge: always 1

Gauges read from the database (limits, prefund, outbox, unknown and escalated attempts,
circuits, vouchers) are refreshed every few seconds by each gateway process's housekeeping, so
every process exports the same values: aggregate them with `max by (...)`, never `sum`.
Counters and histograms count what their own process did: aggregate them with `sum`.

Each `Metrics` owns its `CollectorRegistry`, so several apps can live in one test process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

ConnectorOutcome = Literal["ok", "rejected", "not_sent", "unknown"]
CallbackResult = Literal["accepted", "duplicate", "refused"]
WebhookOutcome = Literal["delivered", "failed"]
CircuitState = Literal["closed", "half_open", "open"]
ReconOutcome = Literal["succeeded", "failed"]

# From a fast local answer to a bank that runs into the 10 s default bank timeout and beyond.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# A run takes from a second (a quiet day) to many minutes (millions of statement lines).
RECON_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

_CIRCUIT_VALUES: dict[CircuitState, int] = {"closed": 0, "half_open": 1, "open": 2}


def _package_version() -> str:
    try:
        return version("fundgate")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


class Metrics:
    """The metric catalogue above, registered on one registry, with typed helpers."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, version: str | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        self.http_requests = Counter(
            "fundgate_http_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ("route", "method", "status"),
            registry=r,
        )
        self.http_request_duration = Histogram(
            "fundgate_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.disbursements = Counter(
            "fundgate_disbursements_total",
            "Transitions of disbursements into a status, by status and funder.",
            ("status", "funder"),
            registry=r,
        )
        self.disbursed_amount = Counter(
            "fundgate_disbursed_amount_fen_total",
            "Amount in fen of the disbursements entering a status, by funder and status.",
            ("funder", "status"),
            registry=r,
        )

        self.connector_calls = Counter(
            "fundgate_connector_calls_total",
            "Calls to bank connectors, by funder, connector, operation and outcome.",
            ("funder", "connector", "operation", "outcome"),
            registry=r,
        )
        self.connector_call_duration = Histogram(
            "fundgate_connector_call_duration_seconds",
            "Duration of bank connector calls, by funder, connector and operation.",
            ("funder", "connector", "operation"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.limit_used = Gauge(
            "fundgate_limit_used_fen",
            "Today's used daily limit in fen, by scope (a funder id or platform).",
            ("scope",),
            registry=r,
        )
        self.limit_remaining = Gauge(
            "fundgate_limit_remaining_fen",
            "Today's remaining daily limit in fen, by scope (a funder id or platform).",
            ("scope",),
            registry=r,
        )
        self.prefund_balance = Gauge(
            "fundgate_prefund_balance_fen",
            "Platform money prefunded at a co-lending funder, in fen.",
            ("funder",),
            registry=r,
        )

        self.outbox_depth = Gauge(
            "fundgate_outbox_depth",
            "Outbox rows waiting to be processed, by kind.",
            ("kind",),
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "fundgate_outbox_oldest_age_seconds",
            "Age of the oldest waiting outbox row, by kind.",
            ("kind",),
            registry=r,
        )
        self.attempts_unknown = Gauge(
            "fundgate_attempts_unknown",
            "Attempts whose outcome is unknown right now, by funder.",
            ("funder",),
            registry=r,
        )
        self.attempts_unknown_oldest_age = Gauge(
            "fundgate_attempts_unknown_oldest_age_seconds",
            "How long the oldest unknown attempt has been unknown, by funder; 0 when none is.",
            ("funder",),
            registry=r,
        )
        self.attempts_at_bank_oldest_age = Gauge(
            "fundgate_attempts_at_bank_oldest_age_seconds",
            "How long the oldest payout the bank has taken (sent, processing) has waited for"
            " its outcome, by funder; 0 when none waits.",
            ("funder",),
            registry=r,
        )
        self.attempts_escalated = Counter(
            "fundgate_attempts_escalated_total",
            "Unknown attempts escalated to a person, by funder.",
            ("funder",),
            registry=r,
        )
        self.attempts_escalated_unresolved = Gauge(
            "fundgate_attempts_escalated_unresolved",
            "Escalated attempts whose outcome is still unknown, by funder.",
            ("funder",),
            registry=r,
        )

        self.callbacks = Counter(
            "fundgate_callbacks_total",
            "Bank callbacks received, by funder and result (accepted, duplicate, refused).",
            ("funder", "result"),
            registry=r,
        )
        self.callbacks_refused = Counter(
            "fundgate_callbacks_refused_total",
            "Bank callbacks refused, by funder and reason.",
            ("funder", "reason"),
            registry=r,
        )
        self.callbacks_paid_after_failure = Counter(
            "fundgate_callbacks_paid_after_failure_total",
            "Bank callbacks reporting paid an order fundgate holds as failed, by funder.",
            ("funder",),
            registry=r,
        )
        self.webhooks = Counter(
            "fundgate_webhooks_total",
            "Outcome webhook deliveries to the lending core, by outcome (delivered, failed).",
            ("outcome",),
            registry=r,
        )

        self.db_pool_exhausted = Counter(
            "fundgate_db_pool_exhausted_total",
            "Requests answered 503 because no database connection was free in time.",
            registry=r,
        )
        self.recon_breaks = Gauge(
            "fundgate_recon_breaks",
            "Unresolved reconciliation breaks as of the latest run, by funder and break type.",
            ("funder", "type"),
            registry=r,
        )
        self.recon_last_success = Gauge(
            "fundgate_recon_last_success_timestamp_seconds",
            "Unix time at which the latest reconciliation of a funder completed.",
            ("funder",),
            registry=r,
        )
        self.recon_runs = Counter(
            "fundgate_recon_runs_total",
            "Reconciliation runs, by funder and outcome (succeeded, failed).",
            ("funder", "outcome"),
            registry=r,
        )
        self.recon_lines = Counter(
            "fundgate_recon_statement_lines_total",
            "Statement lines reconciled, by funder.",
            ("funder",),
            registry=r,
        )
        self.recon_duration = Histogram(
            "fundgate_recon_run_duration_seconds",
            "Time of one reconciliation run, from fetching the statement to the report.",
            ("funder",),
            buckets=RECON_BUCKETS,
            registry=r,
        )

        self.vouchers_sealed = Gauge(
            "fundgate_vouchers_sealed",
            "Length of the sealed voucher chain (its highest sequence number).",
            registry=r,
        )
        self.vouchers_unsealed = Gauge(
            "fundgate_vouchers_unsealed",
            "Voucher events written but not yet sealed into the chain.",
            registry=r,
        )
        self.vouchers_unsealed_oldest_age = Gauge(
            "fundgate_vouchers_unsealed_oldest_age_seconds",
            "Age of the oldest voucher event not yet sealed; 0 when every event is sealed.",
            registry=r,
        )
        self.voucher_verification_last = Gauge(
            "fundgate_voucher_verification_last_timestamp_seconds",
            "Unix time of the latest voucher chain verification in this process; 0 never.",
            registry=r,
        )
        self.voucher_verification_broken = Gauge(
            "fundgate_voucher_verification_broken",
            "1 when the latest voucher chain verification found the chain broken, else 0.",
            registry=r,
        )

        self.circuit_state = Gauge(
            "fundgate_circuit_state",
            "Circuit breaker state per funder: 0 closed, 1 half-open, 2 open.",
            ("funder",),
            registry=r,
        )
        self.build_info = Gauge(
            "fundgate_build_info",
            "Build information; the value is always 1.",
            ("version",),
            registry=r,
        )
        self.build_info.labels(version=version or _package_version()).set(1)
        # the break types each funder has reported, so that a cleared type can drop to 0
        self._recon_break_types: set[tuple[str, str]] = set()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (it carries a charset: set the header
        itself, aiohttp's `content_type=` refuses parameters)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request; `route` is the route template, or `unmatched`."""
        self.http_requests.labels(route=route, method=method, status=str(status)).inc()
        self.http_request_duration.labels(route=route, method=method).observe(seconds)

    def disbursement_transition(self, funder: str, status: str, amount: int | None = None) -> None:
        """A disbursement entered `status` at `funder`; `amount` in fen when known."""
        self.disbursements.labels(status=status, funder=funder).inc()
        if amount is not None:
            self.disbursed_amount.labels(funder=funder, status=status).inc(amount)

    def observe_connector_call(
        self,
        funder: str,
        connector: str,
        operation: str,
        outcome: ConnectorOutcome,
        seconds: float,
    ) -> None:
        """One bank call; `operation` is disburse, query or fetch_statement."""
        self.connector_calls.labels(
            funder=funder, connector=connector, operation=operation, outcome=outcome
        ).inc()
        self.connector_call_duration.labels(
            funder=funder, connector=connector, operation=operation
        ).observe(seconds)

    def set_limit(self, scope: str, used: int, limit: int) -> None:
        """Today's usage of a daily limit (fen); `scope` is a funder id or `platform`."""
        self.limit_used.labels(scope=scope).set(used)
        self.limit_remaining.labels(scope=scope).set(max(limit - used, 0))

    def set_prefund_balance(self, funder: str, balance: int) -> None:
        self.prefund_balance.labels(funder=funder).set(balance)

    def set_outbox(self, kind: str, depth: int, oldest_age_seconds: float) -> None:
        """Outbox rows waiting of one kind; 0 age when none waits."""
        self.outbox_depth.labels(kind=kind).set(depth)
        self.outbox_oldest_age.labels(kind=kind).set(oldest_age_seconds)

    def set_attempts_unknown(self, funder: str, count: int) -> None:
        self.attempts_unknown.labels(funder=funder).set(count)

    def set_attempts_unknown_oldest_age(self, funder: str, seconds: float) -> None:
        self.attempts_unknown_oldest_age.labels(funder=funder).set(seconds)

    def set_attempts_at_bank_oldest_age(self, funder: str, seconds: float) -> None:
        self.attempts_at_bank_oldest_age.labels(funder=funder).set(seconds)

    def attempt_escalated(self, funder: str) -> None:
        self.attempts_escalated.labels(funder=funder).inc()

    def set_attempts_escalated_unresolved(self, funder: str, count: int) -> None:
        self.attempts_escalated_unresolved.labels(funder=funder).set(count)

    def callback(self, funder: str, result: CallbackResult, reason: str | None = None) -> None:
        """One inbound callback; a refused one also counts under its `reason`."""
        self.callbacks.labels(funder=funder, result=result).inc()
        if result == "refused":
            self.callbacks_refused.labels(funder=funder, reason=reason or "unspecified").inc()

    def paid_after_failure(self, funder: str) -> None:
        self.callbacks_paid_after_failure.labels(funder=funder).inc()

    def webhook(self, outcome: WebhookOutcome) -> None:
        self.webhooks.labels(outcome=outcome).inc()

    def pool_exhausted(self) -> None:
        self.db_pool_exhausted.inc()

    def set_circuit_state(self, funder: str, state: CircuitState) -> None:
        self.circuit_state.labels(funder=funder).set(_CIRCUIT_VALUES[state])

    def set_recon_breaks(self, funder: str, by_type: Mapping[str, int]) -> None:
        """Unresolved breaks of one funder after a reconciliation run, by break type. Types
        seen before but absent now are set to 0, so a resolved break type stops alerting."""
        for f, kind in self._recon_break_types:
            if f == funder and kind not in by_type:
                self.recon_breaks.labels(funder=f, type=kind).set(0)
        for kind, count in by_type.items():
            self._recon_break_types.add((funder, kind))
            self.recon_breaks.labels(funder=funder, type=kind).set(count)

    def recon_succeeded(self, funder: str, at: float | None = None) -> None:
        """A reconciliation of `funder` completed at unix time `at` (now by default)."""
        self.recon_last_success.labels(funder=funder).set(time.time() if at is None else at)

    def recon_run(self, funder: str, outcome: ReconOutcome, seconds: float, lines: int) -> None:
        """One reconciliation run of `funder` ended; a succeeded one also sets the last
        success time."""
        self.recon_runs.labels(funder=funder, outcome=outcome).inc()
        self.recon_duration.labels(funder=funder).observe(seconds)
        if lines:
            self.recon_lines.labels(funder=funder).inc(lines)
        if outcome == "succeeded":
            self.recon_succeeded(funder)

    def set_voucher_chain(self, sealed: int, unsealed: int, oldest_unsealed_age: float) -> None:
        """The chain as the database holds it: sealed length, unsealed backlog and its age."""
        self.vouchers_sealed.set(sealed)
        self.vouchers_unsealed.set(unsealed)
        self.vouchers_unsealed_oldest_age.set(oldest_unsealed_age)

    def voucher_verification(self, intact: bool, at: float | None = None) -> None:
        """`gateway.vouchers.verify` finished in this process at unix time `at` (now by
        default): intact, or broken."""
        self.voucher_verification_last.set(time.time() if at is None else at)
        self.voucher_verification_broken.set(0 if intact else 1)
