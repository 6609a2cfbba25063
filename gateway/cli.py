"""`fundgate` command line: serve, sandbox-bank, demo, migrate, config check."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from aiohttp import web

from config.loader import ConfigError, Settings, load_config
from config.models import FileConfig, Funder
from gateway.logging import configure_logging

if TYPE_CHECKING:
    from connectors.iso20022.sandbox import IsoBankOptions
    from connectors.signed_json.sandbox import SignedJsonBankOptions

log = structlog.get_logger("fundgate.cli")

# the default config's well-known token must never face a network
DEMO_TOKEN_SHA256 = hashlib.sha256(b"demo-token").hexdigest()


def _print_errors(source: str, errors: list[str]) -> None:
    print(f"config error in {source}:", file=sys.stderr)  # noqa: T201
    for err in errors:
        print(f"  - {err}", file=sys.stderr)  # noqa: T201


def _load(settings: Settings, path: Path | None = None) -> FileConfig:
    try:
        return load_config(path or settings.config_path)
    except ConfigError as e:
        _print_errors(e.source, e.errors)
        raise SystemExit(2) from e


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(str(info[4][0])).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


async def _run_until_signal(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serve.listening", host=host, port=port)
    try:
        await stop.wait()
        log.info("serve.stopping")
    finally:
        await runner.cleanup()
        log.info("serve.stopped")


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (libuv: cheaper socket I/O per request) when installed, unless
    FUNDGATE_EVENT_LOOP=asyncio; None means asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.store.db import database_url

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    cfg = _load(settings)
    if cfg.security.uses_dev_keys:
        log.warning(
            "security.dev_keys",
            message="personal data is encrypted with the built-in development keys; "
            "set [security] data_keys and blind_index_key as env: secrets",
        )
    if not _is_loopback(args.host) and any(
        c.token_sha256 == DEMO_TOKEN_SHA256 for c in cfg.clients
    ):
        print(  # noqa: T201
            "refusing to bind a non-loopback address while the demo token is configured",
            file=sys.stderr,
        )
        return 2

    async def main() -> None:
        async with database_url(settings) as url:
            app = create_app(cfg, database_url=url, role=args.role, pool_size=args.pool_size)
            await _run_until_signal(app, args.host, args.port)

    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        runner.run(main())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from gateway.store import db

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)

    async def main() -> None:
        async with db.database_url(settings) as url:
            pool = await db.create_pool(url, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn:
                    applied = await db.migrate(conn)
            finally:
                await pool.close()
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "none (up to date)"
        print(f"migrations applied: {names}")  # noqa: T201

    asyncio.run(main())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from connectors.registry import check_options

    settings = Settings()
    path = Path(args.path) if args.path else settings.config_path
    try:
        cfg = load_config(path)
    except ConfigError as e:
        # a funder valid by itself still has its options checked: every error at once
        _print_errors(e.source, e.errors + asyncio.run(check_options(e.funders)))
        return 2
    errors = asyncio.run(check_options(enumerate(cfg.funders)))
    if errors:
        _print_errors(str(path), errors)
        return 2
    print(  # noqa: T201
        f"{path}: ok ({len(cfg.funders)} funders, {len(cfg.products)} products, "
        f"{len(cfg.clients)} clients)"
    )
    return 0


def cmd_sandbox_bank(args: argparse.Namespace) -> int:
    from connectors.sandbox.bank import options_from_args, run_bank

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    if args.protocol != "sandbox":
        return _other_sandbox_bank(args, settings)
    try:
        opts = options_from_args(args)
    except ValueError as e:
        print(f"sandbox-bank: {e}", file=sys.stderr)  # noqa: T201
        return 2
    asyncio.run(run_bank(opts, host=args.host, port=args.port))
    return 0


def _other_sandbox_bank(args: argparse.Namespace, settings: Settings) -> int:
    """A simulated bank speaking `signed_json` or `iso20022`, described by the funder's own
    `connector_options` in FUNDGATE_CONFIG (paths, mappings, secrets)."""
    cfg = _load(settings)
    funder = cfg.funder(args.funder_id)
    if funder is None or funder.connector != args.protocol:
        print(  # noqa: T201
            f"sandbox-bank: no funder {args.funder_id!r} with connector {args.protocol!r} "
            f"in {settings.config_path}",
            file=sys.stderr,
        )
        return 2
    try:
        opts = other_bank_options(args, funder)
    except ValueError as e:
        print(f"sandbox-bank: {e}", file=sys.stderr)  # noqa: T201
        return 2
    stop = asyncio.Event()

    async def serve(runner: Any) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await runner

    from connectors.iso20022 import sandbox as iso_bank
    from connectors.signed_json import sandbox as sj_bank

    try:
        if isinstance(opts, iso_bank.IsoBankOptions):
            asyncio.run(serve(iso_bank.run_bank(opts, host=args.host, port=args.port,
                                                stop=stop)))  # fmt: skip
        else:
            asyncio.run(serve(sj_bank.run_bank(opts, host=args.host, port=args.port,
                                               stop=stop)))  # fmt: skip
    except ValueError as e:  # e.g. RSA signing without the bank's keys
        print(f"sandbox-bank: {e}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


def other_bank_options(
    args: argparse.Namespace, funder: Funder
) -> IsoBankOptions | SignedJsonBankOptions:
    """The `IsoBankOptions` or `SignedJsonBankOptions` of `fundgate sandbox-bank --protocol
    iso20022|signed_json`: the funder's wire description with every fault option of the
    command line. `ValueError` when an option cannot apply (a `--secret` other than the one
    the funder's connector_options sign with)."""
    from connectors.sandbox.bank import fault_options

    faults: dict[str, Any] = {
        "callback_url": args.callback_url,
        "seed": args.seed or 0,
        **fault_options(args),
    }
    if args.protocol == "iso20022":
        from connectors.iso20022 import sandbox as iso_bank
        from connectors.iso20022.wire import parse_options as iso_options

        o = iso_options(funder.connector_options)
        _same_secret(args, o.secret.get_secret_value())
        return iso_bank.IsoBankOptions(
            secret=o.secret.get_secret_value(), upload_path=o.upload_path,
            status_path=o.status_path, statement_path=o.statement_path, **faults,
        )  # fmt: skip
    from connectors.signed_json import sandbox as sj_bank
    from connectors.signed_json.wire import parse_options as sj_options

    w = sj_options(funder.connector_options)
    _same_secret(args, w.signing.secret.get_secret_value() if w.signing.secret else None)
    return sj_bank.SignedJsonBankOptions(wire=w, statement=funder.statement, **faults)


def _same_secret(args: argparse.Namespace, configured: str | None) -> None:
    # these banks sign with the funder's connector_options; a different --secret would be
    # silently ignored, so it is refused
    if args.secret is not None and args.secret != configured:
        raise ValueError(
            f"--secret does not apply to --protocol {args.protocol}: the bank signs with "
            f"funder {args.funder_id!r}'s connector_options, and they differ"
        )


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from gateway.store import db
    from gateway.store import queries as q
    from gateway.vouchers import verify

    settings = Settings()
    configure_logging(settings.log_format, "warning")
    console = Console(stderr=True)
    key: str | None = None
    if args.checkpoints:
        key = args.public_key or _load(settings).security.checkpoint_public_key

    async def main() -> int:
        async with db.database_url(settings) as url:
            pool = await db.create_pool(url, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn:
                    total = await conn.fetchval(
                        "SELECT count(*) FROM voucher_events WHERE seq IS NOT NULL"
                    )
                    with Progress(
                        TextColumn("verifying vouchers"), BarColumn(), MofNCompleteColumn(),
                        console=console, transient=True,
                    ) as progress:  # fmt: skip
                        task = progress.add_task("verify", total=total)
                        result = await verify(
                            conn,
                            progress=lambda n: progress.advance(task, n),
                            checkpoint_key=key,
                        )
                    await q.record_verification(
                        conn, result.ok, result.checked, result.first_broken, result.problem
                    )
            finally:
                await pool.close()
        if result.ok:
            print(  # noqa: T201
                f"voucher chain intact: {result.checked} sealed vouchers verified, "
                f"{result.unsealed} not yet sealed"
                + (f", {result.checkpoints} signed checkpoints hold" if key else "")
            )
            return 0
        print(f"voucher chain broken at seq {result.first_broken}: {result.problem}")  # noqa: T201
        return 1

    return asyncio.run(main())


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from gateway import ledger
    from gateway.store import db

    settings = Settings()
    configure_logging(settings.log_format, "warning")

    async def main() -> int:
        async with db.database_url(settings) as url:
            conn = await asyncpg.connect(url)
            try:
                check = await ledger.verify(conn)
            finally:
                await conn.close()
        if check.ok:
            print(f"ledger consistent: {check.transactions} transactions balance")  # noqa: T201
            return 0
        for p in check.problems:
            print(f"ledger problem: {p}")  # noqa: T201
        return 1

    return asyncio.run(main())


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from gateway import pii
    from gateway.crypto import Vault
    from gateway.store import db

    settings = Settings()
    configure_logging(settings.log_format, "warning")
    cfg = _load(settings)
    vault = Vault(cfg.security)

    async def main() -> int:
        async with db.database_url(settings) as url:
            conn = await asyncpg.connect(url)
            try:
                await pii.encrypt_legacy(conn, vault)
                total = await conn.fetchval(
                    "SELECT (SELECT count(*) FROM borrower_accounts)"
                    " + (SELECT count(*) FROM disbursements)"
                )
                with Progress(
                    TextColumn(f"re-encrypting under {vault.active}"), BarColumn(),
                    MofNCompleteColumn(), console=Console(stderr=True), transient=True,
                ) as progress:  # fmt: skip
                    task = progress.add_task("rotate", total=total)
                    changed = await pii.rotate(
                        conn, vault, batch=args.batch,
                        progress=lambda n: progress.advance(task, n),
                    )  # fmt: skip
            finally:
                await conn.close()
        print(f"re-encrypted {changed} rows under key {vault.active}")  # noqa: T201
        return 0

    return asyncio.run(main())


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return int(run_demo(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fundgate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8700)
    s.add_argument("--role", choices=["all", "api", "worker"], default="all")
    s.add_argument("--pool-size", type=int, default=20, help="database connections")
    s.set_defaults(func=cmd_serve)

    from connectors.sandbox.bank import add_arguments

    b = sub.add_parser("sandbox-bank", help="run one simulated bank")
    add_arguments(b)
    b.add_argument(
        "--protocol",
        choices=["sandbox", "signed_json", "iso20022"],
        default="sandbox",
        help="the wire protocol; signed_json/iso20022 take the funder's connector_options "
        "from FUNDGATE_CONFIG",
    )
    b.set_defaults(func=cmd_sandbox_bank)

    d = sub.add_parser("demo", help="run the whole path end to end and print a summary")
    d.add_argument("--count", type=int, default=200)
    d.add_argument("--keep-running", action="store_true")
    d.add_argument(
        "--funders",
        choices=["sandbox", "iso"],
        default="sandbox",
        help="sandbox: the default config's banks; iso: the same funders over ISO 20022",
    )
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("migrate", help="apply database migrations, then exit")
    m.set_defaults(func=cmd_migrate)

    a = sub.add_parser("audit", help="voucher chain tools")
    asub = a.add_subparsers(dest="audit_command", required=True)
    av = asub.add_parser("verify", help="recompute the voucher chain; exit 1 when broken")
    av.add_argument(
        "--checkpoints", action="store_true", help="also check the signed daily chain heads"
    )
    av.add_argument("--public-key", help="base64 Ed25519 public key (default: from the config)")
    av.set_defaults(func=cmd_audit_verify)

    k = sub.add_parser("keys", help="encryption key tools")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kr = ksub.add_parser("rotate", help="re-encrypt personal data under the active key")
    kr.add_argument("--batch", type=int, default=1000)
    kr.set_defaults(func=cmd_keys_rotate)

    lg = sub.add_parser("ledger", help="ledger tools")
    lsub = lg.add_subparsers(dest="ledger_command", required=True)
    lv = lsub.add_parser("verify", help="every transaction balances and matches the records")
    lv.set_defaults(func=cmd_ledger_verify)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a config file")
    cc.add_argument("path", nargs="?")
    cc.set_defaults(func=cmd_config_check)

    from gateway import recon_cli

    recon_cli.add_parsers(sub)  # reconcile, statement parse
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
