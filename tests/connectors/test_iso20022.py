"""iso20022: pain.001 against its XSD, pain.002 statuses and reasons, camt.053 samples, and bad
input from the bank (XML bombs, truncated XML, HTML, wrong signatures)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree
from structlog.testing import capture_logs

from config.models import Funder
from connectors.base import BankStatus, StatementLine
from connectors.errors import (
    CallbackRejected,
    ConnectorError,
    OutcomeUnknown,
    Rejected,
    StatementError,
)
from connectors.iso20022 import camt053, wire
from connectors.iso20022.connector import IsoConnector
from tests.connectors.conformance import order

DATA = Path(__file__).parent.parent / "data" / "iso20022"
SECRET = "iso-secret"
NOW = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<Document>&lol2;</Document>"""


def options(**changes: Any) -> dict[str, Any]:
    return {
        "base_url": "http://bank.test",
        "secret": SECRET,
        "debtor_name": "Fundgate Platform",
        "debtor_account": "110000000001",
        "debtor_agent_bic": "ICBKCNBJ",
        **changes,
    }


def funder(**changes: Any) -> Funder:
    return Funder(
        id="bank-i",
        name="ISO Bank",
        license="bank",
        mode="direct",
        priority=1,
        products=["consumer-standard"],
        single_max=20_000_000,
        daily_limit=5_000_000_000,
        connector="iso20022",
        connector_options=options(**changes),
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"debtor_agent_bic": "nope"}, "debtor_agent_bic"),
        ({"pain001_version": "05"}, "pain001_version"),
        ({"status_path": "/s"}, "status_path"),
        ({"secret": ""}, "secret"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_options_raise_value_error_naming_the_field(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        wire.parse_options(options(**change))


@pytest.mark.parametrize("version", ["09", "03"])
def test_pain001_is_valid_against_the_official_xsd_in_both_versions(version: str) -> None:
    opts = wire.parse_options(options(pain001_version=version))
    body = wire.pain001(opts, [order(1), order(2)], msg_id="B1", created=NOW)
    root = etree.fromstring(body)
    assert wire.schema(f"pain.001.001.{version}").validate(root)
    msg_id, txs = wire.read_pain001(body)
    assert msg_id == "B1"
    assert [(t.order_no, t.amount) for t in txs] == [("CF1-1", 1_000_001), ("CF2-1", 1_000_002)]


def test_an_order_the_xsd_refuses_is_never_sent() -> None:
    opts = wire.parse_options(options())
    with pytest.raises(wire.WireFormatError, match="XSD"):
        wire.pain001(opts, [order(1)], msg_id="", created=NOW)


@pytest.mark.parametrize(
    ("code", "reason", "status", "pre"),
    [
        ("ACTC", None, BankStatus.ACCEPTED, False),
        ("ACSP", None, BankStatus.PROCESSING, False),
        ("ACSC", None, BankStatus.SUCCEEDED, False),
        ("RJCT", "AC04", BankStatus.FAILED, True),
        ("RJCT", "AM04", BankStatus.FAILED, True),
        ("RJCT", "FOCR", BankStatus.FAILED, False),
        ("XXXX", None, BankStatus.UNKNOWN, False),
    ],
)
def test_pain002_status_and_reason_codes_map_to_our_vocabulary(
    code: str, reason: str | None, status: BankStatus, pre: bool
) -> None:
    assert wire.map_status(code) is status
    assert wire.pre_execution(code, reason) is pre


def test_group_rejection_applies_to_every_transaction() -> None:
    ns = wire.PAIN002
    doc = f"""<Document xmlns="{ns}"><CstmrPmtStsRpt>
      <GrpHdr><MsgId>R1</MsgId><CreDtTm>2026-11-25T10:00:00</CreDtTm></GrpHdr>
      <OrgnlGrpInfAndSts><OrgnlMsgId>B1</OrgnlMsgId><OrgnlMsgNmId>pain.001.001.09</OrgnlMsgNmId>
        <GrpSts>RJCT</GrpSts><StsRsnInf><Rsn><Cd>FF01</Cd></Rsn></StsRsnInf></OrgnlGrpInfAndSts>
      <OrgnlPmtInfAndSts><OrgnlPmtInfId>B1</OrgnlPmtInfId>
        <TxInfAndSts><OrgnlEndToEndId>CF1-1</OrgnlEndToEndId></TxInfAndSts>
      </OrgnlPmtInfAndSts></CstmrPmtStsRpt></Document>""".encode()
    [status] = wire.read_pain002(doc)
    assert (status.order_no, status.code, status.reason) == ("CF1-1", "RJCT", "FF01")
    assert wire.pre_execution(status.code, status.reason)


@pytest.mark.parametrize(
    ("sample", "count"),
    [
        ("camt053.v2.minimal.xml", None),
        ("camt053.v2.multi.statement.xml", None),
        ("camt053.v4.xml", None),
        ("camt053.v8.xml", None),
        ("camt053.v2.five.decimals.xml", None),
    ],
)
def test_public_camt053_samples_stream_into_statement_lines(sample: str, count: None) -> None:
    raw = (DATA / sample).read_bytes()
    chunks = [raw[i : i + 100] for i in range(0, len(raw), 100)]  # any pieces will do
    lines = [line for _, line in camt053.parse_camt053(chunks)]
    assert lines
    assert lines == [line for _, line in camt053.parse_camt053(raw.splitlines(keepends=True))]
    assert all(line.status in ("succeeded", "reversed") for line in lines)
    assert all(line.amount >= 0 for line in lines)


def test_the_invalid_public_sample_is_refused_by_schema_validation() -> None:
    raw = (DATA / "camt053.v2.invalid.xml").read_bytes()
    with pytest.raises(StatementError, match=r"camt\.053"):
        list(camt053.parse_camt053([raw]))


@pytest.mark.parametrize("doc", [BOMB, b"<Document><Ntry><Amt>1</Amt>"])
def test_bombs_and_truncated_statements_are_refused(doc: bytes) -> None:
    with pytest.raises(StatementError):
        list(camt053.parse_camt053([doc[:40], doc[40:]]))


def test_a_declaration_across_two_pieces_of_one_long_line_is_refused() -> None:
    head = b'<?xml version="1.0"?>'
    pad = b" " * (camt053.PIECE_BYTES - 4 - len(head))  # "<!DO" ends the first piece
    doc = head + pad + b'<!DOCTYPE Document SYSTEM "http://127.0.0.1:9/x.dtd"><Document/>\n'
    with pytest.raises(StatementError, match="DOCTYPE") as refused:
        list(camt053.parse_camt053([doc]))
    assert refused.value.line == 1


def test_xml_bomb_is_refused_before_parsing() -> None:
    with pytest.raises(wire.WireFormatError, match="DOCTYPE"):
        wire.parse_xml(BOMB)


# --- connector against recorded answers ---------------------------------------------------


def pain002(code: str, reason: str | None = None, order_no: str = "CF1-1") -> bytes:
    return wire.pain002(
        msg_id="R1",
        original_msg_id="CF1-1",
        statuses=[wire.TxStatus(order_no, code, reason, "ISO1", 1_000_001)],
        created=NOW,
    )


def signed(body: bytes, status: int = 200, *, secret: str = SECRET) -> httpx.Response:
    headers = wire.signed_headers(secret, body, timestamp=str(int(time.time())), nonce="n1")
    return httpx.Response(status, content=body, headers=headers)


async def disburse_with(answer: Callable[[], httpx.Response]) -> Any:
    transport = httpx.MockTransport(lambda _r: answer())
    async with httpx.AsyncClient(transport=transport) as c:
        return await IsoConnector(funder(), c).disburse(order(1))


@pytest.mark.asyncio
async def test_accepted_pain002_is_a_result() -> None:
    result = await disburse_with(lambda: signed(pain002("ACTC")))
    assert (result.status, result.bank_ref) == (BankStatus.ACCEPTED, "ISO1")


@pytest.mark.asyncio
@pytest.mark.parametrize(("reason", "pre"), [("AC04", True), ("FOCR", False)])
async def test_rejected_pain002_is_rejected_with_pre_execution_from_the_reason(
    reason: str, pre: bool
) -> None:
    with pytest.raises(Rejected) as caught:
        await disburse_with(lambda: signed(pain002("RJCT", reason)))
    assert (caught.value.code, caught.value.pre_execution) == (reason, pre)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (lambda: signed(BOMB), "malformed"),
        (lambda: signed(pain002("ACTC")[:-30]), "malformed"),
        (lambda: signed(b"<html><body>maintenance</body></html>"), "malformed"),
        (lambda: signed(pain002("ACTC"), secret="other"), "bad_signature"),
        (lambda: httpx.Response(200, content=pain002("ACTC")), "bad_signature"),
        (lambda: signed(pain002("WHAT")), "unknown_status"),
        (lambda: signed(pain002("ACTC", order_no="OTHER-1")), "malformed"),
        (lambda: httpx.Response(503, text="<html>down</html>"), "server_error"),
    ],
)
async def test_untrustworthy_answers_are_unknown_outcomes(
    answer: Callable[[], httpx.Response], code: str
) -> None:
    with capture_logs() as logs, pytest.raises(OutcomeUnknown) as caught:
        await disburse_with(answer)
    assert caught.value.code == code
    assert logs
    assert len(logs[0]["raw"]) <= wire.RAW_LOG_LIMIT + 1


@pytest.mark.asyncio
async def test_callbacks_are_verified_and_parsed(client: httpx.AsyncClient) -> None:
    connector = IsoConnector(funder(), client)
    ok = signed(pain002("ACSC"))
    event = connector.parse_callback(dict(ok.headers), ok.content)
    assert (event.order_no, event.status, event.amount) == (
        "CF1-1",
        BankStatus.SUCCEEDED,
        1_000_001,
    )
    with pytest.raises(CallbackRejected) as bad:
        connector.parse_callback(dict(ok.headers), ok.content.replace(b"ACSC", b"RJCT"))
    assert bad.value.reason == "bad_signature"
    bomb = signed(BOMB)
    with pytest.raises(CallbackRejected) as malformed:
        connector.parse_callback(dict(bomb.headers), bomb.content)
    assert malformed.value.reason == "malformed"


async def statement_of(
    answer: Callable[[], httpx.Response],
) -> tuple[list[StatementLine], ConnectorError | None]:
    """The lines `fetch_statement` yielded before it stopped, and the error it stopped with."""

    def handler(_r: httpx.Request) -> httpx.Response:
        return answer()

    lines: list[StatementLine] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
        connector = IsoConnector(funder(), c)
        try:
            async for line in connector.fetch_statement(date(2026, 11, 25)):
                lines.append(line)
        except ConnectorError as e:
            return lines, e
    return lines, None


STATEMENT = (DATA / "camt053.v8.xml").read_bytes()


def signed_statement(
    body: bytes = STATEMENT, *, sent: bytes | None = None, secret: str = SECRET, ts: float = 0
) -> httpx.Response:
    """`body` signed as the bank signs a statement; `sent` goes on the wire instead."""
    headers = wire.sign_statement(secret, [body], timestamp=str(int(ts or time.time())), nonce="n1")
    return httpx.Response(200, content=body if sent is None else sent, headers=headers)


@pytest.mark.asyncio
async def test_a_signed_statement_is_read() -> None:
    lines, error = await statement_of(signed_statement)
    assert error is None
    assert lines == [line for _, line in camt053.parse_camt053([STATEMENT])]
    assert lines  # the sample has entries


@pytest.mark.asyncio
async def test_the_download_is_held_to_the_rules_of_a_statement_file() -> None:
    """One reader for both: an entry status the reader does not know refuses the download, at
    its line, as it refuses the file (an unknown word skipped would turn a payout into a
    false `missing_at_bank`), and a document written on one line is read as the same lines."""
    odd = STATEMENT.replace(b"<Cd>BOOK</Cd>", b"<Cd>XXXX</Cd>")
    _, error = await statement_of(lambda: signed_statement(odd))
    assert error is not None
    assert error.code == "malformed_statement"
    with pytest.raises(StatementError) as file_error:
        list(camt053.parse_camt053(odd.splitlines(keepends=True)))
    assert str(file_error.value) in str(error)
    assert "line 110: unknown entry status 'XXXX'" in str(error)  # the entry's line

    at = datetime(2026, 11, 25, 10, tzinfo=wire.BANK_ZONE)
    rendered = b"".join(wire.camt053("S1", ((f"O{i}", f"R{i}", 100 + i, at) for i in range(900))))
    one_line = rendered.replace(b"\n", b" ")  # fed in pieces: no line is held whole
    assert len(one_line) > 3 * camt053.PIECE_BYTES
    lines, error = await statement_of(lambda: signed_statement(one_line))
    assert error is None
    assert [(x.order_no, x.amount) for x in lines] == [(f"O{i}", 100 + i) for i in range(900)]


@pytest.mark.asyncio
async def test_truncated_statement_is_a_connector_error() -> None:
    _, error = await statement_of(lambda: signed_statement(STATEMENT[:-200]))
    assert error is not None
    assert error.code == "malformed_statement"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (lambda: httpx.Response(200, content=STATEMENT), "bad_signature"),
        (lambda: signed_statement(sent=STATEMENT.replace(b"<Amt", b"<Amt ")), "bad_signature"),
        (lambda: signed_statement(secret="someone-else"), "bad_signature"),
        (lambda: signed_statement(ts=time.time() - 3600), "stale"),
        # garbage that would fail parsing is refused for its signature first: never parsed
        (lambda: httpx.Response(200, content=b"\xff\xfe<html>not xml"), "bad_signature"),
    ],
    ids=["unsigned", "tampered", "wrong-key", "stale", "unsigned-garbage"],
)
async def test_an_unsigned_or_tampered_statement_is_refused_before_a_line_is_read(
    answer: Callable[[], httpx.Response], code: str
) -> None:
    with capture_logs() as logs:
        lines, error = await statement_of(answer)
    assert lines == []
    assert error is not None
    assert (error.code, "statement not trusted" in error.message) == (code, True)
    refused = [e for e in logs if e["event"] == "iso20022.statement_refused"]
    assert [e["reason"] for e in refused] == [code]
