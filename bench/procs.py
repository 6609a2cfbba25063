"""What the benchmarks share: the database, gateway and sandbox-bank processes, the bench
config, the load generator process, and the measurements taken around it (CPU per process
group from /proc, PostgreSQL wait events sampled from `pg_stat_activity`).

Every figure a benchmark prints is taken between the load generator's `start` and `stop`
markers (after its warm-up), so CPU and waits cover exactly the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also runnable as `python bench/<name>.py`
    sys.path.insert(0, str(ROOT))

TOKEN = "demo-token"
WEBHOOK_SECRET = "bench-webhook-secret"
BANK_SECRET = "bench-bank-secret"
# large enough that no limit is reached in any run (fen)
FAR_LIMIT = 1_000_000_000_000_000
# a bank nothing listens on: intake-only runs never dispatch (role api has no workers)
NOWHERE = "http://127.0.0.1:9"


# ------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FunderSpec:
    id: str
    priority: int = 1
    base_url: str = NOWHERE
    daily_limit: int = FAR_LIMIT


def config_toml(
    funders: Sequence[FunderSpec],
    *,
    public_url: str = "http://127.0.0.1:8700",
    webhook_url: str | None = None,
    platform_daily_limit: int = FAR_LIMIT,
    limit_buckets: int | None = None,
    http_transport: str | None = None,
) -> str:
    """A bench config: the `demo-token` client, one product, direct sandbox funders;
    `limit_buckets` and `http_transport` None keep the gateway's defaults."""
    token_sha256 = hashlib.sha256(TOKEN.encode()).hexdigest()
    gateway = f'platform_daily_limit = {platform_daily_limit}\npublic_url = "{public_url}"\n'
    if limit_buckets is not None:
        gateway += f"limit_buckets = {limit_buckets}\n"
    if http_transport is not None:
        gateway += f'http_transport = "{http_transport}"\n'
    parts = [f"[gateway]\n{gateway}"]
    if webhook_url is not None:
        parts.append(
            f'[lending_core]\nwebhook_url = "{webhook_url}"\nwebhook_secret = "{WEBHOOK_SECRET}"\n'
        )
    parts.append(
        f'[[clients]]\nname = "bench"\ntoken_sha256 = "{token_sha256}"\n'
        'scopes = ["disburse", "read", "admin"]\n'
    )
    parts.append(
        '[[products]]\ncode = "consumer-standard"\nmin_amount = 300000\nmax_amount = 20000000\n'
        'min_term = { unit = "day", count = 7 }\nmax_term = { unit = "month", count = 36 }\n'
        'repayments = ["equal_installment", "interest_first"]\n'
    )
    for f in funders:
        parts.append(
            f'[[funders]]\nid = "{f.id}"\nname = "Bench {f.id}"\nlicense = "bank"\n'
            f'mode = "direct"\npriority = {f.priority}\nproducts = ["consumer-standard"]\n'
            f'single_max = 20000000\ndaily_limit = {f.daily_limit}\nconnector = "sandbox"\n'
            f'[funders.connector_options]\nbase_url = "{f.base_url}"\nsecret = "{BANK_SECRET}"\n'
        )
    return "\n".join(parts)


# ------------------------------------------------------------------------------ plumbing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def get_json(url: str, timeout: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def register(url: str, n: int) -> None:
    """Whitelist the payee accounts of the load generator's `n` borrowers."""
    from bench.loadgen import borrower

    for i in range(n):
        bid, account = borrower(i)
        req = urllib.request.Request(
            f"{url}/v1/borrowers/{bid}/accounts", data=json.dumps(account).encode(),
            method="PUT", headers={"Authorization": f"Bearer {TOKEN}"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temporary directory for config, logs and the embedded database; removed afterwards
    unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"work directory kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


class Database:
    """Embedded PostgreSQL (durable, as in production) under `work`, or the server at `url`."""

    def __init__(self, work: Path, url: str | None) -> None:
        from gateway.store.embedded import EmbeddedPostgres

        self.embedded = None if url else EmbeddedPostgres(work / "db", durable=True)
        self.url = url or ""
        self.postmaster: int | None = None

    def __enter__(self) -> Database:
        if self.embedded is not None:
            self.url = self.embedded.start()
            self.postmaster = int((self.embedded.pgdata / "postmaster.pid").read_text().split()[0])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.embedded is not None:
            self.embedded.stop()

    def sibling(self, name: str) -> str:
        """The URL of database `name` on the same server, created (empty) if missing: a phase
        whose leftovers must not reach the next one (intake's undispatched outbox)."""
        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                    await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        base, _, _ = self.url.rpartition("/")
        return f"{base}/{name}"

    def migrate(self, url: str | None = None) -> None:
        """Apply fundgate's migrations (to `url`, default this database)."""
        import asyncpg

        from gateway.store import db

        async def run() -> None:
            conn = await asyncpg.connect(url or self.url)
            try:
                await db.migrate(conn)
            finally:
                await conn.close()

        asyncio.run(run())

    def pids(self) -> list[int]:
        return postgres_pids(self.postmaster)

    def cpu(self) -> float:
        return cpu_seconds(self.pids(), reaped_by=self.postmaster)


def fundgate_env(database_url: str, config: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FUNDGATE_DATABASE_URL": database_url,
        "FUNDGATE_CONFIG": str(config),
        "FUNDGATE_LOG_LEVEL": "warning",
        **extra,
    }


class Procs:
    """Processes started by a benchmark, stopped (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.running: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[str]] = []

    def start(
        self, name: str, args: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "w")  # lives as long as the process
        self._logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, *args], env=dict(env), cwd=ROOT, stdout=log, stderr=log
        )
        self.running.append(proc)
        return proc

    def gateway(
        self, port: int, role: str, env: Mapping[str, str], pool_size: int = 32
    ) -> subprocess.Popen[bytes]:
        return self.start(
            f"gateway-{role}-{port}",
            ["-m", "gateway.cli", "serve", "--port", str(port), "--role", role,
             "--pool-size", str(pool_size)],
            env,
        )  # fmt: skip

    def stop(self, procs: Sequence[subprocess.Popen[bytes]] | None = None) -> None:
        chosen = list(self.running if procs is None else procs)
        for p in reversed(chosen):
            if p.poll() is None:
                p.terminate()
        for p in reversed(chosen):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            self.running.remove(p)

    def close(self) -> None:
        self.stop()
        for log in self._logs:
            log.close()


# --------------------------------------------------------------------------- measurement


def cpu_seconds(pids: Sequence[int], reaped_by: int | None = None) -> float:
    """User + system CPU seconds used so far by these processes (Linux /proc), plus those of
    the exited children `reaped_by` has collected (PostgreSQL's ended backends)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if pid == reaped_by:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / tick


def postgres_pids(postmaster: int | None) -> list[int]:
    """The server's processes: the postmaster and its children (its backends), or, for a
    server given by URL, every PostgreSQL process of the machine."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() not in ("postgres", "postmaster"):
                continue
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if postmaster is None or postmaster in (int(d.name), ppid):
            out.append(int(d.name))
    return out


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process, ours or not)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


@dataclass
class CpuMeter:
    """CPU seconds of named process groups, read at the window's start and stop."""

    groups: dict[str, Callable[[], float]]
    _start: tuple[float, float, dict[str, float]] | None = None
    cores: dict[str, float] = field(default_factory=dict)  # CPU s per wall s, per group
    seconds: dict[str, float] = field(default_factory=dict)  # CPU s in the window, per group

    def start(self) -> None:
        now = time.monotonic()
        self._start = (now, machine_busy_seconds(), {k: f() for k, f in self.groups.items()})

    def stop(self) -> None:
        assert self._start is not None, "stop before start"
        t0, busy0, cpu0 = self._start
        wall = time.monotonic() - t0
        for k, f in self.groups.items():
            self.seconds[k] = f() - cpu0[k]
            self.cores[k] = self.seconds[k] / wall
        self.seconds["machine"] = machine_busy_seconds() - busy0
        self.cores["machine"] = self.seconds["machine"] / wall
        ours = sum(v for k, v in self.cores.items() if k != "machine")
        self.cores["other"] = max(self.cores["machine"] - ours, 0.0)

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in self.cores.items())


class WaitSampler:
    """Samples what PostgreSQL's client backends are doing, every `interval` seconds, from a
    thread with its own connection: the average number of backends in each state
    (`CPU` = active and not waiting, `Lock:tuple`, `LWLock:WALWrite`, `IO:WALSync`, ...,
    `idle in transaction` = holding a transaction open while its client computes)."""

    QUERY = """
        SELECT CASE WHEN state = 'active' THEN coalesce(wait_event_type || ':' || wait_event,
                                                        'CPU')
                    ELSE state END AS what,
               left(regexp_replace(query, '\\s+', ' ', 'g'), 120) AS query, count(*)
          FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
           AND state IN ('active', 'idle in transaction')
         GROUP BY 1, 2
    """

    def __init__(self, url: str, interval: float = 0.1) -> None:
        self.url = url
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self.queries: Counter[tuple[str, str]] = Counter()  # (what, the backend's last query)
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    async def _run(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            while not self._stop.is_set():
                for r in await conn.fetch(self.QUERY):
                    self.counts[r["what"]] += r["count"]
                    self.queries[r["what"], r["query"]] += r["count"]
                self.samples += 1
                await asyncio.sleep(self.interval)
        finally:
            await conn.close()

    def top(self, n: int = 4) -> list[tuple[str, float]]:
        s = max(self.samples, 1)
        return [(k, v / s) for k, v in self.counts.most_common(n)]

    def summary(self, n: int = 4) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in self.top(n)) or "none"

    def top_queries(self, n: int = 5) -> list[str]:
        """The states and (last) queries most sampled: what holds or waits, for a reader."""
        s = max(self.samples, 1)
        return [f"{v / s:5.1f}  {what:<22} {q}" for (what, q), v in self.queries.most_common(n)]


class PgStats:
    """What the database did in the window, from its cumulative statistics: transactions,
    and per table rows written and rows read by sequential scans (a scan where an index was
    meant shows here). PostgreSQL flushes these at most once a second, so short windows are
    approximate."""

    QUERY = """
        SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS written,
               coalesce(seq_tup_read, 0) AS seq_read, coalesce(idx_scan, 0) AS idx_scans
          FROM pg_stat_user_tables
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._start: dict[str, tuple[int, int, int]] = {}
        self._xacts = 0
        self.xacts = 0
        self.tables: dict[str, tuple[int, int, int]] = {}  # written, seq-read, index scans

    async def _read(self) -> tuple[int, dict[str, tuple[int, int, int]]]:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            xacts = await conn.fetchval(
                "SELECT sum(xact_commit + xact_rollback) FROM pg_stat_database"
            )
            rows = await conn.fetch(self.QUERY)
        finally:
            await conn.close()
        return int(xacts), {
            r["relname"]: (r["written"], r["seq_read"], r["idx_scans"]) for r in rows
        }

    def start(self) -> None:
        self._xacts, self._start = asyncio.run(self._read())

    def stop(self) -> None:
        xacts, now = asyncio.run(self._read())
        self.xacts = xacts - self._xacts
        zero = (0, 0, 0)
        self.tables = {
            t: (v[0] - self._start.get(t, zero)[0], v[1] - self._start.get(t, zero)[1],
                v[2] - self._start.get(t, zero)[2])
            for t, v in now.items()
        }  # fmt: skip

    def per(self, count: float) -> str:
        """Per disbursement: transactions, then the busiest tables."""
        c = max(count, 1)
        busy = sorted(self.tables.items(), key=lambda kv: -(kv[1][0] + kv[1][1] + kv[1][2]))
        parts = [
            f"{t} {w / c:.1f} written, {r / c:.0f} seq-read, {i / c:.1f} index scans"
            for t, (w, r, i) in busy[:8]
            if w or r or i
        ]
        return f"{self.xacts / c:.1f} transactions; " + "; ".join(parts)


@dataclass
class Measured:
    result: dict[str, Any]
    cpu: CpuMeter
    waits: WaitSampler
    stats: PgStats | None = None


def loadgen(
    args: Sequence[str],
    *,
    groups: dict[str, Callable[[], float]],
    database_url: str | None,
    on_start: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> Measured:
    """Run `python -m bench.loadgen ARGS` as a separate process; CPU of `groups` (plus the
    load generator itself and the whole machine) and PostgreSQL's wait events are taken
    between its `start` and `stop` markers, where `on_start` and `on_stop` are also called;
    returns its final JSON line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", *args],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    meter = CpuMeter({**groups, "loadgen": lambda: cpu_seconds([proc.pid])})
    sampler = WaitSampler(database_url) if database_url else WaitSampler("")
    stats = PgStats(database_url) if database_url else None
    result: dict[str, Any] | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        msg = json.loads(line)
        if msg.get("event") == "start":
            meter.start()
            if stats is not None:
                stats.start()
            if database_url:
                sampler.start()
            if on_start is not None:
                on_start()
        elif msg.get("event") == "stop":
            meter.stop()
            if database_url:
                sampler.stop()
            if stats is not None:
                stats.stop()
            if on_stop is not None:
                on_stop()
        else:
            result = msg
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
    return Measured(result, meter, sampler, stats)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


# ------------------------------------------------------------------------------ profiling

# where a gateway's samples go, by the first matching frame (in this order)
STAGES = [
    ("intake", "create_disbursement"),
    ("bank callbacks", "bank_callback"),
    ("notifier (webhooks)", "Notifier."),
    ("dispatcher (bank calls)", "Dispatcher."),
    ("poller", "Poller."),
    ("sealer", "run_sealer"),
]
# cross-cutting costs: a sample counts if any frame's file matches
LAYERS = [
    ("httpx/httpcore (bank calls, webhooks)", ("(httpx/", "(httpcore/")),
    ("asyncpg", ("(asyncpg/",)),
    ("failed imports (`import sniffio` per request)", ("_find_and_load",)),
    ("structlog", ("(structlog/",)),
    ("pydantic", ("(pydantic/", "(pydantic_core/")),
]


class Profile:
    """`py-spy record` of one process over the measured window, summarised by stage."""

    def __init__(self, pid: int, seconds: float, out: Path) -> None:
        self.pid, self.seconds, self.out = pid, seconds, out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        spy = Path(sys.executable).with_name("py-spy")
        exe = str(spy) if spy.exists() else shutil.which("py-spy")
        if exe is None:
            print("py-spy not found: no profile", file=sys.stderr)
            return
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(self.pid), "-d", str(int(self.seconds)), "-r", "100",
             "-f", "raw", "-o", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.wait(timeout=60)

    def summary(self) -> list[tuple[str, float]]:
        stages: Counter[str] = Counter()
        layers: Counter[str] = Counter()
        total = 0
        if self.proc is None or not self.out.exists():
            return []
        for line in self.out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack:
                continue
            total += int(n)
            stage = next((name for name, key in STAGES if key in stack), "event loop, other")
            stages[stage] += int(n)
            for name, keys in LAYERS:
                if any(k in stack for k in keys):
                    layers[name] += int(n)
        t = max(total, 1)
        return [(k, v / t) for k, v in stages.most_common()] + [
            (f"of all: {k}", v / t) for k, v in layers.most_common()
        ]
