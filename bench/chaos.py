"""The chaos run: real processes, seeded faults and crashes, then every money invariant checked.

    python -m bench.chaos [--count N] [--gateways 2] [--kills K] [--seed S]
                          [--database-url URL] [--reset] [--workdir DIR] [--json]

What runs (all over loopback, processes started by `tests/e2e/harness.py`):

- PostgreSQL: embedded (`EmbeddedPostgres`, `durable=False`, in a temporary directory) unless
  `--database-url` or `FUNDGATE_DATABASE_URL` names one (it must be empty, or `--reset`);
- three sandbox banks with seeded faults: reject 5 %, HTTP 500 5 %, never-answered request 10 %,
  failed after acceptance 2 %, callback lost 30 %, callback sent twice 30 %, callbacks delayed;
  `bank-a` is direct, `bank-b` and `bank-c` co-lend (platform shares 30 % and 40 %);
- `--gateways` gateway processes on that one database, with fast dispatch timings, a short
  connector timeout and short leases, and the daily limits and prefunds sized so that they run
  out during the run (limits are exercised, not just configured);
- a webhook receiver standing in for the lending core.

What it does: registers borrowers and submits `--count` disbursements from concurrent clients
spread over every gateway; one in `storm_every` is a duplicate storm (the same request sent
many times at once to every gateway, sometimes with a conflicting copy). A client that gets no
definitive answer (connection reset by a kill, 503) sends the same request again, to the next
gateway, as a lending core would. Meanwhile `--kills` times, at seeded moments (one of them
after the last submission), a gateway is SIGKILLed and restarted. Then it waits until every
disbursement is terminal (or escalated), every outbox is empty, every bank order is settled
and every outcome webhook has arrived, and checks:

- the oracle: every order's `executions` <= 1, and no disbursement paid by two orders;
- the orders executed at the banks are exactly the attempts fundgate reports `succeeded`
  (an unknown attempt is resolved by a status query); no order at a bank fundgate does not
  know; amounts and payee accounts as requested;
- every disbursement terminal, or `unknown` and escalated with a reason; its attempts
  consistent (re-routing only after a definitive pre-execution refusal); the API agrees;
- `limit_usage.used` per scope and day equals the sum of non-failed disbursements (funder
  scope: the disbursement's current funder; platform: all); no limit ever above its cap
  (also sampled during the run); each prefund = opening − platform shares of non-failed
  co-lending disbursements;
- every terminal disbursement's outcome webhook delivered, signed, with its terminal status;
  none for a non-terminal state, none contradicting the final one;
- idempotency: at most one 201 per txn_no, one payload wins, replays equal the first answer,
  a different payload gets 409, and nothing acknowledged is missing;
- the voucher hash chain verifies.

A one-screen report is printed; the exit status is 1 on any violation. The core is
`run_chaos(settings) -> Report`, used by this program and by `tests/stress`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from rich.console import Console
from rich.table import Table

from gateway.store import db
from gateway.store import queries as q
from gateway.store.embedded import EmbeddedPostgres
from gateway.vouchers import verify as verify_vouchers
from tests.e2e.harness import (
    TERMINAL,
    Api,
    FunderSpec,
    Gateway,
    ProcessFailed,
    Stack,
    WebhookEvent,
    disbursement_body,
    run_stack,
)

# a scope's usage at one instant: the sum over its buckets, in one statement (one snapshot)
USAGE = (
    "SELECT scope, business_day, sum(used)::bigint AS used FROM limit_usage"
    " GROUP BY scope, business_day"
)

# Amounts drawn for the workload, in fen: the product's floor (3,000 CNY) up to 30,000 CNY.
MIN_AMOUNT = 300_000
MAX_AMOUNT = 3_000_000
MEAN_AMOUNT = (MIN_AMOUNT + MAX_AMOUNT) // 2

# Daily limits as shares of the expected volume (count × mean amount): the funders together
# could take all of it, the platform limit stops the last ~15 %, and bank-b's prefund runs out
# before its daily limit, so every kind of limit is reached during a run.
PLATFORM_SHARE_OF_VOLUME = 0.85
FUNDERS: tuple[tuple[str, str, str | None, int, float, float], ...] = (
    # id, mode, platform share, priority, daily limit share, prefund / (limit × share)
    ("bank-a", "direct", None, 1, 0.40, 0.0),
    ("bank-b", "co_lending", "0.30", 2, 0.30, 0.75),
    ("bank-c", "co_lending", "0.40", 3, 0.30, 1.20),
)
# Callback delay and settle time per bank (ms): bank-a's callbacks race the dispatch answer,
# bank-b's race the first status query, bank-c's come after the connector timeout, so a
# never-answered request there is recorded `unknown` before anything else is heard.
BANK_TIMING = {"bank-a": (150, 50), "bank-b": (600, 100), "bank-c": (2500, 200)}

NAMES = ("张三", "李四", "王五", "赵六", "钱七", "孙八", "周九", "吴十")
BANK_CODES = ("ICBC", "CCB", "ABC", "BOC", "CMB")
DEFINITIVE = frozenset({200, 201, 400, 404, 409, 422})
PROGRESS_POLL_SECONDS = 0.05
# violations are listed money first: what moved twice or wrongly, then what is unaccounted
FIRST_KINDS = (
    "double_execution",
    "paid_twice",
    "wrong_payee",
    "executed_not_succeeded",
    "order_unknown_to_fundgate",
    "succeeded_not_executed",
    "limit_overshot",
    "acknowledged_but_lost",
)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Faults:
    """The sandbox banks' fault rates (probabilities) and latency."""

    reject_rate: float = 0.05
    error_rate: float = 0.05
    timeout_rate: float = 0.10
    fail_rate: float = 0.02
    callback_loss_rate: float = 0.30
    callback_duplicate_rate: float = 0.30
    latency_ms: int = 10

    def bank_args(self, seed: int, callback_delay_ms: int, settle_ms: int) -> tuple[str, ...]:
        # appended after the harness's own options: argparse keeps the last --seed
        return (
            "--seed", str(seed),
            "--reject-rate", str(self.reject_rate),
            "--error-rate", str(self.error_rate),
            "--timeout-rate", str(self.timeout_rate),
            "--fail-rate", str(self.fail_rate),
            "--callback-loss-rate", str(self.callback_loss_rate),
            "--callback-duplicate-rate", str(self.callback_duplicate_rate),
            "--callback-delay-ms", str(callback_delay_ms),
            "--settle-ms", str(settle_ms),
            "--latency-ms", str(self.latency_ms),
        )  # fmt: skip


@dataclass(frozen=True)
class ChaosSettings:
    count: int = 2000
    gateways: int = 2
    kills: int = 5
    seed: int = 1
    database_url: str | None = None  # None: embedded PostgreSQL in a temporary directory
    reset: bool = False  # empty a non-empty database first (it is refused otherwise)
    workdir: Path | None = None  # process logs and config; None: a temporary directory
    clients: int = 16  # concurrent lending-core clients
    storm_every: int = 25  # one disbursement in this many is a duplicate storm
    storm_copies: int = 12  # identical copies sent at once in a storm
    faults: Faults = Faults()
    connector_timeout_seconds: float = 1.5  # the never-answered requests end as unknown
    lease_seconds: float = 4.0  # a killed process's claims come back this fast
    escalate_after_seconds: float = 30.0
    settle_timeout_seconds: float = 240.0  # after the last submission, to reach quiescence
    request_deadline_seconds: float = 120.0  # a client gives up on one request after this

    def __post_init__(self) -> None:
        if self.count < 1 or self.gateways < 1 or self.kills < 0 or self.clients < 1:
            raise ValueError("count, gateways and clients must be positive, kills not negative")


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Violation:
    kind: str
    detail: str
    txn_no: str | None = None

    def __str__(self) -> str:
        where = f" [{self.txn_no}]" if self.txn_no else ""
        return f"{self.kind}{where}: {self.detail}"


@dataclass
class KillEvent:
    at_seconds: float
    gateway: str
    phase: str  # submitting | settling
    down_seconds: float
    restart_seconds: float


@dataclass
class Report:
    seed: int
    count: int
    gateways: int
    banks: int
    database: str
    workdir: str
    # traffic
    submitted: int = 0
    storms: int = 0
    requests: int = 0
    created: int = 0  # 201
    replayed: int = 0  # 200
    conflicts: int = 0  # 409
    refused: dict[str, int] = field(default_factory=dict)  # 422 by code
    retried_transport: int = 0
    retried_overloaded: int = 0  # 503
    server_errors: int = 0  # any other 5xx
    gave_up: int = 0
    # crashes
    kills: list[KillEvent] = field(default_factory=list)
    # outcomes
    disbursements: int = 0
    succeeded: int = 0
    failed: int = 0
    rerouted: int = 0
    unknown_resolved: int = 0
    unknown_resolved_by_query: int = 0
    escalated: int = 0
    settled_by: dict[str, int] = field(default_factory=dict)  # terminal transitions by source
    bank_orders: int = 0
    executions: int = 0
    webhooks: int = 0
    limits: dict[str, str] = field(default_factory=dict)  # scope: used / cap (peak)
    quiescent: bool = False
    submit_seconds: float = 0.0
    settle_seconds: float = 0.0
    total_seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)
    evidence: dict[str, list[str]] = field(default_factory=dict)  # txn_no: log lines

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["violations"] = [str(v) for v in self.violations]
        data["ok"] = self.ok
        return json.dumps(data, ensure_ascii=False, indent=2)

    def table(self) -> Table:
        verdict = "[green]OK[/]" if self.ok else f"[red]{len(self.violations)} VIOLATIONS[/]"
        t = Table(
            title=f"fundgate chaos run · seed {self.seed} · {verdict}",
            show_header=False,
            title_justify="left",
            min_width=78,
            padding=(0, 1),
        )
        t.add_column("what", style="bold", no_wrap=True)
        t.add_column("count", justify="right", no_wrap=True)
        t.add_column("detail", overflow="fold")
        phases = Counter(k.phase for k in self.kills)
        outages = sum(1 for k in self.kills if k.gateway == "all")
        settled = ", ".join(f"{k} {v}" for k, v in sorted(self.settled_by.items()))
        rows: list[tuple[str, Any, str]] = [
            ("setup", f"{self.gateways} gw", f"{self.banks} banks, {self.database}"),
            ("submitted", self.submitted, f"{self.storms} of them as duplicate storms"),
            ("requests", self.requests, f"resends: {self.retried_transport} dropped, "
             f"{self.retried_overloaded} × 503"),
            ("accepted (201)", self.created, f"{self.disbursements} in the database"),
            ("replayed (200)", self.replayed, "duplicates answered with the first answer"),
            ("refused (409)", self.conflicts, "duplicates with another payload"),
            ("refused (422)", sum(self.refused.values()),
             ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items()))),
            ("kills", len(self.kills), f"SIGKILL: {phases['submitting']} submitting, "
             f"{phases['settling']} after; {outages} × all gateways"),
            ("succeeded", self.succeeded, ""),
            ("failed", self.failed, ""),
            ("re-routed", self.rerouted, "after a definitive pre-execution refusal"),
            ("unknown resolved", self.unknown_resolved, f"{self.unknown_resolved_by_query} by "
             "status query, rest by callback or re-send"),
            ("settled by", "", settled),
            ("escalated", self.escalated, "still unknown, visibly"),
            ("bank orders", self.bank_orders, f"{self.executions} executions"),
            ("webhooks", self.webhooks, "received by the lending core"),
            ("5xx (not 503)", self.server_errors, f"{self.gave_up} requests gave up"),
        ]  # fmt: skip
        rows += [(scope, "", text) for scope, text in sorted(self.limits.items())]
        idle = "" if self.quiescent else " (NOT quiescent)"
        rows += [
            ("time", f"{self.total_seconds:.0f} s",
             f"submit {self.submit_seconds:.0f} s, then settled in {self.settle_seconds:.0f} s"
             + idle),
            ("violations", len(self.violations), ""),
        ]  # fmt: skip
        for what, n, detail in rows:
            t.add_row(what, str(n), detail)
        return t

    def render(self, console: Console, *, evidence: bool = True) -> None:
        console.print(self.table())
        if self.violations:
            v = Table(title="violations (first 15)", title_justify="left", min_width=78)
            v.add_column("kind", style="red")
            v.add_column("txn_no")
            v.add_column("detail", overflow="fold")
            for item in self.violations[:15]:
                v.add_row(item.kind, item.txn_no or "", item.detail)
            console.print(v)
            by_kind = Counter(x.kind for x in self.violations)
            console.print("by kind: " + ", ".join(f"{k} {n}" for k, n in by_kind.most_common()))
            console.print(f"process logs: {self.workdir}")
        if evidence and self.evidence:
            for txn_no, lines in self.evidence.items():
                console.print(f"[bold]log lines of {txn_no}[/]", highlight=False)
                for line in lines:
                    console.print("  " + line, highlight=False, markup=False, soft_wrap=True)

    def text(self, width: int = 120) -> str:
        """The report as plain text (for assertion messages)."""
        buf = io.StringIO()
        self.render(Console(file=buf, width=width, color_system=None, force_terminal=False))
        return buf.getvalue()


class ChaosSetupError(RuntimeError):
    """The run could not start (database not empty, a process did not come up)."""


# --------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class Limits:
    caps: dict[str, int]  # scope: daily cap
    opening_prefund: dict[str, int]  # co-lending funder: opening balance


def funder_specs(settings: ChaosSettings, rng: random.Random) -> tuple[list[FunderSpec], Limits]:
    volume = settings.count * MEAN_AMOUNT
    specs: list[FunderSpec] = []
    caps = {q.PLATFORM_SCOPE: max(MAX_AMOUNT, int(volume * PLATFORM_SHARE_OF_VOLUME))}
    prefunds: dict[str, int] = {}
    for fid, mode, share, priority, limit_share, prefund_factor in FUNDERS:
        daily = max(MAX_AMOUNT, int(volume * limit_share))
        delay, settle = BANK_TIMING[fid]
        kw: dict[str, Any] = {}
        if share is not None:
            prefund = max(MAX_AMOUNT, int(daily * float(share) * prefund_factor))
            kw = {"platform_share": share, "prefund_balance": prefund}
            prefunds[fid] = prefund
        specs.append(
            FunderSpec(
                id=fid,
                mode=mode,
                priority=priority,
                single_max=MAX_AMOUNT,
                daily_limit=daily,
                bank_args=settings.faults.bank_args(rng.randrange(2**31), delay, settle),
                connector_options={"timeout_seconds": settings.connector_timeout_seconds},
                **kw,
            )
        )
        caps[q.funder_scope(fid)] = daily
    return specs, Limits(caps, prefunds)


def dispatch_timings(settings: ChaosSettings) -> dict[str, Any]:
    return {
        "max_in_flight_per_funder": 16,
        "lease_seconds": settings.lease_seconds,
        "query_backoff_seconds": [0.5, 1, 2, 3],
        "escalate_after_seconds": settings.escalate_after_seconds,
        "not_sent_retries": 3,
        "not_sent_backoff_seconds": 0.2,
        "poll_interval_seconds": 0.2,
        "circuit_failure_threshold": 5,
        "circuit_cooldown_seconds": 2,
        "webhook_backoff_seconds": [0.2, 0.5, 1, 2],
    }


async def prepare_database(url: str, *, reset: bool) -> None:
    """Migrate; the checks need an empty database, so a used one is emptied or refused."""
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        used = await conn.fetchval("SELECT count(*) FROM disbursements")
        prefund = await conn.fetchval("SELECT count(*) FROM prefund")
        if (used or prefund) and not reset:
            raise ChaosSetupError(
                f"the database already holds {used} disbursements; the chaos run checks "
                "totals, so it needs an empty one (pass --reset to empty it)"
            )
        if reset:
            tables = [
                r["tablename"]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
                if r["tablename"] != "schema_migrations"
            ]
            if tables:
                await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Job:
    """One txn_no: its borrower, the genuine request (variant 0) and conflicting ones, and
    which variant each concurrent copy sends (one copy unless it is a storm)."""

    index: int
    borrower_id: str
    payee: dict[str, str]
    variants: tuple[dict[str, Any], ...]
    copies: tuple[int, ...]
    gateway: int

    @property
    def txn_no(self) -> str:
        return str(self.variants[0]["txn_no"])

    @property
    def storm(self) -> bool:
        return len(self.copies) > 1


def make_jobs(settings: ChaosSettings, rng: random.Random) -> list[Job]:
    jobs: list[Job] = []
    tag = f"CH{settings.seed % 10**8:08d}"
    hints = (None, None, "bank-a", "bank-b", "bank-c")
    for i in range(settings.count):
        payee = {
            "account_no": "6222" + "".join(rng.choice("0123456789") for _ in range(15)),
            "account_name": rng.choice(NAMES),
            "bank_code": rng.choice(BANK_CODES),
        }
        repayment = rng.choice(("equal_installment", "interest_first"))
        months = rng.randint(1, 12) if repayment == "interest_first" else rng.randint(1, 36)
        body = disbursement_body(
            f"{tag}N{i:06d}",
            f"{tag}B{i:06d}",
            payee=payee,
            amount=rng.randint(MIN_AMOUNT, MAX_AMOUNT),
            term={"unit": "month", "count": months},
            apr=f"{rng.randint(800, 2400) / 10000:.4f}",
            repayment=repayment,
            funder_hint=rng.choice(hints),
            metadata={"chaos": True, "i": i},
        )
        variants = [body]
        copies = [0]
        if settings.storm_every and i % settings.storm_every == settings.storm_every // 2:
            copies = [0] * settings.storm_copies
            if rng.random() < 0.5:  # a conflicting request under the same txn_no joins in
                other = dict(
                    body,
                    amount=body["amount"] + 1
                    if body["amount"] < MAX_AMOUNT
                    else body["amount"] - 1,
                )
                variants.append(other)
                copies += [1, 1]
            rng.shuffle(copies)
        jobs.append(
            Job(
                index=i,
                borrower_id=body["borrower_id"],
                payee=payee,
                variants=tuple(variants),
                copies=tuple(copies),
                gateway=rng.randrange(settings.gateways),
            )
        )
    return jobs


@dataclass(frozen=True)
class Answer:
    variant: int
    status: int | None  # None: no definitive answer before the deadline
    body: Any
    gateway: str


@dataclass
class Traffic:
    answers: dict[str, list[Answer]] = field(default_factory=lambda: defaultdict(list))
    requests: int = 0
    transport_errors: int = 0
    overloaded: int = 0
    server_errors: list[str] = field(default_factory=list)
    done: int = 0  # jobs finished
    skipped: int = 0  # jobs never started because the run was aborted
    aborted: str | None = None


class Clients:
    """The lending core: concurrent clients that retry until a definitive answer, moving to
    the next gateway when one does not answer (it may have been killed)."""

    def __init__(self, apis: Sequence[tuple[str, Api]], settings: ChaosSettings) -> None:
        self.apis = list(apis)
        self.settings = settings
        self.traffic = Traffic()
        self._jitter = random.Random(settings.seed ^ 0x5EED)
        # a gateway that answers 500 again and again would keep every client retrying until
        # its deadline: past this many, stop submitting and report
        self.max_server_errors = max(20, settings.count // 20)

    async def call(
        self, method: str, path: str, body: Mapping[str, Any], start: int
    ) -> tuple[int | None, Any, str]:
        t = self.traffic
        deadline = time.monotonic() + self.settings.request_deadline_seconds
        delay = 0.05
        i = start
        while True:
            name, api = self.apis[i % len(self.apis)]
            if t.aborted:
                return None, None, name
            t.requests += method == "POST"
            try:
                resp = await api.http.request(method, path, json=dict(body))
            except httpx.TransportError:
                t.transport_errors += 1
            else:
                if resp.status_code in DEFINITIVE:
                    try:
                        payload = resp.json()
                    except ValueError:
                        payload = resp.text
                    return resp.status_code, payload, name
                if resp.status_code == 503:
                    t.overloaded += 1
                else:
                    t.server_errors.append(
                        f"{name}: {method} {path} → {resp.status_code} {resp.text[:200]}"
                    )
                    if len(t.server_errors) >= self.max_server_errors:
                        t.aborted = f"{len(t.server_errors)} answers 5xx other than 503"
            if time.monotonic() > deadline:
                return None, None, name
            i += 1
            await asyncio.sleep(delay * (0.5 + self._jitter.random()))
            delay = min(delay * 2, 1.0)

    async def run_job(self, job: Job) -> None:
        status, body, _ = await self.call(
            "PUT", f"/v1/borrowers/{job.borrower_id}/accounts", job.payee, job.gateway
        )
        if status not in (200, 201) and not self.traffic.aborted:
            self.traffic.server_errors.append(f"whitelist {job.borrower_id}: {status} {body}")

        async def one(k: int, variant: int) -> None:
            status, body, gw = await self.call(
                "POST", "/v1/disbursements", job.variants[variant], job.gateway + k
            )
            self.traffic.answers[job.txn_no].append(Answer(variant, status, body, gw))

        await asyncio.gather(*(one(k, v) for k, v in enumerate(job.copies)))
        self.traffic.done += 1

    async def run(self, jobs: Sequence[Job]) -> None:
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def worker() -> None:
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if self.traffic.aborted:
                    self.traffic.skipped += 1
                    continue
                await self.run_job(job)

        await asyncio.gather(*(worker() for _ in range(self.settings.clients)))


# --------------------------------------------------------------------------- crashes


class Killer:
    """SIGKILLs gateways at seeded moments and restarts them.

    The moments are points in the submission (fractions of the jobs done) plus a random
    delay; the last kill, when there are several, falls right after the last submission, while
    callbacks, queries and webhooks are still in flight. Usually one gateway goes down (the
    others carry on); with `ALL_DOWN_CHANCE` every gateway does at once, a full outage in
    which the banks' callbacks find nobody.
    """

    ALL_DOWN_CHANCE = 0.2

    def __init__(
        self,
        gateways: Sequence[Gateway],
        kills: int,
        rng: random.Random,
        progress: Callable[[], float],
        started: float,
    ) -> None:
        self.gateways = list(gateways)
        self.progress = progress
        self.started = started
        self.events: list[KillEvent] = []
        self.failures: list[str] = []
        self.submitted = asyncio.Event()
        marks = sorted(rng.uniform(0.05, 0.95) for _ in range(kills))
        if kills >= 2:
            marks[-1] = 1.0  # after the last submission
        self.plan: list[tuple[float, list[Gateway], float, float]] = []
        for mark in marks:
            everyone = len(self.gateways) > 1 and rng.random() < self.ALL_DOWN_CHANCE
            victims = self.gateways if everyone else [rng.choice(self.gateways)]
            jitter = rng.uniform(0.0, 0.4)  # past the mark: a random point in the flow
            down = rng.uniform(0.1, 2.0)  # down for this long
            self.plan.append((mark, victims, jitter, down))

    async def run(self) -> None:
        for mark, victims, jitter, down in self.plan:
            if mark >= 1.0:
                await self.submitted.wait()
            else:
                while self.progress() < mark and not self.submitted.is_set():
                    await asyncio.sleep(PROGRESS_POLL_SECONDS)
            await asyncio.sleep(jitter)
            phase = "settling" if self.submitted.is_set() else "submitting"
            at = time.monotonic() - self.started
            for gw in victims:
                await asyncio.to_thread(gw.kill)
            await asyncio.sleep(down)
            restart = time.monotonic()
            results = await asyncio.gather(
                *(asyncio.to_thread(self._restart, gw) for gw in victims), return_exceptions=True
            )
            for gw, result in zip(victims, results, strict=True):
                if isinstance(result, BaseException):
                    self.failures.append(f"{gw.name} did not come back: {result}")
            if self.failures:
                return
            name = "all" if len(victims) > 1 else victims[0].name
            self.events.append(KillEvent(at, name, phase, down, time.monotonic() - restart))

    @staticmethod
    def _restart(gw: Gateway) -> None:
        gw.start()
        gw.wait_ready(90.0)


class LimitWatch:
    """Samples `limit_usage` and `prefund` during the run: the peak usage per scope and day
    and the lowest prefund balance (an overshoot corrected later would be missed otherwise)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.peak: dict[tuple[str, date], int] = {}
        self.lowest_prefund: dict[str, int] = {}
        self.samples = 0

    async def run(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while not stop.is_set():
                with contextlib.suppress(asyncpg.PostgresError, OSError):
                    for r in await conn.fetch(USAGE):
                        key = (r["scope"], r["business_day"])
                        self.peak[key] = max(self.peak.get(key, 0), r["used"])
                    for r in await conn.fetch("SELECT funder_id, balance FROM prefund"):
                        low = self.lowest_prefund.get(r["funder_id"], r["balance"])
                        self.lowest_prefund[r["funder_id"]] = min(low, r["balance"])
                    self.samples += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
        finally:
            await conn.close()


# --------------------------------------------------------------------------- the end state


@dataclass
class Snapshot:
    disbursements: dict[str, dict[str, Any]]  # txn_no: row
    attempts: dict[str, list[dict[str, Any]]]  # txn_no: rows ordered by n
    usage: dict[tuple[str, date], int]
    prefund: dict[str, int]
    outbox: dict[str, int]
    bank_orders: dict[str, dict[str, dict[str, Any]]]  # funder: order_no: oracle row
    webhooks: list[WebhookEvent]
    api_status: dict[str, str]
    settled_by: dict[str, int]
    chain_problem: str | None
    settled_by_query: set[str] = field(default_factory=set)  # order numbers


def _json_field(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


async def read_database(conn: asyncpg.Connection) -> dict[str, Any]:
    ds = await conn.fetch(
        "SELECT id, txn_no, status, funder_id, mode, amount, alloc_funder, alloc_platform,"
        " business_day, failure FROM disbursements ORDER BY id"
    )
    by_id = {r["id"]: r["txn_no"] for r in ds}
    attempts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in await conn.fetch(
        "SELECT disbursement_id, n, funder_id, order_no, status, error, unknown_since,"
        " escalated_at, alloc_platform FROM attempts ORDER BY disbursement_id, n"
    ):
        row = dict(r)
        row["error"] = _json_field(row["error"])
        attempts[by_id[r["disbursement_id"]]].append(row)
    disbursements = {}
    for r in ds:
        row = dict(r)
        row["failure"] = _json_field(row["failure"])
        disbursements[r["txn_no"]] = row
    usage = {(r["scope"], r["business_day"]): r["used"] for r in await conn.fetch(USAGE)}
    prefund = {
        r["funder_id"]: r["balance"]
        for r in await conn.fetch("SELECT funder_id, balance FROM prefund")
    }
    outbox = {
        r["kind"]: r["n"]
        for r in await conn.fetch("SELECT kind, count(*) AS n FROM outbox GROUP BY kind")
    }
    return {
        "disbursements": disbursements,
        "attempts": dict(attempts),
        "usage": usage,
        "prefund": prefund,
        "outbox": outbox,
    }


async def settled_by_source(conn: asyncpg.Connection) -> tuple[dict[str, int], set[str]]:
    """Terminal transitions by what told fundgate (dispatch answer, callback, query), from
    the voucher events; and the order numbers a status query settled."""
    try:
        rows = await conn.fetch(
            # no source: failed at fail-over, every funder having refused
            "SELECT coalesce(event::jsonb ->> 'source', 'refused') AS source,"
            " event::jsonb ->> 'order_no' AS order_no FROM voucher_events"
            " WHERE kind IN ('disbursement.succeeded', 'disbursement.failed')"
        )
    except asyncpg.PostgresError:
        return {}, set()
    by_query = {r["order_no"] for r in rows if r["source"] == "query" and r["order_no"]}
    return dict(Counter(r["source"] for r in rows)), by_query


async def bank_orders(stack: Stack) -> dict[str, dict[str, dict[str, Any]]]:
    return {fid: await bank.payouts() for fid, bank in stack.banks.items()}


async def api_statuses(apis: Sequence[tuple[str, Api]], txn_nos: Sequence[str]) -> dict[str, str]:
    """Each disbursement's status as the API reports it (spread over the gateways)."""
    out: dict[str, str] = {}
    sem = asyncio.Semaphore(32)

    async def one(i: int, txn_no: str) -> None:
        _, api = apis[i % len(apis)]
        async with sem:
            for _ in range(5):
                with contextlib.suppress(httpx.TransportError):
                    resp = await api.get(txn_no)
                    if resp.status_code == 200:
                        out[txn_no] = resp.json()["status"]
                        return
                    out[txn_no] = f"HTTP {resp.status_code}"
                    if resp.status_code != 503:
                        return
                await asyncio.sleep(0.2)

    await asyncio.gather(*(one(i, t) for i, t in enumerate(txn_nos)))
    return out


async def wait_quiescent(
    url: str, stack: Stack, deadline: float, report: Report
) -> tuple[bool, str]:
    """Until every disbursement is terminal (or escalated), both outboxes are empty, no bank
    order is still pending and every terminal disbursement's webhook has arrived."""
    conn = await asyncpg.connect(url)
    why = ""
    try:
        while True:
            open_rows = await conn.fetch(
                "SELECT d.txn_no, d.status FROM disbursements d WHERE d.status NOT IN"
                " ('succeeded', 'failed') AND NOT EXISTS (SELECT 1 FROM attempts a"
                " WHERE a.disbursement_id = d.id AND a.status = 'unknown'"
                " AND a.escalated_at IS NOT NULL)"
            )
            outbox = await conn.fetchval("SELECT count(*) FROM outbox")
            terminal = await conn.fetch(
                "SELECT txn_no, status FROM disbursements WHERE status IN ('succeeded', 'failed')"
            )
            seen = {(e.body.get("txn_no"), e.body.get("status")) for e in stack.receiver.events()}
            unheard = [r["txn_no"] for r in terminal if (r["txn_no"], r["status"]) not in seen]
            pending_at_banks = 0
            with contextlib.suppress(httpx.HTTPError):
                orders = await bank_orders(stack)
                pending_at_banks = sum(
                    1 for o in orders.values() for p in o.values() if p["status"] == "ACCEPTED"
                )
            why = (
                f"{len(open_rows)} open disbursements, {outbox} outbox rows, "
                f"{pending_at_banks} bank orders pending, {len(unheard)} webhooks missing"
            )
            if not open_rows and not outbox and not pending_at_banks and not unheard:
                return True, why
            if time.monotonic() > deadline:
                sample = ", ".join(f"{r['txn_no']}={r['status']}" for r in open_rows[:5])
                return False, why + (f" (e.g. {sample})" if sample else "")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- the checks


def check_oracle(s: Snapshot, report: Report) -> list[Violation]:
    """The banks' record of money moved against what fundgate says."""
    out: list[Violation] = []
    by_order = {a["order_no"]: (t, a) for t, atts in s.attempts.items() for a in atts}
    paid: Counter[str] = Counter()
    executed: set[str] = set()
    for fid, orders in s.bank_orders.items():
        for order_no, p in orders.items():
            report.bank_orders += 1
            report.executions += p["executions"]
            found = by_order.get(order_no)
            txn_no = found[0] if found else order_no.rsplit("-", 1)[0]
            if p["executions"] > 1:
                out.append(
                    Violation(
                        "double_execution",
                        f"{fid} executed {order_no} {p['executions']} times",
                        txn_no,
                    )
                )
            if p["executions"] >= 1:
                paid[txn_no] += p["executions"]
                executed.add(order_no)
            if p["status"] == "ACCEPTED":
                out.append(Violation("bank_order_unsettled", f"{fid} {order_no}", txn_no))
            if found is None:
                out.append(
                    Violation("order_unknown_to_fundgate", f"{fid} holds {order_no}", txn_no)
                )
                continue
            a = found[1]
            d = s.disbursements[txn_no]
            if a["funder_id"] != fid:
                out.append(Violation("order_at_wrong_bank", f"{order_no} at {fid}", txn_no))
            if p["amount"] != d["amount"]:
                out.append(
                    Violation(
                        "amount_mismatch",
                        f"{order_no}: bank {p['amount']}, fundgate {d['amount']}",
                        txn_no,
                    )
                )
            if p["executions"] >= 1 and a["status"] != "succeeded":
                if a["status"] == "unknown" and a["escalated_at"] is not None:
                    continue  # visibly escalated; the statement will settle it
                out.append(
                    Violation(
                        "executed_not_succeeded",
                        f"{fid} executed {order_no}, fundgate says {a['status']}",
                        txn_no,
                    )
                )
    for txn_no, n in paid.items():
        if n > 1:
            out.append(Violation("paid_twice", f"{n} executions across its orders", txn_no))
    for txn_no, atts in s.attempts.items():
        for a in atts:
            if a["status"] == "succeeded" and a["order_no"] not in executed:
                out.append(
                    Violation(
                        "succeeded_not_executed",
                        f"{a['order_no']} at {a['funder_id']} "
                        "is succeeded but the bank moved no money",
                        txn_no,
                    )
                )
    return out


def check_accounts(s: Snapshot, jobs: Sequence[Job]) -> list[Violation]:
    """Money went only to the payee account the request named."""
    out: list[Violation] = []
    account = {j.txn_no: j.payee["account_no"] for j in jobs}
    for fid, orders in s.bank_orders.items():
        for order_no, p in orders.items():
            txn_no = order_no.rsplit("-", 1)[0]
            if txn_no in account and p["account_no"] != account[txn_no]:
                out.append(
                    Violation("wrong_payee", f"{fid} {order_no} paid to another account", txn_no)
                )
    return out


def _definitive_refusal(error: Any) -> bool:
    return isinstance(error, dict) and (error.get("pre_execution") is True or "not_sent" in error)


def check_disbursements(s: Snapshot, report: Report) -> list[Violation]:
    out: list[Violation] = []
    for txn_no, d in s.disbursements.items():
        atts = s.attempts.get(txn_no, [])
        if not atts:
            out.append(Violation("no_attempt", "a disbursement without an attempt", txn_no))
            continue
        last = atts[-1]
        if [a["n"] for a in atts] != list(range(1, len(atts) + 1)):
            out.append(Violation("attempt_numbering", str([a["n"] for a in atts]), txn_no))
        if len(atts) > 1:
            report.rerouted += 1
        resolved = [a for a in atts if a["unknown_since"] is not None and a["status"] in TERMINAL]
        report.unknown_resolved += len(resolved)
        report.unknown_resolved_by_query += sum(
            1 for a in resolved if a["order_no"] in s.settled_by_query
        )
        status = d["status"]
        if status == "succeeded":
            report.succeeded += 1
        elif status == "failed":
            report.failed += 1
        elif status == "unknown" and last["escalated_at"] is not None and last["error"]:
            report.escalated += 1
        else:
            reason = "escalated without a reason" if status == "unknown" else "never finished"
            out.append(Violation("not_terminal", f"status {status}: {reason}", txn_no))
        if status != last["status"]:
            out.append(
                Violation(
                    "status_mismatch",
                    f"disbursement {status}, last attempt {last['status']}",
                    txn_no,
                )
            )
        if d["funder_id"] != last["funder_id"]:
            out.append(
                Violation(
                    "funder_mismatch",
                    f"disbursement at {d['funder_id']}, last attempt at {last['funder_id']}",
                    txn_no,
                )
            )
        wins = [a for a in atts if a["status"] == "succeeded"]
        if len(wins) > 1:
            out.append(
                Violation("two_attempts_succeeded", str([a["order_no"] for a in wins]), txn_no)
            )
        for a in atts[:-1]:
            if a["status"] != "failed" or not _definitive_refusal(a["error"]):
                out.append(
                    Violation(
                        "rerouted_without_definitive_refusal",
                        f"attempt {a['n']} at {a['funder_id']} is {a['status']}: {a['error']}",
                        txn_no,
                    )
                )
        if status == "failed" and not d["failure"]:
            out.append(Violation("failed_without_reason", "failure is empty", txn_no))
        api = s.api_status.get(txn_no)
        if api is not None and api != status:
            out.append(Violation("api_disagrees", f"API says {api}, database {status}", txn_no))
    return out


def _cny(fen: int) -> str:
    return f"{fen // 100:,}"  # display only: the checks compare exact fen


def check_limits(
    s: Snapshot,
    limits: Limits,
    peak: Mapping[tuple[str, date], int],
    lowest_prefund: Mapping[str, int],
    report: Report,
) -> list[Violation]:
    out: list[Violation] = []
    expected: Counter[tuple[str, date]] = Counter()
    platform_taken: Counter[str] = Counter()
    for d in s.disbursements.values():
        if d["status"] == "failed":
            continue
        day = d["business_day"]
        expected[(q.PLATFORM_SCOPE, day)] += d["amount"]
        expected[(q.funder_scope(d["funder_id"]), day)] += d["amount"]
        platform_taken[d["funder_id"]] += d["alloc_platform"]
        if d["mode"] == "direct" and d["alloc_platform"]:
            out.append(
                Violation("direct_with_platform_share", str(d["alloc_platform"]), d["txn_no"])
            )
    for key in sorted(set(expected) | set(s.usage)):
        scope, day = key
        used, want = s.usage.get(key, 0), expected.get(key, 0)
        if used != want:
            out.append(
                Violation(
                    "limit_usage_mismatch",
                    f"{scope} {day}: used {used}, non-failed "
                    f"disbursements {want} (diff {used - want:+d})",
                )
            )
        cap = limits.caps.get(scope)
        top = max(used, peak.get(key, 0))
        if cap is not None and top > cap:
            out.append(Violation("limit_overshot", f"{scope} {day}: {top} > cap {cap}"))
        if cap is not None:
            report.limits[scope] = (
                f"{_cny(used)} / {_cny(cap)} CNY, peak {_cny(peak.get(key, used))}"
            )
    for fid, opening in limits.opening_prefund.items():
        want = opening - platform_taken[fid]
        have = s.prefund.get(fid)
        if have != want:
            out.append(
                Violation(
                    "prefund_mismatch",
                    f"{fid}: balance {have}, opening {opening} − "
                    f"platform shares {platform_taken[fid]} = {want}",
                )
            )
        if lowest_prefund.get(fid, 0) < 0 or (have is not None and have < 0):
            out.append(Violation("prefund_negative", f"{fid}: {lowest_prefund.get(fid)}"))
        report.limits[f"prefund:{fid}"] = f"{_cny(have or 0)} / {_cny(opening)} CNY left"
    return out


def check_webhooks(s: Snapshot, report: Report) -> list[Violation]:
    out: list[Violation] = []
    heard: dict[str, set[str]] = defaultdict(set)
    report.webhooks = len(s.webhooks)
    for e in s.webhooks:
        txn_no = e.body.get("txn_no")
        status = e.body.get("status")
        if not e.signature_valid:
            out.append(Violation("webhook_bad_signature", f"status {status}", txn_no))
        if txn_no not in s.disbursements:
            out.append(Violation("webhook_for_unknown_txn", f"status {status}", txn_no))
            continue
        if status not in TERMINAL:
            out.append(Violation("webhook_for_non_terminal_state", f"status {status}", txn_no))
        heard[txn_no].add(str(status))
    for txn_no, d in s.disbursements.items():
        got = heard.get(txn_no, set())
        if d["status"] in TERMINAL and d["status"] not in got:
            out.append(Violation("webhook_missing", f"no {d['status']} webhook", txn_no))
        wrong = got - {d["status"]}
        if wrong:
            out.append(
                Violation(
                    "webhook_contradicts_final_state",
                    f"sent {sorted(wrong)}, final {d['status']}",
                    txn_no,
                )
            )
    return out


def _comparable(body: Any) -> Any:
    return json.dumps(body, sort_keys=True, ensure_ascii=False)


def check_idempotency(
    s: Snapshot, jobs: Sequence[Job], traffic: Traffic, report: Report
) -> list[Violation]:
    out: list[Violation] = []
    known = {j.txn_no for j in jobs}
    for txn_no in s.disbursements:
        if txn_no not in known:
            out.append(Violation("phantom_disbursement", "never submitted", txn_no))
    for job in jobs:
        answers = traffic.answers.get(job.txn_no, [])
        d = s.disbursements.get(job.txn_no)
        for a in answers:
            match a.status:
                case 201:
                    report.created += 1
                case 200:
                    report.replayed += 1
                case 409:
                    report.conflicts += 1
                case 422:
                    code = a.body.get("error", {}).get("code") if isinstance(a.body, dict) else "?"
                    report.refused[str(code)] = report.refused.get(str(code), 0) + 1
                case None:
                    report.gave_up += 1
                case _:
                    out.append(
                        Violation("unexpected_answer", f"HTTP {a.status}: {a.body}", job.txn_no)
                    )
        ok = [a for a in answers if a.status in (200, 201)]
        if sum(1 for a in ok if a.status == 201) > 1:
            out.append(Violation("two_creations", "more than one 201 for one txn_no", job.txn_no))
        if len({a.variant for a in ok}) > 1:
            out.append(Violation("two_payloads_accepted", "2xx for different payloads", job.txn_no))
        if len({_comparable(a.body) for a in ok}) > 1:
            out.append(Violation("replay_differs", "2xx bodies differ for one txn_no", job.txn_no))
        if d is None:
            if ok:
                out.append(
                    Violation(
                        "acknowledged_but_lost", "answered 2xx, not in the database", job.txn_no
                    )
                )
            continue
        winners = [i for i, v in enumerate(job.variants) if v["amount"] == d["amount"]]
        if len(winners) != 1:
            out.append(Violation("stored_payload_unknown", f"amount {d['amount']}", job.txn_no))
            continue
        won = winners[0]
        if not any(a.variant == won for a in ok):
            if any(a.status is None for a in answers):
                out.append(Violation("client_gave_up", "no definitive answer", job.txn_no))
            else:
                out.append(
                    Violation(
                        "accepted_unacknowledged",
                        "stored, but no request of that payload got a 2xx",
                        job.txn_no,
                    )
                )
        for a in answers:
            if a.variant != won and a.status not in (409, 422, None):
                out.append(
                    Violation(
                        "conflict_not_refused", f"other payload got HTTP {a.status}", job.txn_no
                    )
                )
    return out


def check_all(
    s: Snapshot,
    jobs: Sequence[Job],
    traffic: Traffic,
    limits: Limits,
    watch: LimitWatch,
    report: Report,
) -> list[Violation]:
    violations = [
        *check_oracle(s, report),
        *check_accounts(s, jobs),
        *check_disbursements(s, report),
        *check_limits(s, limits, watch.peak, watch.lowest_prefund, report),
        *check_webhooks(s, report),
        *check_idempotency(s, jobs, traffic, report),
    ]
    if s.chain_problem:
        violations.append(Violation("voucher_chain_broken", s.chain_problem))
    return violations


def log_evidence(workdir: Path, txn_nos: Sequence[str], per_txn: int = 14) -> dict[str, list[str]]:
    """The process log lines that mention each txn_no (for the first few violations)."""
    logs = sorted(workdir.glob("*.log"))
    out: dict[str, list[str]] = {}
    for txn_no in txn_nos:
        lines: list[str] = []
        for path in logs:
            with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as f:
                lines += [f"{path.stem}: {line.rstrip()}" for line in f if txn_no in line]
        out[txn_no] = lines[:per_txn] + (
            [f"… {len(lines) - per_txn} more"] if len(lines) > per_txn else []
        )
    return out


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _database(settings: ChaosSettings) -> Iterator[tuple[str, str]]:
    url = settings.database_url or os.environ.get("FUNDGATE_DATABASE_URL")
    if url:
        yield url, "PostgreSQL at " + url.rsplit("@", 1)[-1]
        return
    with tempfile.TemporaryDirectory(prefix="fundgate-chaos-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp), durable=False)
        try:
            yield pg.start(), "embedded PostgreSQL"
        finally:
            pg.stop()


async def _in_thread_cm(cm: contextlib.AbstractContextManager[Any]) -> Any:
    return await asyncio.to_thread(cm.__enter__)


async def run_chaos(
    settings: ChaosSettings, *, on_progress: Callable[[str], None] | None = None
) -> Report:
    """Run the whole chaos scenario of the module docstring; the report lists violations.

    `on_progress` hears a line at each phase (the CLI prints them to stderr).
    """

    def say(msg: str) -> None:
        if on_progress is not None:
            on_progress(msg)

    started = time.monotonic()
    rng = random.Random(settings.seed)
    own_workdir = settings.workdir is None
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="fundgate-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    specs, limits = funder_specs(settings, rng)
    jobs = make_jobs(settings, rng)
    db_cm = _database(settings)
    url, db_name = await _in_thread_cm(db_cm)
    report = Report(
        seed=settings.seed,
        count=settings.count,
        gateways=settings.gateways,
        banks=len(specs),
        database=db_name,
        workdir=str(workdir),
        submitted=len(jobs),
        storms=sum(1 for j in jobs if j.storm),
    )
    try:
        await prepare_database(url, reset=settings.reset)
        say(f"starting {len(specs)} banks and {settings.gateways} gateways in {workdir}")
        stack_cm = run_stack(
            workdir / "stack",
            url,
            funders=specs,
            gateways=settings.gateways,
            gateway={"platform_daily_limit": limits.caps[q.PLATFORM_SCOPE]},
            dispatch=dispatch_timings(settings),
        )
        try:
            stack: Stack = await _in_thread_cm(stack_cm)
        except ProcessFailed as e:
            raise ChaosSetupError(str(e)) from e
        try:
            await _drive(settings, stack, url, jobs, limits, rng, report, started, say)
        finally:
            await asyncio.to_thread(stack_cm.__exit__, None, None, None)
        if report.violations:
            txns = list(dict.fromkeys(v.txn_no for v in report.violations if v.txn_no))[:5]
            report.evidence = log_evidence(workdir / "stack", txns)
    finally:
        await asyncio.to_thread(db_cm.__exit__, None, None, None)
    report.total_seconds = time.monotonic() - started
    if own_workdir and report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


async def _drive(
    settings: ChaosSettings,
    stack: Stack,
    url: str,
    jobs: list[Job],
    limits: Limits,
    rng: random.Random,
    report: Report,
    started: float,
    say: Callable[[str], None],
) -> None:
    apis = [(gw.name, stack.api(gw)) for gw in stack.gateways]
    clients = Clients(apis, settings)
    watch = LimitWatch(url)
    stop_watch = asyncio.Event()
    killer = Killer(
        stack.gateways, settings.kills, rng, lambda: clients.traffic.done / len(jobs), started
    )
    watch_task = asyncio.create_task(watch.run(stop_watch))
    kill_task = asyncio.create_task(killer.run())
    try:
        say(
            f"submitting {len(jobs)} disbursements ({report.storms} storms), "
            f"{settings.kills} kills planned"
        )
        t0 = time.monotonic()
        await clients.run(jobs)
        report.submit_seconds = time.monotonic() - t0
        killer.submitted.set()
        say("submitted; waiting for the last kill and for quiescence")
        await kill_task
        t1 = time.monotonic()
        report.quiescent, why = await wait_quiescent(
            url, stack, t1 + settings.settle_timeout_seconds, report
        )
        report.settle_seconds = time.monotonic() - t1
        stop_watch.set()
        await watch_task
        say(f"quiescent={report.quiescent}: {why}; checking")

        conn = await asyncpg.connect(url)
        try:
            data = await read_database(conn)
            settled, by_query = await settled_by_source(conn)
            chain = await verify_vouchers(conn)
        finally:
            await conn.close()
        snapshot = Snapshot(
            **data,
            bank_orders=await bank_orders(stack),
            webhooks=stack.receiver.events(),
            api_status=await api_statuses(apis, list(data["disbursements"])),
            settled_by=settled,
            settled_by_query=by_query,
            chain_problem=None if chain.ok else f"seq {chain.first_broken}: {chain.problem}",
        )
    finally:
        stop_watch.set()
        for task in (kill_task, watch_task):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for _, api in apis:
            await api.aclose()

    t = clients.traffic
    report.kills = killer.events
    report.requests = t.requests
    report.retried_transport = t.transport_errors
    report.retried_overloaded = t.overloaded
    report.server_errors = len(t.server_errors)
    report.disbursements = len(snapshot.disbursements)
    report.settled_by = snapshot.settled_by
    violations = check_all(snapshot, jobs, t, limits, watch, report)
    early: list[Violation] = [Violation("restart_failed", f) for f in killer.failures]
    early += [Violation("gateway_died", gw.name) for gw in stack.gateways if not gw.running]
    if t.aborted:
        early.append(Violation("aborted", f"{t.aborted}; {t.skipped} jobs not submitted"))
    early += [Violation("server_error", e) for e in t.server_errors[:5]]
    if not report.quiescent:
        early.append(Violation("not_quiescent", why))
    rank = {kind: i for i, kind in enumerate(FIRST_KINDS)}
    report.violations = sorted(early + violations, key=lambda v: rank.get(v.kind, len(rank)))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="Disbursements through real gateways under bank faults and SIGKILLs, "
        "checked against the sandbox banks' record of money moved.",
    )
    p.add_argument("--count", type=int, default=2000, help="disbursements to submit")
    p.add_argument("--gateways", type=int, default=2, help="gateway processes on one database")
    p.add_argument("--kills", type=int, default=5, help="SIGKILL + restart of a gateway")
    p.add_argument("--seed", type=int, default=None, help="seed of everything (default: random)")
    p.add_argument("--clients", type=int, default=16, help="concurrent lending-core clients")
    p.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL to use (default: FUNDGATE_DATABASE_URL, else embedded)",
    )
    p.add_argument("--reset", action="store_true", help="empty a non-empty database first")
    p.add_argument("--workdir", type=Path, default=None, help="keep process logs here")
    p.add_argument("--settle-timeout", type=float, default=240.0, help="seconds to quiesce")
    p.add_argument("--lease-seconds", type=float, default=4.0, help="outbox and query leases")
    p.add_argument(
        "--connector-timeout", type=float, default=1.5, help="the banks' timeout_seconds"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**8)
    try:
        settings = ChaosSettings(
            count=args.count,
            gateways=args.gateways,
            kills=args.kills,
            seed=seed,
            clients=args.clients,
            database_url=args.database_url,
            reset=args.reset,
            workdir=args.workdir,
            settle_timeout_seconds=args.settle_timeout,
            lease_seconds=args.lease_seconds,
            connector_timeout_seconds=args.connector_timeout,
        )
    except ValueError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    err = Console(stderr=True)
    # the webhook receiver's server logs every connection a killed gateway drops; expected here
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)

    def progress(msg: str) -> None:
        err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)

    try:
        report = asyncio.run(run_chaos(settings, on_progress=progress))
    except ChaosSetupError as e:
        print(f"chaos: could not start: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(report.to_json())
    else:
        report.render(Console())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
