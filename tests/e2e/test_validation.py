"""Refusals at intake: every 422 code of CONTRACT.md, hostile bodies, auth. Nothing is written."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.harness import (
    PAYEE,
    READ_ONLY_TOKEN,
    STANDARD_PRODUCT,
    Api,
    Stack,
    bank_a,
    bank_b,
    disbursement_body,
    error_of,
    new_id,
    run_stack,
)

pytestmark = pytest.mark.e2e

SINGLE_MAX = 15_000_000  # below the product's maximum, so a large loan meets a limit
UNFUNDED_PRODUCT = {**STANDARD_PRODUCT, "code": "consumer-unfunded"}  # no funder offers it


@pytest.fixture(scope="module")
def stack(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(
        tmp_path_factory.mktemp("validation"),
        module_db,
        funders=[bank_a(single_max=SINGLE_MAX), bank_b(single_max=SINGLE_MAX)],
        products=[STANDARD_PRODUCT, UNFUNDED_PRODUCT],
    ) as s:
        yield s


def _reasons(details: Any) -> dict[str, str]:
    """Per-funder refusal reasons from `details`, as {"funders": {id: {"reason": …}}} or a list
    of {"funder_id", "reason"}."""
    assert details, "details name the reason per funder"
    funders = details.get("funders", details) if isinstance(details, dict) else details
    if isinstance(funders, dict):
        return {fid: v["reason"] if isinstance(v, dict) else str(v) for fid, v in funders.items()}
    return {item["funder_id"]: item["reason"] for item in funders}


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("missing_field", {"currency": None}, "invalid_request"),
    ("currency_not_cny", {"currency": "USD"}, "invalid_request"),
    ("amount_below_product_min", {"amount": 299_999}, "amount_out_of_range"),
    ("amount_above_product_max", {"amount": 20_000_001}, "amount_out_of_range"),
    ("term_below_7_days", {"term": {"unit": "day", "count": 6}}, "term_out_of_range"),
    ("term_above_36_months", {"term": {"unit": "month", "count": 37}}, "term_out_of_range"),
    ("apr_above_24_percent", {"apr": "0.2401"}, "apr_above_cap"),
    ("repayment_not_offered", {"repayment": "equal_principal"}, "repayment_not_supported"),
    ("repayment_unknown", {"repayment": "balloon"}, "repayment_not_supported"),
    (
        "interest_first_13_months",
        {"repayment": "interest_first", "term": {"unit": "month", "count": 13}},
        "repayment_not_supported",
    ),
    ("unknown_product", {"product": "no-such-product"}, "unknown_product"),
    (
        "payee_not_registered",
        {"payee": {**PAYEE, "account_no": "6222020200112239999"}},
        "payee_not_whitelisted",
    ),
    (
        "payee_name_differs",
        {"payee": {**PAYEE, "account_name": "李四"}},
        "payee_not_whitelisted",
    ),
    ("amount_above_every_single_max", {"amount": SINGLE_MAX + 1}, "limit_exceeded"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "code"), [(c, k) for _, c, k in REFUSALS], ids=[n for n, _, _ in REFUSALS]
)
async def test_rule_violation_is_refused_with_its_code_and_nothing_written(
    api: Api, change: dict[str, Any], code: str
) -> None:
    body = await api.new_disbursement()
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None or k == "funder_hint"}

    resp = await api.post(body)

    error_of(resp, 422, code)
    await api.assert_absent(body["txn_no"])


@pytest.mark.asyncio
async def test_interest_first_up_to_12_months_is_accepted(api: Api) -> None:
    body = await api.new_disbursement(
        repayment="interest_first", term={"unit": "month", "count": 12}
    )
    resp = await api.post(body)
    assert resp.status_code == 201, resp.text


@pytest.mark.asyncio
async def test_no_eligible_funder_names_the_reason_of_every_funder(api: Api) -> None:
    body = await api.new_disbursement(product=UNFUNDED_PRODUCT["code"])

    resp = await api.post(body)

    err = error_of(resp, 422, "no_eligible_funder")
    reasons = _reasons(err["details"])
    assert set(reasons) == {"bank-a", "bank-b"}
    assert all(reasons.values())
    await api.assert_absent(body["txn_no"])


@pytest.mark.asyncio
async def test_limit_exceeded_names_the_single_max_of_every_funder(api: Api) -> None:
    body = await api.new_disbursement(amount=SINGLE_MAX + 1)

    err = error_of(await api.post(body), 422, "limit_exceeded")

    assert set(_reasons(err["details"])) == {"bank-a", "bank-b"}


# ------------------------------------------------------------------ hostile bodies

Raw = Callable[[str, str], bytes]


def _json(**changes: Any) -> Raw:
    def build(txn_no: str, borrower_id: str) -> bytes:
        return json.dumps(disbursement_body(txn_no, borrower_id, **changes)).encode()

    return build


def _text(template: str) -> Raw:
    def build(txn_no: str, borrower_id: str) -> bytes:
        return template.replace("TXN", txn_no).replace("BORROWER", borrower_id).encode()

    return build


def _replace(old: str, new: bytes) -> Raw:
    """A valid body with the JSON text `old` replaced by raw bytes `new`."""

    def build(txn_no: str, borrower_id: str) -> bytes:
        raw = _json()(txn_no, borrower_id)
        assert old.encode() in raw, old
        return raw.replace(old.encode(), new, 1)

    return build


def _nested(depth: int) -> Raw:
    return _replace('"metadata": {}', b'"metadata": {"x": ' + b"[" * depth + b"]" * depth + b"}")


BAD_BODIES: list[tuple[str, Raw]] = [
    ("truncated_json", _text('{"txn_no": "TXN", "borrower_id": "BORROWER", "amount": 1000000,')),
    ("not_json", _text("txn_no=TXN&amount=1000000")),
    ("empty_body", _text("")),
    ("json_array", _text('["TXN"]')),
    ("json_string", _text('"TXN"')),
    ("amount_as_string", _json(amount="1000000")),
    ("amount_as_bool", _json(amount=True)),
    ("amount_as_float", _replace('"amount": 1000000', b'"amount": 1000000.0')),
    ("amount_as_exponent", _replace('"amount": 1000000', b'"amount": 1e6')),
    ("amount_nan", _replace('"amount": 1000000', b'"amount": NaN')),
    ("amount_zero", _json(amount=0)),
    ("amount_negative", _json(amount=-1_000_000)),
    ("amount_huge", _json(amount=10**30)),
    ("amount_null", _json(amount=None)),
    ("term_count_as_string", _json(term={"unit": "month", "count": "12"})),
    ("term_unit_unknown", _json(term={"unit": "year", "count": 1})),
    ("payee_as_string", _json(payee="6222020200112233445")),
    ("account_no_with_letters", _json(payee={**PAYEE, "account_no": "62220202001122334X5"})),
    ("metadata_as_list", _json(metadata=[1, 2])),
    ("unknown_top_level_field", _json(priority="high")),
    ("unknown_payee_field", _json(payee={**PAYEE, "iban": "DE00"})),
    ("unknown_term_field", _json(term={"unit": "month", "count": 12, "grace": 1})),
    ("txn_no_with_spaces", _replace('"txn_no": "', b'"txn_no": "bad txn ')),
    ("non_utf8_bytes", _replace('"loan_id": "L-', b'"loan_id": "\xff\xfe\xfd')),
    ("latin1_payee_name", _replace('"account_name": "', b'"account_name": "M\xfcller')),
    ("lone_surrogate_escape", _replace('"loan_id": "L-', b'"loan_id": "\\ud800')),
    ("nul_character", _replace('"loan_id": "L-', b'"loan_id": "\\u0000')),
    ("nul_in_metadata", _json(metadata={"note": "a\u0000b"})),
    ("number_overflowing_to_infinity", _replace('"metadata": {}', b'"metadata": {"x": 1e999}')),
    ("deeply_nested_metadata", _nested(20_000)),
    ("duplicate_key_changes_amount", _replace('"amount": 1000000', b'"amount": 1, "amount": 2')),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("build", [b for _, b in BAD_BODIES], ids=[n for n, _ in BAD_BODIES])
async def test_bad_body_is_a_4xx_with_the_error_shape_and_nothing_written(
    api: Api, build: Raw
) -> None:
    borrower_id = new_id("B")
    await api.register(borrower_id)
    txn_no = new_id("BAD")
    raw = build(txn_no, borrower_id)

    resp = await api.post(raw)

    assert 400 <= resp.status_code < 500, f"{resp.status_code}: {resp.text[:300]}"
    error_of(resp, resp.status_code)
    await api.assert_absent(txn_no)


@pytest.mark.asyncio
async def test_body_over_64_kib_is_refused_as_too_large(api: Api) -> None:
    body = await api.new_disbursement(metadata={"blob": "x" * 70_000})

    error_of(await api.post(body), 413)
    await api.assert_absent(body["txn_no"])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-the-token"}, {"Authorization": "Basic ZGVtbzp0b2tlbg=="}],
    ids=["missing", "wrong_token", "not_bearer"],
)
async def test_disbursement_without_a_valid_token_is_401(
    api: Api, stack: Stack, headers: dict[str, str]
) -> None:
    body = await api.new_disbursement()
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as anonymous:
        resp = await anonymous.post("/v1/disbursements", json=body, headers=headers)

    error_of(resp, 401)
    await api.assert_absent(body["txn_no"])


@pytest.mark.asyncio
async def test_disbursement_with_a_token_lacking_the_disburse_scope_is_403(
    api: Api, stack: Stack
) -> None:
    body = await api.new_disbursement()
    async with stack.api(token=READ_ONLY_TOKEN) as reader:
        resp = await reader.post(body)
        error_of(resp, 403)
        # the same token may read: the scope, not the token, is what is refused
        error_of(await reader.get(body["txn_no"]), 404)
    await api.assert_absent(body["txn_no"])


BAD_ACCOUNTS: list[tuple[str, bytes]] = [
    ("truncated_json", b'{"account_no": "6222020200112233445",'),
    ("unknown_field", json.dumps({**PAYEE, "iban": "DE00"}).encode()),
    ("account_no_with_letters", json.dumps({**PAYEE, "account_no": "6222ABC"}).encode()),
    (
        "non_utf8_name",
        b'{"account_no": "6222020200112233445", "account_name": "\xff", "bank_code": "ICBC"}',
    ),
    ("nul_in_name", json.dumps({**PAYEE, "account_name": "张\u0000三"}).encode()),
    ("deeply_nested", b'{"account_no": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [r for _, r in BAD_ACCOUNTS], ids=[n for n, _ in BAD_ACCOUNTS])
async def test_bad_whitelist_account_is_a_4xx_with_the_error_shape_and_nothing_written(
    api: Api, raw: bytes
) -> None:
    borrower_id = new_id("B")

    resp = await api.http.put(
        f"/v1/borrowers/{borrower_id}/accounts",
        content=raw,
        headers={"Content-Type": "application/json"},
    )

    assert 400 <= resp.status_code < 500, f"{resp.status_code}: {resp.text[:300]}"
    error_of(resp, resp.status_code)
    listed = await api.http.get(f"/v1/borrowers/{borrower_id}/accounts")
    assert listed.status_code == 200, listed.text
    assert listed.json()["items"] == []
