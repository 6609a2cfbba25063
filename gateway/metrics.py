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
        unknown (see `connectors.errors`)
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
    fundgate_attempts_escalated_total{funder}    counter: unknown attempts handed to a person

Inbound callbacks and outbound webhooks
    fundgate_callbacks_total{funder,result}              counter: accepted | duplicate | refused
    fundgate_callbacks_refused_total{funder,reason}      counter: refusals by reason
        (bad_signature | stale | replayed | malformed | unknown_order | amount_mismatch)
    fundgate_webhooks_total{outcome}                     counter: deliveries to the lending
        core by outcome: delivered | failed (a failed one is retried)

Health
    fundgate_circuit_state{funder}               gauge: 0 closed, 1 half-open, 2 open
    fundgate_build_info{version}                 gauge: always 1

Each `Metrics` owns its `CollectorRegistry`, so several apps can live in one test process.
"""

from __future__ import annotations

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

# From a fast local answer to a bank that runs into the 10 s default bank timeout and beyond.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

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
        self.attempts_escalated = Counter(
            "fundgate_attempts_escalated_total",
            "Unknown attempts escalated to a person, by funder.",
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

    def attempt_escalated(self, funder: str) -> None:
        self.attempts_escalated.labels(funder=funder).inc()

    def callback(self, funder: str, result: CallbackResult, reason: str | None = None) -> None:
        """One inbound callback; a refused one also counts under its `reason`."""
        self.callbacks.labels(funder=funder, result=result).inc()
        if result == "refused":
            self.callbacks_refused.labels(funder=funder, reason=reason or "unspecified").inc()

    def webhook(self, outcome: WebhookOutcome) -> None:
        self.webhooks.labels(outcome=outcome).inc()

    def pool_exhausted(self) -> None:
        self.db_pool_exhausted.inc()

    def set_circuit_state(self, funder: str, state: CircuitState) -> None:
        self.circuit_state.labels(funder=funder).set(_CIRCUIT_VALUES[state])
