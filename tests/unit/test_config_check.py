"""`fundgate config check`: exit 0 for a good file, 2 listing every problem of a bad one."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.loader import DEFAULT_CONFIG
from gateway.cli import main


def check(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, str, str]:
    try:
        code = main(["config", "check", str(path)])
    except SystemExit as e:
        code = int(str(e.code))
    out, err = capsys.readouterr()
    return code, out, err


def broken(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """The default config with each (old, new) text replaced once, written to a file."""
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_default_config_checks_out(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, DEFAULT_CONFIG)
    assert code == 0
    assert "ok (2 funders, 1 products, 1 clients)" in out


def test_connector_options_a_connector_refuses_are_listed_with_the_other_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = broken(
        tmp_path,
        ('base_url = "http://127.0.0.1:8801"', 'base_url = "ftp:x"'),
        ('secret = "sandbox-secret-b"', 'secret = ""'),
        ('apr_cap = "0.24"', 'apr_cap = "2"'),
    )
    code, _, err = check(capsys, path)
    assert code == 2
    assert "gateway.apr_cap" in err
    assert "funders[0] (bank-a).connector_options: base_url" in err
    assert "funders[1] (bank-b).connector_options: secret" in err


def test_a_funder_invalid_by_itself_is_reported_once_not_again_by_its_connector(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = broken(
        tmp_path,
        ('base_url = "http://127.0.0.1:8801"', 'base_url = "ftp:x"'),
        ('license = "bank"', 'license = "p2p"'),
    )
    code, _, err = check(capsys, path)
    assert code == 2
    assert "funders[0].license" in err
    assert "connector_options" not in err


def test_an_unset_secret_in_connector_options_is_reported_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FUNDGATE_TEST_UNSET_BASE_URL", raising=False)
    path = broken(
        tmp_path,
        ('base_url = "http://127.0.0.1:8801"', 'base_url = "env:FUNDGATE_TEST_UNSET_BASE_URL"'),
    )
    code, _, err = check(capsys, path)
    assert code == 2
    assert "funders[0].connector_options.base_url: secret from environment variable" in err
    assert err.count("\n  - ") == 1
