"""Hypothesis against `POST /v1/callbacks/{funder_id}` of a live gateway: a callback that is
unsigned, wrongly signed, signed for another body, another funder or another moment, or that
carries odd, missing or duplicated headers, never changes anything.

Four disbursements wait in `sent` (the sandbox banks settle only after ten minutes and nothing
queries them before), which is exactly when a forged SUCCESS or FAILED would matter: believed,
it would report a loan paid or unpaid while the bank does the opposite. Before and after every
example the test compares the state columns of every disbursement and attempt and the row
count of every table (nonces included: a forged callback must not burn the bank's nonces).
Signatures are computed here from CONTRACT.md's rule, not with product code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

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
    ASCII_BYTES,
    FIELD_BYTES,
    FUZZ,
    JSON_HEADERS,
    JSON_VALUES,
    NASTY_STRINGS,
    RAW_BODIES,
    TEXT,
    VALID_AUTH,
    Headers,
    Probe,
    assert_answered_without_server_error,
    described,
    encode,
    header_value,
)

pytestmark = pytest.mark.e2e

BANKS = {"bank-a": bank_a(), "bank-b": bank_b()}
SECRETS = {funder_id: spec.secret for funder_id, spec in BANKS.items()}
BORROWER = "CBFUZZB1"
SETTLE = ("--settle-ms", "600000")  # ten minutes: the targets stay `sent` for the whole module
TS, NONCE, SIG = "X-Sandbox-Timestamp", "X-Sandbox-Nonce", "X-Sandbox-Signature"

# what a disbursement "is": a change in any of these is a state change
STATE = """
SELECT
  (SELECT coalesce(string_agg(concat_ws('|', id, txn_no, status, funder_id, mode, alloc_funder,
     alloc_platform, failure::text), E'\\n' ORDER BY id), '') FROM disbursements) AS disbursements,
  (SELECT coalesce(string_agg(concat_ws('|', id, disbursement_id, n, funder_id, order_no, status,
     bank_ref, error::text), E'\\n' ORDER BY id), '') FROM attempts) AS attempts,
  (SELECT coalesce(string_agg(concat_ws('|', scope, business_day, used, share), ','
     ORDER BY scope, business_day, bucket), '') FROM limit_usage) AS limit_usage,
  (SELECT coalesce(string_agg(concat_ws('|', funder_id, balance), ',' ORDER BY funder_id), '')
     FROM prefund) AS prefund
"""


@dataclass(frozen=True)
class Target:
    txn_no: str
    funder_id: str
    order_no: str
    amount: int


def sign(secret: str, timestamp: str | bytes, nonce: str | bytes, body: bytes) -> bytes:
    """CONTRACT.md: hex(hmac_sha256(secret, timestamp + "\\n" + nonce + "\\n" + body))."""
    ts = timestamp.encode() if isinstance(timestamp, str) else timestamp
    nc = nonce.encode() if isinstance(nonce, str) else nonce
    mac = hmac.new(secret.encode(), ts + b"\n" + nc + b"\n" + body, hashlib.sha256)
    return mac.hexdigest().encode()


def signed_as(secret: str, ts: str, nonce: str, body: bytes) -> Headers:
    return [(TS, ts.encode()), (NONCE, nonce.encode()), (SIG, sign(secret, ts, nonce, body))]


def now() -> str:
    return str(int(time.time()))


@pytest.fixture(scope="module")
def stack(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(
        tmp_path_factory.mktemp("callback-fuzz"),
        module_db,
        funders=[bank_a(bank_args=SETTLE), bank_b(bank_args=SETTLE)],
        dispatch={"query_backoff_seconds": [600]},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as c:
        yield c


# tables the gateway writes on its own schedule (the nightly reconciliation, the voucher
# chain's checkpoints and daily verification), whatever callbacks arrive
SCHEDULED = ("schema_migrations", "recon_", "voucher_checkpoint", "voucher_verification")


def all_counts(probe: Probe) -> dict[str, int]:
    """Rows of every table, whatever later migrations add, but the scheduled ones."""
    tables = [
        r["tablename"]
        for r in probe.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        if not r["tablename"].startswith(SCHEDULED)
    ]
    sql = " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM {t}" for t in sorted(tables))
    return {r["t"]: r["n"] for r in probe.fetch(sql)}


def snapshot(probe: Probe, stack: Stack) -> dict[str, Any]:
    state = dict(probe.fetchrow(STATE))
    state["rows"] = all_counts(probe)
    state["webhooks"] = len(stack.receiver.events())
    return state


def api_view(client: httpx.Client, targets: list[Target]) -> list[dict[str, Any]]:
    views = []
    for t in targets:
        resp = client.get(f"/v1/disbursements/{t.txn_no}", headers=dict(VALID_AUTH))
        assert resp.status_code == 200, resp.text
        vouchers = client.get(f"/v1/disbursements/{t.txn_no}/vouchers", headers=dict(VALID_AUTH))
        assert vouchers.status_code == 200, vouchers.text
        views.append({"resource": resp.json(), "vouchers": len(vouchers.json()["items"])})
    return views


@pytest.fixture(scope="module")
def targets(client: httpx.Client, probe: Probe, stack: Stack) -> list[Target]:
    """Two disbursements at each bank, all `sent`, and a database that holds still."""
    resp = client.put(f"/v1/borrowers/{BORROWER}/accounts", json=PAYEE, headers=dict(VALID_AUTH))
    assert resp.status_code == 201, resp.text
    txn_nos = []
    for i, funder_id in enumerate(["bank-a", "bank-a", "bank-b", "bank-b"]):
        body = disbursement_body(f"CBFUZZ{i:04d}", BORROWER, funder_hint=funder_id)
        resp = client.post("/v1/disbursements", json=body, headers=dict(VALID_AUTH))
        assert resp.status_code == 201, resp.text
        assert resp.json()["funder_id"] == funder_id, resp.text
        txn_nos.append(body["txn_no"])
    deadline = time.monotonic() + 15
    while True:
        views = [v["resource"] for v in api_view(client, [Target(t, "", "", 0) for t in txn_nos])]
        if all(v["status"] == "sent" for v in views):
            break
        assert time.monotonic() < deadline, [v["status"] for v in views]
        time.sleep(0.1)
    found = [
        Target(v["txn_no"], v["funder_id"], v["attempts"][-1]["order_no"], v["amount"])
        for v in views
    ]
    first = snapshot(probe, stack)
    time.sleep(1.5)  # several poll intervals: background work would show up now
    assert snapshot(probe, stack) == first, "the database is not quiescent; the test cannot run"
    return found


@pytest.fixture(scope="module")
def baseline(client: httpx.Client, targets: list[Target]) -> list[dict[str, Any]]:
    return api_view(client, targets)


# ---------------------------------------------------------------- strategies

STATUSES = st.sampled_from(["SUCCESS", "FAILED", "PROCESSING", "REJECTED", "success", ""]) | TEXT


@st.composite
def callback_payload(draw: st.DrawFn, target: Target) -> bytes:
    """A callback about `target` a bank could have sent, mutated now and then; or garbage."""
    kind = draw(st.sampled_from(["plausible", "plausible", "plausible", "mutated", "raw"]))
    if kind == "raw":
        return draw(RAW_BODIES)
    status = draw(STATUSES)
    body: dict[str, Any] = {
        "order_no": target.order_no,
        "bank_ref": "SBXFORGED0001",
        "status": status,
        "amount": draw(st.just(target.amount) | st.integers() | st.none()),
        "finished_at": draw(st.none() | st.just("2026-11-25T10:00:00+08:00") | TEXT),
        "fail_code": "ACCOUNT_FROZEN" if status == "FAILED" else None,
        "fail_reason": "payee account is frozen" if status == "FAILED" else None,
    }
    if kind == "mutated":
        key = draw(st.sampled_from([*body, "extra"]))
        body[key] = draw(JSON_VALUES | st.sampled_from(NASTY_STRINGS))
    return encode(body, ascii_only=draw(st.booleans()))


# a field value with everything HTTP allows, obs-text (0x80-0xFF) included; for the timestamp
# and nonce only printable ASCII, as obs-text there is a 500 today (test_bad_input_regressions)
ODD_VALUE = header_value(FIELD_BYTES)
ASCII_VALUE = header_value(ASCII_BYTES)
HEX64 = st.binary(min_size=32, max_size=32).map(lambda b: b.hex().encode())


@st.composite
def forged_headers(draw: st.DrawFn, funder_id: str, body: bytes) -> tuple[str, Headers]:
    """Headers that do not prove `funder_id`'s bank sent `body` now, and which way they fail."""
    secret = SECRETS.get(funder_id, "no-such-bank")
    ts, nonce = now(), secrets.token_hex(16)
    right = sign(secret, ts, nonce, body)
    how = draw(
        st.sampled_from(
            [
                "unsigned",
                "missing_one",
                "wrong_secret",
                "other_bank",
                "other_body",
                "other_nonce",
                "stale",
                "future",
                "garbage_signature",
                "odd_values",
                "duplicated",
                "truncated",
            ]
        )
    )
    if how == "unsigned":
        return how, []
    if how == "missing_one":
        full = [(TS, ts.encode()), (NONCE, nonce.encode()), (SIG, right)]
        drop = draw(st.integers(0, 2))
        return how, [h for i, h in enumerate(full) if i != drop]
    if how == "wrong_secret":
        wrong = draw(st.text(min_size=1, max_size=40).filter(lambda s: s != secret))
        return how, [
            (TS, ts.encode()),
            (NONCE, nonce.encode()),
            (SIG, sign(wrong, ts, nonce, body)),
        ]
    if how == "other_bank":  # the other bank's valid signature, sent to this bank's endpoint
        other = next(s for f, s in SECRETS.items() if f != funder_id)
        return how, [
            (TS, ts.encode()),
            (NONCE, nonce.encode()),
            (SIG, sign(other, ts, nonce, body)),
        ]
    if how == "other_body":  # a real signature over something else: a tampered body
        signed_body = draw(st.binary(max_size=200).filter(lambda b: b != body))
        return how, [
            (TS, ts.encode()),
            (NONCE, nonce.encode()),
            (SIG, sign(secret, ts, nonce, signed_body)),
        ]
    if how == "other_nonce":  # signed with one nonce, sent with another
        sent_nonce = draw(ASCII_VALUE.filter(lambda v: v and v != nonce.encode()))
        return how, [(TS, ts.encode()), (NONCE, sent_nonce), (SIG, right)]
    if how in ("stale", "future"):  # correctly signed, outside ±300 s
        skew = draw(st.integers(301, 10**7))
        old = str(int(time.time()) + (skew if how == "future" else -skew))
        return how, [
            (TS, old.encode()),
            (NONCE, nonce.encode()),
            (SIG, sign(secret, old, nonce, body)),
        ]
    if how == "garbage_signature":
        sig = draw(HEX64 | ODD_VALUE.filter(bool) | st.just(right.upper()[:-1] + b"0"))
        if sig.lower() == right:
            sig = b"0" * 64
        return how, [(TS, ts.encode()), (NONCE, nonce.encode()), (SIG, sig)]
    if how == "odd_values":  # any legal bytes in each of the three, signature over them
        t = draw(ASCII_VALUE.filter(bool))
        n = draw(ASCII_VALUE.filter(bool))
        return how, [(TS, t), (NONCE, n), (SIG, draw(HEX64 | ODD_VALUE.filter(bool)))]
    if how == "duplicated":  # each header twice, wrong values in both places
        wrong = sign("not-the-secret", ts, nonce, body)
        return how, [
            (TS, ts.encode()),
            (TS, b"0"),
            (NONCE, nonce.encode()),
            (NONCE, b"other"),
            (SIG, wrong),
            (SIG, b"0" * 64),
        ]
    # truncated: a prefix of the right signature
    cut = draw(st.integers(0, 63))
    return how, [(TS, ts.encode()), (NONCE, nonce.encode()), (SIG, right[:cut])]


@st.composite
def forged_callback(draw: st.DrawFn, targets: list[Target]) -> tuple[str, str, bytes, Headers]:
    target = draw(st.sampled_from(targets))
    odd_funder = st.sampled_from(["bank-c", "BANK-A", "bank-a ", "bank-a/..", "银行"])
    funder_id = draw(
        st.integers(0, 9).flatmap(lambda n: odd_funder if n == 0 else st.just(target.funder_id))
    )
    body = draw(callback_payload(target))
    how, headers = draw(forged_headers(funder_id, body))
    extra = draw(st.sampled_from([JSON_HEADERS, [], [("Content-Type", b"text/plain")]]))
    return how, funder_id, body, [*headers, *extra]


# ---------------------------------------------------------------- the properties


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_an_unauthenticated_callback_never_changes_anything(
    client: httpx.Client,
    probe: Probe,
    stack: Stack,
    targets: list[Target],
    baseline: list[dict[str, Any]],
    data: st.DataObject,
) -> None:
    how, funder_id, body, headers = data.draw(forged_callback(targets))
    before = snapshot(probe, stack)
    resp = client.post(f"/v1/callbacks/{funder_id}", content=body, headers=headers)
    event(f"{how}: HTTP {resp.status_code}")
    assert_answered_without_server_error(resp)
    assert resp.status_code in (401, 404, 413), described(resp)  # never the bank's 200 ack
    if funder_id in SECRETS:
        error_of(resp, (401, 413))
    after = snapshot(probe, stack)
    assert after == before, f"{how} changed {_diff(before, after)}: {described(resp)}"


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_a_signed_callback_with_garbage_never_fails_the_server_nor_changes_anything(
    client: httpx.Client,
    probe: Probe,
    stack: Stack,
    targets: list[Target],
    data: st.DataObject,
) -> None:
    """Authentic (right secret, fresh, new nonce) but about no order of ours, or not a callback
    at all: the bank's bug, not an attack, but still no 5xx and nothing written."""
    funder_id = data.draw(st.sampled_from(sorted(SECRETS)))
    order_no = data.draw(
        TEXT.filter(lambda s: "\x00" not in s and s not in {t.order_no for t in targets})
    )
    callback = st.fixed_dictionaries(
        {"order_no": st.just(order_no), "status": STATUSES, "amount": st.integers()},
        optional={"bank_ref": TEXT, "finished_at": TEXT, "fail_code": TEXT},
    ).map(encode)
    garbage = RAW_BODIES.filter(lambda b: b.count(b"[") + b.count(b"{") < 500)
    body = data.draw(st.booleans().flatmap(lambda shaped: callback if shaped else garbage))
    headers = signed_as(SECRETS[funder_id], now(), secrets.token_hex(16), body)
    before = snapshot(probe, stack)
    resp = client.post(
        f"/v1/callbacks/{funder_id}", content=body, headers=[*headers, *JSON_HEADERS]
    )
    event(f"HTTP {resp.status_code}")
    assert_answered_without_server_error(resp)
    assert resp.status_code in (401, 404, 413), described(resp)
    after = snapshot(probe, stack)
    assert after == before, f"changed {_diff(before, after)}: {described(resp)}"


def test_the_api_view_of_the_targets_did_not_change(
    client: httpx.Client, targets: list[Target], baseline: list[dict[str, Any]], stack: Stack
) -> None:
    assert api_view(client, targets) == baseline
    assert all(v["resource"]["status"] == "sent" for v in baseline)
    assert stack.receiver.events() == []  # no outcome was reported to the lending core


def test_a_correctly_signed_callback_is_applied(
    client: httpx.Client, targets: list[Target], probe: Probe, stack: Stack
) -> None:
    """The control: the same comparison sees a change when the bank really calls back, so
    the properties above could have failed."""
    target = targets[0]
    before = snapshot(probe, stack)
    body = json.dumps(
        {
            "order_no": target.order_no,
            "bank_ref": "SBXREAL0001",
            "status": "SUCCESS",
            "amount": target.amount,
            "finished_at": None,
            "fail_code": None,
            "fail_reason": None,
        }
    ).encode()
    ts, nonce = now(), secrets.token_hex(16)
    headers = [
        (TS, ts.encode()),
        (NONCE, nonce.encode()),
        (SIG, sign(SECRETS[target.funder_id], ts, nonce, body)),
        *JSON_HEADERS,
    ]
    resp = client.post(f"/v1/callbacks/{target.funder_id}", content=body, headers=headers)
    assert resp.status_code == 200, described(resp)
    assert resp.text == "SUCCESS"
    assert snapshot(probe, stack) != before
    resp = client.get(f"/v1/disbursements/{target.txn_no}", headers=dict(VALID_AUTH))
    assert resp.json()["status"] == "succeeded", resp.text


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in before:
        if key == "rows":
            rows = {t: (n, after["rows"].get(t)) for t, n in before["rows"].items()}
            out["rows"] = {t: v for t, v in rows.items() if v[0] != v[1]}
        elif before[key] != after[key]:
            out[key] = (before[key], after[key])
    return out
