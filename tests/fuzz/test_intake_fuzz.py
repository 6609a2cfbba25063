"""Hypothesis against the lending-core intake of a live gateway: `POST /v1/disbursements` and
`PUT /v1/borrowers/{borrower_id}/accounts`.

Random JSON values and bytes, huge numbers, deep nesting, hostile unicode, missing, odd and
duplicated headers: the gateway never answers 5xx, every refusal is CONTRACT.md's
`{"error": {"code", "message", "details"}}`, and a refused request writes nothing (the rows
an accepted one would write are counted before and after, straight from the database).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.schemas import AccountOut, Disbursement
from tests.e2e.harness import (
    PAYEE,
    Stack,
    bank_a,
    bank_b,
    disbursement_body,
    error_of,
    run_stack,
)
from tests.fuzz.conftest import (
    AUTH_HEADERS,
    CONTENT_TYPES,
    EXTRA_HEADERS,
    FUZZ,
    HUGE_INTS,
    JSON_HEADERS,
    JSON_VALUES,
    NASTY_STRINGS,
    RAW_BODIES,
    TEXT,
    VALID_AUTH,
    Headers,
    Probe,
    assert_answered_without_server_error,
    counts_changed,
    described,
    encode,
    nested_value,
    send,
)

pytestmark = pytest.mark.e2e

AUTH = VALID_AUTH
JSON = JSON_HEADERS
BORROWER = "FUZZB1"  # its PAYEE account is whitelisted before the fuzzing starts
_serial = itertools.count(1)

# What intake writes, all in the request's own transaction. The dispatcher works on accepted
# disbursements in the background (attempts, outbox, their vouchers, and limit usage given back
# on a failure), so only rows that nothing but intake writes are compared per example.
INTAKE_COUNTS = """
SELECT
  (SELECT count(*) FROM disbursements) AS disbursements,
  (SELECT count(*) FROM borrower_accounts) AS accounts,
  (SELECT count(*) FROM voucher_events
    WHERE kind IN ('disbursement.accepted', 'whitelist.registered', 'whitelist.removed'))
    AS intake_vouchers
"""


@pytest.fixture(scope="module")
def stack(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # the banks settle after 10 min, and nothing is queried before then: accepted fuzz
    # requests stay `sent`, so the database holds still between examples
    slow = ("--settle-ms", "600000")
    with run_stack(
        tmp_path_factory.mktemp("intake-fuzz"),
        module_db,
        funders=[bank_a(bank_args=slow), bank_b(bank_args=slow)],
        dispatch={"query_backoff_seconds": [600]},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as c:
        resp = c.put(f"/v1/borrowers/{BORROWER}/accounts", json=PAYEE, headers=dict(AUTH))
        assert resp.status_code == 201, resp.text
        resp = c.post("/v1/disbursements", json=known_body(), headers=dict(AUTH))
        assert resp.status_code == 201, resp.text
        yield c


def intake_counts(probe: Probe) -> dict[str, Any]:
    return dict(probe.fetchrow(INTAKE_COUNTS))


def check(probe: Probe, resp: httpx.Response, before: dict[str, Any]) -> None:
    code = resp.json()["error"]["code"] if resp.status_code >= 400 and resp.content else ""
    event(f"HTTP {resp.status_code} {code}")  # --hypothesis-show-statistics shows the spread
    assert_answered_without_server_error(resp)
    if resp.status_code in (200, 201):
        model = AccountOut if "/accounts" in resp.request.url.path else Disbursement
        model.model_validate(resp.json())  # what /openapi.json promises
    if resp.status_code >= 400:
        changed = counts_changed(before, intake_counts(probe))
        assert not changed, f"refused with {resp.status_code} but wrote {changed}: {resp.text}"


def valid_body() -> dict[str, Any]:
    return disbursement_body(f"FUZZ{next(_serial):08d}", BORROWER)


def known_body() -> dict[str, Any]:
    """A request accepted before the fuzzing: mutations of it test the replay path (200 for
    the same payload, 409 txn_no_conflict for another)."""
    return disbursement_body("FUZZKNOWN0001", BORROWER)


# ---------------------------------------------------------------- POST /v1/disbursements

FIELDS = [
    ("txn_no",),
    ("loan_id",),
    ("borrower_id",),
    ("payee",),
    ("payee", "account_no"),
    ("payee", "account_name"),
    ("payee", "bank_code"),
    ("amount",),
    ("currency",),
    ("term",),
    ("term", "unit"),
    ("term", "count"),
    ("apr",),
    ("product",),
    ("repayment",),
    ("funder_hint",),
    ("metadata",),
]
# a valid token half of the time, so that the body and the other headers are reached
MOSTLY_VALID_AUTH = st.booleans().flatmap(
    lambda valid: st.just((VALID_AUTH, False)) if valid else AUTH_HEADERS
)
REPLACEMENTS = (
    JSON_VALUES | HUGE_INTS | st.sampled_from(NASTY_STRINGS) | nested_value() | TEXT.map(str)
)
# values of the field's own JSON type, so the request gets past the schema to the business
# rules, the database and the response rendering
STRINGS = (
    TEXT | st.sampled_from(NASTY_STRINGS) | st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
)
SAME_TYPE: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("amount",): st.integers(min_value=-1, max_value=30_000_000) | HUGE_INTS,
    ("term", "count"): st.integers(min_value=-1, max_value=4_000) | HUGE_INTS,
    ("term", "unit"): st.sampled_from(["day", "month", "year", "DAY", ""]),
    ("apr",): st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,6})?", fullmatch=True)
    | st.floats(min_value=0, max_value=1000)
    | STRINGS,
    ("payee", "account_no"): st.from_regex(r"[0-9]{8,32}", fullmatch=True) | STRINGS,
    ("payee", "bank_code"): st.from_regex(r"[A-Z0-9]{2,16}", fullmatch=True) | STRINGS,
    ("metadata",): st.dictionaries(TEXT, JSON_VALUES, max_size=5)
    | nested_value().map(lambda v: {"deep": v}),
    ("currency",): st.sampled_from(["CNY", "cny", "USD", "CN", ""]),
    ("funder_hint",): st.none() | st.sampled_from(["bank-a", "bank-b", "bank-c"]) | STRINGS,
    ("repayment",): st.sampled_from(["equal_installment", "interest_first", "bullet"]) | STRINGS,
}


@st.composite
def mutated_body(draw: st.DrawFn) -> bytes:
    """A valid request with one to three fields removed, replaced (by anything, or by a value
    of the same JSON type) or joined by an extra one, or with a key duplicated; serialised
    escaped, or raw (lone surrogates become invalid UTF-8)."""
    body = known_body() if draw(st.integers(0, 4)) == 0 else valid_body()
    if draw(st.integers(0, 9)) == 0:  # a duplicated key: JSON parsers keep the last value
        key = draw(st.sampled_from(sorted(body)))
        text = encode(body)[:-1] + b"," + encode(key) + b":" + encode(draw(REPLACEMENTS))
        return text + b"}"
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(FIELDS))
        parent = body
        for key in path[:-1]:
            if not isinstance(parent.get(key), dict):
                break
            parent = parent[key]
        else:
            action = draw(st.sampled_from(["same", "same", "same", "any", "delete", "extra"]))
            if action == "delete":
                parent.pop(path[-1], None)
            elif action == "extra":
                parent[draw(TEXT)] = draw(JSON_VALUES)
            elif action == "same":
                parent[path[-1]] = draw(SAME_TYPE.get(path, STRINGS))
            else:
                parent[path[-1]] = draw(REPLACEMENTS)
    return encode(body, ascii_only=draw(st.booleans()))


@settings(FUZZ, max_examples=300)
@given(body=RAW_BODIES)
def test_random_bodies_never_fail_the_server_nor_write(
    client: httpx.Client, probe: Probe, body: bytes
) -> None:
    before = intake_counts(probe)
    resp = send(client, "POST", "/v1/disbursements", body, AUTH + JSON)
    check(probe, resp, before)
    assert resp.status_code in (413, 422), resp.text


@settings(FUZZ, max_examples=600)
@given(body=mutated_body())
def test_mutated_requests_never_fail_the_server_nor_write_when_refused(
    client: httpx.Client, probe: Probe, body: bytes
) -> None:
    before = intake_counts(probe)
    resp = send(client, "POST", "/v1/disbursements", body, AUTH + JSON)
    check(probe, resp, before)


@settings(FUZZ, max_examples=300)
@given(
    auth=MOSTLY_VALID_AUTH,
    content_type=CONTENT_TYPES,
    extra=EXTRA_HEADERS,
    valid=st.booleans(),
    body=RAW_BODIES,
)
def test_odd_headers_never_fail_the_server_nor_write_when_refused(
    client: httpx.Client,
    probe: Probe,
    auth: tuple[Headers, bool | None],
    content_type: Headers,
    extra: Headers,
    valid: bool,
    body: bytes,
) -> None:
    before = intake_counts(probe)
    payload = encode(valid_body()) if valid else body
    headers, refused = auth
    resp = send(client, "POST", "/v1/disbursements", payload, [*headers, *content_type, *extra])
    check(probe, resp, before)
    if refused:
        assert resp.status_code == 401, described(resp)
        error_of(resp, 401, "unauthorized")


# refused by aiohttp's HTTP parser, below every middleware: its plain-text 400 is all a client
# gets, so only "refused, nothing written, still serving" is asserted for these
PROTOCOL_VIOLATIONS = {
    "header value too long": [*AUTH, *JSON, ("X-Request-Id", b"r" * 9_000)],
    "header name too long": [*AUTH, *JSON, ("X-" + "h" * 9_000, b"1")],
    "too many headers": [*AUTH, *JSON, *((f"X-Fuzz-{i}", b"1") for i in range(200))],
    "token too long": [("Authorization", b"Bearer " + b"t" * 9_000), *JSON],
    "duplicated Content-Type": [*AUTH, *JSON, ("Content-Type", b"text/xml")],
    "control character in a value": [*AUTH, *JSON, ("X-Request-Id", b"a\x01\x7fb")],
    "control character in the token": [("Authorization", b"Bearer demo\x10token"), *JSON],
}


@pytest.mark.parametrize("headers", PROTOCOL_VIOLATIONS.values(), ids=PROTOCOL_VIOLATIONS)
def test_headers_the_http_parser_refuses_write_nothing(
    client: httpx.Client, probe: Probe, headers: Headers
) -> None:
    before = intake_counts(probe)
    resp = send(client, "POST", "/v1/disbursements", encode(valid_body()), headers)
    assert resp.status_code in (400, 413, 431), described(resp)
    assert not counts_changed(before, intake_counts(probe))
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- PUT /v1/borrowers/{id}/accounts

# not NUL: the gateway answers 500 to it today (test_bad_input_regressions.py)
BORROWER_IDS = (
    st.text(st.characters(exclude_characters="\x00"), min_size=1, max_size=80)
    | st.sampled_from([s for s in NASTY_STRINGS if s and "\x00" not in s])
    | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=70)
)


@st.composite
def account_body(draw: st.DrawFn) -> bytes:
    account: dict[str, Any] = dict(PAYEE)
    key = draw(st.sampled_from([*account, "extra"]))
    choice = draw(st.sampled_from(["replace", "delete", "keep", "raw"]))
    if choice == "raw":
        return draw(RAW_BODIES)
    if choice == "delete" and key in account:
        del account[key]
    elif choice == "replace" or key == "extra":
        account[key] = draw(REPLACEMENTS)
    return encode(account, ascii_only=draw(st.booleans()))


@settings(FUZZ, max_examples=400)
@given(
    borrower_id=BORROWER_IDS,
    body=account_body(),
    auth=MOSTLY_VALID_AUTH,
    content_type=CONTENT_TYPES,
)
def test_whitelist_registration_never_fails_the_server_nor_writes_when_refused(
    client: httpx.Client,
    probe: Probe,
    borrower_id: str,
    body: bytes,
    auth: tuple[Headers, bool | None],
    content_type: Headers,
) -> None:
    before = intake_counts(probe)
    url = f"/v1/borrowers/{quote(borrower_id.encode('utf-8', 'surrogatepass'), safe='')}/accounts"
    resp = send(client, "PUT", url, body, [*auth[0], *content_type])
    if resp.status_code == 404:
        return  # an encoded "/" or "." segment routed elsewhere: not this operation
    check(probe, resp, before)


def test_a_valid_request_is_still_accepted_after_the_fuzzing(client: httpx.Client) -> None:
    """The fuzzing did not wedge the gateway: the next real request goes through."""
    resp = client.post("/v1/disbursements", json=valid_body(), headers=dict(AUTH))
    assert resp.status_code == 201, resp.text
