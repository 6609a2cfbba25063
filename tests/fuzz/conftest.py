"""Fixtures of the fuzz suite: a live gateway (real processes from the e2e harness), a direct
database probe to prove what refused requests did not write, and the bounded, deterministic
Hypothesis settings every fuzz test runs with.

Each module starts its own stack (`harness.run_stack`) on a database emptied for it, so the
modules run in any order and the row counts a module compares are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.conftest import _reset as reset_database
from tests.e2e.harness import TOKEN, Stack, error_of

# Deterministic (same examples on every run, nothing kept in .hypothesis/) and bounded: the
# per-test example counts below keep each module well under a minute on a 2-core machine.
FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- strategies

# strings that broke parsers, databases and log pipelines elsewhere: NUL, lone surrogates (only
# representable escaped in JSON), byte-order mark, right-to-left override, emoji sequences
NASTY_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "x\udc80y",
    "\ud83d",
    "\ufeff",
    "\u202eRTL\u202c",
    "\u200f\u05e2\u05d1\u05e8\u05d9\u05ea",
    "مرحبا بالعالم",
    "😀" * 8,
    "👨‍👩‍👧‍👦",
    "e\u0301\u0301\u0301",
    "𠜎𠜱𠝹",
    "\u0000\u0001\u001f\u007f",
    "' OR '1'='1' --",
    "${jndi:ldap://127.0.0.1/x}",
    "%s%n%x",
    "\\",
    '"',
    "\r\n\t",
    "A" * 65,
    "9" * 33,
    "٣٤٥٦٧٨٩٠١٢",  # Arabic-Indic digits: not [0-9]
    "６２２２０２０２",  # fullwidth digits
)
# beyond every column type (int64) and every float, up to the 4,300 digits Python will parse
HUGE_INTS = st.sampled_from(
    [2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**4000]
) | st.integers(min_value=2**63, max_value=10**40)
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1)
TEXT = (
    st.text(max_size=40)
    | st.text(st.characters(codec="utf-8"), max_size=80)
    | st.sampled_from(NASTY_STRINGS)
    | SURROGATES
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE_INTS
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def encode(value: Any, *, ascii_only: bool = True) -> bytes:
    """JSON bytes of `value`; NaN and Infinity become the non-standard tokens, and a lone
    surrogate is either escaped (ascii_only) or written raw, which is invalid UTF-8."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    """Arrays or objects nested far deeper than any request (and, some, past 64 KiB)."""
    depth = draw(st.sampled_from([33, 100, 1_000, 5_000, 20_000, 40_000]))
    if draw(st.booleans()):
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@st.composite
def nested_value(draw: st.DrawFn) -> Any:
    """A JSON value nested `depth` levels, for inside an otherwise valid body."""
    depth = draw(st.sampled_from([31, 33, 200, 900]))
    value: Any = draw(SCALARS.filter(lambda v: not isinstance(v, float)))
    for _ in range(depth):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


RAW_BODIES = (
    st.binary(max_size=300)
    | JSON_VALUES.map(encode)
    | JSON_VALUES.map(lambda v: encode(v, ascii_only=False))
    | deep_nesting()
    | st.sampled_from(
        [
            b"",
            b"null",
            b"{",
            b'{"a":1,}',
            b"\xef\xbb\xbf{}",  # a UTF-8 byte-order mark before the object
            b'{"amount": NaN}',
            b'{"amount": -Infinity}',
            b'{"amount": 1e999}',
            b"\xff\xfe{\x00}\x00",
            b'{"\\ud800": "\\udfff"}',
            b" " * 70_000 + b"{}",  # past the 64 KiB body limit
        ]
    )
)


# what RFC 9110 lets a field value carry: visible ASCII, space, tab and obs-text (0x80-0xFF);
# anything else (control characters) is refused by aiohttp's HTTP parser before the app
FIELD_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]


def header_value(alphabet: list[int] = FIELD_BYTES) -> st.SearchStrategy[bytes]:
    """A field value HTTP/1.1 allows, no leading or trailing whitespace (clients refuse it)."""
    return st.lists(st.sampled_from(alphabet), max_size=64).map(lambda b: bytes(b).strip())


# printable ASCII only, for header values where other bytes are a known 500 that
# test_bad_input_regressions.py holds by name (the sandbox callback's timestamp and nonce)
ASCII_BYTES = list(range(0x20, 0x7F))


Headers = list[tuple[str, bytes]]
VALID_AUTH: Headers = [("Authorization", f"Bearer {TOKEN}".encode())]
JSON_HEADERS: Headers = [("Content-Type", b"application/json")]

# Authorization headers and whether the gateway must refuse them with 401 (None: either way;
# the scheme's case and extra whitespace are the gateway's choice)
AUTH_HEADERS: st.SearchStrategy[tuple[Headers, bool | None]] = st.one_of(
    st.just((VALID_AUTH, False)),
    st.just(([], True)),
    st.just(([("Authorization", b"")], True)),
    st.just(([("Authorization", b"Bearer")], True)),
    st.just(([("Authorization", TOKEN.encode())], True)),
    st.just(([("Authorization", b"Basic ZGVtbzpkZW1v")], True)),
    st.just(([("Authorization", b"Bearer " + b"x" * 4_000)], True)),
    st.just(([("Authorization", "Bearer démo-tökén".encode())], True)),
    st.just(([("Authorization", f"bearer {TOKEN}".encode())], None)),
    st.just(([("Authorization", f"Bearer \t {TOKEN}".encode())], None)),
    st.just(([("Authorization", b"Bearer \xff\xfe\xfd")], True)),
    header_value().map(lambda v: ([("Authorization", (b"Bearer " + v).strip())], True)),
    header_value().filter(bool).map(lambda v: ([("Authorization", v)], True)),
    # duplicated: aiohttp reads the first one
    st.just(([("Authorization", b"Bearer wrong"), *VALID_AUTH], True)),
    st.just(([*VALID_AUTH, ("Authorization", b"Bearer wrong")], False)),
)
CONTENT_TYPES: st.SearchStrategy[Headers] = st.one_of(
    st.just([("Content-Type", b"application/json")]),
    st.just([]),
    st.just([("Content-Type", b"text/plain")]),
    st.just([("Content-Type", b"application/json; charset=latin-1")]),
    st.just([("Content-Type", b"multipart/form-data; boundary=x")]),
    st.just([("Content-Type", b"application/x-www-form-urlencoded")]),
    header_value().map(lambda v: [("Content-Type", v)]),
)
EXTRA_HEADERS: st.SearchStrategy[Headers] = st.lists(
    st.tuples(
        st.sampled_from(
            # not Expect: aiohttp answers it before the app (test_bad_input_regressions.py)
            ["X-Request-Id", "Idempotency-Key", "X-Forwarded-For", "Accept", "X-Fuzz"]
        ),
        header_value(),
    ),
    max_size=3,
)


# ---------------------------------------------------------------- assertions


def send(
    client: httpx.Client,
    method: str,
    url: str,
    body: bytes,
    headers: Sequence[tuple[str, bytes]],
) -> httpx.Response:
    return client.request(method, url, content=body, headers=list(headers))


def described(resp: httpx.Response) -> str:
    """The request and the answer, for a failure message a person can replay."""
    req = resp.request
    head = [(k.decode("latin-1"), v[:120]) for k, v in req.headers.raw]
    return (
        f"{req.method} {req.url} {head} body={req.content[:300]!r}"
        f"\n-> {resp.status_code} {resp.headers.get('content-type')} {resp.text[:300]!r}"
    )


def assert_answered_without_server_error(resp: httpx.Response) -> None:
    """No 5xx; every 4xx in CONTRACT.md's `{"error": {...}}` shape."""
    assert resp.status_code < 500, described(resp)
    if resp.status_code >= 400:
        try:
            error_of(resp, resp.status_code)
        except (AssertionError, ValueError) as e:
            raise AssertionError(f"not the error shape: {described(resp)}") from e


def counts_changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (before[k], after[k]) for k in before if before[k] != after[k]}


@pytest.fixture(scope="module")
def module_db(database_url: str) -> str:
    """The database URL, migrated and emptied before the module's processes start."""
    asyncio.run(reset_database(database_url))
    return database_url


class Probe:
    """Synchronous SQL against the gateway's database, on a private event loop.

    The fuzz tests are synchronous (Hypothesis drives them), so the probe owns its loop and one
    connection for the module instead of borrowing pytest-asyncio's per-test loop.
    """

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection = self._loop.run_until_complete(asyncpg.connect(url))

    def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return self._loop.run_until_complete(self._conn.fetch(sql, *args))

    def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record:
        row = self._loop.run_until_complete(self._conn.fetchrow(sql, *args))
        assert row is not None, sql
        return row

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._conn.close())
        finally:
            self._loop.close()


@pytest.fixture(scope="module")
def probe(module_db: str) -> Iterator[Probe]:
    p = Probe(module_db)
    try:
        yield p
    finally:
        p.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each schemathesis operation its own node id.

    `@schema.parametrize()` names its items `test[GET /path]`, but pytest 9.2 builds a node id
    from the function's original name and its parametrization only, so every operation would
    share one id (and the summary would not say which operation failed).
    """
    here = Path(__file__).parent
    for item in items:
        name, nodeid = item.name, item.nodeid
        if item.path.parent != here or not name.endswith("]") or nodeid.endswith("]"):
            continue
        with contextlib.suppress(AttributeError, ValueError):  # a pytest that does it right
            item._id = item._id.with_params(name[name.index("[") + 1 : -1])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[Any]:
    """On a failure, attach the tail of every process log of the test's stack to the report."""
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Stack):
                report.sections.append(("process logs", value.log_tails()))
                break
    return report
