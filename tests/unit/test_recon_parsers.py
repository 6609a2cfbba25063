"""Statement parsers: every format read line by line into `StatementLine`s, and every bad input
refused with its line number (truncated, wrong header, summary mismatch, duplicate lines,
non-numeric amounts, unknown status words, XML that fails its schema)."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from config.models import StatementConfig
from connectors.base import StatementLine
from connectors.iso20022 import camt053
from reconciliation.errors import StatementError
from reconciliation.parsers import identity, parse, without_duplicates

DATA = Path(__file__).resolve().parents[1] / "data" / "iso20022"
ZONE = ZoneInfo("Asia/Shanghai")
HEADER = "order_no,bank_ref,amount,status,finished_at\n"


def lines_of(text: str | bytes) -> list[bytes]:
    raw = text.encode() if isinstance(text, str) else text
    return io.BytesIO(raw).readlines()


def read(text: str | bytes, fmt: Any, **cfg: Any) -> list[tuple[int, StatementLine]]:
    return list(parse(lines_of(text), fmt, StatementConfig.model_validate(cfg)))


def refused(text: str | bytes, fmt: Any, **cfg: Any) -> StatementError:
    with pytest.raises(StatementError) as caught:
        read(text, fmt, **cfg)
    return caught.value


# ---------------------------------------------------------------- sandbox CSV


def test_sandbox_csv_lines_come_out_in_file_order_with_their_line_numbers() -> None:
    got = read(
        HEADER
        + "O1,R1,100,SUCCESS,2026-03-10T10:00:00+08:00\n\n"
        + "O2,,250,FAILED,2026-03-10T11:00:00\n"
        + "O3,R3,7,REVERSED,\n",
        "sandbox-csv",
    )
    assert [(n, line.order_no, line.amount, line.status) for n, line in got] == [
        (2, "O1", 100, "succeeded"),
        (4, "O2", 250, "failed"),
        (5, "O3", 7, "reversed"),
    ]
    assert got[1][1].bank_ref is None
    assert got[1][1].booked_at == datetime(2026, 3, 10, 11, tzinfo=ZONE)
    assert got[2][1].booked_at is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            HEADER + "O1,R1,100,SUCCESS,\nO2,R2,1",
            "line 3: truncated: the last line has no line end",
        ),
        (HEADER + "O1,R1,100,SUCCESS,\nO2,R2,100,SUCCESS,", "line 3: truncated"),
        ("order,ref,amount,status,at\nO1,R1,100,SUCCESS,\n", "line 1: header is not"),
        (HEADER + "O1,R1,1O0,SUCCESS,\n", "line 2: invalid literal for int()"),
        (HEADER + "O1,R1,100,PAID,\n", "line 2: unknown statement status 'PAID'"),
        (HEADER + "O1,R1,100\n", "line 2: 3 fields, expected 5"),
        (HEADER + "O1,R1,100,SUCCESS,yesterday\n", "line 2: Invalid isoformat"),
        ("", "empty: statement has no header line"),
    ],
)
def test_bad_sandbox_csv_is_refused_with_its_line(text: str, message: str) -> None:
    assert str(refused(text, "sandbox-csv")).startswith(message)


def test_a_line_repeated_exactly_is_a_broken_file_not_a_second_payout() -> None:
    text = HEADER + "O1,R1,100,SUCCESS,\nO2,R2,5,SUCCESS,\nO1,R1,100,SUCCESS,\n"
    with pytest.raises(StatementError) as caught:
        list(without_duplicates(parse(lines_of(text), "sandbox-csv")))
    assert str(caught.value) == "line 4: duplicate line: repeats line 2"
    # the same order paid again under another bank reference is no file error: a break
    again = HEADER + "O1,R1,100,SUCCESS,\nO1,R9,100,SUCCESS,\n"
    assert len(list(without_duplicates(parse(lines_of(again), "sandbox-csv")))) == 2


def test_identity_covers_every_field() -> None:
    a = StatementLine("O", "R", 1, "succeeded", None)
    assert identity(a) != identity(StatementLine("O", "R", 1, "reversed", None))


# ---------------------------------------------------------------- generic CSV

BANK = {
    "format": "csv",
    "encoding": "gbk",
    "amount_unit": "yuan",
    "columns": {
        "order_no": "商户订单号",
        "bank_ref": "银行流水号",
        "amount": "金额(元)",
        "status": "交易状态",
        "booked_at": "完成时间",
    },
    "status_map": {"成功": "succeeded", "失败": "failed", "冲正": "reversed"},
    "skip_statuses": ["处理中"],
    "booked_at_format": "%Y%m%d%H%M%S",
    "preamble_lines": 1,
    "summary": {"position": "last", "marker": "合计", "count_field": 1, "total_field": 2},
}
GBK_HEAD = "某某银行代付明细 2026-03-10\n序号,商户订单号,银行流水号,金额(元),交易状态,完成时间\n"


def gbk(body: str) -> bytes:
    return (GBK_HEAD + body).encode("gbk")


def test_a_gbk_bank_file_is_mapped_by_its_column_names_with_yuan_in_exact_fen() -> None:
    got = read(
        gbk(
            "1,O1,B1,1234.56,成功,20260310180000\n"
            "2,O2,B2,0.1,失败,20260310180500\n"
            "3,O3,B3,99.00,处理中,\n"
            "合计,3,1333.66\n"
        ),
        "csv",
        **BANK,
    )
    assert [(n, x.order_no, x.bank_ref, x.amount, x.status) for n, x in got] == [
        (3, "O1", "B1", 123456, "succeeded"),
        (4, "O2", "B2", 10, "failed"),
    ]
    assert got[0][1].booked_at == datetime(2026, 3, 10, 18, tzinfo=ZONE)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "1,O1,B1,1.00,成功,\n合计,2,1.00\n",
            "line 4: summary says 2 line(s) totalling 100 fen, the file has 1 totalling 100 fen",
        ),
        ("1,O1,B1,1.00,成功,\n合计,1,1.01\n", "line 4: summary says 1 line(s) totalling 101"),
        ("1,O1,B1,1.00,成功,\n", "line 3: truncated: no summary row after 1 line(s)"),
        (
            "1,O1,B1,1.00,成功,\n2,O2,B2,1.0",
            "line 4: truncated: the last line has no line end (4 fields, expected 6)",
        ),
        ("1,O1,B1,abc,成功,\n合计,1,0\n", "line 3: amount 'abc' is not a number in yuan"),
        ("1,O1,B1,1.005,成功,\n合计,1,1.005\n", "line 3: amount 1.005 has fractions of a fen"),
        ("1,O1,B1,-1.00,成功,\n合计,1,1\n", "line 3: amount -1.00 is negative"),
        ("1,O1,B1,1.00,已退汇,\n合计,1,1\n", "line 3: unknown status word '已退汇'"),
        ("1,,B1,1.00,成功,\n合计,1,1\n", "line 3: empty order number"),
        ("1,O1,B1,1.00,成功,2026-03-10\n合计,1,1\n", "line 3: booked_at '2026-03-10' is not"),
        ("合计,0,0\n1,O1,B1,1.00,成功,\n", "line 4: a line after the summary row (line 3)"),
        ("1,O1,B1,1.00,成功,\n合计,x,1\n", "line 4: summary line count 'x' is no number"),
    ],
)
def test_bad_bank_files_are_refused_with_their_line(body: str, message: str) -> None:
    assert str(refused(gbk(body), "csv", **BANK)).startswith(message)


def test_a_wrong_header_names_the_missing_columns() -> None:
    text = "某某银行\n序号,订单号,银行流水号,金额(元),交易状态,完成时间\n".encode("gbk")
    assert str(refused(text, "csv", **BANK)).startswith(
        "line 2: header lacks column(s) 商户订单号 (found: 序号, 订单号"
    )


def test_bytes_that_are_not_the_configured_encoding_are_refused_with_their_line() -> None:
    text = gbk("1,O1,B1,1.00,成功,\n") + b"2,O2,\xff\xff\xff,1.00\n"
    assert str(refused(text, "csv", **BANK)).startswith("line 4: not gbk")


def test_a_summary_first_and_an_unmarked_summary_last_are_checked_too() -> None:
    base: dict[str, Any] = {"format": "csv", "columns": {"booked_at": None}}
    first = {**base, "summary": {"position": "first", "count_field": 0, "total_field": 1}}
    text = "2,300\norder_no,bank_ref,amount,status\nA,1,100,SUCCESS\nB,2,200,FAILED\n"
    assert [x.amount for _, x in read(text, "csv", **first)] == [100, 200]
    assert "summary says 2 line(s) totalling 301" in str(
        refused(text.replace("2,300", "2,301"), "csv", **first)
    )
    last = {**base, "summary": {"position": "last", "count_field": 0, "total_field": 1}}
    text = "order_no,bank_ref,amount,status\nA,1,100,SUCCESS\nB,2,200,FAILED\n2,300,\n"
    assert [x.order_no for _, x in read(text, "csv", **last)] == ["A", "B"]
    cut = "order_no,bank_ref,amount,status\nA,1,100,SUCCESS\nB,2,200,FAILED\n"
    # cut before its summary: the last line is read as the summary, and is none
    assert str(refused(cut, "csv", **last)) == "line 3: summary line count 'B' is no number"


def test_debits_printed_negative_and_a_bom_are_accepted_when_configured() -> None:
    cfg = {"format": "csv", "negative_debits": True, "columns": {"booked_at": None}}
    text = "\ufefforder_no,bank_ref,amount,status\nA,1,-100,SUCCESS\n"
    assert [x.amount for _, x in read(text, "csv", **cfg)] == [100]


def test_a_csv_in_the_normalised_vocabulary_reads_with_the_default_mapping() -> None:
    # the output's own column names and status words, as `statement parse` prints them
    text = (
        "order_no,bank_ref,amount,status,booked_at\n"
        "A,R1,100,succeeded,2026-11-25T10:00:00+08:00\n"
        "B,R2,200,failed,2026-11-25T10:01:00+08:00\n"
        "A,R3,100,reversed,2026-11-25T11:00:00+08:00\n"
    )
    got = [(x.order_no, x.bank_ref, x.amount, x.status) for _, x in read(text, "csv")]
    assert got == [("A", "R1", 100, "succeeded"), ("B", "R2", 200, "failed"),
                   ("A", "R3", 100, "reversed")]  # fmt: skip
    assert read(text, "csv")[0][1].booked_at == datetime(2026, 11, 25, 10, tzinfo=ZONE)


def test_a_file_without_a_header_is_refused() -> None:
    assert str(refused("\n\n", "csv")) == "line 2: no column header"


# ---------------------------------------------------------------- camt.053


def camt(name: str) -> list[bytes]:
    return (DATA / name).read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("camt053.v2.multi.statement.xml", [("000000001", 885), ("000000002", 700)]),
        ("camt053.v2.five.decimals.xml", [("000000001", 885)]),
        ("camt053.v2.minimal.xml", [("", 885)]),
        ("camt053.v4.xml", [("", 885)]),
        ("camt053.v8.xml", [("MUELL/FINP/RA12345", 885)]),
    ],
)
def test_camt053_samples_of_every_version_parse(sample: str, expected: list[Any]) -> None:
    got = [line for _, line in parse(camt(sample), "camt053")]
    assert [(x.order_no, x.amount) for x in got] == expected
    assert all(x.status == "succeeded" for x in got)


def test_camt053_booking_time_and_bank_reference() -> None:
    (_, v8), = parse(camt("camt053.v8.xml"), "camt053")  # fmt: skip
    assert v8.booked_at == datetime.fromisoformat("2014-12-31T13:15:00+01:00")
    assert v8.bank_ref == "AAAASESS-FP-CN_98765/01"
    (_, v2), = parse(camt("camt053.v2.five.decimals.xml"), "camt053")  # fmt: skip
    assert v2.booked_at == datetime(2014, 12, 31, tzinfo=ZONE)


def test_a_camt053_file_written_on_one_line_is_read_in_pieces() -> None:
    """A file is read a line at a time; a statement without line ends comes in pieces of
    `PIECE_BYTES`, never whole, and gives the same lines."""
    doc = b"".join(camt("camt053.v2.multi.statement.xml"))
    one_line = doc.replace(b"\n", b" ").replace(b"\r", b" ")
    padded = one_line.replace(b"<Stmt>", b"<Stmt>" + b" " * (3 * camt053.PIECE_BYTES), 1)
    sizes: list[int] = []

    class File(io.BytesIO):
        def readline(self, limit: int | None = -1) -> bytes:
            piece = super().readline(limit)
            sizes.append(len(piece))
            return piece

    got = [line for _, line in parse(File(padded), "camt053")]
    assert got == [line for _, line in parse(camt("camt053.v2.multi.statement.xml"), "camt053")]
    assert max(sizes) == camt053.PIECE_BYTES  # the one line came in pieces


def test_a_camt053_that_fails_its_schema_is_refused_at_the_line_that_breaks_it() -> None:
    error = refused(b"".join(camt("camt053.v2.invalid.xml")), "camt053")
    assert error.line == 8
    assert "fails the camt.053.001.02 schema" in error.reason
    assert "Missing child element(s)" in error.reason


def test_a_camt053_amount_that_is_no_amount_is_refused_at_its_line() -> None:
    text = b"".join(camt("camt053.v2.multi.statement.xml")).replace(b">8.85<", b">8.8x5<")
    error = refused(text, "camt053")
    assert error.line == 67
    assert "'8.8x5' is not a valid value" in error.reason


def test_a_truncated_camt053_is_refused() -> None:
    text = b"".join(camt("camt053.v2.multi.statement.xml"))[:3000]
    assert str(refused(text, "camt053")) == (
        "line 88: truncated: the document ends before </Document>"
    )
    cut_in_a_tag = b"".join(camt("camt053.v2.multi.statement.xml"))[:-30]
    assert "truncated" in str(refused(cut_in_a_tag, "camt053"))


def test_a_document_that_is_not_camt053_is_refused() -> None:
    assert "not a camt.053" in str(refused(b"<?xml version='1.0'?>\n<Foo/>\n", "camt053"))
    assert "not XML" in str(refused(b"hello <\n", "camt053"))


def test_entity_declarations_are_refused_before_parsing() -> None:
    bomb = (
        b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n'
        b'<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.02">&lol2;</Document>\n'
    )
    assert str(refused(bomb, "camt053")) == "line 2: DOCTYPE and ENTITY declarations are refused"


V2 = "urn:iso:std:iso:20022:tech:xsd:camt.053.001.02"


def statement_v2(entries: str, summary: str = "") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Document xmlns="{V2}">
<BkToCstmrStmt>
<GrpHdr><MsgId>M1</MsgId><CreDtTm>2026-03-11T02:00:00+08:00</CreDtTm></GrpHdr>
<Stmt>
<Id>S1</Id>
<CreDtTm>2026-03-11T02:00:00+08:00</CreDtTm>
<Acct><Id><Othr><Id>6222000011112222</Id></Othr></Id></Acct>
<Bal><Tp><CdOrPrtry><Cd>CLBD</Cd></CdOrPrtry></Tp><Amt Ccy="CNY">0</Amt>
<CdtDbtInd>DBIT</CdtDbtInd><Dt><Dt>2026-03-10</Dt></Dt></Bal>
{summary}{entries}</Stmt>
</BkToCstmrStmt>
</Document>
""".encode()


def entry(amount: str, *details: tuple[str, str | None], reversal: bool = False,
          status: str = "BOOK") -> str:  # fmt: skip
    txs = "".join(
        "<TxDtls><Refs><EndToEndId>{}</EndToEndId></Refs>{}</TxDtls>\n".format(
            e2e,
            "" if amt is None else f'<AmtDtls><TxAmt><Amt Ccy="CNY">{amt}</Amt></TxAmt></AmtDtls>',
        )
        for e2e, amt in details
    )
    rvsl = "<RvslInd>true</RvslInd>" if reversal else ""
    return (
        f'<Ntry>\n<Amt Ccy="CNY">{amount}</Amt><CdtDbtInd>DBIT</CdtDbtInd>{rvsl}'
        f"<Sts>{status}</Sts><BookgDt><DtTm>2026-03-10T18:00:00+08:00</DtTm></BookgDt>"
        f"<AcctSvcrRef>E1</AcctSvcrRef><BkTxCd/>\n<NtryDtls>\n{txs}</NtryDtls>\n</Ntry>\n"
    )


def test_each_transaction_of_a_batched_entry_is_a_line_and_a_reversal_is_reversed() -> None:
    doc = statement_v2(
        entry("300.00", ("ORD1", "100.00"), ("ORD2", "200.00"))
        + entry("50.00", ("ORD3", None), reversal=True)
        + entry("9.99", ("ORD4", None), status="PDNG")
    )
    got = list(parse(lines_of(doc), "camt053"))
    assert [(x.order_no, x.amount, x.status, x.bank_ref) for _, x in got] == [
        ("ORD1", 10000, "succeeded", "E1"),
        ("ORD2", 20000, "succeeded", "E1"),
        ("ORD3", 5000, "reversed", "E1"),
    ]
    assert [n for n, _ in got] == [14, 15, 21]  # the line of each TxDtls


def test_a_batched_entry_whose_transactions_do_not_add_up_is_refused() -> None:
    doc = statement_v2(entry("300.00", ("ORD1", "100.00"), ("ORD2", "150.00")))
    assert str(refused(doc, "camt053")) == (
        "line 11: the entry's 2 transactions add up to 25000 fen, the entry says 30000"
    )
    no_amount = statement_v2(entry("300.00", ("ORD1", "100.00"), ("ORD2", None)))
    assert "has no amount" in str(refused(no_amount, "camt053"))


def test_the_statement_summary_is_checked_against_its_entries() -> None:
    def summary(n: int, total: str) -> str:
        return f"<TxsSummry><TtlNtries><NbOfNtries>{n}</NbOfNtries><Sum>{total}</Sum>" \
               "</TtlNtries></TxsSummry>\n"  # fmt: skip

    ok = statement_v2(entry("1.00", ("A", None)) + entry("2.00", ("B", None)), summary(2, "3.00"))
    assert len(list(parse(lines_of(ok), "camt053"))) == 2
    short = statement_v2(entry("1.00", ("A", None)), summary(2, "1.00"))
    assert "statement summary says 2 entries, the statement has 1" in str(refused(short, "camt053"))
    wrong = statement_v2(entry("1.00", ("A", None)), summary(1, "1.50"))
    assert "statement summary sum 1.50" in str(refused(wrong, "camt053"))
