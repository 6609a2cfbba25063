"""Schemathesis over the live `GET /openapi.json` of a real `fundgate serve` process.

Every documented operation is called with generated requests (valid and invalid ones) and the
bearer token `demo-token`; each answer must not be a server error, must use a documented
status code and content type, and must match the documented response schema. The document
itself must be a valid OpenAPI 3.1 document that covers every route of CONTRACT.md.

Bounded and deterministic: a few examples per operation, derandomized, so the module runs in
well under a minute and fails the same way on every machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from aiohttp import web
from hypothesis import settings
from schemathesis.config import SchemathesisConfig

from gateway.api import OPENAPI, install_routes
from reconciliation.classify import BREAK_TYPES
from tests.e2e.harness import TOKEN, Stack, bank_a, bank_b, run_stack
from tests.fuzz.conftest import FUZZ

pytestmark = pytest.mark.e2e

# per operation; about 20 operations x (examples + schemathesis' coverage cases) stays < 60 s
MAX_EXAMPLES = 25

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20261125,
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    }
)

# CONTRACT.md's routes: the document must describe each (more is fine, fewer is a bug)
CONTRACT_ROUTES = {
    ("post", "/v1/disbursements"),
    ("get", "/v1/disbursements"),
    ("get", "/v1/disbursements/{txn_no}"),
    ("get", "/v1/disbursements/{txn_no}/vouchers"),
    ("put", "/v1/borrowers/{borrower_id}/accounts"),
    ("delete", "/v1/borrowers/{borrower_id}/accounts/{account_no}"),
    ("get", "/v1/borrowers/{borrower_id}/accounts"),
    ("post", "/v1/callbacks/{funder_id}"),
    ("get", "/v1/funders"),
    ("get", "/v1/reconciliation/runs"),
    ("get", "/v1/reconciliation/runs/{id}"),
    ("get", "/v1/reconciliation/runs/{id}/breaks"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def stack(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(
        tmp_path_factory.mktemp("openapi"), module_db, funders=[bank_a(), bank_b()]
    ) as s:
        yield s


@pytest.fixture(scope="module")
def document(stack: Stack) -> dict[str, Any]:
    resp = httpx.get(f"{stack.gateway.url}/openapi.json", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body: dict[str, Any] = resp.json()
    return body


def served_document() -> dict[str, Any]:
    """What `GET /openapi.json` serves, built the way `fundgate serve` builds it.

    schemathesis needs the operations at collection time, before any process runs (its lazy
    `from_fixture` loader does not work with pytest 9.2), so the document is built here from the
    same route table and models; `test_openapi_json_is_what_the_tests_run_over` proves the
    live gateway serves exactly this document.
    """
    app = web.Application()
    install_routes(app, api=True)
    return json.loads(json.dumps(app[OPENAPI]))


SERVED = served_document()
schema = schemathesis.openapi.from_dict(SERVED, config=CONFIG)


def test_openapi_json_is_what_the_tests_run_over(document: dict[str, Any]) -> None:
    assert document == SERVED


def test_openapi_json_is_a_valid_openapi_3_1_document(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1."), document["openapi"]
    # the OpenAPI 3.1 meta-schema, as schemathesis ships it
    schemathesis.openapi.from_dict(document, config=CONFIG).validate()


def test_openapi_json_describes_every_route_of_the_contract(document: dict[str, Any]) -> None:
    described = {(m, p) for p, ops in document["paths"].items() for m in ops if m in METHODS}
    assert CONTRACT_ROUTES <= described, sorted(CONTRACT_ROUTES - described)


def test_the_documented_break_types_are_every_type_a_run_records() -> None:
    # the run-level `ledger_total_mismatch` was once left out, and its breaks failed the
    # documented schema
    schemas = SERVED["components"]["schemas"]
    prop = schemas["Break"]["properties"]["type"]
    if "$ref" in prop:
        prop = schemas[prop["$ref"].rsplit("/", 1)[1]]
    assert prop["enum"] == list(BREAK_TYPES)


def test_openapi_json_operations_are_well_formed(document: dict[str, Any]) -> None:
    """Unique operation ids, every path placeholder declared, every `$ref` resolvable, every
    error answer documented with the `{"error": {...}}` shape."""
    op_ids: list[str] = []
    for path, ops in document["paths"].items():
        placeholders = set(re.findall(r"{([^}]+)}", path))
        for method, op in ops.items():
            if method not in METHODS:
                continue
            op_ids.append(op["operationId"])
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == placeholders, (method, path, declared, placeholders)
            for status, answer in op["responses"].items():
                media = answer.get("content", {}).get("application/json")
                if not status.startswith(("4", "5")) or media is None:
                    continue
                if (path, status) == ("/readyz", "503"):
                    continue  # readiness answers its own Health document when not ready
                assert media["schema"] == {"$ref": "#/components/schemas/ErrorOut"}, (
                    method,
                    path,
                    status,
                )
    assert len(op_ids) == len(set(op_ids)), sorted(op_ids)
    schemas = document["components"]["schemas"]
    for ref in re.findall(r'"\$ref":\s*"([^"]+)"', json.dumps(document)):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


@schema.parametrize()
@settings(FUZZ, max_examples=MAX_EXAMPLES)
def test_every_operation_answers_as_documented(case: schemathesis.Case, stack: Stack) -> None:
    case.call_and_validate(base_url=stack.gateway.url, checks=CHECKS)
