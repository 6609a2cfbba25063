"""`fundgate statement parse`: a statement's normalised lines as JSON lines, in file order,
and a bad file refused with its line number (no database, no bank)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "iso20022"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, object]], str]:
    code = main(["statement", "parse", *args])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_camt053_lines_are_printed_in_file_order(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run(
        capsys, str(DATA / "camt053.v2.multi.statement.xml"), "--format", "camt053"
    )
    assert code == 0
    assert lines == [
        {"order_no": "000000001", "bank_ref": None, "amount": 885, "status": "succeeded",
         "booked_at": "2014-12-31T00:00:00+08:00"},
        {"order_no": "000000002", "bank_ref": None, "amount": 700, "status": "succeeded",
         "booked_at": "2014-12-31T00:00:00+08:00"},
    ]  # fmt: skip


def test_an_invalid_camt053_exits_non_zero_with_its_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, lines, err = run(capsys, str(DATA / "camt053.v2.invalid.xml"), "--format", "camt053")
    assert (code, lines) == (1, [])
    assert "camt053.v2.invalid.xml: line 8: fails the camt.053.001.02 schema" in err


def test_sandbox_csv_and_its_duplicate_lines(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    f = tmp_path / "s.csv"
    f.write_text(
        "order_no,bank_ref,amount,status,finished_at\n"
        "O1,R1,100,SUCCESS,2026-03-10T10:00:00+08:00\nO2,R2,5,REVERSED,\n"
    )
    code, lines, _ = run(capsys, str(f), "--format", "sandbox-csv")
    assert code == 0
    assert [(x["order_no"], x["amount"], x["status"]) for x in lines] == [
        ("O1", 100, "succeeded"),
        ("O2", 5, "reversed"),
    ]
    f.write_text(f.read_text() + "O1,R1,100,SUCCESS,2026-03-10T10:00:00+08:00\n")
    code, lines, err = run(capsys, str(f), "--format", "sandbox-csv")
    assert code == 1
    assert len(lines) == 2
    assert err.strip().endswith("line 4: duplicate line: repeats line 2")


def test_generic_csv_with_the_default_mapping(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    f = tmp_path / "g.csv"
    f.write_text("status,amount,order_no,bank_ref,finished_at,extra\nSUCCESS,7,A,,,x\n")
    code, lines, _ = run(capsys, str(f), "--format", "csv")
    assert (code, lines[0]["order_no"], lines[0]["bank_ref"]) == (0, "A", None)


def test_a_missing_file_or_funder_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, str(tmp_path / "none.csv"), "--format", "csv")[0] == 2
    assert run(capsys, str(tmp_path / "none.csv"), "--format", "csv", "--funder", "nobody")[0] == 2


def test_a_funder_mapping_is_taken_from_the_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from config.loader import DEFAULT_CONFIG

    cfg = tmp_path / "fundgate.toml"
    cfg.write_text(
        DEFAULT_CONFIG.read_text(encoding="utf-8")
        + '\n[funders.statement]\nformat = "csv"\nencoding = "gbk"\namount_unit = "yuan"\n'
        + '[funders.statement.status_map]\n"成功" = "succeeded"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("FUNDGATE_CONFIG", str(cfg))
    f = tmp_path / "b.csv"
    f.write_bytes("order_no,bank_ref,amount,status,finished_at\nX,R,1.5,成功,\n".encode("gbk"))
    code, lines, _ = run(capsys, str(f), "--format", "csv", "--funder", "bank-b")
    assert (code, lines[0]["amount"], lines[0]["status"]) == (0, 150, "succeeded")
