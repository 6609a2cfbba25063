"""`fundgate reconcile` and `fundgate statement parse`: reconciliation by hand.

fundgate reconcile --date YYYY-MM-DD [--funder ID] [--format text|json] [--fail-on-breaks]
    reconcile one business day (every funder, or one), with a progress bar, and print the
    report: counts and amounts per type, and the breaks. Exit 0; 1 with --fail-on-breaks
    when unresolved breaks remain; 2 when a run failed (its reason names the line) or the
    arguments are wrong.

fundgate statement parse FILE --format sandbox-csv|csv|camt053 [--funder ID]
    the statement's normalised lines as JSON lines, in file order; a bad file exits 1
    with the line number on stderr. `--funder` takes that funder's `[funders.statement]`
    mapping (column names, encoding, status words, summary row, time zone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

from config.loader import Settings
from config.models import FileConfig, StatementConfig

EXIT_BREAKS = 1
EXIT_FAILED = 2
BREAKS_SHOWN = 50  # rows of the breaks table in text mode; JSON lists them all


def add_parsers(sub: Any) -> None:
    """Register `reconcile` and `statement` on the `fundgate` sub-command parser."""
    r = sub.add_parser("reconcile", help="reconcile one business day and print the report")
    r.add_argument("--date", required=True, help="business day, YYYY-MM-DD")
    r.add_argument("--funder", help="one funder id (default: every funder)")
    r.add_argument("--format", choices=["text", "json"], default="text")
    r.add_argument(
        "--fail-on-breaks", action="store_true", help="exit 1 when unresolved breaks remain"
    )
    r.set_defaults(func=cmd_reconcile)

    s = sub.add_parser("statement", help="statement tools")
    ssub = s.add_subparsers(dest="statement_command", required=True)
    p = ssub.add_parser("parse", help="print a statement file's normalised lines as JSON lines")
    p.add_argument("file")
    p.add_argument("--format", choices=["sandbox-csv", "csv", "camt053"], required=True)
    p.add_argument("--funder", help="read the file with this funder's [funders.statement]")
    p.set_defaults(func=cmd_statement_parse)


def _err(text: str) -> None:
    print(text, file=sys.stderr)  # noqa: T201


def _config(settings: Settings) -> FileConfig:
    from gateway.cli import _load

    return _load(settings)


# ---------------------------------------------------------------- statement parse


def _line_json(line: Any) -> str:
    return json.dumps(
        {
            "order_no": line.order_no,
            "bank_ref": line.bank_ref,
            "amount": line.amount,
            "status": line.status,
            "booked_at": None if line.booked_at is None else line.booked_at.isoformat(),
        },
        ensure_ascii=False,
    )


def cmd_statement_parse(args: argparse.Namespace) -> int:
    from reconciliation.errors import StatementError
    from reconciliation.parsers import parse, without_duplicates

    cfg = StatementConfig()
    if args.funder:
        funder = _config(Settings()).funder(args.funder)
        if funder is None:
            _err(f"statement parse: unknown funder {args.funder!r}")
            return EXIT_FAILED
        cfg = funder.statement
    path = Path(args.file)
    try:
        handle = path.open("rb")
    except OSError as e:
        _err(f"statement parse: cannot read {path}: {e.strerror}")
        return EXIT_FAILED
    out = sys.stdout
    try:
        with handle:
            for _, line in without_duplicates(parse(handle, args.format, cfg)):
                out.write(_line_json(line) + "\n")
    except StatementError as e:
        out.flush()
        _err(f"{path}: {e}")
        return 1
    return 0


# ---------------------------------------------------------------- reconcile


def cmd_reconcile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gateway.logging import configure_logging

    try:
        day = date.fromisoformat(args.date)
    except ValueError:
        _err(f"reconcile: --date must be YYYY-MM-DD, got {args.date!r}")
        return EXIT_FAILED
    settings = Settings()
    configure_logging(settings.log_format, "warning", stream=sys.stderr)
    cfg = _config(settings)
    funders = [f.id for f in cfg.funders]
    if args.funder:
        if cfg.funder(args.funder) is None:
            _err(f"reconcile: unknown funder {args.funder!r} (known: {', '.join(funders)})")
            return EXIT_FAILED
        funders = [args.funder]
    console = Console(stderr=args.format == "json")
    reports = asyncio.run(_reconcile(settings, cfg, day, funders, console))
    if args.format == "json":
        print(json.dumps({"date": day.isoformat(), "runs": reports}, ensure_ascii=False))  # noqa: T201
    else:
        for report in reports:
            print_report(console, report)
    if any(r["status"] != "succeeded" for r in reports):
        return EXIT_FAILED
    if args.fail_on_breaks and any(r["open_breaks"] for r in reports):
        return EXIT_BREAKS
    return 0


async def _reconcile(
    settings: Settings, cfg: FileConfig, day: date, funders: list[str], console: Any
) -> list[dict[str, Any]]:
    import httpx
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from connectors import registry
    from gateway.context import Services
    from gateway.metrics import Metrics
    from gateway.store import db

    async with db.database_url(settings) as url:
        pool = await db.create_pool(url, min_size=1, max_size=4)
        http = httpx.AsyncClient()
        try:
            async with pool.acquire() as conn:
                await db.migrate(conn)
            svc = Services(
                cfg=cfg,
                pool=pool,
                connectors=registry.build_all(cfg, http),
                metrics=Metrics(),
                http=http,
            )
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"),
                TextColumn("{task.completed:,} lines"), TimeElapsedColumn(),
                console=console, transient=True,
            ) as progress:  # fmt: skip
                return [await run_one(svc, f, day, progress) for f in funders]
        finally:
            await http.aclose()
            await pool.close()


async def run_one(svc: Any, funder_id: str, day: date, progress: Any = None) -> dict[str, Any]:
    """Reconcile and return the report as plain data (what `--format json` prints)."""
    from gateway.recon_api import break_out, run_out
    from gateway.reconcile import RunInProgress, reconcile_day
    from gateway.store import recon_queries as rq

    task = None
    if progress is not None:
        task = progress.add_task(f"{funder_id} {day}", total=None)

    def advance(lines: int) -> None:
        if progress is not None and task is not None:
            progress.update(task, completed=lines)

    try:
        result = await reconcile_day(svc, funder_id, day, trigger="cli", progress=advance)
    except RunInProgress as e:
        return {"funder_id": funder_id, "date": day.isoformat(), "status": "busy",
                "error": str(e), "open_breaks": 0, "breaks": [], "run": None}  # fmt: skip
    finally:
        if progress is not None and task is not None:
            progress.remove_task(task)
    async with svc.pool.acquire() as conn:
        run = await rq.get_run(conn, result.run_id)
        breaks = await rq.list_breaks(
            conn, run_id=result.run_id, funder_id=None, kind=None, status=None,
            after_id=None, limit=1_000_000,
        )  # fmt: skip
    return {
        "funder_id": funder_id,
        "date": day.isoformat(),
        "status": result.status,
        "error": result.error,
        "seconds": round(result.seconds, 3),
        "open_breaks": result.summary.open,
        "run": run_out(run),
        "breaks": [break_out(b) for b in breaks],
    }


def print_report(console: Any, report: dict[str, Any]) -> None:
    """The text report: one table of counts and amounts per type, one of the breaks."""
    from rich.table import Table

    from reconciliation.classify import BREAK_TYPES, SEVERITY, BreakType
    from reconciliation.report import Summary, yuan

    head = f"[bold]{report['funder_id']}[/bold] {report['date']}"
    if report["status"] != "succeeded":
        console.print(f"{head}: [red]{report['status']}[/red]: {report['error']}")
        return
    run = report["run"]
    s = Summary.from_json(run["summary"])
    console.print(
        f"{head}: run {run['id']} (#{run['runs']}), {s.lines:,} statement lines, "
        f"¥{yuan(s.amount)}, {report.get('seconds', 0)} s"
    )
    table = Table(title=f"reconciliation {report['funder_id']} {report['date']}")
    for col in ("type", "severity", "count", "amount ¥", "auto-resolved"):
        table.add_column(col, justify="left" if col in ("type", "severity") else "right")
    table.add_row("matched", "", f"{s.matched.count:,}", yuan(s.matched.amount), "")
    table.add_row("pending (window)", "", f"{s.pending.count:,}", yuan(s.pending.amount), "")
    for t in BREAK_TYPES:
        b, auto = s.breaks[t], s.auto_resolved[t]
        style = "red" if b.count - auto.count > 0 else None
        table.add_row(
            t, SEVERITY[BreakType(t)], f"{b.count:,}", yuan(b.amount), f"{auto.count:,}",
            style=style,
        )  # fmt: skip
    console.print(table)
    breaks = report["breaks"]
    if not breaks:
        console.print("[green]no breaks[/green]")
        return
    bt = Table(title=f"breaks ({s.open} open)")
    for col in ("id", "type", "status", "order_no", "ours", "bank", "line", "reason"):
        bt.add_column(col)
    for b in breaks[:BREAKS_SHOWN]:
        ours = f"{b['our_status'] or '-'} {yuan(b['our_amount']) if b['our_amount'] else ''}"
        bank = f"{b['bank_status'] or '-'} {yuan(b['bank_amount']) if b['bank_amount'] else ''}"
        bt.add_row(
            str(b["id"]), b["type"], b["status"], b["order_no"], ours.strip(), bank.strip(),
            str(b["line_no"] or ""), b["reason"],
            style="red" if b["status"] == "open" else None,
        )  # fmt: skip
    console.print(bt)
    if len(breaks) > BREAKS_SHOWN:
        console.print(f"… and {len(breaks) - BREAKS_SHOWN} more (use --format json)")


async def demo_reconcile(svc: Any, console: Any) -> int:
    """`fundgate demo`'s last step: reconcile today for every funder and show the reports;
    1 when a run failed or left a break open (the demo's banks and gateway must agree)."""
    day = svc.business_day()
    code = 0
    for f in svc.cfg.funders:
        report = await run_one(svc, f.id, day)
        print_report(console, report)
        if report["status"] != "succeeded" or report["open_breaks"]:
            console.print(f"[red]problem:[/red] reconciliation of {f.id} {day} is not clean")
            code = 1
    return code
