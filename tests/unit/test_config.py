"""The configuration file: the embedded default loads, and broken files report every error."""

from __future__ import annotations

import base64
import copy
import hashlib
import tomllib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config import ConfigError, load_config
from config.loader import DEFAULT_CONFIG, parse_config

Raw = dict[str, Any]
UNSET_VAR = "FUNDGATE_TEST_SECRET_THAT_IS_UNSET"


@pytest.fixture
def raw() -> Raw:
    """The default config as the TOML parser returns it, fresh for each test."""
    return tomllib.loads(DEFAULT_CONFIG.read_text(encoding="utf-8"))


def errors_of(raw: Raw) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "test.toml")
    assert caught.value.source == "test.toml"
    assert caught.value.errors, "a ConfigError must say what is wrong"
    return caught.value.errors


def has(errors: list[str], *fragments: str) -> bool:
    return any(all(f in e for f in fragments) for e in errors)


# the embedded default


def test_default_config_loads_with_the_documented_funders() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    assert [f.id for f in cfg.funders] == ["bank-a", "bank-b"]
    a, b = cfg.funders
    assert (a.mode, a.platform_share, a.priority) == ("direct", None, 1)
    assert (b.mode, b.platform_share, b.priority) == ("co_lending", Decimal("0.30"), 2)
    assert a.connector_options["base_url"] == "http://127.0.0.1:8801"
    assert b.connector_options["secret"] == "sandbox-secret-b"
    product = cfg.product("consumer-standard")
    assert product is not None
    assert (product.min_amount, product.max_amount) == (300_000, 20_000_000)
    assert (product.min_term.days, product.max_term.days) == (7, 36 * 30)
    assert cfg.gateway.apr_cap == Decimal("0.24")
    assert cfg.gateway.zone.key == "Asia/Shanghai"
    assert cfg.clients[0].token_sha256 == hashlib.sha256(b"demo-token").hexdigest()
    assert cfg.lending_core is not None


def test_load_config_defaults_to_the_embedded_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUNDGATE_CONFIG", raising=False)
    assert load_config() == load_config(DEFAULT_CONFIG)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_a_path_that_is_not_a_readable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[gateway\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


# one problem at a time: each is found and named


def _bad_licence(r: Raw) -> None:
    r["funders"][0]["license"] = "trust"


def _share_below_floor(r: Raw) -> None:
    r["funders"][1]["platform_share"] = "0.2"


def _zero_single_max(r: Raw) -> None:
    r["funders"][0]["single_max"] = 0


def _negative_daily_limit(r: Raw) -> None:
    r["funders"][0]["daily_limit"] = -1


def _zero_platform_limit(r: Raw) -> None:
    r["gateway"]["platform_daily_limit"] = 0


def _min_above_max_amount(r: Raw) -> None:
    r["products"][0]["min_amount"] = 30_000_000


def _min_term_above_max_term(r: Raw) -> None:
    r["products"][0]["min_term"] = {"unit": "month", "count": 37}


def _unknown_connector(r: Raw) -> None:
    r["funders"][1]["connector"] = "carrier-pigeon"


def _unknown_product(r: Raw) -> None:
    r["funders"][1]["products"] = ["consumer-standard", "gold-card"]


def _unset_secret(r: Raw) -> None:
    r["lending_core"]["webhook_secret"] = f"env:{UNSET_VAR}"


def _duplicate_funder(r: Raw) -> None:
    r["funders"].append(copy.deepcopy(r["funders"][0]))


def _direct_with_share(r: Raw) -> None:
    r["funders"][0]["platform_share"] = "0.30"


def _co_lending_without_share(r: Raw) -> None:
    del r["funders"][1]["platform_share"]


def _single_max_above_daily(r: Raw) -> None:
    r["funders"][0]["single_max"] = r["funders"][0]["daily_limit"] + 1


def _floor_below_regulation(r: Raw) -> None:
    r["gateway"]["min_platform_share"] = "0.10"


CASES: list[tuple[Callable[[Raw], None], tuple[str, ...]]] = [
    (_bad_licence, ("funders[0].license", "'bank' or 'consumer_finance'")),
    (_share_below_floor, ("funders[1] (bank-b).platform_share", "0.2 is below", "0.30")),
    (_zero_single_max, ("funders[0].single_max", "greater than 0")),
    (_negative_daily_limit, ("funders[0].daily_limit", "greater than 0")),
    (_zero_platform_limit, ("gateway.platform_daily_limit", "greater than 0")),
    (_min_above_max_amount, ("products[0]", "min_amount is above max_amount")),
    (_min_term_above_max_term, ("products[0]", "min_term is longer than max_term")),
    (_unknown_connector, ("funders[1].connector", "unknown connector 'carrier-pigeon'")),
    (_unknown_product, ("funders[1] (bank-b).products", "unknown product 'gold-card'")),
    (_unset_secret, ("lending_core.webhook_secret", UNSET_VAR, "not set")),
    (_duplicate_funder, ("funders: duplicate id 'bank-a'",)),
    (_direct_with_share, ("funders[0]", "only for co_lending")),
    (_co_lending_without_share, ("funders[1]", "needs platform_share")),
    (_single_max_above_daily, ("funders[0]", "single_max is above daily_limit")),
    (_floor_below_regulation, ("gateway.min_platform_share", "at least 0.30")),
]


@pytest.mark.parametrize(("breaks", "fragments"), CASES, ids=[c[0].__name__[1:] for c in CASES])
def test_each_problem_is_reported_where_it_is(
    raw: Raw,
    monkeypatch: pytest.MonkeyPatch,
    breaks: Callable[[Raw], None],
    fragments: tuple[str, ...],
) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    breaks(raw)
    errors = errors_of(raw)
    assert has(errors, *fragments), errors


# every problem at once


Breaker = Callable[[Raw], None]
FIELD_LEVEL: list[Breaker] = [
    _bad_licence,
    _zero_single_max,
    _negative_daily_limit,
    _min_above_max_amount,
    _unknown_connector,
    _unset_secret,
]
CROSS_FIELD: list[Breaker] = [_share_below_floor, _unknown_product, _duplicate_funder]


def unreported(raw: Raw, breakers: list[Breaker]) -> list[str]:
    """Break `raw` in every way given; the names of the breakages the ConfigError misses."""
    for breaks in breakers:
        breaks(raw)
    errors = errors_of(raw)
    return [b.__name__ for b, fragments in CASES if b in breakers and not has(errors, *fragments)]


def test_field_errors_in_different_places_are_reported_together(
    raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    assert unreported(raw, FIELD_LEVEL) == []


def test_cross_field_errors_are_reported_together(raw: Raw) -> None:
    assert unreported(raw, CROSS_FIELD) == []


def test_every_error_of_a_broken_file_is_reported_at_once(
    raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    assert unreported(raw, FIELD_LEVEL + CROSS_FIELD) == []


def test_every_range_problem_of_one_entry_is_reported_at_once(raw: Raw) -> None:
    _min_above_max_amount(raw)
    _min_term_above_max_term(raw)
    _co_lending_without_share(raw)
    raw["funders"][1]["single_max"] = raw["funders"][1]["daily_limit"] + 1
    errors = errors_of(raw)
    assert has(errors, "min_amount is above max_amount"), errors
    assert has(errors, "min_term is longer than max_term"), errors
    assert has(errors, "funders[1]", "needs platform_share"), errors
    assert has(errors, "funders[1]", "single_max is above daily_limit"), errors


def test_a_field_error_does_not_hide_the_checks_across_its_entrys_other_fields(
    raw: Raw,
) -> None:
    _min_above_max_amount(raw)
    raw["products"][0]["max_term"] = {"unit": "week", "count": 1}
    _bad_licence(raw)
    _single_max_above_daily(raw)
    key = base64.b64encode(bytes(32)).decode()
    raw["security"] = {"data_keys": {"k1": key}, "active_key": "k2", "blind_index_key": 5}
    errors = errors_of(raw)
    assert has(errors, "products[0].max_term.unit"), errors
    assert has(errors, "products[0]", "min_amount is above max_amount"), errors
    assert not has(errors, "min_term is longer"), errors  # max_term is invalid: not compared
    assert has(errors, "funders[0].license"), errors
    assert has(errors, "funders[0]", "single_max is above daily_limit"), errors
    assert has(errors, "security.blind_index_key"), errors
    assert has(errors, "security", "active_key 'k2' is not among data_keys"), errors


# secrets from the environment


def test_env_secret_is_resolved_when_set(raw: Raw, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUNDGATE_TEST_WEBHOOK_SECRET", "s3cret")
    monkeypatch.setenv("FUNDGATE_TEST_BANK_SECRET", "bank-s3cret")
    raw["lending_core"]["webhook_secret"] = "env:FUNDGATE_TEST_WEBHOOK_SECRET"
    raw["funders"][0]["connector_options"]["secret"] = "env:FUNDGATE_TEST_BANK_SECRET"
    cfg = parse_config(raw)
    assert cfg.lending_core is not None
    assert cfg.lending_core.webhook_secret.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg.lending_core)
    assert cfg.funders[0].connector_options["secret"] == "bank-s3cret"


def test_env_secret_set_but_empty_counts_as_unset(
    raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUNDGATE_TEST_WEBHOOK_SECRET", "")
    raw["lending_core"]["webhook_secret"] = "env:FUNDGATE_TEST_WEBHOOK_SECRET"
    assert has(errors_of(raw), "lending_core.webhook_secret", "not set")


def test_unset_secret_deep_in_connector_options_is_reported_with_its_path(
    raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    raw["funders"][1]["connector_options"]["secret"] = f"env:{UNSET_VAR}"
    assert has(errors_of(raw), "funders[1].connector_options.secret", UNSET_VAR)


def test_the_outbound_http_transport_is_aiohttp_unless_configured(raw: Raw) -> None:
    assert parse_config(raw, "test.toml").gateway.http_transport == "aiohttp"
    raw["gateway"]["http_transport"] = "httpx"
    assert parse_config(raw, "test.toml").gateway.http_transport == "httpx"
    raw["gateway"]["http_transport"] = "curl"
    assert has(errors_of(raw), "gateway.http_transport")


def test_webhooks_in_flight_default_to_64_and_must_be_positive(raw: Raw) -> None:
    cfg = parse_config(raw, "test.toml")
    assert cfg.lending_core is not None
    assert cfg.lending_core.max_in_flight == 64
    raw["lending_core"]["max_in_flight"] = 0
    assert has(errors_of(raw), "lending_core.max_in_flight")
