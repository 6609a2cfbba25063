"""Every fault option of `fundgate sandbox-bank`, against every protocol's simulated bank: a
fault the operator asks for is either played or refused, never silently left out."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest

from connectors.base import BankStatus
from gateway.cli import build_parser, main, other_bank_options
from gateway.demo import _iso_config
from tests.connectors.conformance import (
    HARNESSES,
    CallbackInbox,
    Faults,
    Harness,
    connected,
    each,
    eventually,
    order,
)

OTHER_PROTOCOLS = ["signed_json", "iso20022"]
# long enough to tell from a loopback round trip, short enough for the suite
DELAY_MS = 300
# how long a callback that should not come is waited for (settling takes 10 ms)
QUIET_SECONDS = 0.3


@each
@pytest.mark.asyncio
async def test_fail_fault_accepts_then_fails_without_moving_money(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client, Faults(fail_rate=1.0)) as (bank, connector):
        async with CallbackInbox() as inbox:
            o = order(11, inbox.url)
            accepted = await connector.disburse(o)
            assert accepted.status in (BankStatus.ACCEPTED, BankStatus.PROCESSING)
            event = connector.parse_callback(*await inbox.next())
            assert (event.order_no, event.status) == (o.order_no, BankStatus.FAILED)
            assert (await connector.query(o.order_no)).status is BankStatus.FAILED
            assert bank.executions(o.order_no) == 0


@each
@pytest.mark.asyncio
async def test_callback_loss_fault_executes_but_sends_no_callback(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client, Faults(callback_loss_rate=1.0)) as (bank, connector):
        async with CallbackInbox() as inbox:
            o = order(12, inbox.url)
            await connector.disburse(o)
            await eventually(lambda: bank.executions(o.order_no) == 1)
            with pytest.raises(TimeoutError):
                await inbox.next(timeout=QUIET_SECONDS)
            assert (await connector.query(o.order_no)).status is BankStatus.SUCCEEDED


@each
@pytest.mark.asyncio
async def test_callback_duplicate_fault_sends_two_valid_callbacks_for_one_execution(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client, Faults(callback_duplicate_rate=1.0)) as (bank, connector):
        async with CallbackInbox() as inbox:
            o = order(13, inbox.url)
            await connector.disburse(o)
            for _ in range(2):
                event = connector.parse_callback(*await inbox.next())
                assert (event.order_no, event.status) == (o.order_no, BankStatus.SUCCEEDED)
            with pytest.raises(TimeoutError):
                await inbox.next(timeout=QUIET_SECONDS)
            assert bank.executions(o.order_no) == 1


@each
@pytest.mark.asyncio
async def test_callback_delay_fault_holds_the_callback_back_after_execution(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client, Faults(callback_delay_ms=DELAY_MS)) as (bank, connector):
        async with CallbackInbox() as inbox:
            o = order(14, inbox.url)
            await connector.disburse(o)
            await eventually(lambda: bank.executions(o.order_no) == 1)
            executed = time.monotonic()
            event = connector.parse_callback(*await inbox.next())
            assert event.status is BankStatus.SUCCEEDED
            assert time.monotonic() - executed >= DELAY_MS / 1000 * 0.8


@each
@pytest.mark.asyncio
async def test_latency_fault_delays_every_answer(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    async with connected(harness, client, Faults(latency_ms=DELAY_MS)) as (_, connector):
        o = order(15)
        started = time.monotonic()
        await connector.disburse(o)
        assert time.monotonic() - started >= DELAY_MS / 1000
        started = time.monotonic()
        await connector.query(o.order_no)
        assert time.monotonic() - started >= DELAY_MS / 1000


# --- the command line ------------------------------------------------------------------------


def sandbox_bank_args(protocol: str, *extra: str) -> list[str]:
    return [
        "sandbox-bank", f"--protocol={protocol}", "--port=0", "--funder-id=bank-c",
        "--callback-url=http://127.0.0.1:8700/v1/callbacks/bank-c", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("protocol", OTHER_PROTOCOLS)
def test_command_line_hands_every_fault_option_to_the_bank_of_the_protocol(
    protocol: str,
) -> None:
    args = build_parser().parse_args(
        sandbox_bank_args(
            protocol,
            "--seed=7",
            "--reject-rate=0.1",
            "--error-rate=0.2",
            "--timeout-rate=0.3",
            "--fail-rate=0.4",
            "--callback-loss-rate=0.5",
            "--callback-duplicate-rate=0.6",
            "--callback-delay-ms=70",
            "--latency-ms=80",
            "--settle-ms=90",
            "--callback-attempts=2",
        )
    )
    opts = other_bank_options(args, HARNESSES[protocol].funder("http://127.0.0.1:8801"))
    assert {k: getattr(opts, k) for k in (*asdict(Faults()), "seed", "settle_ms")} == {
        "reject_rate": 0.1,
        "error_rate": 0.2,
        "timeout_rate": 0.3,
        "fail_rate": 0.4,
        "callback_loss_rate": 0.5,
        "callback_duplicate_rate": 0.6,
        "callback_delay_ms": 70,
        "latency_ms": 80,
        "seed": 7,
        "settle_ms": 90,
    }
    assert opts.callback_attempts == 2


@pytest.mark.parametrize("protocol", OTHER_PROTOCOLS)
def test_command_line_refuses_a_secret_the_funder_does_not_sign_with(protocol: str) -> None:
    funder = HARNESSES[protocol].funder("http://127.0.0.1:8801")
    options = funder.connector_options
    configured = options.get("secret") or options["signing"]["secret"]
    for given in ([], [f"--secret={configured}"]):
        other_bank_options(build_parser().parse_args(sandbox_bank_args(protocol, *given)), funder)
    wrong = build_parser().parse_args(sandbox_bank_args(protocol, "--secret=not-the-secret"))
    with pytest.raises(ValueError, match="--secret does not apply"):
        other_bank_options(wrong, funder)


def test_sandbox_protocol_still_defaults_its_own_secret() -> None:
    from connectors.sandbox.bank import DEFAULT_SECRET, options_from_args

    args = build_parser().parse_args(sandbox_bank_args("sandbox"))
    assert options_from_args(args).secret == DEFAULT_SECRET


def test_sandbox_bank_command_exits_2_naming_a_secret_it_would_ignore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = Path(__file__).parents[2] / "config" / "default.toml"
    config = tmp_path / "iso.toml"
    config.write_text(_iso_config(default.read_text(encoding="utf-8")), encoding="utf-8")
    monkeypatch.setenv("FUNDGATE_CONFIG", str(config))
    argv = [
        "sandbox-bank", "--protocol=iso20022", "--port=0", "--funder-id=bank-a",
        "--callback-url=http://127.0.0.1:8700/v1/callbacks/bank-a", "--secret=not-the-secret",
    ]  # fmt: skip
    assert main(argv) == 2
    assert "--secret does not apply to --protocol iso20022" in capsys.readouterr().err
