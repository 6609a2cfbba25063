"""`fundgate demo`: the whole path on this machine, end to end, through the real HTTP API.

Embedded PostgreSQL (unless FUNDGATE_DATABASE_URL is set), the two sandbox banks of the
default config as separate processes, the gateway and a lending-core webhook receiver in this
process; N disbursements go in with a progress bar, the banks call back, and a summary per
funder is checked against the banks' own record of money moved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from aiohttp import web
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config.loader import Settings, load_config
from config.models import FileConfig
from gateway.logging import configure_logging
from gateway.store.embedded import EmbeddedPostgres

Proc = subprocess.Popen[bytes]
TOKEN = "demo-token"  # the default config's client token (refused off loopback)
# demo banks: a few refusals and lost callbacks, so fail-over and the poller show up too
BANK_FAULTS = {
    "bank-a": ["--reject-rate", "0.03", "--callback-loss-rate", "0.05"],
    "bank-b": ["--callback-duplicate-rate", "0.10", "--callback-loss-rate", "0.05"],
}
FAST_DISPATCH = {
    "query_backoff_seconds": [1.0, 2.0, 5.0, 10.0],
    "poll_interval_seconds": 0.2,
    "not_sent_backoff_seconds": 0.5,
    "webhook_backoff_seconds": [0.5, 1.0, 2.0],
}


def _port(url: str) -> int:
    parsed = urlparse(url)
    return parsed.port or 80


class Receiver:
    """The lending core's webhook endpoint: checks every signature, remembers what arrived."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.events: dict[str, set[str]] = defaultdict(set)
        self.bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ts = request.headers.get("X-Fundgate-Timestamp", "")
        sig = request.headers.get("X-Fundgate-Signature", "")
        want = hmac.new(self.secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig):
            self.bad_signatures += 1
            return web.Response(status=401)
        event = json.loads(body)
        self.events[event["txn_no"]].add(event["status"])
        return web.Response(text="ok")


@contextlib.contextmanager
def _banks(
    cfg: FileConfig, gateway_url: str, log_dir: Path, config_path: Path
) -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    env = {**os.environ, "FUNDGATE_CONFIG": str(config_path)}
    try:
        for i, f in enumerate(cfg.funders):
            opts = f.connector_options
            cmd = [
                sys.executable, "-m", "gateway.cli", "sandbox-bank",
                "--protocol", f.connector,
                "--port", str(_port(str(opts["base_url"]))),
                "--funder-id", f.id,
                "--callback-url", f"{gateway_url}/v1/callbacks/{f.id}",
                "--secret", str(opts["secret"]),
                "--seed", str(1000 + i),
                *BANK_FAULTS.get(f.id, []),
            ]  # fmt: skip
            log = open(log_dir / f"{f.id}.log", "wb")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def _wait_up(client: httpx.AsyncClient, urls: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


def _request(run: str, i: int, rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    account = {
        "account_no": f"62220202{rng.randrange(10**10, 10**11)}",
        "account_name": rng.choice(["张三", "李四", "王五", "赵六", "欧阳娜娜"]),
        "bank_code": rng.choice(["ICBC", "CCB", "ABC", "BOC", "CMB"]),
    }
    months = rng.choice([3, 6, 12, 24, 36])
    body = {
        "txn_no": f"DEMO{run}{i:05d}",
        "loan_id": f"L{run}{i:05d}",
        "borrower_id": f"B{run}{i:05d}",
        "payee": account,
        "amount": rng.randrange(300_000, 5_000_001),  # 3,000 – 50,000 CNY in fen
        "currency": "CNY",
        "term": {"unit": "month", "count": months},
        "apr": rng.choice(["0.0720", "0.1200", "0.1800", "0.2399"]),
        "product": "consumer-standard",
        "repayment": "interest_first"
        if months <= 12 and rng.random() < 0.3
        else "equal_installment",
        "funder_hint": "bank-b" if rng.random() < 0.4 else None,
        "metadata": {"channel": "demo"},
    }
    return account, body


async def _drive(cfg: FileConfig, count: int, console: Console, receiver: Receiver) -> int:
    gw = cfg.gateway.public_url.rstrip("/")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    run = time.strftime("%H%M%S")
    rng = random.Random(42)
    statuses: dict[str, dict[str, Any]] = {}
    refused: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=gw, headers=headers, timeout=30) as client:
        sem = asyncio.Semaphore(16)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )

        async def one(i: int) -> None:
            account, body = _request(run, i, rng)
            async with sem:
                r = await client.put(f"/v1/borrowers/{body['borrower_id']}/accounts", json=account)
                r.raise_for_status()
                r = await client.post("/v1/disbursements", json=body)
            if r.status_code == 201:
                statuses[body["txn_no"]] = r.json()
            else:
                refused[r.json()["error"]["code"]] += 1
            progress.advance(submit_task)

        with progress:
            submit_task = progress.add_task("submitting", total=count)
            await asyncio.gather(*(one(i) for i in range(count)))
            settle = progress.add_task("settling", total=len(statuses))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                page = await client.get("/v1/disbursements", params={"limit": 500})
                items = [d for d in page.json()["items"] if d["txn_no"] in statuses]
                for d in items:
                    statuses[d["txn_no"]] = d
                done = sum(1 for d in statuses.values() if d["status"] in ("succeeded", "failed"))
                progress.update(settle, completed=done)
                delivered = sum(
                    1 for t, d in statuses.items() if d["status"] in receiver.events.get(t, set())
                )
                if done == len(statuses) and delivered == done:
                    break
                await asyncio.sleep(0.5)
        funders = (await client.get("/v1/funders")).json()
        oracle: dict[str, list[dict[str, Any]]] = {}
        for f in cfg.funders:
            base = str(f.connector_options["base_url"])
            oracle[f.id] = (await client.get(f"{base}/_sandbox/payouts")).json()
    return _report(console, cfg, statuses, refused, funders, oracle, receiver)


def _report(
    console: Console,
    cfg: FileConfig,
    statuses: dict[str, dict[str, Any]],
    refused: Counter[str],
    funders: dict[str, Any],
    oracle: dict[str, list[dict[str, Any]]],
    receiver: Receiver,
) -> int:
    usage = {f["id"]: f for f in funders["items"]}
    table = Table(title="fundgate demo: disbursements per funder")
    for col in ("funder", "mode", "count", "amount ¥", "succeeded", "failed", "open",
                "paid at bank", "limit used ¥", "prefund ¥"):  # fmt: skip
        table.add_column(col, justify="right" if col != "funder" else "left")
    problems: list[str] = []
    for f in cfg.funders:
        mine = [d for d in statuses.values() if d["funder_id"] == f.id]
        ok = [d for d in mine if d["status"] == "succeeded"]
        failed = [d for d in mine if d["status"] == "failed"]
        executed = {p["order_no"] for p in oracle[f.id] if p["executions"] > 0}
        twice = [p["order_no"] for p in oracle[f.id] if p["executions"] > 1]
        ours = {a["order_no"] for d in ok for a in d["attempts"] if a["status"] == "succeeded"}
        if twice:
            problems.append(f"{f.id}: orders executed twice: {twice[:5]}")
        if executed != ours:
            problems.append(f"{f.id}: bank paid {len(executed)} orders, fundgate says {len(ours)}")
        u = usage[f.id]
        table.add_row(
            f.id,
            f.mode,
            str(len(mine)),
            f"{sum(d['amount'] for d in mine) // 100:,}",
            str(len(ok)),
            str(len(failed)),
            str(len(mine) - len(ok) - len(failed)),
            str(len(executed)),
            f"{u['used_today'] // 100:,} of {u['daily_limit'] // 100:,}",
            "-" if u["prefund_balance"] is None else f"{u['prefund_balance'] // 100:,}",
        )
    console.print(table)
    terminal = [d for d in statuses.values() if d["status"] in ("succeeded", "failed")]
    rerouted = sum(1 for d in statuses.values() if len(d["attempts"]) > 1)
    webhooks = sum(1 for t, d in statuses.items() if d["status"] in receiver.events.get(t, set()))
    console.print(
        f"accepted {len(statuses)}, terminal {len(terminal)}, re-routed after a bank refusal "
        f"{rerouted}, refused at intake {dict(refused) or 0}, outcome webhooks {webhooks}"
    )
    if len(terminal) != len(statuses):
        problems.append(f"{len(statuses) - len(terminal)} disbursements are not terminal")
    if webhooks != len(terminal):
        problems.append(f"{len(terminal) - webhooks} outcome webhooks missing")
    if receiver.bad_signatures:
        problems.append(f"{receiver.bad_signatures} webhooks with a bad signature")
    for p in problems:
        console.print(f"[red]problem:[/red] {p}")
    if not problems:
        console.print("[green]every accepted disbursement is terminal, each paid at most once[/]")
    return 1 if problems else 0


async def _verify_vouchers(url: str, console: Console) -> int:
    import asyncpg

    from gateway.vouchers import verify

    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + 10
        while await conn.fetchval("SELECT count(*) FROM voucher_events WHERE seq IS NULL"):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        result = await verify(conn)
    finally:
        await conn.close()
    if result.ok:
        console.print(f"voucher chain intact: {result.checked} vouchers verified")
        return 0
    console.print(f"[red]voucher chain broken at seq {result.first_broken}: {result.problem}[/]")
    return 1


async def _main(args: argparse.Namespace, cfg: FileConfig, url: str, console: Console) -> int:
    from gateway.app import create_app

    assert cfg.lending_core is not None
    receiver = Receiver(cfg.lending_core.webhook_secret.get_secret_value())
    hook = web.Application()
    hook.router.add_post(urlparse(cfg.lending_core.webhook_url).path or "/", receiver.handle)
    hook_runner = web.AppRunner(hook, access_log=None)
    await hook_runner.setup()
    await web.TCPSite(hook_runner, "127.0.0.1", _port(cfg.lending_core.webhook_url)).start()

    app = create_app(cfg, database_url=url)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", _port(cfg.gateway.public_url)).start()
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            await _wait_up(
                client,
                [f"{cfg.gateway.public_url}/readyz"]
                + [f"{f.connector_options['base_url']}/_sandbox/payouts" for f in cfg.funders],
            )
        code = await _drive(cfg, args.count, console, receiver)
        from gateway.api import SERVICES
        from gateway.recon_cli import demo_reconcile

        code = max(code, await demo_reconcile(app[SERVICES], console))  # today, both banks
        code = max(code, await _verify_vouchers(url, console))
        if args.keep_running:
            console.print(f"gateway at {cfg.gateway.public_url}, token {TOKEN!r}; Ctrl-C stops")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return code
    finally:
        await runner.cleanup()
        await hook_runner.cleanup()


def _iso_config(text: str) -> str:
    """The config with every sandbox funder switched to the iso20022 connector, batching up
    to 10 orders per pain.001."""
    text = text.replace('connector = "sandbox"', 'connector = "iso20022"')
    return re.sub(
        r'(\[funders\.connector_options\]\nbase_url = "[^"]*"\nsecret = "[^"]*"\n)',
        r'\1debtor_name = "Fundgate Platform"\ndebtor_account = "CN0000000000000000001"\n'
        r'debtor_agent_bic = "ICBKCNBJ"\nbatch_size = 10\n',
        text,
    )


def run_demo(args: argparse.Namespace) -> int:
    settings = Settings()
    console = Console(width=None if sys.stdout.isatty() else 132)
    work = Path(tempfile.mkdtemp(prefix="fundgate-demo-"))
    configure_logging(settings.log_format, "warning", stream=open(work / "gateway.log", "w"))
    config_path = settings.config_path
    if args.funders == "iso":
        # the same funders, speaking ISO 20022 (pain.001 / pain.002 / camt.053) to their banks
        config_path = work / "iso.toml"
        config_path.write_text(_iso_config(settings.config_path.read_text(encoding="utf-8")))
    base = load_config(config_path)
    cfg = base.model_copy(update={"dispatch": base.dispatch.model_copy(update=FAST_DISPATCH)})
    console.print(f"[bold]fundgate demo[/bold]: {args.count} disbursements; logs in {work}")
    embedded: EmbeddedPostgres | None = None
    try:
        if settings.database_url is not None:
            url = settings.database_url.get_secret_value()
        else:
            # a database of its own, so every demo starts from zero usage and leaves nothing
            embedded = EmbeddedPostgres(work / "db", durable=False)
            with console.status("starting embedded PostgreSQL"):
                url = embedded.start()
        with _banks(cfg, cfg.gateway.public_url.rstrip("/"), work, config_path):
            return asyncio.run(_main(args, cfg, url, console))
    finally:
        if embedded is not None:
            embedded.stop()
        if os.environ.get("FUNDGATE_DEMO_KEEP_LOGS") is None:
            shutil.rmtree(work / "db", ignore_errors=True)
